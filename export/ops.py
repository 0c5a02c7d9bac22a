"""The two SAMBA custom ops: `samba::selective_scan` and `samba::sliding_window_attention`.

Each op is a `torch.library.custom_op` with a real eager body (the numerical reference for every
backend), a fake kernel (shapes only, for tracing/export) and autograd by recomputation (so the
same op trains the shipped tiny model). The ONNX plugin ops `samba.SelectiveScan` and
`samba.SlidingWindowAttention` have exactly these signatures; see docs/op-contracts.md.

Precision: the scan, delta, softplus, exp, A, D and the state are fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# ---- selective scan -------------------------------------------------------------------------
def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                       delta_bias: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor]:
    """Mamba-1 selective scan over one chunk, continuing from `ssm_state`.

    u, delta, z: (b, E, T)   conv output, dt_proj(dt) without bias, gate
    A: (E, N) = -exp(A_log)  B, C: (b, N, T)   D, delta_bias: (E,)   ssm_state: (b, E, N) fp32
    returns y (b, E, T) fp32 = (C.s_t + D*u) * silu(z), and the state after the last token.
    """
    f32 = torch.float32
    u, z = u.to(f32), z.to(f32)
    delta = F.softplus(delta.to(f32) + delta_bias.to(f32)[:, None])        # (b, E, T); linear above 20
    A = A.to(f32)
    # time-major (T, b, E, N) so each step reads one contiguous slice; unbind keeps backward O(T)
    dA = torch.exp(delta.permute(2, 0, 1).unsqueeze(-1) * A)
    dBu = (delta * u).permute(2, 0, 1).unsqueeze(-1) * B.to(f32).permute(2, 0, 1).unsqueeze(2)
    hs = LinearRecurrence.apply(dA, dBu, ssm_state.to(f32))                 # (T, b, E, N)
    y = torch.einsum("tben,bnt->bet", hs, C.to(f32))
    y = (y + D.to(f32)[:, None] * u) * F.silu(z)
    last = hs[-1].clone() if hs.shape[0] else ssm_state.to(f32).clone()
    return y, last


class LinearRecurrence(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t over the leading (time) axis, from h_{-1} = h0.

    A plain loop, but with a hand-written reverse loop for the gradient instead of one autograd
    node per step: training the shipped model on CPU is several times faster this way.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        hs = torch.empty_like(b)
        h = h0
        for t in range(a.shape[0]):
            h = torch.addcmul(b[t], a[t], h, out=hs[t])
        ctx.save_for_backward(a, hs, h0)
        return hs

    @staticmethod
    def backward(ctx, g_hs: Tensor):
        a, hs, h0 = ctx.saved_tensors
        g_a, g_b = torch.empty_like(a), torch.empty_like(a)
        g = torch.zeros_like(h0)
        for t in range(a.shape[0] - 1, -1, -1):
            g = g + g_hs[t]                                   # dL/dh_t, through every later step
            g_b[t] = g
            torch.mul(g, hs[t - 1] if t > 0 else h0, out=g_a[t])
            g = g * a[t]                                      # -> dL/dh_{t-1}
        return g_a, g_b, g


@torch.library.custom_op("samba::selective_scan", mutates_args=())
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                   delta_bias: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor]:
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, ssm_state)


@selective_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, ssm_state):
    return u.new_empty(u.shape, dtype=torch.float32), ssm_state.new_empty(ssm_state.shape, dtype=torch.float32)


# ---- sliding-window attention ---------------------------------------------------------------
def window_mask(start_pos: Tensor, t: int, cache_len: int, window: int) -> Tensor:
    """(b, T, cache_len + T) bool: key j of [cache | chunk] is visible to query i.

    Key j holds absolute position start - cache_len + j; query i is at start + i. A key is visible
    when it exists (position >= 0) and lies in (q - W, q]. Masking by absolute position is what
    keeps chunked prefill exact: a chunk's own keys never evict keys a query still needs.
    """
    ar_q = torch.arange(t, device=start_pos.device)
    ar_k = torch.arange(cache_len + t, device=start_pos.device)
    qpos = start_pos[:, None] + ar_q                                       # (b, T)
    kpos = start_pos[:, None] - cache_len + ar_k                           # (b, C+T)
    qp, kp = qpos[:, :, None], kpos[:, None, :]
    return (kp >= 0) & (kp <= qp) & (kp > qp - window)


def sliding_window_attention_ref(q: Tensor, k: Tensor, v: Tensor, k_window: Tensor, v_window: Tensor,
                                 start_pos: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Queries of one chunk over the cached window plus the chunk's own keys.

    q: (b, H, T, hs)  k, v: (b, G, T, hs) (RoPE already applied)  k_window, v_window: (b, G, W-1, hs),
    slot j holding absolute position start_pos - (W-1) + j   start_pos: (b,) int64
    returns y (b, H, T, hs) in q's dtype, and the updated windows (the last W-1 keys/values).
    """
    b, H, T, hs = q.shape
    G, cache_len = k.shape[1], k_window.shape[2]
    keys = torch.cat([k_window.to(k.dtype), k], dim=2)                     # (b, G, C+T, hs)
    vals = torch.cat([v_window.to(v.dtype), v], dim=2)
    rep = H // G                                                           # query heads per kv group
    kx = keys.repeat_interleave(rep, dim=1).float()
    vx = vals.repeat_interleave(rep, dim=1).float()
    scores = torch.matmul(q.float(), kx.transpose(-1, -2)) * scale         # (b, H, T, C+T) fp32
    mask = window_mask(start_pos, T, cache_len, window)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.matmul(torch.softmax(scores, dim=-1), vx).to(q.dtype)
    return y, keys[:, :, T:].to(k_window.dtype).clone(), vals[:, :, T:].to(v_window.dtype).clone()


@torch.library.custom_op("samba::sliding_window_attention", mutates_args=())
def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, k_window: Tensor, v_window: Tensor,
                             start_pos: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return sliding_window_attention_ref(q, k, v, k_window, v_window, start_pos, window, scale)


@sliding_window_attention.register_fake
def _(q, k, v, k_window, v_window, start_pos, window, scale):
    return q.new_empty(q.shape), k_window.new_empty(k_window.shape), v_window.new_empty(v_window.shape)


# ---- autograd by recomputation: the eager bodies are plain differentiable torch ---------------
def _recompute_backward(ref, n_tensor_args: int):
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensor_args])
        ctx.extra = inputs[n_tensor_args:]

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(t.is_floating_point()) for t in saved]
            outs = ref(*ins, *ctx.extra)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            wrt = [t for t in ins if t.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        it = iter(got)
        return tuple(next(it) if t.requires_grad else None for t in ins) + (None,) * len(ctx.extra)

    return setup_context, backward


for _op, _ref, _n in ((selective_scan, selective_scan_ref, 9), (sliding_window_attention, sliding_window_attention_ref, 6)):
    _setup, _bwd = _recompute_backward(_ref, _n)
    _op.register_autograd(_bwd, setup_context=_setup)
