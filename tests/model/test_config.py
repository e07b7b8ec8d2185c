import json

import pytest
import torch

from phi3_lightning import Phi3Config, Phi3ForCausalLM, get_preset
from phi3_lightning.model.config import PRESETS

transformers = pytest.importorskip("transformers")

REAL = [
    "phi-3-mini-4k",
    "phi-3-mini-128k",
    "phi-3-medium-4k",
    "phi-3-medium-128k",
    "phi-3.5-mini",
    "phi-4-mini",
    "phi-4",
]
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


@pytest.mark.parametrize("name", ["phi-3-medium-4k", "phi-4-mini", "tiny-gqa"])
def test_linear_shapes_are_transformers_weight_shapes(name):
    """Phi3Config.linear_shapes() (read by the layers, LoRA counts and the memory planner) against the oracle."""
    cfg = get_preset(name, num_hidden_layers=1)
    d = cfg.to_dict()
    d.pop("architectures")
    with torch.device("meta"):
        hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**d))
    layer = hf.model.layers[0]
    want = {
        "qkv_proj": layer.self_attn.qkv_proj,
        "o_proj": layer.self_attn.o_proj,
        "gate_up_proj": layer.mlp.gate_up_proj,
        "down_proj": layer.mlp.down_proj,
    }
    assert cfg.linear_shapes() == {k: tuple(m.weight.shape) for k, m in want.items()}


def test_all_real_presets_exist():
    assert set(REAL) <= set(PRESETS)


@pytest.mark.parametrize("kind", ["su", "yarn", "longrope"])
def test_rope_scaling_aliases(kind):
    half = 8
    cfg = Phi3Config.from_dict(
        dict(
            hidden_size=64,
            num_attention_heads=4,
            rope_scaling={"type": kind, "short_factor": [1.0] * half, "long_factor": [2.0] * half},
        )
    )
    assert cfg.is_longrope and cfg.rope_scaling["rope_type"] == "longrope"


def test_rope_parameters_key_is_read():
    d = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "partial_rotary_factor": 0.5,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 5000.0,
            "short_factor": [1.0] * 4,
            "long_factor": [3.0] * 4,
            "original_max_position_embeddings": 4096,
        },
    }
    cfg = Phi3Config.from_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.is_longrope and cfg.rope_scaling["long_factor"] == [3.0] * 4


def test_transformers_written_config_round_trip(tmp_path):
    hc = transformers.Phi3Config(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=96,
        num_hidden_layers=1,
        vocab_size=50,
        rope_theta=2e5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hc.save_pretrained(tmp_path)
    cfg = Phi3Config.from_pretrained(tmp_path)
    assert cfg.rope_theta == 2e5 and cfg.hidden_size == 64 and not cfg.is_longrope


def test_unknown_keys_kept():
    cfg = Phi3Config.from_dict({"hidden_size": 64, "num_attention_heads": 4, "auto_map": {"x": "y"}, "foo": 1})
    d = cfg.to_dict()
    assert d["foo"] == 1 and d["auto_map"] == {"x": "y"}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "hidden_size=100 is not divisible by num_attention_heads=3"),
        (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads=3"),
        (
            dict(
                hidden_size=64,
                num_attention_heads=4,
                rope_scaling={"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8},
            ),
            "short_factor'\\] has 3 entries but rotary_dim/2 = 8",
        ),
        (dict(hidden_size=64, num_attention_heads=4, rope_scaling={"type": "dynamic"}), "'dynamic' is not supported"),
        (dict(hidden_size=64, num_attention_heads=4, hidden_act="tanh"), "hidden_act='tanh' is not supported"),
    ],
)
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


# ---------------------------------------------------------------------- overrides and values that cannot work
def test_unknown_override_names_the_closest_field(tmp_path):
    """A typo in config_overrides must not land in `extra` and be ignored: an error names the field meant."""
    with pytest.raises(
        ValueError,
        match=r"'num_hiden_layers' is not a Phi3Config field; did you mean "
        r"'num_hidden_layers'\?",
    ):
        get_preset("tiny").replace(num_hiden_layers=8)
    with pytest.raises(ValueError, match=r"'rope_thetta' .* did you mean 'rope_theta'\?"):
        get_preset("tiny", rope_thetta=5.0)
    get_preset("tiny").save(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"'sliding_windw' .* did you mean 'sliding_window'\?"):
        Phi3Config.from_pretrained(tmp_path, sliding_windw=8)
    with pytest.raises(ValueError, match=r"'zzz' is not a Phi3Config field; valid fields: .*num_hidden_layers"):
        get_preset("tiny").replace(zzz=1)
    # real fields (and transformers' spellings that from_dict reads) are accepted
    assert get_preset("tiny").replace(num_hidden_layers=1, dtype="bfloat16").num_hidden_layers == 1


def test_unknown_config_json_keys_still_land_in_extra(tmp_path):
    d = get_preset("tiny").to_dict()
    d.update(transformers_version="5.24.0", auto_map={"x": "y"})
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = Phi3Config.from_pretrained(tmp_path)
    assert cfg.extra["auto_map"] == {"x": "y"} and cfg.extra["transformers_version"] == "5.24.0"
    # a key the checkpoint itself carries may be overridden
    assert cfg.replace(transformers_version="x").extra["transformers_version"] == "x"


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(rms_norm_eps=0.0), r"rms_norm_eps=0.0 must be a finite number > 0 .* e.g. 1e-5"),
        (dict(rms_norm_eps=-1e-6), r"rms_norm_eps=-1e-06 must be a finite number > 0"),
        (dict(rms_norm_eps=float("nan")), r"rms_norm_eps=nan must be a finite number > 0"),
        (dict(rope_theta=0.0), r"rope_theta=0.0 must be a finite number > 0 .* e.g. 10000.0"),
        (dict(rope_theta=-10000.0), r"rope_theta=-10000.0 must be"),
        (dict(max_position_embeddings=0), r"max_position_embeddings=0 must be a positive integer"),
        (dict(max_position_embeddings=-5), r"max_position_embeddings=-5 must be a positive integer"),
        (dict(num_labels=0), r"num_labels=0 must be an integer >= 1"),
        (
            dict(pad_token_id=512),
            r"pad_token_id=512 is outside the vocabulary \[0, vocab_size=512\); set it to an id "
            r"below 512 .*raise vocab_size, or set it to null",
        ),
        (dict(pad_token_id=-1), r"pad_token_id=-1 is outside the vocabulary"),
        (dict(eos_token_id=600), r"eos_token_id=600 is outside the vocabulary \[0, vocab_size=512\)"),
        (dict(eos_token_id=[256, 700]), r"eos_token_id=\[256, 700\] is outside the vocabulary"),
        (dict(bos_token_id=100000), r"bos_token_id=100000 is outside the vocabulary"),
        (dict(vocab_size=200), r"(bos|eos|pad)_token_id=25[67] is outside the vocabulary \[0, vocab_size=200\)"),
        (dict(head_dim=0), r"head_dim=0 must be a positive integer or null"),
        (dict(resid_pdrop=1.5), r"resid_pdrop=1.5 must be a probability in \[0, 1\)"),
        (dict(initializer_range=-0.02), r"initializer_range=-0.02 must be a finite number >= 0"),
    ],
)
def test_values_that_cannot_work_are_refused_at_config_time(override, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **override)


def _longrope(**scaling):
    half = get_preset("tiny").rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [1.0] * half, **scaling}


@pytest.mark.parametrize(
    "override,message",
    [
        # a NaN/inf scale gives NaN logits, 0 zeroes cos/sin (every attention score 0): silently wrong numbers
        (
            dict(rope_scaling=_longrope(attention_factor=float("nan"))),
            r"rope_scaling\['attention_factor'\]=nan must be a finite number > 0",
        ),
        (
            dict(rope_scaling=_longrope(attention_factor=float("inf"))),
            r"rope_scaling\['attention_factor'\]=inf must be a finite number > 0",
        ),
        (
            dict(rope_scaling=_longrope(attention_factor=0.0)),
            r"rope_scaling\['attention_factor'\]=0.0 must be a finite number > 0",
        ),
        (
            dict(rope_scaling=_longrope(attention_factor="x")),
            r"rope_scaling\['attention_factor'\]='x' must be a finite number > 0",
        ),
        (
            dict(rope_scaling=_longrope(factor=float("nan"))),
            r"rope_scaling\['factor'\]=nan must be a finite number > 0",
        ),
        (dict(rope_scaling=_longrope(factor=-2.0)), r"rope_scaling\['factor'\]=-2.0 must be a finite number > 0"),
        # sqrt(1 + ln(max/orig) / ln(orig)) divides by ln(1) = 0 (was a ZeroDivisionError traceback)
        (
            dict(rope_scaling=_longrope(), original_max_position_embeddings=1),
            r"original_max_position_embeddings=1 .* LongRoPE",
        ),
    ],
)
def test_longrope_scales_that_cannot_work_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **override)


def test_valid_ids_and_nulls_are_accepted():
    cfg = get_preset("tiny", pad_token_id=None, bos_token_id=None, eos_token_id=[256, 511], classifier_dropout=None)
    assert cfg.eos_token_ids == [256, 511] and cfg.pad_token_id is None
    assert get_preset("tiny", num_labels=1).num_labels == 1


def test_invalid_value_in_a_checkpoint_config_is_named(tmp_path):
    d = get_preset("tiny").to_dict()
    d["rms_norm_eps"] = 0
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rms_norm_eps=0 must be"):
        Phi3Config.from_pretrained(tmp_path)


def test_resolve_model_every_source(tmp_path):
    """The one resolver (modules, memory planner, compare-attention and Phi3Config.from_pretrained read it)."""
    from phi3_lightning.model import resolve_model

    tiny = get_preset("tiny")
    assert resolve_model("tiny") == (tiny, None)
    assert resolve_model(tiny, {"num_hidden_layers": 1})[0].num_hidden_layers == 1
    assert resolve_model(tiny.to_dict())[0].to_dict() == tiny.to_dict()
    tiny.replace(hidden_size=64).save(tmp_path / "config.json")
    config, weights = resolve_model(tmp_path)
    assert config.hidden_size == 64 and weights == tmp_path
    config, weights = resolve_model(str(tmp_path / "config.json"), {"num_labels": 4})
    assert (config.hidden_size, config.num_labels, weights) == (64, 4, None)  # a config.json: architecture only
    assert Phi3Config.from_pretrained(tmp_path, num_labels=5).num_labels == 5
    with pytest.raises(FileNotFoundError, match=r"model='phi-9' is neither a preset \(phi-3-medium-128k, "):
        resolve_model("phi-9")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory without config.json") as e:
        resolve_model(tmp_path / "empty")
    assert "adapter" not in str(e.value)
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")  # a LoRA adapter given as the model
    with pytest.raises(
        FileNotFoundError, match="holds a LoRA adapter .*: set model to its base checkpoint and adapter"
    ):
        resolve_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="config override 'num_hiden_layers' is not a Phi3Config field; did you mean"):
        resolve_model("tiny", {"num_hiden_layers": 1})
    with pytest.raises(TypeError, match="model=3: pass a preset name"):
        resolve_model(3)


@pytest.mark.parametrize("name", ["tie_word_embeddings", "use_cache", "attention_bias"])
@pytest.mark.parametrize("value", ["false", "False", 0, 1, None])
def test_boolean_fields_refuse_non_bool_values(name, value):
    # "false" (a string, e.g. quoted in YAML or config.json) is truthy: tie_word_embeddings="false" tied the
    # lm_head to the embedding, a different model with no error.
    with pytest.raises(ValueError, match=rf"{name}={value!r} must be true or false"):
        get_preset("tiny", **{name: value})


def test_tie_word_embeddings_string_in_a_checkpoint_config_is_refused(tmp_path):
    d = get_preset("tiny").to_dict()
    d["tie_word_embeddings"] = "false"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="tie_word_embeddings='false' must be true or false"):
        Phi3Config.from_pretrained(tmp_path)
    d["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert Phi3Config.from_pretrained(tmp_path).tie_word_embeddings is False


def _longrope_factors(half):
    return {"short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [1.0 + 0.5 * i for i in range(half)]}


# config.json dicts that spell RoPE in two places at once; transformers reads the RoPE dict (rope_scaling when it is
# a non-empty dict, else rope_parameters) first and the top-level rope_theta / partial_rotary_factor only as defaults
ROPE_SPELLINGS = {
    "rope_parameters theta over top-level theta": dict(
        rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 500.0}
    ),
    "rope_parameters partial factor over top-level": dict(
        partial_rotary_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),
    "rope_scaling wins, rope_parameters ignored": dict(
        rope_scaling={"type": "longrope", **_longrope_factors(8)},
        rope_parameters={"rope_type": "longrope", "rope_theta": 500.0, **_longrope_factors(8)},
    ),
    "theta inside rope_scaling": dict(
        rope_theta=10000.0, rope_scaling={"type": "longrope", "rope_theta": 500.0, **_longrope_factors(8)}
    ),
    "empty rope_scaling falls back to rope_parameters": dict(
        rope_scaling={}, rope_parameters={"rope_type": "longrope", "rope_theta": 500.0, **_longrope_factors(8)}
    ),
}


@pytest.mark.parametrize("case", sorted(ROPE_SPELLINGS))
def test_rope_spelled_twice_gives_transformers_cos_sin(case):
    """The same config.json dict gives the same cos/sin as transformers' rotary embedding, short and long regime."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding as HFRotary

    from phi3_lightning.model.rope import Phi3RotaryEmbedding

    d = dict(
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=97,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        **ROPE_SPELLINGS[case],
    )
    ours = Phi3RotaryEmbedding(Phi3Config.from_dict(json.loads(json.dumps(d))))
    theirs = HFRotary(transformers.Phi3Config(**json.loads(json.dumps(d))))
    for t in (10, 40):  # below and above the LongRoPE switch
        pos = torch.arange(t)[None]
        (c1, s1), (c2, s2) = ours(pos, torch.float32), theirs(torch.zeros(1, t, 64), pos)
        assert c1.shape == c2.shape
        assert torch.allclose(c1, c2, atol=1e-6) and torch.allclose(s1, s2, atol=1e-6), (case, t)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_rope_dict_that_is_not_an_object_is_named(key):
    with pytest.raises(ValueError, match=rf"{key}='longrope' must be a JSON object"):
        Phi3Config.from_dict({"hidden_size": 64, "num_attention_heads": 4, key: "longrope"})
