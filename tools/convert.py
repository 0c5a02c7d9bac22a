"""`samba-edge convert`: an official training checkpoint -> the canonical samba-edge directory."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional


def check_tokenizer_file(tokenizer: str) -> Path:
    """`--tokenizer` (a file, or a directory holding tokenizer.json / tokenizer.model) -> the file to store.
    A file is recognised by its content, whatever its name (it is stored under the canonical name), and
    loaded once to prove it works, before any weight is read."""
    from samba_edge.export.checkpoint import tokenizer_name
    from samba_edge.runtime.tokenizer import Tokenizer, load_tokenizer

    src = Path(tokenizer)
    if not src.is_file():
        return load_tokenizer(tokenizer=src).path                    # a directory (or an error saying what's wrong)
    name = tokenizer_name(src)
    with tempfile.TemporaryDirectory(prefix="samba-edge-tok-") as tmp:
        shutil.copyfile(src, Path(tmp) / name)                       # Tokenizer picks its reader by the name
        Tokenizer(Path(tmp) / name)
    return src


def convert_checkpoint(checkpoint: str, out: str, config: Optional[str] = None, tokenizer: Optional[str] = None,
                       force: bool = False) -> Path:
    """Tensors are written as they are (same dtype, same bits); a tied head is stored once; a tokenizer is
    stored as tokenizer.json / tokenizer.model, the names `generate`, `eval` and `export` look for."""
    from samba_edge.export.checkpoint import load_checkpoint, save_canonical
    from samba_edge.runtime.atomic import check_output
    from samba_edge.runtime.tokenizer import find_tokenizer

    check_output(Path(out), force)
    tok_files = [check_tokenizer_file(tokenizer)] if tokenizer is not None else []
    ckpt = load_checkpoint(checkpoint, config)
    if tokenizer is None and find_tokenizer(ckpt.directory) is not None:
        tok_files = [find_tokenizer(ckpt.directory)]
    return save_canonical(Path(out), ckpt, tokenizer_files=tok_files, force=force)
