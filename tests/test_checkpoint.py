"""Checkpoints users have: official training pickles, bare state dicts, canonical (sharded) directories."""
import json

import pytest
import torch
from safetensors.torch import save_file

from samba_edge.export.checkpoint import load_checkpoint, save_canonical
from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.tests.helpers import full_forward, tiny_model
from samba_edge.tools.convert import convert_checkpoint

CFG = "tiny_gqa2_w8"


@pytest.fixture(scope="module")
def model():
    return tiny_model(CFG, seed=5)


def official_pickle(path, model, **extra):
    """The shape Lightning Fabric's pretrain.py writes: both tied keys, optimizer, hparams with model_name."""
    sd = model.state_dict()
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "iter_num": 10, "step_count": 5,
                "hparams": {"model_name": CFG, "learning_rate": 4e-4}, **extra}, path)
    return path


def test_official_training_checkpoint_loads_with_its_own_config(tmp_path, model):
    ck = load_checkpoint(str(official_pickle(tmp_path / "iter-000010-ckpt.pth", model)))
    assert ck.config.name == CFG                                       # from hparams["model_name"]
    ids = torch.randint(0, 250, (2, 19))
    assert torch.equal(full_forward(ck.model(), ids), full_forward(model, ids))


@pytest.mark.parametrize("drop", ["lm_head.weight", "transformer.wte.weight"])
def test_bare_state_dict_with_either_tied_key_missing(tmp_path, model, drop):
    sd = {k: v for k, v in model.state_dict().items() if k != drop}
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(SambaEdgeError, match="--config"):
        load_checkpoint(str(tmp_path / "sd.pt"))                        # a bare dict carries no config
    m = load_checkpoint(str(tmp_path / "sd.pt"), config=CFG).model()
    assert m.lm_head.weight is m.transformer.wte.weight
    assert torch.equal(m.lm_head.weight, model.lm_head.weight)


def test_wrapper_prefixes_are_stripped(tmp_path, model):
    torch.save({f"_forward_module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    load_checkpoint(str(tmp_path / "w.pt"), config=CFG)


def test_convert_round_trip_is_bit_exact(tmp_path, model):
    src = official_pickle(tmp_path / "ck.pth", model)
    out = convert_checkpoint(str(src), str(tmp_path / "canon"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    a, b = load_checkpoint(str(src)).state_dict, load_checkpoint(str(out)).state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with pytest.raises(SambaEdgeError, match="already exists"):
        convert_checkpoint(str(src), str(out))
    convert_checkpoint(str(src), str(out), force=True)


def test_bf16_weights_keep_their_bits(tmp_path, model):
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save({"model": sd, "hparams": {"model_name": CFG}}, tmp_path / "bf16.pth")
    out = convert_checkpoint(str(tmp_path / "bf16.pth"), str(tmp_path / "c"))
    got = load_checkpoint(str(out)).state_dict
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], sd[k]) for k in sd)


def test_sharded_safetensors_directory(tmp_path, model):
    d = tmp_path / "sharded"
    d.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(d / "model-00002-of-00002.safetensors"))
    wm = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    model.config.save(d / "config.json")
    ids = torch.randint(0, 250, (1, 11))
    assert torch.equal(full_forward(load_checkpoint(str(d)).model(), ids), full_forward(model, ids))


def _bad_sd(model, kind):
    sd = dict(model.state_dict())
    if kind == "missing":
        del sd["transformer.h.0.attn.A_log"]
    elif kind == "unexpected":
        sd["transformer.h.0.attn.extra.weight"] = torch.zeros(3)
    elif kind == "shape":
        sd["transformer.h.1.attn.attn.weight"] = torch.zeros(5, 32)
    elif kind == "dtype":
        sd["transformer.h.0.attn.D"] = torch.zeros(64, dtype=torch.int32)
    return sd


@pytest.mark.parametrize("kind,match", [("missing", "missing transformer.h.0.attn.A_log"),
                                        ("unexpected", "unexpected transformer.h.0.attn.extra.weight"),
                                        ("shape", r"shape \(5, 32\), expected"),
                                        ("dtype", "dtype torch.int32")])
def test_mismatches_are_listed_never_partially_loaded(tmp_path, model, kind, match):
    torch.save(_bad_sd(model, kind), tmp_path / "bad.pt")
    with pytest.raises(SambaEdgeError, match=match) as e:
        load_checkpoint(str(tmp_path / "bad.pt"), config=CFG)
    assert "tiny_gqa2_w8" in str(e.value)                                 # names the config it checked against


def test_wrong_config_is_reported(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(SambaEdgeError, match=r"does not match config 'tiny_mha_w16'.*expected \(96, 32\)"):
        load_checkpoint(str(tmp_path / "m.pt"), config="tiny_mha_w16")
    with pytest.raises(SambaEdgeError, match=r"'tiny_partial_rope_w8': unexpected .* \(and \d+ more\)"):
        load_checkpoint(str(tmp_path / "m.pt"), config="tiny_partial_rope_w8")


class NotAllowed:                                                        # needs code execution to unpickle
    pass


def test_pickles_needing_code_execution_are_refused(tmp_path, model):
    torch.save({"model": model.state_dict(), "obj": NotAllowed()}, tmp_path / "evil.pth")
    with pytest.raises(SambaEdgeError, match="code execution"):
        load_checkpoint(str(tmp_path / "evil.pth"), config=CFG)


def test_truncated_and_non_state_dict_files(tmp_path, model):
    official_pickle(tmp_path / "ok.pth", model)
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(SambaEdgeError, match="truncated"):
        load_checkpoint(str(tmp_path / "cut.pth"), config=CFG)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(SambaEdgeError, match="not a state dict"):
        load_checkpoint(str(tmp_path / "list.pt"), config=CFG)
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(SambaEdgeError, match="does not match|state dict"):
        load_checkpoint(str(tmp_path / "dict.pt"), config=CFG)
    save_canonical(tmp_path / "canon", model.config, model.state_dict())
    f = tmp_path / "canon" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(SambaEdgeError, match="safetensors"):
        load_checkpoint(str(tmp_path / "canon"))


def test_convert_stores_a_sentencepiece_model_as_tokenizer_model(tmp_path, model):
    """A tokenizer is recognised by its content, not its name, and stored where the loaders look."""
    spm = pytest.importorskip("sentencepiece")
    import io

    from samba_edge.runtime.tokenizer import load_tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["def f(x):\n    return x + 1", "hello world"] * 20),
                                   model_writer=buf, vocab_size=24, model_type="char", minloglevel=2)
    (tmp_path / "my-sp.bin").write_bytes(buf.getvalue())
    src = official_pickle(tmp_path / "ck.pth", model)
    out = convert_checkpoint(str(src), str(tmp_path / "canon"), tokenizer=str(tmp_path / "my-sp.bin"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("def f")) == "def f"
    (tmp_path / "fake.model").write_bytes(b"\n\x05\n\x03abc" + bytes(40))        # protobuf-looking, not a model
    with pytest.raises(SambaEdgeError, match="not a valid SentencePiece model"):
        convert_checkpoint(str(src), str(tmp_path / "c2"), tokenizer=str(tmp_path / "fake.model"))
    assert not (tmp_path / "c2").exists()


# ---- an untied head (mamba_init false) --------------------------------------------------------
UNTIED = "tiny_untied_w8"


def test_untied_head_loads_converts_and_fingerprints_as_its_own_weight(tmp_path):
    from safetensors import safe_open

    from samba_edge.export.onnx_export import weights_fingerprint

    model = tiny_model(UNTIED, seed=2)
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    torch.save({"model": model.state_dict(), "hparams": {"model_name": UNTIED}}, tmp_path / "u.pth")
    ck = load_checkpoint(str(tmp_path / "u.pth"))
    m = ck.model()
    assert m.lm_head.weight is not m.transformer.wte.weight
    ids = torch.randint(0, 250, (2, 21))
    assert torch.equal(full_forward(m, ids), full_forward(model, ids))
    out = convert_checkpoint(str(tmp_path / "u.pth"), str(tmp_path / "canon"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    assert torch.equal(full_forward(load_checkpoint(str(out)).model(), ids), full_forward(model, ids))
    moved = dict(ck.state_dict, **{"lm_head.weight": ck.state_dict["lm_head.weight"] + 1})
    assert weights_fingerprint(moved) != weights_fingerprint(ck.state_dict)   # the export cache sees the head


def test_head_and_config_that_disagree_name_mamba_init(tmp_path):
    untied = tiny_model(UNTIED, seed=2)
    sd = untied.state_dict()
    torch.save(sd, tmp_path / "untied.pt")
    tied_cfg = untied.config.to_dict() | {"mamba_init": True}
    (tmp_path / "tied.json").write_text(json.dumps(tied_cfg))
    with pytest.raises(SambaEdgeError, match=r"lm_head.weight differs .*\"mamba_init\": false"):
        load_checkpoint(str(tmp_path / "untied.pt"), config=str(tmp_path / "tied.json"))
    torch.save({k: v for k, v in sd.items() if k != "lm_head.weight"}, tmp_path / "headless.pt")
    with pytest.raises(SambaEdgeError, match=r"no lm_head.weight.*\"mamba_init\": true"):
        load_checkpoint(str(tmp_path / "headless.pt"), config=UNTIED)
