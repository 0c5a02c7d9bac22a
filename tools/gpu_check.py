#!/usr/bin/env python3
"""GPU check of the Triton kernels and of their ahead-of-time builds. Needs an NVIDIA GPU, torch (CUDA
build), triton and cuda-python (`cuda.bindings.driver`); no TensorRT.

    python tools/gpu_check.py [--out gpu_check_report.json] [--quick] [--no-aot] [--kernels ARTIFACT_DIR]

1. Correctness, JIT: both kernels (plugins/triton_scan.py, plugins/triton_swa.py) at Samba_421M sizes
   (E=3072, N=16, T in {1, 37, 256}, H=G=12, hs=128, W=2048) and at the shipped tiny model's sizes
   (export/builtin/samba-tiny-py/config.json) against the torch references on the GPU: batch 2,
   rows at different absolute positions (one at the stream start, one deep in it), chunked == long.
2. Correctness, AOT: the PTX and the cubin that plugins/aot.py writes into artifacts (compiled here
   for this GPU's arch, or taken from --kernels ARTIFACT_DIR) are loaded through the CUDA driver API
   (cuModuleLoadData, cuModuleGetFunction, cuLaunchKernel) and launched with exactly the parameters
   the TensorRT plugin will use, read from the kernels' JSON metadata (argument order, grid formula,
   block size, dynamic shared memory, null scratch pointers); outputs checked against the references.
3. Timing: kernels (JIT and AOT launch) vs the PyTorch references; the prefill scan's achieved memory
   bandwidth (bytes moved / time) as a fraction of the device's theoretical bandwidth
   (2 x memory clock x bus width, from the driver); a small block-size sweep (skipped with --quick).

Writes a JSON report; exit 0 when every check passed, 1 when one failed, 2 when it cannot run here.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "export" / "builtin" / "samba-tiny-py" / "config.json"
SAMBA_421M = {"E": 3072, "N": 16, "H": 12, "G": 12, "hs": 128, "W": 2048}
SCAN_TOL = 1e-4          # max|kernel - ref| / max(1, max|ref|); GPU exp is ex2.approx-based, 256 steps
ATTN_TOL = 1e-4
FP16_TOL = 2e-3
DEVICE = "cuda"          # the CPU smoke test of this script's checks (tests/test_triton_kernels.py) sets "cpu"


def _die(msg: str) -> None:
    print(msg, file=sys.stderr)
    raise SystemExit(2)


def _tiny_sizes() -> dict:
    c = json.loads(TINY_CONFIG.read_text())
    return {"E": c["expand"] * c["n_embd"], "N": c["d_state"], "H": c["n_head"],
            "G": c.get("n_query_groups") or c["n_head"], "hs": c.get("head_size") or c["n_embd"] // c["n_head"],
            "W": c["local_window"]}


# ---- the CUDA driver API (cuda-python) ------------------------------------------------------
def _driver():
    try:
        from cuda.bindings import driver as cu            # cuda-python >= 12.6 / cuda-bindings
    except ImportError:
        from cuda import cuda as cu                        # older cuda-python
    return cu


def _ck(ret, what: str):
    cu = _driver()
    err, *rest = ret if isinstance(ret, tuple) else (ret,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, s = cu.cuGetErrorString(err)
        raise RuntimeError(f"{what}: {err} {s.decode() if isinstance(s, bytes) else s}")
    return rest[0] if len(rest) == 1 else (rest or None)


def _driver_info(device_index: int) -> dict:
    cu = _driver()
    _ck(cu.cuInit(0), "cuInit")
    dev = _ck(cu.cuDeviceGet(device_index), "cuDeviceGet")
    attr = cu.CUdevice_attribute
    clock_khz = _ck(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, dev), "memory clock")
    bus_bits = _ck(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, dev), "bus width")
    ver = _ck(cu.cuDriverGetVersion(), "cuDriverGetVersion")
    ctx = _ck(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")     # torch's context
    _ck(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return {"driver_cuda_version": f"{ver // 1000}.{(ver % 1000) // 10}", "memory_clock_khz": int(clock_khz),
            "memory_bus_bits": int(bus_bits), "peak_bandwidth_GBps": 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9}


# ---- the checks ---------------------------------------------------------------------------------
def _rel(a, r) -> float:
    return ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1.0)).item()


def scan_inputs(torch, b: int, E: int, N: int, T: int, seed: int = 0) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g, device=DEVICE) * scale

    delta = r(b, E, T, scale=0.5) - 1.0
    delta[0, 0, :] = 25.0                                   # softplus' linear branch
    return {"u": r(b, E, T), "delta": delta, "A": -torch.exp(r(E, N, scale=0.5)), "B": r(b, N, T), "C": r(b, N, T),
            "D": r(E), "z": r(b, E, T), "delta_bias": r(E, scale=0.5), "ssm_state": r(b, E, N)}


def swa_inputs(torch, b: int, H: int, G: int, hs: int, W: int, T: int, starts, dtype, seed: int = 0) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, device=DEVICE)

    return {"q": r(b, H, T, hs).to(dtype), "k": r(b, G, T, hs).to(dtype), "v": r(b, G, T, hs).to(dtype),
            "k_window": r(b, G, W - 1, hs), "v_window": r(b, G, W - 1, hs),
            "start_pos": torch.tensor(starts, dtype=torch.long, device=DEVICE)}


SCAN_IN = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_state"]
SWA_IN = ["q", "k", "v", "k_window", "v_window", "start_pos"]


class Checker:
    def __init__(self, torch, triton, quick: bool):
        self.torch, self.triton, self.quick = torch, triton, quick
        self.checks: list[dict] = []
        self.timings: list[dict] = []
        self.sweep: list[dict] = []

    def check(self, name: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        try:
            rec = fn()
        except Exception as e:  # noqa: BLE001 - reported, the other checks go on
            rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
        rec = {"name": name, **rec, "seconds": round(time.perf_counter() - t0, 3)}
        self.checks.append(rec)
        print(f"  {'ok  ' if rec['ok'] else 'FAIL'} {name}" + ("" if rec["ok"] else f": {rec.get('error', rec)}"))

    def bench(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds, L2 flushed between runs (triton.testing.do_bench)."""
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if self.quick else 25, rep=50 if self.quick else 200,
                              return_mode="median"))

    # -- JIT correctness --
    def scan_jit(self, sizes: dict, b: int, T: int) -> dict:
        from samba_edge.plugins import triton_scan as ts

        x = scan_inputs(self.torch, b, sizes["E"], sizes["N"], T)
        y, s = ts.selective_scan(*(x[n] for n in SCAN_IN))
        yr, sr = ts.selective_scan_ref(*(x[n] for n in SCAN_IN))
        err = max(_rel(y, yr), _rel(s, sr))
        out = {"ok": err <= SCAN_TOL, "max_rel_err": err, "tol": SCAN_TOL}
        if T > 2:                                           # chunked == long (state carried between calls)
            cut = T // 3
            first = {n: (x[n][..., :cut] if n in ("u", "delta", "z", "B", "C") else x[n]) for n in SCAN_IN}
            y1, s1 = ts.selective_scan(*(first[n] for n in SCAN_IN))
            second = {n: (x[n][..., cut:] if n in ("u", "delta", "z", "B", "C") else x[n]) for n in SCAN_IN}
            second["ssm_state"] = s1
            y2, s2 = ts.selective_scan(*(second[n] for n in SCAN_IN))
            e2 = max(_rel(self.torch.cat([y1, y2], -1), y), _rel(s2, s))
            out.update(chunked_vs_long=e2, ok=out["ok"] and e2 <= SCAN_TOL)
        return out

    def swa_jit(self, sizes: dict, b: int, T: int, starts, dtype) -> dict:
        from samba_edge.plugins import triton_swa as tw

        hs, W = sizes["hs"], sizes["W"]
        x = swa_inputs(self.torch, b, sizes["H"], sizes["G"], hs, W, T, starts, dtype)
        got = tw.sliding_window_attention(*(x[n] for n in SWA_IN), W, hs ** -0.5)
        ref = tw.sliding_window_attention_ref(*(x[n] for n in SWA_IN), W, hs ** -0.5)
        tol = FP16_TOL if dtype != self.torch.float32 else ATTN_TOL
        err = _rel(got[0], ref[0])
        win = max((got[1] - ref[1]).abs().max().item(), (got[2] - ref[2]).abs().max().item())
        return {"ok": err <= tol and win == 0.0, "max_rel_err": err, "tol": tol, "window_max_abs_err": win}

    # -- AOT correctness: through plugins/trt_launch.py, the launcher the TensorRT plugins' enqueue calls --
    def scan_aot(self, kdir: Path, image: str, route: str, sizes: dict, b: int, T: int, stream) -> dict:
        from samba_edge.plugins import trt_launch
        from samba_edge.plugins import triton_scan as ts

        trt_launch.set_kernels_dir(kdir)
        trt_launch.set_image(image)
        x = scan_inputs(self.torch, b, sizes["E"], sizes["N"], T, seed=1)
        t = {**x, "y": self.torch.empty_like(x["u"]), "ssm_state_out": self.torch.empty_like(x["ssm_state"])}

        def run():
            trt_launch.launch_selective_scan([t[n].data_ptr() for n in SCAN_IN],
                                             [t["y"].data_ptr(), t["ssm_state_out"].data_ptr()],
                                             batch=b, d_inner=sizes["E"], d_state=sizes["N"], seq=T,
                                             delta_softplus=1, stream=stream, route=route)

        run()
        self.torch.cuda.synchronize()
        yr, sr = ts.selective_scan_ref(*(x[n] for n in SCAN_IN))
        err = max(_rel(t["y"], yr), _rel(t["ssm_state_out"], sr))
        out = {"ok": err <= SCAN_TOL, "max_rel_err": err, "tol": SCAN_TOL}
        if T > 1:
            out["aot_ms"] = self.bench(run)
        return out

    def swa_aot(self, kdir: Path, image: str, route: str, sizes: dict, b: int, T: int, starts, stream) -> dict:
        from samba_edge.plugins import trt_launch
        from samba_edge.plugins import triton_swa as tw

        trt_launch.set_kernels_dir(kdir)
        trt_launch.set_image(image)
        hs, W = sizes["hs"], sizes["W"]
        x = swa_inputs(self.torch, b, sizes["H"], sizes["G"], hs, W, T, starts, self.torch.float32, seed=1)
        t = {**x, "y": self.torch.empty_like(x["q"]), "k_window_out": self.torch.empty_like(x["k_window"]),
             "v_window_out": self.torch.empty_like(x["v_window"])}

        def run():
            trt_launch.launch_sliding_window_attention(
                [t[n].data_ptr() for n in SWA_IN], [t[n].data_ptr() for n in ("y", "k_window_out", "v_window_out")],
                batch=b, num_heads=sizes["H"], num_kv_heads=sizes["G"], seq=T, head_size=hs, window_rows=W - 1,
                window=W, scale=hs ** -0.5, half=False, stream=stream, route=route)

        run()
        self.torch.cuda.synchronize()
        ref = tw.sliding_window_attention_ref(*(x[n] for n in SWA_IN), W, hs ** -0.5)
        err = _rel(t["y"], ref[0])
        win = max((t["k_window_out"] - ref[1]).abs().max().item(), (t["v_window_out"] - ref[2]).abs().max().item())
        out = {"ok": err <= ATTN_TOL and win == 0.0, "max_rel_err": err, "tol": ATTN_TOL, "window_max_abs_err": win}
        out["aot_ms"] = self.bench(run)
        return out

    # -- timing --
    def time_scan(self, sizes: dict, b: int, T: int, peak_GBps: Optional[float]) -> dict:
        from samba_edge.plugins import triton_scan as ts

        E, N = sizes["E"], sizes["N"]
        x = scan_inputs(self.torch, b, E, N, T)
        args = [x[n] for n in SCAN_IN]
        ms = self.bench(lambda: ts.selective_scan(*args))
        rec = {"kernel": "selective_scan", "b": b, "E": E, "N": N, "T": T, "triton_ms": ms}
        if not self.quick or T == 1:
            rec["torch_ref_ms"] = self.bench(lambda: ts.selective_scan_ref(*args))
            rec["speedup_vs_torch"] = rec["torch_ref_ms"] / ms
        # bytes that must cross DRAM once: u, delta, z in, y out; B, C; A, D, bias; state in and out
        nbytes = 4 * (4 * b * E * T + 2 * b * N * T + E * N + 2 * E + 2 * b * E * N)
        rec["bytes"] = nbytes
        rec["GBps"] = nbytes / (ms * 1e-3) / 1e9
        if peak_GBps:
            rec["fraction_of_peak_bandwidth"] = rec["GBps"] / peak_GBps
        return rec

    def time_swa(self, sizes: dict, b: int, T: int, starts) -> dict:
        from samba_edge.plugins import triton_swa as tw

        hs, W = sizes["hs"], sizes["W"]
        x = swa_inputs(self.torch, b, sizes["H"], sizes["G"], hs, W, T, starts, self.torch.float32)
        args = [x[n] for n in SWA_IN]
        ms = self.bench(lambda: tw.sliding_window_attention(*args, W, hs ** -0.5))
        ref_ms = self.bench(lambda: tw.sliding_window_attention_ref(*args, W, hs ** -0.5))
        # DRAM bytes: q, y; chunk k, v; windows in and out (once each)
        nbytes = 4 * (2 * b * sizes["H"] * T * hs + 2 * b * sizes["G"] * T * hs + 4 * b * sizes["G"] * (W - 1) * hs)
        return {"kernel": "sliding_window_attention", "b": b, "T": T, "H": sizes["H"], "G": sizes["G"], "hs": hs,
                "W": W, "triton_ms": ms, "torch_ref_ms": ref_ms, "speedup_vs_torch": ref_ms / ms, "bytes": nbytes,
                "GBps": nbytes / (ms * 1e-3) / 1e9}

    def run_sweep(self, sizes: dict) -> None:
        from samba_edge.plugins import triton_scan as ts, triton_swa as tw

        x = scan_inputs(self.torch, 1, sizes["E"], sizes["N"], 256)
        args = [x[n] for n in SCAN_IN]
        yr, _ = ts.selective_scan_ref(*args)
        for be, nw in [(16, 1), (16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8)]:
            try:
                y, _ = ts.selective_scan(*args, block_e=be, num_warps=nw)
                ms = self.bench(lambda: ts.selective_scan(*args, block_e=be, num_warps=nw))
                self.sweep.append({"kernel": "selective_scan", "T": 256, "block_e": be, "num_warps": nw, "ms": ms,
                                   "max_rel_err": _rel(y, yr)})
            except Exception as e:  # noqa: BLE001
                self.sweep.append({"kernel": "selective_scan", "block_e": be, "num_warps": nw, "error": str(e)[:300]})
        hs, W = sizes["hs"], sizes["W"]
        for T in (1, 256):
            x = swa_inputs(self.torch, 1, sizes["H"], sizes["G"], hs, W, T, [4096], self.torch.float32)
            args = [x[n] for n in SWA_IN]
            yr = tw.sliding_window_attention_ref(*args, W, hs ** -0.5)[0]
            for bm, bn, nw in [(16, 32, 4), (16, 64, 4), (32, 32, 4), (32, 32, 8), (64, 32, 8), (64, 64, 8)]:
                try:
                    kw = {"block_m": bm, "block_n": bn, "num_warps": nw}
                    y = tw.sliding_window_attention(*args, W, hs ** -0.5, **kw)[0]
                    ms = self.bench(lambda: tw.sliding_window_attention(*args, W, hs ** -0.5, **kw))
                    self.sweep.append({"kernel": "sliding_window_attention", "T": T, **kw, "ms": ms,
                                       "max_rel_err": _rel(y, yr)})
                except Exception as e:  # noqa: BLE001
                    self.sweep.append({"kernel": "sliding_window_attention", "T": T, "block_m": bm, "block_n": bn,
                                       "num_warps": nw, "error": str(e)[:300]})


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_report.json", help="JSON report path")
    ap.add_argument("--quick", action="store_true", help="skip the block-size sweep and most reference timings")
    ap.add_argument("--no-aot", action="store_true", help="skip the driver-API checks of the AOT PTX/cubin")
    ap.add_argument("--kernels", help="an exported artifact directory: check its kernels/ (else compile them here)")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError as e:
        _die(f"no CUDA GPU: torch is not installed ({e}); install a CUDA build of torch on a GPU machine")
    if not torch.cuda.is_available():
        _die(f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
             f"{torch.version.cuda}); run this on a machine with an NVIDIA GPU and a CUDA build of torch")
    try:
        import triton
    except ImportError as e:
        _die(f"triton is not installed ({e}): pip install triton")
    if not args.no_aot:
        try:
            _driver()
        except ImportError as e:
            _die(f"cuda-python is not installed ({e}): pip install cuda-python (matching the driver's CUDA major), "
                 "or pass --no-aot")

    torch.backends.cuda.matmul.allow_tf32 = False           # exact fp32 references
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    cap = torch.cuda.get_device_capability(dev)
    report: dict[str, Any] = {
        "device": {"name": props.name, "capability": f"{cap[0]}.{cap[1]}", "sm_count": props.multi_processor_count,
                   "memory_GiB": round(props.total_memory / 2**30, 1)},
        "versions": {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton.__version__,
                     "python": platform.python_version()},
        "sizes": {"Samba_421M": SAMBA_421M, "samba-tiny-py": _tiny_sizes()},
    }
    peak = None
    if not args.no_aot:
        try:
            report["device"].update(_driver_info(dev))
            peak = report["device"]["peak_bandwidth_GBps"]
        except Exception as e:  # noqa: BLE001
            report["device"]["driver_error"] = str(e)
    if peak is None and getattr(props, "memory_clock_rate", None) and getattr(props, "memory_bus_width", None):
        peak = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9      # torch >= 2.5
        report["device"]["peak_bandwidth_GBps"] = peak
    print(f"gpu_check on {props.name} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, triton {triton.__version__}")

    c = Checker(torch, triton, args.quick)
    sizesets = report["sizes"]
    print("correctness (JIT) vs the torch references:")
    for sname, sz in sizesets.items():
        W = sz["W"]
        for T in (1, 37, 256):
            c.check(f"scan[{sname}] b=2 T={T}", lambda sz=sz, T=T: c.scan_jit(sz, 2, T))
            starts = [0, 3 * W + 5] if T > 1 else [5, 3 * W + 5]
            c.check(f"swa[{sname}] b=2 T={T} starts={starts}",
                    lambda sz=sz, T=T, st=starts: c.swa_jit(sz, 2, T, st, torch.float32))
        c.check(f"swa[{sname}] fp16 b=2 T=256", lambda sz=sz: c.swa_jit(sz, 2, 256, [0, W + 7], torch.float16))

    report["aot"] = {}
    if not args.no_aot:
        print("correctness (AOT PTX / cubin through the driver API):")
        from samba_edge.plugins.aot import ARCHS, load_index, write_kernels

        arch = cap[0] * 10 + cap[1]
        sm = f"sm_{arch}"
        stream = torch.cuda.current_stream().cuda_stream
        with tempfile.TemporaryDirectory(prefix="gpu_check_kernels_") as tmp:
            for sname, sz in sizesets.items():
                cfg = {"d_state": sz["N"], "head_size": sz["hs"]}
                if args.kernels:
                    index = load_index(Path(args.kernels))
                    if index["model"] != cfg:
                        continue
                    kdir = Path(args.kernels) / "kernels"
                elif arch in ARCHS:
                    t0 = time.perf_counter()
                    index = write_kernels(Path(tmp) / sname, cfg, archs=[arch])
                    report["aot"][f"{sname}_compile_seconds"] = round(time.perf_counter() - t0, 2)
                    kdir = Path(tmp) / sname / "kernels"
                else:
                    report["aot"]["skipped"] = f"no AOT build for {sm} (targets: {sorted(ARCHS)})"
                    print(f"  skipped: {report['aot']['skipped']}")
                    break
                if sm not in index["archs"] or index.get("errors"):
                    c.checks.append({"name": f"aot[{sname}] {sm}", "ok": False,
                                     "error": f"no {sm} kernels in the index; errors: {index.get('errors')}"})
                    continue
                for image in ("cubin", "ptx"):
                    for route in ("python", "aot_impl"):          # the IPluginV3 and the tensorrt.plugin kernels
                        for T in (1, 37, 256):
                            c.check(f"aot-{image}-{route}[{sname}] scan b=2 T={T}",
                                    lambda im=image, ro=route, sz=sz, T=T: c.scan_aot(kdir, im, ro, sz, 2, T, stream))
                            starts = [0, 3 * sz["W"] + 5]
                            c.check(f"aot-{image}-{route}[{sname}] swa b=2 T={T}",
                                    lambda im=image, ro=route, sz=sz, T=T, st=starts: c.swa_aot(kdir, im, ro, sz, 2, T,
                                                                                               st, stream))

    print("timing (median ms, L2 flushed):")
    big = sizesets["Samba_421M"]
    for b, T in ((1, 1), (1, 256), (4, 256)):
        try:
            rec = c.time_scan(big, b, T, peak)
            c.timings.append(rec)
            frac = rec.get("fraction_of_peak_bandwidth")
            print(f"  scan b={b} T={T}: triton {rec['triton_ms']:.3f} ms"
                  + (f", torch {rec['torch_ref_ms']:.3f} ms" if "torch_ref_ms" in rec else "")
                  + f", {rec['GBps']:.0f} GB/s" + (f" = {100 * frac:.1f}% of peak" if frac else ""))
        except Exception as e:  # noqa: BLE001
            c.timings.append({"kernel": "selective_scan", "b": b, "T": T, "error": str(e)[:300]})
    for b, T in ((1, 1), (1, 256)):
        try:
            rec = c.time_swa(big, b, T, [4096])
            c.timings.append(rec)
            print(f"  swa b={b} T={T}: triton {rec['triton_ms']:.3f} ms, torch {rec['torch_ref_ms']:.3f} ms")
        except Exception as e:  # noqa: BLE001
            c.timings.append({"kernel": "sliding_window_attention", "b": b, "T": T, "error": str(e)[:300]})
    if not args.quick:
        print("block-size sweep ...")
        c.run_sweep(big)

    report.update(checks=c.checks, timings=c.timings, sweep=c.sweep, ok=all(x["ok"] for x in c.checks))
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    n_bad = sum(not x["ok"] for x in c.checks)
    print(f"{len(c.checks) - n_bad}/{len(c.checks)} checks passed; report: {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
