"""The artifact's files against the digests its manifest recorded when they were written.

The manifest's `fingerprint` names the checkpoint's weights; `files` holds the sha256 of the graph
files as written (model.onnx and its external data). A graph edited, damaged or swapped after export
(foreign weights under a copied manifest would otherwise accept that model's snapshots) fails here.
Hashing runs at ~1 GB/s, so `open` checks artifacts up to VERIFY_ON_OPEN bytes (the shipped and test
models: milliseconds) and `validate` and the export cache always check. Torch-free.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from samba_edge.runtime.errors import SambaEdgeError

VERIFY_ON_OPEN = 256 << 20


def graph_files(directory: Path, onnx_file: str) -> list[Path]:
    return [p for p in (directory / onnx_file, directory / f"{onnx_file}.data") if p.is_file()]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def digests(directory: str | Path, onnx_file: str = "model.onnx") -> dict[str, str]:
    """What a writer records in manifest.files, right after writing the graph."""
    return {p.name: sha256(p) for p in graph_files(Path(directory), onnx_file)}


def verify(directory: str | Path, manifest, always: bool = False) -> bool:
    """Raise if a recorded graph file differs; returns whether a check ran (manifests from before digests
    were recorded, and large artifacts on open without `always`, are not checked)."""
    directory = Path(directory)
    if not manifest.files:
        return False
    files = graph_files(directory, manifest.onnx_file)
    if not always and sum(p.stat().st_size for p in files) > VERIFY_ON_OPEN:
        return False
    names = {p.name for p in files}
    for name, want in sorted(manifest.files.items()):
        if name not in names:
            raise SambaEdgeError(f"{directory / name} is missing (the manifest lists it); re-export the artifact")
        if sha256(directory / name) != want:
            raise SambaEdgeError(f"{directory / name} is not the file this manifest was written with (sha256 "
                                 "differs): it was modified or damaged; re-export the artifact")
    extra = names - set(manifest.files)
    if extra:
        raise SambaEdgeError(f"{directory} holds {', '.join(sorted(extra))}, which its manifest does not list; "
                             "re-export the artifact")
    return True


def record(directory: str | Path) -> None:
    """Re-record the digests after editing a graph on purpose (onnx-graphsurgeon, a hand fix): the
    artifact then opens as the new graph. The tests use it to stand in for a faulty exporter."""
    import os

    from samba_edge.runtime.atomic import atomic_file
    from samba_edge.runtime.manifest import MANIFEST, Manifest

    directory = Path(directory)
    m = Manifest.load(directory)
    m.files = digests(directory, m.onnx_file)
    tmp = atomic_file(directory / MANIFEST)
    Path(tmp).write_text(m.to_json())
    os.replace(tmp, directory / MANIFEST)
