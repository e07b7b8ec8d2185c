"""The optimizer step fused into the backward pass (``model.init_args.optimizer_in_backward: true``).

A plain step keeps every gradient alive until ``optimizer.step()`` and then builds the optimizer's temporaries
(AdamW's foreach buffers: about one more copy of the trained parameters). Here each parameter is updated as soon as
autograd has finished accumulating its gradient (``register_post_accumulate_grad_hook``), and that gradient is freed
at once, so at most the gradients of the parameters being finished at that moment exist (in practice one), and the
optimizer's temporaries are one parameter's worth.

:class:`InBackwardOptimizer` is a ``torch.optim.Optimizer`` built from the run's optimizer factory and param groups:

* one inner optimizer per trained parameter, made by the same factory with that parameter's group settings, so any
  torch optimizer works (AdamW, SGD, ...) with the same numbers as the plain one: the update of one parameter by a
  per-parameter AdamW / SGD is the update the plain optimizer applies to it (exact on CPU, see the tests);
* ``step(closure)`` arms the hooks, runs the closure (Lightning's: forward, backward -- the updates happen here --
  and ``on_before_optimizer_step``), disarms them and returns the closure's result. Before each parameter's update
  the hook copies its group's current hyperparameters (``lr`` as an LR scheduler left it on the wrapper's
  ``param_groups``, ``weight_decay``, ...) into the inner optimizer;
* unarmed (a backward outside ``step``, e.g. a user's own), the hooks do nothing and gradients accumulate as usual;
  the next ``step`` folds them in: a parameter that also gets a gradient in the armed backward is updated once with
  the sum, one that does not is updated after the closure with what it holds -- what the plain optimizer would do;
* ``state_dict()`` / ``load_state_dict()`` give and take exactly the plain optimizer's format (state keyed by
  parameter index, the same ``param_groups``): the wrapper's ``state[p]`` is the inner optimizer's state dict object
  itself. A run may therefore switch the setting on resume, either way.

It needs every gradient of a step to arrive once, whole, on this process, and nothing that reads all gradients after
backward: so no gradient clipping, no gradient accumulation, one device only (DDP / FSDP reduce or shard gradients
after the hooks would fire) and no loss scaler (``16-mixed``). :func:`check_in_backward_trainer` refuses those.

A device-side finiteness flag of every gradient is recorded before its update (no host sync); the
:class:`~phi3_lightning.modules.guards.NonFiniteGuard` reads them once per step. It checks the loss before backward,
so a non-finite loss stops the run before any update as with the plain optimizer; a non-finite gradient of a finite
loss is found after this step's updates were applied (they happen during backward), and stops the run there, before
any checkpoint of it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

SETTING = "optimizer_in_backward"


class InBackwardOptimizer(Optimizer):
    """Steps each parameter inside backward, right after its gradient is complete, and frees that gradient.

    Args:
        factory: the run's optimizer factory (``params -> Optimizer``; LightningCLI's ``OptimizerCallable``).
        params: parameters or param groups, as the factory would take them.
    """

    def __init__(self, factory: Callable[[Any], Optimizer], params: Iterable[Any]) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        reference = factory(groups)  # the plain optimizer: its filled-in groups and defaults are ours
        if isinstance(reference, InBackwardOptimizer):
            raise TypeError("InBackwardOptimizer's factory must build a plain optimizer, not another wrapper")
        self.optimizer_class = type(reference)
        self._building = True
        super().__init__([dict(g) for g in reference.param_groups], dict(reference.defaults))
        self._building = False
        del reference
        self._factory = factory
        self._armed = False
        self._stepped: set[torch.Tensor] = set()  # params updated in the current armed step
        self._finite: dict[torch.Tensor, torch.Tensor] = {}  # param -> its gradient's finiteness (device bool)
        self._inner: dict[torch.Tensor, Optimizer] = {}
        # by index: load_state_dict replaces the group dicts, and a scheduler then writes into the new ones
        self._group_of: dict[torch.Tensor, int] = {}
        self._handles = []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p in self._inner:
                    raise ValueError("a parameter appears in two param groups; give each parameter once")
                inner = factory([{**_hyper(group), "params": [p]}])
                self._inner[p] = inner
                self._group_of[p] = index
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    # ------------------------------------------------------------------ the per-parameter update
    def _hook(self, p: torch.Tensor) -> None:
        if not self._armed:
            return  # outside step(): the gradient accumulates as usual; the next step() uses it
        if p in self._stepped:
            raise RuntimeError(
                f"a parameter of shape {tuple(p.shape)} received its gradient twice in one backward; "
                f"{SETTING} needs one gradient per parameter per step (reentrant activation checkpointing or a "
                "second backward inside the closure does this): set optimizer_in_backward false"
            )
        self._update(p)

    def _update(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        # on the device, no host sync; a norm (finite iff every element is, barring float32 overflow) needs no
        # gradient-sized temporary, unlike isfinite(grad).all()
        self._finite[p] = torch.isfinite(torch.linalg.vector_norm(grad, 2, dtype=torch.float32))
        inner = self._inner[p]
        inner.param_groups[0].update(_hyper(self.param_groups[self._group_of[p]]))  # lr etc. as the scheduler left them
        if p in self.state:
            inner.state[p] = self.state[p]
        inner.step()
        state = inner.state.get(p)
        if state:
            self.state[p] = state  # the same dict object: state_dict() sees the update
        else:  # an optimizer without state for it (SGD without momentum): none in either, as in the plain one
            inner.state.pop(p, None)
            self.state.pop(p, None)
        p.grad = None
        self._stepped.add(p)

    # ------------------------------------------------------------------ torch.optim.Optimizer API
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Arm the hooks, run ``closure`` (forward + backward: the updates happen in its backward), disarm, and
        update the parameters that hold a gradient the backward did not reach (accumulated before, unarmed)."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs the closure that runs forward and backward: the updates happen "
                "inside that backward, so a step without it has nothing to do. Call optimizer.step(closure), or use "
                f"the plain optimizer ({SETTING}: false) to step after a backward of your own"
            )
        self._stepped = set()
        self._finite = {}
        self._armed = True
        try:
            with torch.enable_grad():
                result = closure()
        finally:
            self._armed = False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p not in self._stepped:
                    self._update(p)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed by the updates; only gradients left from an unarmed backward can remain: dropped
        (set to None, whatever ``set_to_none`` says: a zero tensor would keep the memory this class saves)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        raise NotImplementedError(
            f"{type(self).__name__} cannot take a param group after it is built (each parameter needs its own inner "
            "optimizer and hook): pass every param group to the constructor, or set optimizer_in_backward false"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The plain optimizer's state dict (or this class's, the same format); re-links the inner optimizers to
        the loaded per-parameter state."""
        super().load_state_dict(state_dict)
        for p, inner in self._inner.items():
            inner.state.clear()
            if p in self.state:
                inner.state[p] = self.state[p]

    # ------------------------------------------------------------------ introspection
    def grad_finite_flags(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, 0-dim bool on its device: its gradient was finite) of every update of the last step."""
        return list(self._finite.items())

    def remove_hooks(self) -> None:
        """Detach from the parameters (their gradients then accumulate as if this optimizer did not exist)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __repr__(self) -> str:
        n = sum(len(g["params"]) for g in self.param_groups)
        inner = super().__repr__().replace(type(self).__name__, self.optimizer_class.__name__, 1)
        return f"{type(self).__name__}(stepping each of {n} parameters in backward with\n{inner})"


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def check_in_backward_trainer(trainer: Any, automatic_optimization: bool = True) -> None:
    """Refuse the settings under which stepping in backward would be wrong or silently different (ValueError)."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    fix = f"set model.init_args.{SETTING} false"
    if not automatic_optimization:
        raise ValueError(
            f"{SETTING}=true needs Lightning's automatic optimization (the update runs inside the closure's "
            f"backward); this module uses manual optimization: {fix}"
        )
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip:
        raise ValueError(
            f"{SETTING}=true cannot be combined with trainer.gradient_clip_val={clip}: clipping needs every gradient "
            f"at once, but each is applied and freed as soon as it is computed (Lightning would clip nothing); drop "
            f"--trainer.gradient_clip_val or {fix}"
        )
    acc = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    if acc > 1:
        raise ValueError(
            f"{SETTING}=true cannot be combined with trainer.accumulate_grad_batches={acc}: the gradients of the "
            f"micro-batches would have to stay alive until the last one; use a larger micro-batch, or {fix}"
        )
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and not isinstance(strategy, SingleDeviceStrategy):
        raise ValueError(
            f"{SETTING}=true runs on one device only, not with strategy {type(strategy).__name__}: DDP reduces and "
            f"FSDP / DeepSpeed shard the gradients after the per-parameter hooks would fire; use one device, or {fix}"
        )
    precision = str(getattr(trainer, "precision", ""))
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if precision.startswith("16-mixed") or scaler is not None:
        raise ValueError(
            f"{SETTING}=true cannot be combined with precision={precision}: its gradient scaler unscales and "
            f"skips steps after the whole backward; use bf16-mixed / bf16-true / 32-true, or {fix}"
        )
