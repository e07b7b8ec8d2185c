"""Command line: ``python -m phi3_lightning <command> ...``.

* ``fit`` / ``validate`` / ``test`` / ``predict``: LightningCLI. ``--config`` is repeatable (a base YAML, then
  overlays: ``--config configs/causal_lm.yaml --config configs/strategies/ddp.yaml``), ``--print_config`` shows the
  merged result, ``--help`` every field with its help text. The data module's ``num_labels`` / ``label_names`` /
  ``problem_type`` are linked into the model when both are instantiated.
* ``generate``: complete a prompt, or chat, with a Lightning checkpoint or a Hugging Face directory.
* ``export``: a Lightning checkpoint -> a Hugging Face directory (transformers loads it).
* ``compare-attention``: dispatches to :func:`phi3_lightning.compare.main`.

Runs are logged with TensorBoard under ``logs/<config names>/<attn backend>/version_N`` (checkpoints in its
``checkpoints/``), so ``tensorboard --logdir logs`` overlays runs that differ by config or backend;
``--ckpt_path last`` resumes the latest run of the same name in its own directory.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

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

`python -m phi3_lightning <command> --help` lists every option of a command with its help text.
fit / validate / test / predict also take --print_config (show the merged configuration and exit).
Runs log to TensorBoard under logs/ (tensorboard --logdir logs).
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
EXTRA_COMMANDS = ("generate", "export", "compare-attention")
RESERVED_CKPT = ("last", "best", "hpc", "registry")

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
    from lightning.pytorch.cli import LightningCLI

    from .modules import AtomicCheckpointIO, Phi3LightningModule, PredictionWriter, ThroughputMonitor

    try:  # field docstrings of dataclass settings (model.lora's LoRAConfig) become their --help text
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (ImportError, TypeError):  # older jsonargparse
        pass

    class Phi3CLI(LightningCLI):
        """LightningCLI with the Phi-3 modules, data modules, callbacks, run naming and input checks."""

        def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
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
                parser_kwargs={"prog": "python -m phi3_lightning",
                               "description": "Phi-3 with Lightning: one YAML to train, evaluate or predict."},
                args=args,
                run=run,
                **kwargs,
            )

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ThroughputMonitor, "throughput")
            parser.add_lightning_class_args(PredictionWriter, "predictions")
            # data.num_labels / data.label_names / data.problem_type -> the model, once the data module exists.
            # (The whole data module is the source, read with getattr: data modules without label facts, e.g.
            # causal LM, simply link nothing, and targets a module lacks are skipped.)
            for attr in ("num_labels", "label_names", "problem_type"):
                parser.link_arguments("data", f"model.init_args.{attr}", compute_fn=_DataFact(attr),
                                      apply_on="instantiate")  # fmt: skip

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            check_fsdp_accelerator(cfg.trainer)
            check_ckpt_path(cfg.get("ckpt_path"))
            name_run(cfg, self.subcommand)

        def instantiate_trainer(self, **kwargs: Any):
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
            return trainer

    return Phi3CLI


class _DataFact:
    """compute_fn of a link: ``getattr(datamodule, name, None)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, datamodule: Any) -> Any:
        return getattr(datamodule, self.name, None)


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
            "(logs/<run>/<backend>/version_N/checkpoints/last.ckpt), or 'last' / 'best'"
        )


def _config_stems(cfg: Any) -> list[str]:
    stems = []
    for c in cfg.get("config") or []:
        text = str(getattr(c, "relative", None) or c)
        stems.append(Path(text).stem)
    return stems


def _task_name(cfg: Any) -> str:
    cp = _class_path(cfg.get("model")) or "model"
    name = cp.rsplit(".", 1)[-1]
    return {"CausalLMModule": "causal_lm", "SequenceClassificationModule": "sequence_classification",
            "TokenClassificationModule": "token_classification"}.get(name, name.lower())  # fmt: skip


def latest_version(root: Path) -> str | None:
    """The most recently written version_* directory under ``root`` that holds a last checkpoint."""
    best, best_time = None, -1.0
    if not root.is_dir():
        return None
    for d in root.iterdir():
        ckpts = list((d / "checkpoints").glob("last*.ckpt")) if d.is_dir() else []
        for c in ckpts:
            t = c.stat().st_mtime
            if t > best_time:
                best, best_time = d.name, t
    return best


def name_run(cfg: Any, subcommand: str | None) -> None:
    """TensorBoardLogger with name "auto": ``<config stems joined by +>/<attn backend>`` under save_dir.

    ``fit --ckpt_path last`` keeps logging (and checkpointing) in the latest version directory of that name.
    """
    loggers = cfg.trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    model_args = getattr(cfg.get("model"), "init_args", None)
    attn = getattr(model_args, "attn_implementation", None) or "sdpa"
    stems = _config_stems(cfg) or [_task_name(cfg)]
    for logger in loggers:
        cp = _class_path(logger)
        if cp is None or not cp.endswith("TensorBoardLogger"):
            continue
        args = logger.init_args
        if args.get("name") in (None, "auto"):
            args.name = f"{'+'.join(stems)}/{attn}"
        if subcommand == "fit" and cfg.get("ckpt_path") == "last" and args.get("version") is None:
            version = latest_version(Path(str(args.get("save_dir") or "logs")) / args.name)
            if version is not None:
                args.version = version


def run_lightning(argv: list[str] | None) -> int:
    cli_cls = _cli_class()
    cli_cls(args=argv)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# generate / export / compare-attention
# ----------------------------------------------------------------------------------------------------------------------


def _parser(prog: str, description: str):
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=f"python -m phi3_lightning {prog}", description=description, default_env=False)


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
        print(complete(args.prompt))
        return 0
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        print(complete(chat_text(messages, chat_format, add_generation_prompt=True)))
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
