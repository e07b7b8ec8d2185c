"""optimizer_in_backward (phi3_lightning.modules.in_backward): each parameter is updated inside backward as soon as
its gradient is complete. Same numbers and the same checkpoint format as the plain optimizer, at most one gradient
alive at a time, refusals of what it cannot do, the NaN guard, and the CLI (fit, exact resume, switching on
resume)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from phi3_lightning.model import Phi3ForCausalLM, resolve_model
from phi3_lightning.modules import CausalLMModule
from phi3_lightning.modules.guards import NonFiniteError
from phi3_lightning.modules.in_backward import InBackwardOptimizer
from phi3_lightning.modules.schedulers import WarmupDecayLR

from .modules.helpers import CONFIGS, quiet_trainer, run_main, small_args
from .test_guards import _all_finite, _checkpoints, _Toy
from .test_resume import _assert_same, _data, _trainer

STEPS = 4


def _model() -> Phi3ForCausalLM:
    torch.manual_seed(0)
    return Phi3ForCausalLM(resolve_model("tiny")[0])


def _groups(model):
    """decay / no-decay, as the LightningModule's configure_optimizers builds them."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


FACTORY = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))


def _batches(n: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


def _scheduler(opt):
    return WarmupDecayLR(opt, warmup_steps=2, total_steps=2 * STEPS, warmup_start_ratio=0.1)


def _train(model, opt, batches, in_backward: bool, sched=None):
    sched = sched if sched is not None else _scheduler(opt)
    for ids in batches:
        if in_backward:

            def closure(ids=ids):
                loss = model(ids, labels=ids).loss
                loss.backward()
                return loss

            opt.step(closure)
            assert all(p.grad is None for p in model.parameters())
        else:
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        sched.step()
    return sched


def _assert_state_equal(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        assert sa.keys() == sb.keys(), i
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (i, k)


def test_weights_and_state_equal_the_plain_optimizer():
    plain_model, ib_model = _model(), _model()
    batches = _batches(STEPS, plain_model.config.vocab_size)
    plain = FACTORY(_groups(plain_model))
    ib = InBackwardOptimizer(FACTORY, _groups(ib_model))
    _train(plain_model, plain, batches, False)
    _train(ib_model, ib, batches, True)
    for (n, a), b in zip(plain_model.named_parameters(), ib_model.parameters()):
        assert torch.equal(a, b), n
    _assert_state_equal(plain.state_dict(), ib.state_dict())
    # the learning rate moved (warmup): the hooks used the scheduler's value, not the initial one
    assert ib.param_groups[0]["lr"] != ib.param_groups[0]["initial_lr"]
    assert ib.state_dict()["param_groups"][1]["weight_decay"] == 0.0
    assert "AdamW" in repr(ib) and "InBackwardOptimizer" in repr(ib)


@pytest.mark.parametrize("direction", ["plain_to_in_backward", "in_backward_to_plain"])
def test_state_dict_loads_across_and_continues_exactly(direction):
    """Steps 1-3 with one kind, its state (optimizer + scheduler, as Lightning restores them) into the other kind,
    steps 4-6: equal to 6 plain steps."""
    ref_model, a_model, b_model = _model(), _model(), _model()
    batches = _batches(6, ref_model.config.vocab_size)
    ref = FACTORY(_groups(ref_model))
    _train(ref_model, ref, batches, False)  # uninterrupted, plain

    src_ib = direction == "in_backward_to_plain"
    src = InBackwardOptimizer(FACTORY, _groups(a_model)) if src_ib else FACTORY(_groups(a_model))
    src_sched = _train(a_model, src, batches[:3], src_ib)
    b_model.load_state_dict(a_model.state_dict())
    dst = FACTORY(_groups(b_model)) if src_ib else InBackwardOptimizer(FACTORY, _groups(b_model))
    sched = _scheduler(dst)
    dst.load_state_dict(src.state_dict())
    sched.load_state_dict(src_sched.state_dict())
    _assert_state_equal(dst.state_dict(), src.state_dict())
    _train(b_model, dst, batches[3:], not src_ib, sched)
    for (n, a), b in zip(ref_model.named_parameters(), b_model.parameters()):
        assert torch.equal(a, b), n
    _assert_state_equal(ref.state_dict(), dst.state_dict())


def test_at_most_one_gradient_is_alive_during_backward():
    """Counted with hooks registered before the optimizer's (they run first, seeing the fresh gradient): the
    plain optimizer holds every gradient at the end of backward, the in-backward one at most one at a time."""

    def live_grad_bytes(model, in_backward: bool) -> tuple[int, int]:
        params = list(model.parameters())
        peak = {"bytes": 0, "count": 0}

        def probe(_p):
            alive = [q for q in params if q.grad is not None]
            peak["bytes"] = max(peak["bytes"], sum(q.grad.nbytes for q in alive))
            peak["count"] = max(peak["count"], len(alive))

        for p in params:
            p.register_post_accumulate_grad_hook(probe)
        ids = _batches(1, model.config.vocab_size)[0]
        if in_backward:
            opt = InBackwardOptimizer(FACTORY, _groups(model))
            opt.step(lambda: model(ids, labels=ids).loss.backward())
            assert all(p.grad is None for p in params)  # and none left after the step
        else:
            model(ids, labels=ids).loss.backward()
        return peak["count"], peak["bytes"]

    model = _model()
    largest = max(p.nbytes for p in model.parameters())
    count, nbytes = live_grad_bytes(model, in_backward=True)
    assert count == 1 and nbytes <= largest
    count, nbytes = live_grad_bytes(_model(), in_backward=False)
    assert count == len(list(model.parameters())) and nbytes == sum(p.nbytes for p in model.parameters())


def test_unarmed_gradients_are_stepped_not_dropped():
    """A backward outside step() accumulates as usual; the next step updates with the sum, like the plain one."""
    plain_model, ib_model = _model(), _model()
    a, b = _batches(2, plain_model.config.vocab_size)
    plain, ib = FACTORY(_groups(plain_model)), InBackwardOptimizer(FACTORY, _groups(ib_model))
    plain_model(a, labels=a).loss.backward()
    plain_model(b, labels=b).loss.backward()
    plain.step()
    ib_model(a, labels=a).loss.backward()  # unarmed: nothing happens but accumulation
    assert all(p.grad is not None for p in ib_model.parameters()) and not ib.state
    ib.step(lambda: ib_model(b, labels=b).loss.backward())
    for (n, x), y in zip(plain_model.named_parameters(), ib_model.parameters()):
        assert torch.equal(x, y), n
    # an unarmed gradient with nothing in the armed backward: stepped after the closure
    ib_model(a, labels=a).loss.backward()
    before = [p.detach().clone() for p in ib_model.parameters()]
    ib.step(lambda: None)
    assert all(p.grad is None for p in ib_model.parameters())
    assert all(not torch.equal(x, y) for x, y in zip(before, ib_model.parameters()))


def test_step_without_closure_and_add_param_group_are_refused():
    model = _model()
    opt = InBackwardOptimizer(FACTORY, _groups(model))
    with pytest.raises(RuntimeError, match="needs the closure"):
        opt.step()
    with pytest.raises(NotImplementedError, match="optimizer_in_backward false"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_sgd_without_momentum_has_the_plain_state_format():
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    plain_model, ib_model = _model(), _model()
    ids = _batches(1, plain_model.config.vocab_size)[0]
    plain, ib = sgd(_groups(plain_model)), InBackwardOptimizer(sgd, _groups(ib_model))
    plain_model(ids, labels=ids).loss.backward()
    plain.step()
    ib.step(lambda: ib_model(ids, labels=ids).loss.backward())
    _assert_state_equal(plain.state_dict(), ib.state_dict())
    for x, y in zip(plain_model.parameters(), ib_model.parameters()):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------------------------
# Lightning: refusals and the NaN guard
# ------------------------------------------------------------------------------------------------------------------


def _quiet_trainer(tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(**{"max_steps": 1, "limit_val_batches": 0, "default_root_dir": tmp_path, **kwargs})


def _scaled():
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        (dict(gradient_clip_val=1.0), "gradient_clip_val=1.0"),
        (dict(accumulate_grad_batches=2), "accumulate_grad_batches=2"),
        # on CPU Lightning turns precision="16-mixed" into bf16-mixed; the plugin with a scaler is what a GPU gets
        (dict(plugins=[_scaled()]), "precision=16-mixed"),
    ],
    ids=["clip", "accumulate", "16-mixed"],
)
def test_settings_it_cannot_honour_are_refused(tmp_path, kwargs, setting):
    import warnings

    module = CausalLMModule(model="tiny", optimizer_in_backward=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed on CPU warns
        trainer = _quiet_trainer(tmp_path, **kwargs)
    module.configure_model()
    module.trainer = trainer
    with pytest.raises(ValueError, match=re.escape(setting)) as err:
        module.configure_optimizers()
    assert "optimizer_in_backward" in str(err.value)


def test_multi_device_strategy_is_refused(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    module = CausalLMModule(model="tiny", optimizer_in_backward=True)
    trainer = _quiet_trainer(tmp_path, strategy=DDPStrategy(), devices=2)
    module.configure_model()
    module.trainer = trainer
    with pytest.raises(ValueError, match="optimizer_in_backward=true runs on one device only, not with strategy DDP"):
        module.configure_optimizers()


class _InBackwardToy(_Toy):
    def configure_optimizers(self):
        return InBackwardOptimizer(functools.partial(torch.optim.SGD, lr=0.1), self.parameters())


def test_nan_loss_stops_before_any_update(tmp_path):
    from phi3_lightning.modules.guards import NonFiniteGuard

    model = _InBackwardToy(nan_at=2)
    weights = []
    cb = pl.Callback()
    cb.on_train_batch_end = lambda *a: weights.append(model.lin.weight.detach().clone())
    with pytest.raises(NonFiniteError, match="training loss is nan at global step 2.*no update of this step"):
        _quiet_trainer(tmp_path, max_steps=6, callbacks=[NonFiniteGuard(), cb]).fit(model)
    assert len(weights) == 2 and torch.equal(model.lin.weight, weights[-1])


def test_non_finite_gradient_stops_at_its_step_and_says_the_update_was_applied(tmp_path):
    from phi3_lightning.modules.guards import NonFiniteGuard

    model = _InBackwardToy(inf_grad_at=1)
    with pytest.raises(NonFiniteError, match=r"gradient norm is non-finite at global step 1 .*lin\.bias") as err:
        _quiet_trainer(tmp_path, max_steps=6, callbacks=[NonFiniteGuard()]).fit(model)
    assert "already applied" in str(err.value)


# ------------------------------------------------------------------------------------------------------------------
# Lightning fit: exact resume, switching the setting on resume
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("inbwd_cache"))


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2)


def _fit(cache, root, max_steps, in_backward, ckpt, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    dm = _data("causal_packed", cache)
    module = CausalLMModule(
        model="tiny",
        config_overrides={"resid_pdrop": 0.1},
        optimizer=_optimizer,
        lr_scheduler=functools.partial(WarmupDecayLR, warmup_steps=2, total_steps=8),  # not max_steps: same in both
        optimizer_in_backward=in_backward,
    )
    trainer = _trainer(root, max_steps, -1, [ckpt])
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    assert isinstance(trainer.optimizers[0], InBackwardOptimizer) == in_backward
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, trainer


@pytest.mark.parametrize(
    "first, then", [(True, True), (False, True), (True, False)], ids=["ib_ib", "plain_to_ib", "ib_to_plain"]
)
def test_fit_equals_plain_and_resumes_exactly(first, then, cache, tmp_path):
    """fit 2N plain == fit N (first) + resume to 2N (then), bit for bit, with a warmup scheduler and dropout."""
    n = 3
    plain, _ = _fit(cache, tmp_path, 2 * n, False, ModelCheckpoint(dirpath=tmp_path / "p", save_top_k=0))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=n, save_top_k=-1, filename="{step}")
    _fit(cache, tmp_path, n, first, ckpt)
    again = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=0)
    resumed, trainer = _fit(cache, tmp_path, 2 * n, then, again, ckpt_path=tmp_path / "a" / f"step={n}.ckpt")
    assert trainer.global_step == 2 * n
    _assert_same(plain, resumed)


def _cli_args(logs: Path, cache, *extra: str, steps: int = 2) -> list[str]:
    return [
        *small_args("causal_lm", logs, Path(cache), steps=steps, val_every=2),
        "--data.init_args.max_length",
        "32",
        "--run_name",
        "ib",
        *extra,
    ]


@pytest.mark.slow
def test_cli_fit_resume_switch_and_huge_lr(tmp_path, cache):
    logs = tmp_path / "logs"
    overlay = str(CONFIGS / "strategies" / "optimizer_in_backward.yaml")
    rc, _, err = run_main("fit", *_cli_args(logs, cache, "--config", overlay))
    assert rc == 0, err[-2000:]
    run = logs / "ib" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert "optimizer_in_backward: true" in (run / "config.yaml").read_text()
    state = torch.load(last, weights_only=True)["optimizer_states"][0]
    assert sorted(state["state"]) == list(range(len(state["state"]))) and state["state"]  # the plain format
    # resume with the setting switched off: an execution setting, not refused as a changed one
    rc, _, err = run_main(
        "fit",
        *_cli_args(logs, cache, "--ckpt_path", "last", "--run_version", "0", steps=4),
    )
    assert rc == 0, err[-2000:]
    good = last.read_bytes()
    # a learning rate that diverges (a new version of the run): exit 1 naming the step, the good last.ckpt untouched
    rc, _, err = run_main(
        "fit",
        *_cli_args(
            logs,
            cache,
            "--config",
            overlay,
            "--model.init_args.optimizer.init_args.lr",
            "1000",
            steps=30,
        ),
        "--trainer.val_check_interval",
        "25",
    )
    assert rc == 1, err[-2000:]
    assert re.search(r"error: the (training loss|gradient norm) is \S* ?\S*.* at global step \d+", err), err[-2000:]
    assert "optimizer_in_backward" in err  # the in-backward guard's wording: it says what was already applied
    assert last.read_bytes() == good
    assert _checkpoints(logs / "ib" / "version_1") == []  # the failing run (a new version) saved nothing
    assert all(_all_finite(p) for p in _checkpoints(logs))
    # causal_lm.yaml's gradient clipping with the switch alone: refused through the CLI, naming the setting
    rc, _, err = run_main(
        "fit", *_cli_args(tmp_path / "logs2", cache, "--model.init_args.optimizer_in_backward", "true")
    )
    assert rc == 1 and "gradient_clip_val=1.0" in err and "optimizer_in_backward" in err, err[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused / foreach CUDA AdamW kernels need a CUDA GPU")
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_cuda_adamw_in_backward_equals_the_plain_multi_tensor_step(impl):
    """On CUDA the plain AdamW updates all parameters in one multi-tensor (foreach) or fused kernel; in backward
    each parameter gets its own. The per-element arithmetic is the same, so the weights and state must be equal bit
    for bit. The gradients come from an elementwise loss (deterministic on the GPU, unlike a model's backward)."""
    factory = functools.partial(FACTORY, **{impl: True})
    g = torch.Generator().manual_seed(0)
    shapes = [(96, 64), (64,), (3, 32, 16), (1000, 8)]
    init = [torch.randn(s, generator=g).cuda().bfloat16() for s in shapes]
    targets = [torch.randn(s, generator=g).cuda().bfloat16() for s in shapes]

    def run(in_backward):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": params[::2]}, {"params": params[1::2], "weight_decay": 0.0}]
        opt = InBackwardOptimizer(factory, groups) if in_backward else factory(groups)
        sched = _scheduler(opt)
        for step in range(STEPS):

            def closure(step=step):
                loss = sum(((p - (step + 1) * t) ** 2).sum() for p, t in zip(params, targets))
                loss.backward()
                return loss

            if in_backward:
                opt.step(closure)
            else:
                closure()
                opt.step()
                opt.zero_grad()
            sched.step()
        return params, opt.state_dict()

    (plain, plain_state), (ib, ib_state) = run(False), run(True)
    for i, (a, b) in enumerate(zip(plain, ib)):
        assert not torch.equal(a, init[i])  # it trained
        assert torch.equal(a, b), shapes[i]
    _assert_state_equal(plain_state, ib_state)
