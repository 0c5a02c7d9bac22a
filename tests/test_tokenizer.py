"""Both tokenizer formats SAMBA users have: HF tokenizer.json and SentencePiece tokenizer.model."""
import pytest

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.tokenizer import Tokenizer, load_tokenizer

TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


def test_sentencepiece_model_round_trips(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 50 + "the quick brown fox jumps over the lazy dog\n" * 50)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=296,
                                   byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    tok = load_tokenizer(tmp_path)                                  # finds tokenizer.model in the directory
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("return fibonacci(ü)", bos=True)
    assert ids[0] == 1 and tok.decode(ids[1:]) == "return fibonacci(ü)"


def test_explicit_tokenizer_path_and_errors(tmp_path):
    with pytest.raises(SambaEdgeError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(SambaEdgeError, match="no tokenizer at"):
        load_tokenizer(tokenizer=tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(SambaEdgeError, match="not a valid tokenizer.json"):
        Tokenizer(bad)
