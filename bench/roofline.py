"""CPU speed at the real shape against this machine's own limits, in one run (issue 17's table).

    python -m samba_edge.bench.roofline [--config Samba_421M] [--work DIR] [--threads 1,2]
        [--kinds fp32-portable,fp32-plugin,fp16,int8] [--decode-tokens 24] [--json F.json] [--plot F.png]

Makes (once, in --work) a random-weight checkpoint of the shape and its artifacts: fp32 portable and
plugin, fp16 (plugin flavour) and int8 (`calibrate` on the fp32 plugin export with its default settings,
its peak RSS measured). Then, per thread count, measures in the same run:

* bandwidth: a numpy copy of 1 GiB split over the threads, best of 5, counted read + write (the
  figure a weight-streaming decode is bounded by);
* roofline decode tok/s = bandwidth / weight bytes read per token (every GEMM weight once, the
  embedding table one row; from the graph's own initializers, so int8 counts its int8 bytes);
* the GEMMs alone: an ONNX Runtime graph of exactly the model's weight GEMMs (the same shapes, the
  same thread count) at 1 row (decode) and at 256 rows (prefill): the ceiling the model's
  prefill is compared with;
* each artifact through the streaming runtime (tools/bench.py's worker: prefill 2 chunks of the max
  chunk, then single-token decode with sampling), the time inside the graph and outside it;
* PyTorch eager (the runtime's torch backend on the checkpoint).

Every run is its own process. Nothing is hard-coded: every figure comes from this run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

KINDS = ("fp32-portable", "fp32-plugin", "fp16", "int8")
MIB = 2 ** 20


# ---- artifacts ------------------------------------------------------------------------------------------
_CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
t = time.perf_counter()
if spec["do"] == "export":
    from samba_edge.export.onnx_export import export_onnx
    export_onnx(spec["ck"], spec["out"], flavor=spec["flavor"], dtype=spec["dtype"], force=True,
                kernel_archs="75" if spec["flavor"] == "plugin" else None)
else:
    from samba_edge.calibration.int8 import calibrate
    calibrate(spec["src"], spec["out"], token_ids=spec["ids"], force=True, progress=False)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0] * 1024
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": hwm / 2**20}))
"""


def _child(spec: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        sys.exit(f"{spec['do']} {spec['out']} failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def prepare(work: Path, config: str, kinds) -> tuple[Path, dict, dict]:
    """The checkpoint and each artifact (made once); returns (checkpoint, {kind: dir}, {kind: make record})."""
    from samba_edge.bench.export_scale import make_checkpoint

    ck = work / "checkpoint"
    if not (ck / "config.json").is_file():
        make_checkpoint(config, ck)
    made, dirs = {}, {}
    plan = {"fp32-portable": ("portable", "fp32"), "fp32-plugin": ("plugin", "fp32"), "fp16": ("plugin", "fp16")}
    for kind in kinds:
        out = work / kind
        dirs[kind] = out
        if (out / "manifest.json").is_file():
            continue
        if kind == "int8":
            src = prepare(work, config, ["fp32-plugin"])[1]["fp32-plugin"]     # the flavour TensorRT builds
            ids = work / "calib_ids.npy"
            from samba_edge.runtime.manifest import Manifest

            vocab = Manifest.load(src).vocab_size
            np.save(ids, np.random.default_rng(0).integers(0, vocab, 64 * 256))   # 64 samples x 256, the defaults
            made[kind] = _child({"do": "calibrate", "src": str(src), "out": str(out), "ids": str(ids)})
        else:
            flavor, dtype = plan[kind]
            made[kind] = _child({"do": "export", "ck": str(ck), "out": str(out), "flavor": flavor, "dtype": dtype})
        print(f"made {kind}: {made[kind]['seconds']:.0f} s, peak RSS {made[kind]['peak_rss_mib']:.0f} MiB", flush=True)
    return ck, dirs, made


def weight_bytes_per_token(artifact: Path) -> int:
    """Bytes of initializers a one-token step reads: each once, except tables only gathered from (one row)."""
    import onnx

    g = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    size = {i.name: (int(np.prod(i.dims)) if i.dims else 1) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
            for i in g.initializer}
    rows = {i.name: int(np.prod(i.dims[1:])) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
            for i in g.initializer if len(i.dims) == 2}
    users: dict[str, set] = {}
    for n in g.node:
        for x in n.input:
            if x in size:
                users.setdefault(x, set()).add(n.op_type)
    return sum(rows[k] if users.get(k) == {"Gather"} and k in rows else v for k, v in size.items() if k in users)


# ---- the machine's limits ---------------------------------------------------------------------------------
def bandwidth_gb_s(threads: int, nbytes: int = 2 ** 30, repeats: int = 5) -> float:
    """Read + write bytes per second of numpy copies of 1 GiB split over `threads` (numpy releases the GIL)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(p[0], p[-1] + 1) for p in parts]

    def copy(lo, hi):
        np.copyto(dst[lo:hi], src[lo:hi])

    best = float("inf")
    for _ in range(repeats):
        ts = [threading.Thread(target=copy, args=b) for b in bounds]
        t = time.perf_counter()
        for x in ts:
            x.start()
        for x in ts:
            x.join()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


_GEMMS = r"""
import json, sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
from samba_edge.calibration.int8 import gemm_labels
spec = json.loads(sys.argv[1])
proto = onnx.load(spec["artifact"] + "/model.onnx", load_external_data=False)
shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
prod = {o: n for n in proto.graph.node for o in n.output}
labels = gemm_labels(proto, json.load(open(spec["artifact"] + "/manifest.json"))["model"])
dims = []
for n in proto.graph.node:
    if n.name in labels:
        w = n.input[1]
        dims.append(shapes[w] if w in shapes else shapes[prod[w].input[0]][::-1])   # the tied head: wte^T
ins, nodes, outs, inits, so = {}, [], [], [], ort.SessionOptions()
so.intra_op_num_threads = spec["threads"]
rng = np.random.default_rng(0)
names, values = [], []
for i, (k, m) in enumerate(dims):
    ins.setdefault(k, helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["r", k]))
    t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[k, m], data_location=TensorProto.EXTERNAL)
    for key, v in (("location", "memory"), ("offset", "0"), ("length", str(4 * k * m))):
        t.external_data.add(key=key, value=v)
    inits.append(t)                  # real initializers (ORT prepacks them, as in the model), data from memory
    names.append(t.name)
    values.append(ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((k, m), dtype=np.float32) * 0.02))
    nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
    outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["r", m]))
so.add_external_initializers(names, values)
m = helper.make_model(helper.make_graph(nodes, "gemms", list(ins.values()), outs, initializer=inits),
                      opset_imports=[helper.make_opsetid("", 18)])
sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
res = {"gemms": len(dims), "weight_bytes": sum(4 * k * n for k, n in dims)}
for rows in (1, spec["prefill_rows"]):
    feed = {f"x{k}": rng.standard_normal((rows, k), dtype=np.float32) for k in ins}
    sess.run(None, feed)
    ts = []
    for _ in range(5 if rows == 1 else 3):
        t = time.perf_counter(); sess.run(None, feed); ts.append(time.perf_counter() - t)
    res[f"rows{rows}_s"] = float(np.median(ts))
print("RESULT " + json.dumps(res))
"""


def gemms_alone(artifact: Path, threads: int, prefill_rows: int) -> dict:
    r = subprocess.run([sys.executable, "-c", _GEMMS, json.dumps({"artifact": str(artifact), "threads": threads,
                                                                  "prefill_rows": prefill_rows})],
                       capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        sys.exit(f"the GEMM-alone measurement failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


# ---- the systems ------------------------------------------------------------------------------------------
def stream_run(path: Path, backend: str, threads: int, chunk: int, decode_tokens: int) -> dict:
    """tools/bench.py's worker: prefill 2 chunks of `chunk`, then `decode_tokens` sampled tokens."""
    from samba_edge.tools.bench import _run_worker

    return _run_worker({"system": "artifact" if backend == "ort" else "torch", "context": 2 * chunk,
                        "decode_tokens": decode_tokens, "chunk": chunk, "seed": 0, "threads": threads,
                        "path": str(path), "backend": backend, "sample": True})


def state_bytes_written(artifact: Path) -> int:
    """Bytes of state a one-token call writes (batch 1) as the runtime runs the artifact on ONNX Runtime: every
    state output in the manifest's shape, except the windows kept as rings (one new row each)."""
    from samba_edge.runtime.backends import ring_states
    from samba_edge.runtime.manifest import Manifest

    man = Manifest.load(artifact)
    rings = ring_states(man)
    total = 0
    for i, s in enumerate(man.state):
        shape = list(s.shape)
        if i in rings:
            shape[1] = 1                         # (G, 1 row, hs): the new key/value only
        total += int(np.prod(shape)) * np.dtype(s.dtype).itemsize
    return total


def run(work: Path, config: str, kinds, threads_list, decode_tokens: int) -> dict:
    ck, dirs, made = prepare(work, config, kinds)
    from samba_edge.runtime.manifest import Manifest

    chunk = Manifest.load(dirs[kinds[0]]).max_chunk
    res = {"config": config, "kinds": list(kinds), "threads": list(threads_list), "decode_tokens": decode_tokens,
           "prefill_chunk": chunk, "made": made, "machine": {"cpu_count": os.cpu_count(),
                                                             "loadavg_before": os.getloadavg()},
           "weight_bytes": {k: weight_bytes_per_token(d) for k, d in dirs.items()},
           "state_bytes_written": {k: state_bytes_written(d) for k, d in dirs.items()},
           "per_threads": {}}
    for t in threads_list:
        row = {"bandwidth_gb_s": bandwidth_gb_s(t)}
        row["gemms"] = gemms_alone(dirs[kinds[0]], t, chunk)
        row["torch"] = stream_run(ck, "torch", t, chunk, max(4, decode_tokens // 3))
        for k in kinds:
            row[k] = stream_run(dirs[k], "ort", t, chunk, decode_tokens)
            print(f"threads {t} {k}: decode {row[k]['decode_tok_s']:.2f} tok/s, prefill {row[k]['prefill_tok_s']:.0f}",
                  flush=True)
        res["per_threads"][str(t)] = row
    res["machine"]["loadavg_after"] = os.getloadavg()
    return res


# ---- the table --------------------------------------------------------------------------------------------
def render(res: dict) -> str:
    lines = [f"{res['config']}, batch 1, ONNX Runtime CPU; roofline = copy bandwidth / weight bytes per token; "
             f"prefill at chunk {res['prefill_chunk']} vs the same GEMMs alone",
             "| artifact | threads | decode tok/s | of roofline | x eager | prefill tok/s | of GEMMs alone | "
             "weights MiB/token | state MiB written/token | outside graph ms (% of step) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t, row in res["per_threads"].items():
        bw, g = row["bandwidth_gb_s"], row["gemms"]
        gemm_prefill = res["prefill_chunk"] / g[f"rows{res['prefill_chunk']}_s"]
        eager = row["torch"]["decode_tok_s"]
        for k in res["kinds"]:
            r, wb = row[k], res["weight_bytes"][k]
            roof = bw * 1e9 / wb
            step_ms = r["latency_ms_mean"]
            lines.append(f"| {k} | {t} | {r['decode_tok_s']:.2f} | {r['decode_tok_s'] / roof:.0%} | "
                         f"{r['decode_tok_s'] / eager:.2f}x | {r['prefill_tok_s']:.0f} | "
                         f"{r['prefill_tok_s'] / gemm_prefill:.0%} | {wb / MIB:.0f} | "
                         f"{res['state_bytes_written'][k] / MIB:.1f} | {r['outside_graph_ms_mean']:.1f} "
                         f"({r['outside_graph_ms_mean'] / step_ms:.0%}) |")
        lines.append(f"| PyTorch eager | {t} | {eager:.2f} | | 1.00x | {row['torch']['prefill_tok_s']:.0f} | | | | |")
        lines.append(f"| (machine) | {t} | roofline fp32 {bw * 1e9 / res['weight_bytes'][res['kinds'][0]]:.1f} | "
                     f"copy {bw:.1f} GB/s | | GEMMs alone {gemm_prefill:.0f} | | "
                     f"GEMMs alone decode {1 / g['rows1_s']:.1f} tok/s | | |")
    for k, m in res["made"].items():
        lines.append(f"made {k}: {m['seconds']:.0f} s, peak RSS {m['peak_rss_mib']:.0f} MiB")
    lines.append(f"load average before/after: {res['machine']['loadavg_before'][0]:.2f} / "
                 f"{res['machine']['loadavg_after'][0]:.2f}")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (len(res["kinds"]) + 1)
    for i, (t, row) in enumerate(res["per_threads"].items()):
        for j, k in enumerate(res["kinds"] + ["torch"]):
            ax.bar(i + j * width, row[k]["decode_tok_s"], width, label=k if i == 0 else None, color=f"C{j}")
            if k != "torch":
                roof = row["bandwidth_gb_s"] * 1e9 / res["weight_bytes"][k]
                ax.plot([i + j * width - width / 2, i + j * width + width / 2], [roof, roof], "k-", lw=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(res["per_threads"]))],
                  [f"{t} thread(s)" for t in res["per_threads"]])
    ax.set_ylabel("decode tok/s (black: memory roofline)")
    ax.set_title(f"{res['config']} decode on CPU, batch 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="Samba_421M")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SAMBA_EDGE_CACHE", Path.home() / ".cache/samba-edge"))
                    / "roofline")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--plot")
    ap.add_argument("--prepare-only", action="store_true", help="make the checkpoint and artifacts, measure nothing")
    a = ap.parse_args(argv)
    kinds = [k for k in a.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        sys.exit(f"error: unknown kind(s) {bad}; use {', '.join(KINDS)}")
    work = a.work / a.config
    work.mkdir(parents=True, exist_ok=True)
    if a.prepare_only:
        prepare(work, a.config, kinds)
        return 0
    res = run(work, a.config, kinds, [int(x) for x in a.threads.split(",")], a.decode_tokens)
    print(render(res))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1) + "\n")
    if a.plot:
        plot(res, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
