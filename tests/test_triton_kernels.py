"""The Triton kernels (plugins/triton_scan.py, plugins/triton_swa.py) against the torch references, on CPU.

Triton's interpreter runs the kernels on CPU tensors, but only when TRITON_INTERPRET=1 is set before
the kernels are decorated, and a pytest process may already have imported them in compiled mode
(tests/test_aot.py does). So the numerical checks run in a subprocess: this file executed as a
script (`python tests/test_triton_kernels.py --worker OUT.json`) sets the variable first thing,
runs every case and writes the max errors; the pytest side asserts on them case by case.
Shapes are tiny: the interpreter costs a few ms per program per step.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":                       # worker: interpreter on before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import inspect
import json
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow      # ~1 min of interpreter runs (`pytest -m slow`; CI runs it)

W = 8                                            # window of the attention cases: chunks 1, 3, 7, W-1, W, W+1
CHUNKS = [1, 3, 7, W - 1, W, W + 1]
TOL = 2e-5                                       # on max|kernel - ref| / max(1, max|ref|)

# ---- cases ---------------------------------------------------------------------------------
# scan: (id, b, E, N, chunk sizes, kwargs for the wrapper)
SCAN_CASES = [
    ("scan-chunks-E10-N5-blk8", 2, 10, 5, CHUNKS, {"block_e": 8}),      # E, N not multiples of the blocks
    ("scan-default-blocks-E3-N16", 2, 3, 16, [1, 4], {}),               # BLOCK_E (32) > E
    ("scan-decode-E9-N8", 2, 9, 8, [1, 1, 1], {"block_e": 4}),
    ("scan-E70-N16-3blocks", 2, 70, 16, [W + 1, 28], {}),                # last block of 32 partial
    ("scan-qdp-entry-E10-N5", 2, 10, 5, CHUNKS, {"block_e": 8, "qdp": True}),   # aot_impl route's kernel
]
# attention: (id, b, H, G, hs, window, start positions of the two rows, chunk sizes, dtype, kwargs)
SWA_CASES = [
    ("swa-gqa-H4G2-chunks", 2, 4, 2, 12, W, [0, 5], CHUNKS, "float32", {}),
    ("swa-mqa-H4G1-chunks", 2, 4, 1, 12, W, [3, 0], CHUNKS, "float32", {}),
    ("swa-mha-H2G2-blocks16", 2, 2, 2, 16, W, [0, 11], [9, 16, 2], "float32", {"block_m": 16, "block_n": 16}),
    ("swa-gqa-longchunk-W8", 2, 4, 2, 8, W, [2, 40], [33], "float32", {"block_m": 16, "block_n": 16}),
    ("swa-gqa-W40-multiblock", 2, 4, 2, 8, 40, [0, 23], [20, 1, 37], "float32", {"block_m": 16, "block_n": 16}),
    ("swa-gqa-fp16", 2, 4, 2, 12, W, [1, 9], [3, 9], "float16", {}),
    ("swa-gqa-hs64-W16-rows-apart", 2, 4, 2, 64, 16, [0, 100], [1, 15, 16, 17, 5], "float32", {}),
    # the single-launch kernel of the aot_impl route (attention + window copy in one grid)
    ("swa-fused-gqa-chunks", 2, 4, 2, 12, W, [0, 5], CHUNKS, "float32", {"fused": True}),
    ("swa-fused-mqa-W40-multiblock", 2, 4, 1, 8, 40, [0, 23], [20, 1, 37], "float32",
     {"fused": True, "block_m": 16, "block_n": 16, "block_r": 16}),
    ("swa-fused-fp16", 2, 4, 2, 12, W, [1, 9], [3, 9], "float16", {"fused": True}),
]


def _worker(out: Path) -> None:
    import torch

    from samba_edge.plugins import reference, triton_scan, triton_swa

    results = {}
    g = torch.Generator().manual_seed(0)

    def err(a, r) -> float:                                        # max abs error relative to the scale of r
        return ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1.0)).item()

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    for cid, b, E, N, chunks, kw in SCAN_CASES:
        t0 = time.perf_counter()
        L = sum(chunks)
        u, delta, z = rnd(b, E, L), rnd(b, E, L, s=2.0), rnd(b, E, L, s=3.0)
        delta[0, 0, :2] = 25.0                                     # softplus' linear branch (> 20)
        delta[1, -1, :2] = -30.0                                   # and its deep negative tail
        A = -torch.exp(rnd(E, N, s=0.5))
        B, C = rnd(b, N, L), rnd(b, N, L)
        D, bias = rnd(E), rnd(E, s=0.5)
        state = rnd(b, E, N)
        s_k, worst, p = state, 0.0, 0
        for T in chunks:
            sl = slice(p, p + T)
            args = (u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl], D, z[..., sl], bias)
            y_k, s_k2 = triton_scan.selective_scan(*args, s_k, **kw)
            y_r, s_r2 = triton_scan.selective_scan_ref(*args, s_k)              # same incoming state
            worst = max(worst, err(y_k, y_r), err(s_k2, s_r2))
            s_k, p = s_k2, p + T
        # chunked kernel == one long reference call (a chunk continues exactly where the last stopped)
        y_long, s_long = triton_scan.selective_scan_ref(u, delta, A, B, C, D, z, bias, state)
        y_np, s_np = reference.selective_scan_np(*(x.numpy() for x in (u, delta, A, B, C, D, z, bias, state)))
        y_all, _ = triton_scan.selective_scan(u, delta, A, B, C, D, z, bias, state, **kw)
        results[cid] = {"per_chunk": worst, "vs_long": err(s_k, s_long), "long_y": err(y_all, y_long),
                        "vs_numpy": err(y_all, torch.from_numpy(y_np)),
                        "seconds": time.perf_counter() - t0}

    for cid, b, H, G, hs, win, starts, chunks, dt, kw in SWA_CASES:
        t0 = time.perf_counter()
        dtype = getattr(torch, dt)
        C_ = win - 1
        scale = hs ** -0.5
        kw_k, vw_k = rnd(b, G, C_, hs), rnd(b, G, C_, hs)                 # slots at negative positions: garbage, masked
        kw_r, vw_r = kw_k.clone(), vw_k.clone()
        pos = torch.tensor(starts, dtype=torch.long)
        worst = {"y": 0.0, "window_step": 0.0, "window_carried": 0.0}
        for T in chunks:
            q = rnd(b, H, T, hs).to(dtype)
            k, v = rnd(b, G, T, hs).to(dtype), rnd(b, G, T, hs).to(dtype)
            y_k, kw_k2, vw_k2 = triton_swa.sliding_window_attention(q, k, v, kw_k, vw_k, pos, win, scale, **kw)
            y_r, kw_s, vw_s = triton_swa.sliding_window_attention_ref(q, k, v, kw_k, vw_k, pos, win, scale)
            _, kw_r, vw_r = triton_swa.sliding_window_attention_ref(q, k, v, kw_r, vw_r, pos, win, scale)
            assert y_k.dtype == dtype and kw_k2.dtype == torch.float32
            worst["y"] = max(worst["y"], err(y_k, y_r))
            worst["window_step"] = max(worst["window_step"], (kw_k2 - kw_s).abs().max().item(),
                                       (vw_k2 - vw_s).abs().max().item())
            kw_k, vw_k, pos = kw_k2, vw_k2, pos + T
            worst["window_carried"] = max(worst["window_carried"], (kw_k - kw_r).abs().max().item(),
                                          (vw_k - vw_r).abs().max().item())
        if dt == "float32":                      # the numpy (ONNX Runtime) reference too, one more chunk
            args = (q, k, v, kw_r, vw_r, pos)
            y_np = reference.sliding_window_attention_np(*(x.numpy() for x in args), win, scale)[0]
            y_k2 = triton_swa.sliding_window_attention(*args, win, scale, **kw)[0]
            worst["vs_numpy"] = err(y_k2, torch.from_numpy(y_np))
        worst["seconds"] = time.perf_counter() - t0
        results[cid] = worst

    # tools/gpu_first_run.py's checks, run here on CPU at tiny sizes (guards the script itself): the JIT ones as
    # they are; the AOT, CUDA-graph and garbage-start_pos ones through the real launcher (plugins/trt_launch.py)
    # and kernels compiled ahead of time, with a stand-in driver that runs each launch's Triton kernel under the
    # interpreter on the tensors behind its pointers, records launches into a capturing stream, replays graphs.
    import ctypes
    from types import SimpleNamespace

    from samba_edge.plugins import trt_launch
    from samba_edge.tools import gpu_first_run as gfr

    t0 = time.perf_counter()
    gfr.DEVICE = "cpu"
    chk = gfr.Checker(torch, quick=True)
    sz = {"E": 40, "N": 16, "H": 4, "G": 2, "hs": 32, "W": 8}     # hs 16: sm_75's fp16 attention aborts LLVM
    for T in (1, 12):
        chk.check("jit", f"scan T={T}", lambda T=T: chk.scan_jit(sz, 2, T))
        chk.check("jit", f"swa T={T}", lambda T=T: chk.swa_jit(sz, 2, T, [0, 29], torch.float32))
    kroot = out.parent / "gpu_first_run_kernels"            # compiled in a process without the interpreter
    code = ("import sys; from pathlib import Path; from samba_edge.tools.gpu_first_run import prepare_kernels; "
            f"prepare_kernels(Path(sys.argv[1]), 90, {{'smoke': {sz!r}}}, jobs=2)")
    subprocess.run([sys.executable, "-c", code, str(kroot)], check=True, timeout=900,
                   env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    sets = gfr.kernel_sets(kroot, {"smoke": sz})
    tensors = {}

    def ptr(t):
        tensors[t.data_ptr()] = t
        return t.data_ptr()

    class InterpretingDriver:
        CUdevice_attribute = SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="major",
                                             CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="minor")
        CUfunction_attribute = SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8)
        CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)
        CUstreamCaptureMode = SimpleNamespace(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL=1)

        def __init__(self, constexprs):
            self.constexprs, self.images, self.capturing, self.graphs = constexprs, [], {}, []

        def cuCtxGetCurrent(self):
            return (0, 1)

        def cuCtxGetDevice(self):
            return (0, 0)

        def cuDeviceGetAttribute(self, attr, dev):
            return (0, {"major": 9, "minor": 0}[attr])

        def cuModuleLoadData(self, image):
            self.images.append(image)
            return (0, len(self.images))

        def cuModuleGetFunction(self, mod, name):
            return (0, name.decode())

        def cuFuncSetAttribute(self, fn, attr, value):
            return (0,)

        def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            if stream in self.capturing:
                self.capturing[stream].append((f, (gx, gy, gz), params))
            else:
                self._run(f, (gx, gy, gz), params)
            return (0,)

        def _run(self, f, grid, params):
            values, types = params                              # minus Triton's two trailing scratch pointers
            args = [tensors[v] if t is ctypes.c_void_p else v for v, t in zip(values[:-2], types[:-2])]
            getattr(triton_swa if f.startswith("swa") else triton_scan, f)[grid](*args, **self.constexprs[f])

        def cuStreamCreate(self, flags):
            return (0, 7)

        def cuStreamDestroy(self, stream):
            return (0,)

        def cuStreamBeginCapture(self, stream, mode):
            self.capturing[stream] = []
            return (0,)

        def cuStreamEndCapture(self, stream):
            self.graphs.append(self.capturing.pop(stream))
            return (0, len(self.graphs) - 1)

        def cuGraphGetNodes(self, graph, numNodes=0):
            return (0, None, len(self.graphs[graph]))

        def cuGraphInstantiate(self, graph, flags):
            return (0, graph)

        def cuGraphLaunch(self, exe, stream):
            for launch in self.graphs[exe]:
                self._run(*launch)
            return (0,)

        def cuGraphExecDestroy(self, exe):
            return (0,)

        def cuGraphDestroy(self, graph):
            return (0,)

    constexprs = {r["entry"]: r["constexprs"] for s in sets for r in trt_launch.KernelSet(s["path"]).records.values()}
    fake = InterpretingDriver(constexprs)
    gfr.ptr, trt_launch._driver = ptr, (lambda: fake)
    gfr.run_aot(chk, sets, {"smoke": sz}, "sm_90", seqs=(1, 12))
    gfr.run_graph(chk, gfr.pick(sets, "smoke"), sz, steps=3)
    gfr.run_garbage_direct(chk, [gfr.pick(sets, "smoke")], {"smoke": sz}, time_limit=600.0, seqs=(1, 12))
    results["gpu_first_run-checks"] = {"checks": chk.checks, "seconds": time.perf_counter() - t0,
                                       "sets": [s["name"] for s in sets], "modules_loaded": len(fake.images)}
    out.write_text(json.dumps(results, indent=2, default=str))


# ---- pytest side -----------------------------------------------------------------------------
if __name__ != "__main__":
    pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    t0 = time.perf_counter()
    from samba_edge.tests.helpers import run_interpreter_worker

    res = run_interpreter_worker(__file__, out)
    res["_wall_seconds"] = time.perf_counter() - t0
    return res


@pytest.mark.parametrize("cid", [c[0] for c in SCAN_CASES])
def test_selective_scan_matches_reference(interp_results, cid):
    r = interp_results[cid]
    assert r["per_chunk"] <= TOL, r            # outputs and state, chunk by chunk, same incoming state
    assert r["vs_long"] <= TOL, r              # chunked state == one long call
    assert r["long_y"] <= TOL, r
    assert r["vs_numpy"] <= TOL, r             # the ONNX Runtime (numpy) reference too


@pytest.mark.parametrize("cid", [c[0] for c in SWA_CASES])
def test_sliding_window_attention_matches_reference(interp_results, cid):
    r = interp_results[cid]
    tol = 2e-3 if "fp16" in cid else TOL       # fp16 output rounding
    assert r["y"] <= tol, r
    assert r["window_step"] == 0.0 and r["window_carried"] == 0.0, r     # the cache update is a copy
    if "vs_numpy" in r:
        assert r["vs_numpy"] <= TOL, r


def test_gpu_first_run_checks_run_on_cpu(interp_results):
    """tools/gpu_first_run.py's checks pass on CPU through the interpreter: the JIT ones, and the AOT (3 images x
    2 routes, fp32 and fp16 sets), CUDA-graph and garbage-start_pos ones through the real launcher with a
    stand-in driver (a check of the script's plumbing and verdicts, not of a GPU)."""
    res = interp_results["gpu_first_run-checks"]
    bad = [{k: v for k, v in c.items() if k != "loaded"} for c in res["checks"] if not c["ok"]]
    assert not bad, bad
    groups = {}
    for c in res["checks"]:
        groups[c["group"]] = groups.get(c["group"], 0) + 1
    # aot: a kernels check per set; the scan (fp32 set) and attention (both sets) x T 2 x images 3 x routes 2
    assert res["sets"] == ["smoke-fp32", "smoke-fp16"]
    assert groups == {"jit": 4, "aot": 2 + 12 + 24, "graph": 2, "garbage-start-pos": 4}, groups
    aot = [c for c in res["checks"] if c["group"] == "aot" and "loaded" in c]
    assert {c["loaded"][0].split(": ")[1] for c in aot} == {"cubin sm_90", "PTX sm_90 (driver JIT)",
                                                            "portable PTX sm_75 (driver JIT)"}
    graphs = [c for c in res["checks"] if c["group"] == "graph"]
    assert [c["graph_nodes"] for c in graphs] == [[3, 3], [2, 2]]          # python route: 3 kernels, aot_impl: 2


def test_gpu_first_run_without_gpu_exits_2(tmp_path):
    """Without a GPU, `python -m samba_edge.tools.gpu_first_run` says so in one line on stderr, exits 2 and
    writes no report."""
    from samba_edge.tools import gpu_first_run

    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "samba_edge.tools.gpu_first_run", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("error: no CUDA GPU here ("), p.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    # the memcheck verdict: compute-sanitizer's last ERROR SUMMARY line
    assert gpu_first_run.sanitizer_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    assert gpu_first_run.sanitizer_errors("x\n========= ERROR SUMMARY: 1 error\n") == 1
    assert gpu_first_run.sanitizer_errors("Device not supported\n") is None


def test_wrappers_have_the_reference_signatures():
    """Host wrappers take the torch reference's arguments (then keyword-only launch options), and the
    `*_ref` aliases are the references in export/ops.py."""
    from samba_edge.export import ops
    from samba_edge.plugins import triton_scan, triton_swa

    for mod, name in ((triton_scan, "selective_scan"), (triton_swa, "sliding_window_attention")):
        ref = getattr(ops, f"{name}_ref")
        assert getattr(mod, f"{name}_ref") is ref
        params = inspect.signature(getattr(mod, name)).parameters.values()
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == list(inspect.signature(ref).parameters), name
        assert all(p.kind is p.KEYWORD_ONLY for p in params if p.kind is not p.POSITIONAL_OR_KEYWORD)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
        sys.exit("usage: python tests/test_triton_kernels.py --worker OUT.json")
    _worker(Path(sys.argv[2]))
