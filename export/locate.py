"""Where a CHECKPOINT argument points (torch-free, so resolving `builtin:NAME` for a cached export costs
no PyTorch import): `builtin:NAME` -> the shipped directory, anything else -> an existing path."""
from __future__ import annotations

from pathlib import Path

from samba_edge.runtime.errors import SambaEdgeError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def builtin_names() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file()) if BUILTIN_DIR.is_dir() else []


def resolve(spec: str) -> Path:
    """`builtin:NAME` -> its directory; anything else -> an existing path."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = BUILTIN_DIR / name
        if not (path / "config.json").is_file():
            raise SambaEdgeError(f"unknown built-in model {name!r}; available: {', '.join(builtin_names()) or 'none'}")
        return path
    path = Path(spec)
    if not path.exists():
        raise SambaEdgeError(f"checkpoint {spec} not found; pass a checkpoint directory, a .pth file or builtin:NAME")
    return path
