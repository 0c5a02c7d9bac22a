"""validate must pass a faithful artifact and catch real faults, naming the right block with --bisect."""
import shutil

import numpy as np
import onnx
import pytest

pytest.importorskip("polygraphy")
pytest.importorskip("onnxruntime_extensions")

from samba_edge.plugins import reference  # noqa: E402
from samba_edge.runtime.errors import SambaEdgeError  # noqa: E402
from samba_edge.tests.test_cli import run  # noqa: E402
from samba_edge.runtime.integrity import record  # noqa: E402
from samba_edge.tools.validate import validate  # noqa: E402

CK = "builtin:samba-tiny-py"
FAST = dict(steps=6, chunks=(1, 7, 64), batch=1)          # 144 tokens: the 64-key window wraps twice


@pytest.fixture(scope="module")
def artifacts(tiny_export):
    return {fl: tiny_export(fl) for fl in ("plugin", "portable")}


def corrupted(src, dst, edit):
    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"))
    edit(m)
    onnx.save(m, str(dst / "model.onnx"))
    record(dst)                        # a faulty exporter: a wrong graph under a consistent manifest
    return dst


@pytest.mark.parametrize("flavor", ["plugin", "portable"])
def test_faithful_artifacts_pass(artifacts, flavor, tmp_path):
    rep = validate(str(artifacts[flavor]), bisect=True, save=str(tmp_path / "r.json"), polygraphy_dir=str(tmp_path / "pg"),
                   **FAST)
    assert rep["passed"] and rep["first_divergence"] is None
    assert {r["tensor"] for r in rep["rows"]} >= {"logits", "ssm_state.0.out", "k_window.1.out", "block.3.out"}
    assert (tmp_path / "pg" / "run_results.json").is_file() and (tmp_path / "pg" / "inputs.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pg", "r.json"]


def test_perturbed_weight_is_found_in_its_block(artifacts, tmp_path):
    def edit(m):
        w = next(i for i in m.graph.initializer if i.name == "model.transformer.h.2.norm_2.weight")
        a = onnx.numpy_helper.to_array(w).copy()
        a[3] += 0.5
        w.CopyFrom(onnx.numpy_helper.from_array(a, w.name))

    bad = corrupted(artifacts["portable"], tmp_path / "bad", edit)
    rep = validate(str(bad), bisect=True, **FAST)
    assert not rep["passed"]
    assert rep["first_divergence"]["layer"] == 2 and rep["first_divergence"]["tensor"] == "block.2.out"


def test_swapped_state_outputs_are_caught(artifacts, tmp_path):
    def edit(m):
        outs = {o.name: o for o in m.graph.output}
        for n in m.graph.node:                               # rename the producers, then the graph outputs
            n.output[:] = [{"k_window.1.out": "tmp_swap", "v_window.1.out": "k_window.1.out"}.get(o, o)
                           for o in n.output]
            n.output[:] = ["v_window.1.out" if o == "tmp_swap" else o for o in n.output]
        assert "k_window.1.out" in outs

    bad = corrupted(artifacts["portable"], tmp_path / "swap", edit)
    rep = validate(str(bad), bisect=True, **FAST)
    assert not rep["passed"] and rep["first_divergence"]["layer"] == 1


def test_broken_window_mask_is_found(artifacts, tmp_path):
    def edit(m):
        swa = [n for n in m.graph.node if n.op_type == "SlidingWindowAttention"][1]      # block 3
        for a in swa.attribute:
            if a.name == "window":
                a.i = 32

    bad = corrupted(artifacts["plugin"], tmp_path / "mask", edit)
    rep = validate(str(bad), bisect=True, **FAST)
    assert not rep["passed"] and rep["first_divergence"]["layer"] == 3


def test_plugin_reference_without_d_skip_is_caught(artifacts, monkeypatch):
    good = reference.REFERENCES["SelectiveScan"]

    def no_d(u, delta, A, B, C, D, z, delta_bias, ssm_state, delta_softplus=1):
        return good(u, delta, A, B, C, np.zeros_like(D), z, delta_bias, ssm_state, delta_softplus)

    monkeypatch.setitem(reference.REFERENCES, "SelectiveScan", no_d)
    rep = validate(str(artifacts["plugin"]), bisect=True, **FAST)
    assert not rep["passed"] and rep["first_divergence"]["layer"] == 0


def test_a_raising_reference_is_an_error_not_an_abort(artifacts, monkeypatch):
    """onnxruntime-extensions would terminate the process on an exception in a Python op: the runtime
    turns it into a SambaEdgeError after the run, and the next run works."""
    from samba_edge.runtime.backends import OrtBackend
    from samba_edge.runtime.errors import SambaEdgeError
    from samba_edge.runtime.session import Model

    model = Model(OrtBackend(artifacts["plugin"], ops="reference"))
    good = reference.REFERENCES["SelectiveScan"]

    def broken(*a, **k):
        raise ValueError("deliberately broken")

    monkeypatch.setitem(reference.REFERENCES, "SelectiveScan", broken)
    with pytest.raises(SambaEdgeError, match="deliberately broken"):
        model.new_stream().feed([1, 2, 3])
    monkeypatch.setitem(reference.REFERENCES, "SelectiveScan", good)
    assert np.isfinite(model.new_stream().feed([1, 2, 3])).all()


def test_cli_exit_codes_and_bad_input(capsys, artifacts, tmp_path):
    code, out, _ = run(capsys, "validate", str(artifacts["portable"]), "--steps", "3", "--batch", "1")
    assert code == 0 and "PASSED" in out
    def triple_first_weight(m):
        w = m.graph.initializer[0]
        w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 3, w.name))

    bad = corrupted(artifacts["portable"], tmp_path / "b", triple_first_weight)
    code, out, _ = run(capsys, "validate", str(bad), "--steps", "3", "--batch", "1")
    assert code == 1 and "FAILED" in out
    for args, match in [((str(tmp_path),), "no manifest.json"),
                        ((str(artifacts["portable"]), "--atol", "tiny"), "must be a number"),
                        ((str(artifacts["portable"]), "--backends", "trt"), "needs --engine"),
                        ((str(artifacts["portable"]), "--chunks", "1,x"), "comma-separated"),
                        ((str(artifacts["portable"]), "--reference", "/no/such/ck"), "not found")]:
        code, _, err = run(capsys, "validate", *args)
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_save_writes_only_the_report(capsys, artifacts, tmp_path):
    """`--save report.json` creates that one file (no Polygraphy RunResults beside it) and says so."""
    import json

    save = tmp_path / "report.json"
    code, out, err = run(capsys, "validate", str(artifacts["portable"]), "--steps", "2", "--batch", "1",
                         "--save", str(save))
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert json.loads(save.read_text())["passed"] and f"wrote: {save}" in out
    pg = tmp_path / "pg"
    code, out, err = run(capsys, "validate", str(artifacts["portable"]), "--steps", "2", "--batch", "1",
                         "--polygraphy-dir", str(pg))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pg", "report.json"]
    assert {"inputs.json", "reference_outputs.json", "run_results.json"} <= {p.name for p in pg.iterdir()}
    assert str(pg / "run_results.json") in out
    code, _, err = run(capsys, "validate", str(artifacts["portable"]), "--save", str(tmp_path / "no" / "r.json"))
    assert code == 2 and "not a directory" in err and len(err.strip().splitlines()) == 1, err


def test_reference_with_other_weights_is_refused(artifacts, tmp_path):
    from samba_edge.export.checkpoint import load_checkpoint, save_canonical

    ck = load_checkpoint(CK)
    sd = dict(ck.state_dict)
    sd["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"] * 1.01
    other = save_canonical(tmp_path / "other", ck.config, sd)
    with pytest.raises(SambaEdgeError, match="fingerprint differs"):
        validate(str(artifacts["portable"]), reference=str(other), **FAST)
    rep = validate(str(artifacts["portable"]), reference=str(other), allow_mismatch=True, **FAST)
    assert not rep["passed"]
