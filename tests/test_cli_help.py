"""The command line as a user meets it: --help with a config lists that config's model and data options, short class
names for --model.help / --data.help, no object reprs in help, no option prefixes, "did you mean" for typos, and the
memory / data-report subcommands."""

from __future__ import annotations

import pytest

from phi3_lightning.options import did_you_mean, explain_parse_error

from .modules.helpers import CONFIGS, run_main

LM = str(CONFIGS / "causal_lm.yaml")


@pytest.fixture(scope="module")
def fit_help():
    rc, out, err = run_main("fit", "--config", LM, "--help")
    assert rc == 0, err[-2000:]
    return out


def test_help_with_config_lists_model_and_data_options(fit_help):
    assert "--model.init_args.attn_implementation" in fit_help
    assert "attention backend: ``eager``, ``sdpa``" in fit_help  # its help text, not just the name
    assert "Model options of phi3_lightning.modules.CausalLMModule" in fit_help
    assert "Data options of phi3_lightning.data.CausalLMDataModule" in fit_help
    assert "--data.init_args.max_length" in fit_help and "--data.init_args.pack" in fit_help
    assert "--trainer.max_steps" in fit_help  # the trainer's options are still there


def test_help_has_no_reprs_and_no_cut_off_heading(fit_help):
    assert " object at 0x" not in fit_help
    assert "The main advantage is:" not in fit_help
    assert "num_labels of(data) --> model.init_args.num_labels" in fit_help


def test_help_without_config_has_no_class_sections():
    rc, out, _ = run_main("fit", "--help")
    assert rc == 0 and "--trainer.max_steps" in out
    assert "Model options of" not in out and " object at 0x" not in out


@pytest.mark.parametrize(
    "option, name, field",
    [
        ("--model.help", "CausalLMModule", "--model.attn_implementation"),
        ("--data.help", "CausalLMDataModule", "--data.max_length"),
        ("--data.help", "TokenClassificationDataModule", "--data.max_examples"),
    ],
)
def test_short_class_names_for_class_help(option, name, field):
    rc, out, err = run_main("fit", option, name)
    assert rc == 0, err[-2000:]
    assert field in out and "python -m phi3_lightning" in out and "__main__.py" not in out


def test_option_prefix_is_refused_with_a_suggestion():
    rc, _, err = run_main("fit", "--config", LM, "--trainer.max_step", "5", "--print_config")
    assert rc == 2
    assert "unrecognized arguments: --trainer.max_step 5; did you mean --trainer.max_steps?" in err
    assert len(err.splitlines()) <= 4  # a one-line usage, not the 60-line one


def test_unknown_init_arg_gets_one_line_with_a_suggestion():
    rc, _, err = run_main("fit", "--config", LM, "--model.init_args.atn_implementation", "eager")
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: --model.init_args.atn_implementation")
    assert "did you mean --model.init_args.attn_implementation?" in line and "CausalLMModule" in line
    assert "Union" not in err and "NestedArg" not in err
    rc, _, err = run_main("fit", "--config", LM, "--data.max_lenght", "8")
    assert rc == 2 and "did you mean --data.init_args.max_length?" in err


def test_unknown_key_in_a_config_file_gets_a_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    rc, _, err = run_main("fit", "--config", LM, "--config", bad)
    assert rc == 2 and "max_stepz" in err and "did you mean --trainer.max_steps?" in err


@pytest.mark.parametrize(
    "command, args, hint",
    [
        ("compare-attention", ["--seq_len", "128"], "did you mean --seq_lens?"),
        ("compare-attention", ["--repeat", "3"], "did you mean --repeats?"),  # a prefix, no longer expanded
        ("generate", ["--checkpoint", "x", "--prompt_text", "a"], "did you mean --prompt?"),
        ("export", ["--checkpoint", "x", "--output", "y", "--overwite"], "did you mean --overwrite?"),
    ],
)
def test_other_commands_refuse_prefixes_and_suggest(command, args, hint):
    rc, _, err = run_main(command, *args)
    assert rc == 2 and hint in err, err


def test_explain_parse_error_leaves_other_messages_alone():
    assert explain_parse_error("Expected an int: 'many'", ["--max_steps"]) == "Expected an int: 'many'"
    assert explain_parse_error("unrecognized arguments: --zzz", ["--max_steps"]) == "unrecognized arguments: --zzz"
    assert did_you_mean("--trainer.max_step", ["--trainer.max_steps", "--trainer.min_steps"]).endswith("max_steps?")


def test_memory_and_data_report_subcommands():
    rc, out, _ = run_main("--help")
    assert rc == 0 and "\n  memory " in out and "\n  data-report " in out
    rc, out, err = run_main("memory", "--preset", "tiny", "--precision", "32-true", "--seq-len", "64")
    assert rc == 0, err
    assert "weights" in out and "optimizer" in out
    rc, _, err = run_main("memory", "--preset", "tiny", "--seq", "64")
    assert rc == 2 and "did you mean --seq-len?" in err
    rc, out, _ = run_main("data-report", "--help")
    assert rc == 0 and "python -m phi3_lightning data-report" in out


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("memory", ["--bogus"], "unrecognized arguments: --bogus"),
        ("memory", ["--seq-len", "abc"], "argument --seq-len: invalid int value: 'abc'"),
        ("memory", ["--preset", "tiny", "--gpu-memory", "0"], "--gpu-memory 0: give the GPU's memory in GiB"),
        ("data-report", ["--max-length", "x"], "argument --max-length: invalid int value: 'x'"),
        ("data-report", ["--batch-size", "0"], "--batch-size 0: use a positive number of rows per batch"),
    ],
)
def test_memory_and_data_report_errors_are_one_line(command, args, message):
    # they printed their whole usage (10 to 17 lines) before the error, the other commands one line
    rc, out, err = run_main(command, *args)
    assert rc == 2 and out == "", err
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {message}") and f"python -m phi3_lightning {command} --help" in err, err


def test_memory_config_that_does_not_exist_is_named_as_config():
    rc, _, err = run_main("memory", "--config", "/nonexistent/ckpt")
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("error: --config '/nonexistent/ckpt'") and "model=" not in err, err
    assert "--preset" in err  # the alternative


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_help_lists_predictions_for_predict_only_and_no_model_registry(command):
    # --predictions.* showed in every command's help though only predict writes predictions; Lightning's
    # --trainer.model_registry showed though this CLI reads and uploads no registry checkpoints
    rc, out, err = run_main(command, "--help")
    assert rc == 0, err[-2000:]
    assert ("--predictions.path" in out) == (command == "predict")
    assert "model_registry" not in out and "Model hub" not in out
    assert "--trainer.max_steps" in out and "--ckpt_path" in out  # the rest is still there


def test_predictions_in_a_shared_config_still_parse_for_fit(tmp_path):
    # hidden, not removed: one YAML (or a predict run's config.yaml) may serve fit and predict
    shared = tmp_path / "shared.yaml"
    shared.write_text("predictions:\n  path: out.jsonl\n")
    rc, out, err = run_main("predict", "--config", LM, "--config", shared, "--print_config")
    assert rc == 0 and "path: out.jsonl" in out, err[-2000:]
    rc, out, err = run_main("fit", "--config", LM, "--config", shared, "--print_config")
    assert rc == 0, err[-2000:]
    assert "out.jsonl" not in out  # fit's printed config (and config.yaml) leave out what fit does not use
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    for command in ("fit", "predict"):  # and it is a config both take again
        rc, _, err = run_main(command, "--config", printed, "--print_config")
        assert rc == 0, (command, err[-2000:])


def test_model_registry_is_refused_naming_the_option():
    rc, _, err = run_main("fit", "--config", LM, "--trainer.model_registry", "my-model", "--print_config")
    assert rc == 0  # printing the config runs nothing
    rc, _, err = run_main("validate", "--config", LM, "--trainer.model_registry", "my-model")
    assert rc == 1 and "Traceback" not in err, err[-2000:]
    assert "--trainer.model_registry 'my-model'" in err and "not read or uploaded" in err, err[-2000:]
