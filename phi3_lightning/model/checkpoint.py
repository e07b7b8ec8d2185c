"""Hugging Face checkpoint I/O: single or sharded safetensors in, transformers-loadable directories out.

Loading builds the model on the meta device and fills it shard by shard, each tensor converted straight to the
target dtype and device (``load_state_dict(assign=True)``), so peak host memory stays near one copy of the
weights plus one tensor. Only safetensors are read: no pickle, no remote code.

Saving is all-or-nothing at the directory level: every file is written into a staging sibling directory, which
is then swapped in (``phi3_lightning.atomic.staged_directory``), so a crash leaves the complete old or the complete
new directory, never a mix of shards. An index may only name shards inside its directory, and every tensor it
lists must be in the shard it names.
"""

from __future__ import annotations

import inspect
import json
import os
import posixpath
import re
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..atomic import recover_interrupted, staged_directory
from .backends import DEFAULT_BACKEND
from .config import Phi3Config

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
POOL_QUERY = "pool_query.weight"  # the learned query of attention pooling (sequence classification)
# Keys older exports carry that hold no learned state.
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Files of an existing directory that a save replaces instead of carrying over: the old weights and index.
_OWN_WEIGHTS = re.compile(r"model.*\.safetensors|" + re.escape(SAFE_INDEX))


def _carry_over(name: str) -> bool:
    """Entries of an existing directory that ``save_pretrained`` keeps (a tokenizer, a README): all but old weights
    and staging leftovers of earlier writers."""
    return not (_OWN_WEIGHTS.fullmatch(name) or (name.startswith(".") and name.endswith(".tmp")))


def _shard_name(index: Path, name: object) -> str:
    """A weight_map value, refused unless it names a file inside the checkpoint directory."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index} maps a tensor to {name!r}, which is not a file name; the index is corrupt")
    norm = posixpath.normpath(name.replace(os.sep, "/"))
    if (
        posixpath.isabs(norm)
        or os.path.isabs(name)
        or os.path.splitdrive(name)[0]
        or norm == ".."
        or norm.startswith("../")
        or norm == "."
    ):
        raise ValueError(
            f"{index} names the shard {name!r}, which is outside the checkpoint directory; refusing to read it (a "
            "safetensors index may only name files in its own directory). Fix or re-download the index"
        )
    return name


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size; write e.g. '5GB', '500MB' or a byte count")
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float64": torch.float64,
    }
    key = str(dtype).replace("torch.", "")
    if key not in names:
        raise ValueError(f"dtype={dtype!r} is not supported; use float32, bfloat16 or float16")
    return names[key]


def safetensors_keys(file: Path) -> list[str]:
    """The tensor names of a safetensors file; a file whose header the reader refuses (corrupt, truncated, crafted
    offsets or lengths) is a ``ValueError`` naming it (the reader's ``SafetensorError`` is no ``ValueError``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise unreadable_safetensors(file, e) from None


def unreadable_safetensors(file: Path, error: Exception) -> ValueError:
    return ValueError(
        f"{file} is not a readable safetensors file ({error}); it is truncated, corrupt or not a safetensors file: "
        "save or download it again"
    )


def checkpoint_files(path: Path) -> dict[str, list[str]]:
    """{shard file -> [tensor names]} of a checkpoint directory (single file or index)."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e!r}); re-download it") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has a weight_map that is not a mapping; re-download it")
        shards: dict[str, list[str]] = defaultdict(list)
        for name, file in weight_map.items():
            shards[_shard_name(index, file)].append(name)
        missing = sorted(f for f in shards if not (path / f).is_file())
        if missing:
            raise FileNotFoundError(
                f"{index.name} lists shard(s) {', '.join(missing)} that are missing from {path}; "
                "download every shard of the checkpoint"
            )
        for file, names in shards.items():
            present = set(safetensors_keys(path / file))
            absent = [n for n in names if n not in present]
            if absent:
                shown = ", ".join(absent[:3]) + (" ..." if len(absent) > 3 else "")
                raise ValueError(
                    f"{index.name} says {len(absent)} tensor(s) ({shown}) are in {file}, but {path / file} does not "
                    "hold them: the shards and the index come from different saves (an interrupted copy or save?); "
                    "save or download the checkpoint again"
                )
        return dict(shards)
    single = path / SAFE_SINGLE
    if single.is_file():
        return {SAFE_SINGLE: safetensors_keys(single)}
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise FileNotFoundError(f"{path} has {others} but neither {SAFE_SINGLE} nor {SAFE_INDEX}; add the index file")
    bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {bins}: pickle checkpoints are not loaded; convert them to safetensors)" if bins else ""
    raise FileNotFoundError(f"no safetensors weights in {path}{hint}")


def _owns_tensors(m: torch.nn.Module, meta_only: bool = False) -> bool:
    tensors = [*m.parameters(recurse=False), *(b for b in m.buffers(recurse=False) if b is not None)]
    return any(t.is_meta for t in tensors) if meta_only else bool(tensors)


def reset_owned_parameters(module: torch.nn.Module, select: Callable[[torch.nn.Module], bool] | None = None) -> None:
    """The init step of meta-device materialisation (shared with the FSDP2 path in ``modules/fsdp.py``): every
    submodule that directly owns a parameter or buffer (and that ``select`` accepts) runs its
    ``reset_parameters()``; one that has none is an error (its storage would keep whatever memory held)."""
    chosen = [m for m in module.modules() if _owns_tensors(m) and (select is None or select(m))]
    missing = sorted({type(m).__name__ for m in chosen if not callable(getattr(m, "reset_parameters", None))})
    if missing:
        raise RuntimeError(f"modules without reset_parameters() cannot be materialised from meta: {missing}")
    for m in chosen:
        m.reset_parameters()


def _materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every parameter/buffer still on the meta device real storage (floating parameters in ``dtype``) and its
    init; modules whose tensors were all loaded are left alone."""
    pending = {id(m) for m in module.modules() if _owns_tensors(m, meta_only=True)}
    for m in module.modules():
        if id(m) not in pending:
            continue
        for n, p in list(m.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(m, n, torch.nn.Parameter(torch.empty_like(p, device=device, dtype=dtype), p.requires_grad))
        for n, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                m._buffers[n] = torch.empty_like(b, device=device, dtype=b.dtype)
    reset_owned_parameters(module, select=lambda m: id(m) in pending)


# dtypes a weight may be stored in: converting anything else (int8 / uint8 / float8 codes of a quantized checkpoint)
# to the model dtype would drop the scales that give the codes their values
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_stored_dtype(tensor: torch.Tensor, name: str, file: str) -> None:
    if tensor.dtype not in _WEIGHT_DTYPES:
        raise ValueError(
            f"{file}: tensor {name} is stored as {str(tensor.dtype).replace('torch.', '')}, not float16/bfloat16/"
            "float32: a quantized checkpoint (bitsandbytes, fp8, GPTQ ...), whose codes cast to floats without their "
            "scales would give wrong logits; quantized checkpoints are not supported: load the unquantized one"
        )


def _refuse_quantized(config: Phi3Config, path: Path) -> None:
    quant = config.extra.get("quantization_config")
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    raise ValueError(
        f"{path}/config.json has a quantization_config (quant_method={method!r}): quantized checkpoints are not "
        "supported (their weights are codes plus scales this loader does not apply); load the unquantized checkpoint"
    )


def _non_finite(converted: torch.Tensor, source: torch.Tensor) -> int | None:
    """None when ``converted`` (``source`` cast to another dtype) holds only finite numbers (or is not floating
    point); else how many NaN/inf values ``source`` itself holds (0: only the cast overflowed to inf)."""
    if not converted.is_floating_point() or bool(torch.isfinite(converted).all()):
        return None
    return int((~torch.isfinite(source)).sum()) if source.is_floating_point() else 0


def _check_finite(converted: torch.Tensor, stored: torch.Tensor, name: str, file: Path) -> torch.Tensor:
    """``converted`` if it holds only finite numbers, else an error naming the tensor and the file (NaN/inf weights
    would only show up later as NaN logits or a NaN loss)."""
    bad = _non_finite(converted, stored)
    if bad is None:
        return converted
    if bad:
        raise ValueError(
            f"{file}: tensor {name} holds {bad} NaN/inf value(s) of {stored.numel()}; the checkpoint is corrupt "
            "(e.g. saved after the training loss diverged); use an earlier checkpoint or re-download it"
        )
    raise ValueError(
        f"{file}: tensor {name} ({stored.dtype}) overflows to inf in {converted.dtype}; load it with "
        "dtype='float32' or 'bfloat16'"
    )


def _untie_if_head_differs(model: torch.nn.Module, loaded: set[str], path: Path) -> None:
    """``tie_word_embeddings: true`` but the checkpoint stores its own, different ``lm_head.weight``: do what
    transformers (5.x) does with the same directory -- keep both stored tensors, do not tie -- and say so."""
    config = model.config
    if not (config.tie_word_embeddings and {"lm_head.weight", "model.embed_tokens.weight"} <= loaded):
        return
    if torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
        return
    warnings.warn(
        f"{path}: the config sets tie_word_embeddings=true but the checkpoint stores its own lm_head.weight, "
        "different from model.embed_tokens.weight; as transformers does, the stored lm_head is used and the weights "
        "are NOT tied (this model's config now says tie_word_embeddings=false). Set tie_word_embeddings to false in "
        "config.json to silence this, or remove lm_head.weight from the checkpoint to tie them.",
        stacklevel=3,
    )
    config.tie_word_embeddings = False


def _backbone_key_mapper(shards: dict[str, list[str]]) -> Callable[[str], str]:
    """Stored tensor name -> this model's name. A backbone saved alone (transformers' ``Phi3Model.save_pretrained``)
    has no ``model.`` prefix (``embed_tokens.weight``, ``layers.0...``); transformers loads it into the heads with the
    prefix added, and so do we. Checkpoints of a head keep their names."""
    names = [n for ns in shards.values() for n in ns]
    bare = not any(n.startswith("model.") for n in names) and any(
        n.startswith(("embed_tokens.", "layers.")) for n in names
    )
    if not bare:
        return lambda name: name
    backbone = ("embed_tokens.", "layers.", "norm.")
    return lambda name: "model." + name if name.startswith(backbone) else name


def _pooling_from_checkpoint(cls: type, head_kwargs: dict[str, Any], shards: dict[str, list[str]], path: Path) -> None:
    """A sequence classifier trained with attention pooling holds ``pool_query.weight``: load it with that pooling
    (the default would be last-token pooling, which ignores the tensor and gives other logits), and refuse an
    explicit ``pooling="last"`` over it."""
    if "pooling" not in inspect.signature(cls.__init__).parameters:
        return
    if not any(POOL_QUERY in names for names in shards.values()):
        return
    asked = head_kwargs.get("pooling")
    if asked is None:
        head_kwargs["pooling"] = "attention"
    elif asked != "attention":
        raise ValueError(
            f"{path} was trained with attention pooling (it holds {POOL_QUERY}), but pooling={asked!r} was asked "
            "for, which would ignore that tensor and give other logits; load it with pooling='attention' (or leave "
            "pooling out: it is read from the checkpoint)"
        )


def _finite_for_saving(converted: torch.Tensor, source: torch.Tensor, name: str) -> torch.Tensor:
    """``converted`` if it holds only finite numbers, else an error naming the tensor: a NaN/inf weight (a diverged
    model) or one that overflows the save dtype (float16 holds at most 65504) would be written as such, and
    transformers would load it without a word (NaN/inf logits)."""
    bad = _non_finite(converted, source)
    if bad is None:
        return converted
    if bad:
        raise ValueError(
            f"tensor {name} holds {bad} NaN/inf value(s) of {source.numel()}; not saved (the model diverged?): "
            "save an earlier checkpoint"
        )
    raise ValueError(
        f"tensor {name} ({source.dtype}) overflows to inf in {converted.dtype}; save it with dtype='bfloat16' or "
        "'float32'"
    )


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for the heads (needs ``config``, ``model``, ``architecture``)."""

    architecture: str

    @classmethod
    def from_config(
        cls,
        config: Phi3Config | str,
        attn_implementation: str = DEFAULT_BACKEND,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ):
        """A randomly initialised model from a config or preset name."""
        if isinstance(config, str):
            config = Phi3Config.from_pretrained(config)
        model = cls(config, attn_implementation=attn_implementation, device=device, **kwargs)
        if dtype is not None:
            model.to(resolve_dtype(dtype))
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        attn_implementation: str = DEFAULT_BACKEND,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        strict_head: bool = True,
        **config_overrides: Any,
    ):
        """Load a Hugging Face Phi-3 directory (config.json + safetensors) into this head.

        The backbone (``model.*``) must be complete. Head weights (``lm_head``/``score``) are loaded when the
        checkpoint has them with matching shapes; absent ones are freshly initialised (e.g. a classifier on a
        causal-LM checkpoint). A present head of another shape is an error unless ``strict_head=False``.
        ``config_overrides`` replace config fields (``num_labels=3``, ``sliding_window=None`` ...).
        """
        from safetensors import safe_open

        path = Path(path)
        if path.is_file():
            raise ValueError(
                f"{path} is a file; from_pretrained needs a checkpoint directory: pass the directory that holds "
                f"config.json and the safetensors weights (here maybe {path.parent})"
            )
        if not path.exists():
            recover_interrupted(path)  # a save killed between the two renames of its directory swap
        head_kwargs = {k: config_overrides.pop(k) for k in ("pooling", "fused_kernels") if k in config_overrides}
        config = Phi3Config.from_pretrained(path, **config_overrides)
        _refuse_quantized(config, path)
        shards = checkpoint_files(path)
        _pooling_from_checkpoint(cls, head_kwargs, shards, path)
        dtype = resolve_dtype(dtype) or torch.float32
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(config, attn_implementation=attn_implementation, device=torch.device("meta"), **head_kwargs)
        expected = dict(model.state_dict(keep_vars=True))
        key_of = _backbone_key_mapper(shards)
        loaded: set[str] = set()
        unexpected: list[str] = []
        for file, names in shards.items():
            part: dict[str, torch.Tensor] = {}
            with safe_open(path / file, framework="pt", device="cpu") as f:
                for stored in names:
                    if _IGNORED_KEYS.search(stored):
                        continue
                    name = key_of(stored)
                    if name not in expected:
                        if not name.startswith(("lm_head.", "score.")):  # another head's weights are expected
                            unexpected.append(stored)
                        continue
                    tensor = f.get_tensor(stored)
                    _check_stored_dtype(tensor, stored, file)
                    want = tuple(expected[name].shape)
                    if tuple(tensor.shape) != want:
                        is_score = name.startswith("score.")
                        if is_score and not strict_head:
                            continue
                        hint = (
                            (
                                "set num_labels to match the checkpoint or pass strict_head=False to re-initialise "
                                "the head"
                            )
                            if is_score
                            else "the checkpoint does not match this config (vocab_size, "
                            "hidden_size, heads?); load it without overrides or with the matching preset"
                        )
                        raise ValueError(
                            f"{file}: tensor {name} has shape {tuple(tensor.shape)} but the model expects {want}; {hint}"
                        )
                    part[name] = _check_finite(tensor.to(device=device, dtype=dtype), tensor, name, path / file)
            model.load_state_dict(part, strict=False, assign=True)
            loaded.update(part)
            del part
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing_backbone = sorted(k for k in expected if k.startswith("model.") and k not in loaded)
        if missing_backbone:
            shown = ", ".join(missing_backbone[:5]) + (" ..." if len(missing_backbone) > 5 else "")
            instead = ""
            if unexpected:
                extra = sorted(unexpected)
                instead = (
                    f"; it holds instead {len(extra)} tensor(s) this model does not have: "
                    + ", ".join(extra[:5])
                    + (" ..." if len(extra) > 5 else "")
                    + " (renamed or unfused weights from another converter or architecture?)"
                )
            raise ValueError(
                f"checkpoint {path} lacks {len(missing_backbone)} backbone tensor(s): {shown}{instead}; "
                "is it a complete Phi-3 checkpoint (fused qkv_proj / gate_up_proj) with every shard?"
            )
        fresh = sorted(k for k in expected if k not in loaded and k not in tied)
        if fresh:
            warnings.warn(f"{cls.__name__}: initialised new head weights {fresh} (not in {path})", stacklevel=2)
        if unexpected:
            warnings.warn(f"{cls.__name__}: ignored checkpoint tensors {sorted(unexpected)[:5]}", stacklevel=2)
        _materialize(model, device, dtype)
        _untie_if_head_differs(model, loaded, path)
        model.tie_weights()
        return model

    def save_pretrained(
        self, path: str | os.PathLike, max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None
    ) -> Path:
        """Write config.json + safetensors (sharded with an index above ``max_shard_size``) that transformers'
        ``Phi3*`` classes load. Tied ``lm_head`` is not written twice.

        All-or-nothing: the files are written into a staging sibling of ``path``; the entries of an existing
        ``path`` that this save does not write (a tokenizer, a README) are hard-linked (or copied) into it, except
        the old weights (``model*.safetensors``, the index), which this save replaces; then it is swapped in. A
        crash leaves the complete old or the complete new directory (see :mod:`phi3_lightning.atomic`)."""
        path = Path(path)
        self._refuse_unmerged_adapters()
        with staged_directory(path, carry=_carry_over) as tmp:
            self.write_pretrained_files(tmp, max_shard_size=max_shard_size, dtype=dtype)
        return path

    def _refuse_unmerged_adapters(self) -> None:
        """A head with LoRA adapters still separate has ``qkv_proj.base.weight`` / ``lora_A`` keys: transformers would
        load such a directory with every adapted projection missing (randomly initialised)."""
        from .lora import lora_modules

        adapted = list(lora_modules(self))
        if adapted:
            raise ValueError(
                f"{type(self).__name__} has LoRA adapters ({len(adapted)} adapted layers, e.g. {adapted[0]}) "
                "that are not merged: a Hugging Face checkpoint has no place for them. merge_lora(model) first for "
                "a plain checkpoint, or save_adapter(model, dir) for the adapters alone (PEFT's layout)"
            )

    def write_pretrained_files(
        self, directory: str | os.PathLike, max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None
    ) -> None:
        """The files of :meth:`save_pretrained` written straight into the existing ``directory``, with no staging:
        for callers that stage a larger directory themselves (``export``). Use ``save_pretrained`` otherwise."""
        from safetensors.torch import save_file

        self._refuse_unmerged_adapters()
        tmp = Path(directory)
        dtype = resolve_dtype(dtype)
        state = {}
        skip = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        for k, v in self.state_dict().items():
            if k in skip:
                continue
            t = v.detach()
            if hasattr(t, "full_tensor"):  # DTensor (FSDP2): gather the full tensor
                t = t.full_tensor()
            state[k] = _finite_for_saving(t.to("cpu", dtype=dtype or t.dtype).contiguous(), t, k)
        limit = parse_size(max_shard_size)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += nbytes
        cfg = self.config.to_dict()
        cfg["architectures"] = [self.architecture]
        cfg["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "") if state else "float32"
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFE_SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            n = len(shards)
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
