"""LoRA adapters in PEFT's on-disk layout: what transformers (``load_adapter``), peft, vLLM and TGI read.

A PEFT adapter directory holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
``target_modules``, ``modules_to_save``, ...) and ``adapter_model.safetensors`` whose keys are the transformers
module paths under ``base_model.model.``::

    base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight   (out, r)
    base_model.model.score.weight                                      (a module trained in full: modules_to_save)

Our heads use transformers' module names, so an adapted head maps onto this one to one (``<name>.lora_A`` <->
``base_model.model.<name>.lora_A.weight``). Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are ordinary PEFT
targets. This module reads and writes the files itself: peft is never imported (see :mod:`.lora` for why it is a
test-only dependency; the tests check these files against peft 0.21).

```python
save_adapter(head, "my-adapter")                 # head adapted with apply_lora (trained or not)
head = Phi3ForCausalLM.from_pretrained(base_dir)
load_adapter(head, "my-adapter")                 # ours or one trained with peft on a Phi-3 checkpoint
```

Loading honours ``use_rslora`` (alpha / sqrt(r)), ``rank_pattern`` / ``alpha_pattern`` (per-module r and alpha,
PEFT's matching rule), ``layers_to_transform``, a regex or ``all-linear`` ``target_modules`` and
``exclude_modules``. Anything else PEFT can express that changes the numbers (DoRA, LoRA biases, PiSSA-style inits
that rewrite the base weights, ...) is refused naming the key, as are targets and tensors that do not fit the model
(naming the module and the shapes). The adapter format this package wrote before (``adapter_config.json`` with a
``lora`` entry, keys as in the adapted head's ``state_dict``) still loads.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import staged_directory
from .checkpoint import unreadable_safetensors
from .lora import (
    HEAD_MODULES,
    LoRAConfig,
    _layer_index,
    _linear_names,
    _resolve_saved_modules,
    apply_lora,
    lora_modules,
    lora_state_dict,
    lora_target_names,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}

# adapter_config.json keys: read and honoured / metadata that does not change the numbers. Every other key must be
# unset (null, false, empty), else the adapter is refused naming it.
_HANDLED = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "bias",
    "init_lora_weights",
}
_METADATA = {
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "megatron_core",  # module name used only with megatron_config (refused when set)
    "qalora_group_size",  # used only with use_qalora (refused when set)
    "runtime_config",
    "ensure_weight_tying",
}
# init_lora_weights values that only choose the initial A/B (the saved weights replace them); the others (pissa,
# olora, corda, loftq, eva, ...) rewrite the base weights, so the adapter only fits that rewritten base.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")


def _task_of(model: nn.Module) -> str | None:
    from .heads import HEADS

    for task, cls in HEADS.items():
        if type(model) is cls:
            return task
    return None


# ---------------------------------------------------------------------------------------------------------- write
def _tied_partners(model: nn.Module, saved: list[str]) -> list[str]:
    """Modules outside ``saved`` whose parameters are tensors of a module in ``saved`` (a tied ``lm_head`` and
    ``model.embed_tokens``). Training one side of a tied pair here trains both (one tensor); PEFT keeps an untied
    copy of each module in ``modules_to_save``, so both sides go into the adapter or PEFT serves the other with its
    base weights."""
    ids = {id(p) for n in saved for p in model.get_submodule(n).parameters()}
    partners = []
    for name, module in model.named_modules():
        if not name or any(name == n or name.startswith(n + ".") for n in saved):
            continue
        if any(id(p) in ids for p in module.parameters(recurse=False)):
            partners.append(name)
    return partners


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for a head adapted with :func:`~.lora.apply_lora`."""
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    adapted = list(lora_modules(model))
    if cfg is None or not adapted:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters; apply_lora() it (or load an adapter) first")
    saved = list(getattr(model, "lora_modules_to_save", []))
    saved += _tied_partners(model, saved)
    targets: Any = list(cfg.target_modules)
    layers = cfg.layers
    # PEFT's layers_to_transform leaves modules outside the decoder layers (lm_head) alone; ours adapts them. Name
    # the adapted modules one by one when the short form would mean something else to PEFT.
    if layers is not None and any(_layer_index(n) is None for n in adapted):
        targets, layers = sorted(adapted), None
    task = _task_of(model)
    return {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES.get(task) if task else None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "exclude_modules": None,
        "layers_to_transform": list(layers) if layers is not None else None,
        "layers_pattern": "layers" if layers is not None else None,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "use_rslora": cfg.use_rslora,
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "layer_replication": None,
        "megatron_config": None,
        "target_parameters": None,
        "trainable_token_indices": None,
    }


def peft_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapters (and the modules trained in full) under PEFT's key names, on CPU, contiguous."""
    state = lora_state_dict(model)
    for partner in _tied_partners(model, getattr(model, "lora_modules_to_save", [])):
        for key, value in model.get_submodule(partner).state_dict().items():
            state[f"{partner}.{key}"] = value.detach().to("cpu").clone()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        leaf = key.rsplit(".", 1)[-1]
        name = f"{PEFT_PREFIX}{key}.weight" if leaf in ("lora_A", "lora_B") else PEFT_PREFIX + key
        out[name] = value.contiguous()
    return out


def write_adapter_files(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into an existing (staging) directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config = peft_adapter_config(model, base_model_name_or_path)
    save_file(peft_state_dict(model, dtype), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the adapters of ``model`` (plus its modules trained in full) as a PEFT adapter directory.

    Written in a staging sibling and swapped in (the old directory or the new one, never a mix); other files already
    in ``directory`` (a README) are kept. ``base_model_name_or_path`` goes into the config (what serving tools load
    the adapter onto).
    """
    out = Path(directory).expanduser()
    with staged_directory(out, carry=lambda name: name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)) as tmp:
        write_adapter_files(model, tmp, base_model_name_or_path, dtype)
    return out


# ----------------------------------------------------------------------------------------------------------- read
def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter directory (PEFT's, or this package's earlier format)."""
    path = Path(directory).expanduser()
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"adapter {str(directory)!r} has no {ADAPTER_CONFIG}; pass a directory written by "
            "'phi3_lightning export --lora_only', save_adapter() or peft's save_pretrained()"
        )
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / ADAPTER_CONFIG} holds a {type(config).__name__}, not a JSON object")
    return config


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", [], {}, ())


def _check_supported(config: dict[str, Any], where: str) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{where}: peft_type={peft_type!r}; only LoRA adapters (peft_type 'LORA') load into phi3_lightning. "
            "Merge it with peft (merge_and_unload) and load the merged checkpoint instead"
        )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{where}: bias={config['bias']!r} (trained bias terms) is not implemented here; only bias 'none' loads"
        )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{where}: init_lora_weights={init!r} rewrites the base model's weights, so the adapter only fits that "
            "rewritten base; convert it with peft (save_pretrained(path_initial_model_for_weight_conversion=...)) "
            "or merge it there"
        )
    for key, value in config.items():
        if key in _HANDLED or key in _METADATA:
            continue
        if _is_set(value):
            raise ValueError(
                f"{where}: {key}={value!r} is a PEFT feature that phi3_lightning does not implement (plain LoRA "
                "with use_rslora / rank_pattern / alpha_pattern only); merge the adapter with peft instead"
            )


def _peft_layer_index(name: str, layers_pattern: Any) -> int | None:
    """The decoder-layer index PEFT's ``layers_to_transform`` reads from a module name (the first numbered part)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _peft_targets(model: nn.Module, config: dict[str, Any], where: str) -> list[str]:
    """The modules PEFT adapts in ``model`` under ``config`` (its matching rules), each checked to be a linear layer."""
    tm = config.get("target_modules")
    if not tm:
        raise ValueError(f"{where}: target_modules is {tm!r}; a LoRA adapter names the layers it adapts")
    exclude = config.get("exclude_modules")
    saved = config.get("modules_to_save") or []
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    linear = set(_linear_names(model))
    output_layer = {"lm_head"}
    named = [(n, m) for n, m in model.named_modules() if n]
    found: list[str] = []
    hit_by: dict[str, int] = {}
    for name, module in named:
        if exclude:
            if isinstance(exclude, str):
                if re.fullmatch(exclude, name):
                    continue
            elif name in exclude or any(name.endswith("." + e) for e in exclude):
                continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved):
            continue
        if isinstance(tm, str):
            if tm.lower() == "all-linear":
                hit = name in linear and name not in output_layer
            else:
                hit = re.fullmatch(tm, name) is not None
        else:
            entries = [t for t in tm if name == t or name.endswith("." + t)]
            for t in entries:
                hit_by[t] = hit_by.get(t, 0) + 1
            hit = bool(entries)
            if hit and layers:
                hit = _peft_layer_index(name, config.get("layers_pattern")) in layers
        if not hit:
            continue
        if name not in linear:
            raise ValueError(
                f"{where}: target_modules {tm!r} match {name} ({type(module).__name__}), which is not a linear "
                f"layer of {type(model).__name__}; LoRA here adapts nn.Linear layers only"
            )
        found.append(name)
    available = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear}))
    if not isinstance(tm, str):
        unmatched = [t for t in tm if t not in hit_by]
        if unmatched:
            raise ValueError(
                f"{where}: target_modules {unmatched} match no module of {type(model).__name__} (was the adapter "
                f"trained on another architecture?); its linear layers are: {available}"
            )
    if not found:
        raise ValueError(
            f"{where}: target_modules {tm!r} (layers_to_transform={layers!r}) select no linear layer of "
            f"{type(model).__name__}; its linear layers are: {available}"
        )
    return found


def lora_config_from_peft(model: nn.Module, config: dict[str, Any], where: str = ADAPTER_CONFIG) -> LoRAConfig:
    """A :class:`LoRAConfig` that adapts exactly the modules PEFT would adapt in ``model``, with PEFT's ranks and
    scales; refuses what it cannot express (naming the key)."""
    _check_supported(config, where)
    targets = _peft_targets(model, config, where)
    module_names = [n for n, _ in model.named_modules() if n]
    saved = [
        m for m in (config.get("modules_to_save") or []) if any(n == m or n.endswith("." + m) for n in module_names)
    ]
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    common = dict(
        r=config.get("r", 8),
        alpha=config.get("lora_alpha", 8),
        dropout=config.get("lora_dropout", 0.0) or 0.0,
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        modules_to_save=saved,
        train_head=True,
    )
    try:
        common_cfg = LoRAConfig(target_modules=list(targets), **common)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    # The short form (target names + layer indices) when it selects the same modules here; else the full names.
    tm = config.get("target_modules")
    if (
        not isinstance(tm, str)
        and not config.get("exclude_modules")
        and config.get("layers_pattern") in (None, "layers")
    ):
        try:
            short = dataclasses.replace(common_cfg, target_modules=list(tm), layers=list(layers) if layers else None)
            if sorted(lora_target_names(model, short)) == sorted(targets):
                return short
        except ValueError:
            pass
    return common_cfg


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def load_adapter(model: nn.Module, directory: str | Path, weights: bool = True) -> LoRAConfig:
    """Adapt ``model`` (an unadapted head holding the base weights) with the adapter in ``directory`` and load its
    weights; returns the :class:`LoRAConfig` it was applied with.

    ``directory``: a PEFT LoRA adapter (ours, or one trained with peft on a Phi-3 checkpoint) or this package's
    earlier adapter format. Every adapted module must receive its A and B, with the shapes the model and the config
    give (else a ``ValueError`` names the module and both shapes); tensors for modules the model does not have are
    refused. ``weights=False`` only applies the adapter's configuration (a checkpoint will supply the weights).
    """
    if lora_modules(model):
        raise ValueError(
            f"{type(model).__name__} already has LoRA adapters; load an adapter into the base model (merge_lora() first)"
        )
    path = Path(directory).expanduser()
    config = read_adapter_config(path)
    where = str(path / ADAPTER_CONFIG)
    peft = "peft_type" in config
    if peft:
        cfg = lora_config_from_peft(model, config, where)
    elif isinstance(config.get("lora"), dict):  # this package's format before PEFT's became the default
        try:
            cfg = LoRAConfig(**config["lora"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: its 'lora' entry is not a LoRAConfig: {e}") from None
    else:
        raise ValueError(
            f"{where} is neither a PEFT adapter config (no peft_type) nor a phi3_lightning one (no 'lora' entry)"
        )
    if weights and not (path / ADAPTER_WEIGHTS).is_file():
        other = sorted(p.name for p in path.glob("adapter_model*"))
        hint = f" ({', '.join(other)} found: pickle files are never loaded; re-save with safetensors)" if other else ""
        raise FileNotFoundError(f"adapter {path} has no {ADAPTER_WEIGHTS}{hint}")
    state = _read_weights(model, cfg, path / ADAPTER_WEIGHTS, peft) if weights else None
    apply_lora(model, cfg)  # only once the weights are known to fit: a refused adapter leaves the model as it was
    if peft:  # this package's earlier format trained a tied pair as one tensor: its file holds one side only
        _untie_what_the_adapter_trains_apart(model, state, where)
    if state is not None:
        model.load_state_dict(state, strict=False)
    return cfg


def _untie_what_the_adapter_trains_apart(model: nn.Module, state: dict[str, torch.Tensor] | None, where: str) -> None:
    """A tensor shared by several state-dict keys (tied ``lm_head`` / ``embed_tokens``) of which the adapter trains
    some in full (``modules_to_save``) but not all, or all with different values: each key it trains gets its own
    tensor (as PEFT's ``modules_to_save`` copies do) instead of writing one module's weights into the other, and
    the others stay frozen with the base weights; the config then says ``tie_word_embeddings=False`` (a merged
    export writes both). Runs on the adapted model (``model.lora_modules_to_save`` set); ``state``: the adapter's
    tensors (None: only the configuration is applied)."""
    saved = tuple(getattr(model, "lora_modules_to_save", ()))
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    for keys in groups.values():
        trained = [k for k in keys if any(k.startswith(n + ".") for n in saved)]
        if len(keys) < 2 or not trained:
            continue
        if len(trained) == len(keys) and (
            state is None or all(torch.equal(state[k], state[trained[0]]) for k in trained[1:] if k in state)
        ):
            continue  # every side trained as one tensor (save_adapter writes both sides)
        own = trained if len(trained) < len(keys) else trained[1:]
        rest = [k for k in keys if k not in own]
        for key in own:
            module_name, _, leaf = key.rpartition(".")
            module = model.get_submodule(module_name)
            old = getattr(module, leaf)
            setattr(module, leaf, nn.Parameter(old.detach().clone(), requires_grad=True))
        if len(trained) < len(keys):
            model.get_submodule(rest[0].rpartition(".")[0]).get_parameter(rest[0].rpartition(".")[2]).requires_grad_(
                False
            )
        if hasattr(getattr(model, "config", None), "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
        warnings.warn(
            f"{where}: the adapter trains {own[0]} on its own, but the base model ties it to {rest[0]}; loading it "
            f"unties {own[0]} from {rest[0]} (each keeps its own weights, as peft does) and the config now says "
            "tie_word_embeddings=false",
            stacklevel=3,
        )


def _read_weights(model: nn.Module, cfg: LoRAConfig, file: Path, peft: bool) -> dict[str, torch.Tensor]:
    """The adapter file's tensors under the adapted model's state-dict keys, each checked against the shape that
    ``model`` adapted with ``cfg`` will have (before anything is changed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(file))
    except SafetensorError as e:
        raise unreadable_safetensors(file, e) from None
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in raw.items():
        if not peft:
            state[key] = value
            continue
        if not key.startswith(PEFT_PREFIX):
            unexpected.append(key)
            continue
        k = key[len(PEFT_PREFIX) :]
        for leaf in ("lora_A", "lora_B"):
            if k.endswith(f".{leaf}.weight"):
                k = k[: -len(".weight")]
        state[k] = value
    own = model.state_dict()
    adapters = lora_target_names(model, cfg)
    saved = tuple(_resolve_saved_modules(model, (list(HEAD_MODULES) if cfg.train_head else []) + cfg.modules_to_save))
    for name in adapters:
        module = model.get_submodule(name)
        r, _ = cfg.rank_alpha(name)
        for leaf, expected in (("lora_A", (r, module.in_features)), ("lora_B", (module.out_features, r))):
            key = f"{name}.{leaf}"
            shown = f"{PEFT_PREFIX}{key}.weight" if peft else key
            if key not in state:
                raise ValueError(
                    f"{file}: no {shown} for the adapted module {name} (in={module.in_features}, "
                    f"out={module.out_features}); the adapter's config and weights disagree"
                )
            if _shape(state[key]) != expected:
                raise ValueError(
                    f"{file}: {shown} has shape {_shape(state[key])} but {name} (in={module.in_features}, "
                    f"out={module.out_features}) with r={r} expects {expected}; the adapter was trained on a "
                    "model of other dimensions, or its r / rank_pattern do not match its weights"
                )
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            if key.rsplit(".", 1)[0] not in adapters:
                unexpected.append(key)
            continue
        if key.endswith((".base.weight", ".base.bias")):  # a frozen base weight in an old-format file: not ours
            unexpected.append(key)
            continue
        if key not in own or not any(key.startswith(s + ".") for s in saved):
            unexpected.append(key)
        elif _shape(value) != _shape(own[key]):
            raise ValueError(
                f"{file}: {key} (a module trained in full) has shape {_shape(value)} but the model's is "
                f"{_shape(own[key])}; num_labels or the architecture differ from the run that trained it"
            )
    if unexpected:
        shown = ", ".join(unexpected[:4]) + (" ..." if len(unexpected) > 4 else "")
        raise ValueError(
            f"{file}: tensors for modules {type(model).__name__} does not adapt or train: {shown}; the adapter was "
            "trained on another architecture or holds weights of a kind not implemented here"
        )
    return state
