"""Stream snapshots: the recurrent state + position + sampler state in one safetensors file.

Metadata: format version, the manifest's weight fingerprint, the model config, the stream's sampler
facts (`extra`: rng state, recent tokens) and a sha256 checksum over every metadata field and every
tensor (format 1 covered the tensors only; still read). Restoring from another model or config, a
truncated or tampered file, an unknown format version, or any field of the wrong type or range (one
stream, a position >= 0, finite state, token ids in the vocabulary, a valid generator state) is
refused with the field named. Writes are atomic (temp file + rename). Torch-free.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from samba_edge.runtime.atomic import atomic_file
from samba_edge.runtime.errors import SambaEdgeError

SNAPSHOT_FORMAT = 2
READABLE = ("1", "2")
META_KEYS = ("format", "format_version", "fingerprint", "config", "extra")     # all under the checksum (v2)


def _checksum(tensors: dict[str, np.ndarray], meta: dict | None = None) -> str:
    h = hashlib.sha256()
    for k in META_KEYS if meta is not None else ():
        h.update(f"{k}={meta.get(k)!r}|".encode())
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_snapshot(path: str | Path, manifest, state: list[np.ndarray], position: int, extra: dict,
                  arrays: dict[str, np.ndarray] | None = None) -> Path:
    """`extra`: JSON-able stream facts; `arrays`: more tensors (stored as `extra.<name>`)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {s.name: np.ascontiguousarray(x) for s, x in zip(manifest.state, state)}
    tensors["position"] = np.array([position], dtype=np.int64)
    tensors.update({f"extra.{k}": np.ascontiguousarray(v) for k, v in (arrays or {}).items()})
    meta = {"format": "samba-edge-snapshot", "format_version": str(SNAPSHOT_FORMAT),
            "fingerprint": manifest.fingerprint, "config": json.dumps(manifest.model, sort_keys=True),
            "extra": json.dumps(extra)}
    meta["checksum"] = _checksum(tensors, meta)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic_file(path)
    except OSError as e:
        raise SambaEdgeError(f"cannot write snapshot {path} ({e.strerror}); choose a writable path") from None
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)                    # an existing snapshot is only ever replaced by a complete one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_snapshot(path: str | Path, manifest) -> tuple[list[np.ndarray], int, dict, dict[str, np.ndarray]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SambaEdgeError(f"snapshot {path} not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise SambaEdgeError(f"snapshot {path} is unreadable ({str(e).splitlines()[0]}); is it truncated?") from None
    if meta.get("format") != "samba-edge-snapshot":
        raise SambaEdgeError(f"{path} is not a samba-edge snapshot")
    version = meta.get("format_version")
    if version not in READABLE:
        raise SambaEdgeError(f"snapshot {path} has format version {version!r}; "
                             f"this samba-edge reads versions {', '.join(READABLE)}")
    try:
        config = json.loads(meta.get("config", "{}"))
    except ValueError:
        config = None
    if meta.get("fingerprint") != manifest.fingerprint or config != manifest.model:
        raise SambaEdgeError(f"snapshot {path} was taken from another model (weights fingerprint or config differ); "
                             "restore it into the model it came from")
    if _checksum(tensors, meta if version != "1" else None) != meta.get("checksum"):
        raise SambaEdgeError(f"snapshot {path} fails its checksum: the file was modified or damaged")
    return _checked_fields(path, manifest, tensors, meta)


def _checked_fields(path: Path, manifest, tensors: dict, meta: dict):
    """Every field's type and range: a checksum proves integrity, not that a crafted file is sane."""
    def bad(what: str) -> SambaEdgeError:
        return SambaEdgeError(f"snapshot {path}: {what}; it was not written by samba-edge (or was edited)")

    state = []
    for s in manifest.state:
        x = tensors.get(s.name)
        if x is None:
            raise bad(f"it lacks state tensor {s.name!r}")
        if x.dtype != np.dtype(s.dtype) or list(x.shape) != [1, *s.shape]:
            raise bad(f"{s.name} has shape {list(x.shape)} {x.dtype}, expected [1, {', '.join(map(str, s.shape))}] "
                      f"{s.dtype} (one stream)")
        if not np.isfinite(x).all():
            raise bad(f"{s.name} holds NaN or Inf")
        state.append(x)
    pos = tensors.get("position")
    if pos is None or pos.dtype != np.int64 or pos.shape != (1,) or pos[0] < 0:
        raise bad("its position is missing, not one int64, or negative")
    try:
        extra = json.loads(meta.get("extra", "{}"))
    except ValueError:
        raise bad("its sampler metadata is not JSON") from None
    if not isinstance(extra, dict):
        raise bad("its sampler metadata is not an object")
    recent = extra.get("recent", [])
    if not isinstance(recent, list) or not all(type(t) is int and 0 <= t < manifest.vocab_size for t in recent):
        raise bad(f"its recent tokens are not a list of token ids below {manifest.vocab_size}")
    if "rng" in extra:
        try:
            np.random.default_rng().bit_generator.state = extra["rng"]
        except (TypeError, ValueError, KeyError, OverflowError):
            raise bad("its random generator state is not a valid PCG64 state") from None
    arrays = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    logits = arrays.get("last_logits")
    if logits is not None and (logits.ndim != 1 or logits.dtype.kind != "f" or not np.isfinite(logits).all()):
        raise bad("its last logits are not one finite float vector")
    return state, int(pos[0]), extra, arrays
