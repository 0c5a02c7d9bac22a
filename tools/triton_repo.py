"""`samba-edge triton`: an artifact or engine -> a Triton Inference Server model repository.

Everything comes from the manifest (the one table): the state pairs, their shapes and dtypes, the vocab.

    --backend python       REPO/NAME/1/model.py wraps samba_edge.runtime (runtime/triton_model.py); the
                           artifact (ORT, either flavour) or engine (TensorRT, any plugin route) is copied
                           into REPO/NAME/1/artifact; the model keeps each sequence's state itself
    --backend onnxruntime  REPO/NAME/1/model.onnx = the serving graph (export/serving_graph.py); the server
                           keeps the state (implicit state, zero initial state, the position included)
    --backend tensorrt     REPO/NAME/1/model.plan = an engine built from the serving graph (needs TensorRT
                           here, i.e. on the machine that serves); the same implicit-state config

All three use the sequence batcher (`oldest`: the requests of one batch come from distinct sequences)
with START / END / CORRID controls and an idle timeout. Written atomically (temp dir, then rename).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.manifest import Manifest

BACKENDS = ("python", "onnxruntime", "tensorrt")
TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
STEP_BANDWIDTH = {"cpu": 20e9, "gpu": 200e9}   # bytes/s a decode step streams its weights at, for the estimate


def auto_queue_delay_ms(weight_bytes: int, device: str) -> float:
    """5% of a decode step's estimated time (its weights read once), within 0.5..10 ms: long enough for the
    sequences answered together to come back as one batch (bench/serve_load.py: at 421M on CPU, 4 streams
    batch fully with 5 ms and not with 1 ms), short enough not to matter to one stream."""
    return round(min(10.0, max(0.5, 0.05 * weight_bytes / STEP_BANDWIDTH[device] * 1e3)), 2)
MODEL_PY = "from samba_edge.runtime.triton_model import TritonPythonModel  # noqa: F401  (samba-edge triton)\n"


def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def _tensor(name: str, dtype: str, dims, optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(dims)}{opt} }}'


def _controls(names: tuple) -> str:
    kinds = {"START": "CONTROL_SEQUENCE_START", "END": "CONTROL_SEQUENCE_END", "READY": "CONTROL_SEQUENCE_READY"}
    out = []
    for n in names:
        if n == "CORRID":
            out.append('    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }')
        else:
            out.append(f'    {{ name: "{n}" control [ {{ kind: {kinds[n]} int32_false_true: [ 0, 1 ] }} ] }}')
    return ",\n".join(out)


def config_pbtxt(manifest: Manifest, name: str, backend: str, max_batch: int = 8, instances: int = 1,
                 idle_seconds: float = 60, sampling: str = "server", gpu: bool = False,
                 parameters: Optional[dict] = None, queue_delay_ms: float = 1.0) -> str:
    """config.pbtxt for one of BACKENDS."""
    vocab = manifest.vocab_size
    lines = [f'name: "{name}"']
    lines.append({"python": 'backend: "python"', "onnxruntime": 'platform: "onnxruntime_onnx"',
                  "tensorrt": 'platform: "tensorrt_plan"'}[backend])
    lines.append(f"max_batch_size: {max_batch}")
    logits_type = TYPES["float32"] if backend == "python" else TYPES[manifest.outputs[0].dtype]
    outputs = [_tensor("logits", logits_type, [vocab])]
    if sampling == "server":
        outputs.append(_tensor("next_token", "TYPE_INT64", [1]))
    if backend == "python":
        inputs = [_tensor("input_ids", "TYPE_INT64", [-1]),
                  _tensor("temperature", "TYPE_FP32", [1], True), _tensor("top_k", "TYPE_INT32", [1], True),
                  _tensor("top_p", "TYPE_FP32", [1], True), _tensor("repetition_penalty", "TYPE_FP32", [1], True),
                  _tensor("seed", "TYPE_INT64", [1], True), _tensor("snapshot_in", "TYPE_STRING", [1], True),
                  _tensor("want_snapshot", "TYPE_BOOL", [1], True)]
        outputs += [_tensor("position", "TYPE_INT64", [1]), _tensor("live_sequences", "TYPE_INT32", [1]),
                    _tensor("snapshot", "TYPE_STRING", [1])]
        controls, state = ("START", "END", "CORRID"), []
    else:
        from samba_edge.export.serving_graph import CONTROLS, POSITION

        inputs = [_tensor("input_ids", "TYPE_INT64", [-1])]
        controls = CONTROLS
        zero = "initial_state: {{ data_type: {t} dims: {d} zero_data: true name: \"zeros\" }}"
        state = [(POSITION[0], POSITION[1], "TYPE_INT64", [1])] + \
                [(s.name, s.output, TYPES[s.dtype], s.shape) for s in manifest.state]
        state = [f'    {{ input_name: "{i}" output_name: "{o}" data_type: {t} dims: {_dims(d)}\n      '
                 + zero.format(t=t, d=_dims(d)) + " }" for i, o, t, d in state]
    lines.append("input [\n" + ",\n".join(inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(outputs) + "\n]")
    seq = [f"  max_sequence_idle_microseconds: {int(idle_seconds * 1e6)}",
           f"  oldest {{ max_candidate_sequences: {max(4 * max_batch, 16)} preferred_batch_size: [ {max_batch} ] "
           f"max_queue_delay_microseconds: {int(queue_delay_ms * 1000)} }}",
           "  control_input [\n" + _controls(controls) + "\n  ]"]
    if state:
        seq.append("  state [\n" + ",\n".join(state) + "\n  ]")
    lines.append("sequence_batching {\n" + "\n".join(seq) + "\n}")
    lines.append(f"instance_group [ {{ count: {instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]")
    for k, v in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}')
    return "\n".join(lines) + "\n"


def _serving_engine(artifact: Path, version: Path, max_batch: int, sampling: str) -> None:
    """model.plan: the serving graph built by `samba-edge build`'s builder (plugin flavour: aot_impl only)."""
    from samba_edge.plugins.trt_import import import_trt
    from samba_edge.tools.build_engine import ENGINE_FILE, ENGINE_JSON, build_engine

    _, info = import_trt()
    if info.flavor != "tensorrt":
        raise SambaEdgeError(f"Triton's tensorrt backend runs TensorRT engines; this machine has {info.flavor} "
                             f"{info.version}, whose engines it cannot load: run this command on the serving machine "
                             "with TensorRT installed (or use --backend onnxruntime / python)")
    built = build_engine(artifact, version / "engine", max_batch=max_batch, serving=sampling)
    os.replace(built / ENGINE_FILE, version / "model.plan")
    os.replace(built / ENGINE_JSON, version.parent / "engine.json")      # what was built, for the record
    shutil.rmtree(built)


def write_repository(source: str | Path, out: str | Path, name: str = "samba", backend: str = "python",
                     max_batch: int = 8, instances: int = 1, idle_seconds: float = 60, sampling: str = "server",
                     threads: Optional[int] = None, force: bool = False,
                     queue_delay_ms: Optional[float] = None) -> Path:
    """Write (or, with force, replace) the model NAME in repository OUT; returns the model's directory."""
    from samba_edge.runtime.atomic import atomic_dir, link_or_copy
    from samba_edge.runtime.integrity import graph_files

    source = Path(source)
    if backend not in BACKENDS:
        raise SambaEdgeError(f"unknown --backend {backend!r}; use one of: {', '.join(BACKENDS)}")
    if sampling not in ("server", "client"):
        raise SambaEdgeError(f"--sampling must be server or client, got {sampling!r}")
    if not name or Path(name).name != name or name.startswith("."):
        raise SambaEdgeError(f"--name {name!r} is not a model name (one path component)")
    for flag, v, lo in (("--max-batch", max_batch, 1), ("--instances", instances, 1),
                        *((("--threads", threads, 1),) if threads is not None else ())):
        if not isinstance(v, int) or v < lo:
            raise SambaEdgeError(f"{flag} must be an integer >= {lo}, got {v!r}")
    if queue_delay_ms is not None and not 0 <= queue_delay_ms <= 1000:
        raise SambaEdgeError(f"--queue-delay-ms must be in 0..1000, got {queue_delay_ms!r}")
    if not idle_seconds > 0:
        raise SambaEdgeError(f"--idle-seconds must be > 0, got {idle_seconds!r}")
    is_engine = (source / "engine.json").is_file()
    if not is_engine and not (source / "manifest.json").is_file():
        raise SambaEdgeError(f"{source} is neither an exported artifact (manifest.json) nor an engine directory "
                             "(engine.json); make one with `samba-edge export` or `samba-edge build`")
    if is_engine:
        from samba_edge.runtime.engine_dir import check_engine_dir

        meta, manifest = check_engine_dir(source)
        route = meta.get("plugin_route")
        if backend != "python":
            raise SambaEdgeError(
                f"{source} is an engine built from the step graph; Triton's {backend} backend serves the serving "
                f"graph instead: pass the artifact it was built from with --backend {backend}, or serve this "
                "engine with --backend python")
    else:
        manifest, route = Manifest.load(source), None
    if queue_delay_ms is None:
        weights = (source / "engine.plan") if is_engine else None
        size = weights.stat().st_size if weights is not None and weights.is_file() else sum(
            p.stat().st_size for p in graph_files(source, manifest.onnx_file))
        queue_delay_ms = auto_queue_delay_ms(size, "gpu" if is_engine or backend == "tensorrt" else "cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / name
    with atomic_dir(model_dir, force) as tmp:
        version = tmp / "1"
        version.mkdir()
        params = {}
        if backend == "python":
            shutil.copytree(source, version / "artifact", copy_function=link_or_copy)
            (version / "model.py").write_text(MODEL_PY)
            params = {"artifact": "artifact", "runtime_backend": "trt" if is_engine else "ort",
                      "idle_seconds": f"{idle_seconds:g}", "sampling": sampling, "threads": str(threads or 0)}
        elif backend == "onnxruntime":
            from samba_edge.export.serving_graph import save_serving_graph, serving_graph

            save_serving_graph(serving_graph(source, sampling), source, version)
        else:
            _serving_engine(source, version, max_batch, sampling)
        (tmp / "config.pbtxt").write_text(config_pbtxt(
            manifest, name, backend, max_batch, instances, idle_seconds, sampling,
            gpu=is_engine or backend == "tensorrt", parameters=params, queue_delay_ms=queue_delay_ms))
        (tmp / "samba-edge.json").write_text(json.dumps(
            {"source": str(source.resolve()), "backend": backend, "sampling": sampling, "route": route,
             "vocab_size": manifest.vocab_size, "max_chunk": manifest.max_chunk, "queue_delay_ms": queue_delay_ms,
             "fingerprint": manifest.fingerprint}, indent=2) + "\n")
    return model_dir
