"""The CLI: thin commands, one-line errors with exit code 2, no torch at start-up."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from samba_edge.export.checkpoint import save_canonical
from samba_edge.tests.helpers import tiny_model
from samba_edge.tools.cli import main


def run(capsys, *args):
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A canonical checkpoint with a real (tiny, trained-here) byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("ck")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 20], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    from samba_edge.export.config import SambaConfig, get_config

    cfg = SambaConfig(**{**get_config("tiny_gqa2_w8").to_dict(), "vocab_size": tok.get_vocab_size(),
                         "padded_vocab_size": None, "name": "cli-test"})
    model = tiny_model("tiny_gqa2_w8")
    sd = model.state_dict()
    g = torch.Generator().manual_seed(0)
    sd["transformer.wte.weight"] = torch.randn(cfg.padded_vocab_size, cfg.n_embd, generator=g)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    out = d / "model"
    save_canonical(out, cfg, sd, tokenizer_files=[d / "tokenizer.json"])
    return out


def test_inspect_421m_without_weights(capsys):
    code, out, _ = run(capsys, "inspect", "--config", "Samba_421M", "--json")
    info = json.loads(out)
    assert code == 0 and info["parameters"] == 421_793_280
    assert [layer["mixer"] for layer in info["layers"]][:2] == ["mamba", "attention"]
    # 6 Mamba layers x (3072x3 + 3072x16) + 6 attention layers x 2 x 12x2047x128, fp32
    assert info["state_bytes_per_stream"] == 4 * (6 * 3072 * 19 + 6 * 2 * 12 * 2047 * 128)


def test_inspect_checkpoint_text(capsys, ckpt_dir):
    code, out, _ = run(capsys, "inspect", str(ckpt_dir))
    assert code == 0 and "layers:" in out and "k_window.1" in out


def test_eval_text_and_chunks_agree(capsys, ckpt_dir, tmp_path):
    text = tmp_path / "t.py"
    text.write_text("def f(x):\n    return x + 1\n" * 6)
    res = []
    for chunk in (None, "1", "5", "9"):
        args = ["eval", str(ckpt_dir), "--text", str(text), "--json"] + (["--chunk", chunk] if chunk else [])
        code, out, err = run(capsys, *args)
        assert code == 0, err
        res.append(json.loads(out))
    assert set(res[0]) == {"tokens", "nll", "ppl", "bits_per_byte"}
    for r in res[1:]:
        assert r["tokens"] == res[0]["tokens"] and abs(r["nll"] - res[0]["nll"]) < 1e-5


def test_eval_token_ids(capsys, ckpt_dir, tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(40) % 200)
    code, out, _ = run(capsys, "eval", str(ckpt_dir), "--token-ids", str(tmp_path / "ids.npy"), "--json")
    r = json.loads(out)
    assert code == 0 and r["tokens"] == 39 and "bits_per_byte" not in r and r["ppl"] > 1


@pytest.mark.parametrize("args,match", [
    (["inspect", "--config", "NoSuchPreset"], "unknown config"),
    (["inspect", "--config", "Samba_421M_abl_mamba"], "not SAMBA"),
    (["inspect", "/no/such/checkpoint"], "not found"),
    (["eval", "CK", "--text", "EMPTY"], "empty"),
    (["eval", "CK", "--token-ids", "BIG"], "outside the vocabulary"),
    (["eval", "CK", "--token-ids", "NEG"], "outside the vocabulary"),
    (["eval", "CK", "--token-ids", "PICKLE"], "not a readable .npy"),
    (["eval", "CK", "--text", "EMPTY", "--chunk", "0"], "--chunk"),
    (["eval", "CK", "--text", "EMPTY", "--chunk", "zero"], "chunk"),
    (["eval", "CK"], "exactly one of"),
    (["generate", "builtin:no-such-model", "-p", "x"], "unknown built-in"),
    (["convert", "CK", "-o", "EXISTING"], "already exists"),
    (["eval", "NOTOK", "--text", "TEXT"], "no tokenizer"),
    (["generate", "builtin:samba-tiny-py", "-p", "x", "--stop", "\\q"], "unknown escape \\q"),
    (["generate", "builtin:samba-tiny-py", "-p", "x", "--stop", "\\x4"], "2 hex digits"),
    (["generate", "NOTOK", "-p", "x", "--backend", "torch"], "samba-edge convert"),
    (["convert", "CK", "-o", "NEW", "--tokenizer", "TEXT"], "neither a Hugging Face tokenizer.json"),
    (["convert", "CK", "-o", "NEW", "--tokenizer", "TOKCONFIG"], "not a Hugging Face tokenizers file"),
])
def test_bad_input_is_one_line_exit_2(capsys, ckpt_dir, tmp_path, args, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.txt").write_text("def g(): pass\n")
    np.save(tmp_path / "big.npy", np.array([1, 2, 10**6]))
    np.save(tmp_path / "neg.npy", np.array([1, -3, 2]))
    np.save(tmp_path / "pickle.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((ckpt_dir / f).read_bytes())
    subst = {"CK": str(ckpt_dir), "EMPTY": str(tmp_path / "empty.txt"), "BIG": str(tmp_path / "big.npy"),
             "NEG": str(tmp_path / "neg.npy"), "PICKLE": str(tmp_path / "pickle.npy"), "EXISTING": str(ckpt_dir),
             "NOTOK": str(notok), "TEXT": str(tmp_path / "text.txt"), "NEW": str(tmp_path / "new"),
             "TOKCONFIG": str(tmp_path / "tokenizer_config.json")}
    code, out, err = run(capsys, *[subst.get(a, a) for a in args])
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err


def test_stop_escapes_are_decoded_and_nothing_else():
    from samba_edge.runtime.errors import SambaEdgeError
    from samba_edge.tools.generate import decode_escapes

    assert decode_escapes("\\n\\n") == "\n\n"                          # what a shell passes for --stop "\n\n"
    assert decode_escapes(r"a\tb\r\\n\'\"") == "a\tb\r\\n'\""
    assert decode_escapes("\\x41\\u00e9\\U0001F600") == "A\u00e9\U0001F600"
    assert decode_escapes("é→ñ\\n日本") == "é→ñ\n日本"                # non-ASCII is kept (unicode_escape mangles it)
    assert decode_escapes("real\nnewline") == "real\nnewline"
    for bad, match in [("\\q", "unknown escape"), ("a\\", "lone backslash"), ("\\x4", "2 hex digits"),
                       ("\\xZZ", "2 hex digits"), ("\\uD800", "not a Unicode character"),
                       ("\\U00110000", "not a Unicode character"), ("\\b", "unknown escape")]:
        with pytest.raises(SambaEdgeError, match=match):
            decode_escapes(bad)


def test_generate_stop_typed_in_a_shell_stops(capsys):
    """The README's `--stop "\n\n"` reaches the CLI as backslash-n: it must still stop."""
    args = ["generate", "builtin:samba-tiny-py", "-p", "def f", "-n", "12", "--backend", "torch"]
    code, full, err = run(capsys, *args)
    assert code == 0, err
    cont = full[len("def f"):-1]                                     # the continuation (echoed prompt, final newline)
    assert "\n" in cont, full
    code, out, err = run(capsys, *args, "--stop", "\\n")
    assert code == 0, err
    assert out == "def f" + cont.split("\n")[0] + "\n", (out, full)


def test_convert_tokenizer_any_name_then_generate(capsys, tmp_path):
    """`convert --tokenizer my_tok.json` stores it as tokenizer.json, so the output generates text."""
    from samba_edge.export.checkpoint import BUILTIN_DIR

    src = BUILTIN_DIR / "samba-tiny-py"
    (tmp_path / "my_tok.json").write_bytes((src / "tokenizer.json").read_bytes())
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", str(src), "-o", str(out), "--tokenizer", str(tmp_path / "my_tok.json"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    code, text, err = run(capsys, "generate", str(out), "-p", "def f", "-n", "3", "--backend", "torch")
    assert code == 0, err
    assert text.startswith("def f") and len(text.strip()) > len("def f"), text


def test_export_tokenizer_any_name_is_stored_canonically(capsys, tmp_path):
    """`export --tokenizer my_tok.json` too: the artifact holds tokenizer.json and generates text."""
    from samba_edge.export.checkpoint import BUILTIN_DIR

    (tmp_path / "my_tok.json").write_bytes((BUILTIN_DIR / "samba-tiny-py" / "tokenizer.json").read_bytes())
    art = tmp_path / "art"
    code, _, err = run(capsys, "export", "builtin:samba-tiny-py", "-o", str(art), "--flavor", "portable",
                       "--max-chunk", "16", "--tokenizer", str(tmp_path / "my_tok.json"))
    assert code == 0, err
    assert (art / "tokenizer.json").is_file() and not (art / "my_tok.json").exists()
    assert json.loads((art / "manifest.json").read_text())["tokenizer"] == "tokenizer.json"
    code, text, err = run(capsys, "generate", str(art), "-p", "def f", "-n", "3")
    assert code == 0 and text.startswith("def f") and len(text.strip()) > len("def f"), (text, err)


def test_generate_without_tokenizer_says_how_to_add_one(capsys, ckpt_dir, tmp_path):
    """`generate` takes no token ids: the error must not send the user to them."""
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((ckpt_dir / f).read_bytes())
    code, _, err = run(capsys, "generate", str(notok), "-p", "def f", "--backend", "torch")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "token ids" not in err and "convert" in err and "--tokenizer" in err, err


def test_cli_start_up_imports_no_torch():
    code = ("import sys; import samba_edge.tools.cli, samba_edge.runtime; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_inspect_config_alone_imports_no_torch():
    r = subprocess.run([sys.executable, "-c", "import sys; from samba_edge.tools.cli import main\n"
                        "try:\n    main(['inspect', '--config', 'Samba_1.3B'])\nexcept SystemExit: pass\n"
                        "assert 'torch' not in sys.modules, 'torch imported'"], capture_output=True, text=True)
    assert r.returncode == 0 and "1,330,207,488" in r.stdout, r.stderr


def test_debug_shows_the_traceback():
    r = subprocess.run([sys.executable, "-m", "samba_edge.tools.cli", "--debug", "inspect", "--config", "Nope"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
