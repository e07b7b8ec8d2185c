"""Hugging Face checkpoint I/O: single or sharded safetensors in, transformers-loadable directories out.

Loading builds the model on the meta device and fills it shard by shard, each tensor converted straight to the
target dtype and device (``load_state_dict(assign=True)``), so peak host memory stays near one copy of the
weights plus one tensor. Only safetensors are read: no pickle, no remote code.

Saving writes every file to a temporary name in the target directory and renames it into place, so a crash never
leaves a half-written file; config.json is written last.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .config import Phi3Config

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Keys older exports carry that hold no learned state.
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _default_mode() -> int:
    """The mode a plainly created file gets (0644 under the usual umask); mkstemp would leave 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written under a temporary name, then renamed into place."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size; write e.g. '5GB', '500MB' or a byte count")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    key = str(dtype).replace("torch.", "")
    if key not in names:
        raise ValueError(f"dtype={dtype!r} is not supported; use float32, bfloat16 or float16")
    return names[key]


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
        shards: dict[str, list[str]] = defaultdict(list)
        for name, file in weight_map.items():
            shards[file].append(name)
        missing = sorted(f for f in shards if not (path / f).is_file())
        if missing:
            raise FileNotFoundError(
                f"{index.name} lists shard(s) {', '.join(missing)} that are missing from {path}; "
                "download every shard of the checkpoint"
            )
        return dict(shards)
    single = path / SAFE_SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {SAFE_SINGLE: list(f.keys())}
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise FileNotFoundError(f"{path} has {others} but neither {SAFE_SINGLE} nor {SAFE_INDEX}; add the index file")
    bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {bins}: pickle checkpoints are not loaded; convert them to safetensors)" if bins else ""
    raise FileNotFoundError(f"no safetensors weights in {path}{hint}")


def _materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every parameter/buffer still on the meta device real storage and its init."""
    for m in module.modules():
        metas = [n for n, p in m.named_parameters(recurse=False) if p.is_meta]
        metas += [n for n, b in m.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not metas:
            continue
        for n, p in list(m.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(m, n, torch.nn.Parameter(torch.empty_like(p, device=device, dtype=dtype), p.requires_grad))
        for n, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                m._buffers[n] = torch.empty_like(b, device=device, dtype=b.dtype)
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _check_finite(converted: torch.Tensor, stored: torch.Tensor, name: str, file: Path) -> torch.Tensor:
    """``converted`` if it holds only finite numbers, else an error naming the tensor and the file (NaN/inf weights
    would only show up later as NaN logits or a NaN loss)."""
    if not converted.is_floating_point() or bool(torch.isfinite(converted).all()):
        return converted
    if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
        bad = int((~torch.isfinite(stored)).sum())
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


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for the heads (needs ``config``, ``model``, ``architecture``)."""

    architecture: str

    @classmethod
    def from_config(cls, config: Phi3Config | str, attn_implementation: str = "sdpa",
                    dtype: torch.dtype | str | None = None, device: torch.device | str | None = None, **kwargs: Any):
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
        attn_implementation: str = "sdpa",
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
        head_kwargs = {k: config_overrides.pop(k) for k in ("pooling",) if k in config_overrides}
        config = Phi3Config.from_pretrained(path, **config_overrides)
        shards = checkpoint_files(path)
        dtype = resolve_dtype(dtype) or torch.float32
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(config, attn_implementation=attn_implementation, device=torch.device("meta"), **head_kwargs)
        expected = dict(model.state_dict(keep_vars=True))
        loaded: set[str] = set()
        unexpected: list[str] = []
        for file, names in shards.items():
            part: dict[str, torch.Tensor] = {}
            with safe_open(path / file, framework="pt", device="cpu") as f:
                for name in names:
                    if _IGNORED_KEYS.search(name):
                        continue
                    if name not in expected:
                        if not name.startswith(("lm_head.", "score.")):  # another head's weights are expected
                            unexpected.append(name)
                        continue
                    tensor = f.get_tensor(name)
                    want = tuple(expected[name].shape)
                    if tuple(tensor.shape) != want:
                        is_score = name.startswith("score.")
                        if is_score and not strict_head:
                            continue
                        hint = ("set num_labels to match the checkpoint or pass strict_head=False to re-initialise "
                                "the head") if is_score else "the checkpoint does not match this config (vocab_size, " \
                            "hidden_size, heads?); load it without overrides or with the matching preset"
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
            raise ValueError(
                f"checkpoint {path} lacks {len(missing_backbone)} backbone tensor(s): {shown}; "
                "is it a complete Phi-3 checkpoint with every shard?"
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

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | str | None = None) -> Path:
        """Write config.json + safetensors (sharded with an index above ``max_shard_size``) that transformers'
        ``Phi3*`` classes load. Tied ``lm_head`` is not written twice. Every file is written atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = resolve_dtype(dtype)
        state = {}
        skip = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        for k, v in self.state_dict().items():
            if k in skip:
                continue
            t = v.detach()
            if hasattr(t, "full_tensor"):  # DTensor (FSDP2): gather the full tensor
                t = t.full_tensor()
            t = t.to("cpu", dtype=dtype or t.dtype).contiguous()
            state[k] = t
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
        old = set(p.name for p in path.glob("model*.safetensors")) | ({SAFE_INDEX} if (path / SAFE_INDEX).exists() else set())
        written = set()
        if len(shards) == 1:
            atomic_save_safetensors(path / SAFE_SINGLE, shards[0])
            written.add(SAFE_SINGLE)
        else:
            weight_map = {}
            n = len(shards)
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{n:05d}.safetensors"
                atomic_save_safetensors(path / name, shard)
                written.add(name)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_text(path / SAFE_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
            written.add(SAFE_INDEX)
        for stale in old - written:  # a previous save with another sharding
            (path / stale).unlink(missing_ok=True)
        cfg = self.config.to_dict()
        cfg["architectures"] = [self.architecture]
        cfg["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "") if state else "float32"
        atomic_write_text(path / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return path
