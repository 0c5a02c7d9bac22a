"""The serving graph: the step graph wrapped for a server that keeps the state (Triton's implicit state).

Triton's sequence batcher with implicit state keeps every `state` tensor of a sequence between requests
and batches across sequences; the graph only has to make every piece of a stream's memory a state pair.
The step graph's state pairs already are; the wrapper adds the position as one more (a client cannot be
trusted to count) and returns what a client needs instead of what the runtime needs:

    input_ids [B, S] int64, pos [B, 1] int64, START and READY [B, 1] int32 (the batcher's controls; unused:
    on START the server resets every state, pos included, to zeros; no CORRID: the server keys the state by
    it, the graph never needs it, and TensorRT has no uint64), the manifest's state inputs
      -> logits [B, V] (the last position's), next_token [B, 1] (greedy; `sampling="server"` only),
         pos_out [B, 1] = pos + S, the manifest's state outputs

Plugin-flavour graphs get the custom ops' standard-op bodies as model-local functions for ONNX Runtime (a
server's ONNX Runtime has no samba.* kernels); a TensorRT build keeps the plugin nodes. Everything is read from the manifest. Torch-free: onnx only.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from samba_edge.runtime.manifest import Manifest

POSITION = ("pos", "pos_out")           # the position's state pair (input, output)
CONTROLS = ("START", "READY")           # the batcher's controls the graph takes ([B, 1] int32 each; unused)


def serving_graph(artifact: str | Path, sampling: str = "server", bodies: bool = True) -> onnx.ModelProto:
    """The wrapped graph, its weights still referring to the artifact's external data files. bodies=False
    keeps a plugin-flavour graph's samba.* nodes (a TensorRT build with plugins that Triton can load)."""
    artifact = Path(artifact)
    manifest = Manifest.load(artifact)
    proto = onnx.load(str(artifact / manifest.onnx_file), load_external_data=False)
    g = proto.graph
    if manifest.flavor == "plugin" and bodies:
        from samba_edge.plugins.onnx_bodies import body_functions

        proto.functions.extend(body_functions(proto))

    # the position: pos [B, 1] state in, start_pos [B] to the step graph, pos_out [B, 1] state out
    start = next(i for i in g.input if i.name == "start_pos")
    g.input.remove(start)
    pos_in = helper.make_tensor_value_info(POSITION[0], TensorProto.INT64, ["batch", 1])
    g.input.insert(1, pos_in)
    for i, name in enumerate(CONTROLS):
        g.input.insert(2 + i, helper.make_tensor_value_info(name, TensorProto.INT32, ["batch", 1]))
    n = helper.make_node
    c = helper.make_tensor
    head = [
        n("Constant", [], ["serve_flat"], value=c("serve_flat", TensorProto.INT64, [1], [-1])),
        n("Reshape", [POSITION[0], "serve_flat"], ["start_pos"]),
        n("Shape", ["input_ids"], ["serve_seq"], start=1, end=2),
        n("Add", [POSITION[0], "serve_seq"], [POSITION[1]]),
    ]
    # logits: the step graph's [B, S or 1, V] -> the last position's [B, V]
    for node in g.node:
        node.output[:] = ["serve_logits_all" if o == "logits" else o for o in node.output]
        node.input[:] = ["serve_logits_all" if i == "logits" else i for i in node.input]
    tail = [
        n("Constant", [], ["serve_last"], value=c("serve_last", TensorProto.INT64, [], [-1])),
        n("Gather", ["serve_logits_all", "serve_last"], ["logits"], axis=1),
    ]
    logits = next(o for o in g.output if o.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[-1]
    elem = logits.type.tensor_type.elem_type
    g.output.remove(logits)
    outs = [helper.make_tensor_value_info("logits", elem, ["batch", vocab.dim_value or vocab.dim_param])]
    if sampling == "server":
        tail.append(n("ArgMax", ["logits"], ["next_token"], axis=-1, keepdims=1))
        outs.append(helper.make_tensor_value_info("next_token", TensorProto.INT64, ["batch", 1]))
    outs.append(helper.make_tensor_value_info(POSITION[1], TensorProto.INT64, ["batch", 1]))
    for i, o in enumerate(outs):
        g.output.insert(i, o)
    body = list(g.node)
    del g.node[:]
    g.node.extend(head + body + tail)                     # topologically sorted
    onnx.checker.check_model(proto)
    return proto


def save_serving_graph(proto: onnx.ModelProto, artifact: str | Path, out_dir: Path,
                       name: str = "model.onnx") -> Path:
    """Write the graph into `out_dir` with its weights beside it (hard links where the file system
    allows, else copies): ONNX Runtime refuses external data outside the model's directory."""
    from samba_edge.runtime.atomic import link_or_copy

    artifact = Path(artifact)
    for f in sorted({i.value for t in proto.graph.initializer for i in t.external_data if i.key == "location"}):
        dst = out_dir / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(artifact / f, dst)
    path = out_dir / name
    onnx.save(proto, str(path))
    return path
