"""LightningModules without the CLI: building (preset / config / HF directory), optimizer groups, schedules,
meta-device materialisation, checkpoint metadata and head-mismatch errors, the Python API end to end."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch

from phi3_lightning.data import CausalLMDataModule
from phi3_lightning.model import Phi3Config, Phi3ForCausalLM, Phi3ForSequenceClassification, get_preset
from phi3_lightning.modules import (
    CausalLMModule,
    Phi3ThroughputMonitor,
    SequenceClassificationModule,
    TokenClassificationModule,
    WarmupDecayLR,
    load_head,
    resolve_model,
)
from phi3_lightning.modules.fsdp import materialize_meta

from .helpers import built


# ---------------------------------------------------------------------------------------------------- schedules
def test_warmup_then_cosine_or_linear_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cos = WarmupDecayLR(opt, warmup_steps=10, total_steps=110, decay="cosine", min_lr_ratio=0.1)
    assert cos.factor(0) == 0.0 and cos.factor(5) == 0.5 and cos.factor(10) == 1.0
    assert math.isclose(cos.factor(60), 0.1 + 0.9 * 0.5) and math.isclose(cos.factor(110), 0.1)
    assert math.isclose(cos.factor(500), 0.1)
    lin = WarmupDecayLR(opt, warmup_steps=0, total_steps=100, decay="linear", min_lr_ratio=0.0)
    assert lin.factor(0) == 1.0 and math.isclose(lin.factor(25), 0.75)
    late = WarmupDecayLR(opt, warmup_steps=2)
    assert late.factor(50) == 1.0  # no total yet: constant after warmup
    late.set_total_steps(102)
    assert math.isclose(late.factor(102), 0.1)
    state = cos.state_dict()
    assert "lr_lambdas" not in state
    fresh = WarmupDecayLR(opt, warmup_steps=1)
    fresh.load_state_dict(state)
    assert fresh.total_steps == 110 and fresh.warmup_steps == 10
    with pytest.raises(ValueError, match="decay='step'"):
        WarmupDecayLR(opt, decay="step")


# ---------------------------------------------------------------------------------------------------- building
def test_weight_decay_only_on_matrices():
    opt = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    m = built(CausalLMModule(model="tiny", optimizer=opt))
    optimizer = m.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n == m.head.num_parameters() == m.config.num_parameters()


def test_build_from_preset_config_overrides_and_checkpoint_dir(tmp_path):
    m = built(CausalLMModule(model="tiny", config_overrides={"num_hidden_layers": 1}))
    assert len(m.head.model.layers) == 1 and m.weights_dir is None
    cfg = get_preset("tiny-gqa")
    m = built(TokenClassificationModule(model=cfg, label_names=["a", "b", "c"]))
    assert m.head.score.out_features == 3 and m.config.id2label == {"0": "a", "1": "b", "2": "c"}
    assert m.hparams["model"]["num_key_value_heads"] == 2  # a Phi3Config is kept as plain data

    torch.manual_seed(3)
    lm = Phi3ForCausalLM.from_config("tiny")
    lm.save_pretrained(tmp_path / "lm")
    with pytest.warns(UserWarning, match="initialised new head weights"):
        seq = built(SequenceClassificationModule(model=str(tmp_path / "lm"), num_labels=4))
    torch.testing.assert_close(seq.head.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert seq.head.score.out_features == 4
    cfg_only = built(CausalLMModule(model=str(tmp_path / "lm" / "config.json")))  # architecture only
    assert not torch.equal(cfg_only.head.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_head_mismatch_with_checkpoint_dir(tmp_path):
    Phi3ForSequenceClassification.from_config(get_preset("tiny", num_labels=3)).save_pretrained(tmp_path / "s3")
    with pytest.raises(ValueError, match=r"score.weight has shape \(3, 128\).*\(5, 128\).*num_labels"):
        built(SequenceClassificationModule(model=str(tmp_path / "s3"), num_labels=5))
    with pytest.warns(UserWarning):
        m = built(SequenceClassificationModule(model=str(tmp_path / "s3"), num_labels=5, strict_head=False))
    assert m.head.score.out_features == 5
    same = built(SequenceClassificationModule(model=str(tmp_path / "s3")))  # num_labels from config.json
    assert same.config.num_labels == 3


def test_bad_model_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        resolve_model("phi-9")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(
        ValueError, match="unknown attn_implementation='fast'; choose one of eager, sdpa, flash_attention_2, flex"
    ):
        CausalLMModule(attn_implementation="fast")
    with pytest.raises(ValueError, match="did you mean sdpa"):
        CausalLMModule(attn_implementation="spda")
    with pytest.raises(ValueError, match="torch_compile"):
        CausalLMModule(torch_compile="all")
    with pytest.raises(ValueError, match="2 label_names"):
        SequenceClassificationModule(num_labels=3, label_names=["a", "b"])


def test_activation_checkpointing_and_compile_settings(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    m = built(CausalLMModule(activation_checkpointing=True, torch_compile="layers", compile_mode="max-autotune"))
    assert m.head.model.gradient_checkpointing
    assert compiled == [("Phi3DecoderLayer", {"mode": "max-autotune"})] * 2
    compiled.clear()
    built(CausalLMModule(torch_compile="model"))
    assert compiled == [("Phi3ForCausalLM", {"mode": None})]
    assert built(CausalLMModule(activation_checkpointing=True)).head.model.checkpoint_every == 1
    half = built(CausalLMModule(activation_checkpointing=2)).head.model
    assert half.gradient_checkpointing and half.checkpoint_every == 2
    assert not built(CausalLMModule(activation_checkpointing=False)).head.model.gradient_checkpointing
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="whole number n >= 1"):
            CausalLMModule(activation_checkpointing=bad)


def test_activation_checkpointing_gives_the_same_gradients():
    batch = {"input_ids": torch.randint(0, 256, (2, 16))}
    batch["labels"] = batch["input_ids"]
    grads = []
    for ac in (False, True):
        torch.manual_seed(0)
        m = built(CausalLMModule(activation_checkpointing=ac))
        m.train()
        m(batch, return_logits=False).loss.backward()
        grads.append(m.head.model.layers[0].mlp.gate_up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_meta_init_materialises_like_an_eager_build():
    config = get_preset("tiny-gqa")
    with torch.device("meta"):
        head = Phi3ForSequenceClassification(config, device=torch.device("meta"), pooling="attention")
    torch.manual_seed(0)
    materialize_meta(head, torch.device("cpu"))
    eager = Phi3ForSequenceClassification(config, pooling="attention")
    for (name, p), (_, q) in zip(head.state_dict().items(), eager.state_dict().items()):
        assert not p.is_meta and p.shape == q.shape and torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            torch.testing.assert_close(p, q)
    assert head.model.embed_tokens.weight[config.pad_token_id].abs().sum() == 0
    torch.testing.assert_close(head.model.rotary_emb.short_inv_freq, eager.model.rotary_emb.short_inv_freq)
    std = head.model.layers[0].self_attn.qkv_proj.weight.std().item()
    assert abs(std - config.initializer_range) < 0.003


def test_flops_per_token_and_peak():
    lm, seq = CausalLMModule(), SequenceClassificationModule(num_labels=4)
    assert lm.flops_per_token(256) == lm.config.flops_per_token(256)
    assert seq.flops_per_token(256) == lm.flops_per_token(256) - 6 * (512 - 4) * 128

    class T:  # the bits of a Trainer the monitor reads
        precision = "32-true"

        class strategy:
            root_device = torch.device("cpu")

    assert Phi3ThroughputMonitor().peak_flops_per_device(T) == pytest.approx(0.1e12 * torch.get_num_threads())
    assert Phi3ThroughputMonitor(peak_tflops=2.0).peak_flops_per_device(T) == 2e12


def test_throughput_is_measured_per_optimizer_step_and_excludes_validation_and_its_checkpoint(monkeypatch):
    """Two micro-batches per optimizer step (accumulate_grad_batches=2), 1 s and 10 real tokens each, a measurement
    every optimizer step: one point per step (not one per micro-batch, two at the same step), at the step index that
    Lightning's own train/* and lr series use, each 20 tokens / 2 s = 10 tokens/s. Validation and what follows it
    until training resumes (the ModelCheckpoint save runs after the monitor's on_validation_end) are excluded."""
    from types import SimpleNamespace

    from phi3_lightning.modules import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    logged: list[tuple[int, dict]] = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, dict(metrics))))
    epoch_loop = SimpleNamespace(_batches_that_stepped=0)
    trainer = SimpleNamespace(
        global_step=0,
        world_size=1,
        log_every_n_steps=50,
        is_global_zero=True,
        loggers=[logger],
        precision="32-true",
        state=SimpleNamespace(fn="fit"),
        fit_loop=SimpleNamespace(epoch_loop=epoch_loop),
        strategy=SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda t, reduce_op: t),
    )
    module = SimpleNamespace(flops_per_token=lambda seq_len: 100.0, log=lambda *a, **k: None)
    monitor = Phi3ThroughputMonitor(peak_tflops=1.0, log_every_n_steps=1)
    monitor.on_fit_start(trainer, module)
    batch = {
        "input_ids": torch.zeros(2, 8, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 8, [1] * 2 + [0] * 6]),
    }
    for i in range(8):  # micro-batches 0..7: optimizer steps end at 1, 3, 5, 7
        monitor.on_train_batch_start(trainer, module, batch, i)
        clock[0] += 1.0
        if i % 2 == 1:
            trainer.global_step += 1
        monitor.on_train_batch_end(trainer, module, None, batch, i)
        if i % 2 == 1:
            if i == 3:  # validation after step 2, then 5 s of checkpoint writing before training goes on
                monitor.on_validation_start(trainer, module)
                clock[0] += 3.0
                monitor.on_validation_end(trainer, module)
                clock[0] += 5.0
            epoch_loop._batches_that_stepped += 1
    # step 1 (micro-batches 0-1) is the warm-up; then one measurement per optimizer step, at Lightning's step index
    assert [step for step, _ in logged] == [1, 2, 3]
    assert [m["perf/tokens_per_sec"] for _, m in logged] == [10.0, 10.0, 10.0]
    assert [m["perf/seconds_per_batch"] for _, m in logged] == [1.0, 1.0, 1.0]
    assert [m["perf/mfu"] for _, m in logged] == pytest.approx([10.0 * 100.0 / 1e12] * 3)


@pytest.mark.parametrize(
    "name, precision, tflops",
    [
        ("NVIDIA H200", "bf16-true", 989.0),  # Lightning's table has no match for this name (and a sparse figure)
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.0),
        ("NVIDIA H100 PCIe", "16-mixed", 756.0),
        ("NVIDIA H200 NVL", "bf16-true", 835.0),
        ("NVIDIA A100-SXM4-80GB", "bf16-true", 312.0),
        ("NVIDIA L4", "bf16-mixed", 121.0),
    ],
)
def test_gpu_peak_is_the_dense_half_precision_datasheet_figure(monkeypatch, name, precision, tflops):
    from types import SimpleNamespace

    from phi3_lightning.modules.callbacks import dense_half_peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    trainer = SimpleNamespace(precision=precision, strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert Phi3ThroughputMonitor().peak_flops_per_device(trainer) == tflops * 1e12
    assert dense_half_peak_tflops(name) == tflops
    assert dense_half_peak_tflops("Some Future GPU") is None


def test_checkpoint_head_mismatch_is_explained():
    eight = built(SequenceClassificationModule(num_labels=8))
    three = built(SequenceClassificationModule(num_labels=3))
    with pytest.raises(ValueError, match=r"head.score.weight has shape \(8, 128\).*\(3, 128\).*num_labels"):
        three.on_load_checkpoint({"state_dict": eight.state_dict()})


# ---------------------------------------------------------------------------------------------------- Python API
def test_python_api_fit_save_load(tmp_path):
    """No CLI: Trainer + module + data module; the checkpoint loads with weights_only (plain hparams), the
    phi3_lightning entry rebuilds the head for generate/export, and load_from_checkpoint restores the weights."""
    dm = CausalLMDataModule(max_length=32, max_files=3, batch_size=2, cache_dir=str(tmp_path / "cache"), progress=False)
    opt = functools.partial(torch.optim.AdamW, lr=1e-3)
    model = CausalLMModule(model="tiny", optimizer=opt, lr_scheduler=functools.partial(WarmupDecayLR, warmup_steps=1))
    trainer = pl.Trainer(
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[Phi3ThroughputMonitor(log_every_n_steps=1)],
    )
    trainer.fit(model, dm)
    assert model.lr_schedulers().total_steps == 2  # filled in from the trainer
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["phi3_lightning"]["task"] == "causal_lm" and ckpt["phi3_lightning"]["tokenizer"] == "byte"
    again = CausalLMModule.load_from_checkpoint(path, optimizer=opt)
    for (k, v), (_, w) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(v, w, msg=k)
    loaded = load_head(path)
    torch.testing.assert_close(loaded.head.lm_head.weight, model.head.lm_head.weight)
    assert loaded.tokenizer == "byte" and loaded.task == "causal_lm"
    assert isinstance(Phi3Config.from_dict(ckpt["phi3_lightning"]["config"]), Phi3Config)


def test_seq_cls_multi_hot_labels_without_problem_type_get_multilabel_metrics(tmp_path):
    """Float multi-hot labels and no problem_type: the loss is BCE (transformers' inference from the label dtype), so
    the metrics must be the multi-label ones too (they were built multiclass: argmax vs a (B, 3) target). The type
    found is written into the config, so a checkpoint's predictions use sigmoid as well."""
    from torchmetrics.classification import MultilabelAccuracy

    torch.manual_seed(0)
    ids = torch.randint(3, 200, (8, 6))
    hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).repeat(4, 1)  # (8, 3) float multi-hot
    rows = [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(6, dtype=torch.long),
            "position_ids": torch.arange(6),
            "labels": hot[i],
        }
        for i in range(8)
    ]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    model = SequenceClassificationModule(model="tiny", num_labels=3)
    assert model.problem_type == "single_label_classification"  # all that is known before seeing labels
    trainer = pl.Trainer(
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(model, loader, loader)
    assert model.problem_type == "multi_label_classification"
    assert model.config.problem_type == model.head.config.problem_type == "multi_label_classification"
    for stage in ("train", "val"):
        assert isinstance(model.stage_metrics(stage)["accuracy"], MultilabelAccuracy)
    acc = trainer.callback_metrics["val/accuracy"]
    assert 0.0 <= float(acc) <= 1.0
    out = model.predict_step({k: v for k, v in next(iter(loader)).items()}, 0)
    assert out["predictions"].shape == (4, 3)  # per-label 0/1 decisions, not a class id


def test_row_length_is_checked_against_the_model_once_in_setup(tmp_path):
    """max_length above the model's max_position_embeddings is refused in setup, before the model is built (before:
    at the first forward, deep in the backbone), naming both numbers and the fix."""
    dm = CausalLMDataModule(
        max_length=96, max_files=6, val_fraction=0.3, batch_size=2, cache_dir=str(tmp_path / "c"), progress=False
    )
    model = CausalLMModule(
        model="tiny", config_overrides={"max_position_embeddings": 64, "original_max_position_embeddings": 64}
    )
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(ValueError, match=r"max_length=96 .*max_position_embeddings=64.*lower --data.max_length"):
        trainer.fit(model, dm)
    assert model.head is None  # refused before the model is built


# ------------------------------------------------------------------------------------------- non-finite validation
@pytest.mark.parametrize("module_cls", [CausalLMModule, SequenceClassificationModule, TokenClassificationModule])
def test_a_nan_validation_batch_makes_the_epoch_loss_nan_not_the_mean_of_the_others(module_cls):
    """torchmetrics' MeanMetric drops NaN values with a warning by default: a model that gives NaN on part of the
    validation set would report the mean of the other batches, look fine, and could be kept as the best checkpoint.
    The epoch loss must be NaN instead; a batch without any counted target (loss 0/0, weight 0) adds nothing."""
    torch.manual_seed(0)
    kwargs = {} if module_cls is CausalLMModule else {"num_labels": 3}
    module = built(module_cls(model="tiny", **kwargs))
    module.eval()
    with torch.no_grad():
        module.head.model.embed_tokens.weight[300] = float("nan")  # only a batch holding token 300 is NaN
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    if module_cls is CausalLMModule:
        labels = ids.clone()
    elif module_cls is SequenceClassificationModule:
        labels = torch.tensor([0, 2])
    else:
        labels = torch.randint(0, 3, (2, 8), generator=torch.Generator().manual_seed(2))
    ignored = torch.full_like(labels, -100)
    loss = module.stage_metrics("val")["loss"]

    def step(input_ids, labels):
        with torch.no_grad():
            module.validation_step(
                {"input_ids": input_ids, "attention_mask": torch.ones_like(ids), "labels": labels}, 0
            )

    step(ids, labels)
    good = float(loss.compute())
    assert math.isfinite(good)
    step(ids, ignored)  # no target: NaN mean with weight 0
    assert float(loss.compute()) == pytest.approx(good)
    nan_ids = ids.clone()
    nan_ids[1, 3] = 300
    step(nan_ids, labels)
    assert math.isnan(float(loss.compute())), "the NaN batch was dropped from the validation loss"
