"""Load on a Triton Inference Server: N concurrent streams against the local runtime, in one run.

    python -m samba_edge.bench.serve_load [--artifact DIR] [--streams 1,4,16,64] [--tokens 32]
        [--prompt-tokens 16] [--server HOST:PORT --model NAME] [--json F.json]

Without --server it writes a python-backend repository for the artifact (default: the shipped model's
cached export) with --max-batch the largest N, starts a real tritonserver on loopback ports
(`samba-edge serve`'s), and stops it at the end. For each N: N client threads, each one remote stream
(a random prompt, then greedy decode of --tokens tokens), all started together. Reported per N:

* aggregate decode tokens/s (all streams' tokens / the wall time of the decode phase);
* p50 / p99 per-token latency (the time between a stream's consecutive tokens);
* the batch sizes the server formed (from its statistics API, this N's requests only);
* the local runtime on the same artifact in the same process: N streams advanced together with one
  `Model.step` per token (what the server's model does), tokens/s and per-token latency.

Figures depend on the machine: quote ratios within one run (docs/serving.md).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _batch_stats(client, name: str) -> dict[int, int]:
    stats = client.get_inference_statistics(name).model_stats
    return {b.batch_size: b.compute_infer.count for s in stats for b in s.batch_stats}


def remote_load(url: str, name: str, n: int, prompts: list, tokens: int) -> dict:
    import tritonclient.grpc as g

    from samba_edge.runtime import SamplingParams
    from samba_edge.runtime.remote import connect

    model = connect(url, name)
    params = SamplingParams(max_new_tokens=tokens)
    gaps: list[list[float]] = [[] for _ in range(n)]
    counts = [0] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)
    streams = [model.new_stream() for _ in range(n)]

    def run(i: int) -> None:
        try:
            s = streams[i]
            s.feed(prompts[i], params)                 # prefill (and the first draw) before the clock
            barrier.wait()
            t = time.perf_counter()
            for _ in s.generate_ids(params):
                now = time.perf_counter()
                gaps[i].append(now - t)
                t = now
                counts[i] += 1
            s.close()
        except BaseException as e:  # noqa: BLE001 - reported after the run
            errors.append(e)
            barrier.abort()
    client = g.InferenceServerClient(url)
    before = _batch_stats(client, name)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        for t in threads:
            t.join()
        raise errors[0] from None
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    after = _batch_stats(client, name)
    batches = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) - before.get(b, 0)}
    lat = np.concatenate([np.asarray(x) for x in gaps]) * 1e3
    executions = sum(batches.values())
    return {"tok_s": sum(counts) / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "batches": {str(k): v for k, v in sorted(batches.items())},
            "mean_batch": sum(b * c for b, c in batches.items()) / executions if executions else 0.0}


def local_load(artifact: str, n: int, prompts: list, tokens: int, threads=None) -> dict:
    """The same work in-process: N streams, one batched Model.step per token (greedy)."""
    from samba_edge.runtime import open_model

    model = open_model(artifact, "ort", threads)
    streams = [model.new_stream() for _ in range(n)]
    nxt = [int(np.argmax(s.feed(p))) for s, p in zip(streams, prompts)]
    gaps = []
    t0 = t = time.perf_counter()
    for _ in range(tokens):
        logits = model.step(streams, [[x] for x in nxt])
        nxt = [int(np.argmax(lg)) for lg in logits]
        now = time.perf_counter()
        gaps.append(now - t)
        t = now
    wall = time.perf_counter() - t0
    lat = np.asarray(gaps) * 1e3
    return {"tok_s": n * tokens / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", help="an exported artifact (default: the shipped model's cached export)")
    ap.add_argument("--streams", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--server", help="HOST:PORT of a running server (else one is started here)")
    ap.add_argument("--model", default="samba")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads (the served model and the local runtime)")
    ap.add_argument("--queue-delay-ms", type=float, help="the repository's batching delay (default: samba-edge "
                    "triton's, from the model's size)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    ns = [int(x) for x in a.streams.split(",")]
    if a.artifact is None:
        from samba_edge.runtime.session import cached_export

        a.artifact = str(cached_export("builtin:samba-tiny-py"))
    from samba_edge.runtime.manifest import Manifest

    vocab = Manifest.load(a.artifact).vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, a.prompt_tokens).tolist() for _ in range(max(ns))]
    server = None
    if a.server is None:
        from samba_edge.runtime.errors import SambaEdgeError
        from samba_edge.tools.serve import TritonServer, find_server, setup_server_env
        from samba_edge.tools.triton_repo import write_repository

        try:
            find_server()
        except SambaEdgeError:
            setup_server_env()                          # once: ~/.cache/samba-edge/triton-env

        work = Path(tempfile.mkdtemp(prefix="serve-load-"))
        write_repository(a.artifact, work / "repo", a.model, "python", max_batch=max(ns), threads=a.threads,
                         queue_delay_ms=a.queue_delay_ms)
        server = TritonServer(work / "repo", log=(work / "server.log").open("w")).start()
        a.server = server.grpc_url
    rows = []
    try:
        for n in ns:
            r = remote_load(a.server, a.model, n, prompts[:n], a.tokens)
            loc = local_load(a.artifact, n, prompts[:n], a.tokens, a.threads)
            rows.append({"streams": n, "server": r, "local": loc})
            print(f"{n:>3} streams: server {r['tok_s']:8.1f} tok/s (p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                  f"mean batch {r['mean_batch']:.1f}) | local {loc['tok_s']:8.1f} tok/s (p50 {loc['p50_ms']:.1f} ms)",
                  flush=True)
    finally:
        if server is not None:
            server.stop()
    print("\n| streams | server tok/s | p50 ms/token | p99 ms/token | batches formed: mean (largest) | local tok/s | "
          "local p50 ms | server / local |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        r, loc = row["server"], row["local"]
        largest = max(map(int, r["batches"]), default=0)
        print(f"| {row['streams']} | {r['tok_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['mean_batch']:.1f} ({largest}) | {loc['tok_s']:.1f} | {loc['p50_ms']:.1f} | "
              f"{r['tok_s'] / loc['tok_s']:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps({"artifact": a.artifact, "tokens": a.tokens,
                                            "prompt_tokens": a.prompt_tokens, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
