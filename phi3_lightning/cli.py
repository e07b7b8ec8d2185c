"""Command line: ``python -m phi3_lightning <command> ...``.

* ``fit`` / ``validate`` / ``test`` / ``predict``: LightningCLI. ``--config`` is repeatable (a base YAML, then
  overlays: ``--config configs/causal_lm.yaml --config configs/strategies/ddp.yaml``), ``--print_config`` shows the
  merged result, ``--help`` every field with its help text. The data module's ``num_labels`` / ``label_names`` /
  ``problem_type`` are linked into the model when both are instantiated.
* ``generate`` (:mod:`phi3_lightning.commands.generate`): complete a prompt, or chat, with a Lightning checkpoint
  or a Hugging Face directory.
* ``export`` (:mod:`phi3_lightning.commands.export`): a Lightning checkpoint -> a Hugging Face directory.
* ``compare-attention``: dispatches to :func:`phi3_lightning.compare.main`; ``memory`` and ``data-report`` to
  :func:`phi3_lightning.memory.main` and :func:`phi3_lightning.data.report.main`.

Every parser refuses abbreviated options and suggests the closest one for a typo (:mod:`phi3_lightning.options`).
A run says where it writes (run name/version, log and checkpoint directories) when it starts and when it ends; fit
then also prints the command that continues it and the one that opens TensorBoard.

Runs (:mod:`phi3_lightning.commands.runs`). A run is ``<save_dir>/<run name>/version_N`` (TensorBoard events, ``config.yaml``, ``checkpoints/``). The run
name is ``--run_name NAME``, by default ``<config stems joined by +>/<attn backend>`` (``causal_lm/sdpa``), so
``tensorboard --logdir logs`` overlays runs that differ by config or backend. ``--run_version N`` picks a version.

* ``--ckpt_path last`` / ``best`` resolve within one run: the named run's only version that holds checkpoints, or
  the version given by ``--run_version`` (several candidates and none named: refused, listing them). ``last`` is
  ``checkpoints/last.ckpt``; ``best`` is the ModelCheckpoint's ``best_model_path`` recorded in ``last.ckpt`` (else
  the single ``best*.ckpt``). Nothing found: an error, never a run without the checkpoint that was asked for.
* ``fit --ckpt_path last`` continues that version in place; ``fit`` with ``best`` or a file starts a new version.
  ``fit`` into a version that already holds a run (checkpoints or events) is refused unless it continues it.
  While ``fit`` writes into a version directory it holds ``fit.lock`` (pid + host) there; another ``fit`` into a
  directory whose lock names a live process is refused, a lock of a dead process is taken over with a note.
* A command that fails before it logged a metric or wrote a checkpoint leaves no trace (``SetupTrace``): the
  version directory it created is removed (the next run takes its number); in a directory that existed,
  ``config.yaml`` / ``hparams.yaml`` are put back and its settings-only events files removed.
* ``validate`` / ``test`` / ``predict`` with a checkpoint of a run log into that run, under ``version_N/<command>/``
  (its own TensorBoard run, ``config.yaml`` and ``hparams.yaml``; the run's files are never touched); with a
  checkpoint outside any run, or none, they create a version as ``fit`` does.
* With ``--ckpt_path`` the command line must agree with the checkpoint on everything that shapes the model (model,
  config_overrides, lora, the head class and its options, the tokenizer, the data's labels) and, for ``fit``, on the
  optimizer and LR scheduler, whose state resumes from the checkpoint. A difference is refused naming the setting
  and both values. Execution choices (attn_implementation, activation_checkpointing, torch_compile, compile_mode,
  fused_kernels, optimizer_in_backward, meta_init, strict_head) are taken from the command line. The saved ``config.yaml`` is what ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .atomic import AtomicWriteError
from .commands import UsageError
from .commands.runs import (
    FSDP_ON_CPU,
    LOCK_FILE,
    RunLock,
    SetupTrace,
    _class_path,
    _import,
    _is_rank_zero,
    _version_dir_name,
    check_ckpt_labels,
    check_ckpt_settings,
    check_fit_version_is_free,
    check_fsdp_accelerator,
    claim_new_version,
    first_new_dir,
    name_run,
    normalize_ckpt_path,
    place_run_logs,
    read_checkpoint,
    resolve_ckpt_path,
)

TOP_HELP = """\
usage: python -m phi3_lightning <command> [options]

Train, fine-tune, evaluate and study Phi-3-family models (Phi-3, Phi-3.5, Phi-4-mini, phi-4).

commands:
  fit                train: --config configs/causal_lm.yaml [--config configs/strategies/<overlay>.yaml ...]
  validate           evaluate on the validation split (--ckpt_path <file>|last|best)
  test               evaluate on the test split
  predict            write predictions as jsonl, label names included (--predictions.path FILE)
  generate           complete a prompt or chat with a checkpoint (Lightning .ckpt or Hugging Face directory)
  export             write a Lightning checkpoint as a Hugging Face directory that transformers loads
  compare-attention  compare the attention backends (eager, sdpa, flash_attention_2, flex)
  memory             plan GPU memory of a fine-tune: weights, gradients, optimizer, activations; does it fit
  data-report        share of batch slots holding real tokens: padding vs length grouping vs packing

`python -m phi3_lightning <command> --help` lists every option of a command with its help text; with --config the
fit/validate/test/predict help adds the options of the model and data classes that the config names.
fit / validate / test / predict also take --print_config (show the merged configuration and exit; it holds the
resolved run name, so `fit --config printed.yaml` runs under the same name).
Runs log to TensorBoard under logs/<run name>/version_N (tensorboard --logdir logs); --run_name NAME names a run
(default <config stems>/<attn backend>), --run_version N picks a version. --ckpt_path last|best resolve within that
one run; validate/test/predict of a run's checkpoint log into version_N/<command>/ of that run.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# ----------------------------------------------------------------------------------------------------------------------
# LightningCLI
# ----------------------------------------------------------------------------------------------------------------------


def _cli_class():
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    # The data modules are loaded lazily by phi3_lightning.data; importing them here makes them known subclasses of
    # LightningDataModule, so `--data.help CausalLMDataModule` and `class_path: CausalLMDataModule` resolve.
    from .data import CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule  # noqa: F401
    from .modules import Phi3LightningModule, Phi3ThroughputMonitor, PredictionWriter
    from .modules.strategies import use_safe_checkpoint_io
    from .options import SuggestingParserMixin, enable_field_docstrings

    class Phi3ArgumentParser(SuggestingParserMixin, LightningArgumentParser):
        """No option prefixes, "did you mean" for unknown options, and, for ``--help`` with ``--config``, the
        options of the model and data classes that the config names."""

        help_argv: list[str] | None = None  # the command line, set before parsing (for --help with --config)
        print_subcommand: str | None = None  # set before parsing when --print_config is given: the subcommand

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("prog", "python -m phi3_lightning")  # also --model.help's parser (else __main__.py)
            super().__init__(*args, **kwargs)

        def dump(self, cfg: Any, *args: Any, **kwargs: Any) -> str:
            # --print_config prints the run's name as the run would resolve it (and save it in its config.yaml):
            # else the printed file, given back with --config, names the run after its own file stem
            if self.print_subcommand is not None and cfg is not None:
                cfg = cfg.clone()
                name_run(cfg, self.print_subcommand)
            return super().dump(cfg, *args, **kwargs)

        def format_help(self) -> str:
            text = super().format_help()
            if self.help_argv is not None:
                text += config_class_help(self.help_argv)
            return text

    _quiet_known_lightning_noise()
    enable_field_docstrings()  # field docstrings of dataclass settings (LoRAConfig, Phi3Config) become --help text

    class Phi3CLI(LightningCLI):
        """LightningCLI with the Phi-3 modules, data modules, callbacks, run naming and input checks."""

        def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
            self._argv = None if args is None else [str(a) for a in args]
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
            super().__init__(
                model_class=Phi3LightningModule,
                datamodule_class=LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                trainer_defaults={
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "logs", "name": "auto"},
                    }
                },
                auto_configure_optimizers=False,
                parser_class=Phi3ArgumentParser,
                parser_kwargs={
                    "prog": "python -m phi3_lightning",
                    "description": "Phi-3 with Lightning: one YAML to train, evaluate or predict.",
                },
                args=args,
                run=run,
                **kwargs,
            )

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--run_name",
                type=str | None,
                default=None,
                help="name of the run: it logs to <save_dir>/<run_name>/version_N (default: the config file stems "
                "joined by '+', then the attention backend: causal_lm/sdpa). --ckpt_path last|best resolve "
                "within this run only",
            )
            parser.add_argument(
                "--run_version",
                type=str | None,
                default=None,
                help="version of the run, N or version_N (the same as --trainer.logger.init_args.version): needed "
                "with --ckpt_path last|best when several versions of the run hold checkpoints",
            )
            parser.add_lightning_class_args(Phi3ThroughputMonitor, "throughput")
            parser.add_lightning_class_args(PredictionWriter, "predictions")
            # data.num_labels / data.label_names / data.problem_type -> the model, once the data module exists.
            # (The whole data module is the source, read with getattr: data modules without label facts, e.g.
            # causal LM, simply link nothing, and targets a module lacks are skipped.)
            for attr in ("num_labels", "label_names", "problem_type"):
                parser.link_arguments(
                    "data", f"model.init_args.{attr}", compute_fn=_DataFact(attr), apply_on="instantiate"
                )

        def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            group = parser.groups.get("data") if hasattr(parser, "groups") else None
            if group is not None:  # else LightningDataModule's docstring, cut off at "The main advantage is:"
                group.title = (
                    "Data: a LightningDataModule given by --data CLASS (CausalLMDataModule, "
                    "SequenceClassificationDataModule, TokenClassificationDataModule) or the config"
                )
            # Lightning's help for these two (its Trainer.fit/validate/... docstrings) promises registry downloads and
            # unpickling trusted files freely; say what this CLI does instead (_parse_ckpt_path)
            for action in parser._actions:
                if action.dest in _CKPT_OPTION_HELP:
                    action.help = _CKPT_OPTION_HELP[action.dest]
                # hidden from --help, still parsed: predictions.* are predict's (a YAML shared with fit may hold
                # them); trainer.model_registry is refused (_parse_ckpt_path)
                elif action.dest == "trainer.model_registry" or (
                    subcommand != "predict" and action.dest.split(".")[0] == "predictions"
                ):
                    action.help = argparse.SUPPRESS
            predictions = (getattr(parser, "groups", None) or {}).get("predictions")
            if subcommand != "predict" and predictions is not None:
                predictions.description = None  # (the group's heading goes with its last visible option)
            return parser

        def parse_arguments(self, parser, args) -> None:
            argv = list(sys.argv[1:] if args is None else args)
            if "-h" in argv or "--help" in argv:
                for sub in getattr(self, "_subcommand_parsers", {}).values():
                    sub.help_argv = argv
            if any(a == "--print_config" or a.startswith("--print_config=") for a in argv):
                for name, sub in getattr(self, "_subcommand_parsers", {}).items():
                    sub.print_subcommand = name
            super().parse_arguments(parser, args)

        def _parse_ckpt_path(self) -> None:
            """Replaces LightningCLI's, which ``torch.load``s the file (a traceback when it is truncated) and replaces
            the model's settings by the checkpoint's hyper-parameters (command-line settings silently dropped). Here:
            name the run, resolve last/best within it, read the file safely, refuse settings that disagree with the
            checkpoint, and point evaluation logging at the evaluated run."""
            self._ckpt_info = None
            self._purge_step: int | None = None
            subcommand = self.config.get("subcommand")
            if not subcommand:
                return
            cfg = self.config[subcommand]
            if cfg.get("weights_only") is False:
                raise UsageError(
                    "--weights_only false: phi3_lightning reads every checkpoint with torch.load(weights_only=True) "
                    "and never unpickles arbitrary objects (a checkpoint must not run code); drop --weights_only"
                )
            if cfg.trainer.get("model_registry") is not None:
                raise UsageError(
                    f"--trainer.model_registry {cfg.trainer.model_registry!r}: registry checkpoints are not read or "
                    "uploaded (phi3_lightning checks every checkpoint before use and reads local files only; a run's "
                    "checkpoints are in its log directory); drop it, and upload a checkpoint or an export yourself"
                )
            check_fsdp_accelerator(cfg.trainer)
            name_run(cfg, subcommand)
            ckpt_path = normalize_ckpt_path(cfg.get("ckpt_path"), cfg.trainer.get("default_root_dir"))
            if ckpt_path is None:
                if subcommand == "fit":
                    check_fit_version_is_free(cfg, None)
                return
            cfg.ckpt_path = ckpt_path
            path, run_dir = resolve_ckpt_path(cfg)
            cfg.ckpt_path = str(path)
            ckpt = read_checkpoint(path)
            check_ckpt_settings(cfg, ckpt, subcommand, path)
            self._ckpt_info = (path, ckpt.get("phi3_lightning") or {})
            if subcommand == "fit" and str(ckpt_path) == "last" and isinstance(ckpt.get("global_step"), int):
                self._purge_step = ckpt["global_step"]  # resumed in place: see _purge_events_past_the_checkpoint
            del ckpt
            place_run_logs(cfg, subcommand, str(ckpt_path), run_dir)
            if subcommand == "fit":
                check_fit_version_is_free(cfg, str(ckpt_path))

        def after_instantiate_classes(self) -> None:
            super().after_instantiate_classes()
            if self._ckpt_info is not None:
                check_ckpt_labels(self._ckpt_info[0], self._ckpt_info[1], getattr(self.model, "config", None))

        def _run_subcommand(self, subcommand: str) -> None:
            lock = trace = None
            report = _is_rank_zero() and bool(self.trainer.loggers)
            failed = True
            restore_sigterm = _stop_on_sigterm_while_starting(self.trainer) if subcommand == "fit" else None
            try:
                if subcommand == "fit" and getattr(self, "_purge_step", None) is not None:
                    _purge_events_past_the_checkpoint(self.trainer, self._purge_step)
                if report:
                    logger = self.trainer.loggers[0]
                    root = getattr(logger, "root_dir", None)
                    # run directories claim_new_version makes
                    above = first_new_dir(Path(root).expanduser()) if root else None
                    # (before log_dir is read: reading it picks the version without claiming it)
                    claimed = claim_new_version(logger) if subcommand == "fit" else None
                    log_dir = Path(self.trainer.log_dir or ".")
                    # what this command writes before it runs: undone if it fails before it ran
                    trace = SetupTrace(
                        log_dir,
                        _checkpoint_dirpaths(self.trainer),
                        new_dir=(above or claimed) if claimed is not None else None,
                    )
                    if subcommand == "fit":
                        lock = RunLock(log_dir, created=claimed is not None)
                        lock.acquire()
                    print(run_report(self.trainer, subcommand, "writes to"), file=sys.stderr, flush=True)
                super()._run_subcommand(subcommand)
                failed = False
            except AtomicWriteError as e:
                if subcommand != "fit" or not report:
                    raise
                argv = list(sys.argv[1:] if self._argv is None else self._argv)
                version = _version_dir_name(getattr(self.trainer.loggers[0], "version", None)) or "?"
                raise AtomicWriteError(
                    e.errno,
                    f"{e}. The run stopped at global step {self.trainer.global_step}; once it can write again, "
                    f"continue it from its last checkpoint with: {resume_command(argv, version)}",
                ) from e
            finally:
                undone = failed and trace is not None and _undo(trace, keep=(LOCK_FILE,) if lock is not None else ())
                if lock is not None:
                    lock.release()
                if restore_sigterm is not None:
                    restore_sigterm()
                if undone:
                    trace.remove_empty_dirs()
                    what = "removed" if trace.new_dir is not None else "restored config.yaml in"
                    print(
                        f"note: {what} {trace.log_dir}: {subcommand} stopped before it logged a metric or wrote a "
                        "checkpoint, so nothing of it is kept"
                        + (" (the next run takes this version)" if trace.new_dir is not None else ""),
                        file=sys.stderr,
                        flush=True,
                    )
            if report:
                argv = list(sys.argv[1:] if self._argv is None else self._argv)
                print(run_report(self.trainer, subcommand, "wrote to", argv), file=sys.stderr, flush=True)

        def instantiate_trainer(self, **kwargs: Any):
            # the callbacks the config names (Lightning's Trainer adds its default progress bar and summary to this
            # very list, so take the ids before)
            configured = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except ValueError as e:
                if "requires a GPU accelerator" in str(e) and "fsdp" in str(e).lower():
                    raise UsageError(FSDP_ON_CPU.format(accelerator="cpu")) from None
                raise
            use_safe_checkpoint_io(trainer)
            trainer.callbacks.append(_checkpoint_dir_follower())
            _replace_default_console_callbacks(trainer, configured)
            return trainer

    return Phi3CLI


_CKPT_OPTION_HELP = {
    "ckpt_path": "checkpoint to resume (fit) or to evaluate: a .ckpt file written by fit, an FSDP2 checkpoint "
    "directory, or 'last' or 'best' of this run (--run_name, --run_version); settings that the checkpoint fixes "
    "(model, LoRA, head, tokenizer, labels; for fit also optimizer and scheduler) must match it; remote checkpoints "
    "('registry', URLs) are refused",
    "weights_only": "always torch.load(weights_only=True): a checkpoint never runs code, so false is refused",
}


class StartupTerminated(BaseException):
    """SIGTERM while fit starts (run directory, data, model, checkpoint restore): before Lightning's own handler
    (which stops training at a batch's end and saves) is installed, the signal's default action killed the process
    without a word and left ``fit.lock`` behind. A BaseException, like KeyboardInterrupt: no ``except Exception`` of
    the set-up code swallows it."""


def _stop_on_sigterm_while_starting(trainer: Any):
    """Install the SIGTERM handler of fit's start (main thread only; returns the function that puts the previous
    handler back, or None). It raises :class:`StartupTerminated` until Lightning installs its handler (which calls
    this one too: then it does nothing) and, once fit has ended, acts as the previous handler would."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame) -> None:
        if signal.getsignal(signal.SIGTERM) is not on_sigterm:
            return  # Lightning's handler is in charge (it stops training at the end of the batch)
        status = str(getattr(getattr(trainer, "state", None), "status", ""))
        if status.endswith(("finished", "interrupted")):  # fit is over: the signal's usual effect
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise StartupTerminated

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _purge_events_past_the_checkpoint(trainer: Any, step: int) -> None:
    """A fit resumed in place (``--ckpt_path last``) from a checkpoint of global step ``step``: its TensorBoard writer
    starts with a purge marker at ``step`` (SummaryWriter's ``purge_step``), so TensorBoard drops the events that an
    interrupted run logged at steps >= ``step`` after that checkpoint (a killed run logs past its last checkpoint)
    and shows the resumed run's values there once, instead of a second series over the same steps. The resumed
    run logs its first step at ``step`` (Lightning's logging step counts the optimizer steps before the batch)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and getattr(logger, "_experiment", None) is None:
            kwargs = getattr(logger, "_kwargs", None)
            if isinstance(kwargs, dict) and kwargs.get("purge_step") is None:  # the CLI fills in None
                kwargs["purge_step"] = step


def _quiet_known_lightning_noise() -> None:
    """Three messages of Lightning 2.6 that every run printed and that the user can do nothing about; each is
    filtered by its exact text at its source, nothing else is."""
    import logging
    import warnings

    # lightning.pytorch.utilities._pytree builds torch's LeafSpec, deprecated in torch 2.10+: Lightning's code, not
    # ours nor the user's (it goes away with a Lightning release that uses TreeSpec.is_leaf()).
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )

    # on_before_batch_transfer is a hook shared by LightningModule and LightningDataModule; with a DataModule
    # passed, Lightning notes which one it calls. CausalLMModule overrides it on purpose (labels are checked on the
    # host, before the transfer) and our DataModules do not, so the module's is the one meant to run. The warning
    # that a DataModule's override replaces the module's ("in both") is not filtered: it means the check is skipped.
    warnings.filterwarnings(
        "ignore",
        message=r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a "
        r"`LightningDataModule`\. It will use the implementation from `LightningModule` instance\.",
        category=UserWarning,
        module=r"lightning\.pytorch\.trainer\.connectors\.data_connector",
    )

    class _NoLitLoggerTip(logging.Filter):
        # Lightning's logger connector advertises its cloud logger on every run without a LitLogger; our runs log to
        # TensorBoard by design (the run report names the directory and the tensorboard command).
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("💡 Tip: For seamless cloud logging")

    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(type(f).__name__ == "_NoLitLoggerTip" for f in log.filters):
        log.addFilter(_NoLitLoggerTip())


def _replace_default_console_callbacks(trainer: Any, configured: list[Any]) -> None:
    """Lightning's default progress bar and model summary (not ones the config names) -> ours: steps out of max_steps
    and no v_num in the bar; the analytic FLOPs per token instead of a FLOPs column of zeros in the summary."""
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar

    from .modules.console import Phi3ModelSummary, Phi3RichProgressBar, Phi3TQDMProgressBar

    chosen = {id(c) for c in (configured if isinstance(configured, list) else [configured])}
    for i, cb in enumerate(trainer.callbacks):
        if id(cb) in chosen:
            continue
        if type(cb) is RichProgressBar:
            trainer.callbacks[i] = Phi3RichProgressBar()
        elif type(cb) is TQDMProgressBar:
            trainer.callbacks[i] = Phi3TQDMProgressBar()
        elif type(cb) in (ModelSummary, RichModelSummary):
            trainer.callbacks[i] = Phi3ModelSummary(max_depth=cb._max_depth)


def _undo(trace: SetupTrace, keep: tuple[str, ...]) -> bool:
    """:meth:`SetupTrace.undo` from the ``finally`` of a failed command: its own failure (a full disk while putting
    ``config.yaml`` back, a file that appeared meanwhile) is said in a note, never raised over the command's error
    (and the lock is still released after it)."""
    try:
        return trace.undo(keep=keep)
    except Exception as e:  # noqa: BLE001 - the command's own error is the one to report
        print(f"note: could not remove what the failed command set up in {trace.log_dir}: {e}", file=sys.stderr)
        return False


def _checkpoint_dirpaths(trainer: Any) -> list[Path]:
    """The directories that the trainer's ModelCheckpoint callbacks were given (None: the log directory's)."""
    return [Path(str(cb.dirpath)) for cb in getattr(trainer, "checkpoint_callbacks", None) or [] if cb.dirpath]


def run_report(trainer: Any, subcommand: str, verb: str, argv: list[str] | None = None) -> str:
    """Where a run writes: the run (name, version), its log directory and checkpoint directory; at the end of fit
    (``argv`` given) also the command that continues it and the one that opens TensorBoard."""
    import shlex

    from lightning.pytorch.callbacks import ModelCheckpoint

    logger = trainer.loggers[0]
    # the logger's own directory: Trainer.log_dir broadcasts, a collective that only rank 0 would enter here
    log_dir = Path(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or ".")
    name, version = getattr(logger, "name", None), getattr(logger, "version", None)
    version = _version_dir_name(version) or "?"
    lines = [f"{subcommand}: run {name}/{version} {verb} {log_dir}"]
    if subcommand == "fit":
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                where = Path(cb.dirpath) if cb.dirpath else log_dir / "checkpoints"
                saved = ", ".join(Path(p).name for p in (cb.last_model_path, cb.best_model_path) if p)
                lines.append(f"  checkpoints: {where}" + (f" ({saved})" if saved else ""))
    if argv is not None and subcommand == "fit":
        from .modules.callbacks import Phi3ThroughputMonitor

        for cb in trainer.callbacks:
            tps = cb.last.get("perf/tokens_per_sec") if isinstance(cb, Phi3ThroughputMonitor) else None
            if tps:
                lines.append(f"  throughput: {tps:,.0f} real tokens/s at the last measurement (perf/tokens_per_sec)")
        module = getattr(trainer, "lightning_module", None)
        if getattr(module, "attn_implementation", None) == "flash_attention_2":
            from .model.backends import flash_kernel

            kernel = flash_kernel(trainer.strategy.root_device)
            lines.append(f"  attention: flash_attention_2 ran {kernel or 'no flash kernel (unavailable here)'}")
        lines.append(f"  continue it (raise --trainer.max_steps to train further): {resume_command(argv, version)}")
        lines.append(f"  TensorBoard: tensorboard --logdir {shlex.quote(str(log_dir.parent))}")
    elif argv is not None:
        lines.append(f"  TensorBoard: tensorboard --logdir {shlex.quote(str(log_dir))}")
    return "\n".join(lines)


def resume_command(argv: list[str], version: str) -> str:
    """The command that continues a fit run as ``argv`` (``["fit", ...]``) started it, in version ``version``:
    ``--ckpt_path`` / ``--run_version`` replaced by the run's, and an option given several times kept once, with its
    last value (the one that took effect), unless something between two of them can change what the option refers
    to: a ``--config`` file, an option above or below it (``--model CLASS`` before ``--model.lr``), a list append
    (``--trainer.callbacks+``). Every ``--config`` stays, in order."""
    import shlex

    items: list[tuple[str | None, list[str]]] = []  # (option key, its tokens); key None: a token of its own
    i = 0
    while i < len(argv) - 1:
        i += 1
        a = argv[i]
        if not a.startswith("--") and a != "-c":
            items.append((None, [a]))
            continue
        key = "config" if a == "-c" else a[2:].split("=", 1)[0]
        tokens = [a]
        if "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--") and argv[i + 1] != "-c":
            i += 1
            tokens.append(argv[i])
        if key not in ("ckpt_path", "run_version"):
            items.append((key, tokens))

    def norm(key: str) -> str:  # --model.init_args.lr and --model.lr are one option
        return ".".join(p for p in key.rstrip("+").split(".") if p != "init_args")

    def related(a: str, b: str) -> bool:  # the same option, or one above the other
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    kept = []
    for n, (key, tokens) in enumerate(items):
        if key is not None and key != "config" and not key.endswith("+"):
            for later, _ in items[n + 1 :]:
                if later is None:
                    continue
                if later == "config" or (
                    related(norm(later), norm(key)) and (later.endswith("+") or norm(later) != norm(key))
                ):
                    break  # it can change what the option refers to: keep both
                if norm(later) == norm(key):
                    tokens = []  # given again later: that value took effect
                    break
        kept.extend(tokens)
    resume = ["python", "-m", "phi3_lightning", "fit", *kept, "--run_version", version.removeprefix("version_")]
    return shlex.join([*resume, "--ckpt_path", "last"])


def _checkpoint_dir_follower():
    """A callback: resuming from a checkpoint that lies in the ModelCheckpoint's directory, whose recorded ``dirpath``
    differs (the run was moved, or fit runs from another working directory), moves the recorded best/last paths to
    the current directory, so Lightning keeps tracking them instead of starting over (``last-v1.ckpt``)."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    def moved(value: Any, old: str, new: str) -> Any:
        if isinstance(value, str) and value and Path(value).parent == Path(old):
            return str(Path(new) / Path(value).name)
        return value

    class CheckpointDirFollower(Callback):
        def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
            if trainer.ckpt_path is None or not Path(str(trainer.ckpt_path)).is_file():
                return
            here = Path(str(trainer.ckpt_path)).resolve().parent
            states = checkpoint.get("callbacks") or {}
            for cb in trainer.checkpoint_callbacks:
                state = states.get(cb.state_key) if isinstance(cb, ModelCheckpoint) else None
                old, new = (state or {}).get("dirpath"), cb.dirpath
                if not old or not new or old == new or Path(new).resolve() != here:
                    continue
                for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                    state[key] = moved(state.get(key), old, new)
                state["best_k_models"] = {moved(k, old, new): v for k, v in (state.get("best_k_models") or {}).items()}
                state["dirpath"] = new

    return CheckpointDirFollower()


class _DataFact:
    """compute_fn of a link: ``getattr(datamodule, name, None)``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__name__ = f"{name} of"  # the help lists the link as "num_labels of(data) --> model.init_args...."

    def __call__(self, datamodule: Any) -> Any:
        return getattr(datamodule, self.name, None)


def _help_class_paths(argv: list[str]) -> dict[str, str]:
    """``{"model": class path, "data": class path}`` as the ``--config`` files and the command line in ``argv`` set
    them (later ones win), for ``--help``; read without validating anything."""
    import yaml

    found: dict[str, str] = {}

    def take(key: str, value: Any) -> None:
        cp = value if isinstance(value, str) else _class_path(value)
        if isinstance(cp, str) and cp:
            found[key] = cp

    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if name in ("--config", "-c"):
            try:
                cfg = yaml.safe_load(Path(value).expanduser().read_text())
            except (OSError, yaml.YAMLError):
                continue
            for key in ("model", "data"):
                if isinstance(cfg, dict) and key in cfg:
                    take(key, cfg[key])
        elif name in ("--model", "--data", "--model.class_path", "--data.class_path") and not value.endswith(".yaml"):
            take(name[2:].split(".")[0], value)
    return found


def config_class_help(argv: list[str]) -> str:
    """The options of the model and data classes that ``--config`` (or ``--model`` / ``--data``) names, as
    ``--model.init_args.NAME`` with their help text: appended to ``fit --help --config X.yaml``."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    from .modules import Phi3LightningModule

    out = []
    bases = {"model": Phi3LightningModule, "data": LightningDataModule}
    for key, class_path in _help_class_paths(argv).items():
        try:
            from jsonargparse._typehints import resolve_class_path_by_name  # short names, as --model.help takes

            class_path = resolve_class_path_by_name(bases[key], class_path)
        except Exception:
            pass
        cls = _import(class_path)
        if not isinstance(cls, type):
            out.append(f"\n(--{key} {class_path}: cannot import it, so its options are not listed)\n")
            continue
        p = ArgumentParser(prog="python -m phi3_lightning", exit_on_error=False, add_help=False)
        p.add_class_arguments(cls, f"{key}.init_args", fail_untyped=False, sub_configs=True)
        text = p.format_help()
        text = text.split("\n\n", 1)[1] if text.startswith("usage:") and "\n\n" in text else text
        out.append(
            f"\n{key.capitalize()} options of {class_path} (set as `--{key}.init_args.NAME "
            f"VALUE` or in the config; defaults are the class's, --print_config shows the config's values):\n{text}"
        )
    return "".join(out)


def run_lightning(argv: list[str] | None) -> int:
    cli_cls = _cli_class()
    cli_cls(args=argv)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# compare-attention / memory / data-report (generate and export live in phi3_lightning.commands)
# ----------------------------------------------------------------------------------------------------------------------


def compare_main(argv: list[str]) -> int:
    try:
        from .compare import main as compare
    except ModuleNotFoundError as e:
        if e.name in ("phi3_lightning.compare",):
            print(
                "error: compare-attention is unavailable: the module phi3_lightning.compare is not part of this "
                "installation yet",
                file=sys.stderr,
            )
            return 2
        raise
    return int(compare(argv) or 0)


def memory_main(argv: list[str]) -> int:
    from .memory import main as memory

    return int(memory(argv) or 0)


def data_report_main(argv: list[str]) -> int:
    from .data.report import main as report

    return int(report(argv) or 0)


# ----------------------------------------------------------------------------------------------------------------------


def _cause(message: str) -> str:
    """jsonargparse reports an error raised while building a class (a bad ``config_overrides`` key, an impossible
    value) as "Does not validate against any of the Union subtypes" followed by one line per subtype and a dump of
    the whole namespace: keep the one line that is our own message."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    causes = [ln.strip()[2:] for ln in message.splitlines() if ln.strip().startswith("- ")]
    causes = [c for c in causes if not c.startswith("Expected a ")]
    return causes[0] if len(causes) == 1 else message


def _report(e: BaseException) -> None:
    if os.environ.get("PHI3_LIGHTNING_TRACEBACK"):
        traceback.print_exc()
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (raised at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    # one write (with its newline): the processes of a multi-process run share the terminal
    sys.stderr.write(f"error: {_cause(str(e))}{where}\n(set PHI3_LIGHTNING_TRACEBACK=1 for the full traceback)\n")
    sys.stderr.flush()


def _is_misconfiguration(e: BaseException) -> bool:
    """Lightning's ``MisconfigurationException``: a setting it refuses (``--trainer.max_steps -5``), a user error
    (checked by name so that this module does not import Lightning for every command)."""
    return any(
        c.__name__ == "MisconfigurationException" and c.__module__.startswith(("lightning", "pytorch_lightning"))
        for c in type(e).__mro__
    )


# What a collective raises on a process whose peer is gone (gloo: the peer's socket closed; NCCL: the peer exited)
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote process exited",
    "NCCL communicator was aborted",
)


def _peer_failed(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) is a collective's error saying that another process of this run
    is gone: that process printed its own error, which is the one the user needs."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RuntimeError) and any(p in str(e) for p in _PEER_GONE):
            return True
        e = e.__cause__ or e.__context__
    return False


def _rank() -> str:
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return str(dist.get_rank())
    return os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "?"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m phi3_lightning`` and the ``phi3-lightning`` script; returns the exit code."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(TOP_HELP)
        return 0 if argv else 2
    command = argv[0]
    try:
        if command == "generate":
            from .commands.generate import main as generate

            return generate(argv[1:])
        if command == "export":
            from .commands.export import main as export

            return export(argv[1:])
        if command == "compare-attention":
            return compare_main(argv[1:])
        if command in ("memory", "data-report"):
            return (memory_main if command == "memory" else data_report_main)(argv[1:])
        if command in LIGHTNING_COMMANDS:
            return run_lightning(None if from_sys else argv)
    except SystemExit as e:  # argparse / jsonargparse errors and --help; Lightning's SIGTERMException
        if type(e).__name__ == "SIGTERMException":  # preempted: never exit 0 (the guard sets 143 / 130)
            return e.code if isinstance(e.code, int) and e.code else 143
        if e.code == 1 and isinstance(e.__context__, KeyboardInterrupt):  # Lightning's exit(1) after a Ctrl-C
            return 130
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except StartupTerminated:
        print(
            "SIGTERM while fit was starting, before the first training step: it stopped; nothing was trained "
            "or saved by this process and nothing is lost (the run's checkpoints are as they were): run the same "
            "command again to start (or continue) it",
            file=sys.stderr,
        )
        return 143
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, AtomicWriteError) as e:
        _report(e)
        return 1
    except Exception as e:
        if _peer_failed(e) and not os.environ.get("PHI3_LIGHTNING_TRACEBACK"):
            # the failing process printed the real error; this one's traceback (~120 lines of a collective's
            # "Connection closed by peer") would bury it
            print(
                f"note: process rank {_rank()} stopped because another process of this run failed or was killed "
                "(its error, if it printed one, is above; PHI3_LIGHTNING_TRACEBACK=1 shows this process's traceback)",
                file=sys.stderr,
            )
            return 1
        if not _is_misconfiguration(e):
            raise
        _report(e)
        return 1
    print(_unknown_command(command), file=sys.stderr)
    return 2


COMMANDS = (*LIGHTNING_COMMANDS, "generate", "export", "compare-attention", "memory", "data-report")


def _unknown_command(command: str) -> str:
    """One line: the closest command, or (an option given first) that the command comes first."""
    from .options import did_you_mean

    listing = f"(commands: {', '.join(COMMANDS)}; python -m phi3_lightning --help describes them)"
    if command.startswith("-"):
        return (
            f"error: {command!r} is an option, not a command: name the command first, e.g. python -m phi3_lightning "
            f"fit {command.split('=', 1)[0]} ... {listing}"
        )
    return f"error: unknown command {command!r}{did_you_mean(command, COMMANDS)} {listing}"
