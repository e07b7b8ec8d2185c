import json

import pytest
import torch

from phi3_lightning import Phi3Config, Phi3ForCausalLM, get_preset
from phi3_lightning.model.config import PRESETS

transformers = pytest.importorskip("transformers")

REAL = ["phi-3-mini-4k", "phi-3-mini-128k", "phi-3-medium-4k", "phi-3-medium-128k", "phi-3.5-mini", "phi-4-mini",
        "phi-4"]
EXPECTED_PARAMS = {"phi-3-mini-4k": 3.82e9, "phi-3-medium-4k": 13.96e9, "phi-4-mini": 3.84e9, "phi-4": 14.66e9}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_transformers(name):
    cfg = get_preset(name)
    d = cfg.to_dict()
    d.pop("architectures")
    hc = transformers.Phi3Config(**d)
    with torch.device("meta"):
        hf = transformers.Phi3ForCausalLM(hc)
        ours = Phi3ForCausalLM(cfg, device=torch.device("meta"))
    n_hf = sum(p.numel() for p in hf.parameters())
    assert ours.num_parameters() == n_hf == cfg.num_parameters()
    if name in EXPECTED_PARAMS:
        assert abs(n_hf - EXPECTED_PARAMS[name]) / EXPECTED_PARAMS[name] < 0.01


def test_all_real_presets_exist():
    assert set(REAL) <= set(PRESETS)


@pytest.mark.parametrize("kind", ["su", "yarn", "longrope"])
def test_rope_scaling_aliases(kind):
    half = 8
    cfg = Phi3Config.from_dict(dict(hidden_size=64, num_attention_heads=4, rope_scaling={
        "type": kind, "short_factor": [1.0] * half, "long_factor": [2.0] * half}))
    assert cfg.is_longrope and cfg.rope_scaling["rope_type"] == "longrope"


def test_rope_parameters_key_is_read():
    d = {"hidden_size": 64, "num_attention_heads": 4, "partial_rotary_factor": 0.5,
         "rope_parameters": {"rope_type": "longrope", "rope_theta": 5000.0, "short_factor": [1.0] * 4,
                             "long_factor": [3.0] * 4, "original_max_position_embeddings": 4096}}
    cfg = Phi3Config.from_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.is_longrope and cfg.rope_scaling["long_factor"] == [3.0] * 4


def test_transformers_written_config_round_trip(tmp_path):
    hc = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=1,
                                 vocab_size=50, rope_theta=2e5)
    hc.save_pretrained(tmp_path)
    cfg = Phi3Config.from_pretrained(tmp_path)
    assert cfg.rope_theta == 2e5 and cfg.hidden_size == 64 and not cfg.is_longrope


def test_unknown_keys_kept():
    cfg = Phi3Config.from_dict({"hidden_size": 64, "num_attention_heads": 4, "auto_map": {"x": "y"}, "foo": 1})
    d = cfg.to_dict()
    assert d["foo"] == 1 and d["auto_map"] == {"x": "y"}


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size=100 is not divisible by num_attention_heads=3"),
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads=3"),
    (dict(hidden_size=64, num_attention_heads=4, rope_scaling={"type": "longrope", "short_factor": [1.0] * 3,
                                                               "long_factor": [1.0] * 8}),
     "short_factor'\\] has 3 entries but rotary_dim/2 = 8"),
    (dict(hidden_size=64, num_attention_heads=4, rope_scaling={"type": "dynamic"}), "'dynamic' is not supported"),
    (dict(hidden_size=64, num_attention_heads=4, hidden_act="tanh"), "hidden_act='tanh' is not supported"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Phi3Config.from_dict(kwargs)


def test_wrong_model_type_and_unknown_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        Phi3Config.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown preset 'phi-9'"):
        get_preset("phi-9")


def test_flops_per_token_counts_six_n_plus_attention():
    cfg = get_preset("tiny")
    n = cfg.num_parameters(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size
    assert cfg.flops_per_token(256) == 6 * n + 12 * 2 * 4 * 32 * 256
