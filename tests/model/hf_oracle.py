"""Build tiny random transformers Phi-3 models (the oracle) and save them as checkpoints."""

import pytest

transformers = pytest.importorskip("transformers")


def hf_config(cfg, attn="eager"):
    d = cfg.to_dict()
    d.pop("architectures", None)
    d.pop("extra", None)
    hc = transformers.Phi3Config(**d)
    hc._attn_implementation = attn
    return hc


def hf_model(cfg, head="causal_lm", attn="eager"):
    cls = {
        "causal_lm": transformers.Phi3ForCausalLM,
        "sequence_classification": transformers.Phi3ForSequenceClassification,
        "token_classification": transformers.Phi3ForTokenClassification,
    }[head]
    m = cls(hf_config(cfg, attn))
    return m.eval()
