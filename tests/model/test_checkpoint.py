"""Checkpoint I/O: export round trip through transformers, sharding, and clear errors on bad input."""

import json
import warnings

import pytest
import torch

from phi3_lightning import Phi3Config, Phi3ForCausalLM, Phi3ForSequenceClassification, Phi3ForTokenClassification

from .shapes import config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("shape", ["mini-4k", "phi-4-mini"])
def test_export_round_trip_transformers_loads_same_logits(tmp_path, shape):
    ours = Phi3ForCausalLM(config(shape)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(3, 97, (2, 20))
    with torch.no_grad():
        a, b = ours(x).logits, hf(x).logits
    assert ((a - b).abs().max() / b.abs().max()) < 1e-4
    back = Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(x).logits, a)


def test_sharded_save_and_load(tmp_path):
    ours = Phi3ForCausalLM(config("medium-4k")).eval()
    ours.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert not list(tmp_path.glob("*.tmp"))
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    back = Phi3ForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert back.dtype == torch.bfloat16
    x = torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, hf(x).logits, atol=1e-5)
    # re-saving unsharded removes the stale shards and index
    ours.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]


def test_heads_load_backbone_from_causal_checkpoint(tmp_path):
    lm = Phi3ForCausalLM(config("mini-4k"))
    lm.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="initialised new head weights"):
        cls = Phi3ForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    tok = Phi3ForTokenClassification.from_pretrained(tmp_path, num_labels=4)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(cls.model.state_dict()[k], v)
        assert torch.equal(tok.model.state_dict()[k], v)
    assert cls.score.weight.shape == (5, 64) and cls.score.weight.abs().sum() > 0
    assert tok.score.bias.shape == (4,)


def test_loaded_dtype_and_meta_init(tmp_path):
    lm = Phi3ForCausalLM(config("mini-128k"))
    lm.save_pretrained(tmp_path, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["Phi3ForCausalLM"]
    back = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in back.parameters())
    # rope buffers rebuilt after meta init
    rope = back.model.rotary_emb
    assert torch.equal(rope.short_inv_freq, lm.model.rotary_emb.short_inv_freq)
    assert torch.equal(rope.long_inv_freq, lm.model.rotary_emb.long_inv_freq)


def test_missing_config_and_malformed_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Phi3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Phi3Config.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    Phi3ForCausalLM(config("mini-4k")).save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Phi3ForCausalLM.from_pretrained(tmp_path)


def test_no_weights_and_pickle_refused(tmp_path):
    config("mini-4k").save(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not loaded"):
        Phi3ForCausalLM.from_pretrained(tmp_path)


def _crafted_headers(file):
    """Bytes of ``file`` (a safetensors file) with a corrupt header: each the way a hostile or broken file is."""
    import struct

    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")

    def with_header(h):
        text = json.dumps(h).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + raw[8 + n :]

    out_of_range = json.loads(json.dumps(header))
    out_of_range[first]["data_offsets"][1] += 10**9
    return {
        "huge header length": struct.pack("<Q", 2**62) + raw[8:],
        "header beyond the file": struct.pack("<Q", len(raw) + 8) + raw[8:],
        "truncated": raw[: len(raw) // 2],
        "offsets out of range": with_header(out_of_range),
    }


def test_crafted_safetensors_headers_are_one_line_errors_naming_the_file(tmp_path):
    """The safetensors reader refuses these (no read outside the file); its SafetensorError is not a ValueError,
    so it reached the user as a traceback from every command that loads a directory."""
    from tests.modules.helpers import run_main

    good = tmp_path / "good"
    Phi3ForCausalLM(config("mini-4k")).save_pretrained(good)
    for i, (what, data) in enumerate(_crafted_headers(good / "model.safetensors").items()):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        (bad / "config.json").write_bytes((good / "config.json").read_bytes())
        (bad / "model.safetensors").write_bytes(data)
        with pytest.raises(ValueError, match=rf"{bad / 'model.safetensors'} is not a readable safetensors file"):
            Phi3ForCausalLM.from_pretrained(bad)
        rc, _, err = run_main("generate", "--checkpoint", bad, "--tokenizer", "byte", "--prompt", "x")
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 1 and "Traceback" not in err and len(lines) == 1, (what, err[-2000:])
        assert "model.safetensors is not a readable safetensors file" in lines[0], what


def test_mismatched_shapes_are_named(tmp_path):
    Phi3ForCausalLM(config("mini-4k")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"weight has shape \(97, 64\) but the model expects \(120, 64\).*vocab_size"):
        Phi3ForCausalLM.from_pretrained(tmp_path, vocab_size=120)
    Phi3ForSequenceClassification(config("mini-4k", num_labels=3)).save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match="score.weight has shape \\(3, 64\\).*set num_labels"):
        Phi3ForSequenceClassification.from_pretrained(tmp_path / "cls", num_labels=4)
    ok = Phi3ForSequenceClassification.from_pretrained(tmp_path / "cls", num_labels=4, strict_head=False)
    assert ok.score.weight.shape == (4, 64)


def test_sequence_longer_than_model_and_bad_ids():
    m = Phi3ForCausalLM(config("mini-4k"))
    with pytest.raises(ValueError, match="sequence of 130 tokens exceeds max_position_embeddings=128"):
        m(torch.ones(1, 130, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 97 outside the vocabulary"):
        m(torch.tensor([[1, 97]]))


def test_saved_files_are_readable_by_others(tmp_path):
    import os
    import stat

    Phi3ForCausalLM(config("mini-4k")).save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o666 & ~umask


# ---------------------------------------------------------------------- no silent wrong numbers at load time
def _rewrite(path, name, fn):
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    state[name] = fn(state[name].clone())
    save_file(state, path, metadata={"format": "pt"})


def test_nan_or_inf_weights_are_named_with_their_file(tmp_path):
    Phi3ForCausalLM(config("mini-4k")).save_pretrained(tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(t):
        t[0, 0], t[3, 5] = float("nan"), float("inf")
        return t

    _rewrite(tmp_path / "model.safetensors", name, poison)
    with pytest.raises(
        ValueError,
        match=rf"model.safetensors: tensor {name} holds 2 NaN/inf value\(s\) of 6144; "
        "the checkpoint is corrupt .*earlier checkpoint",
    ):
        Phi3ForCausalLM.from_pretrained(tmp_path)


def test_weight_that_overflows_the_requested_dtype_is_named(tmp_path):
    Phi3ForCausalLM(config("mini-4k")).save_pretrained(tmp_path)
    _rewrite(tmp_path / "model.safetensors", "model.norm.weight", lambda t: t.fill_(1e6))
    assert Phi3ForCausalLM.from_pretrained(tmp_path).model.norm.weight[0] == 1e6  # fine in float32
    with pytest.raises(
        ValueError,
        match=r"tensor model.norm.weight \(torch.float32\) overflows to inf in "
        r"torch.float16; load it with dtype='float32' or 'bfloat16'",
    ):
        Phi3ForCausalLM.from_pretrained(tmp_path, dtype="float16")


def test_save_in_a_dtype_that_overflows_is_refused_and_writes_nothing(tmp_path):
    """float16 holds at most 65504: a larger weight would be written as inf (transformers loads it: inf logits)."""
    model = Phi3ForCausalLM(config("mini-4k"))
    with torch.no_grad():
        model.model.norm.weight[0] = 1e5
    with pytest.raises(
        ValueError,
        match=r"tensor model.norm.weight \(torch.float32\) overflows to inf in torch.float16; "
        r"save it with dtype='bfloat16' or 'float32'",
    ):
        model.save_pretrained(tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # no staging leftovers either
    model.save_pretrained(tmp_path / "out", dtype="bfloat16")  # in range there
    assert Phi3ForCausalLM.from_pretrained(tmp_path / "out").model.norm.weight[0] == 99840.0  # 1e5 in bf16


def test_save_of_nan_weights_is_refused(tmp_path):
    model = Phi3ForCausalLM(config("mini-4k"))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, :3] = float("nan")
    with pytest.raises(
        ValueError, match=r"tensor model.layers.1.mlp.down_proj.weight holds 3 NaN/inf value\(s\) of 6144; not saved"
    ):
        model.save_pretrained(tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_file_instead_of_directory_is_refused(tmp_path):
    Phi3ForCausalLM(config("mini-4k")).save_pretrained(tmp_path)
    for f in ("model.safetensors", "config.json"):
        with pytest.raises(ValueError, match=rf"{f} is a file; .*pass the directory that holds config.json"):
            Phi3ForCausalLM.from_pretrained(tmp_path / f)


def _untied_hf_dir_marked_tied(tmp_path):
    """What the issue reproduced: a transformers checkpoint with its own lm_head whose config.json says tied."""
    torch.manual_seed(0)
    hc = transformers.Phi3Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    transformers.Phi3ForCausalLM(hc).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file

    return load_file(tmp_path / "model.safetensors")


def test_tied_config_with_a_different_stored_head_does_what_transformers_does(tmp_path):
    stored = _untied_hf_dir_marked_tied(tmp_path)
    assert not torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with pytest.warns(
        UserWarning,
        match=r"tie_word_embeddings=true but the checkpoint stores its own lm_head.weight, "
        r"different from model.embed_tokens.weight; .*NOT tied",
    ):
        ours = Phi3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    # transformers 5.24 keeps the stored head (it does not tie); so do we, and the logits agree
    assert torch.equal(hf.lm_head.weight, stored["lm_head.weight"])
    assert torch.equal(ours.lm_head.weight, stored["lm_head.weight"])
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight and not ours.config.tie_word_embeddings
    x = torch.randint(3, 97, (2, 11))
    with torch.no_grad():
        a, b = ours(x).logits, hf(x).logits
    assert (a - b).abs().max() < 1e-4 * b.abs().max()
    # saved again it says what it is, and loads back without a warning
    ours.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["tie_word_embeddings"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Phi3ForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, a)


def test_tied_config_with_an_equal_stored_head_ties(tmp_path, recwarn):
    m = Phi3ForCausalLM(config("phi-4-mini"))
    m.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # a writer that stores both copies
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    back = Phi3ForCausalLM.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight and back.config.tie_word_embeddings
    assert not [w for w in recwarn if "tie_word_embeddings" in str(w.message)]


def test_attention_pooling_is_read_from_the_checkpoint_not_silently_replaced(tmp_path):
    """A sequence classifier saved with pooling="attention" (it holds pool_query.weight) loads with that pooling by
    default (same logits); asking for pooling="last" over it is an error, not last-token logits with a warning."""
    torch.manual_seed(0)
    cfg = config("mini-4k", num_labels=3)
    model = Phi3ForSequenceClassification(cfg, pooling="attention").eval()
    model.save_pretrained(tmp_path)
    x = torch.randint(3, 97, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing ignored, nothing re-initialised
        again = Phi3ForSequenceClassification.from_pretrained(tmp_path).eval()
    assert again.pooling == "attention"
    assert torch.equal(again(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="pool_query.weight.*pooling='attention'"):
        Phi3ForSequenceClassification.from_pretrained(tmp_path, pooling="last")
    # a checkpoint without a pooling query (a causal LM, a last-token classifier) still takes either pooling
    Phi3ForCausalLM(config("mini-4k")).save_pretrained(tmp_path / "lm")
    with pytest.warns(UserWarning, match="initialised new head weights"):
        fresh = Phi3ForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3, pooling="attention")
    assert fresh.pooling == "attention"
    with pytest.warns(UserWarning, match="initialised new head weights"):
        assert Phi3ForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3).pooling == "last"


@pytest.mark.parametrize("cls", [Phi3ForCausalLM, Phi3ForSequenceClassification])
def test_backbone_only_checkpoint_without_model_prefix_loads_as_transformers_does(tmp_path, cls):
    """transformers' Phi3Model.save_pretrained writes the backbone without the ``model.`` prefix; transformers loads
    such a directory into Phi3ForCausalLM (fresh head), so do we, with the same hidden states."""
    cfg = config("medium-4k")
    d = cfg.to_dict()
    d.pop("architectures")
    torch.manual_seed(0)
    base = transformers.Phi3Model(transformers.Phi3Config(**d)).eval()
    base.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "embed_tokens.weight" in f.keys()  # the layout under test
    with pytest.warns(UserWarning, match="initialised new head weights"):
        ours = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = torch.randint(3, 97, (2, 13))
    with torch.no_grad():
        a, b = ours.model(x), base(x).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5) and b.abs().max() > 0.1


def test_renamed_backbone_keys_are_named_with_what_the_checkpoint_holds(tmp_path):
    """A checkpoint with unfused q/k/v projections (another converter's layout): the error names both the missing
    fused tensor and the unexpected ones, so the cause is visible."""
    from safetensors.torch import load_file, save_file

    Phi3ForCausalLM(config("medium-4k")).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for k in [k for k in state if "qkv_proj" in k]:
        q, kk, v = state.pop(k).split([64, 32, 32])
        for name, t in (("q_proj", q), ("k_proj", kk), ("v_proj", v)):
            state[k.replace("qkv_proj", name)] = t.contiguous()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 2 backbone tensor\(s\).*qkv_proj.*holds instead.*k_proj"):
        Phi3ForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("stored_dtype", [torch.int8, torch.uint8, torch.float8_e4m3fn])
def test_quantized_tensor_is_refused_not_cast(tmp_path, stored_dtype):
    """An int8 / uint8 / float8 weight (bitsandbytes, fp8 checkpoints) cast to float would be the quantized codes
    without their scales: silently wrong logits. It is refused, naming the tensor and its dtype."""
    from safetensors.torch import load_file, save_file

    Phi3ForCausalLM(config("mini-4k")).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    w = state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.1.mlp.down_proj.weight"] = (w * 100).clamp(-100, 100).to(stored_dtype)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    dtype_name = str(stored_dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"model.layers.1.mlp.down_proj.weight is stored as {dtype_name}.*quantized"):
        Phi3ForCausalLM.from_pretrained(tmp_path)


def test_quantization_config_is_refused(tmp_path):
    Phi3ForCausalLM(config("mini-4k")).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quantization_config.*'fp8'.*not supported.*unquantized"):
        Phi3ForCausalLM.from_pretrained(tmp_path)
