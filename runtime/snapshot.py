"""Stream snapshots: the recurrent state + position + sampler state in one safetensors file.

Metadata: format version, the manifest's weight fingerprint, the model config, a sha256 checksum
over the tensors. Restoring from another model or config, a truncated or tampered file, or an
unknown format version is refused. Writes are atomic (temp file + rename). Torch-free.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError

SNAPSHOT_FORMAT = 1


def _checksum(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
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
            "extra": json.dumps(extra), "checksum": _checksum(tensors)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
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
    if meta.get("format_version") != str(SNAPSHOT_FORMAT):
        raise SambaEdgeError(f"snapshot {path} has format version {meta.get('format_version')!r}; "
                             f"this samba-edge reads version {SNAPSHOT_FORMAT}")
    if meta.get("fingerprint") != manifest.fingerprint or json.loads(meta.get("config", "{}")) != manifest.model:
        raise SambaEdgeError(f"snapshot {path} was taken from another model (weights fingerprint or config differ); "
                             "restore it into the model it came from")
    if _checksum(tensors) != meta.get("checksum"):
        raise SambaEdgeError(f"snapshot {path} fails its checksum: the file was modified or damaged")
    try:
        state = [tensors[s.name] for s in manifest.state]
    except KeyError as e:
        raise SambaEdgeError(f"snapshot {path} lacks state tensor {e}") from None
    for s, x in zip(manifest.state, state):
        if list(x.shape[1:]) != s.shape or x.dtype != np.dtype(s.dtype):
            raise SambaEdgeError(f"snapshot {path}: {s.name} has shape {x.shape}/{x.dtype}, expected [*, {s.shape}]")
    arrays = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return state, int(tensors["position"][0]), json.loads(meta.get("extra", "{}")), arrays
