"""Independent oracles for the torch model and its two custom ops.

- the whole tiny model vs a float64 numpy SAMBA written from the architecture notes (tests/numpy_samba.py);
- the Mamba mixer vs `transformers`' MambaMixer (its pure-torch path on CPU);
- `samba::sliding_window_attention` vs naive full-matrix band-masked attention, whole and in chunks;
- `samba::selective_scan` whole vs in chunks, and vs a numpy sequential scan.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from samba_edge.export import ops
from samba_edge.export.config import get_config
from samba_edge.export.model import Samba, init_official
from samba_edge.tests.helpers import TINY_PRESETS as PRESETS
from samba_edge.tests.numpy_samba import samba_forward_np


@torch.no_grad()
def perturbed_model(name: str, seed: int = 0) -> Samba:
    """Official init, then every parameter nudged so that a wrong use of any of them would show."""
    model = init_official(Samba(get_config(name)), seed=seed).eval()
    g = torch.Generator().manual_seed(1000 + seed)
    for n, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if n.endswith("A_log"):
            p.add_(0.1 * noise)                                  # A stays negative, rates near 1..N
        elif p.dim() == 1:                                       # norm weights, D, conv / dt biases
            p.add_(0.1 * noise)
        elif not n.endswith("wte.weight"):
            p.add_(0.3 * p.std() * noise)
    model.transformer.wte.weight.mul_(10.0)                      # tied head: logits O(1)
    if not model.config.tied:
        model.lm_head.weight.mul_(10.0)
    return model


def numpy_state_dict(model: Samba) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


# ---- whole model vs numpy ---------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_whole_model_matches_numpy_float64(name):
    model = perturbed_model(name)
    cfg = model.config
    B, L = 2, 4 * cfg.local_window + 5
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = model(ids, torch.zeros(B, dtype=torch.long), *model.empty_state(B))[0].double().numpy()
    sd = numpy_state_dict(model)
    ref = samba_forward_np(sd, cfg, ids.numpy())
    assert ref.shape == (B, L, cfg.padded_vocab_size)
    assert np.abs(ref).max() > 0.5, "logits trivially small: the comparison would not be meaningful"
    err = float(np.abs(got - ref).max())
    assert err <= 1e-5, f"{name}: torch vs numpy float64 logits max-abs {err:.3e}"

    # negative control: the oracle is sensitive to the window (and so to the layer it feeds)
    wrong = samba_forward_np(sd, dataclasses.replace(cfg, local_window=cfg.local_window + 1), ids.numpy())
    assert float(np.abs(wrong - ref).max()) > 1e-3, f"{name}: numpy oracle insensitive to the window"


# ---- Mamba mixer vs transformers' MambaMixer --------------------------------------------------
@pytest.mark.parametrize("name", ["tiny_gqa2_w8", "tiny_partial_rope_w8"])
def test_rope_table_dtype_is_part_of_the_model(name):
    """bf16 tables (the official code's, the presets' default) and fp32 tables are different models, and
    each matches the numpy oracle that rounds the same way (by bit arithmetic, not torch's cast)."""
    model = perturbed_model(name)
    assert model.config.rope_table_dtype == "bf16"
    ids = torch.randint(0, model.config.vocab_size, (1, 3 * model.config.local_window + 3),
                        generator=torch.Generator().manual_seed(3))
    sd = numpy_state_dict(model)
    outs = {}
    for dt in ("bf16", "fp32"):
        model.config.rope_table_dtype = dt
        with torch.no_grad():
            got = model(ids, torch.zeros(1, dtype=torch.long), *model.empty_state(1))[0].double().numpy()
        ref = samba_forward_np(sd, model.config, ids.numpy())
        assert float(np.abs(got - ref).max()) <= 1e-5, f"{name} {dt}: torch vs numpy"
        outs[dt] = got
    model.config.rope_table_dtype = "bf16"
    assert float(np.abs(outs["bf16"] - outs["fp32"]).max()) > 1e-4, "the table dtype made no difference"


def test_mamba_mixer_matches_transformers():
    pytest.importorskip("transformers")
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    # With neither package installed, HF's kernel hooks fall back to its reference torch functions
    # (F.conv1d with K-1 padding, a sequential scan); those are what this test compares against.
    for pkg in ("mamba_ssm", "causal_conv1d"):
        if importlib.util.find_spec(pkg) is not None:
            pytest.skip(f"{pkg} installed: HF would dispatch to its CUDA kernel, not the pure-torch path")

    model = perturbed_model("tiny_gqa2_w8")
    cfg = model.config
    ours = model.transformer.h[0].attn.eval()
    hf_cfg = MambaConfig(hidden_size=cfg.n_embd, state_size=cfg.d_state, conv_kernel=cfg.d_conv,
                         expand=cfg.expand, time_step_rank=cfg.dt_rank, use_conv_bias=True, use_bias=False,
                         hidden_act="silu", num_hidden_layers=1, use_mambapy=False, use_associative_scan=False)
    hf = MambaMixer(hf_cfg, layer_idx=0).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)

    B, L, E = 2, 37, cfg.d_inner
    h = torch.randn(B, L, cfg.n_embd, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, _, _ = ours(h, torch.zeros(B, E, cfg.d_conv - 1), torch.zeros(B, E, cfg.d_state))
        ref = hf(h)
    assert ref.abs().max() > 0.1
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    # outputs are O(0.1) (out_proj is scaled down at init), so also bound the error relative to them
    assert err <= 1e-5 and err <= 1e-5 * scale, f"Mamba vs transformers MambaMixer max-abs {err:.3e} (|ref| {scale:.3f})"


# ---- sliding-window attention op vs naive band-masked attention -------------------------------
def naive_window_attention(q, k, v, W):
    """q (b, H, L, hs), k/v (b, G, L, hs) -> (b, H, L, hs), float64, full L x L scores."""
    q, k, v = (t.double() for t in (q, k, v))
    H, G, L, hs = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    k = torch.stack([k[:, h // (H // G)] for h in range(H)], dim=1)   # query head h uses group h // (H/G)
    v = torch.stack([v[:, h // (H // G)] for h in range(H)], dim=1)
    scores = q @ k.transpose(-1, -2) / hs ** 0.5
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    scores = scores.masked_fill(~((j <= i) & (j > i - W)), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("H,G", [(4, 2), (4, 1)])
def test_sliding_window_attention_op_vs_naive(H, G):
    b, hs, W = 2, 8, 8
    L = 3 * W + 2
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(b, n, L, hs, generator=g) for n in (H, G, G))
    scale = 1.0 / hs ** 0.5
    ref = naive_window_attention(q, k, v, W)

    zeros = torch.zeros(b, G, W - 1, hs)
    y, kw, vw = ops.sliding_window_attention(q, k, v, zeros, zeros, torch.zeros(b, dtype=torch.long), W, scale)
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-6, f"H={H} G={G} whole: max-abs {err:.3e}"
    assert torch.equal(kw, k[:, :, -(W - 1):]) and torch.equal(vw, v[:, :, -(W - 1):])

    for split in (W + 3, 3, W - 1):                              # longer and shorter than the window
        kw, vw = zeros, zeros
        outs, p = [], 0
        for n in (split, L - split):
            sl = slice(p, p + n)
            y, kw, vw = ops.sliding_window_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], kw, vw,
                                                     torch.full((b,), p, dtype=torch.long), W, scale)
            outs.append(y)
            p += n
        err = (torch.cat(outs, dim=2).double() - ref).abs().max().item()
        assert err <= 1e-6, f"H={H} G={G} chunks ({split}, {L - split}): max-abs {err:.3e}"


# ---- selective scan: chunk continuation and numpy sequential scan -----------------------------
def numpy_scan(u, delta, A, B, C, D, z, delta_bias, s0):
    u, delta, A, B, C, D, z, delta_bias, s = (np.asarray(t, dtype=np.float64) for t in
                                              (u, delta, A, B, C, D, z, delta_bias, s0))
    dt = delta + delta_bias[:, None]
    dt = np.where(dt > 20, dt, np.log1p(np.exp(np.minimum(dt, 20))))
    T = u.shape[-1]
    y = np.empty_like(u)
    for t in range(T):
        s = np.exp(dt[:, :, t, None] * A) * s + (dt[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        y[:, :, t] = np.einsum("ben,bn->be", s, C[:, :, t]) + D * u[:, :, t]
    return y * z / (1 + np.exp(-z)), s


def test_selective_scan_chunks_and_numpy():
    b, E, N, T = 2, 6, 4, 20
    g = torch.Generator().manual_seed(5)
    u, z = torch.randn(b, E, T, generator=g), torch.randn(b, E, T, generator=g)
    delta = 0.5 * torch.randn(b, E, T, generator=g)
    A = -torch.exp(torch.log(torch.arange(1, N + 1, dtype=torch.float32)) + 0.2 * torch.randn(E, N, generator=g))
    Bm, Cm = torch.randn(b, N, T, generator=g), torch.randn(b, N, T, generator=g)
    D, bias = torch.randn(E, generator=g), torch.randn(E, generator=g) - 2.0
    s0 = 0.5 * torch.randn(b, E, N, generator=g)                 # a non-zero starting state

    y_full, s_full = ops.selective_scan(u, delta, A, Bm, Cm, D, z, bias, s0)
    s, ys, p = s0, [], 0
    for n in (7, 6, 7):
        sl = slice(p, p + n)
        y, s = ops.selective_scan(u[..., sl], delta[..., sl], A, Bm[..., sl], Cm[..., sl], D, z[..., sl], bias, s)
        ys.append(y)
        p += n
    err_y = (torch.cat(ys, dim=-1) - y_full).abs().max().item()
    err_s = (s - s_full).abs().max().item()
    assert err_y <= 1e-6 and err_s <= 1e-6, f"chunked scan: y max-abs {err_y:.3e}, state {err_s:.3e}"

    y_np, s_np = numpy_scan(u, delta, A, Bm, Cm, D, z, bias, s0)
    assert np.abs(y_np).max() > 0.1
    err_y = float(np.abs(y_full.double().numpy() - y_np).max())
    err_s = float(np.abs(s_full.double().numpy() - s_np).max())
    assert err_y <= 1e-6 and err_s <= 1e-6, f"scan vs numpy: y max-abs {err_y:.3e}, state {err_s:.3e}"
