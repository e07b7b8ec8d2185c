"""Run identity for fit / validate / test / predict.

A run is ``<save_dir>/<run name>/version_N`` (the name defaults to ``<config stems joined by +>/<attn backend>``).
``--ckpt_path last|best`` resolve within one run; settings given with ``--ckpt_path`` are checked against the
checkpoint; evaluation logs under the run it evaluates; ``fit`` holds a lock file with its pid while it writes.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, clean_stale_staging, default_mode, pid_alive, staging_path
from . import UsageError

LOCK_FILE = "fit.lock"
# What a command writes into its log directory before it has run: the settings, fit's lock, and TensorBoard events
# holding only the file header and the run's settings table (Phi3ThroughputMonitor's "run" text). A directory
# holding nothing else is the trace of a command that never ran (see unstarted_run).
SETUP_FILES = ("config.yaml", "hparams.yaml", LOCK_FILE)
SETUP_TEXT_TAGS = ("run/text_summary",)
# Model settings that do not change the weights: with --ckpt_path the command line's value is used.
EXECUTION_SETTINGS = (
    "attn_implementation",
    "activation_checkpointing",
    "torch_compile",
    "compile_mode",
    "fused_kernels",
    "optimizer_in_backward",
    "meta_init",
    "strict_head",
)
# Settings whose state resumes from the checkpoint in fit (and that evaluation does not use).
TRAINING_SETTINGS = ("optimizer", "lr_scheduler")
# Data settings that do not change the training rows or their order: free to change when fit resumes. Every other
# data setting must equal the checkpoint's (the loader's position means "batch k of these rows").
DATA_EXECUTION_SETTINGS = (
    "num_workers",
    "progress",
    "cache_dir",
    "eval_batch_size",
    "padding_side",
    "pad_to_multiple_of",
    "tokenizer",  # compared for every command below
)
# A split file and the fraction of train carved out for that split when the file is not given: the file changes the
# training rows only by switching the carving on or off (see _data_setting_differs).
SPLIT_FILES = {"val_file": "val_fraction", "test_file": "test_fraction"}
# Data settings that may name a local file or directory: the same one spelled relative or absolute is no change.
PATH_DATA_SETTINGS = ("train_file", "source")
# Linked from the data module at instantiation; checked against the checkpoint once the model exists.
LABEL_FACTS = ("num_labels", "label_names", "problem_type", "id2label", "label2id")

FSDP_ON_CPU = (
    "FSDPStrategy (FSDP1) needs CUDA GPUs, but this run is on the CPU (accelerator={accelerator!r}). To shard on CPU "
    "(gloo) use FSDP2 through ModelParallelStrategy: --config configs/strategies/fsdp2.yaml; on GPUs "
    "configs/strategies/fsdp.yaml works"
)


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


def normalize_ckpt_path(ckpt_path: Any, default_root_dir: Any = None) -> str | None:
    """Every ``--ckpt_path`` as a local path (or ``last`` / ``best``), so the same checks apply to all of them:
    ``file://...`` becomes its path, ``hpc`` the newest ``hpc_ckpt_N.ckpt`` of the trainer's root directory (what
    Lightning would load); ``registry`` and other URLs are refused (a checkpoint is checked before use, and this
    package reads local files only)."""
    if ckpt_path is None:
        return None
    text = str(ckpt_path)
    if text.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(text).path)
    if text == "hpc":
        root = Path(str(default_root_dir or os.getcwd())).expanduser()
        found = sorted(
            root.glob("hpc_ckpt_*.ckpt"),
            key=lambda p: int(p.stem.rsplit("_", 1)[-1] or 0) if p.stem.rsplit("_", 1)[-1].isdigit() else -1,
        )
        if not found:
            raise UsageError(
                f"--ckpt_path hpc: no hpc_ckpt_N.ckpt in {root} (Lightning's SLURM checkpoints); pass the "
                "checkpoint file, or 'last' / 'best' of the run"
            )
        return str(found[-1])
    if text == "registry" or "://" in text:
        raise UsageError(
            f"--ckpt_path {text}: remote checkpoints are not read (phi3_lightning checks every checkpoint "
            "before using it and reads local files only); download it and pass the local path"
        )
    return text


def check_ckpt_path(ckpt_path: Any) -> None:
    """A (normalized, see :func:`normalize_ckpt_path`) checkpoint path that is not ``last`` / ``best`` must exist."""
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
    from ..modules.tasks import task_name

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
        raise UsageError(
            "--run_name / --run_version name a TensorBoard run, but this configuration has no "
            "TensorBoardLogger (trainer.logger); remove them or use the default logger"
        )
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
                raise UsageError(
                    f"--run_version {run_version} and --trainer.logger.init_args.version {given} "
                    "disagree; give one of them"
                )
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
        raise UsageError(
            f"--ckpt_path {cfg.ckpt_path} looks in the run's TensorBoard directory, but this configuration "
            "has no TensorBoardLogger and no ModelCheckpoint dirpath; pass the checkpoint file instead"
        )
    args = loggers[0].init_args
    root = _run_root(args)
    version = _version_dir_name(args.get("version"))
    if version is None:
        candidates = (
            sorted(
                (d for d in root.iterdir() if _checkpoint_files(d / "checkpoints")), key=lambda d: (len(d.name), d.name)
            )
            if root.is_dir()
            else []
        )
        if not candidates:
            raise UsageError(
                f"--ckpt_path {cfg.ckpt_path}: run {args.name!r} has no checkpoints (looked in {root}/version_*/"
                "checkpoints); train it first, name the run that has them with --run_name NAME, or pass a .ckpt file"
            )
        if len(candidates) > 1:
            listing = ", ".join(
                f"{d.name} ({', '.join(p.name for p in _checkpoint_files(d / 'checkpoints'))})" for d in candidates
            )
            raise UsageError(
                f"--ckpt_path {cfg.ckpt_path} is ambiguous: run {args.name!r} ({root}) has {len(candidates)} versions "
                f"with checkpoints: {listing}; pick one with --run_version N (e.g. --run_version "
                f"{candidates[-1].name.removeprefix('version_')}), or give each run its own --run_name"
            )
        version = candidates[0].name
    vdir = root / version
    return vdir / "checkpoints", vdir, f"run {args.name!r} {version} ({vdir})"


def _last_in(ckdir: Path) -> Path | None:
    """The run's newest ``last*.ckpt``: the one holding the highest ``global_step`` (a preempted-then-resumed run may
    hold ``last.ckpt`` and ``last-v1.ckpt``; never the older one), the newer file (mtime) on a tie."""
    lasts = [p for p in _checkpoint_files(ckdir) if p.name.startswith("last")]
    if len(lasts) <= 1:
        return lasts[0] if lasts else None
    return max(lasts, key=lambda p: (_global_step_of(p), p.stat().st_mtime_ns))


def _global_step_of(path: Path) -> int:
    step = read_checkpoint(path).get("global_step")
    if not isinstance(step, int):
        raise UsageError(
            f"--ckpt_path last: {path} records no global_step, so which of the run's last*.ckpt files is newest "
            "is unknown; pass a checkpoint file"
        )
    return step


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
        raise UsageError(
            f"--ckpt_path best is ambiguous in {where}: several ModelCheckpoint callbacks recorded a best "
            f"checkpoint ({', '.join(map(str, found))}); pass the file"
        )
    files = [p for p in _checkpoint_files(ckdir) if p.name.startswith("best")]
    if len(files) == 1 and not recorded:
        return files[0]
    if recorded:
        raise UsageError(
            f"--ckpt_path best: {where} recorded its best checkpoint as {', '.join(map(str, recorded))}, "
            "which no longer exists; pass a checkpoint file"
        )
    if files:
        raise UsageError(
            f"--ckpt_path best is ambiguous in {where}: no last.ckpt records which is best and there are "
            f"{len(files)} best*.ckpt files ({', '.join(p.name for p in files)}); pass one of them"
        )
    raise UsageError(
        f"--ckpt_path best: {where} has no best checkpoint (no ModelCheckpoint with a monitor saved one, "
        "and no best*.ckpt); use --ckpt_path last or pass a file"
    )


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
                raise UsageError(
                    f"--ckpt_path last: {where} has no last.ckpt (its checkpoints: "
                    f"{', '.join(p.name for p in _checkpoint_files(ckdir)) or 'none'}); "
                    "pass a checkpoint file or use --ckpt_path best"
                )
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
    from ..modules.safe_load import UnsafeCheckpointError, load_checkpoint_file, verify_checkpoint

    path = Path(path)
    try:
        if path.is_dir():
            if not any(path.glob("*.metadata")):
                raise UsageError(
                    f"{path} is a directory but not a distributed (FSDP2) checkpoint (it has no .metadata index); "
                    "pass a .ckpt file written by fit (e.g. logs/<run>/<backend>/version_0/checkpoints/last.ckpt), "
                    "or --ckpt_path last / best"
                )
            verify_checkpoint(path)
            return {}
        ckpt = load_checkpoint_file(path, mmap=True)
    except UnsafeCheckpointError:
        raise
    except ValueError as e:
        raise UsageError(
            f"cannot read checkpoint {path}: {e}. The file is truncated or corrupt (an interrupted copy "
            "or write?) or not a checkpoint written by fit; use another checkpoint of the run "
            "(--ckpt_path best, or last)"
        ) from None
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

        from ..model.lora import as_lora_config

        value = _plain(dataclasses.asdict(as_lora_config(value)))
    elif key in TRAINING_SETTINGS and isinstance(value, dict):
        # keys only one side spells out (defaults) are not differences: compare what both name
        args_key = "init_args"
        value = {"class_path": value.get("class_path"), args_key: value.get(args_key) or {}}
    return value


def _data_setting_differs(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether data setting ``key`` (in both ``old``, the checkpoint's, and ``new``) may change the training rows."""
    a, b = _plain(old[key]), new[key]
    if key in SPLIT_FILES:  # a missing split file means "carve it out of train" when its fraction is > 0
        if (a is None) == (b is None):
            return False  # another val/test file, or none on both sides: train is the same
        fraction = (old if a is None else new).get(SPLIT_FILES[key])
        return bool(fraction)
    split_file = next((f for f, frac in SPLIT_FILES.items() if frac == key), None)
    if split_file is not None and old.get(split_file) is not None and new.get(split_file) is not None:
        return False  # the split comes from its file on both sides: the fraction carves nothing
    if key in PATH_DATA_SETTINGS and isinstance(a, str) and isinstance(b, str) and a != b:
        try:
            return not os.path.samefile(a, b)  # relative vs absolute, or via a symlink: the same file
        except OSError:
            return True  # not both local paths (a dataset name, a missing file): compared as written
    return True


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
    data_hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    data_args = _plain(getattr(cfg.get("data"), "init_args", None) or {})
    if subcommand == "fit" and data_args and data_hparams:
        for key, ckpt_value in data_hparams.items():
            if key.startswith("_") or key not in data_args or key in DATA_EXECUTION_SETTINGS:
                continue
            if not _data_setting_differs(key, data_hparams, data_args):
                continue
            diff = _differences(_plain(ckpt_value), data_args[key], key)
            problems += [(f"data.init_args.{k}", a, b, "data") for k, a, b in diff]
    if not problems:
        return
    name, old, new, key = problems[0]
    more = f" (also: {', '.join(p[0] for p in problems[1:])})" if len(problems) > 1 else ""
    if key == "data":
        why = (
            "fit resumes the checkpoint's epoch at its next batch, which needs the same training rows in the same "
            "order; set it back to the checkpoint's value, or train on other data as a new run from the weights: "
            f"python -m phi3_lightning export --checkpoint {path} --output DIR, then fit --model.init_args.model DIR "
            "without --ckpt_path"
        )
    elif key in TRAINING_SETTINGS:
        why = (
            "the optimizer and LR-scheduler state resume from the checkpoint, so the new value would not be used; "
            "set it back to the checkpoint's value, or train on with other settings as a new run from the "
            f"weights: python -m phi3_lightning export --checkpoint {path} --output DIR, then fit "
            "--model.init_args.model DIR without --ckpt_path"
        )
    else:
        why = (
            "the checkpoint was built with it and its weights only fit that; remove the setting or set it to the "
            "checkpoint's value (or start a new run without --ckpt_path)"
        )

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
        raise UsageError(
            f"--ckpt_path {path} was trained on {ckpt_config['num_labels']} labels {names(ckpt_config)}, "
            f"but the data here has {here.get('num_labels')} labels {names(here)}; evaluate it on data "
            "with the same labels (in the same order)"
        )


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _run_root(args: Any) -> Path:
    """``<save_dir>/<name>`` of a TensorBoard logger's init args: the directory holding the run's versions."""
    return Path(str(args.get("save_dir") or "logs")).expanduser() / str(args.name)


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
            elif (version := _version_dir_name(args.get("version"))) is not None and _same_dir(
                _run_root(args) / version, run_dir
            ):
                args.version = None  # --run_version picked the source run: training from it starts a new version
            continue
        if not _same_dir(_run_root(args), run_dir.parent):
            args.save_dir, args.name = str(run_dir.parent.parent), run_dir.parent.name
        args.version = run_dir.name
        if args.get("sub_dir") is None:
            args.sub_dir = subcommand


def check_fit_version_is_free(cfg: Any, requested: str | None) -> None:
    """``fit`` into a version directory given explicitly (``--run_version N``, the logger's ``version``) that already
    holds a run (checkpoints or TensorBoard events) must continue that run (``--ckpt_path last``): a second training
    there would mix its events with the first one's over the same steps, overwrite ``config.yaml`` and write
    ``last-v1.ckpt`` beside ``last.ckpt``, of which ``--ckpt_path last`` takes the higher step, i.e. maybe the other
    run's. Checked on rank zero only (the launched ranks start while rank zero already holds the directory)."""
    if requested == "last" or not _is_rank_zero():
        return
    for logger in _tensorboard_loggers(cfg):
        args = logger.init_args
        version = _version_dir_name(args.get("version"))
        if version is None:
            continue  # the logger takes the next free version_N
        vdir = _run_root(args) / version
        held = [p.name for p in _checkpoint_files(vdir / "checkpoints")]
        events = sorted(vdir.glob("events.out.tfevents.*")) if vdir.is_dir() else []
        if not held and (not events or unstarted_run(vdir)):
            continue  # free, or only what a fit killed before it ran left (its lock, if live, still refuses)
        what = f"checkpoints {', '.join(held)}" if held else f"{len(events)} TensorBoard event file(s)"
        raise UsageError(
            f"{vdir} already holds a run ({what}): fit{f' --ckpt_path {requested}' if requested else ''} would "
            f"train another model into it and mix the two; continue that run with --run_version "
            f"{version.removeprefix('version_')} --ckpt_path last, or start a new version (leave out --run_version "
            "/ --trainer.logger.init_args.version, or give an unused one)"
        )


def _events_hold_only_setup(path: Path) -> bool:
    """Whether a TensorBoard events file holds nothing but its header (and a resumed run's purge marker) and the
    run's settings table; an unreadable one counts as holding something."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        for event in EventFileLoader(str(path)).Load():
            kind = event.WhichOneof("what")
            if kind in ("file_version", "session_log"):  # the header; the purge marker of a resume (purge_step)
                continue
            if kind == "summary" and all(v.tag in SETUP_TEXT_TAGS for v in event.summary.value):
                continue
            return False
    except Exception:
        return False
    return True


def unstarted_run(d: Path) -> bool:
    """Whether log directory ``d`` holds only what a command writes before it runs (:data:`SETUP_FILES` and settings-
    only events files at its top, empty subdirectories such as ``checkpoints/``): no metric, no checkpoint, no file of
    anyone else. Such a directory is what a failed or killed command left, never a run."""
    d = Path(d)
    if not d.is_dir() or d.is_symlink():
        return False
    for p in d.rglob("*"):
        if p.is_symlink():
            return False
        if p.is_dir():
            continue
        if p.parent != d:
            return False
        if p.name in SETUP_FILES:
            continue
        if not (p.name.startswith("events.out.tfevents.") and _events_hold_only_setup(p)):
            return False
    return True


def first_new_dir(path: Path) -> Path | None:
    """The topmost directory of ``path`` (``path`` itself included) that does not exist yet, None when it exists."""
    path = Path(path).absolute()
    if path.exists():
        return None
    top = path
    while not top.parent.exists():
        top = top.parent
    return top


def _files_state(dirs: list[Path]) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file under ``dirs`` but setup and events files: the checkpoints (files, FSDP2
    directories) and anything else a command wrote there."""
    out = {}
    for d in dirs:
        for f in d.rglob("*") if d.is_dir() else []:
            if f.is_file() and f.name not in SETUP_FILES and not f.name.startswith("events.out.tfevents."):
                st = f.stat()
                out[str(f.absolute())] = (st.st_mtime_ns, st.st_size)
    return out


class SetupTrace:
    """What a command writes into its log directory before it runs, undone when it fails before it ran: a log
    directory it created (``version_N``, ``version_N/<command>``) and that holds only setup files
    (:func:`unstarted_run`) is removed with the empty directories created above it, so the next run takes the same
    version; in a directory that existed (``fit --ckpt_path last``) its new settings-only events files are removed
    and ``config.yaml`` / ``hparams.yaml`` put back as they were (``config.yaml`` records what ran). Nothing is undone
    once a checkpoint was written (in ``checkpoint_dirs`` or the log directory) or a metric logged."""

    def __init__(
        self, log_dir: Path, checkpoint_dirs: list[Path] | tuple[Path, ...] = (), new_dir: Path | None = None
    ) -> None:
        """``new_dir``: the topmost directory this command already created for ``log_dir`` (claim_new_version);
        None: whichever of ``log_dir`` and its parents does not exist yet."""
        self.log_dir = Path(log_dir).absolute()
        self.new_dir = Path(new_dir).absolute() if new_dir is not None else first_new_dir(self.log_dir)
        self.checkpoint_dirs = [self.log_dir, *(Path(d).absolute() for d in checkpoint_dirs)]
        self.files = _files_state(self.checkpoint_dirs)
        self.events = set(self.log_dir.glob("events.out.tfevents.*"))
        self.setup_files = {n: (self.log_dir / n).read_bytes() for n in SETUP_FILES if (self.log_dir / n).is_file()}

    def undo(self, keep: tuple[str, ...] = ()) -> bool:
        """Undo the setup traces when the command wrote nothing of value; whether it did. ``keep``: top-level names
        left in place (a lock the caller still holds and releases itself); call :meth:`remove_empty_dirs` after.
        What another process wrote there (a live command starting in the same directory: its events file, its lock)
        is never removed: with such a file in a directory taken for new, nothing is undone."""
        if _files_state(self.checkpoint_dirs) != self.files:
            return False  # a checkpoint (or anything else) was written
        if not _lock_is_mine_or_absent(self.log_dir / LOCK_FILE):
            return False  # a live fit's directory (this command was refused its lock, or raced it)
        if self.new_dir is not None:
            if not unstarted_run(self.log_dir) or not (
                self.log_dir == self.new_dir or self.new_dir in self.log_dir.parents
            ):
                return False
            if not all(_written_here(p) for p in self.log_dir.glob("events.out.tfevents.*")):
                return False  # another process writes here too
            for p in sorted(self.log_dir.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                if p.is_dir():
                    p.rmdir()
                elif p.name not in keep or p.parent != self.log_dir:
                    p.unlink()
            return True
        new_events = {p for p in set(self.log_dir.glob("events.out.tfevents.*")) - self.events if _written_here(p)}
        if not all(_events_hold_only_setup(p) for p in new_events):
            return False
        for p in new_events:
            p.unlink()
        for name in ("config.yaml", "hparams.yaml"):  # (the lock is the caller's)
            if name in self.setup_files:
                atomic_write_bytes(self.log_dir / name, self.setup_files[name])
            else:
                (self.log_dir / name).unlink(missing_ok=True)
        return True

    def remove_empty_dirs(self) -> None:
        """The created log directory and those above it up to the topmost one created, each while it is empty."""
        if self.new_dir is not None:
            remove_empty_dirs(self.log_dir, self.new_dir)


def _written_here(events: Path) -> bool:
    """Whether a TensorBoard events file was created by this process (SummaryWriter names it
    ``events.out.tfevents.<time>.<host>.<pid>.<n>``)."""
    return f".{socket.gethostname()}.{os.getpid()}." in events.name


def _lock_is_mine_or_absent(lock: Path) -> bool:
    if not lock.exists():
        return True
    pid, host = _parse_owner(lock)
    return pid == os.getpid() and host in ("", socket.gethostname())


def remove_empty_dirs(d: Path, top: Path) -> None:
    """``d`` and its parents up to ``top`` (included), each while it is empty (one already gone is skipped)."""
    d, top = Path(d).absolute(), Path(top).absolute()
    while d == top or top in d.parents:
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return
        d = d.parent


def _is_rank_zero() -> bool:
    """Before the strategy sets ranks: launched worker processes carry their rank in the environment."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "0").strip() not in ("", "0"):
            return False
    return True


def claim_new_version(logger: Any) -> Path | None:
    """Create the directory of a logger's next free ``version_N`` exclusively, moving on to the next number while
    another process takes one first (two fits started at once on one run name both list the versions before either
    creates one: without this both took ``version_0``). Only for a logger whose version is picked automatically (not
    yet read, none given); returns the directory it created (the logger's log directory, or its parent with a
    ``sub_dir``), None when it created none."""
    if getattr(logger, "_version", "given") is not None or not hasattr(logger, "_get_next_version"):
        return None
    root = Path(logger.root_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(10_000):
        version = logger._get_next_version()
        try:
            (root / f"version_{version}").mkdir()
        except FileExistsError:
            continue  # taken between the listing and now: the next listing sees it
        logger._version = version
        return root / f"version_{version}"
    raise FileExistsError(f"could not claim a new version directory under {root}: other processes keep taking them")


def _create_with(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, failing with ``FileExistsError`` when it exists; readers never see it empty
    or half written (written beside it, then hard-linked into place: ``link`` never replaces a file)."""
    staged = staging_path(path)  # a dead writer's is removed by the next RunLock.acquire (clean_stale_staging)
    with open(staged, "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(staged, default_mode())
    try:
        os.link(staged, path)
    except OSError as e:
        if isinstance(e, FileExistsError) or not hasattr(os, "link"):
            raise
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, default_mode())  # no hard links here
        with os.fdopen(fd, "w") as f:
            f.write(text)
    finally:
        staged.unlink(missing_ok=True)


def _parse_owner(path: Path) -> tuple[int | None, str]:
    """(pid, host) written in a lock file; (None, "") when it is unreadable or holds no pid."""
    try:
        pid, _, host = path.read_text().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


class RunLock:
    """``<version dir>/fit.lock`` holding "pid host" while fit writes into that directory (``created``: the caller
    made the directory for this run, see :func:`claim_new_version`)."""

    def __init__(self, run_dir: Path, created: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.created_dir = created
        self.held = False

    def _owner(self) -> tuple[int | None, str]:
        return _parse_owner(self.path)

    def acquire(self) -> None:
        self.created_dir = self.created_dir or not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(self.path)  # a killed fit's half-made lock or moved-aside stale lock
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(100):
            try:
                _create_with(self.path, me)
            except FileExistsError:
                pass
            else:
                self.held = True
                return
            pid, host = self._owner()
            if pid is not None and host not in ("", socket.gethostname()):
                raise UsageError(
                    f"{self.run_dir} is locked by pid {pid} on host {host} ({self.path}): another fit "
                    "writes into this run; use another --run_name, or delete the lock file if that "
                    "process is gone"
                ) from None
            if pid is not None and pid != os.getpid() and pid_alive(pid):
                raise UsageError(
                    f"{self.run_dir} is in use: fit process {pid} holds {self.path}; wait for it to end, "
                    "or train under another --run_name (or a new version without --ckpt_path last)"
                ) from None
            if self._take_over((pid, host)):
                print(f"note: taking over the stale lock {self.path} (pid {pid} is not running)", file=sys.stderr)
        raise UsageError(f"could not take {self.path}: other fits keep taking it; retry, or use another --run_name")

    def _take_over(self, stale: tuple[int | None, str]) -> bool:
        """Move the stale lock aside (one rename: of two fits taking it over at once, one moves it), but only the
        lock judged stale: when what was moved is another fit's fresh lock, it is put back. Then the caller creates
        its own lock exclusively, as at first; whoever loses that finds the winner's live lock and is refused."""
        aside = staging_path(self.path)
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another fit moved it first
        moved = _parse_owner(aside)
        if moved != stale:  # a fit took the lock over between our reading and our rename: its lock goes back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

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
