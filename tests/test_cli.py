"""The three default configs through the real CLI entry point for a few steps, TensorBoard read back; predict, export
(transformers loads it, same logits), generate, and resuming with --ckpt_path last."""

from __future__ import annotations

import json
import math

import pytest
import torch

from .modules.helpers import BASES, finite, run_main, run_module, scalars, small_args, texts

VAL_METRIC = {
    "causal_lm": "val/perplexity",
    "sequence_classification": "val/accuracy",
    "token_classification": "val/f1",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root / "logs", root / "cache", root


@pytest.fixture(scope="module")
def runs(workdir):
    """One short fit per default config (in-process through phi3_lightning.cli.main); base -> run directory."""
    logs, cache, _ = workdir
    out = {}
    for base in BASES:
        rc, _, err = run_main("fit", *small_args(base, logs, cache))
        assert rc == 0, err[-3000:]
        out[base] = logs / base / "sdpa" / "version_0"
    return out


@pytest.mark.parametrize("base", BASES)
def test_fit_logs_loss_metric_and_throughput(runs, base):
    run = runs[base]
    tags = scalars(run)
    assert finite(tags["train/loss_step"]) and len(tags["train/loss_step"]) == 4
    assert finite(tags["train/loss_epoch"])
    assert finite(tags["val/loss"]) and len(tags["val/loss"]) == 2  # validated at steps 2 and 4
    assert finite(tags[VAL_METRIC[base]])
    for perf in ("perf/tokens_per_sec", "perf/mfu", "perf/tflops_per_device", "perf/peak_memory_mb"):
        assert finite(tags[perf]) and all(v > 0 for _, v in tags[perf]), perf
    assert "train/lr/pg1" in tags  # LearningRateMonitor: warmup + cosine from YAML, beside the train/ cards
    card = texts(run)["run/text_summary"]
    assert "| attn_implementation | sdpa |" in card and "| precision | 32-true |" in card
    ckpts = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert not [n for n in ckpts if n.endswith(".tmp")]
    hparams = (run / "hparams.yaml").read_text()
    assert "attn_implementation: sdpa" in hparams


def test_classification_labels_linked_from_data(runs):
    ckpt = torch.load(runs["sequence_classification"] / "checkpoints" / "last.ckpt", weights_only=True)
    info = ckpt["phi3_lightning"]
    names = list(info["config"]["id2label"].values())
    assert info["config"]["num_labels"] == len(names) >= 2 and "json" in names
    assert info["tokenizer"] == "byte"
    assert ckpt["state_dict"]["head.score.weight"].shape[0] == len(names)


def test_predict_writes_jsonl_with_label_names(runs, workdir):
    logs, cache, root = workdir
    ckpt = runs["sequence_classification"] / "checkpoints" / "last.ckpt"
    out = root / "preds.jsonl"
    rc, _, err = run_main(
        "predict", *small_args("sequence_classification", logs, cache), "--ckpt_path", ckpt, "--predictions.path", out
    )
    assert rc == 0, err[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(rows) <= 16  # at most 2 batches of 8 from the (small) test split
    names = set(rows[0]["scores"])
    assert {"json", "email"} <= names
    assert all(r["prediction"] in names and r["label"] in names for r in rows)
    assert all(math.isclose(sum(r["scores"].values()), 1.0, abs_tol=1e-4) for r in rows)

    ckpt = runs["token_classification"] / "checkpoints" / "last.ckpt"
    out = root / "tokens.jsonl"
    rc, _, err = run_main(
        "predict", *small_args("token_classification", logs, cache), "--ckpt_path", ckpt, "--predictions.path", out
    )
    assert rc == 0, err[-3000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert len(row["predictions"]) == len(row["words"])
    assert {p for p in row["predictions"] if p is not None} <= {
        "NAME",
        "OP",
        "STRING",
        "NUMBER",
        "COMMENT",
        "NEWLINE",
        "NL",
        "INDENT",
        "DEDENT",
        "FSTRING_START",
        "FSTRING_MIDDLE",
        "FSTRING_END",
        "ENDMARKER",
    }


def test_export_loads_in_transformers_with_same_logits(runs, workdir):
    transformers = pytest.importorskip("transformers")
    from phi3_lightning.modules import load_head

    _, _, root = workdir
    ckpt = runs["causal_lm"] / "checkpoints" / "last.ckpt"
    out = root / "exported"
    rc, stdout, err = run_main("export", "--checkpoint", ckpt, "--output", out)
    assert rc == 0, err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "phi3_lightning.json").read_text())["tokenizer"] == "byte"
    assert not [p for p in root.iterdir() if p.name.startswith(".exported")]  # temp dir renamed away

    ours = load_head(ckpt).head
    theirs = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 262, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)

    rc, _, err = run_main("export", "--checkpoint", ckpt, "--output", out)  # not empty: refuse
    assert rc == 1 and "--overwrite" in err
    rc, _, err = run_main("export", "--checkpoint", ckpt, "--output", out, "--overwrite", "--dtype", "bfloat16")
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_generate_on_exported_and_lightning_checkpoints(runs, workdir):
    _, _, root = workdir
    ckpt = runs["causal_lm"] / "checkpoints" / "last.ckpt"
    out = root / "exported_gen"
    assert run_main("export", "--checkpoint", ckpt, "--output", out)[0] == 0
    proc = run_module("generate", "--checkpoint", out, "--prompt", "def ", "--max_new_tokens", "6", cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rc, stdout, err = run_main(
        "generate",
        "--checkpoint",
        ckpt,
        "--prompt",
        "import",
        "--chat",
        "--max_new_tokens",
        "4",
        "--do_sample",
        "--top_k",
        "5",
    )
    assert rc == 0, err
    rc, _, err = run_main(
        "generate", "--checkpoint", runs["token_classification"] / "checkpoints" / "last.ckpt", "--prompt", "x"
    )
    assert rc == 1 and "causal-LM" in err


def test_resume_with_ckpt_path_last_continues_the_same_run(runs, workdir):
    logs, cache, _ = workdir
    args = small_args("causal_lm", logs, cache, steps=6)
    rc, _, err = run_main("fit", *args, "--ckpt_path", "last")
    assert rc == 0, err[-3000:]
    run = runs["causal_lm"]
    assert not (run.parent / "version_1").exists()  # resumed in place
    steps = [s for s, _ in scalars(run)["train/loss_step"]]
    assert max(steps) == 5 and steps.count(4) == 1  # steps 0-3 from the first fit, 4-5 after resuming
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6


def test_test_subcommand_logs_test_metrics(runs, workdir):
    logs, cache, _ = workdir
    ckpt = runs["token_classification"] / "checkpoints" / "last.ckpt"
    rc, _, err = run_main("test", *small_args("token_classification", logs, cache), "--ckpt_path", ckpt)
    assert rc == 0, err[-3000:]
    run = runs["token_classification"] / "test"  # logged into the evaluated run, not a new version
    assert sorted(p.name for p in run.parent.parent.glob("version_*")) == ["version_0"]
    tags = scalars(run)
    assert finite(tags["test/loss"]) and finite(tags["test/accuracy"]) and finite(tags["test/f1"])
