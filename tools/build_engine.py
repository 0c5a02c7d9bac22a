"""`samba-edge build`: an exported artifact -> a TensorRT engine (engine.plan + engine.json).

Reads manifest.json (never re-derives graph facts), registers the samba.* plugins for the plugin
flavour, parses model.onnx with TensorRT's OnnxParser into a strongly typed network (TensorRT-RTX
always is; real TensorRT gets NetworkDefinitionCreationFlag.STRONGLY_TYPED) and builds two
optimisation profiles: 0 = decode (seq 1), 1 = prefill (seq 1..max_chunk, opt max_chunk/2); batch
1..max_batch everywhere (opt 1), state inputs with the same dynamic batch. Writes atomically.

Works with real TensorRT (x86 10.x/11.x, Jetson JetPack 6/7: build on the board) and with
TensorRT-RTX, which builds on a CPU-only machine (a structural check: it cannot run the engine).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.manifest import Manifest

ENGINE_FILE = "engine.plan"
ENGINE_JSON = "engine.json"
TARGETS = ("x86", "jetson-orin", "jetson-thor")
# Jetson memory is shared between CPU and GPU: cap the builder's scratch memory by default.
PRESETS = {
    "x86": {"workspace": None, "tactic_dram": None},
    "jetson-orin": {"workspace": 1 << 30, "tactic_dram": 1 << 30},
    "jetson-thor": {"workspace": 4 << 30, "tactic_dram": 4 << 30},
}
ENGINE_FORMAT_VERSION = 1


def parse_size(text: str | int | None) -> Optional[int]:
    """'512M', '2G', '1048576' -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", str(text))
    if not m:
        raise SambaEdgeError(f"--workspace must be a size like 512M or 2G, got {text!r}")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _dim_values(spec_shape: list, batch: int, seq: int) -> tuple[int, ...]:
    out = []
    for d in spec_shape:
        if d == "batch":
            out.append(batch)
        elif d == "seq":
            out.append(seq)
        elif isinstance(d, str):
            raise SambaEdgeError(f"manifest has an unknown symbolic dimension {d!r}; re-export the artifact")
        else:
            out.append(int(d))
    return tuple(out)


def graph_inputs(manifest: Manifest, serving: bool = False) -> list:
    """The (name, shape) of the graph's inputs: the manifest's, or the serving graph's (start_pos replaced by
    the position state and the sequence batcher's controls; export/serving_graph.py)."""
    if not serving:
        return [(t.name, t.shape) for t in manifest.inputs]
    from samba_edge.export.serving_graph import CONTROLS, POSITION

    extra = [(POSITION[0], ["batch", 1])] + [(c, ["batch", 1]) for c in CONTROLS]
    return [(t.name, t.shape) for t in manifest.inputs[:1]] + extra + [(t.name, t.shape) for t in manifest.inputs[2:]]


def profile_table(manifest: Manifest, max_chunk: int, max_batch: int, serving: bool = False) -> list[dict[str, Any]]:
    """[{name, inputs: {tensor: {min, opt, max}}}] for the decode and prefill profiles."""
    profiles = []
    for name, (smin, sopt, smax) in (("decode", (1, 1, 1)), ("prefill", (1, max(1, max_chunk // 2), max_chunk))):
        shapes = {}
        for t_name, t_shape in graph_inputs(manifest, serving):
            if not any(isinstance(d, str) for d in t_shape):
                continue
            shapes[t_name] = {"min": list(_dim_values(t_shape, 1, smin)), "opt": list(_dim_values(t_shape, 1, sopt)),
                              "max": list(_dim_values(t_shape, max_batch, smax))}
        profiles.append({"name": name, "inputs": shapes})
    return profiles


def _make_progress_monitor(trt, show: bool):
    if not show or not hasattr(trt, "IProgressMonitor"):
        return None

    class Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.monotonic()

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                print(f"  [{time.monotonic() - self.t0:6.1f}s] {phase_name}", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            pass

    return Progress()


class _Logger:
    """TensorRT logger that keeps errors for a one-line report."""

    def __init__(self, trt, verbose: bool) -> None:
        base = trt.ILogger
        outer = self

        class L(base):
            def __init__(self) -> None:
                base.__init__(self)

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    outer.errors.append(str(msg).strip())
                if verbose or severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    print(f"  [trt] {msg}", file=sys.stderr)

        self.errors: list[str] = []
        self.logger = L()


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def build_engine(export_dir: str | Path, out: str | Path, max_chunk: Optional[int] = None, max_batch: int = 1,
                 workspace: str | int | None = None, opt_level: Optional[int] = None,
                 timing_cache: Optional[str] = None, target: str = "x86", force: bool = False,
                 progress: bool = True, verbose: bool = False, plugin_route: str = "auto",
                 serving: Optional[str] = None) -> Path:
    """Public entry of `samba-edge build`. Returns the engine directory.

    plugin_route (plugin flavour): python = the IPluginV3 plugins, whose enqueue runs in the process
    that runs the engine (samba-edge's runtime); aot = tensorrt.plugin aot_impl (TensorRT >= 10.9),
    kernels embedded in the engine, which then runs in trtexec / C++ without Python; auto = aot where
    available. serving ("server" | "client"): build the serving graph (export/serving_graph.py) instead of
    the step graph, for Triton's tensorrt backend."""
    from samba_edge.runtime.atomic import atomic_dir, check_output
    from samba_edge.plugins.trt_import import import_trt

    export_dir, out = Path(export_dir), Path(out)
    manifest = Manifest.load(export_dir)
    if target not in TARGETS:
        raise SambaEdgeError(f"unknown --target {target!r}; use one of: {', '.join(TARGETS)}")
    if plugin_route not in ("auto", "python", "aot"):
        raise SambaEdgeError(f"unknown --plugin-route {plugin_route!r}; use auto, python or aot")
    if manifest.flavor not in ("plugin", "portable"):
        raise SambaEdgeError(f"artifact flavour {manifest.flavor!r} cannot be built; re-export with "
                             "--flavor plugin (or portable)")
    max_chunk = manifest.max_chunk if max_chunk is None else int(max_chunk)
    if not 1 <= max_chunk <= manifest.max_chunk:
        raise SambaEdgeError(f"--max-chunk must be in 1..{manifest.max_chunk} (the artifact's max chunk), got {max_chunk}")
    if max_batch < 1:
        raise SambaEdgeError(f"--max-batch must be >= 1, got {max_batch}")
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise SambaEdgeError(f"--opt-level must be in 0..5, got {opt_level}")
    ws = parse_size(workspace)
    preset = PRESETS[target]
    if ws is None:
        ws = preset["workspace"]
    elif preset["workspace"] is not None and ws > preset["workspace"]:
        print(f"note: --workspace {ws >> 20} MiB is above the {target} preset's {preset['workspace'] >> 20} MiB",
              file=sys.stderr)
    onnx_path = export_dir / manifest.onnx_file
    if not onnx_path.exists():
        raise SambaEdgeError(f"{onnx_path} is missing; re-export the artifact")
    check_output(out, force)

    trt, info = import_trt()
    if target.startswith("jetson") and timing_cache is None:     # persisted across builds on the board
        from samba_edge.plugins.trt_import import cache_dir

        timing_cache = str(cache_dir() / "timing" / f"{target}-{info.flavor}-{info.version}.cache")
    route, sm = _register_plugins(plugin_route) if manifest.flavor == "plugin" else (None, None)
    if serving and route == "python":
        raise SambaEdgeError("Triton's tensorrt backend is a C++ server: it cannot load python-route plugins (their "
                             "enqueue is Python). It loads aot_impl engines, which carry their kernels (TensorRT >= "
                             "10.9 with tensorrt.plugin, on the serving GPU); or serve the engine with "
                             "`samba-edge triton ENGINE --backend python`, or export --flavor portable")
    graph = None
    if serving:
        from samba_edge.export.serving_graph import serving_graph

        graph = serving_graph(export_dir, serving, bodies=False)
    log = _Logger(trt, verbose)
    builder = trt.Builder(log.logger)
    flags = 0
    if route == "aot_impl" and hasattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    if info.flavor == "tensorrt":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):        # TRT 10 deprecates, 11 removes
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log.logger)
    t0 = time.monotonic()
    if progress:
        print(f"parsing {onnx_path} ({info.flavor} {info.version})", file=sys.stderr, flush=True)
    kernels_key = None
    if route is not None:                 # the plugin nodes as the parser must see them (plugins/trt_parser.py)
        graph, kernels_key = _plugin_graph(trt, info, export_dir, onnx_path, route, sm, graph)
        ok = parser.parse(graph, str(onnx_path))      # the path: external weights are read beside the file
    elif graph is not None:
        ok = parser.parse(graph.SerializeToString(), str(onnx_path))
    else:                                 # parse_from_file resolves external data (model.onnx.data) next to the file
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or log.errors or ["unknown parser error"]
        raise SambaEdgeError(f"TensorRT's ONNX parser rejected {onnx_path}: {_one_line(errs[0])}")
    t_parse = time.monotonic() - t0

    net_inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    missing = [name for name, _ in graph_inputs(manifest, bool(serving)) if name not in net_inputs]
    if missing:
        raise SambaEdgeError(f"model.onnx lacks manifest input(s) {', '.join(missing)}; re-export the artifact")

    config = builder.create_builder_config()
    if ws is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, ws)
    if preset["tactic_dram"] is not None and hasattr(trt.MemoryPoolType, "TACTIC_DRAM"):
        config.set_memory_pool_limit(trt.MemoryPoolType.TACTIC_DRAM, min(preset["tactic_dram"], ws or preset["tactic_dram"]))
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    monitor = _make_progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor
    cache = None
    if timing_cache and info.flavor == "tensorrt-rtx":
        timing_cache = None                # TensorRT-RTX: timing-cache calls are deprecated no-ops
    if timing_cache:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)

    profiles = profile_table(manifest, max_chunk, max_batch, bool(serving))
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, s in p["inputs"].items():
            prof.set_shape(name, s["min"], s["opt"], s["max"])
        index = config.add_optimization_profile(prof)
        if index < 0 or not prof:
            raise SambaEdgeError(f"TensorRT rejected the {p['name']} optimisation profile: "
                                 f"{_one_line('; '.join(log.errors) or 'invalid shapes')}")
        p["index"] = index
        # engine.json records what TensorRT holds (read back), not what we meant to set
        p["inputs"] = {name: dict(zip(("min", "opt", "max"), ([int(d) for d in dims] for dims in prof.get_shape(name))))
                       for name in p["inputs"]}

    t1 = time.monotonic()
    if progress:
        print(f"building ({len(profiles)} profiles, batch 1..{max_batch}, chunk 1..{max_chunk}, target {target})",
              file=sys.stderr, flush=True)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SambaEdgeError(f"TensorRT could not build the engine: {_one_line('; '.join(log.errors) or 'no reason given')}")
    t_build = time.monotonic() - t1

    def io(t):
        return {"name": t.name, "dtype": _np_dtype(trt, t.dtype), "shape": list(t.shape)}

    meta = {
        "engine_format_version": ENGINE_FORMAT_VERSION,
        "engine_file": ENGINE_FILE,
        "tensorrt": {"flavor": info.flavor, "version": info.version},
        "target": target,
        "gpu": _build_gpu(info),
        "plugin_route": route,
        "graph": f"serving ({serving} sampling)" if serving else "step",
        "kernels": kernels_key,                   # trt_launch.KernelSet.key the plugins serialized
        "artifact": {"path": str(export_dir.resolve()), "fingerprint": manifest.fingerprint,
                     "flavor": manifest.flavor, "dtype": manifest.dtype, "max_chunk": manifest.max_chunk},
        "plugins": [{"name": c["name"], "namespace": c["domain"], "version": c["plugin_version"]}
                    for c in manifest.custom_ops],
        "max_batch": max_batch, "max_chunk": max_chunk,
        "workspace": ws, "opt_level": opt_level,
        "profiles": profiles,
        "inputs": [io(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [io(network.get_output(i)) for i in range(network.num_outputs)],
        "network": network_summary(network),
        "build_seconds": {"parse": round(t_parse, 2), "build": round(t_build, 2)},
    }
    with atomic_dir(out, force) as tmp:
        (tmp / ENGINE_FILE).write_bytes(bytes(plan))
        (tmp / ENGINE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        # self-contained: the runtime needs the manifest, the tokenizer and (plugin flavour) the kernels
        shutil.copy2(export_dir / "manifest.json", tmp / "manifest.json")
        for name in [manifest.tokenizer, "kernels"]:
            src = export_dir / name if name else None
            if src is not None and src.exists():
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / name)
    if cache is not None and timing_cache:
        tc = Path(timing_cache)
        tc.parent.mkdir(parents=True, exist_ok=True)
        tmp_tc = tc.with_name(f".{tc.name}.{os.getpid()}")
        tmp_tc.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp_tc, tc)
    return out


def _register_plugins(plugin_route: str) -> tuple[str, Optional[str]]:
    """Register the samba.* plugins for one route (both claim samba::NAME version 1, so never both).
    Returns (route, the building GPU's sm_XX for the aot_impl route)."""
    from samba_edge.plugins.trt_qdp import aot_route_available, register_aot_plugins

    if plugin_route == "auto":
        plugin_route = "aot" if aot_route_available() else "python"
    if plugin_route == "aot":
        from samba_edge.plugins.cuda_probe import check_cuda

        if not aot_route_available():
            raise SambaEdgeError("--plugin-route aot needs TensorRT >= 10.9 with tensorrt.plugin (TensorRT-RTX and "
                                 "JetPack 6's TensorRT 10.3 have none); use --plugin-route python")

        sm = check_cuda()[2]
        if sm is None:
            raise SambaEdgeError("--plugin-route aot embeds PTX for the building GPU, and no GPU is visible; "
                                 "build on the target device (or use --plugin-route python)")
        register_aot_plugins(sm)
        return "aot_impl", sm
    from samba_edge.plugins.trt_plugins import register_plugins

    register_plugins()
    return "python", None


def _plugin_graph(trt, info, export_dir: Path, onnx_path: Path, route: str, sm: Optional[str],
                  proto=None) -> tuple[bytes, str]:
    """model.onnx with the plugin nodes marked for this build (namespace, the kernels they launch, aot) and
    checked against the parser's lookup rules of TensorRT 10.3 and of this TensorRT; weights stay external."""
    import onnx

    from samba_edge.plugins.trt_launch import KernelSet
    from samba_edge.plugins.trt_parser import check_lookup, mark_plugin_nodes

    kernels = KernelSet.open(export_dir)          # python route: enqueue (also during the build) launches these
    if route == "aot_impl":                       # refuse here what aot_impl would refuse inside TensorRT's build
        from samba_edge.plugins.trt_qdp import aot_kernel

        for op in ("SelectiveScan", "SlidingWindowAttention"):
            aot_kernel(kernels.key, op, sm)
    if proto is None:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    mark_plugin_nodes(proto, kernels=kernels.key, aot=route == "aot_impl")
    registry = trt.get_plugin_registry()
    check_lookup(proto, lambda name, version, ns: registry.get_creator(name, version, ns) is not None, info.version)
    return proto.SerializeToString(), kernels.key


def _build_gpu(info) -> Optional[dict]:
    """The GPU a TensorRT engine is built for (its tactics are timed there): the first visible one.
    TensorRT-RTX engines are compiled for the GPU at load time, so none is recorded for them."""
    if info.flavor != "tensorrt":
        return None
    from samba_edge.plugins.cuda_probe import check_cuda

    gpus = check_cuda()[1].get("gpus") or []
    return {"name": gpus[0]["name"], "sm": gpus[0]["sm"]} if gpus else None


def network_summary(network) -> dict:
    """What TensorRT parsed (the engine itself cannot be inspected without a GPU): layer counts by
    type, and how many layers of each type produce each dtype - e.g. fp16 GEMMs, int8 Q/DQ pairs."""
    layers: dict[str, int] = {}
    outputs: dict[str, dict[str, int]] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type.name
        layers[kind] = layers.get(kind, 0) + 1
        dt = layer.get_output(0).dtype.name if layer.num_outputs else "NONE"
        by_dtype = outputs.setdefault(kind, {})
        by_dtype[dt] = by_dtype.get(dt, 0) + 1
    return {"layers": dict(sorted(layers.items())), "output_dtypes": dict(sorted(outputs.items()))}


def _np_dtype(trt, dt) -> str:
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
             "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8"}
    return names.get(dt.name, dt.name.lower())
