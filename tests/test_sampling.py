"""The fast sampler is the reference sampler: the same token for the same logits, parameters and seed."""
import numpy as np
import pytest

from samba_edge.runtime.sampling import SamplingParams, choose, choose_ref


@pytest.mark.parametrize("vocab", [5, 300, 32000])
def test_choose_equals_choose_ref_draw_for_draw(vocab):
    """Ties (rounded or constant logits), flat and peaky distributions, every knob; the rng consumed alike
    (a second draw from each generator must agree too)."""
    rng = np.random.default_rng(vocab)
    for trial in range(150):
        logits = (rng.standard_normal(vocab) * rng.choice([0.1, 1.0, 5.0, 30.0])).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits)
        if trial % 11 == 0:
            logits[:] = 1.0
        p = SamplingParams(temperature=float(rng.choice([0.0, 0.5, 1.0, 2.0])), top_k=int(rng.choice([0, 1, 40])),
                           top_p=float(rng.choice([1.0, 0.5, 0.95, 0.999, 1e-6])),
                           repetition_penalty=float(rng.choice([1.0, 1.3])))
        recent = list(rng.integers(0, vocab, 20))
        seed = int(rng.integers(2**31))
        fast, ref = np.random.default_rng(seed), np.random.default_rng(seed)
        assert choose(logits, p, fast, recent) == choose_ref(logits, p, ref, recent), (trial, p)
        assert fast.random() == ref.random()
