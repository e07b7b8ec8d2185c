"""Always-on guards of a fit: no update from a non-finite loss, no non-finite checkpoint, and a checkpoint on
SIGTERM / Ctrl-C.

Both callbacks are installed by every Phi-3 LightningModule (``configure_callbacks``).

* :class:`NonFiniteGuard`: each optimizer step, after backward and before the update (Lightning 2.6 order inside
  ``optimizer.step(closure)``: closure = forward + backward -> ``on_before_optimizer_step`` -> gradient clipping ->
  the optimizer's update), checks on the device that the step's training loss, its gradients and the weights (as
  left by the previous update) are finite, then reads one boolean back: one host sync per optimizer step, and
  one extra all-reduce of that boolean with several processes. A failure raises :class:`NonFiniteError` naming the
  global step, the value and the likely causes, before the optimizer touches the weights. Every checkpoint save is
  checked too (``on_save_checkpoint`` raises), so a non-finite model is never written over a good file.
  With ``optimizer_in_backward`` (:mod:`.in_backward`) the updates happen during backward, before
  ``on_before_optimizer_step``: the loss is then checked in ``on_before_backward`` (a second host sync per step), so
  a non-finite loss still stops the run before any update; the gradients are freed by then, so their finiteness
  comes from the flags the optimizer recorded on the device before each update, and a non-finite gradient of a
  finite loss stops the run at its step *after* that step's update was applied (the weights in memory may then be
  non-finite; no checkpoint of them is written).
* :class:`PreemptionCheckpoint`: SIGTERM (Lightning stops at the end of the current batch and raises its
  ``SIGTERMException``) and SIGINT (handled the same way during training: the first Ctrl-C asks for a stop at the
  end of the batch, later ones are ignored while the checkpoint is written) save a resumable checkpoint at the
  run's ``last.ckpt`` (through the trainer's checkpoint IO: atomic under the CLI), print where it is and how to
  resume, and make the process exit with 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import itertools
import logging
import math
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..atomic import AtomicWriteError

CAUSES = (
    "Likely causes: a learning rate too high for this model ({lr} at this step: lower it or use warmup), float16 "
    "overflow ({precision}: use bf16-mixed / bf16-true on GPUs that support bfloat16, or 32-true), or a batch whose "
    "rows have no target token (every label -100, e.g. max_length too short or an empty answer)"
)


class NonFiniteError(ValueError):
    """A NaN / inf in the training loss, the gradients or the weights (the CLI prints it as ``error: ...``)."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """The process-local part of a DTensor / ShardedTensor (the tensor itself otherwise)."""
    if hasattr(t, "to_local"):
        return t.to_local()
    if hasattr(t, "local_tensor"):
        return t.local_tensor()
    return t


def _float_tensors(named: Any) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, t in named:
        if isinstance(t, torch.Tensor):
            t = _local(t)
            if t.is_floating_point() and t.numel() and t.device.type != "meta":
                out.append((name, t))
    return out


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(N,) float32 L2 norms, one per tensor (inf / nan iff the tensor holds one, barring float32 overflow)."""
    if not tensors:
        return torch.zeros(0)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    if len(by_device) == 1:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    out = torch.empty(len(tensors))
    for idx in by_device.values():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=torch.float32)
        out[idx] = torch.stack(norms).cpu()
    return out


def first_non_finite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first tensor holding a NaN / inf (slow path, only after a failed check)."""
    for name, t in named:
        if not bool(torch.isfinite(t).all()):
            return name
    return None


def _fmt(x: float) -> str:
    return repr(x) if not math.isfinite(x) else f"{x:.4g}"


def _settings(trainer: pl.Trainer) -> dict[str, str]:
    lr = "lr=?"
    opts = getattr(trainer, "optimizers", None) or []
    if opts and opts[0].param_groups:
        lr = f"lr={opts[0].param_groups[0].get('lr')}"
    return {"lr": lr, "precision": f"precision={trainer.precision}"}


def non_finite_tensor(trainer: pl.Trainer, state: dict[str, Any]) -> str | None:
    """Name of a floating tensor of ``state`` that holds NaN / inf on any process (None when all are finite)."""
    named = _float_tensors(state.items())
    bad = bool(named) and not bool(torch.isfinite(_norms([t for _, t in named])).all())
    if trainer.world_size > 1:
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
    if not bad:
        return None
    return first_non_finite(named) or "(a tensor on another process)"


def _ranks_where(trainer: pl.Trainer, flag: bool) -> list[int]:
    """The ranks of the processes where ``flag`` holds (several processes: one all-reduce, so every process must
    call it; used on failure paths only). One process: ``[]`` (nothing to name)."""
    if trainer.world_size <= 1:
        return []
    t = torch.zeros(trainer.world_size, dtype=torch.int32, device=trainer.strategy.root_device)
    t[trainer.global_rank] = int(flag)
    torch.distributed.all_reduce(t)
    return [int(r) for r in torch.nonzero(t).flatten().tolist()]


def _processes(ranks: list[int], world: int) -> str:
    return f"process rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} (of {world})"


def _grad_flags(optimizer: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The gradient finiteness flags an in-backward optimizer recorded this step (None for any other one)."""
    from .in_backward import InBackwardOptimizer

    optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the real one
    return optimizer.grad_finite_flags() if isinstance(optimizer, InBackwardOptimizer) else None


def _in_backward(trainer: pl.Trainer) -> bool:
    return any(_grad_flags(o) is not None for o in getattr(trainer, "optimizers", None) or [])


class NonFiniteGuard(Callback):
    """Stop fit at the first non-finite training loss, gradient or weight, before it reaches the weights; refuse to
    save a checkpoint whose model tensors are non-finite.

    Cost: per optimizer step one fused norm over the gradients and one over the trainable weights (memory-bound
    passes, small next to the optimizer's own), computed on the device, and one host sync to read the verdict.
    Under a loss scaler (``16-mixed``) non-finite gradients are the scaler's business (it skips those steps), so
    only the loss and the weights are checked.

    With ``optimizer_in_backward`` (updates inside backward): the loss is checked before backward (a second host
    sync), so a non-finite loss still stops the run before any update; gradients are checked through the flags the
    optimizer recorded before each update, so a non-finite gradient of a finite loss stops the run at its step but
    *after* that step's update (then no longer "before it reaches the weights"; still never checkpointed); the
    weights checked are those after this step's update.
    """

    def __init__(self) -> None:
        super().__init__()
        self._losses: list[torch.Tensor] = []

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer, pl_module) -> None:
        self._losses = []

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if _in_backward(trainer):
            # the updates run inside this backward: check the loss now (a host sync), before any update
            value = loss.detach().float().reshape(())
            if not bool(torch.isfinite(value)):
                raise NonFiniteError(
                    f"the training loss is {_fmt(float(value))} at global step {trainer.global_step} (epoch "
                    f"{trainer.current_epoch}); the run stopped before backward, so no update of this step was "
                    f"applied (optimizer_in_backward) and the weights are still finite; nothing of this step is "
                    f"saved. {CAUSES.format(**_settings(trainer))}"
                )
            return
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses, self._losses = [loss.float().reshape(()) for loss in self._losses], []
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads = [] if scaler is not None else [_local(p.grad) for p in params if p.grad is not None]
        weights = [_local(p.detach()) for p in params]
        flags = []
        grad_flags = _grad_flags(optimizer)
        if grad_flags is not None:  # optimizer_in_backward: updated and freed already; the flags it recorded
            grads = []
            if grad_flags:
                flags.append(torch.stack([f.to(grad_flags[0][1].device) for _, f in grad_flags]).all())
        if losses:
            flags.append(torch.isfinite(torch.stack(losses)).all())
        if grads or weights:
            flags.append(torch.isfinite(_norms(grads + weights)).all())
        ok = bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True  # the one host sync
        bad = not ok
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            loss_ranks = _ranks_where(trainer, bool(losses) and not bool(torch.isfinite(torch.stack(losses)).all()))
            if grad_flags and not all(bool(f) for _, f in grad_flags):
                raise NonFiniteError(self._diagnose_in_backward(trainer, pl_module, grad_flags))
            raise NonFiniteError(
                self._diagnose(
                    trainer, pl_module, optimizer, losses, scaler is None, grad_flags is not None, loss_ranks
                )
            )

    def _diagnose_in_backward(self, trainer, pl_module, grad_flags) -> str:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        bad = next((names.get(id(p), "?") for p, f in grad_flags if not bool(f)), "?")
        return (
            f"the gradient norm is non-finite at global step {trainer.global_step} (epoch {trainer.current_epoch}; "
            f"first non-finite gradient: {bad}) although the loss was finite. With optimizer_in_backward the "
            "parameters are updated during backward, so this step's update was already applied when it was found: "
            "the weights in memory may be non-finite; the run stopped and nothing of this step is saved (the last "
            f"checkpoint is the good one). {CAUSES.format(**_settings(trainer))}"
        )

    def _diagnose(
        self,
        trainer,
        pl_module,
        optimizer,
        losses: list[torch.Tensor],
        check_grads: bool,
        in_backward: bool = False,
        loss_ranks: list[int] | None = None,
    ) -> str:
        step = trainer.global_step
        where = f"global step {step} (epoch {trainer.current_epoch})"
        names = {id(p): n for n, p in pl_module.named_parameters()}
        params = [(names.get(id(p), "?"), p) for group in optimizer.param_groups for p in group["params"]]
        causes = CAUSES.format(**_settings(trainer))
        weight = first_non_finite([(n, _local(p.detach())) for n, p in params])
        if weight is not None:
            if in_backward:  # this step's update ran in its backward, before this check
                when = f"the optimizer update of global step {step} (applied during backward: optimizer_in_backward)"
            else:
                when = f"the optimizer update of global step {step - 1}" if step > 0 else "before the first update"
            return (
                f"the model weights became non-finite in {when} (first: {weight}) although that step's loss and "
                f"gradients were finite; stopped at {where}; no checkpoint of them is written. Likely causes: float16 "
                f"weights and optimizer state (precision={trainer.precision}: AdamW's eps=1e-8 is 0 in float16 and "
                "its second moment underflows) -> use bf16-mixed / bf16-true on GPUs that support bfloat16, or "
                f"32-true; or a learning rate so high that the update overflowed ({_settings(trainer)['lr']})"
            )
        units = pl_module.__dict__.get("_last_step_units")  # the step's counted units, all processes (token-exact)
        if units is not None and float(units) == 0:
            return (
                f"the optimizer step at {where} has no target on any process: every row of its micro-batches has "
                "no counted unit (every label -100, e.g. max_length too short, an empty answer, or rows of one "
                "token), so its mean loss is 0/0; the run stopped before the optimizer update, so the weights are "
                "still finite; nothing of this step is saved. Check the data (max_length, the labels) or raise the "
                "batch size"
            )
        values = [float(v) for v in losses]
        bad_values = [v for v in values if not math.isfinite(v)]
        acc = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
        on = f" on {_processes(loss_ranks, trainer.world_size)}" if loss_ranks else ""
        if bad_values:
            return (
                f"the training loss is {_fmt(bad_values[0] * acc)} at {where}{on}; the run stopped before the "
                f"optimizer applied this step, so the weights are still finite; nothing of this step is saved. "
                f"{causes}"
            )
        if loss_ranks:  # finite here, non-finite there: the averaged gradients carry it to every process
            return (
                f"the training loss is non-finite at {where}{on} (this process's loss was {_fmt(sum(values) * acc)}; "
                "its gradients are non-finite because the processes average their gradients); the run stopped "
                f"before the optimizer applied this step, so the weights are still finite; nothing of this step is "
                f"saved. {causes}"
            )
        if check_grads:
            grad = first_non_finite([(n, _local(p.grad)) for n, p in params if p.grad is not None])
            if grad is not None:
                loss = _fmt(sum(values) * acc)
                return (
                    f"the gradient norm is non-finite at {where} (first non-finite gradient: {grad}; the loss was "
                    f"{loss}); the run stopped before gradient clipping and the optimizer update, so the weights are "
                    f"still finite; nothing of this step is saved. {causes}"
                )
        return (
            f"a non-finite training loss or gradient was found on another process at {where}; the run stopped before "
            f"the optimizer update. {causes}"
        )

    def on_train_end(self, trainer, pl_module) -> None:
        """The last update is not followed by a step check: check the weights it left, once."""
        name = non_finite_tensor(trainer, dict(pl_module.named_parameters()))
        if name is not None:
            raise NonFiniteError(
                f"the model weights are non-finite after the last optimizer update (global step "
                f"{trainer.global_step}, first: {name}); no checkpoint of them is written. "
                f"{CAUSES.format(**_settings(trainer))}"
            )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        name = non_finite_tensor(trainer, checkpoint.get("state_dict") or {})
        if name is not None:
            raise NonFiniteError(
                f"refusing to write a checkpoint at global step {trainer.global_step}: model tensor {name} holds "
                "NaN/inf, and a non-finite checkpoint must never replace a good one (the checkpoint files already "
                f"written are left as they were). {CAUSES.format(**_settings(trainer))}"
            )


def _default_store() -> Any:
    """The key-value store of the default process group (the run's rendezvous store, which every process reaches),
    or None (no process group, or a torch without it)."""
    try:
        from torch.distributed import distributed_c10d

        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return None
        return distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - a torch without it: the stop is agreed at the end of the run instead
        return None


class _StopRelay:
    """Several processes: tells every process that one of them received a stop signal, out of band (through the
    process group's key-value store, polled by a background thread every ``interval`` seconds), so that a signal
    that reaches one process of a validate / test / predict / sanity check is known to all of them within a
    fraction of a second, at no cost to a batch (no collective, no device sync, no store call on the main thread
    until a stop is known).

    Where the processes then stop is agreed through the store as well (:meth:`stop_here`), the same batch on every
    process whose batches contain collectives (a sharded model), so that no process waits in a collective for one
    that has left."""

    def __init__(self, store: Any, prefix: str, rank: int, world: int, interval: float = 0.1) -> None:
        self.prefix, self.rank, self.world, self.interval = prefix, rank, world, interval
        self.store = store  # the main thread's (the failure path only)
        self._thread_store = store.clone() if hasattr(store, "clone") else store  # a store object per thread
        self.local: int | None = None  # the signal this process received (set by the signal handler)
        self.known: int | None = None  # a signal some process received (this one included), once published / seen
        self._announced: int | None = None
        self._stop_at: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="phi3-stop-relay", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        key = f"{self.prefix}/signal"
        while not self._done.wait(self.interval):
            if self._thread_store is None:
                return
            try:
                if self.local is not None:
                    first = self._thread_store.compare_set(key, "", str(self.local))  # the first signal counts
                    self.known = int(first) if first else self.local
                    return
                if self._thread_store.check([key]):
                    self.known = int(self._thread_store.get(key))
                    return
            except Exception:  # the store is gone (its host process ended): the stop comes from the collectives
                return

    def close(self) -> None:
        """Stop the thread and wait for it (at most its current store call), then drop its store here, on the main
        thread, while the process group still exists: a thread left polling into interpreter shutdown aborted the
        process ("terminate called without an active exception", exit -6) after a complete run."""
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread_store = None

    def stop_here(self, batch: int) -> bool:
        """At the end of batch number ``batch`` (1-based, counted over the run) once a stop is known: whether every
        process stops at this batch. Each process announces the batch where it learned of the stop; they all stop at
        the batch after the last announced one (a process in step with the others through its batches' collectives
        cannot be past it when it learns it); a process already past it (no collective holds the processes in step)
        stops at once."""
        if self.known is None:
            return False
        if self._announced is None:
            self.store.set(f"{self.prefix}/at/{self.rank}", str(batch))
            self._announced = batch
        if self._stop_at is None:
            keys = [f"{self.prefix}/at/{r}" for r in range(self.world)]
            if not self.store.check(keys):
                return False
            self._stop_at = max(int(self.store.get(k)) for k in keys) + 1
        return batch >= self._stop_at


class PreemptionCheckpoint(Callback):
    """On SIGTERM or SIGINT during fit: save a resumable checkpoint at the run's ``last.ckpt``, say how to resume,
    and exit with 128 + the signal number.

    Lightning turns its stop flag into a stop at the end of the current training (or validation) batch by raising
    ``SIGTERMException`` (a ``SystemExit`` whose code is None: exit status 0). During training this callback owns
    the SIGTERM and SIGINT handlers: a signal only records a request, and the stop flag is set from it at the end of
    a training batch (or a validation run), so that the stop lands between two optimizer steps: a request that
    comes inside a gradient-accumulation window waits for the window's last batch. With several processes the
    request is agreed on first (one all-reduce of it per training batch, in place of Lightning's own per-batch
    broadcast of rank 0's flag, so no sync is added; and one per validation run), so that every process stops at
    the same batch however many of them got the signal: a cluster may signal one task, ``kill`` reaches one pid, a
    terminal's Ctrl-C the whole group. (Lightning's own handler broadcast from inside the signal handler and each
    process stopped on its own flag: a 2-process run hung.) With several processes a signal that comes during a
    validation run stops at that run's end (one process alone stops at the end of the validation batch).
    The checkpoint is saved in ``on_exception`` (by every process) and the exception gets its exit code; it goes
    through the trainer's checkpoint IO (the CLI's is atomic: temp file + rename), so a further signal during the
    write cannot leave a half file; further Ctrl-C are ignored while stopping. Nothing is saved when no step was
    trained (``global_step`` 0) or when the weights are non-finite (:class:`NonFiniteGuard` refuses).

    Several processes, from the ``setup`` of every command (fit, validate, test, predict) to its end: this callback
    owns SIGTERM and SIGINT (Lightning's SIGTERM notifier, which broadcast from inside the signal handler, is
    replaced by a no-op), and a :class:`_StopRelay` tells every process of a signal that reached one. A validate /
    test / predict run, and fit's sanity check, stop on every process at one agreed batch (an evaluation has no
    per-batch collective of Lightning's to agree with, so the relay does it out of band, without a sync per batch),
    or at the end of its batches (one all-reduce per evaluation run); an interrupted evaluation has nothing to save
    (its metrics are not logged, its predictions not written) and exits with 128 + the signal number. A signal
    between the end of training and the end of fit (the final checkpoint, the last hooks) lets the run finish, then
    every process exits with 128 + the signal number (one all-reduce at the end of fit); the run is complete.
    """

    def __init__(self) -> None:
        super().__init__()
        self.signal: int | None = None  # the stop signal, once every process knows of it
        self._requested: int | None = None  # the signal this process received
        self._previous: dict[int, Any] = {}
        self._installed = False
        self._max_steps_saved: int | None = None
        self._deferred = False  # a stop held back until the end of the accumulation window
        self._quieted_loop: Any = None  # the epoch loop whose own sigterm broadcast is replaced by the agreement
        self._quieted_connector: Any = None  # the signal connector whose notifier is replaced (several processes)
        self._relay: _StopRelay | None = None
        self._eval_batches = 0  # evaluation batches of this command (fit: of its sanity check), for the agreement
        self._eval_stopped = False  # this process stopped an evaluation at an agreed batch
        self._training = False  # between on_train_start and on_train_end
        self._trained = False  # on_train_end was reached

    # ------------------------------------------------------------------ signals
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Several processes: own SIGTERM / SIGINT from here on (before Lightning registers its SIGTERM handler, whose
        notifier is made a no-op: it broadcast from inside the handler) and start the stop relay."""
        self.signal = self._requested = None
        self._eval_batches, self._eval_stopped, self._training, self._trained = 0, False, False, False
        connector = _connector(trainer)
        if trainer.world_size <= 1 or connector is None:
            return
        connector._sigterm_notifier_fn = _quiet_notifier  # (an instance attribute; removed again in _restore)
        self._quieted_connector = connector
        store = _default_store()
        if store is not None:
            prefix = f"phi3_lightning/stop/{next(_RUN_NUMBERS)}"  # every process counts its commands alike
            self._relay = _StopRelay(store, prefix, trainer.global_rank, trainer.world_size)
        self._install(trainer)

    def _install(self, trainer: pl.Trainer) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        handler = self._on_signal(trainer)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)
        self._installed = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._training = True
        self._deferred = False
        connector = _connector(trainer)
        if connector is None:  # pragma: no cover - a Lightning without the signal connector: its own handling
            return
        if trainer.world_size <= 1:
            self.signal = self._requested = None
            if connector.received_sigterm:  # a SIGTERM before training (Lightning's handler): stops at the 1st batch
                self._requested = signal.SIGTERM
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if trainer.world_size > 1 and hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = _no_broadcast  # (an instance attribute; removed again in _restore)
            self._quieted_loop = loop
        self._install(trainer)

    def _on_signal(self, trainer: pl.Trainer):
        def handler(signum, frame) -> None:
            if self._requested is not None or self.signal is not None:
                if signum == signal.SIGINT:
                    _say(trainer, "still stopping (the checkpoint is being written; it is atomic): please wait")
                return
            self._requested = signum
            if self._relay is not None:
                self._relay.local = signum  # published to the other processes by the relay's thread
            fn = _command(trainer)
            if fn != "fit":
                then = f"an interrupted {fn} has nothing to save"
            elif self._trained:
                then = "training has ended: the run finishes its last checkpoint first"
            else:
                then = "saving a resumable checkpoint ..."
            if signum == signal.SIGINT:
                _say(trainer, f"Ctrl-C: stopping at the end of this batch ({then})")
            else:
                self._chain(signum, frame)
            if trainer.world_size == 1 and not _inside_accumulation_window(trainer):
                # one process: Lightning's flag at once (it stops a validation run at its batch too); inside an
                # accumulation window the stop is left to the window's last batch (``_decide``)
                _connector(trainer).received_sigterm = True

        return handler

    def _chain(self, signum: int, frame: Any) -> None:
        """The SIGTERM handlers that were there before this one, except Lightning's stop notifier (a user's or the
        SLURM environment's own)."""
        previous = self._previous.get(signum)
        for h in getattr(previous, "signal_handlers", [previous]):
            if callable(h) and getattr(h, "__name__", "") != "_sigterm_notifier_fn":
                h(signum, frame)

    def _agree(self, trainer: pl.Trainer) -> None:
        """Sets :attr:`signal` on every process once any process received a stop signal (several processes: one
        all-reduce of the request; the same call on every process, so each reaches the same verdict)."""
        if self.signal is not None:
            return
        requested = self._requested or 0
        if trainer.world_size > 1:
            requested = _max_over_processes(trainer, requested)
        if not requested:
            return
        self.signal = requested
        if self._requested is None:
            _say(
                trainer,
                f"{signal.Signals(requested).name} received by another process: every process stops at the end "
                "of this batch and saves a resumable checkpoint ...",
            )

    def _decide(self, trainer: pl.Trainer) -> None:
        """Lightning's stop flag (it raises its stop when set at the end of a batch): set when a stop was agreed on,
        held back while inside a gradient-accumulation window."""
        connector = _connector(trainer)
        stop = self.signal is not None
        if stop and _inside_accumulation_window(trainer):
            if not self._deferred:
                n = trainer.accumulate_grad_batches
                _say(
                    trainer,
                    f"stop requested inside a gradient-accumulation window (accumulate_grad_batches={n}): "
                    "stopping after the window's last batch, at the next optimizer step",
                )
            self._deferred = True
            stop = False
        connector.received_sigterm = stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """A stop asked for inside a gradient-accumulation window waits for the window's last micro-batch: the
        gradients accumulated so far live only in memory, so a checkpoint written now would resume with the rest
        of the window alone (a step missing part of its batches, silently). Lightning raises its stop at the end of
        every batch whose stop flag is set: the flag is set at the batch that steps."""
        if _connector(trainer) is None:  # pragma: no cover - a Lightning without the signal connector
            return
        self._agree(trainer)
        self._decide(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        """After a validation run of fit (Lightning checks its stop flag next): several processes agree on a signal
        that came during the run; the stop waits for the end of an accumulation window the run sits in."""
        if trainer.sanity_checking or getattr(trainer.state, "fn", None) != "fit" or _connector(trainer) is None:
            return
        self._agree(trainer)
        self._decide(trainer)

    # ------------------------------------------------------------------ evaluation (several processes)
    @staticmethod
    def _evaluating(trainer: pl.Trainer) -> bool:
        """A validate / test / predict run, or fit's sanity check (fit's own validation runs stop at their end)."""
        return trainer.world_size > 1 and (trainer.sanity_checking or getattr(trainer.state, "fn", None) != "fit")

    def _evaluation_batch_end(self, trainer: pl.Trainer) -> None:
        if not self._evaluating(trainer):
            return
        self._eval_batches += 1
        relay = self._relay
        if relay is None or relay.known is None:  # the happy path: an attribute read
            return
        if relay.stop_here(self._eval_batches):
            self.signal = relay.known
            self._eval_stopped = True
            raise SIGTERMException(128 + int(self.signal))

    def _agree_at_evaluation_end(self, trainer: pl.Trainer) -> None:
        """The end of an evaluation run's batches (before its metrics are synced, or its predictions written): one
        all-reduce of any stop request, on every process; a process that stopped at an agreed batch makes the same
        all-reduce in ``on_exception`` (no process of a run without per-batch collectives waits for one that left)."""
        if not self._evaluating(trainer):
            return
        signum = self._all_requests(trainer)
        if signum:
            self.signal = signum
            raise SIGTERMException(128 + signum)

    def _all_requests(self, trainer: pl.Trainer) -> int:
        """The stop signal any process received (0: none); one all-reduce, so every process calls it."""
        mine = self._requested or (self._relay.known if self._relay is not None else None) or 0
        return _max_over_processes(trainer, int(mine))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch_end(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch_end(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch_end(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._agree_at_evaluation_end(trainer)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._agree_at_evaluation_end(trainer)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._agree_at_evaluation_end(trainer)

    def _restore(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            connector = self._quieted_connector
            originals = getattr(connector, "_original_handlers", None)
            for signum, previous in self._previous.items():
                default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
                signal.signal(signum, previous if previous is not None else default)
                if isinstance(originals, dict) and signum in originals:
                    originals[signum] = previous  # Lightning's teardown puts these back: not this callback's
        self._installed = False
        self._previous = {}
        if self._quieted_loop is not None:
            self._quieted_loop.__dict__.pop("_broadcast_sigterm_tensor", None)
            self._quieted_loop = None
        if self._quieted_connector is not None:
            self._quieted_connector.__dict__.pop("_sigterm_notifier_fn", None)
            self._quieted_connector = None
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    def save_at_max_steps(self, trainer: pl.Trainer, after_validation: bool = False) -> None:
        """Save ``last.ckpt`` at the step that reaches ``max_steps`` while its epoch is still open.

        Lightning closes the epoch when ``max_steps`` ends fit in the middle of one (the epoch counter moves on,
        ``on_train_epoch_end`` runs, the metrics are reset), so a checkpoint written after that (in
        ``on_train_end``) makes a run continued from it with a higher ``max_steps`` start the next epoch: the rest of
        the epoch untrained and the first batches of the next one skipped. (Lightning's ModelCheckpoint writes
        ``last`` only at a step where it wrote a top-k checkpoint, so at the final step it often writes nothing.)

        Called from the LightningModule's ``on_train_batch_end`` and ``on_validation_end``, i.e. after every
        callback's (a ModelCheckpoint's own save at this step is not pre-empted): at the batch when no validation
        follows it, else after that validation, when no ModelCheckpoint wrote ``last`` at this step. The file holds
        the state of a ModelCheckpoint save at that point, from which Lightning continues with the next batch of the
        same epoch. The ModelCheckpoint callbacks writing that ``last`` count it as their save of this step, so none
        overwrites it with its state at the epoch's end; one that would save its top-k checkpoint only at the
        training epoch's end (``save_on_train_epoch_end``: no validation, or once per epoch) saves it here (at the
        batch, or after the validation), scored with the values the epoch's end would give it (``train/*_epoch``
        over the epoch's batches so far, as plain Lightning scores the partial epoch it closes).

        Every rank saves (the DataModule's state gathers across ranks)."""
        step = trainer.global_step
        if trainer.max_steps is None or trainer.max_steps < 0 or step < trainer.max_steps or step == 0:
            return
        if self._max_steps_saved == step or trainer.sanity_checking or getattr(trainer.state, "fn", None) != "fit":
            return
        if not after_validation and _validation_follows(trainer):
            return  # saved after it (``after_validation``), when no ModelCheckpoint did
        savers = [cb for cb in _last_savers(trainer) if getattr(cb, "_last_global_step_saved", -1) < step]
        self._max_steps_saved = step
        # their save at the epoch's end is skipped once this step is saved: make its top-k save here (at the batch
        # too: with no validation following, e.g. none at all or once per epoch, it was lost)
        for cb in savers:
            _save_top_k_now(trainer, cb)
        for path in dict.fromkeys(_last_path_of(trainer, cb) for cb in savers):
            save_last_checkpoint(trainer, path)

    def on_train_end(self, trainer, pl_module) -> None:
        """Fit ended normally: the steps after the last ModelCheckpoint save go into ``last.ckpt`` too (when
        :meth:`save_at_max_steps` did not save them), so that the run's last checkpoint is its final state. Every rank
        saves (the DataModule state gathers across ranks); a non-finite model is refused by :class:`NonFiniteGuard`.
        Several processes: the signal handlers stay until ``teardown`` (a signal now lets the run finish)."""
        self._training, self._trained = False, True
        if trainer.world_size <= 1:
            self._restore()
        step = trainer.global_step
        if self._max_steps_saved == step:
            return
        for cb in _last_savers(trainer):
            if step > 0 and getattr(cb, "_last_global_step_saved", -1) < step:
                save_last_checkpoint(trainer, _last_path_of(trainer, cb))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """The end of a command that was not stopped. Several processes, fit: one all-reduce of a stop signal that
        came after training ended (the run is complete; every process exits with 128 + the signal number)."""
        signum = 0
        if stage == "fit" and self._trained and trainer.world_size > 1 and self._installed:
            signum = self._all_requests(trainer)
        self._restore()
        if signum:
            self.signal = signum
            raise SIGTERMException(128 + signum)

    # ------------------------------------------------------------------ the stop
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # Ctrl-C before training began (setup, model build, sanity)
            self._restore()
            if getattr(trainer.state, "fn", None) == "fit":  # validate / test / predict have no training to speak of
                _say(trainer, "interrupted before training started: nothing was saved and nothing is lost")
            return
        if not isinstance(exception, SIGTERMException):
            self._restore()
            return
        try:
            if self._eval_stopped:  # the processes still at the end of their batches agree there: meet them
                self._eval_stopped = False
                self.signal = self._all_requests(trainer) or self.signal
            signum = self.signal or self._requested or signal.SIGTERM
            name = signal.Signals(signum).name
            if not exception.code:
                exception.code = 128 + int(signum)  # 143 (SIGTERM) / 130 (SIGINT): non-zero, so schedulers requeue
            fn = _command(trainer)
            if fn != "fit":
                every = " on every process" if trainer.world_size > 1 else ""
                lost = "no predictions are written" if fn == "predict" else "its metrics are not logged"
                _say(
                    trainer,
                    f"{name}: {fn} stopped{every}; an interrupted {fn} has nothing to save ({lost}): run it again for "
                    "its results",
                )
                return
            if self._trained:
                _say(
                    trainer,
                    f"{name} after training ended: the run is complete (global step {trainer.global_step}) and its "
                    "last checkpoint holds its final state; nothing more to save",
                )
                return
            if not self._training and trainer.global_step > 0:  # fit's sanity check, before its first batch
                _say(
                    trainer,
                    f"{name} before training started: nothing was trained by this run, so nothing was saved and "
                    "nothing is lost (the checkpoint it resumed from is as it was)",
                )
                return
            self._save(trainer, name)
        finally:
            self._restore()

    def _save(self, trainer: pl.Trainer, name: str) -> None:
        step = trainer.global_step
        if step == 0:
            _say(
                trainer,
                f"{name} before the first optimizer step: nothing was trained, so nothing was saved and "
                "nothing is lost",
            )
            return
        path = last_checkpoint_path(trainer)
        if self._installed:  # a further Ctrl-C must not interrupt the write
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            save_last_checkpoint(trainer, path)  # the full state (optimizer, loops, data position)
        except NonFiniteError as e:
            _say(trainer, f"{name} at global step {step}: no checkpoint saved, the weights are not finite ({e})")
            return
        except AtomicWriteError as e:  # a full disk, a read-only directory: the older checkpoints are intact
            _say(
                trainer,
                f"{name} at global step {step}: could not save a checkpoint: {e}. The steps since the run's previous "
                f"checkpoint are lost; once it can write again, continue from that one with: "
                f"{resume_command(path, _logger_version(trainer))}",
            )
            return
        _say(
            trainer,
            f"{name} at global step {step}: saved a resumable checkpoint to {path}\n"
            f"resume with: {resume_command(path, _logger_version(trainer))}",
        )


def _max_over_processes(trainer: pl.Trainer, value: int) -> int:
    """The largest of every process's ``value`` (a signal number, 0 for none): one all-reduce, so every process
    calls it at the same point."""
    flag = torch.tensor([value], dtype=torch.int32, device=trainer.strategy.root_device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def _connector(trainer: pl.Trainer) -> Any:
    """Lightning's signal connector (its ``received_sigterm`` is the stop flag its loops read); None if absent."""
    connector = getattr(trainer, "_signal_connector", None)
    return connector if connector is not None and hasattr(connector, "received_sigterm") else None


_RUN_NUMBERS = itertools.count()  # the commands of this process, for the stop relay's keys


def _quiet_notifier(signum: Any, frame: Any) -> None:
    """Replaces Lightning's SIGTERM notifier while :class:`PreemptionCheckpoint` owns the signal (several processes):
    it broadcast from inside the signal handler (one process alone: a collective no other process joined)."""


def _no_broadcast() -> None:
    """Replaces Lightning's per-batch broadcast of rank 0's stop flag while :class:`PreemptionCheckpoint` agrees on
    the stop (its all-reduce at the batch's end takes that broadcast's place)."""


def _command(trainer: pl.Trainer) -> str:
    """``fit`` / ``validate`` / ``test`` / ``predict`` (the trainer's function)."""
    fn = getattr(trainer.state, "fn", None)
    return str(getattr(fn, "value", fn) or "the run")


def _say(trainer: pl.Trainer, text: str) -> None:
    if trainer.is_global_zero:
        print(text, file=sys.stderr, flush=True)


_CONNECTOR_LOG = "lightning.pytorch.trainer.connectors.checkpoint_connector"


def _inside_accumulation_window(trainer: pl.Trainer) -> bool:
    """Whether the training batch just run accumulates its gradients for a later batch's optimizer step (Lightning's
    own rule, asked at the batch's end). Unknown (another Lightning): False."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    check = getattr(loop, "_should_accumulate", None)
    if check is None or getattr(trainer, "accumulate_grad_batches", 1) <= 1:
        return False
    try:
        return bool(check())
    except Exception:  # pragma: no cover - a Lightning whose rule needs something else
        return False


def _validation_follows(trainer: pl.Trainer) -> bool:
    """Whether the training epoch loop runs validation after the current batch (its own rule; asked from
    ``on_train_batch_end``, before it decides). Unknown (another Lightning): True, i.e. leave the save to after it."""
    fit_loop = getattr(trainer, "fit_loop", None)
    loop = getattr(fit_loop, "epoch_loop", None)
    check = getattr(loop, "_should_check_val_fx", None)
    if check is None:
        return True
    try:
        return bool(check(fit_loop._data_fetcher))
    except Exception:  # pragma: no cover - a Lightning whose rule needs something else
        return True


def _save_top_k_now(trainer: pl.Trainer, cb: Any) -> None:
    """The top-k save that a ModelCheckpoint saving at the training epoch's end would make there, made now (after the
    validation at the final step), with the same rule as its save after validation."""
    should = getattr(cb, "_should_save_on_train_epoch_end", None)
    if should is None or not should(trainer) or not hasattr(cb, "_save_topk_checkpoint"):
        return
    every = getattr(cb, "_every_n_epochs", 0)
    if every < 1 or (trainer.current_epoch + 1) % every != 0:
        return
    candidates = cb._monitor_candidates(trainer)
    # the training metrics as the epoch's end hands them to callbacks (``train/x`` and ``train/x_epoch`` over the
    # epoch's batches): without them a ``train/*_epoch`` monitor read the previous epoch's stale value, or none
    candidates.update(_train_epoch_metrics(trainer))
    if cb.monitor is not None and cb.monitor not in candidates:
        return  # a metric this epoch has not logged: the epoch's end would not have it either
    cb._save_topk_checkpoint(trainer, candidates)


def _train_epoch_metrics(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """The training epoch's ``on_epoch`` values that Lightning gives the callbacks when it closes the epoch, computed
    now from the epoch's results so far (every rank calls this: torchmetrics syncs across processes). Nothing is
    reset; the epoch's end reads the same values (cached until the next update). Empty for another Lightning."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    results = getattr(loop, "_results", None)
    if results is None or not hasattr(results, "metrics"):
        return {}
    return dict(results.metrics(on_step=False)["callback"])


def _last_savers(trainer: pl.Trainer) -> list[Any]:
    """The ModelCheckpoint callbacks with ``save_last``."""
    return [cb for cb in getattr(trainer, "checkpoint_callbacks", None) or [] if getattr(cb, "save_last", False)]


def _last_path_of(trainer: pl.Trainer, cb: Any) -> str:
    """Where ``cb`` writes its last checkpoint now: the file it recorded (``last_model_path``, as Lightning's version
    counter keeps overwriting it), else its formatted ``last`` name."""
    recorded = getattr(cb, "last_model_path", "") or ""
    if recorded and getattr(cb, "dirpath", None) and Path(recorded).parent == Path(cb.dirpath):
        return recorded
    name = getattr(cb, "CHECKPOINT_NAME_LAST", "last")
    return str(cb.format_checkpoint_name({"epoch": trainer.current_epoch, "step": trainer.global_step}, name))


def save_last_checkpoint(trainer: pl.Trainer, path: str) -> None:
    """``trainer.save_checkpoint(path)`` (the full state) that every ModelCheckpoint writing its ``last`` file there
    records: its ``last_model_path`` is set before the save (so the saved callback state names the file, and a run
    resumed from it overwrites that file instead of writing ``last-v1.ckpt`` next to it) and its last-saved step
    after (it then saves nothing more at this step). Lightning's INFO line about the unset ``weights_only`` of the
    save is silenced for this call."""
    owners = [cb for cb in _last_savers(trainer) if _last_path_of(trainer, cb) == str(path)]
    previous = [(cb, cb.last_model_path) for cb in owners]
    for cb in owners:
        cb.last_model_path = str(path)
    log = logging.getLogger(_CONNECTOR_LOG)
    level = log.level
    log.setLevel(max(logging.WARNING, level))
    _close_finished_epoch(trainer)
    try:
        trainer.save_checkpoint(path)
    except BaseException:
        for cb, old in previous:  # nothing was written: the callbacks keep what they had
            cb.last_model_path = old
        raise
    finally:
        log.setLevel(level)
    for cb in owners:
        cb._last_global_step_saved = trainer.global_step
        cb._last_checkpoint_saved = str(path)  # (ModelCheckpoint.on_train_end writes `last` when this is empty)


def _close_finished_epoch(trainer: pl.Trainer) -> None:
    """Between two epochs (the fit loop counted the last one as completed and has not started the next: a SIGTERM at
    an epoch's last batch, or fit ending at ``max_epochs``), reset the epoch loop's per-epoch batch counters as the
    next epoch's start would. Lightning resets them only then, and a checkpoint written before it makes the
    resumed run start the next epoch at batch index ``num_training_batches``: it trains one batch of that epoch and
    skips the rest of it (silently). A checkpoint written at ``on_train_epoch_end`` (epoch not yet counted) is
    left as it is; Lightning closes that epoch itself on resume."""
    fit_loop = getattr(trainer, "fit_loop", None)
    epochs = getattr(fit_loop, "epoch_progress", None)
    loop = getattr(fit_loop, "epoch_loop", None)
    if epochs is None or loop is None or not hasattr(loop, "batch_progress"):
        return
    if epochs.current.ready != epochs.current.completed or loop.batch_progress.current.ready == 0:
        return
    loop.batch_progress.reset_on_run()
    loop.scheduler_progress.reset_on_run()
    loop.automatic_optimization.optim_progress.reset_on_run()
    loop.val_loop.batch_progress.total.reset()


def last_checkpoint_path(trainer: pl.Trainer) -> str:
    """The ``last.ckpt`` of the run: the (first) ModelCheckpoint's last path, else ``<log_dir>/checkpoints``."""
    cb = trainer.checkpoint_callback
    if cb is not None and getattr(cb, "dirpath", None):
        return _last_path_of(trainer, cb)
    base = trainer.log_dir or trainer.default_root_dir
    return str(Path(base) / "checkpoints" / "last.ckpt")


def _logger_version(trainer: pl.Trainer) -> int | str | None:
    """The TensorBoard version of the run (what ``--run_version`` takes), if it has one."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.version
    return None


def resume_command(path: str, version: int | str | None = None) -> str:
    """This process's ``fit`` command line that resumes the run in place: ``--ckpt_path last --run_version N``
    when the run has a logger version (the CLI resolves ``last`` within that run), else ``--ckpt_path <path>``;
    any earlier ``--ckpt_path`` / ``--run_version`` is replaced."""
    tail = ["--ckpt_path", "last", "--run_version", str(version)] if version is not None else ["--ckpt_path", path]
    argv = sys.argv[1:]
    if not argv or argv[0] != "fit":
        return "python -m phi3_lightning fit <the same options> " + shlex.join(tail)
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--ckpt_path", "--run_version"):
            skip = True
            continue
        if arg.startswith(("--ckpt_path=", "--run_version=")):
            continue
        kept.append(arg)
    return shlex.join(["python", "-m", "phi3_lightning", *kept, *tail])
