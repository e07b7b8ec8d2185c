"""Phi-3 configuration: every field of a real Phi-3 ``config.json``, validation, and named presets.

The field names and meanings are those of Hugging Face's ``Phi3Config`` so that a checkpoint's
``config.json`` loads unchanged and :meth:`Phi3Config.to_dict` writes one that transformers accepts.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..conventions import PROBLEM_TYPES

_ROPE_TYPE_ALIASES = {"su": "longrope", "yarn": "longrope", "longrope": "longrope", "default": "default"}
HIDDEN_ACTS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
# config.json keys that are not fields but that from_dict reads (transformers spellings of fields).
_READ_KEYS = ("rope_parameters", "label2id", "dtype")


@dataclass
class Phi3Config:
    """Architecture of a Phi-3-family model (everything that loads as ``Phi3ForCausalLM``)."""

    vocab_size: int = 32064
    """Rows of the token embedding (32064 for Phi-3/3.5, 200064 Phi-4-mini, 100352 phi-4)."""
    hidden_size: int = 3072
    """Width of the residual stream."""
    intermediate_size: int = 8192
    """Width of each half of the fused gate/up projection."""
    num_hidden_layers: int = 32
    """Number of decoder layers."""
    num_attention_heads: int = 32
    """Query heads; head_dim = hidden_size / num_attention_heads unless ``head_dim`` is set."""
    num_key_value_heads: int | None = None
    """Key/value heads for grouped-query attention (None = num_attention_heads, i.e. MHA)."""
    head_dim: int | None = None
    """Per-head width; None derives hidden_size // num_attention_heads."""
    hidden_act: str = "silu"
    """Gate activation of the MLP: silu (SwiGLU, the Phi-3 default) or a gelu variant (GeGLU)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model accepts (131072 for the 128k checkpoints)."""
    original_max_position_embeddings: int = 4096
    """Pre-training context; LongRoPE switches to the long factors above it."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside the RMSNorm square root."""
    use_cache: bool = True
    """Kept for config.json compatibility (generation always uses our KV cache)."""
    tie_word_embeddings: bool = False
    """Share the lm_head weight with the token embedding (Phi-4-mini)."""
    rope_theta: float = 10000.0
    """RoPE base wavelength (250000 for phi-4)."""
    partial_rotary_factor: float = 1.0
    """Fraction of each head's dims that are rotated (0.75 for Phi-4-mini)."""
    rope_scaling: dict | None = None
    """None for plain RoPE, or {"type": "longrope", "short_factor": [...], "long_factor": [...]} (su/yarn = longrope)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (training only)."""
    resid_pdrop: float = 0.0
    """Dropout on each sub-block's output before the residual add."""
    embd_pdrop: float = 0.0
    """Dropout on the token embeddings (kept for compatibility; transformers' Phi-3 does not apply it)."""
    attention_bias: bool = False
    """Phi-3 has no bias in its projections; kept for config compatibility."""
    sliding_window: int | None = None
    """Query q sees key k iff q - w < k <= q (2047 for the 4k checkpoints); None = full causal."""
    bos_token_id: int | None = 1
    """Beginning-of-sequence id, kept for config.json (the data modules prepend the tokenizer's bos with add_bos)."""
    eos_token_id: int | list[int] | None = 32000
    """End-of-sequence id(s); generation stops at any of them unless told other ids."""
    pad_token_id: int | None = 32000
    """Padding id; sequence classification pools the rightmost token that is not this id."""
    num_labels: int = 2
    """Classes for the classification heads."""
    problem_type: str | None = None
    """regression / single_label_classification / multi_label_classification (None infers from labels)."""
    classifier_dropout: float | None = None
    """Dropout before the token-classification score layer (None = 0.1 as in transformers)."""
    id2label: dict | None = None
    """Optional label names, {"0": "neg", ...}."""
    torch_dtype: str | None = None
    """dtype the checkpoint was saved in (informational)."""
    extra: dict = field(default_factory=dict)
    """Unknown config.json keys, kept and written back."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in _ROPE_TYPE_ALIASES:
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported by Phi-3; use 'longrope' (aliases 'su', 'yarn') or drop rope_scaling"
                )
            kind = _ROPE_TYPE_ALIASES[kind]
            if kind == "default":
                self.rope_scaling = None
            else:
                self.rope_scaling.pop("type", None)
                self.rope_scaling["rope_type"] = kind
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def is_longrope(self) -> bool:
        return self.rope_scaling is not None and self.rope_scaling.get("rope_type") == "longrope"

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def longrope_attention_factor(self) -> float:
        """cos/sin scale of LongRoPE: sqrt(1 + ln(max/orig) / ln(orig)), 1 when not extended."""
        if not self.is_longrope:
            return 1.0
        if self.rope_scaling.get("attention_factor") is not None:
            return float(self.rope_scaling["attention_factor"])
        factor = self.rope_scaling.get("factor")
        if factor is None:
            factor = self.max_position_embeddings / self.original_max_position_embeddings
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (out_features, in_features)}`` of the four projections of one decoder layer (the weight shapes):
        fused ``qkv_proj`` = [Q | K | V] rows, fused ``gate_up_proj`` = [gate | up]."""
        h, d = self.hidden_size, self.head_size
        return {
            "qkv_proj": ((self.num_attention_heads + 2 * self.num_key_value_heads) * d, h),
            "o_proj": (h, self.num_attention_heads * d),
            "gate_up_proj": (2 * self.intermediate_size, h),
            "down_proj": (h, self.intermediate_size),
        }

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Analytic parameter count (matches the built model)."""
        h = self.hidden_size
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * h  # + the two RMSNorm weights
        n = self.num_hidden_layers * per_layer + h
        if include_embeddings:
            n += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N (non-embedding matmuls + lm_head) + attention scores 12 * L * H * d * T.

        The attention term counts QK^T and AV for a causal sequence of ``seq_len`` (half the square on
        average is skipped by the causal mask, which we ignore as PaLM's MFU convention does).
        """
        n = self.num_parameters(include_embeddings=False) + self.vocab_size * self.hidden_size
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_size * seq_len
        return 6.0 * n + attn

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name}={v!r} must be a positive integer")
        need(
            self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
            "change one of them or set head_dim explicitly",
        )
        need(
            self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads={self.num_attention_heads} must be a multiple of num_key_value_heads="
            f"{self.num_key_value_heads} (grouped-query attention shares each K/V head among a whole group)",
        )
        need(self.head_size % 2 == 0, f"head_dim={self.head_size} must be even for rotary embeddings")
        need(
            0.0 < self.partial_rotary_factor <= 1.0,
            f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]",
        )
        need(
            self.rotary_dim % 2 == 0,
            f"rotary dims int(head_dim * partial_rotary_factor)={self.rotary_dim} must be even",
        )
        need(
            self.hidden_act in HIDDEN_ACTS,
            f"hidden_act={self.hidden_act!r} is not supported; choose one of {', '.join(HIDDEN_ACTS)}",
        )
        need(
            self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
            f"sliding_window={self.sliding_window!r} must be a positive integer or null",
        )
        need(
            self.max_position_embeddings >= self.original_max_position_embeddings or self.is_longrope is False,
            f"max_position_embeddings={self.max_position_embeddings} is below original_max_position_embeddings="
            f"{self.original_max_position_embeddings}",
        )
        if self.is_longrope:
            half = self.rotary_dim // 2
            for key in ("short_factor", "long_factor"):
                fac = self.rope_scaling.get(key)
                need(
                    isinstance(fac, (list, tuple)) and all(isinstance(x, (int, float)) for x in fac),
                    f"rope_scaling[{key!r}] must be a list of numbers for longrope, got {fac!r}",
                )
                need(
                    len(fac) == half,
                    f"rope_scaling[{key!r}] has {len(fac)} entries but rotary_dim/2 = {half} "
                    f"(head_dim={self.head_size} * partial_rotary_factor={self.partial_rotary_factor} / 2); "
                    "the factor list must match the checkpoint's head size",
                )
        if self.problem_type is not None:
            need(
                self.problem_type in PROBLEM_TYPES,
                f"problem_type={self.problem_type!r}; use {', '.join(PROBLEM_TYPES)}",
            )
        self._validate_values(need)

    def _validate_values(self, need) -> None:
        """Values that cannot give a working model: an error now instead of NaN logits or an index error later."""

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("tie_word_embeddings", "use_cache", "attention_bias"):
            v = getattr(self, name)
            # a string "false" is truthy: tie_word_embeddings="false" would silently tie the weights
            need(
                isinstance(v, bool), f"{name}={v!r} must be true or false (a JSON/YAML boolean, not a string or number)"
            )
        for name in ("max_position_embeddings", "original_max_position_embeddings"):
            v = getattr(self, name)
            need(
                is_int(v) and v > 0,
                f"{name}={v!r} must be a positive integer (the longest sequence the model "
                "accepts; 4096 for the 4k checkpoints)",
            )
        need(
            self.head_dim is None or (is_int(self.head_dim) and self.head_dim > 0),
            f"head_dim={self.head_dim!r} must be a positive integer or null (null = hidden_size // num_attention_heads)",
        )
        need(
            is_num(self.rms_norm_eps) and self.rms_norm_eps > 0,
            f"rms_norm_eps={self.rms_norm_eps!r} must be a finite number > 0 (it keeps RMSNorm from dividing by "
            "zero); use the checkpoint's value, e.g. 1e-5",
        )
        need(
            is_num(self.rope_theta) and self.rope_theta > 0,
            f"rope_theta={self.rope_theta!r} must be a finite number > 0 (the RoPE base wavelength); use the "
            "checkpoint's value, e.g. 10000.0",
        )
        need(
            is_num(self.initializer_range) and self.initializer_range >= 0,
            f"initializer_range={self.initializer_range!r} must be a finite number >= 0 (the std of the weight "
            "init), e.g. 0.02",
        )
        need(
            is_int(self.num_labels) and self.num_labels >= 1,
            f"num_labels={self.num_labels!r} must be an integer >= 1 (1 = regression, 2+ = classes)",
        )
        for name in ("attention_dropout", "resid_pdrop", "embd_pdrop", "classifier_dropout"):
            v = getattr(self, name)
            need(
                v is None and name == "classifier_dropout" or (is_num(v) and 0.0 <= v < 1.0),
                f"{name}={v!r} must be a probability in [0, 1); use 0.0 to disable dropout",
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            ids = list(v) if isinstance(v, (list, tuple)) and name == "eos_token_id" else [v]
            bad = [i for i in ids if i is not None and not (is_int(i) and 0 <= i < self.vocab_size)]
            need(
                not bad,
                f"{name}={v!r} is outside the vocabulary [0, vocab_size={self.vocab_size}); set it to an id "
                f"below {self.vocab_size} (the tokenizer's), raise vocab_size, or set it to null",
            )
        if self.is_longrope:
            for key in ("short_factor", "long_factor"):
                bad = [x for x in self.rope_scaling[key] if not (is_num(x) and x > 0)]
                need(
                    not bad,
                    f"rope_scaling[{key!r}] holds {bad[:3]}: every LongRoPE factor must be a finite "
                    "number > 0; use the factors from the checkpoint's config.json",
                )
            for key in ("attention_factor", "factor"):
                v = self.rope_scaling.get(key)
                need(
                    v is None or (is_num(v) and v > 0),
                    f"rope_scaling[{key!r}]={v!r} must be a finite number > 0 or absent (it scales cos/sin of "
                    "LongRoPE; NaN, inf or 0 would give NaN or meaningless logits); use the checkpoint's value",
                )
            need(
                self.original_max_position_embeddings > 1,
                f"original_max_position_embeddings={self.original_max_position_embeddings} with LongRoPE: the "
                "attention scale sqrt(1 + ln(max/orig) / ln(orig)) needs orig >= 2; use the checkpoint's "
                "pre-training context (4096 for Phi-3)",
            )

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phi3Config:
        d = copy.deepcopy(dict(d))
        known = {f.name for f in fields(cls)} - {"extra"}
        # RoPE may be spelled in two places: rope_scaling (transformers < 5) and rope_parameters (transformers >= 5:
        # theta, partial factor and scaling in one dict). As transformers does, the RoPE dict is rope_scaling when it
        # is a non-empty dict, else rope_parameters (the other one is ignored), and its rope_theta /
        # partial_rotary_factor win over the top-level fields, which are only defaults.
        scaling, params = d.pop("rope_scaling", None), d.pop("rope_parameters", None)
        rope = scaling if scaling else params
        if rope is not None and not isinstance(rope, dict):
            key = "rope_scaling" if scaling else "rope_parameters"
            raise ValueError(
                f'{key}={rope!r} must be a JSON object such as {{"rope_type": "longrope", "short_factor": '
                '[...], "long_factor": [...]}, or null for plain RoPE'
            )
        if rope:
            rope = dict(rope)
            for key in ("rope_theta", "partial_rotary_factor"):
                if key in rope:
                    d[key] = rope.pop(key)
            # transformers' Phi-3 reads the top-level original_max_position_embeddings, never this copy
            rope.pop("original_max_position_embeddings", None)
            kind = rope.get("rope_type", rope.get("type", "default"))
            d["rope_scaling"] = None if _ROPE_TYPE_ALIASES.get(kind, kind) == "default" else rope
        if d.get("model_type") not in (None, "phi3"):
            raise ValueError(
                f"config.json has model_type={d['model_type']!r}, not 'phi3'; this package loads Phi-3-family "
                "checkpoints (Phi-3, Phi-3.5, Phi-4-mini, phi-4)"
            )
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        if isinstance(kwargs.get("id2label"), dict):
            kwargs["id2label"] = {str(k): v for k, v in kwargs["id2label"].items()}
            kwargs.setdefault("num_labels", len(kwargs["id2label"]))
        return cls(**kwargs, extra=d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Phi3Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}; pass a Hugging Face checkpoint directory that has one")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Phi3Config:
        """Read ``<dir>/config.json`` (or a config.json path, or a preset name) and apply overrides
        (see :func:`resolve_model`)."""
        return resolve_model(path, overrides)[0]

    def replace(self, **overrides: Any) -> Phi3Config:
        """A copy with ``overrides`` applied; a name that is not a field (a typo) is an error naming the closest."""
        check_override_names(overrides, also=self.extra)
        d = self.to_dict()
        d.update(overrides)
        return Phi3Config.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """A dict that transformers' ``Phi3Config`` accepts (``model_type``, ``architectures`` included)."""
        out: dict[str, Any] = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}
        out.update(copy.deepcopy(self.extra))
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name in ("id2label", "problem_type", "classifier_dropout", "torch_dtype", "head_dim") and v is None:
                continue
            out[f.name] = copy.deepcopy(v)
        if self.id2label:
            out["label2id"] = {v: int(k) for k, v in self.id2label.items()}
        return out

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def resolve_model(
    model: str | os.PathLike | Phi3Config | dict, overrides: dict[str, Any] | None = None
) -> tuple[Phi3Config, Path | None]:
    """Where a model comes from, the one resolver: ``model`` (a preset name, a Hugging Face checkpoint directory, a
    ``config.json`` path, a :class:`Phi3Config` or a dict of its fields) -> (config with ``overrides``, weights dir).

    The weights directory is None unless ``model`` is a checkpoint directory (whose safetensors a caller loads);
    a ``config.json`` path gives the architecture only (random init).
    """
    weights: Path | None = None
    if isinstance(model, Phi3Config):
        config = model
    elif isinstance(model, dict):
        config = Phi3Config.from_dict(model)
    elif isinstance(model, str) and model in PRESETS:
        config = get_preset(model)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                adapter = (path / "adapter_config.json").is_file()
                raise FileNotFoundError(
                    f"model={str(model)!r} is a directory without config.json (no config.json at {path}); pass a "
                    "Hugging Face checkpoint directory (config.json + safetensors) or a preset name"
                    + (
                        f". {path} holds a LoRA adapter (adapter_config.json): set model to its base checkpoint and "
                        "adapter to this directory"
                        if adapter
                        else ""
                    )
                )
            config = Phi3Config.from_json_file(path / "config.json")
            weights = path
        elif path.is_file() and path.suffix == ".json":
            config = Phi3Config.from_json_file(path)
        else:
            raise FileNotFoundError(
                f"model={str(model)!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing Hugging Face "
                "checkpoint directory (config.json + safetensors) nor a config.json file; check the path"
            )
    else:
        raise TypeError(
            f"model={model!r}: pass a preset name, a checkpoint directory, a config.json path or a Phi3Config"
        )
    if overrides:
        config = config.replace(**overrides)
    return config, weights


def check_override_names(overrides: dict[str, Any], also: dict[str, Any] | None = None) -> None:
    """Overrides must name Phi3Config fields (or keys already in the config, ``also``): a typo such as
    ``num_hiden_layers`` would otherwise land in ``extra`` and be silently ignored.

    Unknown keys *read from a config.json* are different: real checkpoints carry many we do not use, and
    :meth:`Phi3Config.from_dict` keeps those in ``extra``.
    """
    valid = sorted(({f.name for f in fields(Phi3Config)} - {"extra"}) | set(_READ_KEYS))
    unknown = [k for k in overrides if k not in valid and k not in (also or {})]
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid fields: {', '.join(valid)}"
    raise ValueError(
        f"config override {key!r} is not a Phi3Config field; {hint} (check config_overrides / the "
        "keyword arguments of from_pretrained)"
    )


# ---------------------------------------------------------------------- presets
def _longrope(half: int, long_scale: float = 4.0) -> dict:
    """Placeholder LongRoPE factors with the right *shape* for random-init presets.

    The real per-dimension factors are data the checkpoint ships in its config.json; ``from_pretrained``
    always reads those. These placeholders (short = 1, long ramping from 1 to ``long_scale``) only make a
    randomly initialised preset structurally identical to the checkpoint.
    """
    long = [1.0 + (long_scale - 1.0) * i / max(half - 1, 1) for i in range(half)]
    return {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": long}


_PHI3_MINI = dict(
    vocab_size=32064,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    sliding_window=2047,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=32000,
    pad_token_id=32000,
)
_PHI3_MEDIUM = dict(
    _PHI3_MINI,
    hidden_size=5120,
    intermediate_size=17920,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=10,
)

PRESETS: dict[str, dict[str, Any]] = {
    # microsoft/Phi-3-mini-4k-instruct (3.8B): MHA 32x96, sliding window 2047.
    "phi-3-mini-4k": _PHI3_MINI,
    # microsoft/Phi-3-mini-128k-instruct: LongRoPE ("su"/"longrope") 4k -> 128k.
    "phi-3-mini-128k": dict(
        _PHI3_MINI,
        max_position_embeddings=131072,
        sliding_window=262144,
        rope_scaling=_longrope(48),
        eos_token_id=32000,
    ),
    # microsoft/Phi-3-medium-4k-instruct (14B): GQA 40 query / 10 kv heads of 128.
    "phi-3-medium-4k": _PHI3_MEDIUM,
    # microsoft/Phi-3-medium-128k-instruct.
    "phi-3-medium-128k": dict(
        _PHI3_MEDIUM, max_position_embeddings=131072, sliding_window=131072, rope_scaling=_longrope(64)
    ),
    # microsoft/Phi-3.5-mini-instruct: the mini shape with LongRoPE 128k.
    "phi-3.5-mini": dict(_PHI3_MINI, max_position_embeddings=131072, sliding_window=262144, rope_scaling=_longrope(48)),
    # microsoft/Phi-4-mini-instruct (3.8B): 200k vocab, GQA 24/8 heads of 128, partial rotary 0.75, tied embeddings.
    "phi-4-mini": dict(
        vocab_size=200064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        rope_scaling=_longrope(48),
        sliding_window=262144,
        rope_theta=10000.0,
        bos_token_id=199999,
        eos_token_id=199999,
        pad_token_id=199999,
    ),
    # microsoft/phi-4 (14B): GQA 40/10, 16k context, rope_theta 250000, no sliding window.
    "phi-4": dict(
        vocab_size=100352,
        hidden_size=5120,
        intermediate_size=17920,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=10,
        max_position_embeddings=16384,
        original_max_position_embeddings=16384,
        rope_theta=250000.0,
        sliding_window=None,
        bos_token_id=100257,
        eos_token_id=100265,
        pad_token_id=100349,
    ),
    # Tiny presets for tests and CPU runs (byte-level tokenizer: 256 bytes + a few specials fit in 512).
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        original_max_position_embeddings=1024,
        sliding_window=None,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=257,
    ),
    "tiny-gqa": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        original_max_position_embeddings=1024,
        sliding_window=64,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=257,
    ),
    # Benchmark shape of the performance issue: hidden 384 = 4 heads x 96, 4 layers, Phi-3 vocab.
    "small-bench": dict(
        _PHI3_MINI,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
}


def get_preset(name: str, **overrides: Any) -> Phi3Config:
    """A named architecture; ``overrides`` replace fields (e.g. ``num_hidden_layers=2``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    check_override_names(overrides)
    d = copy.deepcopy(PRESETS[name])
    d.update(overrides)
    return Phi3Config.from_dict(d)
