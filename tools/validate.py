"""`samba-edge validate`: step-by-step numerical parity of an artifact against the PyTorch reference.

Built on Polygraphy: every backend is a Polygraphy runner (`OnnxrtRunner` on our sessions, a small
`BaseRunner` for PyTorch on CPU, `TrtRunner` where TensorRT exists), results are `RunResults`
(saved in Polygraphy's JSON format by --polygraphy-dir; --save writes the JSON report alone) and the
verdict is `Comparator.compare_accuracy` with an element-wise check. Polygraphy's own iterations are
independent, so the loop here carries each runner's state from its own previous outputs: a fault that
only shows after the window wraps, or in the state alone, is caught. `--bisect` adds every block's
residual output to the graph (found by the exporter's module-scope metadata) and names the first
block that diverges.
"""
from __future__ import annotations

import ast
import json
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.manifest import Manifest

# (atol, rtol, Polygraphy check_error_stat) per artifact dtype. "elemwise": an element fails only when
# it exceeds both tolerances. INT8 is a lossy re-parametrisation, so it is judged statistically (as
# Polygraphy users do): a tensor fails when its MEDIAN abs error exceeds atol and its median rel error rtol.
DEFAULT_TOLERANCES = {"float32": (1e-4, 1e-3, "elemwise"), "float16": (2e-2, 2e-2, "elemwise"),
                      "int8": (5e-1, 1e-1, "median")}
ERROR_STATS = ("elemwise", "max", "mean", "median")
BLOCK_OUT = "block.{}.out"


def _scope_block(node) -> Optional[int]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)
            if len(scopes) == 4 and scopes[2].startswith("model.transformer.h.") and node.op_type == "Add":
                return int(scopes[2].rsplit(".", 1)[1])
    return None


def instrument(proto, n_layer: int):
    """Mark each block's output (its last residual Add) as a graph output `block.{i}.out`."""
    import onnx

    last = {}
    for node in proto.graph.node:
        i = _scope_block(node)
        if i is not None:
            last[i] = node
    if sorted(last) != list(range(n_layer)):
        raise SambaEdgeError("--bisect cannot find every block in this graph (no module-scope metadata); "
                             "re-export it with this samba-edge")
    for i in range(n_layer):
        proto.graph.node.append(onnx.helper.make_node("Identity", [last[i].output[0]], [BLOCK_OUT.format(i)]))
        proto.graph.output.append(onnx.helper.make_tensor_value_info(BLOCK_OUT.format(i), onnx.TensorProto.FLOAT, None))
    return proto


def _backend_runner(backend, name: str, bisect: bool = False):
    """A Polygraphy runner over one of our backends: the PyTorch model on CPU (Polygraphy's PytRunner
    moves models to CUDA) or a TensorRT engine (our backend selects the profile per phase and
    registers the plugins, which Polygraphy's TrtRunner would not)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class BackendRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name)
            self.blocks: dict[int, np.ndarray] = {}

        def activate_impl(self) -> None:
            self.hooks = []
            if bisect:                                    # torch: each block's output, by forward hooks
                for i, blk in enumerate(backend.model.transformer.h):
                    self.hooks.append(blk.register_forward_hook(
                        lambda mod, args, out, i=i: self.blocks.__setitem__(i, out[0].detach().numpy().copy())))

        def deactivate_impl(self) -> None:
            for h in self.hooks:
                h.remove()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for t in backend.manifest.inputs:
                meta.add(t.name, np.dtype(t.dtype), [d if isinstance(d, int) else -1 for d in t.shape])
            return meta

        def infer_impl(self, feed_dict):
            m = backend.manifest
            run = getattr(backend, "run_host", backend.run)        # state in the manifest's layout
            logits, state = run(feed_dict["input_ids"], feed_dict["start_pos"], [feed_dict[s.name] for s in m.state])
            out = OrderedDict([("logits", logits)] + [(s.output, x) for s, x in zip(m.state, state)])
            out.update((BLOCK_OUT.format(i), self.blocks[i]) for i in sorted(self.blocks))
            return out

    return BackendRunner()


def _ort_runner(artifact: Path, manifest: Manifest, bisect: bool, ops: str = "reference"):
    import onnx
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    proto = onnx.load(str(artifact / manifest.onnx_file), load_external_data=False)
    if bisect:
        instrument(proto, manifest.model["n_layer"])

    from samba_edge.runtime.backends import ort_disabled_optimizers

    off = ort_disabled_optimizers(manifest)

    def session():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if manifest.flavor == "plugin":
            from samba_edge.plugins.ort_ops import plugin_session

            return plugin_session(proto, so, weights_dir=artifact, ops=ops, disabled_optimizers=off)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(artifact))
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=off)

    name = f"ort-{manifest.flavor}" + ("-bodies" if manifest.flavor == "plugin" and ops == "bodies" else "")
    return OnnxrtRunner(session, name=name)


def _stats(a: np.ndarray, b: np.ndarray, atol: float, rtol: float, stat: str = "elemwise") -> dict:
    a, b = a.astype(np.float64), b.astype(np.float64)
    absd = np.abs(a - b)
    reld = absd / np.maximum(np.abs(b), 1e-12)
    bad = (absd > atol) & (reld > rtol)
    st = {"max_abs": float(absd.max()) if absd.size else 0.0, "max_rel": float(reld.max()) if reld.size else 0.0,
          "median_abs": float(np.median(absd)) if absd.size else 0.0,
          "mismatch": float(bad.mean()) if bad.size else 0.0}
    if stat == "elemwise":
        st["passed"] = st["mismatch"] == 0.0
    else:
        f = {"max": np.max, "mean": np.mean, "median": np.median}[stat]
        st["passed"] = not absd.size or bool(f(absd) <= atol or f(reld) <= rtol)
    return st


def _layer_of(name: str, manifest: Manifest) -> int:
    if name.startswith("block."):
        return int(name.split(".")[1])
    for s in manifest.state:
        if s.output == name:
            return s.layer
    return manifest.model["n_layer"]                       # logits: the head


def validate(artifact: str, reference: str = "torch", backends: Sequence[str] = ("ort",), steps: int = 12,
             chunks: Sequence[int] = (1, 7, 64), batch: int = 2, atol: Optional[float] = None,
             rtol: Optional[float] = None, bisect: bool = False, save: Optional[str] = None, seed: int = 0,
             allow_mismatch: bool = False, polygraphy_dir: Optional[str] = None,
             error_stat: Optional[str] = None, engine: Optional[str] = None) -> dict:
    """Runs the schedule through the reference and every backend; returns the report (report["passed"])."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    from samba_edge.export.torch_backend import TorchBackend

    G_LOGGER.module_severity = G_LOGGER.ERROR
    art = Path(artifact)
    man = Manifest.load(art)
    from samba_edge.runtime.integrity import verify

    verify(art, man, always=True)                # the graph files are the ones written, at any size
    d_atol, d_rtol, d_stat = DEFAULT_TOLERANCES.get(man.dtype, DEFAULT_TOLERANCES["float32"])
    atol, rtol = d_atol if atol is None else atol, d_rtol if rtol is None else rtol
    stat = error_stat or d_stat
    if stat not in ERROR_STATS:
        raise SambaEdgeError(f"unknown --check-error-stat {stat!r}; use one of: {', '.join(ERROR_STATS)}")
    if steps < 1 or batch < 1 or not chunks or min(chunks) < 1:
        raise SambaEdgeError("--steps, --batch and every --chunks size must be >= 1")
    if save:
        from samba_edge.runtime.userio import check_output_file

        check_output_file(save, "--save")
    if max(chunks) > man.max_chunk:
        raise SambaEdgeError(f"chunk {max(chunks)} exceeds the artifact's max chunk {man.max_chunk}; lower --chunks")
    ref_spec = man.source if reference == "torch" else reference
    if ref_spec is None:
        raise SambaEdgeError("the artifact does not record its checkpoint; pass --reference CHECKPOINT")
    ref = TorchBackend.open(ref_spec)
    if ref.manifest.fingerprint != man.fingerprint and not allow_mismatch:
        raise SambaEdgeError(f"reference {ref_spec} has other weights than the artifact (fingerprint differs); "
                             "pass the checkpoint it was exported from, or --allow-mismatch")
    runners = [_backend_runner(ref, "torch", bisect)]
    for b in backends:
        if b == "ort":       # a plugin graph twice: its ops' numpy references (the contract) and the
            runners.append(_ort_runner(art, man, bisect))   # standard-op bodies the runtime runs on ORT
            if man.flavor == "plugin" and bisect:          # (instrumented graph: windows replaced, no ring)
                runners.append(_ort_runner(art, man, bisect, ops="bodies"))
            elif man.flavor == "plugin":                    # exactly as the runtime runs it: rings in place
                from samba_edge.runtime.backends import OrtBackend

                runners.append(_backend_runner(OrtBackend(art, ops="bodies"), "ort-plugin-bodies"))
        elif b == "trt":
            from samba_edge.runtime.engine_dir import check_engine_dir
            from samba_edge.runtime.trt_backend import TrtBackend

            if engine is None:
                raise SambaEdgeError("--backends trt needs --engine ENGINE_DIR (built from this artifact by "
                                     "`samba-edge build`)")
            if check_engine_dir(engine)[1].fingerprint != man.fingerprint:
                raise SambaEdgeError(f"--engine {engine} was built from other weights than {art}")
            if bisect:
                raise SambaEdgeError("--bisect instruments the ONNX graph; run it with --backends ort")
            runners.append(_backend_runner(TrtBackend(engine), "trt"))
        else:
            raise SambaEdgeError(f"unknown backend {b!r}; use ort or trt")

    rng = np.random.default_rng(seed)
    feeds, results = [], RunResults()
    states = {r.name: man.empty_state(batch) for r in runners}
    iters = {r.name: [] for r in runners}
    pos = np.zeros(batch, dtype=np.int64)
    for r in runners:
        r.activate()
    try:
        from samba_edge.runtime.progress import progress

        for step in progress(range(steps), "validate steps", unit="step"):
            size = chunks[step % len(chunks)]
            ids = rng.integers(0, man.vocab_size, (batch, size), dtype=np.int64)
            for r in runners:
                feed = OrderedDict([("input_ids", ids), ("start_pos", pos.copy())])
                feed.update((s.name, np.ascontiguousarray(x)) for s, x in zip(man.state, states[r.name]))
                if r is runners[0]:
                    feeds.append(feed)
                out = r.infer(feed)
                states[r.name] = [np.asarray(out[s.output]) for s in man.state]
                iters[r.name].append(IterationResult(OrderedDict((k, np.ascontiguousarray(v)) for k, v in out.items()),
                                                     runner_name=r.name))
            pos += size
    finally:
        for r in runners:
            r.deactivate()
    for r in runners:
        results.append((r.name, iters[r.name]))

    verdict = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
        atol={"": atol}, rtol={"": rtol}, check_error_stat=stat))
    rows, first = [], None
    ref_iters = iters[runners[0].name]
    for r in runners[1:]:
        for step, (it_ref, it) in enumerate(zip(ref_iters, iters[r.name])):
            for name in it_ref.keys():
                st = _stats(it[name], it_ref[name], atol, rtol, stat)
                st.update(step=step, tensor=name, backend=r.name)
                rows.append(st)
                if not st["passed"] and (first is None or (step, _layer_of(name, man)) < (first["step"], first["layer"])):
                    first = {"step": step, "layer": _layer_of(name, man), "tensor": name, "backend": r.name}
    passed = bool(verdict) and all(r["passed"] for r in rows)
    report = {"artifact": str(art), "reference": ref_spec, "flavor": man.flavor, "dtype": man.dtype,
              "atol": atol, "rtol": rtol, "check_error_stat": stat, "steps": steps, "chunks": list(chunks),
              "batch": batch, "seed": seed,
              "tokens": int(pos[0]), "window": man.window, "passed": passed, "rows": rows}
    if bisect:
        report["first_divergence"] = first
    written = write_polygraphy_files(Path(polygraphy_dir), feeds, results, art, atol, rtol, stat) \
        if polygraphy_dir else []
    report["written"] = ([str(save)] if save else []) + written
    if save:                                               # the report only: nothing else beside it
        Path(save).write_text(json.dumps(report, indent=1) + "\n")
    return report


DATA_LOADER = '''"""Polygraphy data loader: the exact per-step feeds of a samba-edge validate run (states included,
taken from the reference run), so each iteration can be compared independently."""
from polygraphy.json import load_json


def load_data():
    yield from load_json(__file__.replace("data_loader.py", "inputs.json"))
'''


def write_polygraphy_files(out: Path, feeds, results, artifact: Path, atol: float, rtol: float,
                           stat: str = "elemwise") -> list[str]:
    """`results`: every runner's Polygraphy RunResults, the reference first. Returns the files written."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SambaEdgeError(f"cannot create --polygraphy-dir {out} ({e.strerror})") from None
    save_json(feeds, str(out / "inputs.json"))
    RunResults([results[0]]).save(str(out / "reference_outputs.json"))
    results.save(str(out / "run_results.json"))
    (out / "data_loader.py").write_text(DATA_LOADER)
    args = (f"--load-inputs {out / 'inputs.json'} --load-outputs {out / 'reference_outputs.json'} "
            f"--atol {atol} --rtol {rtol} --check-error-stat {stat}")
    (out / "README.txt").write_text(
        "# portable flavour, stock ONNX Runtime:\n"
        f"polygraphy run {artifact / 'model.onnx'} --onnxrt {args}\n"
        "# plugin flavour on a GPU with TensorRT (the samba plugins registered, see docs/validate.md):\n"
        f"polygraphy run {artifact / 'model.onnx'} --trt {args}\n"
        "# run_results.json: every runner's outputs of the samba-edge run, e.g.\n"
        f"polygraphy inspect data {out / 'run_results.json'}\n")
    return [str(out / f) for f in ("inputs.json", "reference_outputs.json", "run_results.json", "data_loader.py",
                                   "README.txt")]


def render_text(report: dict, max_rows: int = 40) -> str:
    lines = [f"validate {report['artifact']} ({report['flavor']}, {report['dtype']}) vs {report['reference']}: "
             f"{report['steps']} steps, chunks {report['chunks']}, batch {report['batch']}, {report['tokens']} tokens, "
             f"window {report['window']}, atol {report['atol']:g}, rtol {report['rtol']:g}, "
             f"error stat {report['check_error_stat']}",
             f"{'step':>4}  {'backend':<13}{'tensor':<22}{'max abs':>10}{'max rel':>10}{'med abs':>10}"
             f"{'mismatch':>10}  ok"]
    rows = report["rows"]
    shown = [r for r in rows if not r["passed"]][:max_rows] or [r for r in rows if r["tensor"] == "logits"][:max_rows]
    for r in shown:
        lines.append(f"{r['step']:>4}  {r['backend']:<13}{r['tensor']:<22}{r['max_abs']:>10.2e}{r['max_rel']:>10.2e}"
                     f"{r['median_abs']:>10.2e}{r['mismatch']:>10.4f}  {'yes' if r['passed'] else 'NO'}")
    worst = max(rows, key=lambda r: r["max_abs"])
    lines.append(f"worst: step {worst['step']} {worst['tensor']} max abs {worst['max_abs']:.2e} ({len(rows)} comparisons)")
    if report.get("first_divergence"):
        f = report["first_divergence"]
        where = "the head (logits)" if f["tensor"] == "logits" else f"block {f['layer']}"
        lines.append(f"first divergence: step {f['step']}, {where}, tensor {f['tensor']} ({f['backend']})")
    if report.get("written"):
        lines.append("wrote: " + ", ".join(report["written"]))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
