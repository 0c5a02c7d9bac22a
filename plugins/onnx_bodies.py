"""The standard-ONNX bodies of the two samba ops, as model-local functions (torch-free: onnx only).

Two users: the exporter inlines them to make the portable flavour (export/onnx_ops.to_portable), and
ONNX Runtime runs a plugin-flavour graph through them (plugins/ort_ops.plugin_session): the functions are
added to an in-memory copy of the graph, which ORT inlines, so the plugin flavour runs exactly the
portable flavour's ops at its speed. The numpy references (plugins/reference.py) stay the contract's
reference; tests check these bodies against them.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

DOMAIN = "samba"
SIGNATURES = {   # op -> (inputs, outputs), the order of docs/op-contracts.md
    "SelectiveScan": (["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_state"], ["y", "ssm_state_out"]),
    "SlidingWindowAttention": (["q", "k", "v", "k_window", "v_window", "start_pos"],
                               ["y", "k_window_out", "v_window_out"]),
}


def const(name: str, values, dtype=TensorProto.INT64):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))


def scalar(name: str, value, dtype=TensorProto.INT64):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))


def scan_function(opset: int) -> onnx.FunctionProto:
    """y, s = SelectiveScan(...) as an ONNX Scan over time; everything fp32."""
    n = helper.make_node
    f32 = TensorProto.FLOAT
    bEN = ["b", "E", "N"]                     # ORT wants the body's output ranks declared
    body = helper.make_graph(
        [const("body_ax1", [1]), const("body_ax2", [2]),
         n("Mul", ["dA_t", "s"], ["decayed"]), n("Add", ["decayed", "dBu_t"], ["s_next"]),
         n("Unsqueeze", ["C_t", "body_ax1"], ["C_t1"]), n("Mul", ["s_next", "C_t1"], ["sc"]),
         n("ReduceSum", ["sc", "body_ax2"], ["y_t"], keepdims=0), n("Identity", ["s_next"], ["s_out"])],
        "selective_scan_step",
        [helper.make_tensor_value_info(x, f32, shape) for x, shape in
         (("s", bEN), ("dA_t", bEN), ("dBu_t", bEN), ("C_t", ["b", "N"]))],
        [helper.make_tensor_value_info("s_out", f32, bEN), helper.make_tensor_value_info("y_t", f32, ["b", "E"])])
    nodes = [
        const("ax1", [1]), const("ax2", [2]), const("ax3", [3]),
        n("Unsqueeze", ["delta_bias", "ax1"], ["bias2"]), n("Add", ["delta", "bias2"], ["dpre"]),
        # softplus with torch's threshold 20 (linear above), overflow-free below
        scalar("twenty", 20.0, f32), scalar("one", 1.0, f32),
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
    return helper.make_function(DOMAIN, "SelectiveScan", *SIGNATURES["SelectiveScan"], nodes,
                                [helper.make_opsetid("", opset)])


def swa_function(num_heads: int, num_kv_heads: int, head_size: int, window: int, scale: float,
                 opset: int, half: bool = False) -> onnx.FunctionProto:
    """Queries over [window | chunk] keys, masked by absolute position; GQA by broadcasting groups.
    half: q/k/v are fp16 (the window state and softmax stay fp32). Without it the casts are left out: in an
    fp32 graph they are no-ops that ONNX Runtime does not eliminate, each a full copy of the window."""
    n = helper.make_node
    G, H, hs, W = num_kv_heads, num_heads, head_size, window
    f32 = TensorProto.FLOAT
    nodes = [
        const("ax2", [2]), const("ax1", [1]), const("ax12", [1, 2]),
        const("big", [2**62]), const("qshape", [0, G, H // G, -1, hs]), const("yshape", [0, H, -1, hs]),
        # the window state is fp32 in every precision; it joins the chunk in k's dtype (as the reference)
        n("CastLike", ["k_window", "k"], ["kw"]), n("CastLike", ["v_window", "v"], ["vw"]),
        n("Concat", ["kw", "k"], ["keys"], axis=2), n("Concat", ["vw", "v"], ["vals"], axis=2),
        n("Shape", ["q"], ["T1"], start=2, end=3), n("Squeeze", ["T1"], ["T"]),
        scalar("zero", 0), scalar("onei", 1),
        # the cache length from the window's shape (W-1 in every export), as the reference takes it
        n("Shape", ["k_window"], ["C1"], start=2, end=3), n("Squeeze", ["C1"], ["Cc"]),
        scalar("Wc", W), n("Add", ["T", "Cc"], ["CT"]),
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
        scalar("scale", scale, f32), n("Mul", ["raw", "scale"], ["scores"]),
        scalar("ninf", float("-inf"), f32),
        n("Where", ["mask", "scores", "ninf"], ["masked"]), n("Softmax", ["masked"], ["p"], axis=-1),
        n("Unsqueeze", ["vals", "ax2"], ["vg"]), n("Cast", ["vg"], ["vf"], to=f32),
        n("MatMul", ["p", "vf"], ["yg"]), n("Reshape", ["yg", "yshape"], ["yf"]),
        n("CastLike", ["yf", "q"], ["y"]),
        n("Slice", ["keys", "T1", "big", "ax2"], ["k_last"]),                                      # last W-1
        n("Slice", ["vals", "T1", "big", "ax2"], ["v_last"]),
        n("CastLike", ["k_last", "k_window"], ["k_window_out"]), n("CastLike", ["v_last", "v_window"], ["v_window_out"]),
    ]
    if not half:
        nodes = [n("Identity", [x.input[0]], list(x.output)) if x.op_type in ("Cast", "CastLike") else x for x in nodes]
    return helper.make_function(DOMAIN, "SlidingWindowAttention", *SIGNATURES["SlidingWindowAttention"], nodes,
                                [helper.make_opsetid("", opset)])


def body_functions(proto: onnx.ModelProto, ring: bool = False) -> list[onnx.FunctionProto]:
    """The bodies for the samba nodes of `proto`, built from the nodes' own attributes. Attention nodes
    with other attributes than the first (a SAMBA export has none; a hand-edited graph may) call a body
    of their own: their op_type is renamed in `proto` (a private copy) to SlidingWindowAttention_<k>.
    ring: the attention keeps its window as a ring (`swa_ring_function`); the graph outputs its window
    outputs feed are re-declared with the chunk's length (b, G, seq, hs)."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 18)
    half = {p.key: p.value for p in proto.metadata_props}.get("samba_edge.dtype") == "float16"
    fns, variants = [], {}
    if any(nd.domain == DOMAIN and nd.op_type == "SelectiveScan" for nd in proto.graph.node):
        fns.append(scan_function(opset))
    for node in proto.graph.node:
        if node.domain == DOMAIN and node.op_type == "SlidingWindowAttention":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            key = (a["num_heads"], a["num_kv_heads"], a["head_size"], a["window"], a["scale"])
            if key not in variants:
                variants[key] = node.op_type + (f"_{len(variants)}" if variants else "")
                fn = (swa_ring_function if ring else swa_function)(*key, opset=opset, half=half)
                fn.name = variants[key]
                fns.append(fn)
            node.op_type = variants[key]
            if ring:
                for out in proto.graph.output:
                    if out.name in node.output[1:]:
                        out.type.tensor_type.shape.dim[2].dim_param = "seq"
    return fns


def swa_ring_function(num_heads: int, num_kv_heads: int, head_size: int, window: int, scale: float,
                      opset: int, half: bool = False) -> onnx.FunctionProto:
    """The attention with the window kept as a ring (ONNX Runtime, runtime/backends.py): the inputs are the
    same, but cache slot s holds the key of the latest position p < start with p = s (mod C), and the window
    outputs are the chunk's own keys/values (b, G, T, hs), which the runtime writes into the ring in place.
    So no step copies the window: it is only read, by the two score products (window, chunk) whose
    softmax is taken jointly. Same masking by absolute position as `swa_function`."""
    n = helper.make_node
    G, H, hs, W = num_kv_heads, num_heads, head_size, window
    f32 = TensorProto.FLOAT

    def f32_of(x, out):                               # fp32 compute whatever the activations' dtype
        return n("Cast", [x], [out], to=f32) if half else n("Identity", [x], [out])

    nodes = [
        const("ax1", [1]), const("ax2", [2]), const("ax12", [1, 2]),
        const("qshape", [0, G, H // G, -1, hs]), const("yshape", [0, H, -1, hs]),
        scalar("zero", 0), scalar("onei", 1), scalar("Wc", W),
        n("Shape", ["k_window"], ["C1"], start=2, end=3), n("Squeeze", ["C1"], ["Cc"]),
        n("Shape", ["q"], ["T1"], start=2, end=3), n("Squeeze", ["T1"], ["T"]),
        # positions: query i at start + i; ring slot s holds p_s = (start-1) - ((start-1-s) mod C), if >= 0
        n("Unsqueeze", ["start_pos", "ax1"], ["sp2"]),                                            # (b,1)
        n("Range", ["zero", "T", "onei"], ["rq"]), n("Add", ["sp2", "rq"], ["qpos"]),             # (b,T)
        n("Range", ["zero", "Cc", "onei"], ["rs"]), n("Sub", ["sp2", "onei"], ["last"]),
        n("Sub", ["last", "rs"], ["back"]), n("Mod", ["back", "Cc"], ["age"]), n("Sub", ["last", "age"], ["spos"]),
        n("Unsqueeze", ["qpos", "ax2"], ["qp"]), n("Sub", ["qp", "Wc"], ["qlo"]),               # (b,T,1)
        n("Unsqueeze", ["spos", "ax1"], ["sp"]), n("Unsqueeze", ["qpos", "ax1"], ["cp"]),       # (b,1,C),(b,1,T)
        n("GreaterOrEqual", ["sp", "zero"], ["w_exist"]), n("Greater", ["sp", "qlo"], ["w_in"]),
        n("And", ["w_exist", "w_in"], ["mask_w"]),                                               # (b,T,C)
        n("LessOrEqual", ["cp", "qp"], ["c_causal"]), n("Greater", ["cp", "qlo"], ["c_in"]),
        n("And", ["c_causal", "c_in"], ["mask_c"]),                                              # (b,T,T)
        n("Concat", ["mask_w", "mask_c"], ["mask3"], axis=-1), n("Unsqueeze", ["mask3", "ax12"], ["mask"]),
        # scores over [ring | chunk]: two products, one softmax
        n("Reshape", ["q", "qshape"], ["qg0"]), f32_of("qg0", "qg"),                              # (b,G,r,T,hs)
        n("Unsqueeze", ["k_window", "ax2"], ["kr"]), n("Unsqueeze", ["v_window", "ax2"], ["vr"]),  # (b,G,1,C,hs)
        n("Unsqueeze", ["k", "ax2"], ["kc0"]), f32_of("kc0", "kc"),
        n("Unsqueeze", ["v", "ax2"], ["vc0"]), f32_of("vc0", "vc"),
        n("Transpose", ["kr"], ["krT"], perm=[0, 1, 2, 4, 3]), n("MatMul", ["qg", "krT"], ["s_w"]),   # (b,G,r,T,C)
        n("Transpose", ["kc"], ["kcT"], perm=[0, 1, 2, 4, 3]), n("MatMul", ["qg", "kcT"], ["s_c"]),   # (b,G,r,T,T)
        n("Concat", ["s_w", "s_c"], ["raw"], axis=-1),
        scalar("scale", scale, f32), n("Mul", ["raw", "scale"], ["scores"]),
        scalar("ninf", float("-inf"), f32),
        n("Where", ["mask", "scores", "ninf"], ["masked"]), n("Softmax", ["masked"], ["p"], axis=-1),
        n("Concat", ["C1", "T1"], ["C1T"], axis=0), n("Split", ["p", "C1T"], ["p_w", "p_c"], axis=-1),
        n("MatMul", ["p_w", "vr"], ["y_w"]), n("MatMul", ["p_c", "vc"], ["y_c"]), n("Add", ["y_w", "y_c"], ["yg"]),
        n("Reshape", ["yg", "yshape"], ["yf"]), n("CastLike", ["yf", "q"], ["y"]) if half else n("Identity", ["yf"], ["y"]),
        # the new rows, in the window's dtype (fp32)
        n("CastLike", ["k", "k_window"], ["k_window_out"]) if half else n("Identity", ["k"], ["k_window_out"]),
        n("CastLike", ["v", "v_window"], ["v_window_out"]) if half else n("Identity", ["v"], ["v_window_out"]),
    ]
    return helper.make_function(DOMAIN, "SlidingWindowAttention", *SIGNATURES["SlidingWindowAttention"], nodes,
                                [helper.make_opsetid("", opset)])
