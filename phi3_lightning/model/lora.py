"""LoRA (low-rank adapters) for the Phi-3 modules, in plain torch.

A wrapped projection computes ``y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r`` with the pretrained
``base`` frozen, ``A`` (r, in) kaiming-uniform and ``B`` (out, r) zero, so a freshly adapted model computes exactly
what the base model does. Only A and B (plus any head named to be trained in full) receive gradients, so the
optimizer state shrinks from 2 x 3.8B numbers to a few million for Phi-3-mini.

```python
model = Phi3ForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
apply_lora(model, LoRAConfig(r=16, alpha=32))     # wraps qkv/o/gate_up/down in every layer, freezes the rest
...train...
torch.save(lora_state_dict(model), "adapter.pt")  # adapters (+ trained heads) only: megabytes
merge_lora(model).save_pretrained(out_dir)        # plain Hugging Face checkpoint, original key names
```

Why not ``peft``? We tried it (peft 0.21.2 with torch 2.13, in a scratch environment): ``get_peft_model`` does wrap
our ``Linear`` subclasses, trains, merges back (``merge_and_unload``) and compiles, so the maths composes. What
does not fit this package:

- importing peft imports transformers and accelerate, and ``model/`` must not depend on transformers (it is our
  test oracle only) -- LoRA would then be unavailable in a minimal install;
- meta-device initialisation, which Lightning's FSDP2 path relies on: Lightning materialises each module that
  directly owns meta tensors and calls its ``reset_parameters()``. peft keeps its adapters as ``nn.Linear``
  children (``lora_B.default``), so they get ``nn.Linear``'s kaiming init -- B is no longer zero and the adapted
  model silently stops equalling the pretrained one (we saw max |B| = 0.5 after materialisation). Here
  :class:`LoRALinear` owns A and B directly and its ``reset_parameters()`` re-creates the LoRA init;
- peft wraps the whole model (``PeftModel`` -> ``LoraModel`` -> our head), which changes every state-dict key
  (``base_model.model.model.layers...lora_A.default.weight``) and the forward signature the LightningModule and
  checkpoints see. Here the head stays the same object with the same ``forward``; only the adapted projections
  change, and :func:`merge_lora` restores the exact original module tree and keys.

The whole thing is ~150 lines of torch; peft remains usable on top of our models for anyone who wants its other
adapter types.

Order of operations with FSDP2 / compile: ``apply_lora`` before sharding and before ``torch.compile``; the forward
has no data-dependent Python control flow, so it compiles into one graph with the base matmul.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Freshly initialised layers of the heads (trained in full when ``train_head``); lm_head is pretrained.
HEAD_MODULES = ("score", "pool_query")
# Head names a shared config may list although this particular head lacks them.
_ANY_HEAD = ("score", "pool_query", "lm_head")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class LoRAConfig:
    """Low-rank adapters: which projections get them, their size, and what else is trained."""

    r: int = 16
    """Rank of each adapter (A is r x in, B is out x r); 8-64 is typical, larger adapts more and costs more."""
    alpha: float = 32.0
    """Scale numerator: the adapter's output is multiplied by alpha / r (alpha = 2r is a common choice)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the base path is never dropped)."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linear layers to adapt, by name (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head) or dotted suffix."""
    layers: list[int] | None = None
    """Decoder layer indices to adapt (e.g. the last 8); null = every layer. Modules outside layers are unaffected."""
    train_head: bool = True
    """Train the new classification layers (score, and pool_query of attention pooling) in full."""
    modules_to_save: list[str] = field(default_factory=list)
    """Further modules trained in full, by name (e.g. ["lm_head"], ["norm"], ["score"]); head names that the
    current head lacks are skipped, so one config serves every head."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale the adapter's output by alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks overriding r, e.g. {"qkv_proj": 8, "layers.0.mlp.down_proj": 4}: a key matches a module
    whose dotted name ends with it (a regex, as PEFT's rank_pattern); the first matching key wins."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas overriding alpha, matched like rank_pattern (PEFT's alpha_pattern)."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save or [])
        if self.layers is not None:
            self.layers = list(self.layers)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    @property
    def scaling(self) -> float:
        """The default scale (modules without a rank/alpha pattern): alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, alpha) of the module called ``name`` (``model.layers.0.self_attn.qkv_proj``), patterns applied."""
        r_key = _pattern_key(self.rank_pattern, name)
        a_key = _pattern_key(self.alpha_pattern, name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.alpha
        return r, alpha

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r={self.r!r} must be a positive integer (e.g. 8, 16, 64)")
        if (
            not isinstance(self.alpha, (int, float))
            or isinstance(self.alpha, bool)
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ValueError(f"LoRA alpha={self.alpha!r} must be a finite positive number (scaling = alpha / r)")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(
                f"LoRA target_modules={self.target_modules!r} must be a non-empty list of module names, "
                f"e.g. {list(DEFAULT_TARGETS)}"
            )
        if self.layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise ValueError(f"LoRA layers={self.layers!r} must be a list of decoder layer indices")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoRA use_rslora={self.use_rslora!r} must be true or false")
        for attr, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            for key, value in getattr(self, attr).items():
                try:
                    re.compile(key)
                except (re.error, TypeError) as e:
                    raise ValueError(f"LoRA {attr} key {key!r} is not a valid regular expression: {e}") from None
                if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
                    what = "a positive integer rank" if attr == "rank_pattern" else "a positive alpha"
                    raise ValueError(f"LoRA {attr}[{key!r}]={value!r} must be {what}")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The adapter output's scale: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (rsLoRA)."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def _pattern_key(patterns: dict, name: str) -> str | None:
    """The first key of ``patterns`` that, as a regex, matches the whole of ``name`` or a dotted suffix of it
    (PEFT's rank_pattern / alpha_pattern rule), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def as_lora_config(lora: LoRAConfig | dict | None) -> LoRAConfig | None:
    """``lora`` as a :class:`LoRAConfig` (a dict is what checkpoint hyper-parameters and Python callers hold)."""
    if lora is None or isinstance(lora, LoRAConfig):
        return lora
    if isinstance(lora, dict):
        known = {f.name for f in dataclasses.fields(LoRAConfig)}
        unknown = sorted(set(lora) - known)
        if unknown:
            raise ValueError(f"lora has unknown fields {unknown}; LoRAConfig fields are {sorted(known)}")
        return LoRAConfig(**lora)
    raise TypeError(f"lora={lora!r}: pass a LoRAConfig, a dict of its fields, or null")


class LoRALinear(nn.Module):
    """``base(x) + (dropout(x) @ A^T @ B^T) * scaling`` with ``base`` frozen; initially exactly ``base(x)``.

    ``lora_A`` (r, in) and ``lora_B`` (out, r) are parameters of this module itself (not child layers), so
    ``reset_parameters()`` -- which Lightning's meta-device materialisation calls -- gives them the LoRA init
    (A kaiming-uniform, B zero) and leaves the base weight, which its own module initialises, alone.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, float(alpha), bool(use_rslora)
        self.scaling = lora_scaling(r, self.alpha, self.use_rslora)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=w.device, dtype=w.dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.requires_grad_(False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA init of the adapters only: A ~ kaiming-uniform(a=sqrt(5)) (as nn.Linear), B = 0."""
        if self.lora_A.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return self.base(x) + delta * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        """Effective weight ``W + B @ A * scaling`` (differentiable in A and B; adapter dropout not applied).

        Lets code that reads ``layer.weight`` directly (the fused linear + cross-entropy on ``lm_head``) see the
        adapted layer.
        """
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scaling

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def fused_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x', W')`` with ``F.linear(x', W') == forward(x) - bias``, adapter dropout included: ``[x | s *
        dropout(x) A^T] @ [W | B]^T``. For kernels that take an input and one weight (the fused linear +
        cross-entropy on ``lm_head``): :attr:`weight` folds ``W + B A s`` and so cannot drop the adapter's input."""
        a = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling  # (..., r)
        return torch.cat([x, a.to(x.dtype)], dim=-1), torch.cat([self.base.weight, self.lora_B], dim=1)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + B @ A * scaling`` computed in fp32, in the base weight's dtype."""
        w = self.base.weight
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (w.float() + delta).to(w.dtype)

    def extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}{rs}"


def linear_operands(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x', W')`` with ``F.linear(x', W')`` equal to ``layer(x)`` without its bias: ``(x, layer.weight)`` for a plain
    linear layer, :meth:`LoRALinear.fused_operands` for an adapted one."""
    if isinstance(layer, LoRALinear):
        return layer.fused_operands(x)
    return x, layer.weight


# ---------------------------------------------------------------------------- helpers
def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the plain (not yet adapted) nn.Linear modules."""
    inside = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(n.startswith(p + ".") for p in inside)
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _num_layers(model: nn.Module) -> int:
    idx = [i for n, _ in model.named_modules() if (i := _layer_index(n + ".")) is not None]
    return max(idx) + 1 if idx else 0


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name -> LoRALinear} of an adapted model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _resolve_saved_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    all_names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for want in names:
        hits = [n for n in all_names if _matches(n, want)]
        if not hits and want not in _ANY_HEAD:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in all_names if not _LAYER_RE.search(n + ".")})
            raise ValueError(
                f"modules_to_save entry {want!r} matches no module of {type(model).__name__}; "
                f"top-level modules are: {', '.join(leaves)}"
            )
        # Keep only outermost matches (a module named inside another saved module is covered already).
        for n in hits:
            if n not in out:
                out.append(n)
    return [n for n in out if not any(n.startswith(o + ".") for o in out if o != n)]


# ---------------------------------------------------------------------------- public API
def mark_only_lora_trainable(model: nn.Module, modules_to_save: Iterable[str] = ()) -> list[str]:
    """Freeze every parameter except the LoRA adapters and the modules named in ``modules_to_save``.

    Returns the names of the modules trained in full. Tied parameters follow their module (training a tied
    ``lm_head`` trains the embedding too, since they are one tensor).
    """
    saved = _resolve_saved_modules(model, modules_to_save)
    model.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    for n in saved:
        model.get_submodule(n).requires_grad_(True)
    return saved


def lora_target_names(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that ``cfg`` adapts (what :func:`apply_lora` wraps).

    A target that matches nothing is a ``ValueError`` naming it and listing the linear layers there are.
    """
    candidates = _linear_names(model)
    n_layers = _num_layers(model)
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"LoRA layers {bad} are out of range: the model has decoder layers 0..{n_layers - 1}")
    chosen: list[str] = []
    unmatched: list[str] = []
    for t in cfg.target_modules:
        hits = [n for n in candidates if _matches(n, t)]
        if cfg.layers is not None:
            hits = [n for n in hits if _layer_index(n) is None or _layer_index(n) in cfg.layers]
        if not hits:
            unmatched.append(t)
        chosen += [n for n in hits if n not in chosen]
    if unmatched:
        available = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        where = f" in layers {cfg.layers}" if cfg.layers is not None else ""
        raise ValueError(
            f"LoRA target_modules {unmatched} match no nn.Linear of {type(model).__name__}{where}; "
            f"linear layers available: {', '.join(available)}"
        )
    return chosen


def _refuse_adapters_in_saved_modules(adapted: list[str], saved: list[str], cfg: LoRAConfig) -> None:
    """A module is adapted or trained in full, not both: both trained its base weight under the adapter, which
    neither PEFT's layout nor :func:`~.peft_format.load_adapter` can express."""
    for name in adapted:
        for s in saved:
            if name == s or name.startswith(s + "."):
                by_head = s.rsplit(".", 1)[-1] in HEAD_MODULES and not any(_matches(s, m) for m in cfg.modules_to_save)
                raise ValueError(
                    f"LoRA target {name} {'is' if name == s else f'is inside {s}, which is'} trained in full by "
                    f"{'train_head' if by_head else 'modules_to_save'}; a module is adapted or trained in full, not "
                    "both: "
                    + (
                        "drop it from target_modules, or set train_head: false to give it an adapter only"
                        if by_head
                        else "drop it from target_modules or from modules_to_save"
                    )
                )


def apply_lora(model: nn.Module, cfg: LoRAConfig | dict | None = None, **overrides) -> nn.Module:
    """Wrap the matching ``nn.Linear`` layers of ``model`` in :class:`LoRALinear` (in place) and freeze the rest.

    A target matches a module whose name equals it or ends with ``"." + target``; ``cfg.layers`` restricts
    the matches inside decoder layers to those indices. Every target must match at least one layer, else a
    ``ValueError`` names it and lists the linear layers there are. The config and the fully trained modules are
    recorded on the model (``model.lora_config``, ``model.lora_modules_to_save``). Returns ``model``.
    """
    if cfg is None:
        cfg = LoRAConfig(**overrides)
    elif isinstance(cfg, dict):
        cfg = LoRAConfig(**{**cfg, **overrides})
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if lora_modules(model):
        raise ValueError(
            f"{type(model).__name__} already has LoRA adapters; merge_lora() it first or start from the base model"
        )
    chosen = lora_target_names(model, cfg)
    to_save = (list(HEAD_MODULES) if cfg.train_head else []) + list(cfg.modules_to_save)
    _refuse_adapters_in_saved_modules(chosen, _resolve_saved_modules(model, to_save), cfg)
    shared: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(n)
    for name in chosen:
        base = model.get_submodule(name)
        tied = [n for n in shared.get(id(base.weight), []) if not n.startswith(name + ".")]
        if tied:
            raise ValueError(
                f"{name}.weight is tied to {tied[0]}; LoRA on a tied layer would adapt both. Drop {name!r} from "
                "target_modules (train it via modules_to_save instead)"
            )
        r, alpha = cfg.rank_alpha(name)
        _set_submodule(model, name, LoRALinear(base, r, alpha, cfg.dropout, cfg.use_rslora))
    saved = mark_only_lora_trainable(model, to_save)
    model.lora_config = cfg
    model.lora_modules_to_save = saved
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold ``B @ A * scaling`` into each base weight and put the plain base layers back (in place).

    Afterwards the module tree and state-dict keys are the original ones, so ``save_pretrained`` writes a plain
    Hugging Face checkpoint. The merge is computed in fp32 and stored in the base dtype. ``requires_grad`` flags
    are left as they are (call ``model.requires_grad_(True)`` to train the merged model in full).
    """
    for name, m in lora_modules(model).items():
        m.base.weight.copy_(m.merged_weight())  # plain tensors and DTensors (same layout) alike
        _set_submodule(model, name, m.base)
    for attr in ("lora_config", "lora_modules_to_save"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def lora_state_dict(model: nn.Module, include_saved_modules: bool = True) -> dict[str, torch.Tensor]:
    """The adapter weights (``*.lora_A`` / ``*.lora_B``), plus the fully trained modules' weights, on CPU.

    Keys are those of ``model.state_dict()``, so :func:`load_lora_state_dict` puts them back into a model
    prepared with the same :class:`LoRAConfig`.
    """
    saved = tuple(getattr(model, "lora_modules_to_save", ())) if include_saved_modules else ()
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("lora_A", "lora_B") or any(k.startswith(s + ".") for s in saved):
            t = v.detach()
            if hasattr(t, "full_tensor"):  # DTensor (FSDP2)
                t = t.full_tensor()
            out[k] = t.to("cpu").clone()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by :func:`lora_state_dict` into an adapted model; every adapter must be present."""
    expected = {k for k in model.state_dict() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    if not expected:
        raise ValueError(
            f"{type(model).__name__} has no LoRA adapters; call apply_lora() with the training config first"
        )
    missing = sorted(expected - set(state))
    own = set(model.state_dict())
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not fit the model: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}; use the LoRAConfig it was trained with"
        )
    model.load_state_dict(state, strict=False)


def lora_num_parameters(config, cfg: LoRAConfig | None = None) -> int:
    """Analytic adapter parameter count for a :class:`Phi3Config` (A and B of every adapted projection): the modules
    :func:`apply_lora` would adapt in a causal LM of that config (targets, dotted suffixes, ``layers``, per-module
    ``rank_pattern``), chosen by the same rule on a weightless (meta-device) skeleton of its linear layers."""
    cfg = cfg or LoRAConfig()
    shapes = config.linear_shapes()  # {name: (out, in)}
    parents = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
    skeleton = nn.Module()
    skeleton.model = nn.Module()
    skeleton.model.layers = nn.ModuleList()
    for _ in range(config.num_hidden_layers):
        layer = nn.Module()
        for parent in ("self_attn", "mlp"):
            setattr(layer, parent, nn.Module())
        for leaf, parent in parents.items():
            out_f, in_f = shapes[leaf]
            setattr(getattr(layer, parent), leaf, nn.Linear(in_f, out_f, bias=False, device="meta"))
        skeleton.model.layers.append(layer)
    skeleton.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
    n = 0
    for name in lora_target_names(skeleton, cfg):
        base = skeleton.get_submodule(name)
        n += cfg.rank_alpha(name)[0] * (base.in_features + base.out_features)
    return n
