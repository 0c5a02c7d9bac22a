"""Held-out bits per byte of a checkpoint against `xz -9` on the very same files.

    python -m samba_edge.tools.compare_xz [builtin:samba-tiny-py] [--limit N] [--json]

The held-out list is the one the checkpoint was trained with (`heldout_files.txt`, paths relative
to this interpreter's stdlib). xz is the `xz` binary when present (else Python's lzma, the same
LZMA2 coder), at -9, on the files concatenated (its best case: one dictionary over all files)
and on each file alone.
"""
from __future__ import annotations

import json
import lzma
import shutil
import subprocess
import sysconfig
from pathlib import Path

import click


def xz_bytes(data: bytes) -> int:
    if shutil.which("xz"):
        return len(subprocess.run(["xz", "-9", "-c"], input=data, capture_output=True, check=True).stdout)
    return len(lzma.compress(data, preset=9))


def heldout_texts(ckpt_dir: Path, limit: int | None = None) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = [r for r in (ckpt_dir / "heldout_files.txt").read_text().splitlines() if r]
    texts = [(root / r).read_text(encoding="utf-8") for r in rels if (root / r).is_file()]
    return texts[:limit] if limit else texts


@click.command()
@click.argument("checkpoint", default="builtin:samba-tiny-py")
@click.option("--limit", type=int, help="only the first N held-out files (quick check)")
@click.option("--chunk", default=1024, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(checkpoint: str, limit: int | None, chunk: int, as_json: bool) -> None:
    import torch

    from samba_edge.export.torch_backend import TorchBackend
    from samba_edge.runtime.tokenizer import load_tokenizer
    from samba_edge.tools.evaluate import score_documents

    torch.set_num_threads(2)
    backend = TorchBackend.open(checkpoint)
    texts = heldout_texts(backend.directory, limit)
    raw = [t.encode("utf-8") for t in texts]
    n_bytes = sum(len(b) for b in raw)
    model_stats = score_documents(backend, load_tokenizer(backend.directory), texts, chunk)
    res = {
        "files": len(texts), "bytes": n_bytes,
        "model_bits_per_byte": model_stats["bits_per_byte"], "model_ppl": model_stats["ppl"],
        "xz9_concatenated_bits_per_byte": 8 * xz_bytes(b"".join(raw)) / n_bytes,
        "xz9_per_file_bits_per_byte": 8 * sum(xz_bytes(b) for b in raw) / n_bytes,
    }
    res["model_vs_xz9_concatenated"] = res["model_bits_per_byte"] / res["xz9_concatenated_bits_per_byte"]
    click.echo(json.dumps(res, indent=2) if as_json else "\n".join(f"{k}: {v:.4f}" if isinstance(v, float)
                                                                    else f"{k}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
