"""Soak test: one stream of the shipped model's artifact fed >= 100,000 real tokens (ONNX Runtime).

    python bench/soak.py [--tokens 100000] [--artifact DIR] [--checkpoint builtin:samba-tiny-py] [--json F]

The tokens are this interpreter's standard-library sources (sorted *.py files, each preceded by the
tokenizer's document-start token), tokenized with the model's tokenizer and concatenated. They go
through ONE `Stream` mostly one token per `feed` (decode-sized steps), with a chunk of 2..300 tokens now
and then (sizes around the window and the max chunk, some split inside `feed`). Along the way:

* RSS (VmRSS) every 1,000 tokens, and per-token latency of every single-token feed;
* a table every 10,000 tokens: tokens, RSS MiB, p50/p99 latency ms, mean next-token NLL (nats) over
  the block's single-token steps (a sanity check that the model stays sensible far past its training
  length);
* every 25,000 tokens and at the end: the stream's recurrent state and last logits against the PyTorch
  reference (`TorchBackend`, fed the same tokens in chunks of 1,024 with its state carried along) —
  max-abs per state kind, which must be <= 1e-3. Chunked and token-by-token feeding are proven equal
  by the tests; the reference runs in a child process so that this process (which never imports
  torch) measures the deployed runtime's memory alone.

Verdict: flat RSS (max RSS growth after the first 10,000 tokens of warm-up), latency drift (p50 of the
last 10,000 single-token steps over the first 10,000) and the state checks. Exit code 0 when all hold.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

DEFAULT_CHECKPOINT = "builtin:samba-tiny-py"
CHUNK_SIZES = (2, 3, 7, 63, 64, 65, 255, 256, 257, 300)
MIB = 1024 * 1024


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    import resource                                               # no /proc: the peak is the best we have

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ---- the PyTorch reference, in a child process --------------------------------------------------------
def reference_server(conn, checkpoint: str, export: bool, ref_chunk: int) -> None:
    """Holds a TorchBackend and its carried state; answers ("export",), ("feed", ids), ("state",), ("stop",)."""
    from samba_edge.export.torch_backend import TorchBackend

    be = TorchBackend.open(checkpoint, last_only=True)
    state, pos, last = be.manifest.empty_state(1), 0, None
    while True:
        msg = conn.recv()
        if msg[0] == "export":
            from samba_edge.runtime.session import cached_export

            conn.send(str(cached_export(checkpoint)))
        elif msg[0] == "feed":
            ids = np.asarray(msg[1], np.int64)
            t0 = time.perf_counter()
            for p in range(0, ids.size, ref_chunk):
                piece = ids[p:p + ref_chunk]
                logits, state = be.run(piece[None], np.array([pos]), state)
                pos += piece.size
                last = logits[0, -1]
            conn.send(time.perf_counter() - t0)
        elif msg[0] == "state":
            conn.send((pos, [np.asarray(s) for s in state], last))
        else:
            conn.send("bye")
            return


# ---- text -----------------------------------------------------------------------------------------------
def stdlib_tokens(tokenizer, n: int) -> tuple[np.ndarray, int]:
    """At least n token ids from the standard library's .py files (sorted paths), document-start separated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    ids: list[int] = []
    files = 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        ids += ([start] if start is not None else []) + tokenizer.encode(text)
        files += 1
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise SystemExit(f"the standard library under {root} gave only {len(ids)} tokens; use --tokens {len(ids)}")
    return np.asarray(ids[:n], dtype=np.int64), files


def schedule(n: int, rng: np.random.Generator, chunk_prob: float) -> list[int]:
    """Step sizes summing to n: 1 mostly, now and then a chunk from CHUNK_SIZES."""
    sizes, total = [], 0
    while total < n:
        k = int(rng.choice(CHUNK_SIZES)) if rng.random() < chunk_prob else 1
        k = min(k, n - total)
        sizes.append(k)
        total += k
    return sizes


def compare(stream, ref_state, ref_logits, manifest) -> dict:
    by_kind: dict = {}
    for spec, a, b in zip(manifest.state, stream.state, ref_state):
        d = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
        by_kind[spec.kind] = max(by_kind.get(spec.kind, 0.0), d)
    V = manifest.vocab_size
    logits = float(np.abs(stream.last_logits[:V].astype(np.float64) - ref_logits[:V].astype(np.float64)).max())
    return {"state_max_abs": max(by_kind.values()), "by_kind": by_kind, "logits_max_abs": logits}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens to stream (default 100000)")
    ap.add_argument("--artifact", help="exported artifact directory (default: the checkpoint exported to the "
                    "cache, portable flavour)")
    ap.add_argument("--checkpoint", default=None, help="the PyTorch reference (default: the artifact's source, "
                    f"else {DEFAULT_CHECKPOINT})")
    ap.add_argument("--report-every", type=int, default=10_000)
    ap.add_argument("--check-every", type=int, default=25_000)
    ap.add_argument("--ref-chunk", type=int, default=1024, help="the reference's chunk size")
    ap.add_argument("--chunk-prob", type=float, default=0.002, help="chance that a step is a chunk, not 1 token")
    ap.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: its own)")
    ap.add_argument("--tol", type=float, default=1e-3, help="state max-abs allowed against the reference")
    ap.add_argument("--max-rss-growth-mib", type=float, default=16.0, help="RSS growth allowed after warm-up")
    ap.add_argument("--max-latency-drift", type=float, default=1.25, help="p50 last/first block allowed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the measurements to this file")
    args = ap.parse_args(argv)
    if args.tokens < 2 * args.report_every:
        ap.error(f"--tokens must be at least 2 x --report-every ({2 * args.report_every}) for a drift figure")

    from samba_edge.runtime import open_model
    from samba_edge.runtime.manifest import Manifest

    checkpoint = args.checkpoint
    if args.artifact and checkpoint is None:
        checkpoint = Manifest.load(args.artifact).source or DEFAULT_CHECKPOINT
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    ref = ctx.Process(target=reference_server, args=(child, checkpoint, not args.artifact, args.ref_chunk),
                      daemon=True)
    ref.start()
    try:
        if args.artifact:
            artifact = args.artifact
        else:
            parent.send(("export",))
            artifact = parent.recv()
        model = open_model(artifact, backend="ort", threads=args.threads)
        return soak(args, model, artifact, checkpoint, parent)
    finally:
        try:
            parent.send(("stop",))
            parent.recv()
        except (OSError, EOFError):
            pass
        ref.join(timeout=30)


def soak(args, model, artifact, checkpoint, ref) -> int:
    N, R = args.tokens, args.report_every
    t_text = time.perf_counter()
    ids, files = stdlib_tokens(model.tokenizer, N)
    t_text = time.perf_counter() - t_text
    sizes = schedule(N, np.random.default_rng(args.seed), args.chunk_prob)
    lat = np.full(N, np.nan)                 # per-token latency of single-token steps, indexed by position
    nll = np.full(N, np.nan)
    rss_samples = np.zeros(N // 1000 + 2)
    rss_pos = np.zeros(N // 1000 + 2, dtype=np.int64)
    n_rss = 0
    chunk_tokens, chunk_time, chunk_steps = 0, 0.0, 0
    checks, rows = [], []
    synced = 0                               # tokens the reference has been sent
    next_report, next_check, next_rss = R, args.check_every, 0
    print(f"soak: {N} tokens of stdlib text ({files} files, tokenized in {t_text:.1f} s) through ONE stream of "
          f"{artifact} (onnxruntime, max chunk {model.max_chunk}); {len(sizes)} feeds: "
          f"{sum(1 for k in sizes if k == 1)} single tokens, {sum(1 for k in sizes if k > 1)} chunks of "
          f"{'/'.join(map(str, CHUNK_SIZES))}; reference: {checkpoint} (PyTorch, chunks of {args.ref_chunk}, "
          f"child process); torch imported here: {'torch' in sys.modules}", flush=True)
    print(f"{'tokens':>8} {'RSS MiB':>8} {'max RSS':>8} {'p50 ms':>7} {'p99 ms':>7} {'NLL':>6} {'chunks':>6}",
          flush=True)
    s = model.new_stream()
    rss_start = rss_bytes()
    t_all = time.perf_counter()
    pos = 0

    def check(at: int) -> None:
        nonlocal synced
        ref.send(("feed", ids[synced:at]))
        ref_s = ref.recv()
        synced = at
        ref.send(("state",))
        ref_pos, ref_state, ref_logits = ref.recv()
        assert ref_pos == s.position == at, (ref_pos, s.position, at)
        c = {"tokens": at, **compare(s, ref_state, ref_logits, model.manifest), "reference_s": ref_s}
        checks.append(c)
        kinds = ", ".join(f"{k} {v:.2e}" for k, v in c["by_kind"].items())
        print(f"  check at {at}: state max-abs {c['state_max_abs']:.3e} ({kinds}); last logits max-abs "
              f"{c['logits_max_abs']:.3e} {'ok' if c['state_max_abs'] <= args.tol else 'FAIL'}", flush=True)

    for k in sizes:
        piece = ids[pos:pos + k]
        if k == 1:
            if s.last_logits is not None:
                z = s.last_logits.astype(np.float64)
                m = z.max()
                nll[pos] = m + np.log(np.exp(z - m).sum()) - z[piece[0]]
            t0 = time.perf_counter()
            s.feed(piece)
            lat[pos] = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            s.feed(piece)
            chunk_time += time.perf_counter() - t0
            chunk_tokens += k
            chunk_steps += 1
        pos += k
        if pos >= next_rss:
            rss_samples[n_rss], rss_pos[n_rss] = rss_bytes(), pos
            n_rss += 1
            next_rss = (pos // 1000 + 1) * 1000
        if pos >= next_report or pos == N:
            lo = next_report - R if pos >= next_report else (pos // R) * R
            block = lat[lo:pos]
            block = block[~np.isnan(block)] * 1e3
            window = rss_samples[:n_rss][rss_pos[:n_rss] > lo]
            row = {"tokens": pos, "rss_mib": rss_samples[n_rss - 1] / MIB,
                   "max_rss_mib": float(window.max() / MIB) if window.size else None,
                   "p50_ms": float(np.percentile(block, 50)), "p99_ms": float(np.percentile(block, 99)),
                   "nll": float(np.nanmean(nll[lo:pos])), "chunk_steps_total": chunk_steps}
            rows.append(row)
            print(f"{pos:>8} {row['rss_mib']:>8.1f} {row['max_rss_mib']:>8.1f} {row['p50_ms']:>7.3f} "
                  f"{row['p99_ms']:>7.3f} {row['nll']:>6.3f} {chunk_steps:>6}", flush=True)
            while next_report <= pos:
                next_report += R
        if pos >= next_check or pos == N:
            check(pos)
            while next_check <= pos:
                next_check += args.check_every
    wall = time.perf_counter() - t_all

    # ---- verdict ----------------------------------------------------------------------------------------
    rs, rp = rss_samples[:n_rss], rss_pos[:n_rss]
    warm_idx = int(np.searchsorted(rp, R, side="left"))                  # first sample at >= R tokens
    rss_warm = rs[warm_idx]
    growth = float((rs[warm_idx:].max() - rss_warm) / MIB)
    first = lat[:R][~np.isnan(lat[:R])] * 1e3
    last = lat[N - R:][~np.isnan(lat[N - R:])] * 1e3
    drift = float(np.percentile(last, 50) / np.percentile(first, 50))
    worst = max(c["state_max_abs"] for c in checks)
    ok_rss, ok_lat, ok_state = growth <= args.max_rss_growth_mib, drift <= args.max_latency_drift, worst <= args.tol
    result = {
        "artifact": str(artifact), "checkpoint": checkpoint, "tokens": N, "files": files, "feeds": len(sizes),
        "single_token_feeds": int(np.sum(~np.isnan(lat))), "chunk_feeds": chunk_steps, "chunk_tokens": chunk_tokens,
        "chunk_tok_s": chunk_tokens / chunk_time if chunk_time else None, "wall_s": wall,
        "rss_start_mib": rss_start / MIB, "rss_after_warmup_mib": float(rss_warm / MIB),
        "rss_end_mib": float(rs[-1] / MIB), "rss_max_growth_after_warmup_mib": growth,
        "latency_p50_first_ms": float(np.percentile(first, 50)), "latency_p50_last_ms": float(np.percentile(last, 50)),
        "latency_p99_first_ms": float(np.percentile(first, 99)), "latency_p99_last_ms": float(np.percentile(last, 99)),
        "latency_drift_p50": drift, "checks": checks, "state_max_abs_worst": worst, "tol": args.tol,
        "rows": rows, "rss_samples_mib": [[int(p), float(r / MIB)] for p, r in zip(rp, rs)],
        "torch_imported_in_runtime_process": "torch" in sys.modules,
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "verdict": {"flat_rss": ok_rss, "latency_flat": ok_lat, "state_matches": ok_state},
    }
    print(f"done: {N} tokens in {wall:.0f} s ({len(sizes)} feeds; chunks {chunk_steps} x, "
          f"{result['chunk_tok_s'] or 0:.0f} tok/s)")
    print(f"RSS: {rss_start / MIB:.1f} MiB after load, {rss_warm / MIB:.1f} MiB after {R} tokens of warm-up, "
          f"{rs[-1] / MIB:.1f} MiB at the end; max growth after warm-up {growth:+.2f} MiB "
          f"(allowed {args.max_rss_growth_mib}) -> {'FLAT' if ok_rss else 'GROWING'}")
    print(f"latency (single-token feeds): p50 {result['latency_p50_first_ms']:.3f} ms first {R} vs "
          f"{result['latency_p50_last_ms']:.3f} ms last {R} tokens (x{drift:.3f}; allowed x{args.max_latency_drift}); "
          f"p99 {result['latency_p99_first_ms']:.3f} vs {result['latency_p99_last_ms']:.3f} ms "
          f"-> {'FLAT' if ok_lat else 'DRIFTING'}")
    print("state vs PyTorch: " + ", ".join(f"{c['tokens']}: {c['state_max_abs']:.2e}" for c in checks)
          + f" (worst {worst:.2e}, tol {args.tol}) -> {'MATCH' if ok_state else 'MISMATCH'}")
    kinds = sorted({k for c in checks for k in c["by_kind"]})
    worst_kind = {k: max(c["by_kind"][k] for c in checks) for k in kinds}
    result["state_max_abs_worst_by_kind"] = worst_kind
    print("worst per state kind: " + ", ".join(f"{k} {v:.2e}" for k, v in worst_kind.items())
          + f"; last logits worst {max(c['logits_max_abs'] for c in checks):.2e}")
    verdict = ok_rss and ok_lat and ok_state
    print(f"verdict: {'PASS' if verdict else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
