"""The ONNX side of the two custom ops: schemas, exporter translations, standard-op bodies.

* plugin flavour: the torch custom ops become nodes `samba.SelectiveScan` / `samba.SlidingWindowAttention`
  with registered op schemas and attributes that fully describe them (docs/op-contracts.md).
* portable flavour: the same graph, with each custom node replaced by its body in standard ONNX ops
  (a model-local function, then inlined): the scan as an ONNX `Scan` over time, the attention as
  concat + masked softmax. Stock onnxruntime runs it.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from samba_edge.export.config import SambaConfig

DOMAIN = "samba"
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


# ---- standard-op bodies (portable flavour) ---------------------------------------------------
def _const(name: str, values, dtype=TensorProto.INT64):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))


def _scan_function(opset: int) -> onnx.FunctionProto:
    """y, s = SelectiveScan(...) as an ONNX Scan over time; everything fp32."""
    n = helper.make_node
    f32 = TensorProto.FLOAT
    bEN = ["b", "E", "N"]                     # ORT wants the body's output ranks declared
    body = helper.make_graph(
        [_const("body_ax1", [1]), _const("body_ax2", [2]),
         n("Mul", ["dA_t", "s"], ["decayed"]), n("Add", ["decayed", "dBu_t"], ["s_next"]),
         n("Unsqueeze", ["C_t", "body_ax1"], ["C_t1"]), n("Mul", ["s_next", "C_t1"], ["sc"]),
         n("ReduceSum", ["sc", "body_ax2"], ["y_t"], keepdims=0), n("Identity", ["s_next"], ["s_out"])],
        "selective_scan_step",
        [helper.make_tensor_value_info(x, f32, shape) for x, shape in
         (("s", bEN), ("dA_t", bEN), ("dBu_t", bEN), ("C_t", ["b", "N"]))],
        [helper.make_tensor_value_info("s_out", f32, bEN), helper.make_tensor_value_info("y_t", f32, ["b", "E"])])
    nodes = [
        _const("ax1", [1]), _const("ax2", [2]), _const("ax3", [3]),
        n("Unsqueeze", ["delta_bias", "ax1"], ["bias2"]), n("Add", ["delta", "bias2"], ["dpre"]),
        # softplus with torch's threshold 20 (linear above), overflow-free below
        n("Constant", [], ["twenty"], value=helper.make_tensor("twenty", f32, [], [20.0])),
        n("Constant", [], ["one"], value=helper.make_tensor("one", f32, [], [1.0])),
        n("Min", ["dpre", "twenty"], ["dclip"]), n("Exp", ["dclip"], ["dexp"]), n("Add", ["dexp", "one"], ["d1p"]),
        n("Log", ["d1p"], ["dlog"]), n("Greater", ["dpre", "twenty"], ["big"]), n("Where", ["big", "dpre", "dlog"], ["dsp"]),
        n("Transpose", ["dsp"], ["dT"], perm=[2, 0, 1]), n("Transpose", ["u"], ["uT"], perm=[2, 0, 1]),  # (T,b,E)
        n("Unsqueeze", ["dT", "ax3"], ["dT4"]), n("Mul", ["dT4", "A"], ["dAx"]), n("Exp", ["dAx"], ["dA"]),    # (T,b,E,N)
        n("Mul", ["dT", "uT"], ["du"]), n("Unsqueeze", ["du", "ax3"], ["du4"]),
        n("Transpose", ["B"], ["BT"], perm=[2, 0, 1]), n("Unsqueeze", ["BT", "ax2"], ["BT4"]),             # (T,b,1,N)
        n("Mul", ["du4", "BT4"], ["dBu"]), n("Transpose", ["C"], ["CT"], perm=[2, 0, 1]),                 # (T,b,N)
        n("Scan", ["ssm_state", "dA", "dBu", "CT"], ["ssm_state_out", "ys"], body=body, num_scan_inputs=3),
        n("Transpose", ["ys"], ["y0"], perm=[1, 2, 0]),                                                  # (b,E,T)
        n("Unsqueeze", ["D", "ax1"], ["D2"]), n("Mul", ["D2", "u"], ["Du"]), n("Add", ["y0", "Du"], ["y1"]),
        n("Sigmoid", ["z"], ["zs"]), n("Mul", ["z", "zs"], ["zsilu"]), n("Mul", ["y1", "zsilu"], ["y"]),
    ]
    ins = [name for name, _ in _SPECS["SelectiveScan"]["inputs"]]
    return helper.make_function(DOMAIN, "SelectiveScan", ins, ["y", "ssm_state_out"], nodes,
                                [helper.make_opsetid("", opset)])


def _swa_function(cfg: SambaConfig, opset: int) -> onnx.FunctionProto:
    """Queries over [window | chunk] keys, masked by absolute position; GQA by broadcasting groups."""
    n = helper.make_node
    G, H, hs, W = cfg.n_query_groups, cfg.n_head, cfg.head_size, cfg.local_window
    C = W - 1
    f32 = TensorProto.FLOAT
    nodes = [
        _const("ax2", [2]), _const("ax1", [1]), _const("ax12", [1, 2]),
        _const("big", [2**62]), _const("qshape", [0, G, H // G, -1, hs]), _const("yshape", [0, H, -1, hs]),
        # the window state is fp32 in every precision; it joins the chunk in k's dtype (as the reference)
        n("CastLike", ["k_window", "k"], ["kw"]), n("CastLike", ["v_window", "v"], ["vw"]),
        n("Concat", ["kw", "k"], ["keys"], axis=2), n("Concat", ["vw", "v"], ["vals"], axis=2),
        n("Shape", ["q"], ["T1"], start=2, end=3), n("Squeeze", ["T1"], ["T"]),
        n("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT64, [], [0])),
        n("Constant", [], ["onei"], value=helper.make_tensor("onei", TensorProto.INT64, [], [1])),
        n("Constant", [], ["Cc"], value=helper.make_tensor("Cc", TensorProto.INT64, [], [C])),
        n("Constant", [], ["Wc"], value=helper.make_tensor("Wc", TensorProto.INT64, [], [W])),
        n("Add", ["T", "Cc"], ["CT"]),
        n("Range", ["zero", "T", "onei"], ["rq"]), n("Range", ["zero", "CT", "onei"], ["rk"]),
        n("Unsqueeze", ["start_pos", "ax1"], ["sp2"]),                                            # (b,1)
        n("Add", ["sp2", "rq"], ["qpos"]), n("Sub", ["sp2", "Cc"], ["k0"]), n("Add", ["k0", "rk"], ["kpos"]),
        n("Unsqueeze", ["qpos", "ax2"], ["qp"]), n("Unsqueeze", ["kpos", "ax1"], ["kp"]),          # (b,T,1),(b,1,S)
        n("GreaterOrEqual", ["kp", "zero"], ["m_exist"]), n("LessOrEqual", ["kp", "qp"], ["m_causal"]),
        n("Sub", ["qp", "Wc"], ["qlo"]), n("Greater", ["kp", "qlo"], ["m_window"]),
        n("And", ["m_exist", "m_causal"], ["m01"]), n("And", ["m01", "m_window"], ["mask3"]),
        n("Unsqueeze", ["mask3", "ax12"], ["mask"]),                                               # (b,1,1,T,S)
        n("Reshape", ["q", "qshape"], ["qg"]), n("Cast", ["qg"], ["qf"], to=f32),                  # (b,G,r,T,hs)
        n("Unsqueeze", ["keys", "ax2"], ["kg"]), n("Cast", ["kg"], ["kf"], to=f32),                # (b,G,1,S,hs)
        n("Transpose", ["kf"], ["kfT"], perm=[0, 1, 2, 4, 3]), n("MatMul", ["qf", "kfT"], ["raw"]),
        n("Constant", [], ["scale"], value=helper.make_tensor("scale", f32, [], [hs ** -0.5])),
        n("Mul", ["raw", "scale"], ["scores"]),
        n("Constant", [], ["ninf"], value=helper.make_tensor("ninf", f32, [], [float("-inf")])),
        n("Where", ["mask", "scores", "ninf"], ["masked"]), n("Softmax", ["masked"], ["p"], axis=-1),
        n("Unsqueeze", ["vals", "ax2"], ["vg"]), n("Cast", ["vg"], ["vf"], to=f32),
        n("MatMul", ["p", "vf"], ["yg"]), n("Reshape", ["yg", "yshape"], ["yf"]),
        n("CastLike", ["yf", "q"], ["y"]),
        n("Slice", ["keys", "T1", "big", "ax2"], ["k_last"]),                                      # last W-1
        n("Slice", ["vals", "T1", "big", "ax2"], ["v_last"]),
        n("CastLike", ["k_last", "k_window"], ["k_window_out"]), n("CastLike", ["v_last", "v_window"], ["v_window_out"]),
    ]
    ins = [name for name, _ in _SPECS["SlidingWindowAttention"]["inputs"]]
    return helper.make_function(DOMAIN, "SlidingWindowAttention", ins, ["y", "k_window_out", "v_window_out"],
                                nodes, [helper.make_opsetid("", opset)])


def to_portable(model, cfg: SambaConfig, opset: int):
    """Replace every samba.* node of an `onnx_ir.Model` by its standard-op body, in place.

    Done on the IR (not with onnx.inliner on a ModelProto) so models above protobuf's 2 GiB work."""
    import onnx_ir as ir
    from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

    for fn in (_scan_function(opset), _swa_function(cfg, opset)):
        f = ir.serde.deserialize_function(fn)
        model.functions[f.identifier()] = f
    InlinePass()(model)
    RemoveUnusedFunctionsPass()(model)
    model.opset_imports.pop(DOMAIN, None)
    RemoveUnusedOpsetsPass()(model)
    return model
