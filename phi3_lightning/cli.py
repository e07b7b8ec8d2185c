"""Command line: ``python -m phi3_lightning <command> ...``.

* ``fit`` / ``validate`` / ``test`` / ``predict``: LightningCLI. ``--config`` is repeatable (a base YAML, then
  overlays: ``--config configs/causal_lm.yaml --config configs/strategies/ddp.yaml``), ``--print_config`` shows the
  merged result, ``--help`` every field with its help text. The data module's ``num_labels`` / ``label_names`` /
  ``problem_type`` are linked into the model when both are instantiated.
* ``generate``: complete a prompt, or chat, with a Lightning checkpoint or a Hugging Face directory.
* ``export``: a Lightning checkpoint -> a Hugging Face directory (transformers loads it).
* ``compare-attention``: dispatches to :func:`phi3_lightning.compare.main`; ``memory`` and ``data-report`` to
  :func:`phi3_lightning.memory.main` and :func:`phi3_lightning.data.report.main`.

Every parser refuses abbreviated options and suggests the closest one for a typo (:mod:`phi3_lightning.options`).
A run says where it writes (run name/version, log and checkpoint directories) when it starts and when it ends; fit
then also prints the command that continues it and the one that opens TensorBoard.

Runs. A run is ``<save_dir>/<run name>/version_N`` (TensorBoard events, ``config.yaml``, ``checkpoints/``). The run
name is ``--run_name NAME``, by default ``<config stems joined by +>/<attn backend>`` (``causal_lm/sdpa``), so
``tensorboard --logdir logs`` overlays runs that differ by config or backend. ``--run_version N`` picks a version.

* ``--ckpt_path last`` / ``best`` resolve within one run: the named run's only version that holds checkpoints, or
  the version given by ``--run_version`` (several candidates and none named: refused, listing them). ``last`` is
  ``checkpoints/last.ckpt``; ``best`` is the ModelCheckpoint's ``best_model_path`` recorded in ``last.ckpt`` (else
  the single ``best*.ckpt``). Nothing found: an error, never a run without the checkpoint that was asked for.
* ``fit --ckpt_path last`` continues that version in place; ``fit`` with ``best`` or a file starts a new version.
  While ``fit`` writes into a version directory it holds ``fit.lock`` (pid + host) there; another ``fit`` into a
  directory whose lock names a live process is refused, a lock of a dead process is taken over with a note.
* ``validate`` / ``test`` / ``predict`` with a checkpoint of a run log into that run, under ``version_N/<command>/``
  (its own TensorBoard run, ``config.yaml`` and ``hparams.yaml``; the run's files are never touched); with a
  checkpoint outside any run, or none, they create a version as ``fit`` does.
* With ``--ckpt_path`` the command line must agree with the checkpoint on everything that shapes the model (model,
  config_overrides, lora, the head class and its options, the tokenizer, the data's labels) and, for ``fit``, on the
  optimizer and LR scheduler, whose state resumes from the checkpoint. A difference is refused naming the setting
  and both values. Execution choices (attn_implementation, activation_checkpointing, torch_compile, compile_mode,
  meta_init, strict_head) are taken from the command line. The saved ``config.yaml`` is what ran.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text, default_mode

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
fit / validate / test / predict also take --print_config (show the merged configuration and exit).
Runs log to TensorBoard under logs/<run name>/version_N (tensorboard --logdir logs); --run_name NAME names a run
(default <config stems>/<attn backend>), --run_version N picks a version. --ckpt_path last|best resolve within that
one run; validate/test/predict of a run's checkpoint log into version_N/<command>/ of that run.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
EXTRA_COMMANDS = ("generate", "export", "compare-attention", "memory", "data-report")
RESERVED_CKPT = ("last", "best", "hpc", "registry")
LOCK_FILE = "fit.lock"
# Model settings that do not change the weights: with --ckpt_path the command line's value is used.
EXECUTION_SETTINGS = ("attn_implementation", "activation_checkpointing", "torch_compile", "compile_mode", "meta_init",
                      "strict_head")  # fmt: skip
# Settings whose state resumes from the checkpoint in fit (and that evaluation does not use).
TRAINING_SETTINGS = ("optimizer", "lr_scheduler")
# Linked from the data module at instantiation; checked against the checkpoint once the model exists.
LABEL_FACTS = ("num_labels", "label_names", "problem_type", "id2label", "label2id")

FSDP_ON_CPU = (
    "FSDPStrategy (FSDP1) needs CUDA GPUs, but this run is on the CPU (accelerator={accelerator!r}). To shard on CPU "
    "(gloo) use FSDP2 through ModelParallelStrategy: --config configs/strategies/fsdp2.yaml; on GPUs "
    "configs/strategies/fsdp.yaml works"
)


class UsageError(ValueError):
    """A problem with the command line or the files it names (printed without a traceback)."""


# ----------------------------------------------------------------------------------------------------------------------
# LightningCLI
# ----------------------------------------------------------------------------------------------------------------------


def _cli_class():
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    # The data modules are loaded lazily by phi3_lightning.data; importing them here makes them known subclasses of
    # LightningDataModule, so `--data.help CausalLMDataModule` and `class_path: CausalLMDataModule` resolve.
    from .data import CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule  # noqa: F401
    from .modules import AtomicCheckpointIO, Phi3LightningModule, Phi3ThroughputMonitor, PredictionWriter
    from .options import SuggestingParserMixin

    class Phi3ArgumentParser(SuggestingParserMixin, LightningArgumentParser):
        """No option prefixes, "did you mean" for unknown options, and, for ``--help`` with ``--config``, the
        options of the model and data classes that the config names."""

        help_argv: list[str] | None = None  # the command line, set before parsing (for --help with --config)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("prog", "python -m phi3_lightning")  # also --model.help's parser (else __main__.py)
            super().__init__(*args, **kwargs)

        def format_help(self) -> str:
            text = super().format_help()
            if self.help_argv is not None:
                text += config_class_help(self.help_argv)
            return text

    _quiet_known_lightning_noise()
    try:  # field docstrings of dataclass settings (model.lora's LoRAConfig) become their --help text
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (ImportError, TypeError):  # older jsonargparse
        pass

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
                parser_kwargs={"prog": "python -m phi3_lightning",
                               "description": "Phi-3 with Lightning: one YAML to train, evaluate or predict."},
                args=args,
                run=run,
                **kwargs,
            )

        def add_arguments_to_parser(self, parser) -> None:
            from typing import Optional

            parser.add_argument(
                "--run_name", type=Optional[str], default=None,
                help="name of the run: it logs to <save_dir>/<run_name>/version_N (default: the config file stems "
                     "joined by '+', then the attention backend: causal_lm/sdpa). --ckpt_path last|best resolve "
                     "within this run only",
            )  # fmt: skip
            parser.add_argument(
                "--run_version", type=Optional[str], default=None,
                help="version of the run, N or version_N (the same as --trainer.logger.init_args.version): needed "
                     "with --ckpt_path last|best when several versions of the run hold checkpoints",
            )  # fmt: skip
            parser.add_lightning_class_args(Phi3ThroughputMonitor, "throughput")
            parser.add_lightning_class_args(PredictionWriter, "predictions")
            # data.num_labels / data.label_names / data.problem_type -> the model, once the data module exists.
            # (The whole data module is the source, read with getattr: data modules without label facts, e.g.
            # causal LM, simply link nothing, and targets a module lacks are skipped.)
            for attr in ("num_labels", "label_names", "problem_type"):
                parser.link_arguments("data", f"model.init_args.{attr}", compute_fn=_DataFact(attr),
                                      apply_on="instantiate")  # fmt: skip

        def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            group = parser.groups.get("data") if hasattr(parser, "groups") else None
            if group is not None:  # else LightningDataModule's docstring, cut off at "The main advantage is:"
                group.title = ("Data: a LightningDataModule given by --data CLASS (CausalLMDataModule, "
                               "SequenceClassificationDataModule, TokenClassificationDataModule) or the config")
            return parser

        def parse_arguments(self, parser, args) -> None:
            argv = list(sys.argv[1:] if args is None else args)
            if "-h" in argv or "--help" in argv:
                for sub in getattr(self, "_subcommand_parsers", {}).values():
                    sub.help_argv = argv
            super().parse_arguments(parser, args)

        def _parse_ckpt_path(self) -> None:
            """Replaces LightningCLI's, which ``torch.load``s the file (a traceback when it is truncated) and replaces
            the model's settings by the checkpoint's hyper-parameters (command-line settings silently dropped). Here:
            name the run, resolve last/best within it, read the file safely, refuse settings that disagree with the
            checkpoint, and point evaluation logging at the evaluated run."""
            self._ckpt_info = None
            subcommand = self.config.get("subcommand")
            if not subcommand:
                return
            cfg = self.config[subcommand]
            check_fsdp_accelerator(cfg.trainer)
            name_run(cfg, subcommand)
            ckpt_path = cfg.get("ckpt_path")
            if ckpt_path is None or str(ckpt_path) in ("hpc", "registry") or "://" in str(ckpt_path):
                return
            path, run_dir = resolve_ckpt_path(cfg)
            cfg.ckpt_path = str(path)
            ckpt = read_checkpoint(path)
            check_ckpt_settings(cfg, ckpt, subcommand, path)
            self._ckpt_info = (path, ckpt.get("phi3_lightning") or {})
            del ckpt
            place_run_logs(cfg, subcommand, str(ckpt_path), run_dir)

        def after_instantiate_classes(self) -> None:
            super().after_instantiate_classes()
            if self._ckpt_info is not None:
                check_ckpt_labels(self._ckpt_info[0], self._ckpt_info[1], getattr(self.model, "config", None))

        def _run_subcommand(self, subcommand: str) -> None:
            lock = None
            if subcommand == "fit" and self.trainer.loggers and _is_rank_zero():
                lock = RunLock(Path(self.trainer.log_dir or "."))
                lock.acquire()
            report = _is_rank_zero() and bool(self.trainer.loggers)
            if report:
                print(run_report(self.trainer, subcommand, "writes to"), file=sys.stderr, flush=True)
            try:
                super()._run_subcommand(subcommand)
            finally:
                if lock is not None:
                    lock.release()
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
            from lightning.pytorch.plugins.io import TorchCheckpointIO

            strategy = trainer.strategy
            if type(getattr(strategy, "_checkpoint_io", None)) in (type(None), TorchCheckpointIO):
                strategy.checkpoint_io = AtomicCheckpointIO()
            trainer.callbacks.append(_checkpoint_dir_follower())
            _replace_default_console_callbacks(trainer, configured)
            return trainer

    return Phi3CLI


def _quiet_known_lightning_noise() -> None:
    """Two messages of Lightning 2.6 that every run printed and that the user can do nothing about; each is
    filtered by its exact text at its source, nothing else is."""
    import logging
    import warnings

    # lightning.pytorch.utilities._pytree builds torch's LeafSpec, deprecated in torch 2.10+: Lightning's code, not
    # ours nor the user's (it goes away with a Lightning release that uses TreeSpec.is_leaf()).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
                            module=r"lightning\.pytorch\.utilities\._pytree")  # fmt: skip

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
        rest, skip = [], False
        for a in argv[1:]:
            if skip:
                skip = False
                continue
            if a in ("--ckpt_path", "--run_version"):
                skip = True
                continue
            if a.startswith(("--ckpt_path=", "--run_version=")):
                continue
            rest.append(a)
        resume = ["python", "-m", "phi3_lightning", "fit", *rest, "--run_version", version.removeprefix("version_"),
                  "--ckpt_path", "last"]  # fmt: skip
        lines.append(f"  continue it (raise --trainer.max_steps to train further): {shlex.join(resume)}")
        lines.append(f"  TensorBoard: tensorboard --logdir {shlex.quote(str(log_dir.parent))}")
    elif argv is not None:
        lines.append(f"  TensorBoard: tensorboard --logdir {shlex.quote(str(log_dir))}")
    return "\n".join(lines)


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
        out.append(f"\n{key.capitalize()} options of {class_path} (set as `--{key}.init_args.NAME "
                   f"VALUE` or in the config; defaults are the class's, --print_config shows the config's values):\n{text}")
    return "".join(out)


def _class_path(value: Any) -> str | None:
    cp = getattr(value, "class_path", None) if value is not None else None
    if cp is None and isinstance(value, dict):
        cp = value.get("class_path")
    return cp


def _import(path: str):
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def check_fsdp_accelerator(trainer_cfg: Any) -> None:
    """FSDPStrategy (FSDP1) on CPU: say so, and point to the FSDP2 overlay."""
    import torch
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer_cfg.get("strategy")
    fsdp1 = False
    if isinstance(strategy, str):
        fsdp1 = strategy.lower().startswith("fsdp")
    elif isinstance(strategy, FSDPStrategy):
        fsdp1 = True
    elif (cp := _class_path(strategy)) is not None:
        cls = _import(cp)
        fsdp1 = isinstance(cls, type) and issubclass(cls, FSDPStrategy)
    if not fsdp1:
        return
    accelerator = trainer_cfg.get("accelerator")
    name = accelerator if isinstance(accelerator, str) else (_class_path(accelerator) or "auto")
    on_cpu = "cpu" in str(name).lower() or (str(name) in ("auto", "gpu", "cuda") and not torch.cuda.is_available())
    if on_cpu:
        raise UsageError(FSDP_ON_CPU.format(accelerator=name))


def check_ckpt_path(ckpt_path: Any) -> None:
    if ckpt_path is None or str(ckpt_path) in RESERVED_CKPT or "://" in str(ckpt_path):
        return
    if not Path(str(ckpt_path)).expanduser().exists():
        raise UsageError(
            f"ckpt_path={str(ckpt_path)!r} does not exist; pass a checkpoint written by fit "
            "(logs/<run>/version_N/checkpoints/last.ckpt), or 'last' / 'best' (of the run named by --run_name)"
        )


def _config_stems(cfg: Any) -> list[str]:
    stems = []
    for c in cfg.get("config") or []:
        text = str(getattr(c, "relative", None) or c)
        stems.append(Path(text).stem)
    return stems


def _task_name(cfg: Any) -> str:
    from .modules.tasks import task_name

    return task_name(_class_path(cfg.get("model")) or "model")


def _tensorboard_loggers(cfg: Any) -> list[Any]:
    loggers = cfg.trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [lg for lg in loggers if (_class_path(lg) or "").endswith("TensorBoardLogger")]


def _version_dir_name(version: Any) -> str | None:
    """TensorBoardLogger's directory name of a version: N -> version_N, a string as is."""
    if version is None:
        return None
    if isinstance(version, int) or (isinstance(version, str) and version.isdigit()):
        return f"version_{int(version)}"
    return str(version)


def name_run(cfg: Any, subcommand: str | None) -> None:
    """The run's name and version: TensorBoardLogger ``name`` = ``--run_name`` or, for name "auto", ``<config stems
    joined by +>/<attn backend>``; ``--run_version`` -> the logger's ``version``."""
    run_name, run_version = cfg.get("run_name"), _version_dir_name(cfg.get("run_version"))
    if run_name is not None:
        parts = Path(run_name).parts
        if not run_name.strip() or Path(run_name).is_absolute() or ".." in parts:
            raise UsageError(f"--run_name {run_name!r}: give a relative name without '..' (e.g. lm_wiki or lm/wiki)")
    loggers = _tensorboard_loggers(cfg)
    if (run_name is not None or run_version is not None) and not loggers:
        raise UsageError("--run_name / --run_version name a TensorBoard run, but this configuration has no "
                         "TensorBoardLogger (trainer.logger); remove them or use the default logger")
    model_args = getattr(cfg.get("model"), "init_args", None)
    attn = getattr(model_args, "attn_implementation", None) or "sdpa"
    stems = _config_stems(cfg) or [_task_name(cfg)]
    for logger in loggers:
        args = logger.init_args
        if run_name is not None:
            args.name = run_name
        elif args.get("name") in (None, "auto"):
            args.name = f"{'+'.join(stems)}/{attn}"
        if run_version is not None:
            given = _version_dir_name(args.get("version"))
            if given is not None and given != run_version:
                raise UsageError(f"--run_version {run_version} and --trainer.logger.init_args.version {given} "
                                 "disagree; give one of them")
            args.version = run_version


def _checkpoint_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.ckpt") if p.is_file()) if d.is_dir() else []


def _explicit_ckpt_dirpath(cfg: Any) -> Path | None:
    """The ``dirpath`` of a ModelCheckpoint callback in the config, when one is set."""
    callbacks = cfg.trainer.get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if (_class_path(cb) or "").endswith("ModelCheckpoint"):
            dirpath = getattr(getattr(cb, "init_args", None), "dirpath", None)
            if dirpath:
                return Path(str(dirpath)).expanduser()
    return None


def _run_checkpoint_dir(cfg: Any) -> tuple[Path, Path | None, str]:
    """(checkpoints directory, version directory or None, description) of the run that ``last``/``best`` name."""
    dirpath = _explicit_ckpt_dirpath(cfg)
    if dirpath is not None:
        return dirpath, None, f"ModelCheckpoint dirpath {dirpath}"
    loggers = _tensorboard_loggers(cfg)
    if not loggers:
        raise UsageError(f"--ckpt_path {cfg.ckpt_path} looks in the run's TensorBoard directory, but this configuration "
                         "has no TensorBoardLogger and no ModelCheckpoint dirpath; pass the checkpoint file instead")
    args = loggers[0].init_args
    root = Path(str(args.get("save_dir") or "logs")).expanduser() / str(args.name)
    version = _version_dir_name(args.get("version"))
    if version is None:
        candidates = sorted((d for d in root.iterdir() if _checkpoint_files(d / "checkpoints")),
                            key=lambda d: (len(d.name), d.name)) if root.is_dir() else []  # fmt: skip
        if not candidates:
            raise UsageError(
                f"--ckpt_path {cfg.ckpt_path}: run {args.name!r} has no checkpoints (looked in {root}/version_*/"
                "checkpoints); train it first, name the run that has them with --run_name NAME, or pass a .ckpt file"
            )
        if len(candidates) > 1:
            listing = ", ".join(f"{d.name} ({', '.join(p.name for p in _checkpoint_files(d / 'checkpoints'))})"
                                for d in candidates)  # fmt: skip
            raise UsageError(
                f"--ckpt_path {cfg.ckpt_path} is ambiguous: run {args.name!r} ({root}) has {len(candidates)} versions "
                f"with checkpoints: {listing}; pick one with --run_version N (e.g. --run_version "
                f"{candidates[-1].name.removeprefix('version_')}), or give each run its own --run_name"
            )
        version = candidates[0].name
    vdir = root / version
    return vdir / "checkpoints", vdir, f"run {args.name!r} {version} ({vdir})"


def _last_in(ckdir: Path) -> Path | None:
    if (ckdir / "last.ckpt").is_file():
        return ckdir / "last.ckpt"
    lasts = [p for p in _checkpoint_files(ckdir) if p.name.startswith("last")]
    return max(lasts, key=lambda p: p.stat().st_mtime) if lasts else None


def best_checkpoint(ckdir: Path, where: str = "") -> Path:
    """The run's best checkpoint: the ``best_model_path`` that the ModelCheckpoint recorded in ``last.ckpt`` (found
    in ``ckdir`` by its file name), else the single ``best*.ckpt`` file of ``ckdir``."""
    where = where or str(ckdir)
    last = _last_in(ckdir)
    recorded: set[Path] = set()
    if last is not None:
        state = read_checkpoint(last).get("callbacks") or {}
        for key, value in state.items():
            best = value.get("best_model_path") if key.startswith("ModelCheckpoint") and isinstance(value, dict) else ""
            if best:
                local = ckdir / Path(best).name
                recorded.add(local if local.is_file() else Path(best))
    found = sorted(p for p in recorded if p.is_file())
    if len(recorded) == 1 and found:
        return found[0]
    if len(found) > 1:
        raise UsageError(f"--ckpt_path best is ambiguous in {where}: several ModelCheckpoint callbacks recorded a best "
                         f"checkpoint ({', '.join(map(str, found))}); pass the file")
    files = [p for p in _checkpoint_files(ckdir) if p.name.startswith("best")]
    if len(files) == 1 and not recorded:
        return files[0]
    if recorded:
        raise UsageError(f"--ckpt_path best: {where} recorded its best checkpoint as {', '.join(map(str, recorded))}, "
                         "which no longer exists; pass a checkpoint file")
    if files:
        raise UsageError(f"--ckpt_path best is ambiguous in {where}: no last.ckpt records which is best and there are "
                         f"{len(files)} best*.ckpt files ({', '.join(p.name for p in files)}); pass one of them")
    raise UsageError(f"--ckpt_path best: {where} has no best checkpoint (no ModelCheckpoint with a monitor saved one, "
                     "and no best*.ckpt); use --ckpt_path last or pass a file")


def run_dir_of(ckpt: Path) -> Path | None:
    """The version directory of a run that ``ckpt`` belongs to (``<version dir>/checkpoints/<file>.ckpt``)."""
    parent = ckpt.resolve().parent
    vdir = parent.parent
    if parent.name != "checkpoints" or not vdir.is_dir():
        return None
    if any((vdir / n).is_file() for n in ("config.yaml", "hparams.yaml")) or any(vdir.glob("events.out.tfevents.*")):
        return vdir
    return None


def resolve_ckpt_path(cfg: Any) -> tuple[Path, Path | None]:
    """``cfg.ckpt_path`` (a file, ``last`` or ``best``) -> (checkpoint file, the run's version directory or None)."""
    value = str(cfg.ckpt_path)
    if value in ("last", "best"):
        ckdir, vdir, where = _run_checkpoint_dir(cfg)
        if value == "last":
            path = _last_in(ckdir)
            if path is None:
                raise UsageError(f"--ckpt_path last: {where} has no last.ckpt (its checkpoints: "
                                 f"{', '.join(p.name for p in _checkpoint_files(ckdir)) or 'none'}); "
                                 "pass a checkpoint file or use --ckpt_path best")  # fmt: skip
        else:
            path = best_checkpoint(ckdir, where)
        if _is_rank_zero():
            print(f"note: --ckpt_path {value} -> {path}", file=sys.stderr)
        return path, vdir if vdir is not None else run_dir_of(path)
    check_ckpt_path(value)
    path = Path(value).expanduser()
    if path.is_dir():
        return path, None  # a distributed (FSDP2) checkpoint directory: Lightning's strategy reads it
    return path, run_dir_of(path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint, read only by :mod:`~phi3_lightning.modules.safe_load` (``weights_only=True``, memory-mapped),
    with one-line errors for unsafe, unreadable or foreign files. A distributed (FSDP2) directory is checked the same
    way and gives ``{}`` (its hyper-parameters sit in ``meta.pt``)."""
    from .modules.safe_load import UnsafeCheckpointError, load_checkpoint_file, verify_checkpoint

    path = Path(path)
    try:
        if path.is_dir():
            verify_checkpoint(path)
            return {}
        ckpt = load_checkpoint_file(path, mmap=True)
    except UnsafeCheckpointError:
        raise
    except ValueError as e:
        raise UsageError(f"cannot read checkpoint {path}: {e}. The file is truncated or corrupt (an interrupted copy "
                         "or write?) or not a checkpoint written by fit; use another checkpoint of the run "
                         "(--ckpt_path best, or last)") from None  # fmt: skip
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(f"{path} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by fit")
    return ckpt


def _plain(value: Any) -> Any:
    """Namespaces, tuples, paths -> dicts, lists, strings (for comparing settings)."""
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path) or type(value).__name__ == "Path_fr":
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return value  # 1.0 == 1 compares equal anyway
    return value


def _differences(old: Any, new: Any, key: str) -> list[tuple[str, Any, Any]]:
    """Dotted keys where ``old`` and ``new`` differ; a key that only one side has is compared with None."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            if k in old and k in new or old.get(k) is not None or new.get(k) is not None:
                out += _differences(old.get(k), new.get(k), f"{key}.{k}")
        return out
    return [] if old == new else [(key, old, new)]


def _comparable(key: str, value: Any) -> Any:
    value = _plain(value)
    if key == "config_overrides":
        value = {k: v for k, v in (value or {}).items() if k not in LABEL_FACTS}
    elif key == "lora" and value is not None:
        import dataclasses

        from .model.lora import as_lora_config

        value = _plain(dataclasses.asdict(as_lora_config(value)))
    elif key in TRAINING_SETTINGS and isinstance(value, dict):
        # keys only one side spells out (defaults) are not differences: compare what both name
        args_key = "init_args"
        value = {"class_path": value.get("class_path"), args_key: value.get(args_key) or {}}
    return value


def check_ckpt_settings(cfg: Any, ckpt: dict[str, Any], subcommand: str, path: Path) -> None:
    """The command line against the checkpoint's hyper-parameters: refuse what cannot change (naming the setting,
    both values and the fix); execution settings are taken from the command line."""
    if not ckpt:
        return
    hparams = dict(ckpt.get("hyper_parameters") or {})
    info = ckpt.get("phi3_lightning") or {}
    model_cfg = cfg.get("model")
    cli_class = _class_path(model_cfg)
    ckpt_class = hparams.get("_class_path")
    ckpt_task = info.get("task")
    cli_task = getattr(_import(cli_class), "task", None) if cli_class else None
    if (ckpt_task and cli_task and ckpt_task != cli_task) or (ckpt_class and cli_class and ckpt_class != cli_class):
        raise UsageError(
            f"{path} holds a {ckpt_task or '?'} model ({ckpt_class or 'model class not recorded'}), but this "
            f"configuration builds {cli_task or '?'} ({cli_class}); use the configuration it was trained with"
            f"{f' (configs/{ckpt_task}.yaml)' if ckpt_task else ''}, or start a {cli_task or 'new'} run from its "
            f"backbone: python -m phi3_lightning export --checkpoint {path} --output DIR, then fit with "
            "--model.init_args.model DIR (without --ckpt_path)"
        )
    cli_args = _plain(getattr(model_cfg, "init_args", None) or {})
    problems = []
    for key, ckpt_value in hparams.items():
        if key.startswith("_") or key not in cli_args or key in EXECUTION_SETTINGS or key in LABEL_FACTS:
            continue
        if key in TRAINING_SETTINGS and subcommand != "fit":
            continue
        old, new = _comparable(key, ckpt_value), _comparable(key, cli_args[key])
        if key in TRAINING_SETTINGS and isinstance(old, dict) and isinstance(new, dict):
            shared = set(old["init_args"]) & set(new["init_args"])
            old = {**old, "init_args": {k: old["init_args"][k] for k in shared}}
            new = {**new, "init_args": {k: new["init_args"][k] for k in shared}}
        problems += [(f"model.init_args.{k}", a, b, key) for k, a, b in _differences(old, new, key)]
    tokenizer = getattr(getattr(cfg.get("data"), "init_args", None), "tokenizer", None)
    if info.get("tokenizer") is not None and tokenizer is not None and str(tokenizer) != str(info["tokenizer"]):
        problems.append(("data.init_args.tokenizer", info["tokenizer"], str(tokenizer), "tokenizer"))
    if not problems:
        return
    name, old, new, key = problems[0]
    more = f" (also: {', '.join(p[0] for p in problems[1:])})" if len(problems) > 1 else ""
    if key in TRAINING_SETTINGS:
        why = ("the optimizer and LR-scheduler state resume from the checkpoint, so the new value would not be used; "
               "set it back to the checkpoint's value, or train on with other settings as a new run from the "
               f"weights: python -m phi3_lightning export --checkpoint {path} --output DIR, then fit "
               "--model.init_args.model DIR without --ckpt_path")  # fmt: skip
    else:
        why = ("the checkpoint was built with it and its weights only fit that; remove the setting or set it to the "
               "checkpoint's value (or start a new run without --ckpt_path)")  # fmt: skip
    def show(v: Any) -> str:
        return "unset (null)" if v is None else repr(v)

    raise UsageError(f"--ckpt_path {path}: {name} is {show(new)} here but {show(old)} in the checkpoint{more}; {why}")


def check_ckpt_labels(path: Path, info: dict[str, Any], config: Any) -> None:
    """The labels linked from the data module against those the checkpoint's classification head was trained on."""
    ckpt_config = info.get("config") or {}
    if config is None or info.get("task") in (None, "causal_lm") or "num_labels" not in ckpt_config:
        return

    def names(c: dict[str, Any]) -> list[str]:
        id2label = c.get("id2label") or {}
        return [str(id2label.get(str(i), id2label.get(i, i))) for i in range(int(c.get("num_labels") or 0))]

    here = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if int(here.get("num_labels") or 0) != int(ckpt_config["num_labels"]) or names(here) != names(ckpt_config):
        raise UsageError(f"--ckpt_path {path} was trained on {ckpt_config['num_labels']} labels {names(ckpt_config)}, "
                         f"but the data here has {here.get('num_labels')} labels {names(here)}; evaluate it on data "
                         "with the same labels (in the same order)")


def place_run_logs(cfg: Any, subcommand: str, requested: str, run_dir: Path | None) -> None:
    """Where a command with a checkpoint logs. fit with ``last``: in that version (resumed in place); fit otherwise:
    a new version of the named run. validate/test/predict of a run's checkpoint: ``<version dir>/<command>/``."""
    loggers = _tensorboard_loggers(cfg)
    if run_dir is None or not loggers:
        return
    for logger in loggers:
        args = logger.init_args
        if subcommand == "fit":
            if requested == "last":
                args.version = run_dir.name
            elif _version_dir_name(args.get("version")) == run_dir.name:
                args.version = None  # --run_version picked the source run: training from it starts a new version
            continue
        root = Path(str(args.get("save_dir") or "logs")).expanduser() / str(args.name)
        if root.resolve() != run_dir.parent.resolve():
            args.save_dir, args.name = str(run_dir.parent.parent), run_dir.parent.name
        args.version = run_dir.name
        if args.get("sub_dir") is None:
            args.sub_dir = subcommand


def _is_rank_zero() -> bool:
    """Before the strategy sets ranks: launched worker processes carry their rank in the environment."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "0").strip() not in ("", "0"):
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """``<version dir>/fit.lock`` holding "pid host" while fit writes into that directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.created_dir = False
        self.held = False

    def _owner(self) -> tuple[int | None, str]:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
            return int(pid), host
        except (OSError, ValueError):
            return None, ""

    def acquire(self) -> None:
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}\n"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, default_mode())
        except FileExistsError:
            pid, host = self._owner()
            if pid is not None and host not in ("", socket.gethostname()):
                raise UsageError(f"{self.run_dir} is locked by pid {pid} on host {host} ({self.path}): another fit "
                                 "writes into this run; use another --run_name, or delete the lock file if that "
                                 "process is gone") from None  # fmt: skip
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise UsageError(f"{self.run_dir} is in use: fit process {pid} holds {self.path}; wait for it to end, "
                                 "or train under another --run_name (or a new version without --ckpt_path last)"
                                 ) from None  # fmt: skip
            print(f"note: taking over the stale lock {self.path} (pid {pid} is not running)", file=sys.stderr)
            atomic_write_text(self.path, me)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(me)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._owner()[0] == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            try:
                self.run_dir.rmdir()  # only when fit failed before writing anything there
            except OSError:
                pass


def run_lightning(argv: list[str] | None) -> int:
    cli_cls = _cli_class()
    cli_cls(args=argv)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# generate / export / compare-attention
# ----------------------------------------------------------------------------------------------------------------------


def _parser(prog: str, description: str):
    from .options import strict_jsonargparse_parser

    return strict_jsonargparse_parser(prog=f"python -m phi3_lightning {prog}", description=description,
                                      default_env=False)  # fmt: skip


def generate_main(argv: list[str]) -> int:
    from typing import Optional

    p = _parser("generate", "Complete a prompt, or chat, with a Lightning checkpoint or a Hugging Face directory.")
    p.add_argument("--checkpoint", type=str, required=True,
                   help="a Lightning .ckpt written by fit, an FSDP2 checkpoint directory, or a Hugging Face directory")
    p.add_argument("--prompt", type=Optional[str], default=None, help="text to complete (or, with --chat, the user turn)")
    p.add_argument("--chat", action="store_true",
                   help="render the prompt as a user turn in the chat template; without --prompt chat on stdin")
    p.add_argument("--system", type=Optional[str], default=None, help="system message for --chat")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top_k", type=Optional[int], default=None, help="sample among the k most likely tokens")
    p.add_argument("--top_p", type=Optional[float], default=None, help="nucleus sampling mass")
    p.add_argument("--echo_prompt", type=bool, default=True,
                   help="print the prompt before its completion (with --chat: as 'user> ...' / 'assistant> ...' "
                        "lines); --echo_prompt false prints only the generated text")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--tokenizer", type=Optional[str], default=None,
                   help="'byte' or a directory with tokenizer.json; default: the one recorded with the checkpoint")
    p.add_argument("--attn_implementation", type=Optional[str], default=None,
                   help="eager, sdpa, flash_attention_2 or flex; default: the checkpoint's")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1 ...; auto = cuda if available")
    p.add_argument("--dtype", type=Optional[str], default=None,
                   help="float32, bfloat16 or float16; default: bfloat16 on a GPU that supports it, else float32")
    args = p.parse_args(argv)

    import torch

    from .data.chat import chat_text
    from .data.tokenizer import check_vocab_fits, load_tokenizer
    from .modules.loading import load_head

    if args.prompt is None and not args.chat:
        raise UsageError("generate needs --prompt TEXT (or --chat to talk on stdin)")
    from .model.generation import check_generation_args

    check_generation_args(args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p)  # before loading
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    loaded = load_head(args.checkpoint, attn_implementation=args.attn_implementation, device=device, dtype=dtype)
    if loaded.task != "causal_lm":
        raise UsageError(f"{args.checkpoint} holds a {loaded.task} head; generate needs a causal-LM checkpoint")
    spec = args.tokenizer or loaded.tokenizer
    if spec is None:
        raise UsageError(f"no tokenizer is recorded with {args.checkpoint}; pass --tokenizer byte or a directory "
                         "holding tokenizer.json")
    tokenizer = load_tokenizer(spec)
    check_vocab_fits(tokenizer, loaded.head.config.vocab_size)
    torch.manual_seed(args.seed)

    def complete(text: str) -> str:
        ids = tokenizer.encode(text)
        if not ids:
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        x = torch.tensor([ids], device=device)
        out = loaded.head.generate(
            x, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, eos_token_id=tokenizer.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        new = out[0, len(ids):].tolist()
        stops = set(tokenizer.eos_token_ids)
        for i, t in enumerate(new):
            if t in stops:
                new = new[:i]
                break
        # The embedding may have more rows than the tokenizer has ids (tiny preset: 512 vs 262 byte ids); an
        # untrained model can sample those rows, which have no text.
        unknown = sum(t >= tokenizer.vocab_size for t in new)
        if unknown:
            print(f"note: dropped {unknown} generated id(s) outside the tokenizer's vocab ({tokenizer.vocab_size})",
                  file=sys.stderr)
        return tokenizer.decode([t for t in new if t < tokenizer.vocab_size], skip_special_tokens=True)

    chat_format = getattr(tokenizer, "chat_format", "phi3")
    if not args.chat:
        text = complete(args.prompt)
        print(args.prompt + text if args.echo_prompt else text)
        return 0
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        reply = complete(chat_text(messages, chat_format, add_generation_prompt=True))
        print(f"user> {args.prompt}\nassistant> {reply}" if args.echo_prompt else reply)
        return 0
    print("chat: type a message, an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = complete(chat_text(messages, chat_format, add_generation_prompt=True))
        print(f"assistant> {reply}", flush=True)
        messages.append({"role": "assistant", "content": reply})
    return 0


def export_main(argv: list[str]) -> int:
    from typing import Optional

    p = _parser("export", "Write a Lightning checkpoint as a Hugging Face directory (config.json + safetensors) "
                          "that transformers' Phi3For* classes load. LoRA adapters are merged into the base weights "
                          "(original key names), unless --lora_only.")
    p.add_argument("--checkpoint", type=str, required=True, help="a Lightning .ckpt or FSDP2 checkpoint directory")
    p.add_argument("--output", type=str, required=True, help="the Hugging Face directory to write")
    p.add_argument("--dtype", type=Optional[str], default=None,
                   help="float32, bfloat16 or float16 for the saved weights; default: as trained")
    p.add_argument("--max_shard_size", type=str, default="5GB", help="largest safetensors shard ('5GB', '500MB')")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--lora_only", action="store_true",
                   help="LoRA checkpoints: write only the adapters (+ layers trained in full) as "
                        "adapter_model.safetensors + adapter_config.json instead of the merged model")
    args = p.parse_args(argv)

    from .modules.loading import export_adapter, export_checkpoint

    if args.lora_only:
        out = export_adapter(args.checkpoint, args.output, dtype=args.dtype, overwrite=args.overwrite)
    else:
        out = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                overwrite=args.overwrite)  # fmt: skip
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def compare_main(argv: list[str]) -> int:
    try:
        from .compare import main as compare
    except ModuleNotFoundError as e:
        if e.name in ("phi3_lightning.compare",):
            print("error: compare-attention is unavailable: the module phi3_lightning.compare is not part of this "
                  "installation yet", file=sys.stderr)
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


def _report(e: BaseException) -> None:
    if os.environ.get("PHI3_LIGHTNING_TRACEBACK"):
        traceback.print_exc()
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (raised at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    print(f"error: {e}{where}\n(set PHI3_LIGHTNING_TRACEBACK=1 for the full traceback)", file=sys.stderr)


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
            return generate_main(argv[1:])
        if command == "export":
            return export_main(argv[1:])
        if command == "compare-attention":
            return compare_main(argv[1:])
        if command in ("memory", "data-report"):
            return (memory_main if command == "memory" else data_report_main)(argv[1:])
        if command in LIGHTNING_COMMANDS:
            return run_lightning(None if from_sys else argv)
    except SystemExit as e:  # argparse / jsonargparse errors and --help; Lightning's SIGTERMException
        if type(e).__name__ == "SIGTERMException":  # preempted: never exit 0 (the guard sets 143 / 130)
            return e.code if isinstance(e.code, int) and e.code else 143
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        _report(e)
        return 1
    print(f"error: unknown command {command!r}\n\n{TOP_HELP}", file=sys.stderr)
    return 2
