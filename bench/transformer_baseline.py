"""A plain transformer decoder of SAMBA's size with a full KV cache: what SAMBA's fixed-size state replaces.

    model = KVTransformer.from_model_config(manifest.model)      # same n_embd, n_layer, n_head, head_size,
    cache = model.new_cache(capacity, filled=ctx)                 # intermediate_size and vocab as the SAMBA
    logits = model.forward(torch.tensor([tok]), cache)            # one decode step over ctx cached keys

Per block: x = x + MHA(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)); then RMSNorm and an lm_head tied to the
embedding (as SAMBA's). The attention is plain multi-head (one K/V head per query head, no grouping),
with no positional encoding (RoPE-free: positions only enter through the causal mask), over a cache that
grows by one entry per token. Weights are random: only its cost is of interest.

`new_cache(capacity, filled=n)` fills the first n entries with random values instead of running an
O(n^2) prefill: a decode step's cost does not depend on the cached values, only on how many there are.
Used by `samba-edge bench` (tools/bench.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from samba_edge.export.model import RMSNorm, SwiGLU       # the same norm and MLP SAMBA uses


@dataclass
class KVCache:
    """Keys and values per layer, (1, n_head, capacity, head_size) each; entries [0, length) are live."""
    k: list
    v: list
    length: int

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self, entries: int | None = None) -> int:
        """Bytes the live entries take (or `entries` of them), over all layers, keys and values."""
        n = self.length if entries is None else entries
        per_entry = sum(t.shape[1] * t.shape[3] * t.element_size() for t in self.k + self.v)
        return n * per_entry


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, head_size: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.n_head, self.head_size = n_head, head_size
        self.norm_1 = RMSNorm(d, eps)
        self.qkv = nn.Linear(d, 3 * n_head * head_size, bias=False)
        self.proj = nn.Linear(n_head * head_size, d, bias=False)
        self.norm_2 = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, hidden)

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, start: int) -> Tensor:
        """x: (1, T, d) at positions start..start+T-1; appends the T new keys/values to the cache."""
        T = x.shape[1]
        H, hs = self.n_head, self.head_size
        q, k, v = self.qkv(self.norm_1(x)).view(1, T, 3, H, hs).permute(2, 0, 3, 1, 4)   # (1, H, T, hs) each
        k_cache[:, :, start:start + T] = k
        v_cache[:, :, start:start + T] = v
        keys, values = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        mask = None
        if T > 1:                                            # causal over absolute positions
            mask = torch.arange(start + T)[None, :] <= (start + torch.arange(T))[:, None]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(hs))
        x = x + self.proj(y.transpose(1, 2).reshape(1, T, H * hs))
        return x + self.mlp(self.norm_2(x))


class KVTransformer(nn.Module):
    def __init__(self, n_embd: int, n_layer: int, n_head: int, head_size: int, intermediate_size: int,
                 vocab_size: int, norm_eps: float = 1e-5, seed: int = 0) -> None:
        super().__init__()
        self.n_layer, self.n_head, self.head_size = n_layer, n_head, head_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, head_size, intermediate_size, norm_eps)
                                    for _ in range(n_layer))
        self.ln_f = RMSNorm(n_embd, norm_eps)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02, generator=g)
        self.eval()

    @classmethod
    def from_model_config(cls, model: dict, seed: int = 0) -> "KVTransformer":
        """From a SAMBA config dict (an artifact's `manifest.model`): the same widths, depth and vocabulary."""
        vocab = int(model.get("padded_vocab_size") or model["vocab_size"])
        return cls(int(model["n_embd"]), int(model["n_layer"]), int(model["n_head"]), int(model["head_size"]),
                   int(model["intermediate_size"]), vocab, float(model.get("norm_eps", 1e-5)), seed)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, capacity: int, filled: int = 0, seed: int = 0) -> KVCache:
        """An empty KV cache of `capacity` entries per layer; the first `filled` hold random values
        (standing in for a prefill: the cost of a decode step does not depend on them)."""
        if filled > capacity:
            raise ValueError(f"cannot fill {filled} entries of a cache of {capacity}")
        g = torch.Generator().manual_seed(seed)
        shape = (1, self.n_head, capacity, self.head_size)
        k, v = [], []
        for _ in range(self.n_layer):
            for store in (k, v):
                t = torch.zeros(shape)
                if filled:
                    t[:, :, :filled].normal_(0.0, 1.0, generator=g)
                store.append(t)
        return KVCache(k, v, filled)

    @torch.inference_mode()
    def forward(self, ids: Tensor, cache: KVCache) -> Tensor:
        """ids (T,) int64 at positions cache.length..; returns the last position's logits (V,) and
        appends T entries to the cache."""
        T = ids.shape[0]
        if cache.length + T > cache.capacity:
            raise ValueError(f"KV cache full: {cache.length} + {T} > capacity {cache.capacity}")
        x = self.wte(ids)[None]
        for i, block in enumerate(self.blocks):
            x = block(x, cache.k[i], cache.v[i], cache.length)
        cache.length += T
        return F.linear(self.ln_f(x[0, -1]), self.wte.weight)
