"""Next-token choice from logits (numpy): greedy, temperature, top-k, top-p, repetition penalty, seeded."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError

MAX_NEW_TOKENS = 1_000_000          # anything above is a typo, not a request


@dataclass
class SamplingParams:
    temperature: float = 0.0         # 0 = greedy
    top_k: int = 0                   # 0 = off
    top_p: float = 1.0               # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL-style on tokens of the recent window
    repetition_window: int = 256
    seed: Optional[int] = None
    max_new_tokens: int = 128
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    stop: Sequence[str] = field(default_factory=tuple)      # stop strings (not included in the output)

    def __post_init__(self) -> None:
        if not 0 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise SambaEdgeError(f"--max-new-tokens must be between 0 and {MAX_NEW_TOKENS:,}, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise SambaEdgeError("sampling needs temperature >= 0, top-k >= 0, 0 < top-p <= 1, repetition penalty > 0")
        if any(s == "" for s in self.stop):
            raise SambaEdgeError("a stop string must not be empty")


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, recent: Sequence[int] = ()) -> int:
    """One token id from (V,) logits."""
    z = logits.astype(np.float64)
    if params.repetition_penalty != 1.0 and len(recent):
        idx = np.unique(np.asarray(recent, dtype=np.int64))
        vals = z[idx]
        z[idx] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(z))
    z = z / params.temperature
    if params.top_k and params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, params.top_p) + 1)]    # smallest set reaching top_p
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(p.size, p=p))
