"""The shipped model `builtin:samba-tiny-py`: a real model, addressable by name in every command."""
import json
import sysconfig
from pathlib import Path

import pytest

from samba_edge.export.checkpoint import BUILTIN_DIR
from samba_edge.tests.test_cli import run

NAME = "builtin:samba-tiny-py"
CARD = BUILTIN_DIR / "samba-tiny-py" / "model_card.json"


def heldout_slice(tmp_path, chars=3000) -> Path:
    """The start of a held-out stdlib file of this interpreter (never seen in training)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = (BUILTIN_DIR / "samba-tiny-py" / "heldout_files.txt").read_text().split()
    src = next((root / r for r in rels if (root / r).is_file() and (root / r).stat().st_size > chars), None)
    if src is None:
        pytest.skip("no held-out stdlib file on this interpreter")
    out = tmp_path / "heldout.py"
    out.write_text(src.read_text(encoding="utf-8")[:chars])
    return out


def test_card_records_the_training():
    card = json.loads(CARD.read_text())
    for key in ("corpus", "split", "steps", "wall_time_s", "heldout", "parameters"):
        assert key in card
    assert card["wall_time_s"] <= 3600 and 1e6 <= card["parameters"] <= 2e7
    assert (BUILTIN_DIR / "samba-tiny-py" / "model.safetensors").stat().st_size <= 20 * 2**20


def test_eval_builtin_on_heldout_text(capsys, tmp_path):
    text = heldout_slice(tmp_path)
    code, out, err = run(capsys, "eval", NAME, "--text", str(text), "--json", "--chunk", "128")
    assert code == 0, err
    res = json.loads(out)
    assert set(res) == {"tokens", "nll", "ppl", "bits_per_byte"}
    assert res["bits_per_byte"] < 2.5, res          # untrained weights score ~3.9 bits/byte here


def test_builtin_name_works_in_every_command(capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", NAME, "--json")
    assert code == 0 and json.loads(out)["config"]["name"] == "samba-tiny-py"
    code, out, _ = run(capsys, "generate", NAME, "-p", "import os\n", "-n", "8")
    assert code == 0 and out.startswith("import os\n") and len(out) > len("import os\n")
