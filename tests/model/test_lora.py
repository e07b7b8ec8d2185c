"""LoRA: identity at init, only adapters train, merge/export equals the adapted model, every head, bad input."""

import pytest
import torch

from phi3_lightning.model import (
    Phi3Config,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    Phi3ForTokenClassification,
)
from phi3_lightning.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_num_parameters,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
)

CFG = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    max_position_embeddings=64,
    original_max_position_embeddings=64,
    sliding_window=None,
)


def config(**over):
    return Phi3Config.from_dict(dict(CFG, **over))


def batch(b=2, t=12, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, t), generator=g)


def train_steps(model, ids, steps=2, lr=1e-2, **fwd):
    """AdamW over *all* parameters (frozen ones must be skipped because they never get a gradient)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for _ in range(steps):
        out = model(ids, **fwd)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def frozen_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_initial_lora_model_equals_base_and_param_count():
    model = Phi3ForCausalLM(config()).eval()
    ids = batch()
    ref = model(ids).logits
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    assert torch.equal(model(ids).logits, ref)  # B = 0: bit-identical, not merely close
    adapted = lora_modules(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in adapted}) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(adapted) == 4 * 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert model.num_parameters(trainable_only=True) == lora_num_parameters(model.config, model.lora_config)
    # qkv (in 64, out (4 + 2*2) * 16 = 128), o (64, 64), gate_up (64, 192), down (96, 64): r * (in + out) each
    assert lora_num_parameters(model.config, LoRAConfig(r=4)) == 2 * 4 * (
        (64 + 128) + (64 + 64) + (64 + 192) + (96 + 64)
    )


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(r=4, rank_pattern={"qkv_proj": 8, r"layers\.1\.mlp\.down_proj": 2}),
        LoRAConfig(r=4, target_modules=["layers.0.mlp.down_proj", "o_proj"]),  # a dotted suffix: one module
        LoRAConfig(r=3, target_modules=["qkv_proj", "lm_head"], layers=[1], rank_pattern={"lm_head": 2}),
    ],
    ids=["rank_pattern", "dotted_suffix", "layers_and_lm_head"],
)
def test_analytic_lora_count_follows_patterns_suffixes_and_layers(cfg):
    model = apply_lora(Phi3ForCausalLM(config()), cfg)
    assert model.num_parameters(trainable_only=True) == lora_num_parameters(model.config, cfg)


def test_only_adapters_train():
    model = Phi3ForCausalLM(config())
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    frozen = frozen_snapshot(model)
    a_before = {n: m.lora_A.detach().clone() for n, m in lora_modules(model).items()}
    ids = batch()
    train_steps(model, ids, labels=ids)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
            assert p.grad is None
    for n, m in lora_modules(model).items():
        assert not torch.equal(m.lora_A, a_before[n]), f"{n}.lora_A did not train"
        assert m.lora_B.abs().max() > 0, f"{n}.lora_B is still zero"


@pytest.fixture(scope="module")
def trained_lora_lm():
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config(tie_word_embeddings=False))
    apply_lora(model, LoRAConfig(r=4, alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    ids = batch()
    train_steps(model, ids, labels=ids)
    return model


def test_merged_export_matches_and_transformers_loads_it(trained_lora_lm, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = trained_lora_lm
    ids = batch(seed=5)
    with torch.no_grad():
        adapted = model(ids).logits
    plain_keys = set(Phi3ForCausalLM(model.config).state_dict())
    merge_lora(model)
    assert not lora_modules(model) and set(model.state_dict()) == plain_keys
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "Linear"
    with torch.no_grad():
        merged = model(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path)
    hf, info = transformers.Phi3ForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        theirs = hf.eval()(ids).logits
    torch.testing.assert_close(theirs, adapted, rtol=1e-4, atol=1e-5)
    # ... and our own loader too
    again = Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["sequence_classification", "token_classification", "attention_pooling"])
def test_every_head_trains_adapters_and_head(head):
    cfg = config(num_labels=3)
    if head == "sequence_classification":
        model, labels = Phi3ForSequenceClassification(cfg), torch.tensor([0, 2])
        trained_head = ["score.weight"]
    elif head == "attention_pooling":
        model, labels = Phi3ForSequenceClassification(cfg, pooling="attention"), torch.tensor([1, 2])
        trained_head = ["score.weight", "pool_query.weight"]
    else:
        model, labels = Phi3ForTokenClassification(cfg), torch.randint(0, 3, (2, 12))
        trained_head = ["score.weight", "score.bias"]
    model.eval()
    ids = batch()
    ref = model(ids).logits
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    assert torch.equal(model(ids).logits, ref)
    assert sorted(model.lora_modules_to_save) == sorted({n.rsplit(".", 1)[0] for n in trained_head})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(trained_head) <= trainable
    assert all(n in trained_head or n.endswith(("lora_A", "lora_B")) for n in trainable)
    head_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trained_head}
    frozen = frozen_snapshot(model)
    train_steps(model, ids, labels=labels)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        if n in head_before:
            assert not torch.equal(p, head_before[n]), f"{n} did not train"
    assert all(m.lora_B.abs().max() > 0 for m in lora_modules(model).values())
    # Adapter checkpoint: adapters + the trained head, nothing else; it restores the exact model.
    sd = lora_state_dict(model)
    assert set(trained_head) <= set(sd) and all(k in trained_head or k.endswith(("lora_A", "lora_B")) for k in sd)
    with torch.no_grad():
        want = model(ids).logits
    torch.manual_seed(123)
    fresh = type(model)(cfg, **({"pooling": "attention"} if head == "attention_pooling" else {}))
    apply_lora(fresh, LoRAConfig(r=2, alpha=4))
    base = {k: v for k, v in model.state_dict().items() if k not in sd}
    assert set(fresh.load_state_dict(base, strict=False).missing_keys) == set(sd)  # same base; adapters to come
    load_lora_state_dict(fresh, sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, want)


def test_train_head_false_and_modules_to_save():
    model = Phi3ForSequenceClassification(config(num_labels=3))
    apply_lora(
        model, LoRAConfig(r=2, train_head=False, modules_to_save=["norm", "lm_head"])
    )  # lm_head: absent, skipped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" not in trainable and "model.norm.weight" in trainable
    assert "model.layers.0.input_layernorm.weight" not in trainable  # "norm" matches the final norm only
    assert model.lora_modules_to_save == ["model.norm"]
    with pytest.raises(ValueError, match="modules_to_save entry 'scroe'"):
        apply_lora(Phi3ForSequenceClassification(config()), LoRAConfig(modules_to_save=["scroe"]))
    lm = Phi3ForCausalLM(config())
    assert mark_only_lora_trainable(lm, ["lm_head"]) == ["lm_head"]
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == {"lm_head.weight"}


def test_layer_selection():
    model = Phi3ForCausalLM(config(num_hidden_layers=3))
    apply_lora(model, LoRAConfig(r=2, layers=[2], target_modules=["qkv_proj", "down_proj"]))
    assert sorted(lora_modules(model)) == ["model.layers.2.mlp.down_proj", "model.layers.2.self_attn.qkv_proj"]
    assert model.num_parameters(trainable_only=True) == lora_num_parameters(model.config, model.lora_config)
    with pytest.raises(ValueError, match=r"out of range.*0\.\.2"):
        apply_lora(Phi3ForCausalLM(config(num_hidden_layers=3)), LoRAConfig(layers=[3]))


def test_lora_on_lm_head_works_with_fused_loss():
    model = Phi3ForCausalLM(config())
    apply_lora(model, LoRAConfig(r=2, target_modules=["lm_head", "o_proj"]))
    ids = batch()
    with torch.no_grad():
        model.lm_head.lora_B.normal_()  # non-zero adapter so .weight differs from the base weight
    full = model(ids, labels=ids).loss
    fused = model(ids, labels=ids, return_logits=False).loss  # reads lm_head.weight: must include the adapter
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-6)
    fused.backward()
    assert model.lm_head.lora_A.grad is not None and model.lm_head.lora_A.grad.abs().max() > 0


def test_lm_head_adapter_dropout_applies_in_the_fused_training_loss():
    """Training reads the loss through the fused linear + cross-entropy (``return_logits=False``); an adapted
    lm_head's dropout must act there as in its forward (it used to fold ``W + B A s`` and drop nothing)."""
    model = Phi3ForCausalLM(config())
    apply_lora(model, LoRAConfig(r=2, dropout=0.5, target_modules=["lm_head"]))
    with torch.no_grad():
        model.lm_head.lora_B.normal_()
    ids = batch()
    model.train()
    losses, grads = [], []
    for fused in (False, True):
        torch.manual_seed(7)  # the same dropout mask for both paths
        loss = model(ids, labels=ids, return_logits=not fused).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([model.lm_head.lora_A.grad.clone(), model.lm_head.lora_B.grad.clone()])
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for g_fused, g_full in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fused, g_full, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        no_dropout = model.eval()(ids, labels=ids, return_logits=False).loss
    assert (losses[1] - no_dropout).abs() > 1e-3  # the dropout did act


def test_save_pretrained_of_an_unmerged_adapted_model_is_refused(tmp_path):
    """An adapted head's state dict holds ``qkv_proj.base.weight`` / ``lora_A``: written as a Hugging Face checkpoint,
    transformers loaded it with every adapted projection missing (randomly initialised, only a loading report). It
    is refused naming the fix, and nothing is written."""
    model = apply_lora(Phi3ForCausalLM(config()), LoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"LoRA adapters.*merge_lora.*save_adapter"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_lora(model).save_pretrained(tmp_path / "out")  # the documented way
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_module_both_adapted_and_trained_in_full_is_refused():
    """target_modules and modules_to_save (or train_head's score) naming the same module trained its base weight and
    an adapter on it; the adapter export of that could be loaded neither here nor by peft (KeyError)."""
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj.*modules_to_save.*not both"):
        apply_lora(Phi3ForCausalLM(config()), LoRAConfig(target_modules=["o_proj"], modules_to_save=["o_proj"]))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*inside.*model\.layers\.1"):
        apply_lora(Phi3ForCausalLM(config()), LoRAConfig(target_modules=["down_proj"], modules_to_save=["layers.1"]))
    cls = Phi3ForSequenceClassification(config(num_labels=3))
    with pytest.raises(ValueError, match=r"score is trained in full by train_head.*train_head: false"):
        apply_lora(cls, LoRAConfig(target_modules=["qkv_proj", "score"]))
    assert not lora_modules(cls)  # refused before anything was wrapped
    apply_lora(cls, LoRAConfig(target_modules=["qkv_proj", "score"], train_head=False))  # an adapter on score: fine


def test_bad_targets_name_them_and_list_linears():
    model = Phi3ForCausalLM(config())
    with pytest.raises(ValueError) as e:
        apply_lora(model, LoRAConfig(target_modules=["q_proj", "v_proj", "o_proj"]))
    msg = str(e.value)
    assert "'q_proj'" in msg and "'v_proj'" in msg and "'o_proj'" not in msg.split("available")[0]
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
        assert name in msg
    assert not lora_modules(model)  # nothing half-applied


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "rank r=0"),
        (dict(r=-4), "rank r=-4"),
        (dict(r=2.5), "rank r=2.5"),
        (dict(r=True), "rank"),
        (dict(alpha=0), "alpha=0"),
        (dict(alpha=float("nan")), "alpha=nan"),  # NaN / inf scale: NaN outputs (a PEFT JSON may hold NaN)
        (dict(alpha=float("inf")), "alpha=inf"),
        (dict(alpha_pattern={"qkv_proj": float("nan")}), r"alpha_pattern\['qkv_proj'\]=nan"),
        (dict(dropout=float("nan")), "dropout=nan"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(target_modules=[]), "target_modules"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_tied_head_and_double_apply_rejected():
    tied = Phi3ForCausalLM(config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tied to model.embed_tokens.weight"):
        apply_lora(tied, LoRAConfig(target_modules=["lm_head"]))
    model = apply_lora(Phi3ForCausalLM(config()), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(model, {})


def test_reset_parameters_after_meta_init_restores_lora_init():
    """Lightning's FSDP2 path: build on meta, then per module with meta tensors: to_empty + reset_parameters()."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(config(), device=torch.device("meta"))
    apply_lora(model, LoRAConfig(r=4))
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, LoRALinear) and layer.lora_A.is_meta
    for m in model.modules():
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if any(t.is_meta for t in own):
            m.to_empty(device="cpu", recurse=False)
            m.reset_parameters()
    for m in lora_modules(model).values():
        assert torch.count_nonzero(m.lora_B) == 0
        assert m.lora_A.std() > 0 and torch.isfinite(m.lora_A).all()
        assert 0.005 < m.base.weight.std() < 0.05  # base keeps Phi-3's normal(0, 0.02)
    assert not m.base.weight.requires_grad and m.lora_A.requires_grad


def test_forward_compiles_without_graph_breaks():
    layer = LoRALinear(torch.nn.Linear(16, 24, bias=True), r=4, alpha=8, dropout=0.1).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: a break is an error
    torch.testing.assert_close(compiled(x), layer(x))
    w = layer.base.weight + layer.lora_B @ layer.lora_A * 2.0
    torch.testing.assert_close(layer(x), x @ w.T + layer.base.bias)


def test_gradient_checkpointing_gives_same_adapter_grads():
    torch.manual_seed(0)
    model = apply_lora(Phi3ForCausalLM(config()), LoRAConfig(r=2))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.1)
    ids = batch()
    grads = []
    for ckpt in (False, True):
        model.model.gradient_checkpointing = ckpt
        model.train()
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n])
