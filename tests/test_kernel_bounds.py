"""plugins/triton_swa.py's kernels stay inside their buffers whatever start_pos and window are.

TensorRT's build-time tactic timing runs plugin enqueue on arbitrary input values, so start_pos may
be any int64 (negative, > 2**31, near the int64 extremes): an out-of-bounds load there is a sticky
illegal-address error that ruins the CUDA context, and a wrapped loop bound a kernel of 10**8 trips.
Run through Triton's interpreter with every load and store checked (the same subprocess pattern as
tests/test_triton_kernels.py: TRITON_INTERPRET=1 must be set before the kernels are decorated):
- each address a masked load/store touches must lie inside one of the tensors of that launch
  (checked before the access, so a bad one raises instead of reading stray memory);
- a program doing more loads than its buffers allow is a runaway loop (raises at once);
- the inputs are carved out of NaN-filled buffers (a guard band): a stray read that the checks
  missed would make the outputs non-finite;
- where the reference is exact in int64 (|start_pos| <= 2**62), the outputs equal it, rows that
  see no key (reference NaN) being 0 in the kernel.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":                       # worker: interpreter on before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow          # many interpreter launches (`pytest -m slow`; CI runs it)

TOL = 2e-5
MAX_LOADS_PER_PROGRAM = 32                       # these shapes need <= 10; more is a runaway loop
GUARD = 64                                       # guard-band elements on each side of every input
EDGE_POSITIONS = [0, 1, 6, 7, 8, 100, -1, -4, -5, -7, -8, -100, 2**31 - 1, 2**31, 2**31 + 5, 2**32 + 3,
                  -2**31 + 7, -2**31, -2**31 - 1, -2**32 + 3, -2**32 - 3, 2**62, -2**62,
                  2**63 - 1, 2**63 - 8, -2**63, -2**63 + 5]
# (id, fused, window, C (window-cache length), T values, launch kwargs)
CASES = [
    ("fwd-W8", False, 8, 7, [1, 5], {"block_n": 16}),
    ("fused-W8", True, 8, 7, [1, 5], {"block_n": 16, "block_r": 16}),
    ("fwd-W40-multiblock-T17", False, 40, 39, [17], {"block_n": 16}),      # 3 window blocks, 2 query blocks
    ("fused-W1", True, 1, 7, [5], {"block_n": 16, "block_r": 16}),         # window / cache length mismatch
    ("fwd-Wmax", False, 2**31 - 1, 7, [5], {"block_n": 16}),               # largest int32 window
]


class OutOfBounds(RuntimeError):
    pass


def _install_checks() -> dict:
    """Wrap the interpreter's masked load/store (every tl.load / tl.store goes through them) with a
    bounds check against the byte ranges of the tensors of the current launch."""
    import numpy as np
    from triton.runtime import interpreter as ti

    st = {"ranges": [], "loads": 0, "max_loads": 0}
    init_args = ti.GridExecutor._init_args_hst

    def _init_args_hst(self, args_dev, kwargs):             # the host copies the kernel actually reads
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        st["ranges"] = [(a.data_ptr(), a.data_ptr() + a.numel() * a.element_size())
                        for a in [*args_hst, *kwargs_hst.values()] if hasattr(a, "data_ptr")]
        return args_hst, kwargs_hst

    def check(kind, ptrs, mask):
        addr = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64)
        width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        ok = np.zeros(addr.shape, bool)
        for lo, hi in st["ranges"]:
            ok |= (addr >= lo) & (addr + width <= hi)
        if not ok.all():
            bad = addr[~ok]
            raise OutOfBounds(f"{kind} of {bad.size} element(s) outside every buffer, e.g. {hex(int(bad[0]))}; "
                              f"buffers {[(hex(lo), hi - lo) for lo, hi in st['ranges']]}")

    masked_load, masked_store = ti.InterpreterBuilder.create_masked_load, ti.InterpreterBuilder.create_masked_store
    set_grid_idx = ti.InterpreterBuilder.set_grid_idx

    def create_masked_load(self, ptrs, mask, *a, **k):
        st["loads"] += 1
        st["max_loads"] = max(st["max_loads"], st["loads"])
        if st["loads"] > MAX_LOADS_PER_PROGRAM:
            raise OutOfBounds(f"more than {MAX_LOADS_PER_PROGRAM} loads in one program: a runaway loop")
        check("load", ptrs, mask)
        return masked_load(self, ptrs, mask, *a, **k)

    def create_masked_store(self, ptrs, value, mask, *a, **k):
        check("store", ptrs, mask)
        return masked_store(self, ptrs, value, mask, *a, **k)

    def set_grid_idx_(self, *idx):                          # a new program: its own load count
        st["loads"] = 0
        return set_grid_idx(self, *idx)

    ti.GridExecutor._init_args_hst = _init_args_hst
    ti.InterpreterBuilder.create_masked_load = create_masked_load
    ti.InterpreterBuilder.create_masked_store = create_masked_store
    ti.InterpreterBuilder.set_grid_idx = set_grid_idx_
    return st


def _positions(n_random: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return EDGE_POSITIONS + [int(x) for x in np.concatenate([
        rng.integers(-2**63, 2**63, n_random, dtype=np.int64, endpoint=False),   # anywhere
        rng.integers(-2**33, 2**33, n_random, dtype=np.int64),                   # around the int32 range
        rng.integers(-30, 60, n_random, dtype=np.int64)])]                       # around the window


def _worker(out: Path) -> None:
    import torch

    from samba_edge.plugins import triton_swa

    st = _install_checks()
    g = torch.Generator().manual_seed(0)
    b, H, G, hs = 2, 2, 1, 16
    scale = hs ** -0.5

    def guarded(*shape):                         # random values inside a NaN guard band
        n = 1
        for s in shape:
            n *= s
        buf = torch.full((n + 2 * GUARD,), float("nan"))
        buf[GUARD:GUARD + n] = torch.randn(n, generator=g)
        return buf[GUARD:GUARD + n].view(shape)

    results = {}
    for cid, fused, win, C, Ts, kw in CASES:
        t0 = time.perf_counter()
        pos_all = _positions(8, seed=len(results))
        r = {"calls": 0, "faults": [], "nonfinite": [], "max_err": 0.0, "window_err": 0.0, "compared": 0}
        for T in Ts:
            q, k, v = guarded(b, H, T, hs), guarded(b, G, T, hs), guarded(b, G, T, hs)
            kw_, vw_ = guarded(b, G, C, hs), guarded(b, G, C, hs)
            for p in range(0, len(pos_all), b):
                pos_l = (pos_all[p:p + b] * b)[:b]
                sp = torch.tensor(pos_l, dtype=torch.int64)
                r["calls"] += 1
                try:
                    y, ko, vo = triton_swa.sliding_window_attention(q, k, v, kw_, vw_, sp, win, scale,
                                                                    fused=fused, **kw)
                except Exception as e:                      # noqa: BLE001 (recorded, asserted on)
                    while e.__cause__ is not None:              # the interpreter wraps the hook's error
                        e = e.__cause__
                    r["faults"].append(f"T={T} start_pos={pos_l}: {type(e).__name__}: {e}"[:400])
                    continue
                if not (torch.isfinite(y).all() and torch.isfinite(ko).all() and torch.isfinite(vo).all()):
                    r["nonfinite"].append(f"T={T} start_pos={pos_l}")
                y_r, ko_r, vo_r = triton_swa.sliding_window_attention_ref(q, k, v, kw_, vw_, sp, win, scale)
                r["window_err"] = max(r["window_err"], (ko - ko_r).abs().max().item(), (vo - vo_r).abs().max().item())
                for row, s in enumerate(pos_l):                  # rows that see no key: NaN in the ref, 0 here
                    if abs(s) <= 2**62:
                        ref = torch.nan_to_num(y_r[row], nan=0.0)
                        e = ((y[row] - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()
                        r["max_err"] = max(r["max_err"], e if e == e else float("inf"))
                        r["compared"] += 1
        r["max_loads_per_program"] = st["max_loads"]
        r["seconds"] = time.perf_counter() - t0
        results[cid] = r
    out.write_text(json.dumps(results, indent=2))


# ---- pytest side -----------------------------------------------------------------------------
if __name__ != "__main__":
    pytest.importorskip("triton")


@pytest.fixture(scope="module")
def bounds_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_bounds") / "results.json"
    from samba_edge.tests.helpers import run_interpreter_worker

    return run_interpreter_worker(__file__, out)


@pytest.mark.parametrize("cid", [c[0] for c in CASES])
def test_swa_kernels_stay_in_bounds_for_any_start_pos(bounds_results, cid):
    r = bounds_results[cid]
    assert r["calls"] > 0 and not r["faults"], f"{len(r['faults'])}/{r['calls']} launches faulted: {r['faults'][:3]}"
    assert not r["nonfinite"], r["nonfinite"][:5]           # guard band (NaN) read, or garbage out
    assert r["window_err"] == 0.0, r                        # the cache update is a copy


@pytest.mark.parametrize("cid", [c[0] for c in CASES])
def test_swa_kernels_match_reference_for_any_start_pos(bounds_results, cid):
    r = bounds_results[cid]
    assert r["compared"] > 0 and r["max_err"] <= TOL, r


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
        sys.exit("usage: python tests/test_kernel_bounds.py --worker OUT.json")
    _worker(Path(sys.argv[2]))
