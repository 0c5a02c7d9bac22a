"""Next-token choice from logits (numpy): greedy, temperature, top-k, top-p, repetition penalty, seeded."""
from __future__ import annotations

import math
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
        """Every field checked up front (type, finiteness, range), named as the CLI flag that sets it."""
        _number("--temperature", self.temperature, "a finite number >= 0 (0 = greedy)", lambda v: v >= 0)
        _number("--top-k", self.top_k, "an integer >= 0 (0 = off)", lambda v: v >= 0, integer=True)
        _number("--top-p", self.top_p, "a number in (0, 1] (1 = off)", lambda v: 0 < v <= 1)
        _number("--repetition-penalty", self.repetition_penalty, "a finite number > 0 (1 = off)", lambda v: v > 0)
        _number("repetition_window", self.repetition_window, "an integer >= 0", lambda v: v >= 0, integer=True)
        _number("--max-new-tokens", self.max_new_tokens, f"an integer between 0 and {MAX_NEW_TOKENS:,}",
                lambda v: 0 <= v <= MAX_NEW_TOKENS, integer=True)
        if self.seed is not None:
            _number("--seed", self.seed, "an integer >= 0", lambda v: v >= 0, integer=True)
        for t in self.stop_token_ids:
            _number("--stop-id", t, "a token id (an integer >= 0)", lambda v: v >= 0, integer=True)
        for text in self.stop:
            if not isinstance(text, str) or text == "":
                raise SambaEdgeError(f"a stop string must be a non-empty string, got {text!r}")


def _number(flag: str, value, rule: str, ok, integer: bool = False) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    good = isinstance(value, kinds) and not isinstance(value, (bool, np.bool_))
    if good and not integer:
        good = math.isfinite(float(value))
    if not good or not ok(value):
        raise SambaEdgeError(f"{flag} must be {rule}, got {value!r}")


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, recent: Sequence[int] = ()) -> int:
    """One token id from (V,) logits: the same token, bit for bit and draw for draw, as `choose_ref`, with
    no argsort of the vocabulary for top-p and no per-call validation inside rng.choice."""
    z = _penalised(logits, params, recent)
    if params.temperature == 0:
        return int(np.argmax(z))
    p = _probabilities(z, params)
    if params.top_p < 1.0:
        p = _only(p, _nucleus(p, params.top_p))
    cdf = np.cumsum(p, out=p)                  # what Generator.choice(n, p=p) does, after its checks
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def _nucleus(p: np.ndarray, top_p: float, first: int = 256) -> np.ndarray:
    """The mask of the indices `choose_ref` keeps for top-p (the prefix of the stable descending order whose
    cumulative sum first reaches top_p), without an argsort: that prefix's cumulative sums are those of the
    sorted values (tied values are interchangeable in a sum), so the sorted values give its length n + 1
    and its last value v; it holds every index with p > v and the lowest-index ties at v. The values are
    sorted among the largest `first` only when those can reach top_p (a peaked distribution), else all."""
    vals = None
    if first < p.size and first * p.max() >= top_p:          # else the largest `first` cannot reach it
        top = p[p >= np.partition(p, p.size - first)[p.size - first]]
        vals = np.sort(top)[::-1]
        if np.searchsorted(np.cumsum(vals), top_p) >= vals.size:
            vals = None
    if vals is None:
        vals = np.sort(p)[::-1]
    n = int(np.searchsorted(np.cumsum(vals), top_p))
    if n >= vals.size:                          # rounding kept the sum below top_p: everything
        return np.ones(p.size, dtype=bool)
    keep = p > vals[n]
    ties = np.flatnonzero(p == vals[n])
    keep[ties[: n + 1 - int(np.count_nonzero(keep))]] = True
    return keep


def _penalised(logits: np.ndarray, params: SamplingParams, recent: Sequence[int]) -> np.ndarray:
    z = logits.astype(np.float64)
    if params.repetition_penalty != 1.0 and len(recent):
        idx = np.unique(np.asarray(recent, dtype=np.int64))
        vals = z[idx]
        z[idx] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    return z


def _probabilities(z: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, then the softmax (float64)."""
    z = z / params.temperature
    if params.top_k and params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    return p / p.sum()


def _only(p: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """p renormalised over `keep` (indices or a boolean mask), zero elsewhere."""
    if keep.dtype == bool:
        mask = np.where(keep, p, 0.0)
    else:
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
    mask /= mask.sum()
    return mask


def choose_ref(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, recent: Sequence[int] = ()) -> int:
    """The reference for `choose`: the definition, one step per line."""
    z = _penalised(logits, params, recent)
    if params.temperature == 0:
        return int(np.argmax(z))
    p = _probabilities(z, params)
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        p = _only(p, order[: int(np.searchsorted(cum, params.top_p) + 1)])    # smallest set reaching top_p
    return int(rng.choice(p.size, p=p))
