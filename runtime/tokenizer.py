"""Tokenizers SAMBA checkpoints come with: HF `tokenizer.json` or SentencePiece `tokenizer.model`.

Torch-free (the deployed runtime uses it). SentencePiece is imported only when a `.model` is used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from samba_edge.runtime.errors import SambaEdgeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_BOS = ("<s>", "<|bos|>", "<bos>", "<|startoftext|>")
_EOS = ("</s>", "<|endoftext|>", "<|eos|>", "<eos>")


class Tokenizer:
    """encode/decode with the model's special ids; `path` is a tokenizer.json or tokenizer.model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(self.path))
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
                raise SambaEdgeError(f"{self.path} is not a valid tokenizer.json ({e})") from None
            self._sp = None
            vocab = self._hf.get_vocab(with_added_tokens=True)
            self.bos_id = next((vocab[t] for t in _BOS if t in vocab), None)
            self.eos_id = next((vocab[t] for t in _EOS if t in vocab), None)
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        elif self.path.suffix == ".model":
            try:
                import sentencepiece as spm
            except ImportError:
                raise SambaEdgeError("tokenizer.model needs sentencepiece: pip install sentencepiece") from None
            self._hf = None
            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            except Exception as e:  # noqa: BLE001
                raise SambaEdgeError(f"{self.path} is not a valid SentencePiece model ({e})") from None
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise SambaEdgeError(f"{self.path}: expected tokenizer.json or tokenizer.model")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._hf.encode(text, add_special_tokens=False).ids if self._hf else self._sp.encode(text)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        return self._hf.decode(ids, skip_special_tokens=False) if self._hf else self._sp.decode(ids)


def find_tokenizer(directory: Optional[Path]) -> Optional[Path]:
    if directory is None:
        return None
    return next((Path(directory) / f for f in TOKENIZER_FILES if (Path(directory) / f).is_file()), None)


def load_tokenizer(directory: Optional[Path] = None, tokenizer: Optional[str | Path] = None) -> Tokenizer:
    """`--tokenizer` (a file or a directory) wins over the checkpoint/artifact directory."""
    if tokenizer is not None:
        t = Path(tokenizer)
        found = find_tokenizer(t) if t.is_dir() else (t if t.is_file() else None)
        if found is None:
            raise SambaEdgeError(f"no tokenizer at {t}; pass a tokenizer.json / tokenizer.model file or its directory")
        return Tokenizer(found)
    found = find_tokenizer(directory)
    if found is None:
        raise SambaEdgeError(f"this command needs text, but {directory} has no tokenizer.json or tokenizer.model; "
                             "pass --tokenizer PATH (or --token-ids FILE.npy)")
    return Tokenizer(found)
