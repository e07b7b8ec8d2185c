"""activation_checkpointing: selective on the LightningModule and through the CLI (model-level behaviour:
tests/model/test_selective_checkpoint.py)."""

from __future__ import annotations

import pytest
import torch

from phi3_lightning.modules import CausalLMModule

from .helpers import CONFIGS, built, run_main, small_args


def test_module_switch_gives_the_same_gradients_as_none_and_true():
    batch = {"input_ids": torch.randint(0, 256, (2, 16))}
    batch["labels"] = batch["input_ids"]
    grads = {}
    for ac in (False, True, "selective"):
        torch.manual_seed(0)
        m = built(CausalLMModule(activation_checkpointing=ac))
        m.train()
        m(batch, return_logits=False).loss.backward()
        grads[ac] = {n: p.grad for n, p in m.head.named_parameters()}
        model = m.head.model
        assert model.gradient_checkpointing == bool(ac) and model.checkpoint_selective == (ac == "selective")
    for n, g in grads[False].items():
        assert torch.equal(grads["selective"][n], g), n


def test_refusals_name_the_value_and_the_fix():
    for bad in ("selectiv", "full", -1, 1.5):
        with pytest.raises(ValueError, match="'selective'") as e:
            CausalLMModule(activation_checkpointing=bad)
        assert repr(bad) in str(e.value)
    with pytest.raises(ValueError, match="torch_compile='model' is not supported.*torch_compile: layers"):
        CausalLMModule(activation_checkpointing="selective", torch_compile="model")


def test_torch_compile_layers_compiles_the_checkpointed_call(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__))
    m = built(CausalLMModule(activation_checkpointing="selective", torch_compile="layers", compile_mode="default"))
    assert compiled == []  # no layer module compiled: a compiled layer inside the checkpoint would be opaque to it
    assert m.head.model._compiled_checkpointed is not None and m.head.model._compiled_layer is not None


def test_torch_compile_layers_with_selective_trains_like_eager():
    batch = {"input_ids": torch.randint(0, 256, (2, 16))}
    batch["labels"] = batch["input_ids"]
    grads = []
    for kw in (dict(), dict(activation_checkpointing="selective", torch_compile="layers")):
        torch.manual_seed(0)
        m = built(CausalLMModule(**kw))
        m.train()
        m(batch, return_logits=False).loss.backward()
        grads.append({n: p.grad for n, p in m.head.named_parameters()})
    for n, g in grads[0].items():  # inductor's fused kernels round differently from eager: close, not equal
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("value, parsed", [("selective", "selective"), ("true", True), ("2", 2), ("false", False)])
def test_cli_parses_selective_and_keeps_true_false_n(value, parsed):
    from phi3_lightning.cli import _cli_class

    class _Parser(Exception):
        pass

    class ParserOnly(_cli_class()):  # the CLI's own fit parser, nothing instantiated (as tests/test_configs.py)
        def parse_arguments(self, parser, args):
            raise _Parser(self._subcommand_parsers["fit"])

    with pytest.raises(_Parser) as got:
        ParserOnly(args=[])
    parser = got.value.args[0]
    args = ["--config", str(CONFIGS / "causal_lm.yaml"), "--model.init_args.activation_checkpointing", value]
    assert parser.parse_args(args).model.init_args.activation_checkpointing == parsed
    with pytest.raises((SystemExit, Exception)):  # a typo is a parse error, never a silent default
        parser.parse_args([*args[:-1], "selectiv"])


@pytest.mark.slow
def test_fit_with_selective_checkpointing_through_the_cli(tmp_path):
    rc, out, err = run_main(
        "fit",
        *small_args("causal_lm", tmp_path / "logs", tmp_path / "cache", steps=2, val_every=2),
        "--model.init_args.activation_checkpointing",
        "selective",
    )
    assert rc == 0, err
    config = next((tmp_path / "logs").rglob("config.yaml")).read_text()
    assert "activation_checkpointing: selective" in config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(torch_compile="model"), "torch_compile='model' cannot be combined with FSDP2"),
        (
            dict(torch_compile="layers", activation_checkpointing="selective"),
            "'selective' with torch_compile='layers' is not supported under FSDP2",
        ),
    ],
)
def test_settings_not_offered_under_fsdp2_are_refused_before_the_model_is_built(kwargs, message):
    m = CausalLMModule(**kwargs)
    m._device_mesh = object()  # what ModelParallelStrategy sets; the refusal comes before the mesh is used
    with pytest.raises(ValueError, match=message):
        m.configure_model()
    assert m.head is None
