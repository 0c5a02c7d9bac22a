"""SAMBA model configuration: the official LitGPT field names, the official presets, tiny test presets.

Torch-free on purpose: the CLI's `inspect` and the runtime read configs without importing torch.
Field names are those of microsoft/Samba `lit_gpt/config.py` so a user's `config.json` or the
`hparams` of an official checkpoint load unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from samba_edge.runtime.errors import SambaEdgeError


# Upper bounds: 10-100x beyond the largest official SAMBA (3.8B), far below where sizes overflow
LIMITS = {"n_layer": 1024, "n_embd": 65536, "n_head": 1024, "intermediate_size": 1 << 20, "vocab_size": 1 << 22,
          "d_state": 1024, "d_conv": 64, "expand": 16, "dt_rank": 65536, "head_size": 4096, "n_query_groups": 1024,
          "padding_multiple": 1 << 16, "block_size": 1 << 30, "condense_ratio": 1 << 20}
MAX_PARAMS = 10 ** 12


@dataclass
class SambaConfig:
    name: str = "samba"
    block_size: int = 4096          # training context; streams may run far past it
    vocab_size: int = 32000
    padding_multiple: int = 64
    padded_vocab_size: Optional[int] = None   # rows of wte / lm_head
    n_layer: int = 12               # blocks; block i is Mamba if i % mb_per_layer == 0, else SWA
    n_embd: int = 1536
    n_head: int = 12
    n_query_groups: Optional[int] = None      # None -> n_head (MHA); 1 -> MQA
    head_size: Optional[int] = None           # None -> n_embd // n_head
    intermediate_size: int = 4096
    local_window: int = 2048        # W: a query sees keys t-W+1 .. t
    rope_base: int = 10000
    rotary_percentage: float = 1.0
    condense_ratio: int = 1         # LitGPT position interpolation (positions / ratio)
    norm_eps: float = 1e-5
    mb_per_layer: int = 2
    nope: bool = False              # True: no RoPE in attention
    # The official name for "the head is tied to the embedding": lit_gpt GPT ties lm_head.weight to
    # wte.weight when mamba_init is true (every SAMBA preset); false gives the head its own weight
    mamba_init: bool = True
    # The official code builds its cos/sin tables in bf16 (lit_gpt build_rope_cache), so official
    # checkpoints were trained with bf16-rounded tables; "fp32" keeps them exact (the shipped model's choice)
    rope_table_dtype: str = "bf16"
    # Mamba-1 mixer (mamba_simple.Mamba defaults, as the official code uses them)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Optional[int] = None             # None -> ceil(n_embd / 16)

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            m = self.padding_multiple
            self.padded_vocab_size = -(-self.vocab_size // m) * m
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            self.head_size = self.n_embd // max(self.n_head, 1)
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.n_embd / 16)
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> SambaEdgeError:
            return SambaEdgeError(f"config {self.name!r}: {msg}")

        for f, most in LIMITS.items():
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(f"{f} must be a positive integer, got {v!r}")
            if v > most:
                raise bad(f"{f}={v:,} is beyond any model samba-edge can hold (at most {most:,})")
        for f in ("norm_eps", "rope_base", "rotary_percentage"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise bad(f"{f} must be a finite number > 0, got {v!r}")
        if self.norm_eps >= 1 or self.rotary_percentage > 1:
            raise bad(f"norm_eps must be < 1 and rotary_percentage <= 1 (got {self.norm_eps}, {self.rotary_percentage})")
        for f in ("nope", "mamba_init"):
            if not isinstance(getattr(self, f), bool):
                raise bad(f"{f} must be true or false, got {getattr(self, f)!r}")
        if self.rope_table_dtype not in ("bf16", "fp32"):
            raise bad(f"rope_table_dtype must be bf16 (the official code's tables) or fp32, got {self.rope_table_dtype!r}")
        if self.param_count() > MAX_PARAMS:
            raise bad(f"{self.param_count():,} parameters is beyond any model samba-edge can hold "
                      f"(at most {MAX_PARAMS:,}); check n_embd, n_layer, vocab_size, intermediate_size")
        if self.n_head % self.n_query_groups:
            raise bad(f"n_head={self.n_head} is not divisible by n_query_groups={self.n_query_groups}; "
                      "use a group count that divides the head count")
        if self.padded_vocab_size < self.vocab_size:
            raise bad(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")
        if self.mb_per_layer != 2:
            raise bad(f"mb_per_layer={self.mb_per_layer}: SAMBA alternates Mamba and attention (mb_per_layer=2)")
        if not isinstance(self.local_window, int) or isinstance(self.local_window, bool) or not 2 <= self.local_window <= 1 << 24:
            raise bad(f"local_window={self.local_window!r}: SAMBA needs a sliding window of at least 2 keys")
        if self.d_conv < 2:
            raise bad(f"d_conv={self.d_conv}: the causal conv needs a kernel of at least 2")
        n_rot = self.rope_dims
        if not self.nope and (n_rot < 2 or n_rot % 2):
            raise bad(f"rotary_percentage={self.rotary_percentage} gives {n_rot} rotary dims; need an even number >= 2")

    # ---- derived quantities -------------------------------------------------------------
    @property
    def d_inner(self) -> int:            # E
        return self.expand * self.n_embd

    @property
    def tied(self) -> bool:              # lm_head.weight is wte.weight
        return self.mamba_init

    @property
    def rope_dims(self) -> int:
        return int(self.rotary_percentage * self.head_size)

    @property
    def window_cache_len(self) -> int:
        """Keys kept between calls: the W-1 most recent (the next query adds its own)."""
        return self.local_window - 1

    def is_mamba(self, layer: int) -> bool:
        return layer % self.mb_per_layer == 0

    def layer_kinds(self) -> list[str]:
        return ["mamba" if self.is_mamba(i) else "attention" for i in range(self.n_layer)]

    def param_count(self) -> int:
        """Parameters (a tied head counted once, as torch's parameters() does), computed analytically."""
        d, E, N, K, R = self.n_embd, self.d_inner, self.d_state, self.d_conv, self.dt_rank
        mamba = 2 * E * d + E * K + E + (R + 2 * N) * E + E * R + E + E * N + E + d * E
        attn = (self.n_head + 2 * self.n_query_groups) * self.head_size * d + d * self.n_head * self.head_size
        mlp_norms = 3 * d * self.intermediate_size + 2 * d
        n_m = sum(self.is_mamba(i) for i in range(self.n_layer))
        head = 0 if self.tied else self.padded_vocab_size * d
        return (self.padded_vocab_size * d + head + d + n_m * (mamba + mlp_norms)
                + (self.n_layer - n_m) * (attn + mlp_norms))

    def state_shapes(self, batch: int = 1) -> list[tuple[str, tuple[int, ...]]]:
        """Per-stream recurrent state, in the order the model and the graph carry it. All fp32."""
        out = []
        for i in range(self.n_layer):
            if self.is_mamba(i):
                out.append((f"conv_state.{i}", (batch, self.d_inner, self.d_conv - 1)))
                out.append((f"ssm_state.{i}", (batch, self.d_inner, self.d_state)))
            else:
                shape = (batch, self.n_query_groups, self.window_cache_len, self.head_size)
                out.append((f"k_window.{i}", shape))
                out.append((f"v_window.{i}", shape))
        return out

    def state_bytes(self, batch: int = 1) -> int:
        return sum(4 * math.prod(s) for _, s in self.state_shapes(batch))

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "SambaConfig":
        if not isinstance(d, dict):
            raise SambaEdgeError(f"{source}: expected a JSON object of config fields, got {type(d).__name__}")
        d = dict(d)
        _refuse_non_samba(d, source)
        omitted = [k for k in OFFICIAL_NOT_SAMBA if k not in d]
        if omitted:
            example = ", ".join(f"{k}={PRESETS['Samba_421M'][k]}" for k in omitted)
            raise SambaEdgeError(f"{source} omits {', '.join(omitted)}, whose official LitGPT default "
                                 f"({'; '.join(OFFICIAL_NOT_SAMBA[k] for k in omitted)}) is not a SAMBA model: "
                                 f"set it (Samba_421M has {example})")
        if "mamba_init" not in d and any(k in d for k in _OURS_ONLY):
            d["mamba_init"] = True               # written by a samba-edge that predates the field: tied
        for k, v in OFFICIAL_DEFAULTS.items():   # a hand-written LitGPT JSON means the official defaults
            d.setdefault(k, v)
        ours = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in ours and k not in _OFFICIAL_FIXED)
        if unknown:
            raise SambaEdgeError(f"{source}: unknown config field(s) {unknown[:5]}; "
                                 f"known fields are the LitGPT names: {sorted(ours)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in ours})
        except TypeError as e:
            raise SambaEdgeError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "SambaConfig":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise SambaEdgeError(f"config file {p} not found; pass a preset name or an existing JSON file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SambaEdgeError(f"config file {p} is not valid JSON ({e}); fix the file or use a preset name") from None
        return cls.from_dict(d, source=str(p))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# Official LitGPT fields that SAMBA fixes: accepted in JSON when they hold the SAMBA value,
# refused (with the reason) when they describe another architecture.
_OFFICIAL_FIXED: dict[str, Any] = {
    "org": None, "parallel_residual": False, "bias": False, "mlp": True, "shared_attention_norm": False,
    "_norm_class": ("RMSNorm", "FusedRMSNorm"), "_mlp_class": "LLaMAMLP", "mamba": False,
    "rms_norm": None, "residual_in_fp32": None, "fused_add_norm": None,
    "full_per_layer": 1000000, "ret_per_layer": -1, "gla_per_layer": -1, "attn_layer_pos": None,
    "use_mega": False, "abl_mamba": False, "mamba_swa_mlp": False, "sc_attn": False, "compress": None,
}


# Fields whose official default (microsoft/Samba lit_gpt/config.py `Config`) differs from ours: a JSON
# config that omits one gets the official value (ours only fill presets and our own complete files) ...
OFFICIAL_DEFAULTS: dict[str, Any] = {"vocab_size": 50254, "padding_multiple": 512, "n_layer": 16, "n_head": 32,
                                     "n_embd": 4096, "rotary_percentage": 0.25, "mamba_init": False}
# Fields the official Config does not have: a file that holds them was written by samba-edge
_OURS_ONLY = ("d_state", "d_conv", "expand", "dt_rank", "rope_table_dtype")
# ... or is refused, where the official default is not SAMBA
OFFICIAL_NOT_SAMBA = {"local_window": "-1, full attention", "mb_per_layer": "-1, no Mamba layers",
                      "intermediate_size": "none, which the official LLaMAMLP refuses"}


def _refuse_non_samba(d: dict[str, Any], source: str) -> None:
    for k, want in _OFFICIAL_FIXED.items():
        if k not in d or want is None:
            continue
        ok = d[k] in want if isinstance(want, tuple) else d[k] == want
        if not ok:
            raise SambaEdgeError(
                f"{source}: {k}={d[k]!r} describes an official ablation or another model, not SAMBA "
                f"(SAMBA needs {k}={want!r}); samba-edge exports only SAMBA models")


# ---- presets ---------------------------------------------------------------------------------
def _official(**kw: Any) -> dict[str, Any]:
    base = dict(block_size=4096, vocab_size=32000, padding_multiple=64, n_layer=12, n_head=12, n_embd=1536,
                intermediate_size=4096, local_window=2048, mb_per_layer=2)
    base.update(kw)
    return base


PRESETS: dict[str, dict[str, Any]] = {
    "Samba_421M": _official(),
    "Samba_421M_1k_window": _official(local_window=1024),
    "Samba_421M_512_window": _official(local_window=512),
    "Samba_421M_mqa": _official(intermediate_size=4608, n_query_groups=1),
    "Samba_421M_gqa2": _official(intermediate_size=4608, n_query_groups=2),
    "Samba_421M_gqa4": _official(intermediate_size=4608, n_query_groups=4),
    "Samba_421M_mqa6": _official(intermediate_size=4608, n_head=6, n_query_groups=1),  # head_size 256
    "Samba_421M_nope": _official(nope=True),
    "Samba_1.3B": _official(n_layer=18, n_head=18, n_embd=2304, intermediate_size=6144),
    "Samba_1.3B_nope": _official(n_layer=18, n_head=18, n_embd=2304, intermediate_size=6144, nope=True),
}

# Tiny shapes for tests: cover MHA, GQA, MQA, NoPE, partial RoPE, an untied head and windows of 8 and 16.
_TINY = dict(block_size=128, vocab_size=250, padding_multiple=8, n_layer=4, n_embd=32, n_head=4,
             head_size=8, intermediate_size=64, d_state=8, mb_per_layer=2)
PRESETS.update({
    "tiny_mha_w16": dict(_TINY, local_window=16),
    "tiny_gqa2_w8": dict(_TINY, n_query_groups=2, local_window=8),
    "tiny_mqa_w8": dict(_TINY, n_query_groups=1, local_window=8),
    "tiny_nope_w16": dict(_TINY, nope=True, local_window=16),
    "tiny_partial_rope_w8": dict(_TINY, n_layer=2, rotary_percentage=0.5, local_window=8),
    "tiny_untied_w8": dict(_TINY, n_layer=2, n_query_groups=2, local_window=8, mamba_init=False),
})

# Official configs in microsoft/Samba that are ablations or other architectures.
NOT_SAMBA = {
    "Samba_421M_abl_mamba": "an official Mamba ablation (abl_mamba)",
    "Samba_1.3B_abl_mamba": "an official Mamba ablation (abl_mamba)",
    "Mamba_SWA_MLP_400M": "a Mamba-SWA-MLP layer stack, not SAMBA's block alternation",
    "Mamba_SWA_MLP_1.3B": "a Mamba-SWA-MLP layer stack, not SAMBA's block alternation",
    "S6Mega_438M": "an S6-Mega hybrid", "S6Mega_1.3B": "an S6-Mega hybrid",
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_config(name_or_path: str) -> SambaConfig:
    """A preset name, or the path of a JSON file with LitGPT field names."""
    if name_or_path in PRESETS:
        return SambaConfig(name=name_or_path, **PRESETS[name_or_path])
    if name_or_path in NOT_SAMBA or name_or_path.startswith(("Mamba_SWA_MLP", "S6Mega")) or "_abl_mamba" in name_or_path:
        why = NOT_SAMBA.get(name_or_path, "an official ablation, not SAMBA")
        raise SambaEdgeError(f"config {name_or_path!r} is {why}, not SAMBA; samba-edge exports only SAMBA models "
                             f"(presets: {', '.join(p for p in PRESETS if p.startswith('Samba'))})")
    if name_or_path.endswith(".json") or Path(name_or_path).is_file():
        return SambaConfig.from_json(name_or_path)
    raise SambaEdgeError(f"unknown config {name_or_path!r}: use a preset ({', '.join(PRESETS)}) or a JSON file")
