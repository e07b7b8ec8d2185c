"""LoRA through the Lightning layer: a YAML ``model.init_args.lora`` fit through the CLI trains only the adapters and
resumes from ``last``; ``export`` merges the adapters into a plain Hugging Face checkpoint that transformers loads
with the trained model's logits (``--lora_only``: the adapters alone); a sequence classifier trains its new
``score`` in full next to the adapters; the meta-device (FSDP2) init keeps B = 0; two-process FSDP2 (gloo) saves,
resumes and exports; bad targets fail at build naming them; a CUDA OOM in fit carries the memory planner's advice."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from phi3_lightning.data import CausalLMDataModule, SequenceClassificationDataModule
from phi3_lightning.model import Phi3ForCausalLM, get_preset
from phi3_lightning.model.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules
from phi3_lightning.model.peft_format import load_adapter
from phi3_lightning.modules import (
    CausalLMModule,
    SequenceClassificationModule,
    export_adapter,
    export_checkpoint,
    load_head,
)
from phi3_lightning.modules.fsdp import materialize_meta
from phi3_lightning.modules.oom import MARKER, OOMAdvice

from .helpers import CONFIGS, ROOT, run_main, run_module, scalars, small_args

LORA_YAML = """\
model:
  init_args:
    lora: {r: 4, alpha: 8, target_modules: [qkv_proj, o_proj, gate_up_proj, down_proj], layers: null, train_head: true}
"""


def _ids(vocab: int = 256, b: int = 2, t: int = 24, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, t), generator=g)


def _plain_key(lightning_key: str) -> str:
    """head.model.layers.0.self_attn.qkv_proj.base.weight -> model.layers.0.self_attn.qkv_proj.weight"""
    return lightning_key.removeprefix("head.").replace(".base.", ".")


def _check_base_frozen(state: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor of a Lightning state dict is bit-identical to the initial checkpoint's; returns the
    adapters."""
    adapters = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
    base = {_plain_key(k): v for k, v in state.items() if k not in adapters}
    assert set(base) == set(init)
    for k, v in base.items():
        assert torch.equal(v, init[k]), f"frozen {k} changed"
    return adapters


# ---------------------------------------------------------------------------------------------------- CLI fit
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny random HF checkpoint, LoRA-fine-tuned for 3 steps through the CLI (YAML lora), then resumed with
    ``--ckpt_path last`` to step 5."""
    root = tmp_path_factory.mktemp("lora_cli")
    torch.manual_seed(0)
    Phi3ForCausalLM.from_config("tiny").save_pretrained(root / "init")
    (root / "lora.yaml").write_text(LORA_YAML)
    args = [
        *small_args("causal_lm", root / "logs", root / "cache", steps=3, val_every=3),
        "--config",
        root / "lora.yaml",
        "--model.init_args.model",
        root / "init",
    ]
    rc, _, err = run_main("fit", *args)
    assert rc == 0, err[-3000:]
    ckpts = root / "logs" / "causal_lm+lora" / "sdpa" / "version_0" / "checkpoints"
    shutil.copy(ckpts / "last.ckpt", root / "step3.ckpt")
    rc, _, err = run_main("fit", *args, "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert rc == 0, err[-3000:]
    return SimpleNamespace(
        root=root, init=root / "init", step3=root / "step3.ckpt", last=ckpts / "last.ckpt", run=ckpts.parent
    )


def test_cli_lora_fit_trains_only_adapters_and_resumes(lm_run):
    init = Phi3ForCausalLM.from_pretrained(lm_run.init).state_dict()
    first = torch.load(lm_run.step3, weights_only=True)
    final = torch.load(lm_run.last, weights_only=True)
    assert first["global_step"] == 3 and final["global_step"] == 5
    assert first["hyper_parameters"]["lora"]["r"] == 4 and first["phi3_lightning"]["lora"]["alpha"] == 8
    a3 = _check_base_frozen(first["state_dict"], init)
    a5 = _check_base_frozen(final["state_dict"], init)
    assert len(a3) == 2 * 4 * 2  # A and B of 4 projections in 2 layers
    for k in a3:
        if k.endswith("lora_B"):
            assert a3[k].abs().max() > 0, f"{k} is still zero"  # B starts at 0
        assert not torch.equal(a3[k], a5[k]), f"{k} did not train after the resume"
    # only the adapters are in the optimizer (all matrices: one weight-decay group), and in its state
    groups = final["optimizer_states"][0]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(a3)] and groups[0]["weight_decay"] == 0.1
    assert len(final["optimizer_states"][0]["state"]) == len(a3)
    # the resumed run logged its two steps (0-based 3 and 4) in the same version directory
    steps = [s for s, _ in scalars(lm_run.run)["train/loss_step"]]
    assert steps[-2:] == [3, 4]


def test_export_merges_lora_into_a_transformers_checkpoint(lm_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    rc, out, err = run_main("export", "--checkpoint", lm_run.last, "--output", tmp_path / "hf")
    assert rc == 0, err
    hf, info = transformers.Phi3ForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    trained = load_head(lm_run.last, merge_lora=False)
    assert trained.lora is not None and isinstance(trained.head.model.layers[0].mlp.down_proj, LoRALinear)
    ids = _ids()
    with torch.no_grad():
        ours = trained.head(ids).logits
        theirs = hf.eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    exported = json.loads((tmp_path / "hf" / "phi3_lightning.json").read_text())
    assert exported["merged_lora"]["r"] == 4 and exported["tokenizer"] == "byte"

    # --lora_only: the adapters alone, in PEFT's layout; they load back into the base checkpoint (here and with peft
    # over transformers) to give the same model, unmerged and merged
    rc, _, err = run_main("export", "--checkpoint", lm_run.last, "--output", tmp_path / "adapter", "--lora_only")
    assert rc == 0, err
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8
    assert meta["base_model_name_or_path"] == str(lm_run.init) and meta["task_type"] == "CAUSAL_LM"
    head = Phi3ForCausalLM.from_pretrained(lm_run.init)
    assert load_adapter(head, tmp_path / "adapter") == trained.lora
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(ids).logits, ours)
    peft = pytest.importorskip("peft")
    base = transformers.Phi3ForCausalLM.from_pretrained(lm_run.init, attn_implementation="eager")
    served = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, ours, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(served.merge_and_unload()(ids).logits, ours, rtol=1e-4, atol=1e-5)


def test_fit_continues_from_a_peft_adapter_and_export_merges_it(lm_run, tmp_path):
    """model.init_args.adapter (YAML): the run starts from the adapter's model (same logits), trains on, and
    ``export`` merges it into a plain checkpoint."""
    transformers = pytest.importorskip("transformers")
    rc, _, err = run_main("export", "--checkpoint", lm_run.last, "--output", tmp_path / "adapter", "--lora_only")
    assert rc == 0, err
    ids = _ids()
    start = CausalLMModule(model=str(lm_run.init), adapter=str(tmp_path / "adapter"))
    start.configure_model()
    with torch.no_grad():
        torch.testing.assert_close(start.head.eval()(ids).logits, load_head(lm_run.last).head(ids).logits)
    assert {n for n, p in start.head.named_parameters() if p.requires_grad} == {
        n for n, _ in start.head.named_parameters() if n.endswith(("lora_A", "lora_B"))
    }
    (tmp_path / "adapter.yaml").write_text(f"model:\n  init_args:\n    adapter: {tmp_path / 'adapter'}\n")
    args = [
        *small_args("causal_lm", tmp_path / "logs", lm_run.root / "cache", steps=2, val_every=2),
        "--config",
        tmp_path / "adapter.yaml",
        "--model.init_args.model",
        lm_run.init,
    ]
    rc, _, err = run_main("fit", *args)
    assert rc == 0, err[-3000:]
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    state = torch.load(last, weights_only=True)
    assert state["phi3_lightning"]["lora"]["r"] == 4 and state["hyper_parameters"]["adapter"] == str(
        tmp_path / "adapter"
    )
    before = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.qkv_proj.lora_B"
    assert not torch.equal(state["state_dict"][f"head.{key}"], before[f"base_model.model.{key}.weight"])  # trained on
    rc, _, err = run_main("export", "--checkpoint", last, "--output", tmp_path / "hf")
    assert rc == 0, err
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_head(last, merge_lora=False).head(ids).logits)


def test_export_writes_the_trained_dtype_and_rounds_the_merge_once(tmp_path):
    """``export``'s default dtype is the trained one ("as trained": a bf16-true run was written as float32, twice
    the size); each merged weight is W + B A s computed in fp32 and rounded once to the dtype written (a merge
    stored in bf16 and then widened would lose ~16 % of the adapters' update on this model)."""
    module = CausalLMModule(lora={"r": 4, "alpha": 8})
    module.configure_model()
    module.head.to(torch.bfloat16)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(module.head).values():
            m.lora_B.normal_(0, 1e-3)
    torch.save({"state_dict": module.state_dict(), "phi3_lightning": module.checkpoint_info()}, tmp_path / "x.ckpt")
    name = "model.layers.0.self_attn.qkv_proj"
    m = lora_modules(module.head)[name]
    w = m.base.weight.float()
    exact = w + (m.lora_B.float() @ m.lora_A.float()) * m.scaling
    merged = load_head(tmp_path / "x.ckpt", dtype="float32").head.get_submodule(name).weight
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, exact, rtol=1e-6, atol=1e-8)
    export_checkpoint(tmp_path / "x.ckpt", tmp_path / "hf", dtype="float32")
    stored = load_file(tmp_path / "hf" / "model.safetensors")[f"{name}.weight"]
    torch.testing.assert_close(stored, exact, rtol=1e-6, atol=1e-8)
    # the default keeps the trained dtype: the same sum, rounded once to bf16
    export_checkpoint(tmp_path / "x.ckpt", tmp_path / "hf16")
    stored = load_file(tmp_path / "hf16" / "model.safetensors")[f"{name}.weight"]
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, exact.to(torch.bfloat16))
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    export_adapter(tmp_path / "x.ckpt", tmp_path / "adapter")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    assert torch.equal(adapter[f"base_model.model.{name}.lora_B.weight"], m.lora_B)


def test_adapter_export_says_when_the_recorded_base_checkpoint_changed_or_is_gone(tmp_path):
    """``export --lora_only`` writes the run's base directory as ``base_model_name_or_path``, and the adapter only
    gives the trained model over the base weights the checkpoint holds: a base directory rewritten since the run
    (other weights), or moved away, is said, naming the tensor; the unchanged base exports without a word."""
    torch.manual_seed(0)
    Phi3ForCausalLM.from_config("tiny").save_pretrained(tmp_path / "base")
    module = CausalLMModule(model=str(tmp_path / "base"), lora={"r": 2})
    module.configure_model()
    torch.save({"state_dict": module.state_dict(), "phi3_lightning": module.checkpoint_info()}, tmp_path / "x.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_adapter(tmp_path / "x.ckpt", tmp_path / "a1")
    torch.manual_seed(1)
    Phi3ForCausalLM.from_config("tiny").save_pretrained(tmp_path / "base")  # another model in the same place
    with pytest.warns(UserWarning, match=r"differ from the frozen base weights.*first: \S+\.weight.*merged"):
        export_adapter(tmp_path / "x.ckpt", tmp_path / "a2")
    shutil.move(tmp_path / "base", tmp_path / "elsewhere")
    with pytest.warns(UserWarning, match=r"no longer exists"):
        export_adapter(tmp_path / "x.ckpt", tmp_path / "a3")


# ---------------------------------------------------------------------------------------------------- seq-cls
def test_lora_sequence_classifier_trains_score_in_full_and_exports(lm_run, tmp_path):
    """Backbone from a causal-LM checkpoint with adapters; the new score layer trains in full (train_head)."""
    transformers = pytest.importorskip("transformers")
    dm = SequenceClassificationDataModule(
        max_length=48, max_per_class=6, batch_size=8, add_eos=True, cache_dir=str(lm_run.root / "cache"), progress=False
    )
    model = SequenceClassificationModule(
        model=str(lm_run.init),
        pooling="last",
        lora=LoRAConfig(r=4, alpha=8),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        num_labels=len(dm.label_names),
        label_names=dm.label_names,
    )
    seen = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer = pl.Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[Snapshot()],
    )
    trainer.fit(model, dm)
    head = model.head
    trained = {n for n, p in head.named_parameters() if p.requires_grad}
    assert "score.weight" in trained and all(n == "score.weight" or n.endswith(("lora_A", "lora_B")) for n in trained)
    assert sum(len(g["params"]) for g in trainer.optimizers[0].param_groups) == len(trained)
    now = model.state_dict()
    assert not torch.equal(now["head.score.weight"], seen["head.score.weight"])
    for k, v in seen.items():
        if k.startswith("head.") and ".lora_" not in k and "score" not in k:
            assert torch.equal(now[k], v), f"frozen {k} changed"

    trainer.save_checkpoint(tmp_path / "cls.ckpt")
    export_checkpoint(tmp_path / "cls.ckpt", tmp_path / "hf")
    hf, info = transformers.Phi3ForSequenceClassification.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = _ids(vocab=250)
    ids[ids == head.config.pad_token_id] = 5
    with torch.no_grad():
        ours = head.eval()(ids).logits
        theirs = hf.eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- building
def test_meta_init_keeps_lora_b_zero_and_the_model_unchanged():
    """The FSDP2 meta path (apply_lora on meta, then materialise via reset_parameters): B = 0, A initialised, so
    the adapted model computes what the base model does."""
    config = get_preset("tiny")
    with torch.device("meta"):
        head = Phi3ForCausalLM(config, device=torch.device("meta"))
    apply_lora(head, LoRAConfig(r=4))
    materialize_meta(head, torch.device("cpu"))
    for name, m in lora_modules(head).items():
        assert torch.count_nonzero(m.lora_B) == 0 and m.lora_A.abs().max() > 0, name
    ids = _ids()
    with torch.no_grad():
        adapted = head.eval()(ids).logits
        for m in lora_modules(head).values():
            m.lora_A.zero_()
        torch.testing.assert_close(head(ids).logits, adapted, rtol=0, atol=0)


def test_lora_is_applied_before_checkpointing_and_compile(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(self))
    m = CausalLMModule(lora={"r": 2}, activation_checkpointing=True, torch_compile="layers")
    m.configure_model()
    assert m.head.model.gradient_checkpointing
    assert all(isinstance(layer.self_attn.qkv_proj, LoRALinear) for layer in compiled)


def test_bad_lora_settings_fail_at_build_naming_them():
    with pytest.raises(ValueError, match=r"target_modules \['q_proj', 'v_proj'\] match no nn.Linear.*qkv_proj"):
        CausalLMModule(lora={"target_modules": ["q_proj", "v_proj"]}).configure_model()
    with pytest.raises(ValueError, match=r"unknown fields \['rank'\]"):
        CausalLMModule(lora={"rank": 8})
    with pytest.raises(ValueError, match="rank r=0"):
        CausalLMModule(lora={"r": 0})


def test_bad_lora_target_through_the_cli(lm_run, tmp_path):
    (tmp_path / "bad.yaml").write_text(LORA_YAML.replace("qkv_proj, o_proj", "q_proj, o_proj"))
    rc, _, err = run_main(
        "fit",
        *small_args("causal_lm", tmp_path / "logs", lm_run.root / "cache", steps=1),
        "--config",
        tmp_path / "bad.yaml",
    )
    assert rc == 1 and "target_modules ['q_proj']" in err and "qkv_proj" in err, err[-2000:]


def _validate_from(module, ckpt, cache):
    dm = CausalLMDataModule(
        tokenizer="byte", source="embedded", max_length=64, max_files=8, batch_size=4, cache_dir=cache, progress=False
    )
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False
    )
    return trainer.validate(module, datamodule=dm, ckpt_path=ckpt, verbose=False)


def test_a_checkpoint_is_refused_by_a_module_with_other_lora_settings(lm_run, tmp_path):
    """The LoRA settings a checkpoint's adapters were trained with are checked where it loads (Python API too),
    before any weight is copied: another alpha (same shapes) would silently rescale every adapter. A run started
    from ``adapter`` re-reads its adapter_config.json when it resumes: edited since, it is refused the same way."""
    cache = lm_run.root / "cache"
    trained = {"r": 4, "alpha": 8, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
    assert _validate_from(CausalLMModule(model=str(lm_run.init), lora=trained), lm_run.last, cache)  # same: loads
    with pytest.raises(ValueError, match=r"lora\.alpha.*8\.0.*16\.0"):
        _validate_from(CausalLMModule(model=str(lm_run.init), lora={**trained, "alpha": 16}), lm_run.last, cache)
    with pytest.raises(ValueError, match=r"trained with LoRA.*lora=null"):
        _validate_from(CausalLMModule(model=str(lm_run.init)), lm_run.last, cache)
    rc, _, err = run_main("export", "--checkpoint", lm_run.last, "--output", tmp_path / "adapter", "--lora_only")
    assert rc == 0, err
    assert _validate_from(CausalLMModule(model=str(lm_run.init), adapter=str(tmp_path / "adapter")), lm_run.last, cache)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 64}))
    module = CausalLMModule(model=str(lm_run.init), adapter=str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"lora\.alpha.*8\.0.*64"):
        _validate_from(module, lm_run.last, cache)


def test_help_lists_the_lora_fields():
    rc, out, _ = run_main("fit", "--model.help", "CausalLMModule", "--model.lora.help")
    assert rc == 0
    for field in (
        "--model.lora.r",
        "--model.lora.alpha",
        "--model.lora.target_modules",
        "--model.lora.layers",
        "--model.lora.train_head",
        "Rank of each adapter",
    ):
        assert field in out, field


# ---------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "name, preset, expect",
    [
        ("phi3_mini_4k_lora", "phi-3-mini-4k", "14.87"),
        ("phi3_5_mini_full_fsdp2", "phi-3.5-mini", "13.32"),
        ("phi4_mini_lora_seqcls", "phi-4-mini", "11.05"),
    ],
)
def test_finetune_config_memory_comments_are_the_planners(name, preset, expect):
    """The per-GPU estimate written in each fine-tune YAML is what the planner gives for the YAML's settings."""
    import yaml

    from phi3_lightning.memory import GiB, estimate_memory

    text = (CONFIGS / "finetune" / f"{name}.yaml").read_text()
    cfg = yaml.safe_load(text)
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    lora = model.get("lora")
    fsdp2 = isinstance(trainer.get("strategy"), dict) and trainer["strategy"]["class_path"].endswith("FSDP2Strategy")
    est = estimate_memory(
        preset,
        method="lora" if lora else "full",
        precision=trainer["precision"],
        strategy="fsdp2" if fsdp2 else "single",
        world_size=trainer["devices"] * trainer.get("num_nodes", 1),
        seq_len=data["max_length"],
        batch_size=data["batch_size"],
        activation_checkpointing=model["activation_checkpointing"],
        lora_rank=lora["r"] if lora else 16,
        head=cfg["model"]["class_path"]
        .rsplit(".", 1)[-1]
        .replace("SequenceClassificationModule", "sequence_classification")
        .replace("CausalLMModule", "causal_lm"),
        masked=True,
    )
    assert f"{est.total / GiB:.2f}" == expect and f"{expect} GiB estimated" in text
    settings = {k: v for k, v in est.settings.items() if k not in ("model", "accumulate_grad_batches")}
    accumulating = estimate_memory(
        preset, **settings, accumulate_grad_batches=trainer.get("accumulate_grad_batches", 1)
    )
    assert accumulating.total < 22 * GiB  # gradient accumulation keeps the gradients alive through the forward
    if lora:
        assert lora["r"] == 16 and set(lora["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


# ---------------------------------------------------------------------------------------------------- OOM
def test_oom_message_gets_the_memory_planners_advice(monkeypatch):
    """A simulated CUDA OOM on a 24 GiB GPU: LoRA phi-3-mini, bf16-true, 1 x 4096 (~26.4 GiB estimated)."""
    module = CausalLMModule(model="phi-3-mini-4k", lora={"r": 16})  # not built: only the config is read
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=24 * 2**30))
    trainer = SimpleNamespace(
        precision="bf16-true",
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
        world_size=1,
        optimizers=[],
        datamodule=None,
        accumulate_grad_batches=1,
    )
    cb = OOMAdvice()
    cb.on_train_batch_start(trainer, module, {"input_ids": torch.zeros(1, 4096, dtype=torch.long)}, 0)
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")
    cb.on_exception(trainer, module, error)
    msg = str(error)
    assert msg.startswith("CUDA out of memory. Tried to allocate 1.00 GiB.\n\n" + MARKER)
    from phi3_lightning.memory import estimate_memory

    kw = dict(method="lora", precision="bf16-true", seq_len=4096, batch_size=1)
    full = estimate_memory("phi-3-mini-4k", **kw).total / 2**30
    ckpt = estimate_memory("phi-3-mini-4k", activation_checkpointing=True, **kw).total / 2**30
    half = estimate_memory("phi-3-mini-4k", activation_checkpointing=2, **kw).total / 2**30
    assert 24 < full < 28 and 9 < ckpt < half < 24
    assert f"estimated {full:.1f} GiB per GPU for LoRA (r=16) fine-tuning of phi-3-mini-4k" in msg
    assert (
        f"but the GPU has 24.0 GiB; try activation checkpointing of every 2nd layer ({half:.1f} GiB) / "
        f"activation checkpointing ({ckpt:.1f} GiB)"
    ) in msg
    assert msg.endswith(
        "python -m phi3_lightning.memory --preset phi-3-mini-4k --method lora --precision bf16-true "
        "--seq-len 4096 --batch-size 1"
    )
    cb.on_exception(trainer, module, error)
    assert str(error) == msg  # not appended twice
    other = RuntimeError("something else")
    cb.on_exception(trainer, module, other)
    assert str(other) == "something else"


def test_oom_raised_in_fit_is_reraised_with_the_advice(tmp_path):
    class OOMing(CausalLMModule):
        def training_step(self, batch, batch_idx):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    dm = CausalLMDataModule(max_length=32, max_files=2, batch_size=2, cache_dir=str(tmp_path), progress=False)
    trainer = pl.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(torch.cuda.OutOfMemoryError) as got:
        trainer.fit(OOMing(lora={"r": 2}), dm)
    msg = str(got.value)
    assert msg.startswith("CUDA out of memory (simulated)") and f"{MARKER} estimated" in msg
    assert "LoRA (r=2) fine-tuning of tiny" in msg and "32-true" in msg and "; try " in msg
    assert "--preset tiny --method lora --precision 32-true --seq-len 32 --batch-size 2 --lora-rank 2" in msg


# ---------------------------------------------------------------------------------------------------- FSDP2
FSDP2_LORA = """\
trainer:
  max_steps: -1
  limit_train_batches: 3
  limit_val_batches: 1
  val_check_interval: 1.0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_top_k: -1
        every_n_epochs: 1
        filename: "{epoch}"
model:
  init_args:
    meta_init: true
    lora: {r: 4, alpha: 8, target_modules: [qkv_proj, o_proj, gate_up_proj, down_proj]}
"""


def _torchrun(*argv, cwd, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m phi3_lightning ...``: torch's launcher starts the processes and
    Lightning detects its environment (TorchElasticEnvironment) instead of launching its own."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "phi3_lightning",
        *map(str, argv),
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_fsdp2_two_process_lora_saves_resumes_and_exports(lm_run, tmp_path):
    """gloo, meta init + rank-0 broadcast of the pretrained weights into the adapted, sharded model. Epoch 1 is
    launched by torchrun, epoch 2 resumes from its distributed checkpoint under Lightning's own launcher (the same
    YAML both ways); export merges the sharded adapters."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "fsdp2_lora.yaml").write_text(FSDP2_LORA)

    def fit(epochs: int, *extra, launch=run_module):
        proc = launch(
            "fit",
            "--config",
            CONFIGS / "causal_lm.yaml",
            "--config",
            CONFIGS / "strategies" / "fsdp2.yaml",
            "--config",
            tmp_path / "fsdp2_lora.yaml",
            "--trainer.max_epochs",
            epochs,
            "--trainer.logger.init_args.save_dir",
            tmp_path / "logs",
            "--model.init_args.model",
            lm_run.init,
            "--data.init_args.max_length",
            "64",
            "--data.init_args.max_files",
            "8",
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.cache_dir",
            lm_run.root / "cache",
            "--data.init_args.progress",
            "false",
            *extra,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    run = tmp_path / "logs" / "causal_lm+fsdp2+fsdp2_lora" / "sdpa"
    proc = fit(1, launch=_torchrun)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr
    first = run / "version_0" / "checkpoints" / "epoch=0.ckpt"
    assert first.is_dir() and (first / "meta.pt").is_file()
    fit(2, "--ckpt_path", first)
    final = run / "version_1" / "checkpoints" / "epoch=1.ckpt"
    assert final.is_dir()
    assert [s for s, _ in scalars(run / "version_1")["train/loss_step"]] == [3, 4, 5]  # only the second epoch

    init = Phi3ForCausalLM.from_pretrained(lm_run.init).state_dict()
    before, after = (load_head(p, merge_lora=False).head for p in (first, final))
    adapters = _check_base_frozen({f"head.{k}": v for k, v in after.state_dict().items()}, init)
    assert adapters and all(not torch.equal(v, before.state_dict()[k[5:]]) for k, v in adapters.items())

    rc, _, err = run_main("export", "--checkpoint", final, "--output", tmp_path / "hf")
    assert rc == 0, err
    hf, info = transformers.Phi3ForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, after(ids).logits, rtol=1e-4, atol=1e-5)
