"""Bad input, by class, at every boundary where data enters: each case is a one-line `error:` with exit 2
(CLI) or a SambaEdgeError (API) naming the problem, never an internal error, and leaves no new or changed
file behind. Property-based tests (hypothesis) throw random values at the same boundaries: it works or it
is a clean error.

Classes here: sampling flags, text and paths, API token ids and batched steps, snapshots, artifacts
(manifest schema, graph signature, file digests, the export cache), checkpoints and configs.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("onnxruntime")

from samba_edge.runtime import SamplingParams, open_model  # noqa: E402
from samba_edge.runtime.errors import SambaEdgeError  # noqa: E402
from samba_edge.runtime.userio import token_ids  # noqa: E402
from samba_edge.tests.test_cli import run  # noqa: E402

CLASSES = {}                       # class -> number of cases, for the README's count (test_class_count)


def cases(cls: str, items: list) -> list:
    CLASSES[cls] = CLASSES.get(cls, 0) + len(items)
    return items


def _tree(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def art(tiny_export):
    return tiny_export("portable")


@pytest.fixture(scope="module")
def model(art):
    return open_model(str(art))


@pytest.fixture()
def work(tmp_path, model):
    """A scratch directory holding a good snapshot, a UTF-8 and a Latin-1 file, and a subdirectory."""
    s = model.new_stream()
    s.feed([1, 2, 3])
    s.snapshot(tmp_path / "good.safetensors")
    (tmp_path / "ok.txt").write_text("def f(x):\n    return x\n")
    (tmp_path / "latin1.txt").write_bytes("café = 1\n".encode("latin-1"))
    (tmp_path / "adir").mkdir()
    return tmp_path


SAMPLING_CLI = cases("sampling flags", [
    (["--temperature", "nan"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-1"], "--temperature"), (["--top-p", "nan"], "--top-p"), (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"), (["--repetition-penalty", "nan"], "--repetition-penalty"),
    (["--repetition-penalty", "0"], "--repetition-penalty"), (["--top-k", "-3"], "--top-k"),
    (["--seed", "-1"], "--seed"), (["-n", "-1"], "--max-new-tokens"), (["--stop", ""], "stop string"),
    (["--stop", "\\x4"], "escape|stop"), (["--stop-id", "-5"], "--stop-id"),
])


@pytest.mark.parametrize("flags, match", SAMPLING_CLI)
def test_sampling_flags_are_refused_before_anything_runs(capsys, art, work, flags, match):
    before = _tree(work)
    code, out, err = run(capsys, "generate", str(art), "-p", "def f(", "--state-out", str(work / "s.safetensors"),
                         *flags)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and re.search(match, err), (flags, out, err)
    assert "Traceback" not in err and _tree(work) == before


TEXT_AND_PATHS = cases("text and paths", [
    (["generate", "{art}", "-p", "caf\udce9"], "not valid UTF-8"),
    (["generate", "{art}", "--prompt-file", "{work}/adir"], "is a directory"),
    (["generate", "{art}", "--prompt-file", "{work}/latin1.txt"], "not UTF-8"),
    (["generate", "{art}", "--prompt-file", "{work}/missing.txt"], "not found"),
    (["generate", "{art}", "-p", "x", "--state-out", "{work}/adir"], "--state-out .* is a directory"),
    (["generate", "{art}", "-p", "x", "--state-out", "{work}/no/such/s.safetensors"], "does not exist"),
    (["chat", "{art}", "--state-out", "{work}/adir"], "--state-out .* is a directory"),
    (["eval", "{art}", "--text", "{work}/adir"], "is a directory"),
    (["eval", "{art}", "--text", "{work}/latin1.txt"], "not UTF-8"),
    (["eval", "{art}", "--token-ids", "{work}/adir"], "is a directory"),
    (["calibrate", "{art}", "-o", "{work}/q", "--text", "{work}/adir"], "is a directory"),
])


@pytest.mark.parametrize("args, match", TEXT_AND_PATHS)
def test_text_and_paths(capsys, art, work, args, match):
    before = _tree(work)
    code, out, err = run(capsys, *[a.format(art=art, work=work) for a in args])
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), (args, err)
    assert "Traceback" not in err and _tree(work) == before


def test_chat_stdin_that_is_not_utf8_is_refused_by_line(art, work):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "samba_edge.tools.cli", "chat", str(art), "-n", "2"],
                       input="def f():\n".encode() + b"caf\xe9\n", capture_output=True, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 2 and "chat input line 2 is not valid UTF-8" in err and "Traceback" not in err, err


TOKEN_IDS = cases("API token ids", [
    ([1.0, 2.0], "must be integers"), ([True, 2], "must be integers"), (["1", "2"], "must be integers"),
    ("123", "sequence of integers"), (b"\x01", "sequence of integers"), ([float("nan")], "must be integers"),
    (np.array([[1, 2]]), "1-D"), (np.array([1.5]), "1-D sequence of integers"), ([2 ** 70], "beyond int64"),
    (np.array([2 ** 64 - 1], dtype=np.uint64), "beyond int64"), ([-1], "outside the vocabulary"),
    ([[1], [2]], "must be integers"), (7, "sequence of integers"), ({1: 2}, "sequence of integers"),
])


@pytest.mark.parametrize("ids, match", TOKEN_IDS)
def test_api_token_ids(model, ids, match):
    s = model.new_stream()
    with pytest.raises(SambaEdgeError, match=match):
        s.feed(ids)
    assert s.position == 0 and s.last_logits is None                   # nothing was consumed


def test_token_ids_accepts_every_integer_form(model):
    for ids in ([1, 2], (1, 2), range(1, 3), np.array([1, 2], dtype=np.int32), np.array([1, 2], dtype=np.uint16),
                [np.int64(1), np.int8(2)]):
        assert token_ids(ids, model.vocab_size).tolist() == [1, 2]


def test_batched_step_refuses_the_same_stream_twice(model):
    a, b = model.new_stream(), model.new_stream()
    a.feed([1, 2])
    before = model.backend.state_to_host(a.state)
    for streams, toks, match in [([a, a], [[3], [4]], "same stream twice"), ([a, b], [[3], [4, 5]], "equally long"),
                                 ([a, b], [[3], [1.5]], "must be integers"), ([a], [[3], [4]], "one token list"),
                                 ([a, b], [[], []], "non-empty")]:
        with pytest.raises(SambaEdgeError, match=match):
            model.step(streams, toks)
    assert a.position == 2 and all(np.array_equal(x, y) for x, y in zip(before, model.backend.state_to_host(a.state)))


# ---- snapshots ---------------------------------------------------------------------------------------
def _resign(tensors: dict, meta: dict) -> dict:
    """Metadata with a valid checksum, as a forger who read snapshot.py would write it."""
    from samba_edge.runtime.snapshot import _checksum

    return {**meta, "checksum": _checksum(tensors, meta)}


def _forged(work, name, edit_tensors=None, edit_extra=None, resign=True):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(work / "good.safetensors"), framework="numpy") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_extra:
        extra = json.loads(meta["extra"])
        edit_extra(extra)
        meta["extra"] = json.dumps(extra)
    save_file(tensors, str(work / name), metadata=_resign(tensors, meta) if resign else meta)
    return work / name


def _first_state(t):
    return next(k for k in t if k.startswith("conv_state"))


SNAPSHOTS = cases("snapshots", [
    (dict(edit_extra=lambda e: e["recent"].append(10 ** 9), resign=False), "checksum"),
    (dict(edit_extra=lambda e: e["rng"]["state"].update(state=1), resign=False), "checksum"),
    (dict(edit_extra=lambda e: e["recent"].append(10 ** 9)), "recent tokens"),
    (dict(edit_extra=lambda e: e["recent"].append("x")), "recent tokens"),
    (dict(edit_extra=lambda e: e.update(rng={"bit_generator": "MT19937"})), "random generator"),
    (dict(edit_extra=lambda e: e.update(rng="zzz")), "random generator"),
    (dict(edit_tensors=lambda t: t.update(position=np.array([-4], dtype=np.int64))), "position"),
    (dict(edit_tensors=lambda t: t.pop("position")), "position"),
    (dict(edit_tensors=lambda t: t.update(position=np.array([1.0], dtype=np.float32))), "position"),
    (dict(edit_tensors=lambda t: t[_first_state(t)].__setitem__((0, 0, 0), np.nan)), "NaN or Inf"),
    (dict(edit_tensors=lambda t: t.update({_first_state(t): np.concatenate([t[_first_state(t)]] * 2)})), "one stream"),
    (dict(edit_tensors=lambda t: t.pop(_first_state(t))), "lacks state tensor"),
    (dict(edit_tensors=lambda t: t.update({"extra.last_logits": np.full(4, np.inf, np.float32)})), "last logits"),
])


@pytest.mark.parametrize("forge, match", SNAPSHOTS)
def test_crafted_snapshots_are_refused(model, work, forge, match):
    path = _forged(work, "forged.safetensors", **forge)
    with pytest.raises(SambaEdgeError, match=match):
        model.restore(path)


def test_version_1_snapshots_still_restore(model, work):
    """Format 1 (checksum over the tensors only) is read, with every field checked."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from samba_edge.runtime.snapshot import _checksum

    with safe_open(str(work / "good.safetensors"), framework="numpy") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(work / "v1.safetensors"), metadata={**meta, "format_version": "1",
                                                               "checksum": _checksum(tensors)})
    assert model.restore(work / "v1.safetensors").position == 3


# ---- artifacts -----------------------------------------------------------------------------------------
def _edit_manifest(edit):
    def apply(d):
        m = json.loads((d / "manifest.json").read_text())
        m = edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
    return apply


def _set(path: str, value):
    def edit(m):
        *head, last = path.split(".")
        node = m
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(last) if isinstance(node, list) else last] = value
        return m
    return edit


def _truncate(d):
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 3])


def _truncate_and_record(d):
    from samba_edge.runtime.integrity import record

    _truncate(d)
    record(d)


def _graph_edit(edit):
    """A valid graph that disagrees with its manifest, digests re-recorded (a faulty exporter)."""
    def apply(d):
        import onnx

        from samba_edge.runtime.integrity import record

        m = onnx.load(str(d / "model.onnx"))
        edit(m.graph)
        onnx.save(m, str(d / "model.onnx"))
        record(d)
    return apply


def _swap_outputs(g):
    a, b = g.output[1], g.output[2]
    a2, b2 = type(a)(), type(b)()
    a2.CopyFrom(b)
    b2.CopyFrom(a)
    g.output[1].CopyFrom(a2)
    g.output[2].CopyFrom(b2)


def _grow_input(g):
    g.input[2].type.tensor_type.shape.dim[1].dim_value += 1


ARTIFACTS = cases("artifacts", [
    (_truncate, "not the file this manifest was written with"),
    (_truncate_and_record, "ONNX Runtime cannot load"),
    (_graph_edit(_swap_outputs), "graph's outputs .* are not the manifest's"),
    (_graph_edit(_grow_input), "cannot load|in the graph but"),
    (lambda d: (d / "model.onnx.data").write_bytes(b"x"), "does not list"),
    (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing|no model.onnx"),
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), "not a manifest object"),
    (lambda d: (d / "manifest.json").write_text('"x"'), "not a manifest object"),
    (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe"), "not valid JSON"),
    (_edit_manifest(_set("onnx_file", "../model.onnx")), "not a file name inside"),
    (_edit_manifest(_set("onnx_file", "/etc/passwd")), "not a file name inside"),
    (_edit_manifest(_set("flavor", "tensorrt")), "flavor"),
    (_edit_manifest(_set("dtype", "bf16")), "dtype"),
    (_edit_manifest(_set("max_chunk", 0)), "max_chunk"),
    (_edit_manifest(_set("max_chunk", "big")), "max_chunk"),
    (_edit_manifest(_set("opset", 7)), "opset"),
    (_edit_manifest(_set("model.vocab_size", -1)), "vocab_size"),
    (_edit_manifest(_set("model", [])), "model is not a config"),
    (_edit_manifest(_set("state.0.shape", [64, 9])), "state table is not the model"),
    (_edit_manifest(_set("inputs.2.dtype", "float16")), "input conv_state.0"),
    (_edit_manifest(_set("outputs.1.name", "ssm_state.0.out")), "inputs/outputs are not"),
    (_edit_manifest(_set("window", 3)), "window"),
    (_edit_manifest(_set("fingerprint", 5)), "fingerprint"),
    (_edit_manifest(_set("files", ["model.onnx"])), "files is not a table"),
    (_edit_manifest(_set("kernels", "../../x.json")), "leaves the artifact"),
    (_edit_manifest(lambda m: {k: v for k, v in m.items() if k != "state"}), "incomplete or malformed"),
])


@pytest.mark.parametrize("damage, match", ARTIFACTS)
def test_damaged_artifacts_are_refused_on_open(art, tmp_path, capsys, damage, match):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    damage(bad)
    with pytest.raises(SambaEdgeError, match=match):
        open_model(str(bad))
    code, _, err = run(capsys, "generate", str(bad), "-p", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_validate_always_checks_the_files(art, tmp_path, monkeypatch):
    """Above VERIFY_ON_OPEN bytes `open` skips the digest check (cost); validate never does."""
    import shutil

    from samba_edge.runtime import integrity
    from samba_edge.tools.validate import validate

    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-10] ^= 1
    (bad / "model.onnx").write_bytes(bytes(data))
    monkeypatch.setattr(integrity, "VERIFY_ON_OPEN", 0)
    with pytest.raises(SambaEdgeError, match="sha256 differs"):
        validate(str(bad), steps=1)


@pytest.mark.slow                      # the rebuild is an export (~15 s)
def test_a_poisoned_export_cache_entry_is_rebuilt(tmp_path, monkeypatch, capsys, warm_cache):
    import shutil

    from samba_edge.runtime.session import cached_export

    shutil.copytree(warm_cache, tmp_path / "cache")
    monkeypatch.setenv("SAMBA_EDGE_CACHE", str(tmp_path / "cache"))
    first = cached_export("builtin:samba-tiny-py")
    good = (first / "model.onnx").read_bytes()
    (first / "model.onnx").write_bytes(good[:1000])                          # poisoned
    again = cached_export("builtin:samba-tiny-py")
    assert again == first and (again / "model.onnx").read_bytes() == good and "damaged" in capsys.readouterr().err
    assert open_model("builtin:samba-tiny-py").new_stream().feed([1, 2]).shape[0] >= 250


# ---- checkpoints and configs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    from samba_edge.export.config import get_config
    from samba_edge.export.model import Samba

    return {k: v.clone() for k, v in Samba(get_config("tiny_mha_w16")).state_dict().items()}


def _legacy_pth(d, sd):
    import torch

    p = d / "legacy.pth"
    torch.save({"model": sd, "hparams": {"model_name": "tiny_mha_w16"}}, p, _use_new_zipfile_serialization=False)
    return [str(p)]


def _nan_pth(d, sd):
    import torch

    bad = dict(sd)
    bad["transformer.h.1.attn.proj.weight"] = bad["transformer.h.1.attn.proj.weight"].clone()
    bad["transformer.h.1.attn.proj.weight"][0, 0] = float("nan")
    p = d / "nan.pth"
    torch.save({"model": bad, "hparams": {"model_name": "tiny_mha_w16"}}, p)
    return [str(p)]


def _sharded(d, sd, weight_map):
    from samba_edge.export.config import get_config

    c = d / "ck"
    c.mkdir()
    get_config("tiny_mha_w16").save(c / "config.json")
    (c / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [str(c)]


def _config_json(d, sd, **fields):
    p = d / "c.json"
    p.write_text(json.dumps({"n_layer": 4, "n_embd": 32, "n_head": 4, "intermediate_size": 64, "local_window": 16,
                             "mb_per_layer": 2, **fields}))
    return ["builtin:samba-tiny-py", "--config", str(p)]


CHECKPOINTS = cases("checkpoints and configs", [
    (lambda d, sd: _nan_pth(d, sd), "NaN/Inf weights: transformer.h.1.attn.proj.weight"),
    (lambda d, sd: _sharded(d, sd, ["model-0.safetensors"]), "weight_map must map"),
    (lambda d, sd: _sharded(d, sd, {"a": "../../etc/passwd"}), "weight_map must map"),
    (lambda d, sd: _sharded(d, sd, {"a": "model-00001.safetensors"}), "not there"),
    (lambda d, sd: _config_json(d, sd, n_embd=10 ** 9), "beyond any model"),
    (lambda d, sd: _config_json(d, sd, norm_eps=0), "norm_eps"),
    (lambda d, sd: _config_json(d, sd, norm_eps=-1), "norm_eps"),
    (lambda d, sd: ["builtin:samba-tiny-py", "--opset", "99"], "knows opsets up to"),
])


@pytest.mark.parametrize("make, match", CHECKPOINTS)
def test_bad_checkpoints_and_configs(capsys, tmp_path, tiny_sd, make, match):
    args = make(tmp_path, tiny_sd)
    before = _tree(tmp_path)
    code, _, err = run(capsys, "export", *args, "-o", str(tmp_path / "out"), "--flavor", "portable")
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err) and "Traceback" not in err, err
    assert _tree(tmp_path) == before


def test_legacy_torch_save_checkpoints_load(tmp_path, tiny_sd):
    """A pre-1.6 (non-zip) torch.save file loads, still with weights_only=True."""
    import torch

    from samba_edge.export.checkpoint import load_checkpoint

    ck = load_checkpoint(_legacy_pth(tmp_path, tiny_sd)[0])
    assert all(torch.equal(ck.state_dict[k], v) for k, v in tiny_sd.items())


# ---- properties ---------------------------------------------------------------------------------------
finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10 ** 20), st.booleans(),
                          st.text(max_size=3), st.none())


@settings(max_examples=300, deadline=None)
@given(temperature=finite_or_not, top_k=finite_or_not, top_p=finite_or_not, repetition_penalty=finite_or_not,
       seed=finite_or_not, max_new_tokens=finite_or_not)
def test_sampling_params_work_or_refuse_cleanly(temperature, top_k, top_p, repetition_penalty, seed, max_new_tokens):
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
              max_new_tokens=max_new_tokens)
    kw = {k: v for k, v in kw.items() if v is not None or k == "seed"}
    try:
        p = SamplingParams(**kw)
    except SambaEdgeError:
        return
    assert p.temperature >= 0 and math.isfinite(p.temperature) and 0 < p.top_p <= 1 and p.repetition_penalty > 0
    assert isinstance(p.top_k, int) and p.top_k >= 0 and (p.seed is None or p.seed >= 0)
    from samba_edge.runtime.sampling import choose

    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    assert 0 <= choose(logits, p, np.random.default_rng(p.seed), recent=[1, 2]) < 50


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=4),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.sampled_from(["rng", "recent", "other"]), json_values, max_size=3),
       position=st.integers(-2 ** 63, 2 ** 63 - 1))
def test_snapshot_metadata_restores_or_refuses_cleanly(model, work, extra, position):
    def set_extra(e):
        e.clear()
        e.update(extra)

    path = _forged(work, "prop.safetensors", edit_extra=set_extra,
                   edit_tensors=lambda t: t.update(position=np.array([position], dtype=np.int64)))
    try:
        s = model.restore(path)
    except SambaEdgeError:
        return
    assert s.position == position >= 0
    s.feed([1])                                              # a restored stream is usable


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_manifests_open_or_refuse_cleanly(art, tmp_path_factory, data):
    """One field of a real manifest (top level, model config, a tensor or state entry) set to a random JSON
    value: opening works or is a SambaEdgeError, never another exception."""
    import shutil

    d = tmp_path_factory.mktemp("man")
    shutil.rmtree(d)
    shutil.copytree(art, d)
    m = json.loads((d / "manifest.json").read_text())
    where = data.draw(st.sampled_from(["top", "model", "inputs", "outputs", "state"]))
    node = m if where == "top" else m[where] if where == "model" else data.draw(st.sampled_from(m[where]))
    key = data.draw(st.sampled_from(sorted(node)))
    node[key] = data.draw(json_values)
    (d / "manifest.json").write_text(json.dumps(m))
    try:
        model = open_model(str(d))
    except SambaEdgeError:
        return
    assert np.isfinite(model.new_stream().feed([1, 2])).all()


@settings(max_examples=200, deadline=None)
@given(ids=st.one_of(st.lists(st.one_of(st.integers(-2 ** 70, 2 ** 70), st.floats(), st.booleans(), st.text(max_size=2)),
                              max_size=5), st.text(max_size=4), st.integers(), st.floats()))
def test_token_ids_in_range_or_refused(ids):
    try:
        a = token_ids(ids, 300)
    except SambaEdgeError:
        return
    assert a.dtype == np.int64 and a.ndim == 1 and ((a >= 0) & (a < 300)).all() and a.tolist() == list(ids)


def test_class_count():
    """Every class above contributes cases, and the README quotes their number."""
    from pathlib import Path

    assert set(CLASSES) == {"sampling flags", "text and paths", "API token ids", "snapshots", "artifacts",
                            "checkpoints and configs"}
    assert all(n >= 5 for n in CLASSES.values())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"tests/test_hardening\.py tries (\d+) cases in these (\d+) classes", readme)
    assert m and (int(m.group(1)), int(m.group(2))) == (sum(CLASSES.values()), len(CLASSES)), \
        f"README: update to {sum(CLASSES.values())} cases in {len(CLASSES)} classes"
