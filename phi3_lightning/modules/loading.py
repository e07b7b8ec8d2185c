"""Rebuild a head from any checkpoint this package writes or reads, and export Lightning checkpoints.

Accepted by :func:`load_head`:

* a Hugging Face directory (``config.json`` + safetensors): the head named by ``architectures``;
* a Lightning ``.ckpt`` file written by ``fit`` (full state dict);
* a Lightning distributed checkpoint directory (FSDP2 with ``save_distributed_checkpoint: true``): ``meta.pt`` +
  the torch.distributed.checkpoint shards, read without a process group.

Lightning checkpoints carry a ``phi3_lightning`` entry (task, config, tokenizer, LoRA settings) written by the
LightningModule, so nothing but the file is needed. A LoRA-trained checkpoint is rebuilt with its adapters, which
are then merged into the base weights (``merge_lora``): the head has the original module tree and key names, so
``export`` writes a plain Hugging Face checkpoint. :func:`export_adapter` writes the adapters alone instead.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import recover_interrupted, staged_directory
from ..model import ARCHITECTURE_TASKS, DEFAULT_BACKEND, HEADS, Phi3Config
from ..model.checkpoint import resolve_dtype
from ..model.heads import Phi3PreTrainedHead
from ..model.lora import LoRAConfig, apply_lora, as_lora_config, merge_lora
from ..model.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_adapter_files
from .base import CHECKPOINT_KEY, resolve_model
from .safe_load import load_checkpoint_file, load_distributed
from .tasks import task_name

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
EXPORT_INFO = "phi3_lightning.json"


@dataclass
class LoadedHead:
    head: Phi3PreTrainedHead
    task: str
    tokenizer: str | None
    """Tokenizer spec for :func:`phi3_lightning.data.load_tokenizer` (``"byte"`` or a directory), if known."""
    source: str
    lora: LoRAConfig | None = None
    """The LoRA settings it was trained with (the adapters are merged unless ``load_head(merge_lora=False)``)."""
    base_model: str | None = None
    """The Hugging Face directory the run's weights were loaded from (``model``), if it was one."""
    trained_dtype: torch.dtype | None = None
    """The dtype of a Lightning ``.ckpt``'s weights (bfloat16 after ``bf16-true``): what ``export`` writes unless told
    otherwise (the head itself is built in the default dtype, float32, so the merge loses nothing)."""


def is_lightning_checkpoint(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / "meta.pt").is_file())


def _info_from_hparams(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Older/foreign checkpoints without the phi3_lightning entry: rebuild from the module's hyper-parameters."""
    hp = dict(ckpt.get("hyper_parameters") or {})
    task = task_name(hp.get("_class_path", ""))
    if task not in HEADS:
        raise ValueError(
            "the checkpoint has neither a 'phi3_lightning' entry nor a known module class path; was it "
            "written by phi3_lightning fit?"
        )
    overrides = dict(hp.get("config_overrides") or {})
    if hp.get("label_names"):
        overrides["id2label"] = {str(i): n for i, n in enumerate(hp["label_names"])}
        overrides["num_labels"] = len(hp["label_names"])
    elif hp.get("num_labels"):
        overrides["num_labels"] = hp["num_labels"]
    config, _ = resolve_model(hp.get("model", "tiny"), overrides)
    kwargs = {"pooling": hp["pooling"]} if task == "sequence_classification" and "pooling" in hp else {}
    return {
        "task": task,
        "config": config.to_dict(),
        "head_kwargs": kwargs,
        "attn_implementation": hp.get("attn_implementation", DEFAULT_BACKEND),
        "lora": hp.get("lora"),
    }


def _stored_dtype(state: dict[str, Any]) -> torch.dtype | None:
    """The floating-point dtype holding most of the checkpoint's numbers, or None."""
    count: dict[torch.dtype, int] = {}
    for t in state.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get) if count else None


def _strip(key: str) -> str:
    key = key.replace("_orig_mod.", "")
    return key[len("head.") :] if key.startswith("head.") else key


def _load_lightning(path: Path, attn: str | None, device, dtype, merge: bool = True) -> LoadedHead:
    distributed = path.is_dir()
    ckpt = load_checkpoint_file(path / "meta.pt" if distributed else path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} does not hold a Lightning checkpoint (got a {type(ckpt).__name__})")
    info = ckpt.get(CHECKPOINT_KEY) or _info_from_hparams(ckpt)
    task = info["task"]
    config = Phi3Config.from_dict(info["config"])
    head_cls = HEADS[task]
    head = head_cls(config, attn or info.get("attn_implementation", DEFAULT_BACKEND), **(info.get("head_kwargs") or {}))
    lora = as_lora_config(info.get("lora"))
    if lora is not None:
        apply_lora(head, lora)  # the checkpoint holds base weights + adapters under the adapted key names
    own = head.state_dict()
    if distributed:
        wanted = {"state_dict": {f"head.{k}": v for k, v in own.items()}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: loading on one process"
            load_distributed(wanted, path)
        state = {_strip(k): v for k, v in wanted["state_dict"].items()}
    else:
        if "state_dict" not in ckpt:
            raise ValueError(f"{path} has no state_dict; is it a Lightning checkpoint?")
        state = {_strip(k): v for k, v in ckpt["state_dict"].items()}
    for key, tensor in state.items():
        if key in own and tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)} but the {task} head built from the "
                f"checkpoint's config expects {tuple(own[key].shape)}"
            )
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: state dict does not match the {task} head (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    head.tie_weights()
    if lora is not None and merge:
        merge_lora(head)  # W + B @ A * alpha / r, in fp32, stored in the trained dtype; original keys again
        head.requires_grad_(True)
    head.to(device=device, dtype=dtype)
    tok = info.get("tokenizer") or (ckpt.get("datamodule_hyper_parameters") or {}).get("tokenizer")
    base = info.get("base_model")
    if base is None:  # checkpoints written before base_model was recorded: the module's model argument
        model_arg = (ckpt.get("hyper_parameters") or {}).get("model")
        if isinstance(model_arg, str) and (Path(model_arg).expanduser() / "config.json").is_file():
            base = str(Path(model_arg).expanduser())
    trained = None if distributed else _stored_dtype(state)
    return LoadedHead(head.eval(), task, tok if isinstance(tok, str) else None, str(path), lora, base, trained)


def _load_hf(path: Path, attn: str | None, device, dtype) -> LoadedHead:
    config = json.loads((path / "config.json").read_text())
    arch = (config.get("architectures") or ["Phi3ForCausalLM"])[0]
    task = ARCHITECTURE_TASKS.get(arch, "causal_lm")
    info = json.loads((path / EXPORT_INFO).read_text()) if (path / EXPORT_INFO).is_file() else {}
    head = HEADS[task].from_pretrained(
        path, attn_implementation=attn or DEFAULT_BACKEND, dtype=dtype, device=device, **(info.get("head_kwargs") or {})
    )
    tok = str(path) if (path / "tokenizer.json").is_file() else info.get("tokenizer")
    return LoadedHead(head.eval(), task, tok, str(path))


def load_head(
    path: str | Path,
    attn_implementation: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    merge_lora: bool = True,
) -> LoadedHead:
    """A ready (eval-mode) head from a Hugging Face directory or a Lightning checkpoint (file or FSDP2 directory).

    ``merge_lora``: a LoRA-trained Lightning checkpoint comes back with its adapters merged into the base weights
    (true) or still wrapped in ``LoRALinear`` (false; e.g. for :func:`~phi3_lightning.model.lora.lora_state_dict`).
    """
    p = Path(path).expanduser()
    if not p.exists():
        recover_interrupted(p)  # an export/save killed between the two renames of its directory swap
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass a Lightning .ckpt (e.g. logs/<run>/<backend>/version_0/"
            "checkpoints/last.ckpt) or a Hugging Face directory with config.json"
        )
    dtype = resolve_dtype(dtype)
    if p.is_dir() and (p / "config.json").is_file():
        return _load_hf(p, attn_implementation, device, dtype)
    if is_lightning_checkpoint(p):
        return _load_lightning(p, attn_implementation, device, dtype, merge=merge_lora)
    raise FileNotFoundError(
        f"{p} is a directory with neither config.json (Hugging Face) nor meta.pt (Lightning distributed checkpoint)"
    )


# What an export writes: the names an export of an older version (whose phi3_lightning.json lists no files) may
# have written, so --overwrite may replace them. A current export records its files in phi3_lightning.json.
_EXPORT_NAMES = re.compile(
    r"config\.json|model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|"
    + "|".join(re.escape(n) for n in (EXPORT_INFO, ADAPTER_WEIGHTS, ADAPTER_CONFIG, *TOKENIZER_FILES))
)


def _export_record(out: Path) -> dict[str, Any] | None:
    """The ``phi3_lightning.json`` an export wrote into ``out`` (it names ``exported_from``), or None."""
    try:
        info = json.loads((out / EXPORT_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("exported_from"), str) else None


def _exported_files(out: Path, info: dict[str, Any]) -> set[str]:
    """The entries of a previous export ``out`` that it wrote: those its ``phi3_lightning.json`` lists, or (an
    export that lists none) the names an export writes."""
    files = info.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return {*files, EXPORT_INFO}
    return {p.name for p in out.iterdir() if _EXPORT_NAMES.fullmatch(p.name)}


def _shown(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _check_output(out: Path, overwrite: bool) -> set[str]:
    """Refuse an output that exists and is not empty unless it is a previous export (a ``phi3_lightning.json``
    written by export) holding only what that export wrote, and ``overwrite`` is set: ``--overwrite`` replaces a
    previous export, it never deletes a user's files. Returns the entries the new export may replace."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file, not a directory; choose another output directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return set()
    info = _export_record(out)
    if info is None:
        raise FileExistsError(
            f"{out} is not empty and is not a previous export (it has no {EXPORT_INFO} written by export; it holds "
            f"{_shown(entries)}); export only writes into a new or empty directory or replaces a previous export, "
            "even with --overwrite, so it would not delete these files. Choose a new or empty output directory"
        )
    owned = _exported_files(out, info)
    foreign = [n for n in entries if n not in owned]
    if foreign:
        raise FileExistsError(
            f"{out} is a previous export but also holds files that export did not write ({_shown(foreign)}); "
            "--overwrite only replaces what a previous export wrote and would delete them. Move them away or "
            "choose another output directory"
        )
    if not overwrite:
        raise FileExistsError(
            f"{out} holds a previous export; pass --overwrite to replace it or choose another directory"
        )
    return owned


def _record_files(tmp: Path, info: dict[str, Any]) -> None:
    """Write ``phi3_lightning.json`` listing every file this export wrote (so ``--overwrite`` replaces only them)."""
    info["files"] = sorted({p.name for p in tmp.iterdir()} | {EXPORT_INFO})
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint's head as a Hugging Face directory that transformers loads (``Phi3For*``).

    Everything is written into a staging sibling directory that is swapped in at the end (old export or new, never a
    mix). With ``overwrite`` a previous export is replaced; a directory holding anything else is refused. The
    tokenizer files are copied when the run used a Hugging Face tokenizer; ``phi3_lightning.json`` records the
    tokenizer spec (e.g. ``"byte"``) for ``generate``.
    """
    out = Path(output).expanduser()
    owned = _check_output(out, overwrite)
    loaded = load_head(checkpoint, dtype=None)  # float32: a LoRA merge is computed and kept there, rounded once below
    dtype = resolve_dtype(dtype) or loaded.trained_dtype  # --dtype's default: as trained
    if getattr(loaded.head, "pooling", "last") != "last":
        warnings.warn(
            f"{checkpoint} pools with pooling={loaded.head.pooling!r}, which transformers' Phi3ForSequenceClassification "
            "does not have: it will ignore pool_query.weight and pool the last token. phi3_lightning's "
            "from_pretrained reads the pooling from the export and loads it as trained.",
            stacklevel=2,
        )
    with staged_directory(out, carry=lambda name: name not in owned) as tmp:
        loaded.head.write_pretrained_files(tmp, max_shard_size=max_shard_size, dtype=dtype)  # LoRA: merged already
        tok = loaded.tokenizer
        if tok and tok != "byte" and Path(tok).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(tok) / name).is_file():
                    shutil.copy2(Path(tok) / name, tmp / name)
        info = {"tokenizer": tok, "task": loaded.task, "exported_from": str(Path(checkpoint).resolve())}
        if loaded.lora is not None:
            info["merged_lora"] = dataclasses.asdict(loaded.lora)
        if getattr(loaded.head, "pooling", "last") != "last":
            info["head_kwargs"] = {"pooling": loaded.head.pooling}
        _record_files(tmp, info)
    return out


def _check_recorded_base(loaded: LoadedHead, checkpoint: str | Path) -> None:
    """Warn when the base directory the run loaded (``base_model_name_or_path`` of the adapter) is gone, or holds
    other weights than the frozen ones in the checkpoint (rewritten since the run): the adapter gives the trained
    model only over the latter. Reads every tensor of that directory once (memory-mapped, one at a time)."""
    if loaded.base_model is None:
        return
    from safetensors import safe_open

    from ..model.checkpoint import _backbone_key_mapper, checkpoint_files

    base = Path(loaded.base_model)
    fix = (
        "serve the adapter over the weights the run started from, or export the merged model (without --lora_only), "
        "which needs nothing but the checkpoint"
    )
    if not (base / "config.json").is_file():
        warnings.warn(
            f"{checkpoint}: the run's base checkpoint {base} (the adapter's base_model_name_or_path) no longer "
            f"exists; {fix}",
            stacklevel=3,
        )
        return
    own = {
        k.replace(".base.", "."): v for k, v in loaded.head.state_dict().items() if not k.endswith(("lora_A", "lora_B"))
    }
    shards = checkpoint_files(base)
    key_of = _backbone_key_mapper(shards)  # stored name -> the head's, as from_pretrained maps it
    for file, names in shards.items():
        with safe_open(base / file, framework="pt") as f:
            for name in names:
                mine = own.get(key_of(name))
                if mine is None:
                    continue
                stored = f.get_tensor(name)
                if tuple(stored.shape) != tuple(mine.shape):
                    same = False
                elif loaded.trained_dtype is not None:  # the run loaded the base in this dtype: equal after the cast
                    same = torch.equal(stored.to(loaded.trained_dtype), mine.to(loaded.trained_dtype))
                else:  # a distributed checkpoint: dtype not recorded here; equal up to bf16 rounding
                    same = torch.allclose(stored.float(), mine.float(), rtol=1e-2, atol=1e-6)
                if not same:
                    warnings.warn(
                        f"{checkpoint}: the weights of the run's base checkpoint {base} (the adapter's "
                        f"base_model_name_or_path) differ from the frozen base weights in the checkpoint (first: "
                        f"{name}); it was rewritten since the run, and the adapter over it would not give the trained "
                        f"model: {fix}",
                        stacklevel=3,
                    )
                    return


def export_adapter(
    checkpoint: str | Path, output: str | Path, dtype: str | torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write only the LoRA adapters of a LoRA-trained Lightning checkpoint (plus the layers trained in full, e.g.
    ``score``) as a PEFT adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key
    names (``base_model.model.<module>.lora_A.weight``), which peft's ``PeftModel.from_pretrained``, transformers'
    ``load_adapter``, vLLM and TGI read over the base checkpoint, and which
    :func:`~phi3_lightning.model.peft_format.load_adapter` (or ``model.init_args.adapter``) loads back here.
    ``phi3_lightning.json`` beside them records the task, tokenizer, head options and base config.

    Megabytes instead of gigabytes::

        head = Phi3ForCausalLM.from_pretrained(base_dir)          # the checkpoint fine-tuning started from
        load_adapter(head, out)
    """
    out = Path(output).expanduser()
    owned = _check_output(out, overwrite)
    loaded = load_head(checkpoint, merge_lora=False)
    if loaded.lora is None:
        raise ValueError(
            f"{checkpoint} was not trained with LoRA (model.init_args.lora is null); it has no adapters "
            "to export: drop --lora_only to export the whole model"
        )
    _check_recorded_base(loaded, checkpoint)
    pooling = getattr(loaded.head, "pooling", "last")
    if pooling != "last":
        warnings.warn(
            f"{checkpoint} pools with pooling={pooling!r}: its pool_query is saved as a module trained in full, which "
            "peft / transformers' Phi3ForSequenceClassification do not have (they pool the last token); "
            "phi3_lightning's load_adapter into a head built with pooling='attention' uses it as trained.",
            stacklevel=2,
        )
    info = {
        "task": loaded.task,
        "tokenizer": loaded.tokenizer,
        "config": loaded.head.config.to_dict(),
        "head_kwargs": {"pooling": pooling} if pooling != "last" else {},
        "lora": dataclasses.asdict(loaded.lora),
        "trained_in_full": list(getattr(loaded.head, "lora_modules_to_save", [])),
        "exported_from": str(Path(checkpoint).resolve()),
    }
    with staged_directory(out, carry=lambda name: name not in owned) as tmp:
        dtype = resolve_dtype(dtype) or loaded.trained_dtype  # --dtype's default: as trained
        write_adapter_files(loaded.head, tmp, base_model_name_or_path=loaded.base_model, dtype=dtype)
        _record_files(tmp, info)
    return out
