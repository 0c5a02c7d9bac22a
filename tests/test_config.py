"""Configs: official names and presets, JSON files, refusals with reasons."""
import json

import pytest

from samba_edge.export.config import NOT_SAMBA, PRESETS, SambaConfig, get_config
from samba_edge.runtime.errors import SambaEdgeError


def test_official_parameter_counts():
    assert get_config("Samba_421M").param_count() == 421_793_280
    assert get_config("Samba_421M_mqa6").head_size == 256             # n_embd / n_head, as LitGPT derives it
    assert get_config("Samba_1.3B").n_layer == 18


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_count_matches_the_module(name):
    torch = pytest.importorskip("torch")
    from samba_edge.export.model import Samba

    cfg = get_config(name)
    with torch.device("meta"):
        m = Samba(cfg)
    assert sum(p.numel() for p in m.parameters()) == cfg.param_count()
    assert (m.lm_head.weight is m.transformer.wte.weight) == cfg.tied == (name != "tiny_untied_w8")


def test_mamba_init_ties_the_head_as_the_official_code_does(tmp_path):
    """lit_gpt GPT ties lm_head to wte iff mamba_init; its Config default is False, every SAMBA preset sets True."""
    p = tmp_path / "c.json"
    base = dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=128, local_window=16, mb_per_layer=2)
    p.write_text(json.dumps(base))
    untied = get_config(str(p))
    assert not untied.tied
    p.write_text(json.dumps(dict(base, mamba_init=True)))
    tied = get_config(str(p))
    assert tied.tied and untied.param_count() == tied.param_count() + tied.padded_vocab_size * 64
    old = get_config("tiny_gqa2_w8").to_dict()                         # a file samba-edge wrote before the field
    del old["mamba_init"]
    assert SambaConfig.from_dict(old).tied
    p.write_text(json.dumps(dict(base, mamba_init="yes")))
    with pytest.raises(SambaEdgeError, match="mamba_init must be true or false"):
        get_config(str(p))


def test_defaults_follow_litgpt():
    c = SambaConfig(n_layer=2, n_embd=64, n_head=4, intermediate_size=128)
    assert (c.n_query_groups, c.head_size, c.dt_rank, c.padded_vocab_size) == (4, 16, 4, 32000)
    assert (c.d_state, c.d_conv, c.expand, c.local_window, c.rope_base, c.norm_eps) == (16, 4, 2, 2048, 10000, 1e-5)


def test_json_round_trip_and_official_fields(tmp_path):
    official = dict(org="Microsoft", name="Samba_421M", block_size=4096, vocab_size=32000, padding_multiple=64,
                    mb_per_layer=2, n_layer=12, n_head=12, n_embd=1536, rotary_percentage=1.0,
                    parallel_residual=False, bias=False, _norm_class="FusedRMSNorm", norm_eps=1e-5,
                    _mlp_class="LLaMAMLP", intermediate_size=4096, local_window=2048, mamba_init=True)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(official))
    assert get_config(str(p)).param_count() == 421_793_280
    cfg = get_config("tiny_gqa2_w8")
    cfg.save(tmp_path / "t.json")
    assert SambaConfig.from_json(tmp_path / "t.json") == cfg


@pytest.mark.parametrize("name", sorted(NOT_SAMBA))
def test_ablations_are_refused(name):
    with pytest.raises(SambaEdgeError, match="not SAMBA|ablation"):
        get_config(name)


@pytest.mark.parametrize("fields,match", [
    ({"n_head": 12, "n_query_groups": 5}, "not divisible"),
    ({"abl_mamba": True}, "ablation or another model"),
    ({"use_mega": True}, "not SAMBA"),
    ({"n_layer": 0}, "positive integer"),
    ({"local_window": 1}, "window"),
    ({"norm_eps": 0}, "norm_eps must be a finite number > 0"),
    ({"norm_eps": -1e-5}, "norm_eps"),
    ({"n_embd": 10 ** 9}, "beyond any model"),
    ({"vocab_size": 10 ** 12}, "beyond any model"),
    ({"n_layer": 1000, "n_embd": 16384, "n_head": 128, "intermediate_size": 65536}, "parameters is beyond"),
    ({"rope_base": "10k"}, "rope_base"),
    ({"nope": "yes"}, "nope must be"),
    ({"no_such_field": 3}, "unknown config field"),
])
def test_bad_json_configs(tmp_path, fields, match):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({**dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=128, local_window=16,
                                    mb_per_layer=2), **fields}))
    with pytest.raises(SambaEdgeError, match=match):
        get_config(str(p))


def test_malformed_json_and_unknown_preset(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(SambaEdgeError, match="not valid JSON"):
        get_config(str(p))
    with pytest.raises(SambaEdgeError, match="unknown config"):
        get_config("Samba_9B")


def test_hand_written_json_gets_the_official_defaults(tmp_path):
    """A LitGPT JSON that omits a field means the official default (lit_gpt/config.py), not ours; where the
    official default is not SAMBA (local_window -1, mb_per_layer -1, no intermediate_size) it is refused."""
    p = tmp_path / "c.json"
    base = dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=128, local_window=16, mb_per_layer=2)
    p.write_text(json.dumps(base))
    cfg = get_config(str(p))
    assert (cfg.rotary_percentage, cfg.vocab_size, cfg.padding_multiple) == (0.25, 50254, 512)
    assert cfg.rope_dims == 4                                           # 0.25 x head size 16
    for field in ("local_window", "mb_per_layer", "intermediate_size"):
        p.write_text(json.dumps({k: v for k, v in base.items() if k != field}))
        with pytest.raises(SambaEdgeError, match=f"omits {field}.*official"):
            get_config(str(p))
    saved = get_config("tiny_partial_rope_w8")                         # our own files are complete
    saved.save(tmp_path / "t.json")
    assert SambaConfig.from_json(tmp_path / "t.json") == saved
