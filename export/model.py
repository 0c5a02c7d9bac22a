"""SAMBA (arXiv 2406.07522) as one step function: tokens + recurrent state in, logits + state out.

    x = wte(ids)                                    fp32 residual stream
    for block i:  x = x + Mixer_i(RMSNorm(x))       Mixer = Mamba-1 (even i) | sliding-window attn (odd i)
                  x = x + SwiGLU_i(RMSNorm(x))
    logits = lm_head(RMSNorm_f(x))                  lm_head tied to wte (mamba_init, every preset)

The same `forward` serves a full sequence from an empty state, prefill chunks and single-token
decode: every layer's state is an explicit input and output (the contract of the ONNX graph).
Parameter names are those of the official checkpoints (`transformer.h.{i}.attn.in_proj.weight`, ...).
"""
from __future__ import annotations

import functools
import math
from decimal import Decimal, getcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from samba_edge.export import ops
from samba_edge.export.config import SambaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()                                                  # statistics in fp32
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(self.weight.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class MLP(nn.Module):
    """Official key layout: `mlp.swiglu.{w1,w2,w3}` (xformers SwiGLU inside LitGPT's LLaMAMLP)."""

    def __init__(self, cfg: SambaConfig) -> None:
        super().__init__()
        self.swiglu = SwiGLU(cfg.n_embd, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.swiglu(x)


class Mamba(nn.Module):
    """Mamba-1 mixer. State: conv_state (b, E, K-1) = last K-1 pre-conv inputs; ssm_state (b, E, N)."""

    def __init__(self, cfg: SambaConfig) -> None:
        super().__init__()
        d, E, N, K, R = cfg.n_embd, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank
        self.E, self.N, self.R, self.K = E, N, R, K
        self.in_proj = nn.Linear(d, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, K, groups=E, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d, bias=False)

    def forward(self, h: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)          # (b, E, T) each
        xpad = torch.cat([conv_state.to(x.dtype), x], dim=-1)           # (b, E, K-1+T)
        new_conv = xpad[:, :, xpad.shape[-1] - (self.K - 1):].float()   # last K-1 inputs
        xc = F.conv1d(xpad, self.conv1d.weight, self.conv1d.bias, groups=self.E)  # (b, E, T)
        u = F.silu(xc)
        dt, Bm, Cm = self.x_proj(u.transpose(1, 2)).split([self.R, self.N, self.N], dim=-1)
        # dt_proj in fp32 (tiny GEMM, R x E): delta feeds exp() in the scan, fp16 rounding here would compound
        delta = F.linear(dt.float(), self.dt_proj.weight.float()).transpose(1, 2)   # (b, E, T); bias in the scan
        A = -torch.exp(self.A_log.float())                               # (E, N) fp32
        y, new_ssm = ops.selective_scan(
            u.float(), delta, A, Bm.transpose(1, 2).float(), Cm.transpose(1, 2).float(),
            self.D.float(), z.float(), self.dt_proj.bias.float(), ssm_state)
        return self.out_proj(y.transpose(1, 2).to(h.dtype)), new_conv, new_ssm


ROPE_LEVELS = 10                   # 4-bit position digits: exact phases for positions < 16**10 (~1.1e12)


@functools.lru_cache(maxsize=None)
def rope_phase_table(n_rot: int, base: float, condense: int) -> np.ndarray:
    """(ROPE_LEVELS*16, n_rot/2) fp32; row 16k+d holds (d * 16**k * theta_j / condense) mod 2 pi.

    theta_j is the fp32 inverse frequency the official code uses. Each phase is computed exactly
    (decimal arithmetic) and rounded once, so a position's angle, summed from its digits' rows, is
    accurate to ~1e-5 rad at ANY position. The textbook `pos * theta` in fp32 loses ~pos * 6e-8
    rad (3e-3 at 100K tokens) and differs between backends: long streams would drift."""
    getcontext().prec = 60
    two_pi = 2 * Decimal("3.14159265358979323846264338327950288419716939937510582097494459")
    theta = (1.0 / base ** (np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)).astype(np.float32)
    rows = [[float((Decimal(d * 16**k) * Decimal(float(t)) / condense) % two_pi) for t in theta]
            for k in range(ROPE_LEVELS) for d in range(16)]
    return np.asarray(rows, dtype=np.float32)      # numpy, not a cached tensor: tracing would make it fake


def rope(x: Tensor, pos: Tensor, n_rot: int, base: float, condense: int, table_dtype: str = "fp32") -> Tensor:
    """NeoX half-split rotary embedding on the first n_rot dims. x: (b, heads, T, hs), pos: (b, T) int64.
    table_dtype "bf16": cos/sin rounded to bfloat16 (round to nearest even) as the official code's
    tables are, then the rotation in fp32; the phases themselves stay exact at any position."""
    levels = torch.arange(ROPE_LEVELS, device=pos.device)
    rows = (pos[..., None] // 16**levels) % 16 + 16 * levels                 # (b, T, L): each digit's row
    table = torch.tensor(rope_phase_table(n_rot, float(base), condense), device=x.device)
    ang = F.embedding(rows, table).sum(-2)
    ang = ang[:, None]                                                        # (b, 1, T, n_rot/2) fp32
    cos, sin = torch.cos(ang), torch.sin(ang)
    if table_dtype == "bf16":
        cos, sin = cos.to(torch.bfloat16).float(), sin.to(torch.bfloat16).float()
    xr, xpass = x[..., :n_rot].float(), x[..., n_rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    rot = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
    return torch.cat([rot, xpass], dim=-1) if xpass.shape[-1] else rot


class SlidingWindowAttention(nn.Module):
    """Causal attention over the last W positions. State: the window's K/V (b, G, W-1, hs), post-RoPE."""

    def __init__(self, cfg: SambaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, G, hs = cfg.n_head, cfg.n_query_groups, cfg.head_size
        self.attn = nn.Linear(cfg.n_embd, (H + 2 * G) * hs, bias=False)   # LitGPT grouped q..q,k,v rows
        self.proj = nn.Linear(H * hs, cfg.n_embd, bias=False)

    def forward(self, h: Tensor, start_pos: Tensor, k_window: Tensor, v_window: Tensor):
        c = self.cfg
        b, T, _ = h.shape
        H, G, hs = c.n_head, c.n_query_groups, c.head_size
        qkv = self.attn(h).view(b, T, G, H // G + 2, hs)
        q = qkv[:, :, :, :-2].reshape(b, T, H, hs).transpose(1, 2)       # (b, H, T, hs)
        k = qkv[:, :, :, -2].transpose(1, 2)                             # (b, G, T, hs)
        v = qkv[:, :, :, -1].transpose(1, 2)
        if not c.nope:
            pos = start_pos[:, None] + torch.arange(T, device=h.device)  # absolute positions (b, T)
            q = rope(q, pos, c.rope_dims, c.rope_base, c.condense_ratio, c.rope_table_dtype)
            k = rope(k, pos, c.rope_dims, c.rope_base, c.condense_ratio, c.rope_table_dtype)
        y, new_k, new_v = ops.sliding_window_attention(
            q, k, v, k_window, v_window, start_pos, c.local_window, 1.0 / math.sqrt(hs))
        return self.proj(y.transpose(1, 2).reshape(b, T, H * hs)), new_k, new_v


class Block(nn.Module):
    def __init__(self, cfg: SambaConfig, i: int) -> None:
        super().__init__()
        self.is_mamba = cfg.is_mamba(i)
        self.norm_1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Mamba(cfg) if self.is_mamba else SlidingWindowAttention(cfg)   # official name: "attn"
        self.norm_2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, start_pos: Tensor, s0: Tensor, s1: Tensor):
        h = self.norm_1(x)
        if self.is_mamba:
            h, s0, s1 = self.attn(h, s0, s1)
        else:
            h, s0, s1 = self.attn(h, start_pos, s0, s1)
        x = x + h.float()
        x = x + self.mlp(self.norm_2(x)).float()
        return x, s0, s1


class Samba(nn.Module):
    def __init__(self, cfg: SambaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tied:                                                       # official: tied iff mamba_init
            self.lm_head.weight = self.transformer.wte.weight

    def empty_state(self, batch: int, device=None) -> list[Tensor]:
        """Zeros for every state tensor, in `config.state_shapes()` order."""
        return [torch.zeros(s, dtype=torch.float32, device=device) for _, s in self.config.state_shapes(batch)]

    def forward(self, input_ids: Tensor, start_pos: Tensor, *state: Tensor, last_only: bool = False):
        """input_ids (b, T) int64; start_pos (b,) int64 absolute position of each row's first token;
        state: 2 tensors per layer. Returns (logits (b, T|1, padded_vocab) fp32, *new_state)."""
        x = self.transformer.wte(input_ids).float()                     # fp32 residual stream
        new_state: list[Tensor] = []
        for i, block in enumerate(self.transformer.h):
            x, s0, s1 = block(x, start_pos, state[2 * i], state[2 * i + 1])
            new_state += [s0, s1]
        if last_only:
            x = x[:, -1:]
        w = self.lm_head.weight
        logits = F.linear(self.transformer.ln_f(x), w).float()          # norm statistics on the fp32 stream
        return (logits, *new_state)


@torch.no_grad()
def init_official(model: Samba, seed: int = 0, dt_min: float = 1e-3, dt_max: float = 1e-1) -> Samba:
    """The official initialisation for training from scratch (mamba_init=True in microsoft/Samba)."""
    g = torch.Generator().manual_seed(seed)
    n_layer = model.config.n_layer
    for name, p in model.named_parameters():
        if name.endswith("wte.weight"):
            p.normal_(0.0, 0.02, generator=g)
        elif name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or name.endswith("ln_f.weight"):
            p.fill_(1.0)
        elif name.endswith(("attn.proj.weight", "out_proj.weight", "swiglu.w3.weight")):
            bound = 1.0 / math.sqrt(p.shape[1])                          # kaiming_uniform(a=sqrt 5)
            p.uniform_(-bound, bound, generator=g).div_(math.sqrt(2 * n_layer))
        elif p.dim() >= 2 and not name.endswith("A_log"):
            fan_in = p.shape[1] * (p.shape[2] if p.dim() > 2 else 1)
            bound = 1.0 / math.sqrt(fan_in)
            if name.endswith("dt_proj.weight"):
                bound = p.shape[1] ** -0.5                                # dt_init "random": U(+-R^-0.5)
            p.uniform_(-bound, bound, generator=g)
    for block in model.transformer.h:
        if block.is_mamba:
            m = block.attn
            dt = torch.exp(torch.rand(m.E, generator=g) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=1e-4)
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))        # inverse softplus
            m.conv1d.bias.uniform_(-1.0 / math.sqrt(m.K), 1.0 / math.sqrt(m.K), generator=g)
            m.A_log.copy_(torch.log(torch.arange(1, m.N + 1, dtype=torch.float32)).repeat(m.E, 1))
            m.D.fill_(1.0)
    return model
