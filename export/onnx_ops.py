"""The ONNX side of the two custom ops: schemas, exporter translations, the portable lowering.

* plugin flavour: the torch custom ops become nodes `samba.SelectiveScan` / `samba.SlidingWindowAttention`
  with registered op schemas and attributes that fully describe them (docs/op-contracts.md).
* portable flavour: the same graph, with each custom node replaced by its body in standard ONNX ops
  (a model-local function from plugins/onnx_bodies.py, then inlined): the scan as an ONNX `Scan` over
  time, the attention as concat + masked softmax. Stock onnxruntime runs it.
"""
from __future__ import annotations

import onnx

from samba_edge.export.config import SambaConfig
from samba_edge.plugins.onnx_bodies import DOMAIN, scan_function, swa_function
PLUGIN_VERSION = "1"
# TensorRT < 10.10 (JetPack 6 = 10.3) takes a plugin's namespace from this attribute only (never the domain)
PLUGIN_NAMESPACE = DOMAIN
_A = onnx.defs.OpSchema.AttrType

_SPECS = {
    "SelectiveScan": dict(
        inputs=[("u", "T"), ("delta", "T"), ("A", "T"), ("B", "T"), ("C", "T"), ("D", "T"), ("z", "T"),
                ("delta_bias", "T"), ("ssm_state", "T")],
        outputs=[("y", "T"), ("ssm_state_out", "T")],
        types=[("T", ["tensor(float)"])],                     # the scan and its state are fp32, always
        attrs=[("plugin_version", _A.STRING), ("plugin_namespace", _A.STRING), ("delta_softplus", _A.INT), ("d_inner", _A.INT), ("d_state", _A.INT)]),
    "SlidingWindowAttention": dict(
        inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("k_window", "S"), ("v_window", "S"), ("start_pos", "I")],
        outputs=[("y", "T"), ("k_window_out", "S"), ("v_window_out", "S")],
        types=[("T", ["tensor(float)", "tensor(float16)"]), ("S", ["tensor(float)", "tensor(float16)"]),
               ("I", ["tensor(int64)"])],
        attrs=[("plugin_version", _A.STRING), ("plugin_namespace", _A.STRING), ("window", _A.INT), ("scale", _A.FLOAT), ("num_heads", _A.INT),
               ("num_kv_heads", _A.INT), ("head_size", _A.INT)]),
}


def register_schemas() -> None:
    """Register both op schemas with onnx once (so onnx.checker and shape inference know them)."""
    for name, s in _SPECS.items():
        if onnx.defs.has(name, DOMAIN):
            continue
        F = onnx.defs.OpSchema.FormalParameter
        onnx.defs.register_schema(onnx.defs.OpSchema(
            name, DOMAIN, 1, doc=f"samba-edge {name}; contract in docs/op-contracts.md",
            inputs=[F(n, t) for n, t in s["inputs"]], outputs=[F(n, t) for n, t in s["outputs"]],
            type_constraints=[(t, allowed, "") for t, allowed in s["types"]],
            attributes=[onnx.defs.OpSchema.Attribute(a, ty, "", required=a != "plugin_namespace")   # older exports lack it
                        for a, ty in s["attrs"]]))


def op_attributes(cfg: SambaConfig) -> dict[str, dict]:
    return {
        "SelectiveScan": dict(plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE, delta_softplus=1, d_inner=cfg.d_inner, d_state=cfg.d_state),
        "SlidingWindowAttention": dict(plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE, window=cfg.local_window,
                                       scale=cfg.head_size ** -0.5, num_heads=cfg.n_head,
                                       num_kv_heads=cfg.n_query_groups, head_size=cfg.head_size),
    }


def translation_table(cfg: SambaConfig) -> dict:
    """torch custom op -> onnxscript function emitting the plugin node (for torch.onnx.export(dynamo=True))."""
    import onnxscript
    import torch

    import samba_edge.export.ops  # noqa: F401  (registers torch.ops.samba.*)

    register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, 1)
    scan_op = onnxscript.values.Op(opset, "SelectiveScan", op_schema=onnx.defs.get_schema("SelectiveScan", 1, DOMAIN))
    swa_op = onnxscript.values.Op(opset, "SlidingWindowAttention",
                                  op_schema=onnx.defs.get_schema("SlidingWindowAttention", 1, DOMAIN))
    attrs = op_attributes(cfg)

    def scan(u, delta, A, B, C, D, z, delta_bias, ssm_state):
        return scan_op(u, delta, A, B, C, D, z, delta_bias, ssm_state, **attrs["SelectiveScan"], _num_outputs=2)

    def swa(q, k, v, k_window, v_window, start_pos, window, scale):
        assert window == cfg.local_window
        return swa_op(q, k, v, k_window, v_window, start_pos, **attrs["SlidingWindowAttention"], _num_outputs=3)

    return {torch.ops.samba.selective_scan.default: scan, torch.ops.samba.sliding_window_attention.default: swa}


def to_portable(model, cfg: SambaConfig, opset: int, half: bool = False):
    """Replace every samba.* node of an `onnx_ir.Model` by its standard-op body, in place.

    Done on the IR (not with onnx.inliner on a ModelProto) so models above protobuf's 2 GiB work."""
    import onnx_ir as ir
    from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

    swa = swa_function(cfg.n_head, cfg.n_query_groups, cfg.head_size, cfg.local_window, cfg.head_size ** -0.5, opset,
                       half=half)
    for fn in (scan_function(opset), swa):
        f = ir.serde.deserialize_function(fn)
        model.functions[f.identifier()] = f
    InlinePass()(model)
    RemoveUnusedFunctionsPass()(model)
    model.opset_imports.pop(DOMAIN, None)
    RemoveUnusedOpsetsPass()(model)
    return model
