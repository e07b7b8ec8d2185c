"""The optimizer step's gradient is the gradient of the mean loss over *all* the step's counted units (target
tokens, labelled tokens, examples), whatever the split of the step into micro-batches (gradient accumulation) or
processes: not the mean of per-micro-batch means, which weighs a unit of a micro-batch with few targets more.

Each test trains the same rows, in the same order, once as one batch per step and once split into two micro-batches
(``accumulate_grad_batches=2``) or two processes (DDP, FSDP2), with rows of unequal lengths so the parts hold
different counts, and compares the weight updates after two SGD steps (fp32, CPU). Before the fix the updates
differed by 0.37 (causal LM), 0.55 (token classification), 1.46 (sequence classification, 4 + 2 examples) and 0.80
(2-process DDP) in relative norm; now by ~1e-6 (float reduction order)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from phi3_lightning.data.collate import PaddingCollator
from phi3_lightning.modules import CausalLMModule, SequenceClassificationModule, TokenClassificationModule

from .helpers import ROOT, quiet_trainer

STEPS = 2


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def _lengths_examples(n: int, seed: int, token_labels: str | None = None) -> list[dict]:
    """Rows of very unequal lengths (3..40 tokens): micro-batches of 2 rows hold very different target counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = (
            3 + int(torch.randint(0, 38, (1,), generator=g))
            if i % 2
            else 3 + int(torch.randint(0, 4, (1,), generator=g))
        )
        ids = torch.randint(3, 250, (length,), generator=g).tolist()
        if token_labels == "classes":  # token classification: about half the tokens labelled
            labels = [
                int(c) if keep else -100
                for c, keep in zip(torch.randint(0, 3, (length,), generator=g), torch.rand(length, generator=g) < 0.5)
            ]
            labels[0] = 1  # at least one labelled token per row
        else:
            labels = ids
        out.append({"input_ids": ids, "labels": labels})
    return out


def _fit_update(make_module, make_loader, accumulate: int, **trainer_args) -> dict[str, torch.Tensor]:
    """Weights after STEPS optimizer steps minus the initial weights (same init for every call);
    ``make_loader(module)`` gives the training loader."""
    torch.manual_seed(0)
    module = make_module()
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = quiet_trainer(max_steps=STEPS, accumulate_grad_batches=accumulate, **trainer_args)
    trainer.fit(module, train_dataloaders=make_loader(module))
    assert trainer.global_step == STEPS
    return {k: module.state_dict()[k] - before[k] for k in before if before[k].is_floating_point()}


def _update(make_module, examples, batch_size: int, accumulate: int, **trainer_args) -> dict[str, torch.Tensor]:
    def loader(module):
        return DataLoader(examples, batch_size=batch_size, collate_fn=PaddingCollator(0))

    return _fit_update(make_module, loader, accumulate, **trainer_args)


def _assert_same_updates(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """Relative difference of the whole update (all weights as one vector): float-reduction noise is ~1e-6 here
    (two SGD steps, the second from slightly different weights); the mean of micro-batch means is off by 0.37-1.5."""
    diff = torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in a))
    size = torch.sqrt(sum((a[k].double() ** 2).sum() for k in a))
    assert size > 0
    print(f"relative difference of the updates: {float(diff / size):.3g}")
    assert diff / size < tol, f"weight updates differ by {float(diff / size):.3g} (relative norm)"


def test_causal_lm_accumulation_equals_one_big_batch():
    examples = _lengths_examples(2 * 2 * STEPS, seed=1)
    make = lambda: CausalLMModule(model="tiny", attn_implementation="eager", optimizer=_sgd)  # noqa: E731
    _assert_same_updates(_update(make, examples, 4, 1), _update(make, examples, 2, 2))


@pytest.mark.parametrize("in_backward", [False, True])
def test_one_micro_batch_on_one_process_keeps_the_plain_mean(in_backward):
    """Nothing to correct with one micro-batch on one process (the only case ``optimizer_in_backward`` allows): the
    loss back-propagated is the head's mean itself, bit for bit, and no gradient is rescaled."""
    examples = _lengths_examples(4, seed=4)
    module = CausalLMModule(
        model="tiny", attn_implementation="eager", optimizer=_sgd, optimizer_in_backward=in_backward
    )
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                seen.append(pl_module(batch, return_logits=False).loss)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert not pl_module._token_exact()
            seen.append(outputs["loss"])

    trainer = quiet_trainer(max_steps=2, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=DataLoader(examples, batch_size=2, collate_fn=PaddingCollator(0)))
    assert len(seen) == 4
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])


def test_causal_lm_accumulation_under_a_float16_loss_scaler():
    """16-mixed (fp16 autocast + GradScaler, here the CPU one): the gradients are rescaled before the scaler unscales
    them, a linear factor either way, so accumulation still equals one big batch up to fp16 rounding (~8e-4 here;
    the mean of micro-batch means is off by 0.37) and the scaler finds no overflow."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    examples = _lengths_examples(2 * 2 * STEPS, seed=1)
    make = lambda: CausalLMModule(model="tiny", attn_implementation="eager", optimizer=_sgd)  # noqa: E731
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2)]
    updates = [
        _update(make, examples, 4 // a, a, plugins=[MixedPrecision("16-mixed", "cpu", scaler=s)])
        for a, s in zip((1, 2), scalers)
    ]
    assert [s.get_scale() for s in scalers] == [2.0**12, 2.0**12]  # no step skipped for an overflow
    _assert_same_updates(*updates, tol=5e-3)


def test_token_classification_accumulation_equals_one_big_batch():
    examples = _lengths_examples(2 * 2 * STEPS, seed=2, token_labels="classes")
    make = lambda: TokenClassificationModule(  # noqa: E731
        model="tiny",
        num_labels=3,
        attn_implementation="eager",
        optimizer=_sgd,
        config_overrides={"classifier_dropout": 0.0},  # (default 0.1) the masks would differ with the batch shapes
    )
    _assert_same_updates(_update(make, examples, 4, 1), _update(make, examples, 2, 2))


@pytest.mark.parametrize("task", ["causal_lm", "token_classification"])
def test_a_micro_batch_without_targets_adds_nothing_to_the_step(task):
    """A micro-batch whose rows hold no target (causal LM: one-token rows; token classification: every label -100)
    is legal inside an accumulated step as long as the step has targets: one batch holding the same rows trains
    (its mean skips them), so the split step must give the same update, not a NaN loss that stops the run."""
    examples = _lengths_examples(2 * 2 * STEPS, seed=6, token_labels="classes" if task != "causal_lm" else None)
    for row in examples[2:4]:  # the second micro-batch of the first step
        if task == "causal_lm":
            row["input_ids"] = row["labels"] = row["input_ids"][:1]
        else:
            row["labels"] = [-100] * len(row["labels"])
    if task == "causal_lm":
        make = lambda: CausalLMModule(model="tiny", attn_implementation="eager", optimizer=_sgd)  # noqa: E731
    else:
        make = lambda: TokenClassificationModule(  # noqa: E731
            model="tiny",
            num_labels=3,
            attn_implementation="eager",
            optimizer=_sgd,
            config_overrides={"classifier_dropout": 0.0},
        )
    _assert_same_updates(_update(make, examples, 4, 1), _update(make, examples, 2, 2))


def test_sequence_classification_accumulation_counts_every_example_once():
    """6 examples per step as micro-batches of 4 + 2 (the last one short) vs one batch of 6."""
    g = torch.Generator().manual_seed(3)
    examples = []
    for _ in range(6 * STEPS):
        length = 3 + int(torch.randint(0, 12, (1,), generator=g))
        examples.append(
            {
                "input_ids": torch.randint(3, 250, (length,), generator=g).tolist(),
                "labels": int(torch.randint(0, 3, (1,), generator=g)),
            }
        )
    make = lambda: SequenceClassificationModule(model="tiny", num_labels=3, attn_implementation="eager", optimizer=_sgd)  # noqa: E731
    big = _update_batches(make, examples, [6] * STEPS, accumulate=1)
    small = _update_batches(make, examples, [4, 2] * STEPS, accumulate=2)
    _assert_same_updates(big, small)


def _update_batches(make_module, examples, sizes: list[int], accumulate: int) -> dict[str, torch.Tensor]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    batches = [list(range(s, s + n)) for s, n in zip(starts, sizes)]

    def loader(module):  # "last" pooling finds the last token that is not the pad id
        return DataLoader(examples, batch_sampler=batches, collate_fn=PaddingCollator(module.config.pad_token_id))

    return _fit_update(make_module, loader, accumulate)


DDP_SCRIPT = """
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from phi3_lightning.data.collate import PaddingCollator
from phi3_lightning.modules import CausalLMModule, FSDP2Strategy

devices, batch_size, accumulate, strategy, init, out = sys.argv[1:]
devices, batch_size, accumulate = int(devices), int(batch_size), int(accumulate)
g = torch.Generator().manual_seed(5)
examples = []
for i in range(16):
    length = 3 + int(torch.randint(0, 4 if i % 2 == 0 else 38, (1,), generator=g))
    ids = torch.randint(3, 250, (length,), generator=g).tolist()
    examples.append({"input_ids": ids, "labels": ids})
module = CausalLMModule(model=init, attn_implementation="eager", optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
trainer = pl.Trainer(
    accelerator="cpu", devices=devices, strategy=FSDP2Strategy() if strategy == "fsdp2" else strategy, max_steps=2,
    use_distributed_sampler=False, accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False,
    enable_model_summary=False, enable_checkpointing=False,
)
# rank r gets the rows r, r + 2, r + 4, ... (in order: Lightning's own DistributedSampler would shuffle them)
rank = int(os.environ.get("LOCAL_RANK", 0))
sampler = DistributedSampler(examples, num_replicas=devices, rank=rank, shuffle=False)
trainer.fit(module, train_dataloaders=DataLoader(examples, batch_size, sampler=sampler, collate_fn=PaddingCollator(0)))
state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}
if trainer.global_rank == 0:
    torch.save(state, out)
"""


@pytest.mark.slow
def test_two_process_ddp_and_fsdp2_equal_one_process_with_the_step_s_rows(tmp_path):
    """Per step 4 rows of very unequal lengths: 1 process x batch 4 == 2 DDP processes x batch 2 == 2 DDP processes
    x 2 micro-batches of 1 == 2 FSDP2 processes x batch 2 (rank r gets rows r, r + 2, ...: the same 4 rows per step,
    so the same weights after 2 SGD steps)."""
    import os
    import subprocess
    import sys

    from phi3_lightning.model import Phi3ForCausalLM

    torch.manual_seed(0)
    Phi3ForCausalLM.from_config("tiny").save_pretrained(tmp_path / "init")
    start = CausalLMModule(model=str(tmp_path / "init"))
    start.configure_model()
    before = {k: v.detach().clone() for k, v in start.state_dict().items()}
    script = tmp_path / "fit.py"
    script.write_text(DDP_SCRIPT)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    runs = [(1, 4, 1, "auto"), (2, 2, 1, "ddp"), (2, 1, 2, "ddp"), (2, 2, 1, "fsdp2")]
    updates = {}
    for run in runs:
        out = tmp_path / ("update_" + "_".join(map(str, run)) + ".pt")
        proc = subprocess.run(
            [sys.executable, str(script), *map(str, run), str(tmp_path / "init"), str(out)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        after = torch.load(out, weights_only=True)
        updates[run] = {k: after[k] - before[k] for k in before if before[k].is_floating_point()}
    for run in runs[1:]:
        _assert_same_updates(updates[runs[0]], updates[run])


def test_a_step_without_any_target_stops_with_the_cause():
    """Every micro-batch of the step without a target: nothing to average, so the guard stops the run before the
    update and says why (not a bare 'gradient is non-finite')."""
    from phi3_lightning.modules.guards import NonFiniteError

    examples = [{"input_ids": [7], "labels": [7]}] * 4
    module = CausalLMModule(model="tiny", attn_implementation="eager", optimizer=_sgd)
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=2)
    with pytest.raises(NonFiniteError, match="has no target on any process"):
        trainer.fit(module, train_dataloaders=DataLoader(examples, batch_size=2, collate_fn=PaddingCollator(0)))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
