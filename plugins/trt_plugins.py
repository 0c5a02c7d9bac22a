"""TensorRT plugins for the two custom ops (docs/op-contracts.md): Python IPluginV3 classes.

    from samba_edge.plugins.trt_plugins import register_plugins
    register_plugins()            # before parsing a plugin-flavour model.onnx or loading its engine

One implementation for real TensorRT (10.x, 11.x; JetPack 6 and 7) and TensorRT-RTX: the shape of
NVIDIA's `samples/python/python_plugin` (IPluginV3 + OneCore/OneBuild/OneRuntime, IPluginCreatorV3One).
The ONNX parser matches node op_type == plugin name, attribute `plugin_version` == "1" and attribute
`plugin_namespace` == "samba" (TensorRT < 10.10, i.e. JetPack 6's 10.3, reads the namespace from that
attribute only; newer parsers also fall back to the node's domain): `parser_keys` applies either rule.
Only the fields the creator declares reach `create_plugin`; ONNX int attributes arrive as INT32
arrays, float as FLOAT32, string as CHAR.

The plugins do no maths here: `enqueue` unpacks TensorRT's descriptors (device pointers, shapes,
stream) and calls the plain launchers in `trt_launch.py`, which run the AOT-compiled Triton kernels.
Each plugin finds its kernels through its `kernels` field, the content key of the artifact's
kernels/ that `samba-edge build` writes onto the nodes it parses (and that the engine serializes);
so enqueue works during the build (real TensorRT times tactics by running it) and two engines in
one process never share kernels by accident. An engine records only type/version/namespace and the
serialized fields: the process that loads an engine must call `register_plugins()` again and open
the engine directory's kernels (`trt_launch.KernelSet.open`; the TensorRT backend does both).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from samba_edge.plugins.trt_import import import_trt

NAMESPACE = "samba"
VERSION = "1"

# attribute name -> (kind); the order is the serialisation order. "kernels": trt_launch.KernelSet.key
SCAN_FIELDS = {"delta_softplus": "int", "d_inner": "int", "d_state": "int", "kernels": "str"}
SWA_FIELDS = {"window": "int", "scale": "float", "num_heads": "int", "num_kv_heads": "int", "head_size": "int",
              "kernels": "str"}
OPTIONAL_FIELDS = {"kernels"}           # TensorRT-RTX / plain parses build without; enqueue then refuses

trt, _info = import_trt()


_KIND = {"int": (np.int32, "INT32"), "float": (np.float32, "FLOAT32"), "str": (np.int8, "CHAR")}


def _field_value(f, kind: str) -> Any:
    data = np.asarray(f.data).reshape(-1)
    if kind == "str":
        return data.astype(np.uint8).tobytes().split(b"\0")[0].decode("ascii", "replace") if data.size else None
    if not data.size:
        return None
    return int(data[0]) if kind == "int" else float(data[0])


def _fields(fc, spec: dict[str, str]) -> dict[str, Any]:
    return {f.name: _field_value(f, spec[f.name]) for f in (fc or []) if f.name in spec}


def _array(value, kind: str) -> np.ndarray:
    if kind == "str":
        return np.frombuffer(("" if value is None else str(value)).encode("ascii"), np.int8).copy()
    return np.array([] if value is None else [value], dtype=_KIND[kind][0])


def _collection(values: dict[str, Any], spec: dict[str, str], keep: list):
    """A PluginFieldCollection of `values`. A PluginField only points at its numpy buffer: the arrays
    are appended to `keep`, which the caller must hold as long as TensorRT may read the fields
    (observed: with temporaries the memory is reused and TensorRT serialises garbage)."""
    fields = []
    for name, kind in spec.items():
        if values.get(name) is None:
            continue
        arr = _array(values[name], kind)
        keep.append(arr)
        fields.append(trt.PluginField(name, arr, getattr(trt.PluginFieldType, _KIND[kind][1])))
    return trt.PluginFieldCollection(fields)


def _declared(spec: dict[str, str], keep: list):
    fields = []
    for n, k in spec.items():
        arr = _array(None, k)
        keep.append(arr)
        fields.append(trt.PluginField(n, arr, getattr(trt.PluginFieldType, _KIND[k][1])))
    return trt.PluginFieldCollection(fields)


def _dims(desc) -> tuple[int, ...]:
    return tuple(int(d) for d in desc.dims)


class _SambaPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
    """Shared plumbing; subclasses set NAME, FIELDS, N_IN, N_OUT, OUT_FROM_IN and the type rules."""
    NAME = ""
    FIELDS: dict[str, str] = {}
    N_IN = 0
    N_OUT = 0
    OUT_FROM_IN: tuple[int, ...] = ()          # output i mirrors the shape (and, by rule, type) of this input

    def __init__(self, attrs: Optional[dict[str, Any]] = None) -> None:
        trt.IPluginV3.__init__(self)
        trt.IPluginV3OneCore.__init__(self)
        trt.IPluginV3OneBuild.__init__(self)
        trt.IPluginV3OneRuntime.__init__(self)
        self.plugin_name = self.NAME
        self.plugin_namespace = NAMESPACE
        self.plugin_version = VERSION
        self.num_outputs = self.N_OUT
        self.attrs: dict[str, Any] = dict(attrs or {})
        missing = [k for k in self.FIELDS if self.attrs.get(k) is None and k not in OPTIONAL_FIELDS]
        if missing:
            raise ValueError(f"{NAMESPACE}.{self.NAME}: missing attribute(s) {', '.join(missing)} "
                             "(re-export the artifact with this samba-edge)")

    # ---- core -----------------------------------------------------------------------------------
    def get_capability_interface(self, type):
        return self

    def clone(self):
        return type(self)(self.attrs)

    def get_fields_to_serialize(self):
        self._keep: list = []                  # the field buffers live as long as this plugin
        self._serialized = _collection(self.attrs, self.FIELDS, self._keep)
        return self._serialized

    # ---- build ----------------------------------------------------------------------------------
    def get_output_data_types(self, input_types):
        return [input_types[i] for i in self.OUT_FROM_IN]

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        return [trt.DimsExprs(inputs[i]) for i in self.OUT_FROM_IN]

    def supports_format_combination(self, pos, in_out, num_inputs):
        desc = in_out[pos].desc
        if desc.format != trt.TensorFormat.LINEAR:
            return False
        return self.type_ok(pos, [d.desc.type for d in in_out[:pos + 1]])

    def type_ok(self, pos: int, types: list) -> bool:                   # types[0..pos]
        raise NotImplementedError

    def configure_plugin(self, inp, out):
        pass

    def get_workspace_size(self, input_desc, output_desc):
        return 0

    def get_valid_tactics(self):
        return []

    def set_tactic(self, tactic):
        pass

    # ---- runtime --------------------------------------------------------------------------------
    def on_shape_change(self, inp, out):
        pass

    def attach_to_context(self, context):
        return self.clone()                    # a fresh Launcher: its loaded functions belong to one context

    def launcher(self):
        """This plugin's kernels, prepared on first use (trt_launch.Launcher); enqueue then only launches."""
        if getattr(self, "_launcher", None) is None:
            from samba_edge.plugins.trt_launch import KernelSet, Launcher

            key = self.attrs.get("kernels")
            if not key:
                raise RuntimeError(f"{NAMESPACE}.{self.NAME} has no kernels field: build the engine with "
                                   "`samba-edge build` (it binds the artifact's kernels to every plugin node)")
            self._launcher = Launcher(KernelSet.by_key(key), self.NAME)
        return self._launcher


class SelectiveScanPlugin(_SambaPlugin):
    NAME = "SelectiveScan"
    FIELDS = SCAN_FIELDS
    N_IN, N_OUT = 9, 2
    OUT_FROM_IN = (0, 8)                       # y ~ u (b, E, T); ssm_state_out ~ ssm_state (b, E, N)

    def type_ok(self, pos, types):
        return types[pos] == trt.DataType.FLOAT                          # everything fp32 (contract)

    def configure_plugin(self, inp, out):
        u = inp[0].desc.dims
        if len(u) != 3:
            raise ValueError(f"SelectiveScan: u must be (b, E, T), got {len(u)} dims")

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
        from samba_edge.plugins.trt_launch import launch_selective_scan

        b, E, T = _dims(input_desc[0])
        N = _dims(input_desc[2])[1]
        launch_selective_scan(self.launcher(), list(inputs), list(outputs), batch=b, d_inner=E, d_state=N, seq=T,
                              delta_softplus=self.attrs["delta_softplus"], stream=int(stream))


class SlidingWindowAttentionPlugin(_SambaPlugin):
    NAME = "SlidingWindowAttention"
    FIELDS = SWA_FIELDS
    N_IN, N_OUT = 6, 3
    OUT_FROM_IN = (0, 3, 4)                    # y ~ q; k_window_out ~ k_window; v_window_out ~ v_window

    def type_ok(self, pos, types):
        t = types[pos]
        if pos == 0:                                                     # q: fp32 or fp16
            return t in (trt.DataType.FLOAT, trt.DataType.HALF)
        if pos in (1, 2):                                                # k, v: q's type
            return t == types[0]
        if pos in (3, 4):                                                # windows: fp32 state
            return t == trt.DataType.FLOAT
        if pos == 5:                                                     # start_pos
            return t == trt.DataType.INT64
        if pos == 6:                                                     # y: q's type
            return t == types[0]
        return t == trt.DataType.FLOAT                                   # window outputs

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
        from samba_edge.plugins.trt_launch import launch_sliding_window_attention

        b, H, T, hs = _dims(input_desc[0])
        G = _dims(input_desc[1])[1]
        C = _dims(input_desc[3])[2]
        a = self.attrs
        launch_sliding_window_attention(
            self.launcher(), list(inputs), list(outputs), batch=b, num_heads=H, num_kv_heads=G, seq=T, head_size=hs,
            window_rows=C, window=a["window"], scale=a["scale"], half=input_desc[0].type == trt.DataType.HALF,
            stream=int(stream))


class _SambaCreator(trt.IPluginCreatorV3One):
    PLUGIN: type = _SambaPlugin

    def __init__(self) -> None:
        trt.IPluginCreatorV3One.__init__(self)
        self.name = self.PLUGIN.NAME
        self.plugin_namespace = NAMESPACE
        self.plugin_version = VERSION
        self._keep: list = []
        self.field_names = _declared(self.PLUGIN.FIELDS, self._keep)

    def create_plugin(self, name, fc, phase):
        return self.PLUGIN(_fields(fc, self.PLUGIN.FIELDS))


class SelectiveScanCreator(_SambaCreator):
    PLUGIN = SelectiveScanPlugin


class SlidingWindowAttentionCreator(_SambaCreator):
    PLUGIN = SlidingWindowAttentionPlugin


_registered: list = []                          # keep the Python creators alive as long as the registry


def register_plugins() -> list:
    """Register both creators with TensorRT's global registry (idempotent). Returns the creators."""
    if _registered:
        return _registered
    registry = trt.get_plugin_registry()
    for cls in (SelectiveScanCreator, SlidingWindowAttentionCreator):
        creator = cls()
        existing = registry.get_creator(creator.name, VERSION, NAMESPACE)
        if existing is None and not registry.register_creator(creator, NAMESPACE):
            raise RuntimeError(f"TensorRT refused to register the {NAMESPACE}::{creator.name} plugin creator")
        _registered.append(creator)
    return _registered
