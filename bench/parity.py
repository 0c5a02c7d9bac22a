"""Max-abs differences between the ways of running SAMBA, measured in one run (fp32, CPU).

    python bench/parity.py [--presets tiny_gqa2_w8,tiny_nope_w16] [--ort]

1. full sequence vs chunked (1, 3, 7, W-1, W, W+1, 64) vs token-by-token, PyTorch, over 4W+7 tokens, batch 3
2. with --ort: ONNX Runtime (plugin and portable flavours) vs PyTorch, chunks 1, 5, W+3, batch 1 and 3
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from samba_edge.tests.helpers import chunked_forward, full_forward, tiny_model


def modes(name: str) -> dict:
    model = tiny_model(name)
    W = model.config.local_window
    ids = torch.randint(0, model.config.vocab_size, (3, 4 * W + 7), generator=torch.Generator().manual_seed(1))
    full = full_forward(model, ids)
    return {size: (chunked_forward(model, ids, size)[0] - full).abs().max().item()
            for size in sorted({1, 3, 7, W - 1, W, W + 1, 64})}


def ort_parity(name: str, work: Path) -> dict:
    from samba_edge.export.checkpoint import save_canonical
    from samba_edge.export.onnx_export import export_onnx
    from samba_edge.runtime.backends import OrtBackend

    model = tiny_model(name, seed=3)
    ck = save_canonical(work / name, model.config, model.state_dict(), force=True)
    W = model.config.local_window
    out = {}
    for flavor in ("plugin", "portable"):
        be = OrtBackend(export_onnx(str(ck), work / f"{name}-{flavor}", flavor=flavor, max_chunk=64, force=True))
        worst = 0.0
        for batch in (1, 3):
            ids = np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, 4 * W + 3))
            for size in (1, 5, W + 3):
                st_o, st_t, p = be.new_state(batch), model.empty_state(batch), 0
                while p < ids.shape[1]:
                    c = ids[:, p:p + size]
                    pos = np.full(batch, p, dtype=np.int64)
                    lo, st_o = be.run(c, pos, st_o)
                    with torch.no_grad():
                        lt, *st_t = model(torch.as_tensor(c), torch.as_tensor(pos), *st_t)
                    p += c.shape[1]
                    worst = max(worst, np.abs(lo - lt.numpy()).max(),        # states in the manifest's layout
                                *(np.abs(a - b.numpy()).max() for a, b in zip(be.state_to_host(st_o, p), st_t)))
        out[flavor] = worst
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny_mha_w16,tiny_gqa2_w8,tiny_mqa_w8,tiny_nope_w16,tiny_partial_rope_w8")
    ap.add_argument("--ort", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="samba-parity-"))
    for name in a.presets.split(","):
        m = modes(name)
        print(f"{name}: full vs chunked/stepwise max-abs " + ", ".join(f"c{k}={v:.1e}" for k, v in m.items()))
        if a.ort:
            o = ort_parity(name, work)
            print(f"{name}: ORT vs torch (logits + every state) " + ", ".join(f"{k}={v:.1e}" for k, v in o.items()))


if __name__ == "__main__":
    main()
