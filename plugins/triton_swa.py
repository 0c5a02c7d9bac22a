"""Triton kernels of `samba.SlidingWindowAttention` (docs/op-contracts.md).

Layout of this file (the Triton tutorials' order): the kernels, the host wrapper (torch tensors in,
torch tensors out, the signature of `export.ops.sliding_window_attention_ref`), then
`sliding_window_attention_ref`, the reference it must equal. `plugins/aot.py` compiles both kernels
ahead of time from this file's source.

Two kernels:
- `swa_fwd_kernel`: one program per (block of BLOCK_M queries, batch row x query head). The program
  streams only the keys its queries can see (at most BLOCK_M + W - 1 of the C + T keys of
  [cached window | chunk keys]) in blocks of BLOCK_N, first from the window cache, then from the
  chunk, with an online (running max / running sum) fp32 softmax, so nothing of size W or T is
  materialised. Visibility is decided by absolute position exactly as in the contract: key j of
  [window | chunk] is at start_pos - C + j, query i at start_pos + i, and key kp is visible iff
  kp >= 0 and p - W < kp <= p. start_pos is read per batch row, so rows may sit at different
  positions. GQA/MQA: query head h reads kv group h // (H // G).
- `swa_window_update_kernel`: the window cache update, a copy: row r of the new cache is row T + r
  of [window | chunk] (the last C rows). One program per (block of BLOCK_R rows, batch row x group).
  It reads only inputs, so it is independent of the attention kernel; outputs must not alias inputs.

Shapes (H, G, T, W, C) are runtime arguments; the head size (HEAD_DIM) and the block sizes are
compile-time constants. All tensors contiguous: q, y (b, H, T, hs); k, v (b, G, T, hs); windows
(b, G, C, hs) with C = W - 1; start_pos (b,) int64. Dots run in exact fp32 (`input_precision="ieee"`,
no TF32), the softmax in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_block(acc, m_i, l_i, q, k, v, qpos, q_valid, kpos, k_valid, W, scale):
    """One block of keys into the running softmax state (acc, m_i, l_i) of BLOCK_M queries."""
    sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale                  # (BLOCK_M, BLOCK_N)
    vis = (q_valid[:, None] & k_valid[None, :] & (kpos[None, :] >= 0)
           & (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - W))
    sc = tl.where(vis, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)      # rows that saw no key yet: no NaN
    p = tl.exp(sc - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _attention_program(pid_m, pid_bh, q_ptr, k_ptr, v_ptr, kw_ptr, vw_ptr, start_ptr, y_ptr, H, G, T, W, C, scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M queries (block pid_m) of batch row x head pid_bh."""
    b = pid_bh // H
    h = pid_bh % H
    g = h // (H // G)
    bg = (b * G + g).to(tl.int64)
    s0 = tl.load(start_ptr + b).to(tl.int64)                  # absolute position of token 0 of this row

    m0 = pid_m * BLOCK_M
    i = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_valid = i < T
    q_off = (pid_bh.to(tl.int64) * T + i[:, None]) * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + q_off, mask=q_valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    qpos = s0 + i

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    kdt = k_ptr.dtype.element_ty                              # window rows go through k's dtype (as the reference)
    vdt = v_ptr.dtype.element_ty

    # Keys j of [window | chunk] visible to queries m0..m0+BLOCK_M-1 satisfy j >= m0 + C - W + 1
    # (window) and j <= m0 + BLOCK_M - 1 + C (causal), and j >= C - s0 (position >= 0).
    # 1) cached window, slots [lo, C). lo is clamped to [0, C] in 64 bits before the int32 cast, and
    # loads are masked on both sides: TensorRT's tactic timing runs us on garbage start_pos (any
    # int64), where C - s0 cast to int32 used to wrap negative (out-of-bounds loads, ~2^31 trips).
    lo = tl.minimum(tl.maximum(tl.maximum((m0 + C + 1).to(tl.int64) - W, 0), C - s0), C).to(tl.int32)
    hi = tl.minimum(C, m0 + BLOCK_M + C)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jv = (j >= 0) & (j < C)
        off = (bg * C + j[:, None]) * HEAD_DIM + d[None, :]
        msk = jv[:, None] & d_mask[None, :]
        kb = tl.load(kw_ptr + off, mask=msk, other=0.0).to(kdt).to(tl.float32)
        vb = tl.load(vw_ptr + off, mask=msk, other=0.0).to(vdt).to(tl.float32)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kb, vb, qpos, q_valid, s0 - C + j, jv, W, scale)
    # 2) the chunk's own keys, t in [max(m0 - W + 1, 0), min(T, m0 + BLOCK_M))
    lo2 = tl.maximum(m0 - W + 1, 0)
    hi2 = tl.minimum(T, m0 + BLOCK_M)
    for t0 in range(lo2, hi2, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tv = (t >= 0) & (t < hi2)
        off = (bg * T + t[:, None]) * HEAD_DIM + d[None, :]
        msk = tv[:, None] & d_mask[None, :]
        kb = tl.load(k_ptr + off, mask=msk, other=0.0).to(tl.float32)
        vb = tl.load(v_ptr + off, mask=msk, other=0.0).to(tl.float32)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kb, vb, qpos, q_valid, s0 + t, tv, W, scale)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)                   # padded query rows (i >= T) saw nothing
    out = acc / l_safe[:, None]
    tl.store(y_ptr + q_off, out.to(y_ptr.dtype.element_ty), mask=q_valid[:, None] & d_mask[None, :])


@triton.jit
def swa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kw_ptr, vw_ptr, start_ptr,           # inputs 0..5
    y_ptr,                                                    # output 0
    H, G, T, W, C, scale,                                     # runtime shapes / attributes
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _attention_program(tl.program_id(0), tl.program_id(1), q_ptr, k_ptr, v_ptr, kw_ptr, vw_ptr, start_ptr, y_ptr,
                       H, G, T, W, C, scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)


@triton.jit
def _update_program(pid_r, bg, k_ptr, v_ptr, kw_ptr, vw_ptr, kw_out_ptr, vw_out_ptr, T, C,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """BLOCK_R rows (block pid_r) of the new window of batch row x kv group bg."""
    bg = bg.to(tl.int64)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    r_mask = r < C
    src = r + T                                               # row of [window | chunk]
    from_win = src < C
    m_win = (r_mask & from_win)[:, None] & d_mask[None, :]
    m_chk = (r_mask & (src >= C))[:, None] & d_mask[None, :]
    win_off = (bg * C + src[:, None]) * HEAD_DIM + d[None, :]
    chk_off = (bg * T + (src - C)[:, None]) * HEAD_DIM + d[None, :]
    out_off = (bg * C + r[:, None]) * HEAD_DIM + d[None, :]
    out_mask = r_mask[:, None] & d_mask[None, :]
    odt = kw_out_ptr.dtype.element_ty
    kw = tl.load(kw_ptr + win_off, mask=m_win, other=0.0).to(k_ptr.dtype.element_ty).to(odt)
    kc = tl.load(k_ptr + chk_off, mask=m_chk, other=0.0).to(odt)
    tl.store(kw_out_ptr + out_off, tl.where(from_win[:, None], kw, kc), mask=out_mask)
    vw = tl.load(vw_ptr + win_off, mask=m_win, other=0.0).to(v_ptr.dtype.element_ty).to(odt)
    vc = tl.load(v_ptr + chk_off, mask=m_chk, other=0.0).to(odt)
    tl.store(vw_out_ptr + out_off, tl.where(from_win[:, None], vw, vc), mask=out_mask)


@triton.jit
def swa_window_update_kernel(
    k_ptr, v_ptr, kw_ptr, vw_ptr,                             # inputs 1..4
    kw_out_ptr, vw_out_ptr,                                   # outputs 1..2
    T, C,                                                     # runtime shapes
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    _update_program(tl.program_id(0), tl.program_id(1), k_ptr, v_ptr, kw_ptr, vw_ptr, kw_out_ptr, vw_out_ptr, T, C,
                    HEAD_DIM, BLOCK_D, BLOCK_R)


@triton.jit
def swa_qdp_kernel(
    q_ptr, k_ptr, v_ptr, kw_ptr, vw_ptr, start_ptr,           # inputs 0..5
    H, G, T, W, C, BG,                                        # int32 extra args (BG = batch * G)
    y_ptr, kw_out_ptr, vw_out_ptr,                            # outputs 0..2
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Both kernels in ONE launch, for TensorRT's `tensorrt.plugin` aot_impl route (one kernel per
    plugin; arguments: inputs, int32 scalars, outputs; no float scalars, so the scale is baked in).
    Grid (cdiv(T, BLOCK_M) + cdiv(C, BLOCK_R), batch * H): the first programs along axis 0 attend,
    the rest copy the window (only the first batch * G rows along axis 1 have one to copy)."""
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    n_attn = tl.cdiv(T, BLOCK_M)
    if pid_x < n_attn:
        _attention_program(pid_x, pid_y, q_ptr, k_ptr, v_ptr, kw_ptr, vw_ptr, start_ptr, y_ptr,
                           H, G, T, W, C, SCALE, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)
    elif pid_y < BG:
        _update_program(pid_x - n_attn, pid_y, k_ptr, v_ptr, kw_ptr, vw_ptr, kw_out_ptr, vw_out_ptr, T, C,
                        HEAD_DIM, BLOCK_D, BLOCK_R)


# ---- host side ------------------------------------------------------------------------------
# Launch configuration (also what plugins/aot.py compiles). tl.dot needs every block dim >= 16.
# Chosen from ptxas resource reports, not GPU timings: with exact-fp32 dots, 16 x 32 blocks over 4
# warps and 2 pipeline stages use ~110 registers and 42 KB shared memory at head_size 128 in the AOT
# builds (no spills, no shared-memory opt-in needed); 32 x 32 / 64 x 64 blocks spilled or needed
# > 48 KB. Small BLOCK_M also wastes less on decode (T = 1). tools/gpu_first_run.py measures them.
# fp16 q/k/v: one stage. With two, sm_80+ builds need 72 KB of shared memory (an opt-in the aot_impl
# route cannot make), 255 registers and 328 B of stack spills; with one, 40 KB, 80-116 registers, none.
BLOCK_M = 16
BLOCK_N = 32
NUM_WARPS = 4
NUM_STAGES = 2
NUM_STAGES_FP16 = 1
BLOCK_R = 32
UPDATE_NUM_WARPS = 4


def num_stages(half: bool) -> int:
    return NUM_STAGES_FP16 if half else NUM_STAGES


def block_d(head_size: int) -> int:
    """Padded head dim: a power of two, >= 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(head_size))


def fwd_grid(T: int, batch: int, H: int, block_m: int = BLOCK_M) -> tuple[int, int, int]:
    return (triton.cdiv(T, block_m), batch * H, 1)


def update_grid(C: int, batch: int, G: int, block_r: int = BLOCK_R) -> tuple[int, int, int]:
    return (triton.cdiv(C, block_r), batch * G, 1)


def qdp_grid(T: int, C: int, batch: int, H: int, block_m: int = BLOCK_M, block_r: int = BLOCK_R):
    return (triton.cdiv(T, block_m) + triton.cdiv(C, block_r), batch * H, 1)


def sliding_window_attention(q, k, v, k_window, v_window, start_pos, window: int, scale: float, *,
                             block_m: int = BLOCK_M, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS,
                             block_r: int = BLOCK_R, fused: bool = False):
    """Same signature and results as `sliding_window_attention_ref`: (y, k_window_out, v_window_out).
    fused=True runs the single-launch kernel of the aot_impl route (`swa_qdp_kernel`) instead."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    k_window, v_window = k_window.contiguous(), v_window.contiguous()
    start_pos = start_pos.to(device=q.device, dtype=torch.int64).contiguous()
    b, H, T, hs = q.shape
    G, C = k.shape[1], k_window.shape[2]
    if H % G or tuple(k.shape) != (b, G, T, hs) or tuple(v.shape) != (b, G, T, hs) \
            or tuple(k_window.shape) != (b, G, C, hs) or tuple(v_window.shape) != (b, G, C, hs) \
            or tuple(start_pos.shape) != (b,):
        raise ValueError(f"sliding_window_attention: inconsistent shapes q{tuple(q.shape)} k{tuple(k.shape)} "
                         f"v{tuple(v.shape)} k_window{tuple(k_window.shape)} v_window{tuple(v_window.shape)} "
                         f"start_pos{tuple(start_pos.shape)}")
    y = torch.empty_like(q)
    k_out = torch.empty_like(k_window)
    v_out = torch.empty_like(v_window)
    bd = block_d(hs)
    if fused:
        if b and H and (T or C):
            swa_qdp_kernel[qdp_grid(T, C, b, H, block_m, block_r)](
                q, k, v, k_window, v_window, start_pos, H, G, T, int(window), C, b * G, y, k_out, v_out,
                SCALE=float(scale), HEAD_DIM=hs, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
                num_warps=num_warps, num_stages=num_stages(q.dtype == torch.float16), enable_fp_fusion=True)
        return y, k_out, v_out
    if b and H and T:
        swa_fwd_kernel[fwd_grid(T, b, H, block_m)](
            q, k, v, k_window, v_window, start_pos, y, H, G, T, int(window), C, float(scale),
            HEAD_DIM=hs, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            num_stages=num_stages(q.dtype == torch.float16), enable_fp_fusion=True)
    if b and G and C:
        swa_window_update_kernel[update_grid(C, b, G, block_r)](
            k, v, k_window, v_window, k_out, v_out, T, C,
            HEAD_DIM=hs, BLOCK_D=bd, BLOCK_R=block_r, num_warps=UPDATE_NUM_WARPS, num_stages=1,
            enable_fp_fusion=True)
    return y, k_out, v_out


# ---- the reference these kernels must equal -------------------------------------------------
from samba_edge.export.ops import sliding_window_attention_ref  # noqa: E402  (kept last: tutorial order)

__all__ = ["swa_fwd_kernel", "swa_window_update_kernel", "swa_qdp_kernel", "sliding_window_attention",
           "sliding_window_attention_ref", "BLOCK_M", "BLOCK_N", "NUM_WARPS", "BLOCK_R"]
