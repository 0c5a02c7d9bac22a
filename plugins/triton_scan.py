"""Triton kernel of `samba.SelectiveScan` (docs/op-contracts.md): the Mamba-1 scan over one chunk.

Layout of this file (the Triton tutorials' order): the kernel, its host wrapper (torch tensors in,
torch tensors out, the signature of `export.ops.selective_scan_ref`), then `selective_scan_ref`, the
reference it must equal. `plugins/aot.py` compiles the kernel ahead of time from this file's source.

Parallelisation: one program per (block of BLOCK_E channels, batch row); the program keeps its
(BLOCK_E, N) slice of the fp32 state in registers and walks the chunk's T tokens in a loop, so a
prefill chunk is one launch whatever T is (T = 1 is decode). Channels are independent in Mamba-1, so
no program ever talks to another. Shapes (E, T) are runtime arguments; only the block sizes and the
state size N (`d_state`, fixed per model) are compile-time constants.

Memory layout (all contiguous, fp32): u, delta, z, y (b, E, T); A (E, N); B, C (b, N, T);
D, delta_bias (E,); state in/out (b, E, N). The state may be updated in place (state_ptr ==
state_out_ptr): each program reads its slice before the loop and writes it after.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20): x above 20, else log1p(exp(x))."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    # log1p(e) without log1p: log(w) * e / (w - 1) is exact to a few ulp (Goldberg's trick);
    # where 1 + e rounds to 1, log1p(e) == e to fp32 precision.
    den = tl.where(w == 1.0, 1.0, w - 1.0)
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / den))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _scan_program(pid_e, pid_b, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, state_ptr,
                  y_ptr, state_out_ptr, E, T, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program's work: BLOCK_E channels of batch row pid_b over the whole chunk."""
    pid_b = pid_b.to(tl.int64)                            # 64-bit offsets: b * E * T may pass 2**31
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_mask = e < E
    n_mask = n < N
    en_mask = e_mask[:, None] & n_mask[None, :]

    # per-channel parameters and the incoming state, held in registers for the whole chunk
    A = tl.load(A_ptr + e[:, None] * N + n[None, :], mask=en_mask, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    bias = tl.load(delta_bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    s_off = pid_b * E * N + e[:, None] * N + n[None, :]
    s = tl.load(state_ptr + s_off, mask=en_mask, other=0.0).to(tl.float32)   # padded lanes stay 0

    x_row = pid_b * E * T + e.to(tl.int64) * T            # start of each channel's token row
    bc_row = pid_b * N * T + n * T                        # start of each B/C state row
    # Software prefetch: the loads of token t + 1 are issued before the math of token t, so the
    # sequential part of each step is the arithmetic, not a global-memory round trip.
    T_e = tl.full((BLOCK_E,), T, tl.int32)                # T as a tensor (masks work in the interpreter too)
    T_n = tl.full((BLOCK_N,), T, tl.int32)
    u_n = tl.load(u_ptr + x_row, mask=e_mask & (T_e > 0), other=0.0)
    dl_n = tl.load(delta_ptr + x_row, mask=e_mask & (T_e > 0), other=0.0)
    z_n = tl.load(z_ptr + x_row, mask=e_mask & (T_e > 0), other=0.0)
    B_n = tl.load(B_ptr + bc_row, mask=n_mask & (T_n > 0), other=0.0)
    C_n = tl.load(C_ptr + bc_row, mask=n_mask & (T_n > 0), other=0.0)
    for t in range(0, T):
        u = u_n.to(tl.float32)
        dl = dl_n.to(tl.float32)
        zg = z_n.to(tl.float32)
        Bt = B_n.to(tl.float32)
        Ct = C_n.to(tl.float32)
        e_nxt = e_mask & (T_e > t + 1)
        n_nxt = n_mask & (T_n > t + 1)
        u_n = tl.load(u_ptr + x_row + (t + 1), mask=e_nxt, other=0.0)
        dl_n = tl.load(delta_ptr + x_row + (t + 1), mask=e_nxt, other=0.0)
        z_n = tl.load(z_ptr + x_row + (t + 1), mask=e_nxt, other=0.0)
        B_n = tl.load(B_ptr + bc_row + (t + 1), mask=n_nxt, other=0.0)
        C_n = tl.load(C_ptr + bc_row + (t + 1), mask=n_nxt, other=0.0)
        d = _softplus(dl + bias)
        s = tl.exp(d[:, None] * A) * s + (d * u)[:, None] * Bt[None, :]
        y = tl.sum(s * Ct[None, :], axis=1) + Dv * u
        y = y * (zg * tl.sigmoid(zg))                     # * silu(z)
        tl.store(y_ptr + x_row + t, y, mask=e_mask)
    tl.store(state_out_ptr + s_off, s, mask=en_mask)


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, state_ptr,  # inputs 0..8
    y_ptr, state_out_ptr,                                                             # outputs 0..1
    E, T,                                                                             # runtime shapes
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    _scan_program(tl.program_id(0), tl.program_id(1), u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr,
                  delta_bias_ptr, state_ptr, y_ptr, state_out_ptr, E, T, N, BLOCK_N, BLOCK_E)


@triton.jit
def selective_scan_qdp_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, state_ptr,  # inputs 0..8
    E, T,                                                                             # int32 extra args
    y_ptr, state_out_ptr,                                                             # outputs 0..1
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """The same kernel in the argument order of TensorRT's `tensorrt.plugin` aot_impl route
    (inputs, int32 scalars, outputs): plugins/trt_qdp.py."""
    _scan_program(tl.program_id(0), tl.program_id(1), u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr,
                  delta_bias_ptr, state_ptr, y_ptr, state_out_ptr, E, T, N, BLOCK_N, BLOCK_E)


# ---- host side ------------------------------------------------------------------------------
# Launch configuration (also what plugins/aot.py compiles). BLOCK_E * BLOCK_N state values live in
# registers: 32 x 16 over 4 warps is 4 per thread (ptxas: 72 registers, no spills, in the AOT builds
# for sm_87..sm_120). Not tuned on a GPU yet (tools/gpu_first_run.py --sweep sweeps it).
BLOCK_E = 32
NUM_WARPS = 4
NUM_STAGES = 1          # the loop prefetches by hand; Triton's pipeliner has nothing to add


def block_n(d_state: int) -> int:
    """The padded state width (tl.arange needs a power of two)."""
    return triton.next_power_of_2(d_state)


def grid(E: int, batch: int, block_e: int = BLOCK_E) -> tuple[int, int, int]:
    return (triton.cdiv(E, block_e), batch, 1)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, ssm_state, *, block_e: int = BLOCK_E,
                   num_warps: int = NUM_WARPS, qdp: bool = False):
    """Same signature and results as `selective_scan_ref`; returns (y, ssm_state_out), both fp32.
    qdp=True launches the aot_impl route's entry point (`selective_scan_qdp_kernel`) instead."""
    f32 = torch.float32
    u, delta, z = (x.to(f32).contiguous() for x in (u, delta, z))
    A, B, C, D, delta_bias = (x.to(f32).contiguous() for x in (A, B, C, D, delta_bias))
    ssm_state = ssm_state.to(f32).contiguous()
    b, E, T = u.shape
    N = A.shape[1]
    if tuple(delta.shape) != (b, E, T) or tuple(z.shape) != (b, E, T) or tuple(B.shape) != (b, N, T) \
            or tuple(C.shape) != (b, N, T) or tuple(ssm_state.shape) != (b, E, N) or tuple(A.shape) != (E, N):
        raise ValueError(f"selective_scan: inconsistent shapes u{tuple(u.shape)} delta{tuple(delta.shape)} "
                         f"A{tuple(A.shape)} B{tuple(B.shape)} C{tuple(C.shape)} z{tuple(z.shape)} "
                         f"state{tuple(ssm_state.shape)}")
    y = torch.empty((b, E, T), dtype=f32, device=u.device)
    state_out = torch.empty((b, E, N), dtype=f32, device=u.device)
    if b == 0 or E == 0:
        return y, state_out
    args = (u, delta, A, B, C, D, z, delta_bias, ssm_state) + ((E, T, y, state_out) if qdp else (y, state_out, E, T))
    kernel = selective_scan_qdp_kernel if qdp else selective_scan_fwd_kernel
    kernel[grid(E, b, block_e)](*args, N=N, BLOCK_N=block_n(N), BLOCK_E=block_e, num_warps=num_warps,
                                num_stages=NUM_STAGES, enable_fp_fusion=True)
    return y, state_out


# ---- the reference this kernel must equal ---------------------------------------------------
from samba_edge.export.ops import selective_scan_ref  # noqa: E402  (kept last: tutorial order)

__all__ = ["selective_scan_fwd_kernel", "selective_scan_qdp_kernel", "selective_scan", "selective_scan_ref", "BLOCK_E", "NUM_WARPS"]
