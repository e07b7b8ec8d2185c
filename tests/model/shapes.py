"""Tiny copies of every preset's shape, used by the parity tests (fp32, CPU, seconds)."""

from phi3_lightning.model import Phi3Config


def longrope(half, long_scale=3.0, short_scale=1.2):
    return {
        "type": "longrope",
        "short_factor": [1.0 + (short_scale - 1.0) * i / (half - 1) for i in range(half)],
        "long_factor": [1.0 + (long_scale - 1.0) * i / (half - 1) for i in range(half)],
    }


BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    max_position_embeddings=128,
    original_max_position_embeddings=128,
)

SHAPES = {
    # phi-3-mini-4k: MHA + sliding window (sequences run past the window)
    "mini-4k": dict(BASE, num_key_value_heads=4, sliding_window=7),
    # phi-3-mini-128k / phi-3.5-mini: LongRoPE, switch at 16 tokens
    "mini-128k": dict(
        BASE,
        num_key_value_heads=4,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_scaling=longrope(8),
        sliding_window=262144,
    ),
    # phi-3-medium: GQA 4 query / 2 kv heads, sliding window
    "medium-4k": dict(BASE, num_key_value_heads=2, sliding_window=9),
    # phi-4-mini: GQA, partial rotary 0.75, tied embeddings, LongRoPE
    "phi-4-mini": dict(
        BASE,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_scaling=longrope(12),
    ),
    # phi-4: GQA, large rope_theta, no window
    "phi-4": dict(BASE, num_key_value_heads=2, rope_theta=250000.0, sliding_window=None),
}


def config(name, **over):
    d = dict(SHAPES[name])
    d.update(over)
    return Phi3Config.from_dict(d)
