"""`samba-edge convert`: an official training checkpoint -> the canonical samba-edge directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def convert_checkpoint(checkpoint: str, out: str, config: Optional[str] = None, tokenizer: Optional[str] = None,
                       force: bool = False) -> Path:
    """Tensors are written as they are (same dtype, same bits); the tied head is stored once."""
    from samba_edge.export.checkpoint import load_checkpoint, save_canonical
    from samba_edge.runtime.tokenizer import find_tokenizer, load_tokenizer

    ckpt = load_checkpoint(checkpoint, config)
    tok_files = []
    if tokenizer is not None:
        tok_files = [load_tokenizer(tokenizer=tokenizer).path]
    elif find_tokenizer(ckpt.directory) is not None:
        tok_files = [find_tokenizer(ckpt.directory)]
    return save_canonical(Path(out), ckpt, tokenizer_files=tok_files, force=force)
