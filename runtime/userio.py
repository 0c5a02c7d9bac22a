"""Data a user hands us as text or paths, checked where it enters: one helper per kind, so every command
gives the same one-line error (what, which file, how to fix) instead of a raw OSError/UnicodeError."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError


def read_text_file(path: str | Path, what: str) -> str:
    """A UTF-8 text file's contents; `what` names it in errors ("prompt file", "calibration text")."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SambaEdgeError(f"{what} {p} not found") from None
    except IsADirectoryError:
        raise SambaEdgeError(f"{what} {p} is a directory; give a text file") from None
    except PermissionError:
        raise SambaEdgeError(f"{what} {p} is not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise SambaEdgeError(f"{what} {p} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t UTF-8") from None
    except OSError as e:
        raise SambaEdgeError(f"{what} {p} cannot be read: {e.strerror or e}") from None


def check_text(text: str, what: str) -> str:
    """Text that came through argv or a pipe: invalid UTF-8 arrives as surrogate escapes, which no
    tokenizer can encode. Refused here, naming where it came from."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SambaEdgeError(f"{what} is not valid UTF-8 (at character {e.start}); pass UTF-8 text") from None
    return text


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file we are about to write (atomically, beside itself): not a directory, in an existing directory."""
    p = Path(path)
    if p.is_dir():
        raise SambaEdgeError(f"{flag} {p} is a directory; give a file name, e.g. {p / 'out.safetensors'}")
    if not p.parent.is_dir():
        raise SambaEdgeError(f"cannot write {flag} {p}: {p.parent} does not exist or is not a directory; "
                             "create it first")
    return p


def token_ids(ids, vocab: int, what: str = "token ids") -> np.ndarray:
    """A 1-D int64 array of ids in [0, vocab) from a sequence of integers or an integer array; anything
    else (a string, floats, bools, NaN, nested lists, 2-D arrays, values beyond int64) is refused."""
    if isinstance(ids, np.ndarray):
        a = ids
    else:
        if isinstance(ids, (str, bytes, bytearray, dict, set)) or not hasattr(ids, "__iter__"):
            raise SambaEdgeError(f"{what} must be a sequence of integers, got {type(ids).__name__}")
        items = list(ids)
        odd = next((i for i in items if not isinstance(i, (int, np.integer)) or isinstance(i, (bool, np.bool_))), None)
        if odd is not None:
            raise SambaEdgeError(f"{what} must be integers, got {odd!r} ({type(odd).__name__})")
        try:
            a = np.array(items, dtype=np.int64)
        except OverflowError:
            raise SambaEdgeError(f"{what}: a value is beyond int64; token ids lie in [0, {vocab})") from None
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise SambaEdgeError(f"{what}: expected a 1-D sequence of integers, got {a.dtype} with shape {list(a.shape)}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise SambaEdgeError(f"{what}: a value is beyond int64; token ids lie in [0, {vocab})")
    a = a.astype(np.int64)
    bad = a[(a < 0) | (a >= vocab)]
    if bad.size:
        raise SambaEdgeError(f"{what}: token id {int(bad[0])} is outside the vocabulary [0, {vocab}); "
                             "were these ids made with another tokenizer?")
    return a


def load_token_ids(path: str | Path, vocab: int) -> np.ndarray:
    """A .npy file of token ids (never unpickled)."""
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SambaEdgeError(f"token-id file {path} not found") from None
    except IsADirectoryError:
        raise SambaEdgeError(f"token-id file {path} is a directory; give a .npy file") from None
    except (ValueError, OSError, EOFError) as e:
        raise SambaEdgeError(f"{path} is not a readable .npy array of token ids ({str(e).splitlines()[0]})") from None
    return token_ids(ids, vocab, str(path))
