"""PEFT-format LoRA adapters: ours load in peft over transformers' Phi-3 and peft's load here, with the same logits
(unmerged and merged); the files match what peft itself saves; seq-cls ``score`` (modules_to_save) round-trips;
rsLoRA and per-module ranks/alphas are honoured; what does not fit or is not implemented is refused by name; the
package never imports peft."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from phi3_lightning.model import Phi3ForCausalLM, Phi3ForSequenceClassification, get_preset
from phi3_lightning.model.lora import LoRAConfig, apply_lora, lora_state_dict, merge_lora
from phi3_lightning.model.peft_format import load_adapter, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def _randomise_b(model: torch.nn.Module, seed: int = 0) -> None:
    """A trained adapter: B nonzero (at init B = 0 and the adapter would do nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("peft") / "base"
    Phi3ForCausalLM.from_config("tiny").save_pretrained(d)
    return d


def _hf(base, cls="Phi3ForCausalLM", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls).from_pretrained(base, attn_implementation="eager", **kw)


def test_package_does_not_import_peft():
    code = (
        "import sys, phi3_lightning, phi3_lightning.model.peft_format, phi3_lightning.modules, phi3_lightning.cli; "
        "from phi3_lightning.commands import export; print('peft' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(r=4, alpha=8, target_modules=TARGETS),
        LoRAConfig(
            r=4,
            alpha=8,
            use_rslora=True,
            rank_pattern={"qkv_proj": 2},
            alpha_pattern={"layers.1.mlp.down_proj": 3},
            layers=[1],
        ),
        LoRAConfig(r=2, alpha=4, target_modules=["qkv_proj", "lm_head"], layers=[0]),  # lm_head: outside the layers
    ],
    ids=["plain", "rslora-patterns-layers", "lm_head-with-layers"],
)
def test_our_adapter_serves_in_peft_with_the_same_logits(base, tmp_path, cfg):
    ours = Phi3ForCausalLM.from_pretrained(base)
    apply_lora(ours, cfg)
    _randomise_b(ours)
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(base))
    ids = _ids()
    want = _logits(ours, ids)
    served = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "ad").eval()
    torch.testing.assert_close(_logits(served, ids), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(served.merge_and_unload(), ids), want, rtol=1e-4, atol=1e-5)
    # and back here: same config, same model
    again = Phi3ForCausalLM.from_pretrained(base)
    loaded = load_adapter(again, tmp_path / "ad")
    if "lm_head" in cfg.target_modules:  # written as explicit module names (PEFT's layers would skip lm_head)
        assert loaded.layers is None and "lm_head" in loaded.target_modules and hasattr(again.lm_head, "lora_A")
    else:
        assert loaded == cfg
    torch.testing.assert_close(_logits(again, ids), want)
    torch.testing.assert_close(_logits(merge_lora(again), ids), want, rtol=1e-4, atol=1e-5)


def test_files_match_what_peft_saves(base, tmp_path):
    """Same key names, shapes and config values as peft 0.21's own save_pretrained of the same adapter."""
    theirs = peft.get_peft_model(
        _hf(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    theirs.save_pretrained(tmp_path / "theirs")
    ours = apply_lora(Phi3ForCausalLM.from_pretrained(base), LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    save_adapter(ours, tmp_path / "ours")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("theirs", "ours"))
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in b
    ca, cb = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("theirs", "ours"))
    for key in ("peft_type", "task_type", "r", "lora_alpha", "bias", "fan_in_fan_out", "use_rslora", "use_dora"):
        assert ca[key] == cb[key], key
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])


def test_peft_adapter_loads_here_with_the_same_logits(base, tmp_path):
    """Created by peft (B random: init_lora_weights=False), with rsLoRA, a rank and an alpha pattern and
    layers_to_transform: same logits here, unmerged and merged."""
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["qkv_proj", "gate_up_proj", "down_proj"],
        layers_to_transform=[1],
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"gate_up_proj": 5},
        init_lora_weights=False,
    )
    theirs = peft.get_peft_model(_hf(base), config).eval()
    theirs.save_pretrained(tmp_path / "ad")
    ids = _ids()
    want = _logits(theirs, ids)
    ours = Phi3ForCausalLM.from_pretrained(base)
    cfg = load_adapter(ours, tmp_path / "ad")
    assert cfg.use_rslora and cfg.layers == [1] and cfg.rank_pattern == {"down_proj": 2}
    down = ours.model.layers[1].mlp.down_proj
    assert down.r == 2 and down.scaling == pytest.approx(8 / 2**0.5)
    assert ours.model.layers[1].mlp.gate_up_proj.scaling == pytest.approx(5 / 2)
    assert not hasattr(ours.model.layers[0].mlp.down_proj, "lora_A")  # layer 0 not adapted
    torch.testing.assert_close(_logits(ours, ids), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(merge_lora(ours), ids), want, rtol=1e-4, atol=1e-5)


def test_seq_cls_adapter_with_trained_score_round_trips(base, tmp_path):
    with pytest.warns(UserWarning, match="initialised new head weights"):
        ours = Phi3ForSequenceClassification.from_pretrained(base, num_labels=3)
    apply_lora(ours, LoRAConfig(r=4, alpha=8))  # train_head: score trained in full
    _randomise_b(ours)
    with torch.no_grad():
        ours.score.weight.normal_()  # "trained"
    save_adapter(ours, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"] and cfg["task_type"] == "SEQ_CLS"
    assert "base_model.model.score.weight" in load_file(tmp_path / "ad" / "adapter_model.safetensors")
    ids = _ids()
    want = _logits(ours, ids)
    hf = _hf(base, "Phi3ForSequenceClassification", num_labels=3)
    hf.config.pad_token_id = ours.config.pad_token_id
    served = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    torch.testing.assert_close(_logits(served, ids), want, rtol=1e-4, atol=1e-5)
    # back here into a fresh classifier (its score random): the trained score comes with the adapter
    with pytest.warns(UserWarning, match="initialised new head weights"):
        again = Phi3ForSequenceClassification.from_pretrained(base, num_labels=3)
    load_adapter(again, tmp_path / "ad")
    torch.testing.assert_close(_logits(again, ids), want)
    assert again.score.weight.requires_grad and not again.model.embed_tokens.weight.requires_grad


def test_old_adapter_format_still_loads(base, tmp_path):
    ours = apply_lora(Phi3ForCausalLM.from_pretrained(base), LoRAConfig(r=2, alpha=4))
    _randomise_b(ours)
    (tmp_path / "old").mkdir()
    save_file(lora_state_dict(ours), str(tmp_path / "old" / "adapter_model.safetensors"))
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps({"lora": {"r": 2, "alpha": 4}, "task": "lm"}))
    again = Phi3ForCausalLM.from_pretrained(base)
    load_adapter(again, tmp_path / "old")
    torch.testing.assert_close(_logits(again, _ids()), _logits(ours, _ids()))


# ------------------------------------------------------------------------------------------------------ refusals
@pytest.fixture()
def peft_dir(base, tmp_path):
    ours = apply_lora(Phi3ForCausalLM.from_pretrained(base), LoRAConfig(r=4, alpha=8))
    save_adapter(ours, tmp_path / "ad")
    return tmp_path / "ad"


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"use_dora": True}, "use_dora=True"),
        ({"bias": "all"}, "bias='all'"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"target_modules": ["q_proj", "qkv_proj"]}, r"\['q_proj'\] match no module"),
        ({"target_modules": ["mlp"]}, r"model\.layers\.0\.mlp \(Phi3MLP\), which is not a linear layer"),
        ({"r": 8}, r"qkv_proj\.lora_A\.weight has shape \(4, 128\) .* with r=8 expects \(8, 128\)"),
        ({"rank_pattern": {"o_proj": 2}}, r"o_proj\.lora_A\.weight has shape \(4, 128\) .* expects \(2, 128\)"),
    ],
)
def test_refuses_what_does_not_fit_or_is_not_implemented(base, peft_dir, changes, message):
    _edit_config(peft_dir, **changes)
    head = Phi3ForCausalLM.from_pretrained(base)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_adapter(head, peft_dir)
    assert head.state_dict().keys() == before.keys()  # a refused adapter leaves the model as it was


def test_refuses_an_adapter_of_a_model_with_other_dimensions(peft_dir):
    other = Phi3ForCausalLM.from_config(dataclasses.replace(get_preset("tiny"), hidden_size=64))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.qkv_proj\.lora_A\.weight has shape \(4, 128\)"):
        load_adapter(other, peft_dir)


def test_refuses_foreign_tensors(base, peft_dir):
    state = load_file(peft_dir / "adapter_model.safetensors")
    state["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 512)
    save_file(state, str(peft_dir / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lora_embedding_A"):
        load_adapter(Phi3ForCausalLM.from_pretrained(base), peft_dir)


def test_refuses_a_corrupt_adapter_file_naming_it(base, peft_dir):
    """A truncated (or crafted) adapter_model.safetensors: a ValueError naming the file, not the reader's own
    SafetensorError (no ValueError, so a traceback from the CLI); NaN alpha from the JSON is refused too."""
    weights = peft_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file"):
        load_adapter(Phi3ForCausalLM.from_pretrained(base), peft_dir)
    (peft_dir / "adapter_config.json").write_text(
        (peft_dir / "adapter_config.json").read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')
    )
    with pytest.raises(ValueError, match="alpha=nan must be a finite positive number"):
        load_adapter(Phi3ForCausalLM.from_pretrained(base), peft_dir)


# ------------------------------------------------------------------- tied embeddings (phi-4-mini) and modules_to_save
@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("peft_tied") / "base"
    Phi3ForCausalLM.from_config(dataclasses.replace(get_preset("tiny"), tie_word_embeddings=True)).save_pretrained(d)
    return d


def _perturb_trainable(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_tied_lm_head_trained_in_full_serves_in_peft_with_the_same_logits(tied_base, tmp_path):
    """Training a tied lm_head here trains the embedding too (one tensor); peft keeps an untied copy of each module
    in modules_to_save, so the adapter must carry the embedding as well or peft serves the base embedding."""
    ours = Phi3ForCausalLM.from_pretrained(tied_base)
    apply_lora(ours, LoRAConfig(r=2, alpha=4, target_modules=["qkv_proj"], modules_to_save=["lm_head"]))
    _perturb_trainable(ours)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still one tensor after training
    save_adapter(ours, tmp_path / "ad")
    written = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["modules_to_save"]
    assert sorted(written) == ["lm_head", "model.embed_tokens"]
    ids = _ids()
    want = _logits(ours, ids)
    served = peft.PeftModel.from_pretrained(_hf(tied_base), tmp_path / "ad").eval()
    torch.testing.assert_close(_logits(served, ids), want, rtol=1e-4, atol=1e-5)
    again = Phi3ForCausalLM.from_pretrained(tied_base)
    load_adapter(again, tmp_path / "ad")
    assert again.lm_head.weight is again.model.embed_tokens.weight and again.config.tie_word_embeddings
    torch.testing.assert_close(_logits(again, ids), want)


def test_peft_adapter_training_one_side_of_a_tied_pair_loads_untied(tied_base, tmp_path):
    """peft trains an untied copy of lm_head (the base embedding stays): loading it here must not write the new
    lm_head into the shared tensor (that would change the embedding too)."""
    theirs = peft.get_peft_model(
        _hf(tied_base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv_proj"], modules_to_save=["lm_head"])
    )
    _perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ids = _ids()
    want = _logits(theirs, ids)
    ours = Phi3ForCausalLM.from_pretrained(tied_base)
    base_embedding = ours.model.embed_tokens.weight.detach().clone()
    with pytest.warns(
        UserWarning,
        match=r"trains lm_head.weight on its own.*unties lm_head.weight from model.embed_tokens.weight.*as peft does",
    ):
        load_adapter(ours, tmp_path / "theirs")
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight and not ours.config.tie_word_embeddings
    assert torch.equal(ours.model.embed_tokens.weight, base_embedding)
    assert ours.lm_head.weight.requires_grad and not ours.model.embed_tokens.weight.requires_grad  # peft's split
    torch.testing.assert_close(_logits(ours, ids), want, rtol=1e-4, atol=1e-5)
    config_only = Phi3ForCausalLM.from_pretrained(tied_base)  # a resumed run: the checkpoint supplies the weights
    with pytest.warns(UserWarning, match=r"unties lm_head.weight"):
        load_adapter(config_only, tmp_path / "theirs", weights=False)
    assert config_only.lm_head.weight is not config_only.model.embed_tokens.weight


def test_old_format_adapter_of_a_tied_lm_head_trained_here_loads_tied(tied_base, tmp_path):
    """This package's earlier adapter format is never peft's: a tied lm_head trained in full here trained the
    embedding too (one tensor), and the file holds lm_head only. Loading it must keep the pair tied (the trained
    model), not untie it as for a peft adapter (that would serve the base embedding: other logits)."""
    ours = Phi3ForCausalLM.from_pretrained(tied_base)
    apply_lora(ours, LoRAConfig(r=2, alpha=4, target_modules=["qkv_proj"], modules_to_save=["lm_head"]))
    _perturb_trainable(ours)
    (tmp_path / "old").mkdir()
    save_file(lora_state_dict(ours), str(tmp_path / "old" / "adapter_model.safetensors"))
    lora = {"r": 2, "alpha": 4, "target_modules": ["qkv_proj"], "modules_to_save": ["lm_head"]}
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps({"lora": lora, "task": "lm"}))
    again = Phi3ForCausalLM.from_pretrained(tied_base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no untie warning
        load_adapter(again, tmp_path / "old")
    assert again.lm_head.weight is again.model.embed_tokens.weight and again.config.tie_word_embeddings
    torch.testing.assert_close(_logits(again, _ids()), _logits(ours, _ids()))
