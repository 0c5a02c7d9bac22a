"""`samba-edge triton` repositories: config.pbtxt against Triton's own protobuf schema, the serving graph run
by ONNX Runtime with the state carried by the test (as Triton's implicit state carries it), the TensorRT
repository's config and refusals, bad options. The real server: tests/test_triton_server.py (`-m slow`).
"""
from __future__ import annotations

import numpy as np
import pytest

from samba_edge.runtime import SamplingParams, SambaEdgeError, open_model


def parse_config(path):
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def local_tokens(model, prompt, params):
    s = model.new_stream()
    s.feed(prompt)
    return list(s.generate_ids(params))



# ---- repositories for the C++ backends (config against Triton's schema; the graph by ONNX Runtime) ------
@pytest.mark.parametrize("flavor", ["portable", "plugin"])
def test_onnxruntime_repository_serving_graph_equals_local(tiny_export, tmp_path, flavor):
    import onnxruntime as ort

    from samba_edge.runtime.manifest import Manifest
    from samba_edge.tools.triton_repo import write_repository

    art = tiny_export(flavor)
    d = write_repository(art, tmp_path, "samba_ort", "onnxruntime", max_batch=4)
    cfg = parse_config(d / "config.pbtxt")
    m = Manifest.load(art)
    states = {s.input_name: s for s in cfg.sequence_batching.state}
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 4
    assert set(states) == {"pos", *(s.name for s in m.state)}
    assert all(s.initial_state[0].zero_data for s in states.values())
    assert [list(states[s.name].dims) for s in m.state] == [s.shape for s in m.state]
    sess = ort.InferenceSession(str(d / "1" / "model.onnx"))
    assert {c.name for c in cfg.sequence_batching.control_input} == {"START", "READY"}
    assert {i.name for i in sess.get_inputs()} == {"input_ids", "pos", "START", "READY", *states}
    # three sequences batched as the server batches them; the state carried between calls as it carries it
    model = open_model(str(art))
    rng = np.random.default_rng(2)
    prompts = rng.integers(0, m.vocab_size, (3, 7))
    want = [local_tokens(model, p, SamplingParams(max_new_tokens=5)) for p in prompts]
    carried = {s.input_name: np.zeros([3, *s.dims], np.int64 if s.input_name == "pos" else np.float32)
               for s in states.values()}
    ids, got = prompts, [[], [], []]
    for _ in range(5):
        out = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"input_ids": ids, "START": np.zeros([3, 1], np.int32),
                                       "READY": np.ones([3, 1], np.int32), **carried})))
        for s in states.values():
            carried[s.input_name] = out[s.output_name]
        for b in range(3):
            got[b].append(int(out["next_token"][b, 0]))
        ids = out["next_token"]
    assert got == want
    assert list(carried["pos"].ravel()) == [7 + 4] * 3               # the 5th token is drawn, not fed
    for b in range(3):                                                 # and the last logits are local's
        s = model.new_stream()
        s.feed(np.concatenate([prompts[b], got[b][:4]]))
        np.testing.assert_allclose(out["logits"][b], s.last_logits, rtol=1e-5, atol=1e-5)


def test_tensorrt_repository_config_and_refusals(tiny_export, tmp_path):
    from samba_edge.runtime.manifest import Manifest
    from samba_edge.tools.triton_repo import config_pbtxt, write_repository

    m = Manifest.load(tiny_export("portable"))
    path = tmp_path / "config.pbtxt"
    path.write_text(config_pbtxt(m, "samba_trt", "tensorrt", max_batch=2, gpu=True))
    cfg = parse_config(path)
    assert cfg.platform == "tensorrt_plan" and len(cfg.sequence_batching.state) == len(m.state) + 1
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    with pytest.raises(SambaEdgeError, match="TensorRT"):          # TensorRT-RTX or nothing here, never TensorRT
        write_repository(tiny_export("portable"), tmp_path / "r", "samba_trt", "tensorrt")
    assert not (tmp_path / "r" / "samba_trt").exists()


def test_python_repository_config_parses(tiny_export, tmp_path):
    from samba_edge.tools.triton_repo import write_repository

    d = write_repository(tiny_export("plugin"), tmp_path, "samba", "python", max_batch=3, instances=2,
                         idle_seconds=7, threads=1)
    cfg = parse_config(d / "config.pbtxt")
    assert cfg.backend == "python" and cfg.instance_group[0].count == 2
    assert cfg.sequence_batching.max_sequence_idle_microseconds == 7_000_000
    assert {c.name for c in cfg.sequence_batching.control_input} == {"START", "END", "CORRID"}
    assert (d / "1" / "artifact" / "manifest.json").is_file()
    assert cfg.parameters["runtime_backend"].string_value == "ort"
    with pytest.raises(SambaEdgeError, match="--force"):
        write_repository(tiny_export("plugin"), tmp_path, "samba", "python")


@pytest.mark.parametrize("args,match", [
    (["--backend", "triton"], "unknown --backend"),
    (["--name", "../x"], "--name"),
    (["--max-batch", "0"], "--max-batch"),
    (["--sampling", "maybe"], "--sampling"),
    (["--idle-seconds", "0"], "--idle-seconds"),
    (["--threads", "0"], "--threads"),
    (["--queue-delay-ms", "-1"], "--queue-delay-ms"),
])
def test_triton_command_refuses_bad_options(tiny_export, tmp_path, capsys, args, match):
    from samba_edge.tools.cli import main

    with pytest.raises(SystemExit) as e:
        main(["triton", str(tiny_export("portable")), "-o", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "r").glob("*/config.pbtxt"))
