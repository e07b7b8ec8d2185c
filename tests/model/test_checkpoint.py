"""Checkpoint I/O: export round trip through transformers, sharding, and clear errors on bad input."""

import json

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
