"""numpy references of the plugin ops, keyed by ONNX op name (in the spirit of Polygraphy's pluginref).

These are the single CPU reference of the plugin contract (docs/op-contracts.md): ONNX Runtime runs
the plugin-flavour graph through them, and the Triton kernels are tested against them. Torch-free.
Signatures and semantics equal `samba_edge.export.ops` (tested against each other).
"""
from __future__ import annotations

import numpy as np


def _softplus(x: np.ndarray) -> np.ndarray:
    # torch's softplus with threshold 20: linear above it; log1p(exp) below (no overflow)
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0)))).astype(np.float32)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def selective_scan_np(u, delta, A, B, C, D, z, delta_bias, ssm_state, delta_softplus: int = 1):
    """u, delta, z (b, E, T); A (E, N); B, C (b, N, T); D, delta_bias (E,); ssm_state (b, E, N).
    Returns y (b, E, T) and the state after the chunk's last token, both fp32."""
    f = np.float32
    u, z, A = u.astype(f), z.astype(f), A.astype(f)
    d = delta.astype(f) + delta_bias.astype(f)[:, None]
    d = _softplus(d) if delta_softplus else d
    s = ssm_state.astype(f).copy()
    y = np.empty(u.shape, dtype=f)
    for t in range(u.shape[-1]):
        dt = d[:, :, t][..., None]                                         # (b, E, 1)
        s = np.exp(dt * A) * s + (dt * u[:, :, t][..., None]) * B[:, None, :, t].astype(f)
        y[:, :, t] = np.einsum("ben,bn->be", s, C[:, :, t].astype(f))
    y = (y + D.astype(f)[:, None] * u) * _silu(z)
    return y.astype(f), s.astype(f)


def sliding_window_attention_np(q, k, v, k_window, v_window, start_pos, window: int, scale: float):
    """q (b, H, T, hs); k, v (b, G, T, hs); windows (b, G, W-1, hs), slot j = position start-(W-1)+j.
    Returns y (b, H, T, hs) in q's dtype and the last W-1 keys/values of [window | chunk]."""
    b, H, T, hs = q.shape
    G, C = k.shape[1], k_window.shape[2]
    keys = np.concatenate([k_window.astype(k.dtype), k], axis=2)
    vals = np.concatenate([v_window.astype(v.dtype), v], axis=2)
    qpos = start_pos[:, None] + np.arange(T)                               # (b, T)
    kpos = start_pos[:, None] - C + np.arange(C + T)                       # (b, C+T)
    qp, kp = qpos[:, :, None], kpos[:, None, :]
    allowed = (kp >= 0) & (kp <= qp) & (kp > qp - window)                  # (b, T, C+T)
    qg = q.astype(np.float32).reshape(b, G, H // G, T, hs)
    scores = np.einsum("bgrtd,bgsd->bgrts", qg, keys.astype(np.float32)) * np.float32(scale)
    scores = np.where(allowed[:, None, None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    y = np.einsum("bgrts,bgsd->bgrtd", p, vals.astype(np.float32)).reshape(b, H, T, hs)
    return y.astype(q.dtype), keys[:, :, T:].astype(k_window.dtype), vals[:, :, T:].astype(v_window.dtype)


# op name -> reference; ONNX attributes are passed as keyword arguments
REFERENCES = {
    "SelectiveScan": selective_scan_np,
    "SlidingWindowAttention": sliding_window_attention_np,
}
