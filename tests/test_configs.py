"""Every shipped YAML, and every overlay combination meant to work, parses (``--print_config``, nothing is built)."""

from __future__ import annotations

import itertools

import pytest
import yaml

from .modules.helpers import CONFIGS, run_main


def _lightning_yaml(path) -> bool:
    """LightningCLI configs (model: phi3_lightning.modules.*); others (compare_attention.yaml) belong elsewhere."""
    return "phi3_lightning.modules." in path.read_text() or path.parent.name == "strategies"


BASES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("*.yaml") if _lightning_yaml(p))
FINETUNE = sorted(p.relative_to(CONFIGS).as_posix() for p in (CONFIGS / "finetune").glob("*.yaml"))
OVERLAYS = sorted(p.relative_to(CONFIGS).as_posix() for p in (CONFIGS / "strategies").glob("*.yaml"))
PARALLEL = ["strategies/ddp.yaml", "strategies/fsdp2.yaml", "strategies/fsdp.yaml"]
PRECISION = ["strategies/bf16.yaml", "strategies/bf16_true.yaml", "strategies/fp16.yaml"]
MEMORY = ["strategies/activation_checkpointing.yaml", "strategies/compile.yaml"]
# benchmarks/gpu_bench.py's Lightning path: causal_lm.yaml + bf16_true + compile + fsdp2 + the bench overlay
BENCH = sorted(p.relative_to(CONFIGS).as_posix() for p in (CONFIGS / "bench").glob("*.yaml"))
GPU_FIT = ("causal_lm.yaml", "strategies/bf16_true.yaml", "strategies/compile.yaml", "strategies/fsdp2.yaml")

COMBOS = (
    [(b,) for b in BASES + FINETUNE]
    + [(b, o) for b in BASES for o in OVERLAYS]
    + [(f, o) for f in FINETUNE for o in PARALLEL]
    # a parallel strategy + a precision + memory savers, as one would stack them
    + [("causal_lm.yaml", p, q, *MEMORY) for p, q in itertools.product(PARALLEL, PRECISION[:2])]
    + [("finetune/phi4_mini.yaml", "strategies/fsdp2.yaml", "strategies/bf16.yaml", "strategies/compile.yaml")]
    + [(*GPU_FIT, b) for b in BENCH]
)


def test_every_yaml_is_covered():
    shipped = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if _lightning_yaml(p)}
    covered = {c for combo in COMBOS for c in combo}
    assert shipped == covered and len(BASES) == 3 and len(FINETUNE) >= 3


class _Parser(Exception):
    pass


@pytest.fixture(scope="module")
def parser():
    """The CLI's own parser (all subcommands, links, callbacks), built once; parsing validates types and
    class paths exactly as ``fit --print_config`` does, without instantiating anything."""
    from phi3_lightning.cli import _cli_class

    class ParserOnly(_cli_class()):
        def parse_arguments(self, parser, args):
            raise _Parser(self._subcommand_parsers["fit"])

    with pytest.raises(_Parser) as got:
        ParserOnly(args=[])
    return got.value.args[0]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(x.rsplit("/", 1)[-1][:-5] for x in c))
def test_config_parses(parser, combo):
    args = [str(a) for c in combo for a in ("--config", CONFIGS / c)]
    cfg = yaml.safe_load(parser.dump(parser.parse_args(args)))
    # the overlays' settings survive the merge
    for c in combo:
        if not c.startswith("strategies/"):
            continue
        overlay = yaml.safe_load((CONFIGS / c).read_text())
        trainer = overlay.get("trainer", {})
        if "precision" in trainer:
            assert cfg["trainer"]["precision"] == trainer["precision"]
        if isinstance(trainer.get("strategy"), str):
            assert cfg["trainer"]["strategy"] == trainer["strategy"]
        elif "strategy" in trainer:
            assert cfg["trainer"]["strategy"]["class_path"] == trainer["strategy"]["class_path"]
        for key, value in overlay.get("model", {}).get("init_args", {}).items():
            assert cfg["model"]["init_args"][key] == value
    assert cfg["model"]["class_path"].startswith("phi3_lightning.modules.")
    assert cfg["data"]["class_path"].startswith("phi3_lightning.data.")


@pytest.mark.parametrize("base", ["causal_lm.yaml", "token_classification.yaml"])
def test_print_config_through_the_entry_point(base):
    rc, out, err = run_main(
        "fit", "--config", CONFIGS / base, "--config", CONFIGS / "strategies" / "ddp.yaml", "--print_config"
    )
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["trainer"]["strategy"] == "ddp" and cfg["trainer"]["devices"] == 2
    assert cfg["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")


@pytest.mark.parametrize("base", FINETUNE)
def test_finetune_configs_have_one_path_to_fill(base):
    rc, out, err = run_main("fit", "--config", CONFIGS / base, "--print_config")
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    path = cfg["model"]["init_args"]["model"]
    assert path.startswith("/path/to/") and cfg["data"]["init_args"]["tokenizer"] == path
    assert (CONFIGS / base).read_text().count("/path/to/") == 1


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_other_subcommands_parse(command):
    rc, _, err = run_main(command, "--config", CONFIGS / "sequence_classification.yaml", "--print_config")
    assert rc == 0, err


def test_gpu_fit_overlay_keeps_the_benchmark_setting(parser):
    """The Lightning path that gpu_bench.py times: bf16-true, per-layer compile, FSDP2 on one device, full-size model
    at 4096 tokens, fused AdamW, no checkpoint written, throughput measured every 5 batches."""
    args = [str(a) for c in (*GPU_FIT, "bench/gpu_fit.yaml") for a in ("--config", CONFIGS / c)]
    cfg = yaml.safe_load(parser.dump(parser.parse_args(args)))
    trainer, init = cfg["trainer"], cfg["model"]["init_args"]
    assert trainer["precision"] == "bf16-true" and trainer["devices"] == 1
    assert trainer["strategy"]["class_path"] == "phi3_lightning.modules.FSDP2Strategy"
    assert trainer["enable_checkpointing"] is False and trainer["callbacks"] == [] and trainer["limit_val_batches"] == 0
    assert init["torch_compile"] == "layers" and init["model"] == "phi-3-mini-4k"
    assert init["optimizer"]["init_args"]["fused"] is True
    assert cfg["data"]["init_args"]["max_length"] == 4096 and cfg["data"]["init_args"]["pack"] is True
    assert cfg["throughput"]["log_every_n_steps"] == 5


def test_print_config_holds_the_run_name_so_its_output_runs_under_the_same_name(tmp_path):
    """``--print_config > pc.yaml`` then ``fit --config pc.yaml`` ran under ``pc/<backend>`` (the name is made from
    the config file stems): the printed config names the run as the run's own saved config.yaml does."""
    rc, out, err = run_main(
        "fit",
        "--config",
        CONFIGS / "causal_lm.yaml",
        "--model.init_args.attn_implementation",
        "eager",
        "--print_config",
    )
    assert rc == 0, err
    assert yaml.safe_load(out)["trainer"]["logger"]["init_args"]["name"] == "causal_lm/eager"
    (tmp_path / "pc.yaml").write_text(out)
    rc, again, err = run_main("fit", "--config", tmp_path / "pc.yaml", "--print_config")
    assert rc == 0, err
    assert yaml.safe_load(again)["trainer"]["logger"]["init_args"]["name"] == "causal_lm/eager"  # not pc/eager
    rc, out, err = run_main("fit", "--config", CONFIGS / "causal_lm.yaml", "--run_name", "mine", "--print_config")
    assert rc == 0, err
    assert yaml.safe_load(out)["trainer"]["logger"]["init_args"]["name"] == "mine"
    rc, out, err = run_main(
        "fit", "--config", CONFIGS / "causal_lm.yaml", "--trainer.logger", "false", "--print_config"
    )
    assert rc == 0, err
    assert yaml.safe_load(out)["trainer"]["logger"] is False
