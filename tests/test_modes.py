"""The three ways a deployment runs SAMBA agree: full sequence, chunks of any size, token by token."""
import pytest
import torch

from samba_edge.tests.helpers import TINY_PRESETS, chunked_forward, full_forward, tiny_model

TOL = 1e-5


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_full_chunked_and_stepwise_agree(name):
    model = tiny_model(name)
    W = model.config.local_window
    L = 4 * W + 7                                              # several window wrap-arounds
    ids = torch.randint(0, model.config.vocab_size, (3, L), generator=torch.Generator().manual_seed(1))
    full = full_forward(model, ids)
    assert full.abs().max() > 0.5                              # logits are not trivially small
    _, state_full = chunked_forward(model, ids, L)
    for size in sorted({1, 3, 7, W - 1, W, W + 1, 64}):
        got, state = chunked_forward(model, ids, size)
        err = (got - full).abs().max().item()
        assert err <= TOL, f"{name} chunk {size}: logits max-abs {err:.2e}"
        for a, b in zip(state, state_full):
            assert (a - b).abs().max().item() <= TOL, f"{name} chunk {size}: state differs"
    mixed, _ = chunked_forward(model, ids, [5, W + 3, 1, 2 * W])   # irregular schedule
    assert (mixed - full).abs().max().item() <= TOL


def test_rows_at_different_positions_in_one_batch():
    """A batch whose rows are at different absolute positions equals running each row alone."""
    model = tiny_model("tiny_mqa_w8")
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 250, (1, 30), generator=g)
    b = torch.randint(0, 250, (1, 13), generator=g)
    _, sa = chunked_forward(model, a[:, :25], 25)              # row a at position 25
    _, sb = chunked_forward(model, b[:, :8], 8)                # row b at position 8
    state = [torch.cat([x, y]) for x, y in zip(sa, sb)]
    with torch.no_grad():
        logits, *_ = model(torch.cat([a[:, 25:30], b[:, 8:13]]), torch.tensor([25, 8]), *state)
    assert (logits[0] - full_forward(model, a)[0, 25:30]).abs().max() <= TOL
    assert (logits[1] - full_forward(model, b)[0, 8:13]).abs().max() <= TOL


def test_state_is_fp32_and_window_sized():
    model = tiny_model("tiny_gqa2_w8")
    cfg = model.config
    _, state = chunked_forward(model, torch.randint(0, 250, (2, 21)), 21)
    for (name, shape), t in zip(cfg.state_shapes(2), state):
        assert t.dtype == torch.float32, name
        assert tuple(t.shape) == shape, name
    assert cfg.state_shapes(1)[2] == ("k_window.1", (1, 2, 7, 8))


def test_window_really_limits_attention():
    """With the Mamba layers' output zeroed, a token changed at position p can only reach queries
    p .. p+W-1 through the single attention layer: the window must cut it off exactly there."""
    model = tiny_model("tiny_partial_rope_w8")                 # blocks: mamba, attention
    with torch.no_grad():
        model.transformer.h[0].attn.out_proj.weight.zero_()
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(3))
    ids2 = ids.clone()
    ids2[0, 5] = (ids[0, 5] + 1) % 250
    a, b = full_forward(model, ids), full_forward(model, ids2)
    W = model.config.local_window
    assert (a[0, 5 + W:] - b[0, 5 + W:]).abs().max() == 0      # out of every later query's window
    assert (a[0, 5 + W - 1] - b[0, 5 + W - 1]).abs().max() > 1e-4   # the last query that still sees it
