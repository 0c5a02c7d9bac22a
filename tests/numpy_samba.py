"""An independent float64 numpy SAMBA forward, written from docs (shared/notes/samba-architecture.md).

Test oracle only: full sequence from an empty state, no chunking, no caches. It shares no code
with `samba_edge.export` (the config object is read for its numbers only), so an agreement with
the torch model is evidence about the architecture, not about a shared helper.
"""
from __future__ import annotations

import numpy as np

F64 = np.float64


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softplus(x: np.ndarray) -> np.ndarray:
    # log(1 + e^x), stable for large |x|; exactly x above 20 as in the Mamba kernels
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def swiglu(x: np.ndarray, sd: dict, p: str) -> np.ndarray:
    w1, w2, w3 = (sd[f"{p}mlp.swiglu.{n}.weight"] for n in ("w1", "w2", "w3"))
    return (silu(x @ w1.T) * (x @ w2.T)) @ w3.T


def mamba(h: np.ndarray, sd: dict, p: str, cfg) -> np.ndarray:
    """Mamba-1 mixer over a whole sequence. h: (L, d) -> (L, d)."""
    L = h.shape[0]
    E, N, K, R = cfg.expand * cfg.n_embd, cfg.d_state, cfg.d_conv, cfg.dt_rank
    xz = h @ sd[p + "in_proj.weight"].T                         # (L, 2E)
    x, z = xz[:, :E], xz[:, E:]

    # depthwise causal conv: out[t, e] = bias[e] + sum_k w[e, k] * x[t - (K-1) + k, e], zeros before 0
    w = sd[p + "conv1d.weight"][:, 0, :]                        # (E, K)
    xpad = np.concatenate([np.zeros((K - 1, E)), x], axis=0)    # (K-1+L, E)
    xc = np.tile(sd[p + "conv1d.bias"], (L, 1))
    for k in range(K):
        xc = xc + xpad[k:k + L] * w[:, k]
    u = silu(xc)                                                # (L, E)

    dbc = u @ sd[p + "x_proj.weight"].T                         # (L, R + 2N)
    dt, Bm, Cm = dbc[:, :R], dbc[:, R:R + N], dbc[:, R + N:]
    delta = softplus(dt @ sd[p + "dt_proj.weight"].T + sd[p + "dt_proj.bias"])   # (L, E)
    A = -np.exp(sd[p + "A_log"])                                # (E, N)
    D = sd[p + "D"]

    s = np.zeros((E, N))
    y = np.empty((L, E))
    for t in range(L):                                          # plain sequential recurrence
        s = np.exp(delta[t][:, None] * A) * s + (delta[t] * u[t])[:, None] * Bm[t][None, :]
        y[t] = s @ Cm[t] + D * u[t]
    return (y * silu(z)) @ sd[p + "out_proj.weight"].T


def _bf16(a: np.ndarray) -> np.ndarray:
    """fp32 -> bfloat16 -> fp32 by bit arithmetic (round to nearest, ties to even), independent of torch."""
    b = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32).astype(a.dtype)


def rope_neox(x: np.ndarray, n_rot: int, base: float, condense: int = 1, table_dtype: str = "fp32") -> np.ndarray:
    """x: (heads, L, hs); rotate the first n_rot dims (half-split pairs i, i + n_rot/2)."""
    L = x.shape[1]
    half = n_rot // 2
    inv_freq = base ** (-(2.0 * np.arange(half)) / n_rot)       # theta_i = base^(-2i/n_rot)
    ang = (np.arange(L, dtype=F64) / condense)[:, None] * inv_freq[None, :]   # (L, half)
    cos, sin = np.cos(ang), np.sin(ang)
    if table_dtype == "bf16":                                    # the official tables: bf16, round to nearest even
        cos, sin = _bf16(cos), _bf16(sin)
    x1, x2 = x[..., :half], x[..., half:n_rot]
    out = x.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:n_rot] = x1 * sin + x2 * cos
    return out


def sliding_window_attention(h: np.ndarray, sd: dict, p: str, cfg) -> np.ndarray:
    """Local causal attention (window W keys including self) over a whole sequence. h: (L, d)."""
    L, d = h.shape
    H, G, hs, W = cfg.n_head, cfg.n_query_groups, cfg.head_size, cfg.local_window
    qpg = H // G                                                # query heads per kv group
    wqkv = sd[p + "attn.attn.weight"].reshape(G, qpg + 2, hs, d)
    wq = wqkv[:, :qpg].reshape(H, hs, d)                        # query head g*qpg + j
    wk, wv = wqkv[:, qpg], wqkv[:, qpg + 1]                     # (G, hs, d)
    q = np.einsum("hcd,ld->hlc", wq, h)                         # (H, L, hs)
    k = np.einsum("gcd,ld->glc", wk, h)                         # (G, L, hs)
    v = np.einsum("gcd,ld->glc", wv, h)
    if not cfg.nope:
        n_rot = int(cfg.rotary_percentage * hs)
        q = rope_neox(q, n_rot, cfg.rope_base, cfg.condense_ratio, cfg.rope_table_dtype)
        k = rope_neox(k, n_rot, cfg.rope_base, cfg.condense_ratio, cfg.rope_table_dtype)

    i = np.arange(L)[:, None]
    j = np.arange(L)[None, :]
    visible = (j <= i) & (j > i - W)
    out = np.empty((L, H, hs))
    for head in range(H):
        g = head // qpg
        scores = q[head] @ k[g].T / np.sqrt(hs)                 # (L, L)
        scores = np.where(visible, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        prob = np.exp(scores)
        prob /= prob.sum(axis=-1, keepdims=True)
        out[:, head] = prob @ v[g]
    return out.reshape(L, H * hs) @ sd[p + "attn.proj.weight"].T


def samba_forward_np(state_dict: dict, cfg, ids: np.ndarray) -> np.ndarray:
    """Full-sequence SAMBA logits (B, L, padded_vocab_size) in float64 from an empty state."""
    sd = {k: np.asarray(v, dtype=F64) for k, v in state_dict.items()}
    wte = sd["transformer.wte.weight"]
    head = sd.get("lm_head.weight", wte)                        # tied to wte unless mamba_init is false
    eps = cfg.norm_eps
    ids = np.asarray(ids)
    out = []
    for row in ids:
        x = wte[row]                                            # (L, d), no embedding scale
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            h = rms_norm(x, sd[p + "norm_1.weight"], eps)
            if i % 2 == 0:                                      # even blocks: Mamba, odd: SWA
                x = x + mamba(h, sd, p + "attn.", cfg)
            else:
                x = x + sliding_window_attention(h, sd, p, cfg)
            x = x + swiglu(rms_norm(x, sd[p + "norm_2.weight"], eps), sd, p)
        out.append(rms_norm(x, sd["transformer.ln_f.weight"], eps) @ head.T)
    return np.stack(out)
