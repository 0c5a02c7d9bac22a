"""Run the plugin-flavour graph on ONNX Runtime (CPU): through the ops' standard-ONNX bodies (the default,
at the portable flavour's speed) or through the numpy references (the contract; validate and tests).

Why onnxruntime-extensions: it registers Python callables as ORT custom ops with no compiler and
no ORT headers (the wheels ship none), so the one numpy reference per op (plugins/reference.py)
is also what ORT executes; a compiled C++ library would be a second implementation to keep in
sync. Its ops live in domain `ai.onnx.contrib`, so the `samba` nodes are re-domained in a private
copy of the graph (the artifact on disk is untouched). Cost: a few us per call plus numpy speed, ~50x
slower than the bodies at 421M (0.25 vs 12.5 tok/s): this path is the CPU reference, not the way the
runtime runs a graph.

Only the op-registration core of onnxruntime-extensions is imported (`_ocos`, the compiled
`_extensions_pydll` it wraps, and `_cuops`): its package `__init__` also imports `cvt`, which imports
transformers and torch whenever they are installed (about 3 s and 220 MB more to open a model, for
nothing we use). See `_ortx_core`; tests/test_runtime_imports.py keeps torch out.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from pathlib import Path

import numpy as np

from samba_edge.plugins.reference import REFERENCES
from samba_edge.plugins.errors import SambaEdgeError

CONTRIB = "ai.onnx.contrib"
_ORTX = "onnxruntime_extensions"
_registered = False
_lock = threading.Lock()


def _ortx_core():
    """(PyCustomOpDef, get_library_path, onnx_op) from onnxruntime-extensions, without torch.

    `import onnxruntime_extensions` (and so any `onnxruntime_extensions.<submodule>`: a package's
    `__init__` runs first) executes `from .cvt import gen_processing_models`, and cvt.py imports
    transformers and torch whenever they are installed (in try/except ImportError). What we use lives
    in `_ocos` (`onnx_op` is `_ocos.Opdef.declare`), which loads only the compiled `_extensions_pydll`.
    So the submodules are imported under a bare package module (the installed package's own spec,
    `__init__` not run) that is dropped right after; they stay in sys.modules, and a later ordinary
    `import onnxruntime_extensions` runs the real `__init__`, which reuses them (one op registry).

    `_cuops` is imported too, before our ops are added: it registers a Python op (ArgSort) at import,
    and the extension keeps its Python ops in a std::vector whose element addresses ORT holds once a
    session exists, so an op added after the first session (as a later full import would do) leaves
    that session with dangling pointers (a segfault when it is destroyed). Importing it here keeps the
    registry exactly as a full import builds it. If the package is already imported, this reuses it;
    if a release moves these modules, it falls back to the public import (correct, only slow again:
    tests/test_runtime_imports.py then fails)."""
    if _ORTX not in sys.modules:
        spec = importlib.util.find_spec(_ORTX)
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(f"No module named {_ORTX!r}")
        sys.modules[_ORTX] = importlib.util.module_from_spec(spec)
        try:
            for sub in ("_ocos", "_cuops"):
                importlib.import_module(f"{_ORTX}.{sub}")
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith(f"{_ORTX}."):
                raise
        finally:
            del sys.modules[_ORTX]
    ocos = sys.modules.get(f"{_ORTX}._ocos")
    if ocos is not None and f"{_ORTX}._cuops" in sys.modules:
        return ocos.PyCustomOpDef, ocos.get_library_path, ocos.Opdef.declare
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    return PyCustomOpDef, get_library_path, onnx_op


def register_reference_ops() -> str:
    """Register both references once per process; returns the extensions library path."""
    with _lock:
        return _register_reference_ops()


def _register_reference_ops() -> str:
    global _registered
    try:
        P, get_library_path, onnx_op = _ortx_core()
    except ImportError:
        raise SambaEdgeError("running the plugin flavour on ONNX Runtime needs onnxruntime-extensions: "
                             "pip install onnxruntime-extensions (or export --flavor portable)") from None
    if not _registered:
        f, i64, s = P.dt_float, P.dt_int64, P.dt_string
        # looked up at call time, so a test can swap a reference for a deliberately broken one
        onnx_op(op_type="SelectiveScan", inputs=[f] * 9, outputs=[f, f],
                attrs={"plugin_version": s, "delta_softplus": i64, "d_inner": i64, "d_state": i64})(
            _guarded(lambda *x, delta_softplus=1, **_: REFERENCES["SelectiveScan"](*x, delta_softplus=delta_softplus),
                     like=(0, 8)))
        onnx_op(op_type="SlidingWindowAttention", inputs=[f] * 5 + [i64], outputs=[f, f, f],
                attrs={"plugin_version": s, "window": i64, "scale": f, "num_heads": i64, "num_kv_heads": i64,
                       "head_size": i64})(
            _guarded(lambda *x, window, scale, **_: REFERENCES["SlidingWindowAttention"](*x, window=window, scale=scale),
                     like=(0, 3, 4)))
        _registered = True
    return get_library_path()


_failed = threading.local()


def _guarded(fn, like: tuple[int, ...]):
    """onnxruntime-extensions aborts the whole process when a Python op raises (pybind11's
    error_already_set escapes as a C++ terminate): keep the error for `raise_op_error`, give ORT NaN
    outputs shaped like inputs `like`, and let the caller raise after session.run returns."""
    def run(*x, **attrs):
        try:
            return fn(*x, **attrs)
        except Exception as e:  # noqa: BLE001 - re-raised by raise_op_error in the calling thread
            _failed.error = e
            return tuple(np.full(np.shape(x[i]), np.nan, np.float32) for i in like)
    return run


def raise_op_error() -> None:
    """After a session.run of a plugin-flavour graph: the first samba.* reference error, as SambaEdgeError."""
    e = getattr(_failed, "error", None)
    if e is not None:
        _failed.error = None
        raise SambaEdgeError(f"a samba.* op failed inside ONNX Runtime ({type(e).__name__}: {e}); "
                             "check the artifact with `samba-edge validate`") from e


def _widen_half_attention(graph) -> None:
    """Python custom ops cannot take fp16 tensors, so in an fp16 graph q/k/v are cast up to fp32 before
    the attention reference and y back to fp16 after. Exact: the reference computes in fp32 and rounds
    y to q's dtype once; the fp32 windows only ever hold fp16-representable values."""
    from onnx import TensorProto, helper

    nodes = []
    for node in graph.node:
        if node.domain == CONTRIB and node.op_type == "SlidingWindowAttention":
            for i in range(3):
                wide = f"{node.input[i]}/fp32_for_{node.name}"
                nodes.append(helper.make_node("Cast", [node.input[i]], [wide], to=TensorProto.FLOAT))
                node.input[i] = wide
            y = node.output[0]
            node.output[0] = f"{y}/fp32"
            nodes += [node, helper.make_node("Cast", [node.output[0]], [y], to=TensorProto.FLOAT16)]
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


OPS = ("bodies", "reference")


def plugin_session(model, session_options=None, providers=None, weights_dir=None, ops: str = "bodies",
                   disabled_optimizers=None, ring: bool = False):
    """An InferenceSession for a plugin-flavour model (a path, or a ModelProto whose external weights
    live in `weights_dir`). ops "bodies": the samba.* nodes run their standard-op bodies (the portable
    flavour's ops and speed; plugins/onnx_bodies.py); "reference": they run the numpy references (the
    contract, for validate and the op tests; numpy speed). ring (bodies only): the attention keeps its
    window as a ring and the window outputs are the chunk's new rows (runtime/backends.OrtBackend)."""
    import onnx
    import onnxruntime as ort

    if ops not in OPS:
        raise SambaEdgeError(f"ops must be one of {', '.join(OPS)}, got {ops!r}")
    so = session_options or ort.SessionOptions()
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        weights_dir = weights_dir or Path(model).parent
        proto = onnx.load(str(model), load_external_data=False)
    if ops == "bodies":
        from samba_edge.plugins.onnx_bodies import body_functions

        proto.functions.extend(body_functions(proto, ring=ring))   # model-local functions: ORT inlines them
    else:
        so.register_custom_ops_library(register_reference_ops())
        for node in proto.graph.node:
            if node.domain == "samba":
                node.domain = CONTRIB
        if {p.key: p.value for p in proto.metadata_props}.get("samba_edge.dtype") == "float16":
            _widen_half_attention(proto.graph)
        proto.opset_import.append(onnx.helper.make_opsetid(CONTRIB, 1))
    if weights_dir is not None:         # the graph goes in as bytes; external weights are read in place
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return ort.InferenceSession(proto.SerializeToString(), so, providers=providers or ["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers)
