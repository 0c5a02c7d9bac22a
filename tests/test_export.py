"""ONNX export: both flavours run on ONNX Runtime and match the PyTorch model, chunk after chunk."""
import json

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")

from samba_edge.export.checkpoint import save_canonical  # noqa: E402
from samba_edge.export.onnx_export import export_onnx  # noqa: E402
from samba_edge.runtime.backends import OrtBackend  # noqa: E402
from samba_edge.runtime.errors import SambaEdgeError  # noqa: E402
from samba_edge.runtime.manifest import Manifest  # noqa: E402
from samba_edge.tests.helpers import tiny_model  # noqa: E402

TOL = 1e-4
PRESETS = ["tiny_gqa2_w8", "tiny_nope_w16", "tiny_untied_w8"]
UNTIED = PRESETS[2]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    out = {}
    for name in PRESETS:
        m = tiny_model(name, seed=3)
        out[name] = (save_canonical(root / name, m.config, m.state_dict()), m)
    return out


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    """(preset, flavour) -> its export, made on first use (the slow-marked cases add two presets' worth)."""
    root = tmp_path_factory.mktemp("art")

    class Lazy(dict):
        def __missing__(self, key):
            name, fl = key
            self[key] = export_onnx(str(checkpoints[name][0]), root / f"{name}-{fl}", flavor=fl, max_chunk=32)
            return self[key]

    return Lazy()


def run_schedule(step, state, ids, size, to_host=lambda state, pos: [np.array(s) for s in state]):
    """Feed ids in chunks of `size`; returns per-chunk (logits, state in the manifest's layout) after each
    call (a copy: a backend may update its own state in place, as ONNX Runtime's rings are)."""
    b, L = ids.shape
    res, p = [], 0
    while p < L:
        c = ids[:, p:p + size]
        logits, state = step(c, np.full(b, p, dtype=np.int64), state)
        p += c.shape[1]
        res.append((logits, to_host(state, np.full(b, p))))
    return res


RUNS = [("plugin", "reference"), ("plugin", "bodies"), ("portable", None)]   # plugin: the numpy references, and
                                                                          # the standard-op bodies ORT runs


@pytest.mark.parametrize("name, flavor, ops", [
    (n, f, o) if n == PRESETS[0] or (n, f) == (UNTIED, "portable") else pytest.param(n, f, o, marks=pytest.mark.slow)
    for n in PRESETS for f, o in RUNS])
def test_ort_matches_torch_chunk_by_chunk(checkpoints, artifacts, name, flavor, ops):
    _, model = checkpoints[name]
    be = OrtBackend(artifacts[(name, flavor)], threads=1, **({"ops": ops} if ops else {}))
    W = model.config.local_window

    def torch_step(c, pos, state):
        with torch.no_grad():
            out = model(torch.as_tensor(c), torch.as_tensor(pos), *[torch.as_tensor(s) for s in state])
        return out[0].numpy(), [s.numpy() for s in out[1:]]

    worst = 0.0
    for batch in (1, 3):
        ids = np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, 4 * W + 3))
        for size in (1, 5, W + 3):
            got = run_schedule(be.run, be.new_state(batch), ids, size, be.state_to_host)
            want = run_schedule(torch_step, model.empty_state(batch), ids, size)
            for (lg, sg), (lw, sw) in zip(got, want):
                worst = max(worst, np.abs(lg - lw).max(), *(np.abs(a - b).max() for a, b in zip(sg, sw)))
    assert worst <= TOL, f"{name}/{flavor}: max-abs {worst:.2e}"


def test_an_untied_head_is_its_own_weight_gemm_and_quantises(checkpoints, artifacts, tmp_path):
    """mamba_init false: the head is a (d, V) initializer of its own; calibration labels it lm_head, keeps it
    fp32 with include_head=False and quantises it with include_head=True (the default), and the int8 model runs."""
    from samba_edge.calibration.int8 import calibrate, gemm_labels

    art = artifacts[(UNTIED, "portable")]
    cfg = checkpoints[UNTIED][1].config
    proto = onnx.load(str(art / "model.onnx"))
    labels = gemm_labels(proto, Manifest.load(art).model)
    (head,) = [n for n, lab in labels.items() if lab == "lm_head"]
    node = next(n for n in proto.graph.node if n.name == head)
    weights = {i.name: list(i.dims) for i in proto.graph.initializer}
    assert weights[node.input[1]] == [cfg.n_embd, cfg.padded_vocab_size]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 4096)
    np.save(tmp_path / "ids.npy", ids)
    dq = {}
    for include in (False, True):
        out = tmp_path / f"int8-{include}"
        calibrate(art, out, token_ids=str(tmp_path / "ids.npy"), samples=4, chunk=32, include_head=include,
                  progress=False)
        g = onnx.load(str(out / "model.onnx")).graph
        producers = {o: n for n in g.node for o in n.output}
        matmul = next(n for n in g.node if n.name == head)
        dq[include] = getattr(producers.get(matmul.input[1]), "op_type", None) == "DequantizeLinear"
        be = OrtBackend(out, threads=1)
        logits, _ = be.run(ids[None, :9], np.zeros(1, np.int64), be.manifest.empty_state(1))
        assert np.isfinite(logits).all()
    assert dq == {False: False, True: True}


def test_flavours_have_the_promised_ops(artifacts):
    plugin = onnx.load(str(artifacts[("tiny_gqa2_w8", "plugin")] / "model.onnx"))
    portable = onnx.load(str(artifacts[("tiny_gqa2_w8", "portable")] / "model.onnx"))
    custom = [n for n in plugin.graph.node if n.domain == "samba"]
    assert sorted({n.op_type for n in custom}) == ["SelectiveScan", "SlidingWindowAttention"]
    assert len(custom) == 4                                               # 2 Mamba + 2 attention layers
    for n in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_version"] == b"1"
        if n.op_type == "SlidingWindowAttention":
            assert (attrs["window"], attrs["num_heads"], attrs["num_kv_heads"], attrs["head_size"]) == (8, 4, 2, 8)
    assert all(n.domain in ("", "ai.onnx") for n in portable.graph.node)
    assert {o.domain for o in portable.opset_import} <= {"", "ai.onnx"}
    assert "Scan" in {n.op_type for n in portable.graph.node}


def test_manifest_is_the_table(artifacts, checkpoints):
    art = artifacts[("tiny_gqa2_w8", "plugin")]
    man = Manifest.load(art)
    graph = onnx.load(str(art / "model.onnx")).graph
    assert [i.name for i in graph.input] == [t.name for t in man.inputs]
    assert [o.name for o in graph.output] == [t.name for t in man.outputs]
    for spec, vi in zip(man.inputs, graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        assert [None if isinstance(s, str) else s for s in spec.shape] == dims, spec.name
    assert [s.name for s in man.state] == [n for n, _ in checkpoints["tiny_gqa2_w8"][1].config.state_shapes()]
    assert man.state[2].shape == [2, 7, 8] and man.window == 8 and man.max_chunk == 32
    assert man.inputs[0].dynamic_axes == {"0": "batch", "1": "seq"} and man.inputs[2].dynamic_axes == {"0": "batch"}
    assert len(man.fingerprint) == 64 and man.format_version == 1


@pytest.mark.slow
def test_export_is_deterministic(checkpoints, artifacts, tmp_path):
    ck, _ = checkpoints["tiny_gqa2_w8"]
    again = export_onnx(str(ck), tmp_path / "again", flavor="plugin", max_chunk=32)
    first = artifacts[("tiny_gqa2_w8", "plugin")]
    for f in ("model.onnx", "manifest.json"):
        assert (again / f).read_bytes() == (first / f).read_bytes(), f


@pytest.mark.slow
def test_last_only_logits(checkpoints, tmp_path):
    ck, model = checkpoints["tiny_gqa2_w8"]
    art = export_onnx(str(ck), tmp_path / "last", flavor="portable", max_chunk=16, logits="last")
    be = OrtBackend(art, threads=1)
    ids = np.arange(10)[None] % 200
    logits, _ = be.run(ids, np.zeros(1, np.int64), be.manifest.empty_state(1))
    with torch.no_grad():
        ref = model(torch.as_tensor(ids), torch.zeros(1, dtype=torch.long), *model.empty_state(1))[0][:, -1:]
    assert logits.shape == (1, 1, model.config.padded_vocab_size)
    assert np.abs(logits - ref.numpy()).max() <= TOL


def test_bad_input_never_leaves_a_half_written_outdir(checkpoints, artifacts, tmp_path):
    ck, _ = checkpoints["tiny_gqa2_w8"]
    with pytest.raises(SambaEdgeError, match="unknown flavour"):
        export_onnx(str(ck), tmp_path / "a", flavor="tensorrt")
    with pytest.raises(SambaEdgeError, match="already exists"):
        export_onnx(str(ck), artifacts[("tiny_gqa2_w8", "plugin")])
    with pytest.raises(SambaEdgeError, match="too old"):
        export_onnx(str(ck), tmp_path / "b", opset=13)
    with pytest.raises(SambaEdgeError, match="does not match config 'tiny_mha_w16'"):
        export_onnx(str(ck), tmp_path / "c", config="tiny_mha_w16")
    assert list(tmp_path.iterdir()) == []                                 # nothing half-written, no temp dirs


def test_unwritable_output(checkpoints, tmp_path):
    ck, _ = checkpoints["tiny_gqa2_w8"]
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SambaEdgeError, match="cannot write"):
        export_onnx(str(ck), blocker / "sub" / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_eval_on_artifact_equals_checkpoint(checkpoints, artifacts, tmp_path):
    from samba_edge.tools.evaluate import evaluate

    ck, _ = checkpoints["tiny_gqa2_w8"]
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 250, 70))
    ref = evaluate(str(ck), token_ids=str(tmp_path / "ids.npy"), chunk=7)
    for fl in ("plugin", "portable"):
        got = evaluate(str(artifacts[("tiny_gqa2_w8", fl)]), token_ids=str(tmp_path / "ids.npy"), chunk=7,
                       backend="ort")
        assert got["tokens"] == ref["tokens"] == 69 and abs(got["nll"] - ref["nll"]) < 1e-5
    with pytest.raises(SambaEdgeError, match="exceeds the artifact's max chunk"):
        evaluate(str(artifacts[("tiny_gqa2_w8", "plugin")]), token_ids=str(tmp_path / "ids.npy"), chunk=64)
    assert json.loads((artifacts[("tiny_gqa2_w8", "plugin")] / "manifest.json").read_text())["flavor"] == "plugin"


@pytest.mark.slow
def test_cli_export_errors_exit_2(capsys, checkpoints, tmp_path):
    from samba_edge.tests.test_cli import run

    ck, _ = checkpoints["tiny_gqa2_w8"]
    code, _, err = run(capsys, "export", str(ck), "-o", str(tmp_path / "x"), "--flavor", "trt")
    assert code == 2 and err.count("\n") == 1 and "unknown flavour" in err
    code, out, err = run(capsys, "export", str(ck), "-o", str(tmp_path / "ok"), "--flavor", "portable",
                         "--max-chunk", "8")
    assert code == 0 and (tmp_path / "ok" / "manifest.json").is_file(), err
