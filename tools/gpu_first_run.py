#!/usr/bin/env python3
"""The one prepared GPU script: samba-edge's kernels on a real NVIDIA GPU, before TensorRT is involved.

    python -m samba_edge.tools.gpu_first_run [--out gpu_first_run.json] [--quick] [--only GROUP[,GROUP]]
                                             [--kernels DIR] [--sweep]
    python -m samba_edge.tools.gpu_first_run --prepare DIR [--arch 90]    # compile the kernels; no GPU needed
    (tools/gpu_check.py is an alias of this script.)

Needs an NVIDIA GPU and its driver, torch (a CUDA build), triton and cuda-python (`cuda.bindings`); no
TensorRT. samba-edge must be importable: in a bare checkout, `pip install --no-deps --no-build-isolation -e .`.
The kernels are compiled by plugins/aot.py, tested with Triton 3.9: on a machine with another Triton, compile
them elsewhere with --prepare DIR (any machine, no GPU), bring DIR along and pass --kernels DIR.

Checks, by group, in this order (one line each on stdout; each a record {group, name, ok, error, tol, seconds,
...} in the report):
  versions   the NVIDIA driver (cuDriverGetVersion; nvidia-smi's line when there), cuda-python, triton, torch;
             the GPU's name, sm, memory and theoretical DRAM bandwidth (2 x memory clock x bus width, driver).
  jit        the Triton kernels JIT-compiled here vs the torch references (triton_scan.selective_scan_ref,
             triton_swa.sliding_window_attention_ref) at the tiny model's and Samba_421M's sizes: batch 2, rows at
             different positions, T in {1, 37, 256}, chunked scan == long scan, fp16 attention. Not with --quick.
  aot        the kernels compiled ahead of time (plugins/aot.write_kernels) for this GPU's arch and for the
             portable PTX arch (only the portable one when aot.ARCHS lacks this arch), for both models with fp32
             and fp16 attention, launched through plugins/trt_launch.py (the TensorRT plugins' launcher) for
             every image (cubin, PTX, portable PTX: skipped with a note when the index names none) and both
             routes (python, aot_impl), vs the references as above; each record has `Launcher.loaded`.
  graph      a decode step (scan + attention through the launcher, T=1, Samba_421M) captured on a non-default
             stream (cuStreamCreate, cuStreamBeginCapture/EndCapture, cuGraphInstantiate) with ping-pong state
             buffers, replayed N times (cuGraphLaunch): bitwise equal to N eager steps, which match the
             references; graphs and stream destroyed at the end.
  garbage-start-pos  the attention kernels fed garbage int64 start positions (negative, beyond 2**31, near
             +-2**62, the int64 extremes, random) as TensorRT's tactic timing does: in a subprocess of this
             script, under `compute-sanitizer --tool memcheck` when it is found (its ERROR SUMMARY must count 0
             errors; if it cannot run here the subprocess runs plainly, with a note); outputs finite, equal to the
             reference wherever that is defined, windows exact, back within a time limit.
  bandwidth  the launcher's scan (decode T=1, prefill T=256) and attention kernels at Samba_421M: bytes that
             must cross DRAM / median time (triton.testing.do_bench, L2 flushed), as a fraction of the
             theoretical bandwidth; a fraction above 1 fails (the count or the timing would be wrong).
  sweep      only with --sweep: a block-size sweep of the JIT kernels (report["sweep"], never a failure).

The report (--out, default gpu_first_run.json) is written atomically. Sized for under 5 minutes on an H200
(not measured yet: the total is printed); --quick drops the jit group, shortens timings and graph runs.
Exit codes: 0 every check passed; 1 a check failed (the report and the FAIL lines say which); 2 it cannot
run here (no GPU, driver, torch, triton or cuda-python): one line on stderr, no report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "export" / "builtin" / "samba-tiny-py" / "config.json"
GROUPS = ("versions", "jit", "aot", "graph", "garbage-start-pos", "bandwidth", "sweep")
SCAN_TOL = 1e-4          # max|kernel - ref| / max(1, max|ref|); GPU exp is ex2.approx-based, 256 steps
ATTN_TOL = 1e-4
FP16_TOL = 2e-3
DEVICE = "cuda"          # the CPU smoke test of the checks (tests/test_triton_kernels.py) sets "cpu"
SCAN_IN = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_state"]
SWA_IN = ["q", "k", "v", "k_window", "v_window", "start_pos"]
SEQS = (1, 37, 256)
ROUTES = ("python", "aot_impl")                 # the IPluginV3 kernels and the tensorrt.plugin (aot_impl) ones
IMAGES = ("cubin", "ptx", "portable")
OPS = {"scan": "SelectiveScan", "swa": "SlidingWindowAttention"}
VERDICT_KEYS = ("max_rel_err", "tol", "window_max_abs_err", "chunked_vs_long", "graph_vs_eager_max_abs", "scan_vs_ref",
                "attn_vs_ref", "window_vs_ref", "graph_nodes", "kernels_per_step", "finite", "kernel_seconds",
                "time_limit_s", "fraction_of_peak")
GARBAGE_STARTS = [-1, -37, -(2**31) - 5, 2**31 + 7, 2**62 + 11, -(2**62) - 13, 2**63 - 1, -(2**63)]


# ---- can it run here? (before any heavy import) ----------------------------------------------
def _cannot_run(reason: str):
    print("error: " + " ".join(reason.split()), file=sys.stderr)
    raise SystemExit(2)


def require_gpu() -> None:
    """Exit 2 with one line on stderr unless this machine has a GPU, its driver, cuda-python, torch and triton."""
    try:
        from samba_edge.plugins.cuda_probe import check_cuda
    except ImportError as e:
        _cannot_run(f"samba-edge is not importable ({e}): run `pip install --no-deps --no-build-isolation -e .` "
                    "in the repository")
    drv, gpu, _ = check_cuda()                  # cuda-python only: cuInit, the device count
    if drv["status"] != "ok" or gpu["status"] != "ok":
        why = "; ".join(c["detail"] for c in (drv, gpu) if c["status"] != "ok")
        _cannot_run(f"no CUDA GPU here ({why}): run this on a machine with an NVIDIA GPU")
    try:
        import torch
    except ImportError as e:
        _cannot_run(f"cannot run here (torch is not installed: {e}): install a CUDA build of torch")
    if not torch.cuda.is_available():
        _cannot_run(f"no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda}: "
                    "torch.cuda.is_available() is False): run this on a machine with an NVIDIA GPU")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        _cannot_run(f"cannot run here (triton is not installed: {e}): pip install triton")


# ---- sizes, inputs, results -------------------------------------------------------------------
def model_sizes(cfg) -> dict:
    return {"E": cfg.d_inner, "N": cfg.d_state, "H": cfg.n_head, "G": cfg.n_query_groups, "hs": cfg.head_size,
            "W": cfg.local_window}


def size_sets() -> dict[str, dict]:
    from samba_edge.export.config import get_config

    return {"samba-tiny-py": model_sizes(get_config(str(TINY_CONFIG))),
            "Samba_421M": model_sizes(get_config("Samba_421M"))}


def starts_for(W: int, T: int) -> list[int]:
    """Two rows at different absolute positions: one at (or near) the stream start, one deep in it."""
    return [0, 3 * W + 5] if T > 1 else [5, 3 * W + 5]


def ptr(t) -> int:
    """A tensor's device pointer: the one place the checks take pointers (the CPU test maps them back)."""
    return t.data_ptr()


def _rel(a, r) -> float:
    e = ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1.0)).item()
    return e if e == e else float("inf")        # NaN -> inf: never "within tolerance"


def _max_abs(a, r) -> float:
    e = (a.float() - r.float()).abs().max().item()
    return e if e == e else float("inf")


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


def inputs(torch, op: str, sizes: dict, b: int, T: int, dtype: str = "fp32", starts=None, seed: int = 1) -> dict:
    if op == "scan":
        return scan_inputs(torch, b, sizes["E"], sizes["N"], T, seed)
    return swa_inputs(torch, b, sizes["H"], sizes["G"], sizes["hs"], sizes["W"], T,
                      starts if starts is not None else starts_for(sizes["W"], T),
                      torch.float16 if dtype == "fp16" else torch.float32, seed)


def reference(op: str, x: dict, window: int):
    from samba_edge.plugins import triton_scan as ts, triton_swa as tw

    if op == "scan":
        return ts.selective_scan_ref(*(x[n] for n in SCAN_IN))
    return tw.sliding_window_attention_ref(*(x[n] for n in SWA_IN), window, x["q"].shape[-1] ** -0.5)


def outputs(torch, op: str, x: dict) -> tuple:
    if op == "scan":
        return torch.empty_like(x["u"]), torch.empty_like(x["ssm_state"])
    return torch.empty_like(x["q"]), torch.empty_like(x["k_window"]), torch.empty_like(x["v_window"])


def launch(op: str, launcher, x: dict, outs, window: int, stream: int) -> None:
    """One op through plugins/trt_launch.py, exactly as the plugins' enqueue calls it (contract order)."""
    from samba_edge.plugins import trt_launch

    if op == "scan":
        b, E, T = x["u"].shape
        trt_launch.launch_selective_scan(launcher, [ptr(x[n]) for n in SCAN_IN], [ptr(o) for o in outs], batch=b,
                                         d_inner=E, d_state=x["ssm_state"].shape[2], seq=T, delta_softplus=1,
                                         stream=stream)
        return
    b, H, T, hs = x["q"].shape
    trt_launch.launch_sliding_window_attention(
        launcher, [ptr(x[n]) for n in SWA_IN], [ptr(o) for o in outs], batch=b, num_heads=H,
        num_kv_heads=x["k"].shape[1], seq=T, head_size=hs, window_rows=x["k_window"].shape[2], window=window,
        scale=hs ** -0.5, half=x["q"].element_size() == 2, stream=stream)


def result(op: str, got, ref) -> dict:
    """Kernel outputs vs the reference's: the scan within SCAN_TOL; attention within ATTN_TOL (FP16_TOL with fp16
    activations), its window caches exactly (they are copies)."""
    if op == "scan":
        err = max(_rel(got[0], ref[0]), _rel(got[1], ref[1]))
        return {"ok": err <= SCAN_TOL, "max_rel_err": err, "tol": SCAN_TOL}
    tol = FP16_TOL if got[0].element_size() == 2 else ATTN_TOL
    err = _rel(got[0], ref[0])
    win = max(_max_abs(got[1], ref[1]), _max_abs(got[2], ref[2]))
    return {"ok": err <= tol and win == 0.0, "max_rel_err": err, "tol": tol, "window_max_abs_err": win}


def scan_bytes(b: int, E: int, N: int, T: int) -> int:
    """Bytes that must cross DRAM once: u, delta, z in, y out; B, C; A, D, bias; the state in and out."""
    return 4 * (4 * b * E * T + 2 * b * N * T + E * N + 2 * E + 2 * b * E * N)


def swa_bytes(b: int, H: int, G: int, T: int, hs: int, W: int, elem: int = 4) -> int:
    """q, y; the chunk's k, v; the fp32 windows in and out (once each)."""
    return elem * (2 * b * H * T * hs + 2 * b * G * T * hs) + 4 * 4 * b * G * (W - 1) * hs


def sanitizer_errors(text: str) -> Optional[int]:
    """The count in compute-sanitizer's last "ERROR SUMMARY: N errors" line (None without one)."""
    found = re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", text)
    return int(found[-1]) if found else None


def garbage_starts(torch) -> list[int]:
    """GARBAGE_STARTS and two random int64 (seeded): what TensorRT's tactic timing may put in start_pos."""
    g = torch.Generator().manual_seed(7)
    return GARBAGE_STARTS + torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.long, generator=g).tolist()


# ---- the checks ---------------------------------------------------------------------------------
class Checker:
    def __init__(self, torch, quick: bool):
        self.torch, self.quick = torch, quick
        self.checks: list[dict] = []

    def check(self, group: str, name: str, fn: Callable[[], dict]) -> dict:
        t0 = time.perf_counter()
        try:
            rec = fn()
        except Exception as e:  # noqa: BLE001 - reported, the other checks go on
            rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        rec = {"group": group, "name": name, **rec, "seconds": round(time.perf_counter() - t0, 3)}
        self.checks.append(rec)
        if not rec["ok"]:
            detail = ": " + str(rec.get("error") or {k: v for k, v in rec.items() if k in VERDICT_KEYS})
        elif "summary" in rec:
            detail = f": {rec['summary']}"
        elif "max_rel_err" in rec:
            detail = f": err {rec['max_rel_err']:.1e} (tol {rec['tol']:.0e})"
        else:
            detail = ""
        print(f"  {'ok  ' if rec['ok'] else 'FAIL'} {group} {name}{detail} [{rec['seconds']:.2f} s]", flush=True)
        return rec

    def sync(self) -> None:
        if DEVICE == "cuda":
            self.torch.cuda.synchronize()

    def stream(self) -> int:
        """The stream torch works on (do_bench times it); 0 on CPU."""
        return self.torch.cuda.current_stream().cuda_stream if DEVICE == "cuda" else 0

    def bench(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds, L2 flushed between runs (triton.testing.do_bench)."""
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5 if self.quick else 25, rep=20 if self.quick else 100,
                              return_mode="median"))

    # -- JIT correctness --
    def scan_jit(self, sizes: dict, b: int, T: int) -> dict:
        from samba_edge.plugins import triton_scan as ts

        x = scan_inputs(self.torch, b, sizes["E"], sizes["N"], T)
        y, s = ts.selective_scan(*(x[n] for n in SCAN_IN))
        out = result("scan", (y, s), reference("scan", x, 0))
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

        W = sizes["W"]
        x = swa_inputs(self.torch, b, sizes["H"], sizes["G"], sizes["hs"], W, T, starts, dtype)
        got = tw.sliding_window_attention(*(x[n] for n in SWA_IN), W, sizes["hs"] ** -0.5)
        return result("swa", got, reference("swa", x, W))

    # -- AOT correctness: through plugins/trt_launch.py, the launcher the TensorRT plugins' enqueue calls --
    def aot_case(self, op: str, launcher, x: dict, ref, window: int, expect: str) -> dict:
        """One launch of `op`; `expect` is the image every kernel must have come from (Image.describe())."""
        outs = outputs(self.torch, op, x)
        launch(op, launcher, x, outs, window, self.stream())
        self.sync()
        rec = result(op, outs, ref)
        loaded = list(launcher.loaded)
        right = bool(loaded) and all(s.endswith(": " + expect) for s in loaded)
        rec.update(ok=rec["ok"] and right, loaded=loaded)
        if not right:
            rec["error"] = f"kernels not all from {expect}: {loaded}"
        return rec

    # -- a decode step as a CUDA graph on a non-default stream --
    def graph_case(self, kernels: Path, sizes: dict, route: str, steps: int) -> dict:
        from samba_edge.plugins import trt_launch

        torch, cu, ck = self.torch, trt_launch._driver(), trt_launch.cuda_check
        ks = trt_launch.KernelSet.open(kernels)
        lau = {op: trt_launch.Launcher(ks, name, route) for op, name in OPS.items()}
        W = sizes["W"]
        sx = inputs(torch, "scan", sizes, 2, 1, seed=2)
        ax = inputs(torch, "swa", sizes, 2, 1, seed=2)

        def fresh() -> dict:                                # one decoding stream: ping-pong state, outputs
            return {"ssm": [sx["ssm_state"].clone(), torch.empty_like(sx["ssm_state"])],
                    "kw": [ax["k_window"].clone(), torch.empty_like(ax["k_window"])],
                    "vw": [ax["v_window"].clone(), torch.empty_like(ax["v_window"])],
                    "pos": ax["start_pos"].clone(), "y_scan": torch.empty_like(sx["u"]),
                    "y_attn": torch.empty_like(ax["q"])}

        def step(st: dict, i: int, s: int) -> None:         # launches only: what a graph captures
            a, o = i % 2, 1 - i % 2                         # state in from buffer a, out to buffer o
            launch("scan", lau["scan"], {**sx, "ssm_state": st["ssm"][a]}, (st["y_scan"], st["ssm"][o]), W, s)
            launch("swa", lau["swa"], {**ax, "k_window": st["kw"][a], "v_window": st["vw"][a],
                                       "start_pos": st["pos"]}, (st["y_attn"], st["kw"][o], st["vw"][o]), W, s)

        def run(st: dict, issue: Callable[[int], None]) -> list:
            got = []
            for i in range(steps):
                issue(i)                                    # on our stream; then a device-wide sync
                self.sync()
                got.append((st["y_scan"].clone(), st["y_attn"].clone()))
                st["pos"].add_(1)                           # torch's stream: synced before the next step
                self.sync()
            return got

        stream = ck(cu.cuStreamCreate(int(cu.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")
        graphs, execs, nodes = [], [], []
        try:
            eager_state, graph_state = fresh(), fresh()
            eager = run(eager_state, lambda i: step(eager_state, i, int(stream)))   # also loads the kernels
            mode = cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
            for parity in (0, 1):                           # graph 0: ping -> pong, graph 1: pong -> ping
                ck(cu.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")
                try:
                    step(graph_state, parity, int(stream))
                finally:
                    ended = cu.cuStreamEndCapture(stream)
                graphs.append(ck(ended, "cuStreamEndCapture"))
                nodes.append(ck(cu.cuGraphGetNodes(graphs[-1]), "cuGraphGetNodes")[1])
                execs.append(ck(cu.cuGraphInstantiate(graphs[-1], 0), "cuGraphInstantiate"))
            replay = run(graph_state, lambda i: ck(cu.cuGraphLaunch(execs[i % 2], stream), "cuGraphLaunch"))
        finally:
            self.sync()
            for e in execs:
                ck(cu.cuGraphExecDestroy(e), "cuGraphExecDestroy")
            for g in graphs:
                ck(cu.cuGraphDestroy(g), "cuGraphDestroy")
            ck(cu.cuStreamDestroy(stream), "cuStreamDestroy")
        fin = steps % 2                                     # the buffer the last step wrote
        diff = max([_max_abs(a, b) for e, r in zip(eager, replay) for a, b in zip(e, r)]
                   + [_max_abs(eager_state[k][fin], graph_state[k][fin]) for k in ("ssm", "kw", "vw")])
        # the eager chain vs the references, step by step
        s, kw, vw, pos = sx["ssm_state"], ax["k_window"], ax["v_window"], ax["start_pos"].clone()
        scan_err = attn_err = win_err = 0.0
        for i in range(steps):
            yr, s = reference("scan", {**sx, "ssm_state": s}, W)
            ya, kw, vw = reference("swa", {**ax, "k_window": kw, "v_window": vw, "start_pos": pos}, W)
            pos = pos + 1
            scan_err, attn_err = max(scan_err, _rel(eager[i][0], yr)), max(attn_err, _rel(eager[i][1], ya))
        scan_err = max(scan_err, _rel(eager_state["ssm"][fin], s))
        win_err = max(_max_abs(eager_state["kw"][fin], kw), _max_abs(eager_state["vw"][fin], vw))
        per_step = len(lau["scan"].loaded) + len(lau["swa"].loaded)           # one launch per kernel
        ok = diff == 0.0 and scan_err <= SCAN_TOL and attn_err <= ATTN_TOL and win_err == 0.0 \
            and nodes == [per_step, per_step]
        return {"ok": ok, "steps": steps, "graph_vs_eager_max_abs": diff, "scan_vs_ref": scan_err,
                "attn_vs_ref": attn_err, "window_vs_ref": win_err, "tol": {"graph": 0.0, "scan": SCAN_TOL,
                                                                           "attn": ATTN_TOL},
                "graph_nodes": nodes, "kernels_per_step": per_step,
                "loaded": lau["scan"].loaded + lau["swa"].loaded,
                "summary": f"{steps} replays == eager bitwise, eager vs ref scan {scan_err:.1e} attn {attn_err:.1e}"}

    # -- garbage start positions (this is what runs in the subprocess, under compute-sanitizer) --
    def garbage_case(self, kernels: Path, sizes: dict, route: str, T: int, time_limit: float) -> dict:
        from samba_edge.plugins import trt_launch

        torch = self.torch
        launcher = trt_launch.Launcher(trt_launch.KernelSet.open(kernels), OPS["swa"], route)
        starts = garbage_starts(torch)
        x = inputs(torch, "swa", sizes, len(starts), T, starts=starts, seed=3)
        outs = outputs(torch, "swa", x)
        t0 = time.perf_counter()
        launch("swa", launcher, x, outs, sizes["W"], self.stream())
        self.sync()
        seconds = time.perf_counter() - t0
        finite = all(bool(torch.isfinite(o).all()) for o in outs)
        ref = reference("swa", x, sizes["W"])
        # compared where the reference is defined: rows whose positions (start +- W, T) cannot overflow int64,
        # queries that see a key (the reference's softmax over nothing is NaN; the kernel writes 0 there)
        sane = torch.tensor([abs(s) < 2**63 - 2**32 for s in starts], device=DEVICE)[:, None, None, None]
        defined = torch.isfinite(ref[0].float()) & sane
        err = _rel(outs[0][defined], ref[0][defined]) if bool(defined.any()) else 0.0
        win = max(_max_abs(outs[1], ref[1]), _max_abs(outs[2], ref[2]))
        ok = finite and err <= ATTN_TOL and win == 0.0 and seconds <= time_limit
        return {"ok": ok, "start_pos": starts, "finite": finite, "max_rel_err": err, "tol": ATTN_TOL,
                "rows_compared": int(sane.sum()), "outputs_compared": int(defined.sum()),
                "window_max_abs_err": win, "kernel_seconds": round(seconds, 3), "time_limit_s": time_limit,
                "loaded": list(launcher.loaded)}

    # -- bandwidth --
    def bandwidth_case(self, op: str, launcher, sizes: dict, b: int, T: int, peak_GBps: Optional[float]) -> dict:
        x = inputs(self.torch, op, sizes, b, T, starts=[4096 + i for i in range(b)])
        outs = outputs(self.torch, op, x)
        stream, W = self.stream(), sizes["W"]
        ms = self.bench(lambda: launch(op, launcher, x, outs, W, stream))
        nbytes = (scan_bytes(b, sizes["E"], sizes["N"], T) if op == "scan"
                  else swa_bytes(b, sizes["H"], sizes["G"], T, sizes["hs"], W))
        GBps = nbytes / (ms * 1e-3) / 1e9
        rec = {"ok": True, "b": b, "T": T, "ms": ms, "bytes": nbytes, "GBps": GBps, "loaded": list(launcher.loaded)}
        if not self.quick:
            rec["torch_ref_ms"] = self.bench(lambda: reference(op, x, W))
            rec["speedup_vs_torch"] = rec["torch_ref_ms"] / ms
        if peak_GBps:
            frac = GBps / peak_GBps
            rec.update(fraction_of_peak=frac, peak_GBps=peak_GBps, ok=0.0 < frac <= 1.0)
            if frac > 1.0:
                rec["error"] = f"{GBps:.0f} GB/s is above the theoretical {peak_GBps:.0f} GB/s: count or timing wrong"
        rec["summary"] = (f"{ms * 1e3:.1f} us, {GBps:.0f} GB/s" + (f" = {100 * rec['fraction_of_peak']:.1f}% of "
                                                                   f"{peak_GBps:.0f}" if peak_GBps else "")
                          + (f", {rec['speedup_vs_torch']:.1f}x torch" if "speedup_vs_torch" in rec else ""))
        return rec

    def run_sweep(self, sizes: dict) -> list[dict]:
        from samba_edge.plugins import triton_scan as ts, triton_swa as tw

        sweep = []
        x = scan_inputs(self.torch, 1, sizes["E"], sizes["N"], 256)
        args = [x[n] for n in SCAN_IN]
        yr, _ = ts.selective_scan_ref(*args)
        for be, nw in [(16, 1), (16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8)]:
            try:
                y, _ = ts.selective_scan(*args, block_e=be, num_warps=nw)
                ms = self.bench(lambda: ts.selective_scan(*args, block_e=be, num_warps=nw))
                sweep.append({"kernel": "selective_scan", "T": 256, "block_e": be, "num_warps": nw, "ms": ms,
                              "max_rel_err": _rel(y, yr)})
            except Exception as e:  # noqa: BLE001
                sweep.append({"kernel": "selective_scan", "block_e": be, "num_warps": nw, "error": str(e)[:300]})
        hs, W = sizes["hs"], sizes["W"]
        for T in (1, 256):
            x = swa_inputs(self.torch, 1, sizes["H"], sizes["G"], hs, W, T, [4096], self.torch.float32)
            args = [x[n] for n in SWA_IN]
            yr = tw.sliding_window_attention_ref(*args, W, hs ** -0.5)[0]
            for bm, bn, nw in [(16, 32, 4), (16, 64, 4), (32, 32, 4), (32, 32, 8), (64, 32, 8), (64, 64, 8)]:
                kw = {"block_m": bm, "block_n": bn, "num_warps": nw}
                try:
                    y = tw.sliding_window_attention(*args, W, hs ** -0.5, **kw)[0]
                    ms = self.bench(lambda: tw.sliding_window_attention(*args, W, hs ** -0.5, **kw))
                    sweep.append({"kernel": "sliding_window_attention", "T": T, **kw, "ms": ms,
                                  "max_rel_err": _rel(y, yr)})
                except Exception as e:  # noqa: BLE001
                    sweep.append({"kernel": "sliding_window_attention", "T": T, **kw, "error": str(e)[:300]})
        return sweep


# ---- kernel sets: compiled here, or brought along (--prepare / --kernels) -----------------------
def prepare_kernels(out: Path, arch: int, sizesets: dict, dtypes=("fp32", "fp16"), jobs: int = 4) -> dict:
    """Compile the plugin kernels for `arch` and the portable PTX arch (only that one when aot.ARCHS lacks `arch`)
    for each size set and attention dtype into out/<set>/kernels/ (plugins/aot.write_kernels), each set in a
    process of its own, `jobs` at a time (an LLVM abort kills only its set); writes and returns out/sets.json."""
    import multiprocessing

    import triton

    from samba_edge.plugins import aot

    portable = getattr(aot, "PORTABLE_PTX_ARCH", None)
    archs = sorted({a for a in (arch, portable) if a in aot.ARCHS})
    if not archs:
        raise RuntimeError(f"no AOT target for sm_{arch} and no portable PTX arch (aot.ARCHS: {sorted(aot.ARCHS)})")
    todo = [(f"{s}-{dt}", s, dt) for s in sizesets for dt in dtypes]
    ctx = multiprocessing.get_context("spawn")              # never fork a process that may hold a CUDA context
    t0, pending, running, exitcodes = time.perf_counter(), list(todo), [], {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            n, s, dt = pending.pop(0)
            shutil.rmtree(out / n, ignore_errors=True)
            cfg = {"d_state": sizesets[s]["N"], "head_size": sizesets[s]["hs"]}
            proc = ctx.Process(target=aot.write_kernels, args=(out / n, cfg), kwargs={"archs": archs, "dtype": dt})
            proc.start()
            running.append((n, proc))
        n, proc = running.pop(0)
        proc.join()
        exitcodes[n] = proc.exitcode
    sets = []
    for n, s, dt in todo:
        index_file = out / n / aot.KERNELS_DIR / aot.INDEX
        index = json.loads(index_file.read_text()) if exitcodes[n] == 0 and index_file.is_file() else \
            {"errors": [f"{n}: the compiling process exited with {exitcodes[n]} (a negative number is the signal: "
                        "-6 is an abort, e.g. an LLVM ERROR on stderr)"]}
        sets.append({"name": n, "sizes": s, "dtype": dt, "path": n, "errors": index["errors"],
                     "portable_ptx": index.get("portable_ptx"), "compiled": "archs" in index})
    listing = {"arch": arch, "archs": [f"sm_{a}" for a in archs], "triton": triton.__version__,
               "compile_seconds": round(time.perf_counter() - t0, 1), "sets": sets}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sets.json").write_text(json.dumps(listing, indent=2) + "\n")
    return listing


def kernel_sets(root: Path, sizesets: dict) -> list[dict]:
    """[{name, sizes, dtype, path}]: the sets of a folder written by prepare_kernels, or the one set of an exported
    artifact (or of a kernels/ folder), matched to a size set by its model (d_state, head_size)."""
    root = Path(root)
    if (root / "sets.json").is_file():
        listing = json.loads((root / "sets.json").read_text())
        return [{**s, "path": root / s["path"]} for s in listing["sets"]
                if s["sizes"] in sizesets and s.get("compiled", True)]           # failed sets: see their errors
    from samba_edge.plugins.trt_launch import KernelSet

    index = KernelSet(root).index
    for sname, sz in sizesets.items():
        if index.get("model") == {"d_state": sz["N"], "head_size": sz["hs"]}:
            dtype = index.get("attention_dtype", "fp32")
            return [{"name": f"{sname}-{dtype}", "sizes": sname, "dtype": dtype, "path": root}]
    known = ", ".join(f"{n}: d_state {s['N']}, head_size {s['hs']}" for n, s in sizesets.items())
    raise RuntimeError(f"{root}: kernels for {index.get('model')} match none of the sizes checked here ({known})")


def pick(sets: list[dict], sizes: str, dtype: str = "fp32") -> dict:
    if not sets:
        raise RuntimeError("no kernel set to run (see the kernels check)")
    return sorted(sets, key=lambda s: (s["sizes"] != sizes, s["dtype"] != dtype))[0]


# ---- the groups (the CPU test calls these with its own sizes) -----------------------------------
def run_jit(chk: Checker, sizesets: dict) -> None:
    fp16 = chk.torch.float16
    for sname, sz in sizesets.items():
        for T in SEQS:
            st = starts_for(sz["W"], T)
            chk.check("jit", f"{sname} scan b=2 T={T}", lambda sz=sz, T=T: chk.scan_jit(sz, 2, T))
            chk.check("jit", f"{sname} swa b=2 T={T} starts={st}",
                      lambda sz=sz, T=T, st=st: chk.swa_jit(sz, 2, T, st, chk.torch.float32))
        st = [0, sz["W"] + 7]
        chk.check("jit", f"{sname} swa fp16 b=2 T=256", lambda sz=sz, st=st: chk.swa_jit(sz, 2, 256, st, fp16))


def run_aot(chk: Checker, sets: list[dict], sizesets: dict, sm: str, seqs=SEQS) -> None:
    """Every kernel of every set through the launcher: each image of this GPU's (`sm`) and both routes."""
    from samba_edge.plugins import trt_launch

    scanned = set()                                     # the scan kernels are the same in fp32 and fp16 sets
    for kset in sets:
        sizes, name, got = sizesets[kset["sizes"]], kset["name"], {}

        def load(kset=kset, got=got) -> dict:
            ks = got["ks"] = trt_launch.KernelSet.open(kset["path"])
            idx, portable = ks.index, ks.index.get("portable_ptx")
            got["expect"] = {im: trt_launch.Image(im, arch, b"").describe() for im, arch in
                             (("cubin", sm), ("ptx", sm), ("portable", portable)) if arch in idx.get("archs", {})}
            rec = {"ok": bool(got["expect"]) and not idx.get("errors"), "archs": sorted(idx.get("archs", {})),
                   "images": list(got["expect"]), "errors": idx.get("errors"), "portable_ptx": portable,
                   "summary": f"images {', '.join(got['expect']) or 'none'} for {sm}"}
            if portable is None:
                rec["note"] = "the index names no portable_ptx: the portable image is not checked"
            if not got["expect"]:
                rec["error"] = f"no image for {sm} (archs {rec['archs']}) and no portable PTX"
            return rec

        chk.check("aot", f"{name} kernels", load)
        if not got.get("expect"):
            continue
        ops = [op for op in OPS if op == "swa" or kset["sizes"] not in scanned]
        scanned.add(kset["sizes"])
        lau = {(op, im, ro): trt_launch.Launcher(got["ks"], OPS[op], ro, im)
               for op in ops for im in got["expect"] for ro in ROUTES}
        for T in seqs:
            for op in ops:
                x = inputs(chk.torch, op, sizes, 2, T, kset["dtype"])
                ref = reference(op, x, sizes["W"])                  # once per shape, for every image and route
                for im, expect in got["expect"].items():
                    for ro in ROUTES:
                        chk.check("aot", f"{name} {op} b=2 T={T} {im}/{ro}",
                                  lambda op=op, x=x, ref=ref, la=lau[(op, im, ro)], e=expect:
                                  chk.aot_case(op, la, x, ref, sizes["W"], e))


def run_graph(chk: Checker, kset: dict, sizes: dict, steps: int) -> None:
    for ro in ROUTES:
        chk.check("graph", f"{kset['name']} decode step x{steps} {ro}",
                  lambda ro=ro: chk.graph_case(kset["path"], sizes, ro, steps))


def run_garbage_direct(chk: Checker, sets: list[dict], sizesets: dict, time_limit: float, seqs=(1, 37)) -> None:
    for kset in sets:
        for ro in ROUTES:
            for T in seqs:
                chk.check("garbage-start-pos", f"{kset['name']} swa T={T} {ro}",
                          lambda kset=kset, ro=ro, T=T: chk.garbage_case(kset["path"], sizesets[kset["sizes"]], ro,
                                                                        T, time_limit))


def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    cands = [Path("/usr/local/cuda/bin/compute-sanitizer"), *sorted(Path("/usr/local").glob("cuda-*/bin/compute-sanitizer"))]
    return next((str(p) for p in cands if p.is_file()), None)


def _child(prefix: list[str], kernels: Path, timeout: float, time_limit: float) -> dict:
    """This script's garbage-start-pos check in a subprocess (its own process group: killed whole on timeout)."""
    with tempfile.TemporaryDirectory(prefix="gpu_first_run_child_") as tmp:
        out = Path(tmp) / "child.json"
        cmd = prefix + [sys.executable, "-m", "samba_edge.tools.gpu_first_run", "--only", "garbage-start-pos",
                        "--direct", "--kernels", str(kernels), "--time-limit", str(time_limit), "--out", str(out)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}       # one allocation per tensor: exact bounds for memcheck
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
        try:
            text, timed_out = p.communicate(timeout=timeout)[0], False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            text, timed_out = p.communicate()[0], True
        child = json.loads(out.read_text()) if out.is_file() else None
    return {"command": " ".join(cmd), "returncode": p.returncode, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - t0, 1), "child": child, "output": text or ""}


def garbage_subprocess(kset: dict) -> dict:
    """Under compute-sanitizer memcheck when found, else (or when it cannot run the checks here) plainly."""
    san = find_sanitizer()
    modes = ([("compute-sanitizer memcheck", [san, "--tool", "memcheck"], 300, 120.0)] if san else []) \
        + [("direct", [], 120, 10.0)]
    attempts = []
    for mode, prefix, timeout, limit in modes:
        a = {"mode": mode, **_child(prefix, kset["path"], timeout, limit)}
        a["sanitizer_errors"] = sanitizer_errors(a["output"]) if prefix else None
        attempts.append(a)
        if a["child"] is not None:                  # the checks ran (under the sanitizer, or plainly)
            break
    last = attempts[-1]
    child_ok = last["child"] is not None and last["child"].get("ok") and last["returncode"] == 0
    ok = bool(child_ok) and (last["mode"] == "direct" or last["sanitizer_errors"] == 0)
    rec = {"ok": ok, "mode": last["mode"], "sanitizer": san, "kernels": kset["name"],
           "runs": last["child"]["checks"] if last["child"] else None,
           "attempts": [{k: (v[-4000:] if k == "output" else v) for k, v in a.items() if k != "child"}
                        for a in attempts]}
    notes = []
    if not san:
        notes.append("compute-sanitizer not found (PATH, /usr/local/cuda*/bin): ran without memory checking")
    elif last["mode"] == "direct":
        notes.append(f"compute-sanitizer could not run the checks here (exit {attempts[0]['returncode']}"
                     f"{', timed out' if attempts[0]['timed_out'] else ''}): ran without memory checking")
    if notes:
        rec["note"] = notes[0]
    runs = len(rec["runs"] or [])
    rec["summary"] = (f"{last['mode']}: {runs} launches" + (f", {last['sanitizer_errors']} sanitizer errors"
                                                              if last["mode"] != "direct" else "")
                      + (f" ({notes[0]})" if notes else ""))
    if not ok:
        failed = [c["name"] + ": " + str(c.get("error", "")) for c in rec["runs"] or [] if not c["ok"]]
        rec["error"] = ("timed out" if last["timed_out"] else f"exit {last['returncode']}") + \
            (f", sanitizer errors {last['sanitizer_errors']}" if last["mode"] != "direct" else "") + \
            (f", failed: {failed}" if failed else "") + ("" if last["child"] else ", no report from the subprocess")
    return rec


def run_bandwidth(chk: Checker, kset: dict, sizes: dict, peak: Optional[float]) -> None:
    from samba_edge.plugins import trt_launch

    ks = trt_launch.KernelSet.open(kset["path"])
    for op, shapes in (("scan", ((1, 1), (8, 1), (1, 256), (4, 256))), ("swa", ((1, 1), (8, 1), (1, 256)))):
        la = trt_launch.Launcher(ks, OPS[op])                      # the plugins' choice: this GPU's cubin
        for b, T in shapes:
            chk.check("bandwidth", f"{kset['name']} {op} b={b} T={T}",
                      lambda op=op, la=la, b=b, T=T: chk.bandwidth_case(op, la, sizes, b, T, peak))


# ---- versions, the driver context ---------------------------------------------------------------
def _dist_version(*names: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    for n in names:
        try:
            return version(n)
        except PackageNotFoundError:
            pass
    return None


def device_info(torch, triton, dev_index: int) -> dict:
    """Versions and the device; makes torch's (primary) context current for the driver API calls."""
    import cuda.bindings

    from samba_edge.plugins import trt_launch

    cu, ck = trt_launch._driver(), trt_launch.cuda_check
    torch.zeros(1, device=f"cuda:{dev_index}")              # torch's context exists
    dev = ck(cu.cuDeviceGet(dev_index), "cuDeviceGet")
    ck(cu.cuCtxSetCurrent(ck(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")), "cuCtxSetCurrent")
    a = cu.CUdevice_attribute

    def attr(x) -> int:
        return int(ck(cu.cuDeviceGetAttribute(x, dev), f"cuDeviceGetAttribute({x})"))

    ver = int(ck(cu.cuDriverGetVersion(), "cuDriverGetVersion"))
    props = torch.cuda.get_device_properties(dev_index)
    cap = torch.cuda.get_device_capability(dev_index)
    info = {"gpu": props.name, "sm": f"sm_{cap[0]}{cap[1]}", "sm_count": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "driver_cuda_version": f"{ver // 1000}.{(ver % 1000) // 10}",
            "cuda_python": getattr(cuda.bindings, "__version__", None) or _dist_version("cuda-bindings", "cuda-python"),
            "triton": triton.__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "compute_sanitizer": find_sanitizer()}
    try:
        clock_khz = attr(a.CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
        bus_bits = attr(a.CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
    except Exception as e:  # noqa: BLE001 - torch's properties instead (torch >= 2.5)
        info["driver_attribute_error"] = str(e)
        clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        info.update(memory_clock_khz=clock_khz, memory_bus_bits=bus_bits,
                    peak_bandwidth_GBps=2 * clock_khz * 1e3 * bus_bits / 8 / 1e9)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            p = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.memory,pci.bus_id",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = " | ".join(p.stdout.strip().splitlines()) or p.stderr.strip()
            info["driver_version"] = info["nvidia_smi"].split(", ")[1] if p.returncode == 0 else None
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"failed: {e}"
    info["summary"] = (f"{info['gpu']} {info['sm']} {info['memory_GiB']} GiB; driver "
                       f"{info.get('driver_version') or '?'} (CUDA {info['driver_cuda_version']}), cuda-python "
                       f"{info['cuda_python']}, triton {info['triton']}, torch {info['torch']}"
                       + (f"; DRAM {info['peak_bandwidth_GBps']:.0f} GB/s" if "peak_bandwidth_GBps" in info else ""))
    return {"ok": True, **info}


# ---- main ---------------------------------------------------------------------------------------
def write_report(path: Path, report: dict) -> None:
    """Atomically (temp file + os.replace); a path that is not a regular file (/dev/null) is written plainly."""
    text = json.dumps(report, indent=2, default=str) + "\n"
    path = Path(path)
    if path.exists() and not path.is_file():
        path.write_text(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m samba_edge.tools.gpu_first_run", description=__doc__.splitlines()[0],
                                 epilog="exit codes: 0 all passed, 1 a check failed, 2 cannot run here")
    ap.add_argument("--out", default="gpu_first_run.json", help="the JSON report (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="no jit group, shorter timings, fewer graph steps")
    ap.add_argument("--only", help=f"comma-separated groups of {', '.join(GROUPS)} (versions always runs)")
    ap.add_argument("--kernels", help="kernels compiled elsewhere: a folder from --prepare, or an exported artifact")
    ap.add_argument("--sweep", action="store_true", help="also sweep the JIT kernels' block sizes")
    ap.add_argument("--prepare", metavar="DIR", help="only compile the kernel sets into DIR (no GPU needed), then exit")
    ap.add_argument("--arch", type=int, default=90, help="with --prepare: the GPU arch, e.g. 90 (default)")
    ap.add_argument("--jobs", type=int, default=4, help="processes compiling kernels (default: %(default)s)")
    ap.add_argument("--direct", action="store_true",
                    help="run garbage-start-pos in this process (what its subprocess, under compute-sanitizer, runs)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="with --direct: seconds a garbage launch may take")
    args = ap.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",")] if args.only else [g for g in GROUPS if g != "sweep"]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        ap.error(f"unknown group(s) {bad}: choose from {', '.join(GROUPS)}")
    if args.quick and not args.only:
        groups.remove("jit")
    if args.sweep and "sweep" not in groups:
        groups.append("sweep")
    args.groups = ["versions"] + [g for g in groups if g != "versions"]
    return args


def _run(chk: Checker, args: argparse.Namespace, report: dict, tmp: Path) -> None:
    import torch
    import triton

    groups = args.groups
    torch.backends.cuda.matmul.allow_tf32 = False           # exact fp32 references
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(dev)
    arch, sm = cap[0] * 10 + cap[1], f"sm_{cap[0]}{cap[1]}"
    info = chk.check("versions", "driver, packages, GPU", lambda: device_info(torch, triton, dev))
    report["device"] = {k: v for k, v in info.items() if k not in ("ok", "group", "name", "seconds", "summary")}
    sizesets = report["sizes"] = size_sets()
    if "jit" in groups:
        run_jit(chk, sizesets)
    sets: list[dict] = []
    if set(groups) & {"aot", "graph", "garbage-start-pos", "bandwidth"}:
        def obtain() -> dict:
            if args.kernels:
                sets.extend(kernel_sets(Path(args.kernels), sizesets))
                return {"ok": bool(sets), "from": args.kernels, "sets": [s["name"] for s in sets],
                        "summary": f"{len(sets)} sets from {args.kernels}"}
            listing = prepare_kernels(tmp / "kernels", arch, sizesets, jobs=args.jobs)
            sets.extend(kernel_sets(tmp / "kernels", sizesets))
            errors = [e for s in listing["sets"] for e in s["errors"]]
            return {"ok": not errors, **listing, "error": "; ".join(errors) or None,
                    "summary": f"{len(sets)} sets for {', '.join(listing['archs'])} in {listing['compile_seconds']} s"}

        chk.check("aot", "compile" if not args.kernels else "kernels", obtain)
    if not sets:                                            # the kernels check failed: it says why
        groups = [g for g in groups if g not in ("aot", "graph", "garbage-start-pos", "bandwidth")]
    if "aot" in groups:
        run_aot(chk, sets, sizesets, sm)
    if "graph" in groups:
        kset = pick(sets, "Samba_421M")
        run_graph(chk, kset, sizesets[kset["sizes"]], 8 if args.quick else 32)
    if "garbage-start-pos" in groups:
        if args.direct:
            run_garbage_direct(chk, sets, sizesets, args.time_limit)
        else:
            kset = pick(sets, "samba-tiny-py")
            chk.check("garbage-start-pos", f"{kset['name']} swa (subprocess)", lambda: garbage_subprocess(kset))
    if "bandwidth" in groups:
        kset = pick(sets, "Samba_421M")
        run_bandwidth(chk, kset, sizesets[kset["sizes"]], info.get("peak_bandwidth_GBps"))
    if "sweep" in groups:
        report["sweep"] = chk.run_sweep(sizesets["Samba_421M"])


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    if args.prepare:
        listing = prepare_kernels(Path(args.prepare), args.arch, size_sets(), jobs=args.jobs)
        errors = [e for s in listing["sets"] for e in s["errors"]]
        print(f"{len(listing['sets'])} kernel sets for {', '.join(listing['archs'])} (triton {listing['triton']}) "
              f"in {args.prepare} ({listing['compile_seconds']} s){'; ERRORS: ' + '; '.join(errors) if errors else ''}"
              f"\non the GPU machine: python -m samba_edge.tools.gpu_first_run --kernels {args.prepare}")
        return 1 if errors else 0
    require_gpu()                                           # exit 2 here, before torch is imported
    t0 = time.perf_counter()
    import torch

    print(f"gpu_first_run: groups {', '.join(args.groups)}{' (quick)' if args.quick else ''}", flush=True)
    report: dict[str, Any] = {"tool": "samba_edge.tools.gpu_first_run", "argv": sys.argv[1:], "groups": args.groups,
                              "quick": args.quick}
    chk = Checker(torch, args.quick)
    with tempfile.TemporaryDirectory(prefix="gpu_first_run_") as tmp:
        try:
            _run(chk, args, report, Path(tmp))
        except Exception as e:  # noqa: BLE001 - a crash between checks is a failed check too
            chk.checks.append({"group": "fatal", "name": "gpu_first_run", "ok": False,
                               "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
            print(f"  FAIL fatal: {type(e).__name__}: {e}", flush=True)
    seconds = time.perf_counter() - t0
    n_bad = sum(not c["ok"] for c in chk.checks)
    report.update(ok=bool(chk.checks) and n_bad == 0, seconds=round(seconds, 1), checks=chk.checks)
    write_report(Path(args.out), report)
    print(f"{len(chk.checks) - n_bad}/{len(chk.checks)} checks passed in {seconds:.0f} s; report: {args.out}",
          flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
