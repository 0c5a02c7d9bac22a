"""Shared test helpers: tiny models whose every weight matters, and feeding in chunks."""
from __future__ import annotations

import torch

from samba_edge.export.config import get_config
from samba_edge.export.model import Samba, init_official

TINY_PRESETS = ["tiny_mha_w16", "tiny_gqa2_w8", "tiny_mqa_w8", "tiny_nope_w16", "tiny_partial_rope_w8", "tiny_untied_w8"]


@torch.no_grad()
def tiny_model(name: str = "tiny_gqa2_w8", seed: int = 0) -> Samba:
    """Official init, then every parameter perturbed so that a wrong use of any of them shows."""
    model = init_official(Samba(get_config(name)), seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if n.endswith("A_log"):
            p.add_(0.3 * noise)
        elif p.dim() == 1:                                  # norms, D, biases
            p.add_(0.2 * noise)
        else:
            p.add_(0.5 * p.std() * noise)
    model.transformer.wte.weight.mul_(20.0)                 # logits O(1): differences are meaningful
    return model


def full_forward(model: Samba, ids: torch.Tensor) -> torch.Tensor:
    b = ids.shape[0]
    with torch.no_grad():
        return model(ids, torch.zeros(b, dtype=torch.long), *model.empty_state(b))[0]


def chunked_forward(model: Samba, ids: torch.Tensor, sizes) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Feed `ids` in chunks (an int, or a list of sizes cycled), carrying state between calls."""
    b, L = ids.shape
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    state, outs, p, i = model.empty_state(b), [], 0, 0
    with torch.no_grad():
        while p < L:
            c = ids[:, p:p + sizes[i % len(sizes)]]
            logits, *state = model(c, torch.full((b,), p, dtype=torch.long), *state)
            outs.append(logits)
            p, i = p + c.shape[1], i + 1
    return torch.cat(outs, dim=1), state


def run_interpreter_worker(script: str, out) -> dict:
    """Run `python SCRIPT --worker OUT` with TRITON_INTERPRET=1 and return OUT's JSON. A fresh process:
    Triton reads the variable when kernels are decorated, so it cannot be switched on in this one."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, script, "--worker", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())
