"""`samba-edge bench`: prefill/decode speed, per-token latency and peak memory against context length.

Three systems, measured side by side in one run, each (system, context) in its own subprocess so that
peak RSS figures are separate:

* artifact    — the exported artifact through the streaming runtime (`open_model`, ONNX Runtime);
* torch       — the same model's checkpoint through the same runtime on the PyTorch backend;
* transformer — a plain PyTorch decoder of the same size with a full KV cache
                (`bench/transformer_baseline.py`), which is what SAMBA's constant-size state replaces.

For each context length `ctx`: prefill = `ctx` random token ids fed in chunks of the artifact's max
chunk into a fresh stream (timed as a whole); decode = `decode_tokens` single-token feeds right after,
each timed (p50/p99 per-token latency; decode tok/s = tokens / total decode time). A throwaway stream
warms each system up first (one chunk and a few single tokens), untimed. Decode feeds token ids only
(no sampling). The transformer's cache is filled with `ctx` random keys/values instead of an O(ctx^2)
prefill (its prefill is not measured): a decode step's cost depends on how many entries the cache
holds, not on their values. Peak RSS is the worker process's high-water mark (/proc/self/status VmHWM,
else ru_maxrss), model load included. Nothing is hard-coded: every figure comes from this run.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from samba_edge.runtime.errors import SambaEdgeError

SYSTEMS = ("artifact", "torch", "transformer")
DEFAULT_CHECKPOINT = "builtin:samba-tiny-py"
WARMUP_STEPS = 3
RESULT_TAG = "SAMBA_EDGE_BENCH_RESULT "
ERROR_TAG = "SAMBA_EDGE_BENCH_ERROR "
MIB = 1024 * 1024


# ---- sizes --------------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'1k' -> 1024, '64K' -> 65536, '1m' -> 1048576, '300' -> 300."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    if not m or int(m.group(1)) < 1:
        raise SambaEdgeError(f"bad context size {text!r}: use positive numbers like 1k,4k,16k,64k or 300")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def parse_contexts(text: str) -> tuple[int, ...]:
    parts = [p for p in str(text).split(",")]
    if not any(p.strip() for p in parts):
        raise SambaEdgeError("--contexts is empty: give sizes like 1k,4k,16k,64k")
    return tuple(sorted({parse_size(p) for p in parts}))


def _label(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ---- the worker side (runs in a subprocess) --------------------------------------------------------------
def _rss_bytes(field: str = "VmRSS") -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    hwm = _rss_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024            # bytes on macOS, KiB elsewhere


def _latency_stats(seconds: Sequence[float]) -> dict:
    import numpy as np

    ms = np.asarray(seconds) * 1e3
    return {"decode_tok_s": len(ms) / (ms.sum() / 1e3), "latency_ms_p50": float(np.percentile(ms, 50)),
            "latency_ms_p99": float(np.percentile(ms, 99)), "latency_ms_mean": float(ms.mean()),
            "latency_ms_min": float(ms.min()), "latency_ms_max": float(ms.max())}


def _measure_stream(spec: dict) -> dict:
    """artifact / torch: the streaming runtime, prefill in chunks then single-token decode."""
    import numpy as np

    from samba_edge.runtime import open_model

    threads = spec.get("threads")
    if spec["system"] == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = open_model(spec["path"], backend=spec["backend"], threads=threads)
    load_s = time.perf_counter() - t0
    rss_load = _rss_bytes()
    V, chunk, ctx, n = model.vocab_size, spec["chunk"], spec["context"], spec["decode_tokens"]
    rng = np.random.default_rng(spec["seed"])
    warm = model.new_stream()
    warm.feed(rng.integers(0, V, chunk))
    for t in rng.integers(0, V, WARMUP_STEPS):
        warm.feed([int(t)])
    del warm
    ids = rng.integers(0, V, ctx)
    s = model.new_stream()
    t0 = time.perf_counter()
    for p in range(0, ctx, chunk):
        s.feed(ids[p:p + chunk])
    prefill_s = time.perf_counter() - t0
    assert s.position == ctx
    graph, run = [], model.run                 # the time inside the backend's call, per decode token

    def timed(*a):
        t = time.perf_counter()
        try:
            return run(*a)
        finally:
            graph.append(time.perf_counter() - t)

    model.run = timed
    lat = []
    if spec.get("sample"):                     # the user's path: choose each token from the logits, then feed it
        from samba_edge.runtime.sampling import SamplingParams

        params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, max_new_tokens=n, seed=0)
        it, t0 = s.generate_ids(params), time.perf_counter()
        for _ in it:
            lat.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    else:
        for t in rng.integers(0, V, n):
            t0 = time.perf_counter()
            s.feed([int(t)])
            lat.append(time.perf_counter() - t0)
    graph = graph[-len(lat):]
    assert s.position == ctx + len(lat)
    out = {"backend": model.backend.name, "load_s": load_s, "prefill_s": prefill_s, "prefill_tok_s": ctx / prefill_s,
           **_latency_stats(lat), "graph_ms_mean": 1e3 * sum(graph) / len(graph),
           "outside_graph_ms_mean": 1e3 * (sum(lat) - sum(graph)) / len(lat), "state_bytes": model.manifest.state_bytes(1),
           "fingerprint": model.manifest.fingerprint, "rss_after_load_mib": (rss_load or 0) / MIB}
    if spec["system"] == "torch":
        import torch

        out["threads"] = torch.get_num_threads()
        out["torch_version"] = torch.__version__
        out["parameters"] = sum(p.numel() for p in model.backend.model.parameters())
    else:
        import onnxruntime

        out["threads"] = threads or "ort default"
        out["onnxruntime_version"] = onnxruntime.__version__
    return out


def _measure_transformer(spec: dict) -> dict:
    import numpy as np
    import torch

    from samba_edge.runtime.manifest import Manifest

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from samba_edge.bench import transformer_baseline as tb

    t0 = time.perf_counter()
    model = tb.KVTransformer.from_model_config(Manifest.load(spec["path"]).model, seed=spec["seed"])
    load_s = time.perf_counter() - t0
    rss_load = _rss_bytes()
    V, ctx, n = model.wte.num_embeddings, spec["context"], spec["decode_tokens"]
    rng = np.random.default_rng(spec["seed"])
    warm = model.new_cache(64 + WARMUP_STEPS, filled=64, seed=spec["seed"])
    for t in rng.integers(0, V, WARMUP_STEPS):
        model(torch.tensor([int(t)]), warm)
    del warm
    t0 = time.perf_counter()
    cache = model.new_cache(ctx + n, filled=ctx, seed=spec["seed"])      # random K/V in place of a prefill
    fill_s = time.perf_counter() - t0
    lat = []
    for t in rng.integers(0, V, n):
        tok = torch.tensor([int(t)])
        t0 = time.perf_counter()
        model(tok, cache)
        lat.append(time.perf_counter() - t0)
    assert cache.length == ctx + n
    return {"backend": "torch", "load_s": load_s, "prefill_s": None, "prefill_tok_s": None,
            "cache_fill_s": fill_s, **_latency_stats(lat), "kv_cache_bytes": cache.nbytes(ctx),
            "kv_cache_bytes_end": cache.nbytes(), "parameters": model.parameter_count(),
            "threads": torch.get_num_threads(), "rss_after_load_mib": (rss_load or 0) / MIB}


def _worker(spec: dict) -> dict:
    res = _measure_transformer(spec) if spec["system"] == "transformer" else _measure_stream(spec)
    res["peak_rss_mib"] = _peak_rss_bytes() / MIB
    res["context"] = spec["context"]
    res["decode_tokens"] = spec["decode_tokens"]
    return res


def _run_worker(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "samba_edge.tools.bench", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
        if line.startswith(ERROR_TAG):
            raise SambaEdgeError(f"{spec['system']} at context {spec['context']}: {line[len(ERROR_TAG):]}")
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"bench worker for {spec['system']} at context {spec['context']} failed "
                       f"(exit {proc.returncode}): {tail}")


# ---- the public entry ---------------------------------------------------------------------------------------
def _resolve_artifact(artifact: str) -> tuple[Path, bool]:
    """An exported artifact directory as is; a checkpoint / builtin:NAME is exported to the cache first."""
    path = Path(str(artifact))
    if not str(artifact).startswith("builtin:") and (path / "manifest.json").is_file():
        return path, False
    if not str(artifact).startswith("builtin:") and not path.exists():
        raise SambaEdgeError(f"{artifact} not found; pass an exported artifact directory "
                             "(samba-edge export CHECKPOINT -o DIR), a checkpoint or builtin:NAME")
    from samba_edge.runtime.session import cached_export

    return cached_export(str(artifact)), True


def _ratio(a, b) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def _ratios(systems: dict, contexts: Sequence[int]) -> dict:
    def run(name, ctx):
        for r in systems.get(name, {}).get("runs", []):
            if r["context"] == ctx:
                return r
        return None

    lo, hi = contexts[0], contexts[-1]
    out: dict = {"per_context": [], "smallest_context": lo, "largest_context": hi}
    for ctx in contexts:
        a, t, x = run("artifact", ctx), run("torch", ctx), run("transformer", ctx)
        row = {"context": ctx}
        if a and t:
            row["decode_tok_s_artifact_over_torch"] = _ratio(a["decode_tok_s"], t["decode_tok_s"])
            row["prefill_tok_s_artifact_over_torch"] = _ratio(a["prefill_tok_s"], t["prefill_tok_s"])
            row["peak_rss_artifact_over_torch"] = _ratio(a["peak_rss_mib"], t["peak_rss_mib"])
        if a and x:
            row["latency_p50_transformer_over_artifact"] = _ratio(x["latency_ms_p50"], a["latency_ms_p50"])
            row["peak_rss_transformer_over_artifact"] = _ratio(x["peak_rss_mib"], a["peak_rss_mib"])
        out["per_context"].append(row)
    growth = {}
    for name in systems:
        r_lo, r_hi = run(name, lo), run(name, hi)
        if r_lo and r_hi:
            growth[name] = {"latency_p50": _ratio(r_hi["latency_ms_p50"], r_lo["latency_ms_p50"]),
                            "latency_p99": _ratio(r_hi["latency_ms_p99"], r_lo["latency_ms_p99"]),
                            "decode_tok_s": _ratio(r_hi["decode_tok_s"], r_lo["decode_tok_s"]),
                            "peak_rss": _ratio(r_hi["peak_rss_mib"], r_lo["peak_rss_mib"]),
                            "peak_rss_delta_mib": r_hi["peak_rss_mib"] - r_lo["peak_rss_mib"]}
    out["largest_over_smallest_context"] = growth
    return out


def run_bench(artifact: str, baseline: str = "torch", contexts: Sequence[int] = (1024, 4096, 16384, 65536),
              decode_tokens: int = 64, json_out: Optional[str] = None, plot: Optional[str] = None,
              checkpoint: Optional[str] = None, threads: Optional[int] = None, seed: int = 0) -> dict:
    """Measure the artifact, the torch baseline (unless baseline="none") and a same-size KV-cache
    transformer at each context length; returns one dict (also written to `json_out`, plotted to `plot`)."""
    from samba_edge.runtime.manifest import Manifest

    if baseline not in ("torch", "none"):
        raise SambaEdgeError(f"unknown baseline {baseline!r}; use torch or none")
    contexts = tuple(sorted({int(c) for c in contexts}))
    if not contexts or contexts[0] < 1:
        raise SambaEdgeError("contexts must be positive token counts, e.g. 1k,4k,16k,64k")
    if decode_tokens < 1:
        raise SambaEdgeError(f"--decode-tokens must be a positive number of tokens, got {decode_tokens}")
    if threads is not None and threads < 1:
        raise SambaEdgeError(f"--threads must be positive, got {threads}")
    check_outputs(json_out, plot)                       # before the (long) run, not after it
    art_dir, exported = _resolve_artifact(artifact)
    manifest = Manifest.load(art_dir)
    notes = []
    if exported:
        notes.append(f"{artifact} is not an exported artifact: exported it to {art_dir} (portable flavour) first")
    ckpt = checkpoint or manifest.source or DEFAULT_CHECKPOINT
    if baseline == "torch" and not ckpt.startswith("builtin:") and not Path(ckpt).exists():
        raise SambaEdgeError(f"the baseline checkpoint {ckpt} (the artifact's source) is not found; "
                             "pass --checkpoint CK or --baseline none")
    chunk = manifest.max_chunk
    names = ["artifact"] + (["torch"] if baseline == "torch" else [])
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        names.append("transformer")
    else:
        notes.append("transformer baseline skipped: it needs PyTorch (pip install 'samba-edge[export]')")
    labels = {"artifact": f"artifact ({manifest.flavor} ONNX, onnxruntime) {art_dir}",
              "torch": f"PyTorch reference of {ckpt}",
              "transformer": "same-size transformer, full KV cache (random weights, MHA, no RoPE)"}
    started = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    systems: dict = {n: {"label": labels[n], "runs": []} for n in names}
    from samba_edge.runtime.progress import progress

    for ctx, name in progress([(c, n) for c in contexts for n in names], "bench runs", unit="run"):
        spec = {"system": name, "context": ctx, "decode_tokens": decode_tokens, "chunk": chunk, "seed": seed,
                "threads": threads,
                "path": str(art_dir) if name != "torch" else ckpt,
                "backend": "ort" if name == "artifact" else "torch"}
        systems[name]["runs"].append(_run_worker(spec))
    fp_art = manifest.fingerprint
    if "torch" in systems:
        fp_torch = systems["torch"]["runs"][0].get("fingerprint")
        if fp_torch and fp_art and fp_torch != fp_art:
            notes.append(f"the baseline checkpoint {ckpt} has other weights than the artifact "
                         f"(fingerprint {fp_torch[:12]} vs {fp_art[:12]}): not the same model")
    if "transformer" in systems:
        notes.append("transformer: its KV cache is filled with random values instead of an O(n^2) prefill "
                     "(a decode step's cost does not depend on the values); its prefill is not measured")
    result = {
        "artifact": str(art_dir), "checkpoint": ckpt if baseline == "torch" else None, "baseline": baseline,
        "contexts": list(contexts), "decode_tokens": decode_tokens, "prefill_chunk": chunk, "seed": seed,
        "threads": threads, "warmup_steps": WARMUP_STEPS, "manifest_model": manifest.model,
        "state_bytes_per_stream": manifest.state_bytes(1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "wall_s": time.time() - started, "systems": systems, "ratios": _ratios(systems, contexts), "notes": notes,
        "method": ("prefill: ctx random ids fed in chunks of the artifact's max chunk into a fresh stream; decode: "
                   "single-token feeds right after (ids only, no sampling), each timed; untimed warm-up on a "
                   "throwaway stream first; each (system, context) in its own process; peak RSS = VmHWM"),
    }
    if plot:
        note = write_plot(result, plot)
        result["plot"] = str(plot) if note is None else None
        if note:
            notes.append(note)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---- output ---------------------------------------------------------------------------------------------
def check_outputs(json_out: Optional[str], plot: Optional[str]) -> None:
    """Up front: --plot needs matplotlib, and both outputs need an existing directory to go to."""
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SambaEdgeError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                                 "(or run without --plot)") from None
    from samba_edge.runtime.userio import check_output_file

    for opt, path in (("--json", json_out), ("--plot", plot)):
        if path:
            check_output_file(path, opt)


def write_plot(result: dict, path: str) -> Optional[str]:
    """Per-token latency (p50, p99 as a band) and peak RSS against context length; a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, sysres in result["systems"].items():
        runs = sysres["runs"]
        x = [r["context"] for r in runs]
        p50 = [r["latency_ms_p50"] for r in runs]
        line, = ax1.plot(x, p50, marker="o", label=name)
        ax1.fill_between(x, p50, [r["latency_ms_p99"] for r in runs], color=line.get_color(), alpha=0.15)
        ax2.plot(x, [r["peak_rss_mib"] for r in runs], marker="o", label=name, color=line.get_color())
    for ax, title, unit in ((ax1, "per-token decode latency (p50, band to p99; log scale)", "ms"),
                            (ax2, "peak RSS of the process", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["contexts"], [_label(c) for c in result["contexts"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        if ax is ax1:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"samba-edge bench: {Path(result['artifact']).name}, {result['decode_tokens']} decode tokens "
                 f"per context, threads {result['threads'] or 'default'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def render_text(result: dict) -> str:
    lines = [f"artifact: {result['artifact']}",
             f"baseline: {result['checkpoint'] or 'none'}; prefill chunk {result['prefill_chunk']}, "
             f"{result['decode_tokens']} decode tokens per context, threads {result['threads'] or 'default'}, "
             f"load average {_fmt((result['machine'].get('loadavg_before') or [None])[0], '.2f')}",
             "",
             f"{'system':<12} {'context':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'p50 ms':>8} "
             f"{'p99 ms':>8} {'peak RSS MiB':>13}"]
    for name, sysres in result["systems"].items():
        for r in sysres["runs"]:
            lines.append(f"{name:<12} {_label(r['context']):>8} {_fmt(r['prefill_tok_s'], '.0f'):>14} "
                         f"{r['decode_tok_s']:>13.1f} {r['latency_ms_p50']:>8.3f} {r['latency_ms_p99']:>8.3f} "
                         f"{r['peak_rss_mib']:>13.1f}")
    lines.append("")
    lines.append(f"SAMBA state per stream: {result['state_bytes_per_stream'] / 1024:.1f} KiB at every context; "
                 "transformer KV cache: " + ", ".join(
                     f"{_label(r['context'])} {r['kv_cache_bytes'] / MIB:.1f} MiB"
                     for r in result["systems"].get("transformer", {}).get("runs", [])))
    rat = result["ratios"]
    lines.append("")
    lines.append("ratios per context:")
    for row in rat["per_context"]:
        parts = []
        if "decode_tok_s_artifact_over_torch" in row:
            parts.append(f"decode tok/s artifact/torch {_fmt(row['decode_tok_s_artifact_over_torch'], '.2f')}x")
            parts.append(f"prefill tok/s artifact/torch {_fmt(row['prefill_tok_s_artifact_over_torch'], '.2f')}x")
        if "latency_p50_transformer_over_artifact" in row:
            parts.append(f"p50 latency transformer/artifact "
                         f"{_fmt(row['latency_p50_transformer_over_artifact'], '.2f')}x")
        lines.append(f"  {_label(row['context']):>6}: " + ", ".join(parts))
    lo, hi = _label(rat["smallest_context"]), _label(rat["largest_context"])
    lines.append(f"{hi} vs {lo} (per system):")
    for name, g in rat["largest_over_smallest_context"].items():
        lines.append(f"  {name:<12} p50 latency {_fmt(g['latency_p50'], '.2f')}x, "
                     f"p99 {_fmt(g['latency_p99'], '.2f')}x, "
                     f"decode tok/s {_fmt(g['decode_tok_s'], '.2f')}x, peak RSS {_fmt(g['peak_rss'], '.2f')}x "
                     f"({g['peak_rss_delta_mib']:+.1f} MiB)")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    if result.get("plot"):
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)


def _worker_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m samba_edge.tools.bench --worker SPEC_JSON (internal; use `samba-edge bench`)",
              file=sys.stderr)
        return 2
    try:
        res = _worker(json.loads(argv[1]))
    except SambaEdgeError as e:
        print(ERROR_TAG + str(e).replace("\n", " "), flush=True)
        return 2
    print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
