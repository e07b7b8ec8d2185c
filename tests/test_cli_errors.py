"""Bad input gets a message that names the problem: unknown keys, wrong types, missing checkpoints, a head that does
not match its checkpoint, a tokenizer too big for the model, FSDP1 asked for on CPU."""

from __future__ import annotations

import sys
import types

from phi3_lightning.model import Phi3ForCausalLM, Phi3ForSequenceClassification, get_preset

from .modules.helpers import CONFIGS, ROOT, run_main, small_args

LM = str(CONFIGS / "causal_lm.yaml")


def test_unknown_config_key_is_named(tmp_path):
    rc, _, err = run_main("fit", "--config", LM, "--trainer.max_stepz", "3")
    assert rc == 2 and "max_stepz" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    bogus_option: 1\n")
    rc, _, err = run_main("fit", "--config", LM, "--config", bad)
    assert rc == 2 and "bogus_option" in err and "not accepted" in err


def test_wrong_type_is_named():
    rc, _, err = run_main("fit", "--config", LM, "--trainer.max_steps", "many")
    assert rc == 2 and "trainer.max_steps" in err and "int" in err
    rc, _, err = run_main("fit", "--config", LM, "--data.init_args.batch_size", "1.5")
    assert rc == 2 and "batch_size" in err


def test_missing_checkpoint_path(tmp_path):
    rc, _, err = run_main("fit", "--config", LM, "--ckpt_path", tmp_path / "nope.ckpt")
    assert rc == 1 and "nope.ckpt" in err and "does not exist" in err
    rc, _, err = run_main("generate", "--checkpoint", tmp_path / "nope", "--prompt", "x")
    assert rc == 1 and "does not exist" in err
    rc, _, err = run_main("export", "--checkpoint", tmp_path / "nope.ckpt", "--output", tmp_path / "out")
    assert rc == 1 and "does not exist" in err
    rc, _, err = run_main("fit", "--config", LM, "--model.init_args.model", tmp_path / "no_such_dir")
    assert rc != 0 and "no_such_dir" in err and "preset" in err


def test_fsdp_on_cpu_points_to_the_fsdp2_overlay():
    rc, _, err = run_main(
        "fit", "--config", LM, "--config", CONFIGS / "strategies" / "fsdp.yaml", "--trainer.accelerator", "cpu"
    )
    assert rc == 1 and "CUDA" in err and "configs/strategies/fsdp2.yaml" in err
    rc, _, err = run_main("fit", "--config", LM, "--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu")
    assert rc == 1 and "fsdp2.yaml" in err


def test_head_checkpoint_mismatch(tmp_path):
    """A sequence-classification checkpoint with 3 labels, data with 8 classes: say which tensor and what to do."""
    hf = tmp_path / "seq3"
    Phi3ForSequenceClassification.from_config(get_preset("tiny", num_labels=3)).save_pretrained(hf)
    args = small_args("sequence_classification", tmp_path / "logs", tmp_path / "cache", steps=1)
    rc, _, err = run_main("fit", *args, "--model.init_args.model", hf)
    assert rc == 1 and "score.weight" in err and "(3, 128)" in err and "num_labels" in err


def test_tokenizer_larger_than_vocab(tmp_path):
    args = small_args("causal_lm", tmp_path / "logs", tmp_path / "cache", steps=1)
    # (ids inside the smaller vocab, else the config itself is refused: pad_token_id=257 >= vocab_size=200)
    rc, _, err = run_main(
        "fit",
        *args,
        "--model.init_args.config_overrides",
        "{vocab_size: 200, bos_token_id: 1, eos_token_id: 1, pad_token_id: 0}",
    )
    assert rc == 1 and "vocab_size is 200" in err


def test_help_and_unknown_command():
    rc, out, _ = run_main("--help")
    assert rc == 0 and all(
        c in out for c in ("fit", "validate", "test", "predict", "generate", "export", "compare-attention")
    )
    rc, _, err = run_main("train")
    assert rc == 2 and "unknown command 'train'" in err
    rc, out, _ = run_main("generate", "--help")
    assert rc == 0 and "--checkpoint" in out and "--chat" in out


def test_a_mistyped_or_missing_command_is_a_short_error_with_the_fix():
    """Not the whole top-level help after the error line: the closest command, or the reminder that options follow a
    command."""
    rc, out, err = run_main("fti", "--config", LM)
    assert (
        rc == 2
        and not out
        and err.strip().splitlines()
        == [
            "error: unknown command 'fti'; did you mean fit? (commands: fit, validate, test, predict, generate, export, "
            "compare-attention, memory, data-report; python -m phi3_lightning --help describes them)"
        ]
    )
    rc, out, err = run_main("--config", LM)
    assert (
        rc == 2
        and not out
        and err.strip().splitlines()
        == [
            "error: '--config' is an option, not a command: name the command first, e.g. python -m phi3_lightning fit "
            "--config ... (commands: fit, validate, test, predict, generate, export, compare-attention, memory, "
            "data-report; python -m phi3_lightning --help describes them)"
        ]
    )


def test_compare_attention_dispatch(monkeypatch):
    seen = {}
    fake = types.ModuleType("phi3_lightning.compare")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "phi3_lightning.compare", fake)
    rc, _, _ = run_main("compare-attention", "--seq_lens", "16")
    assert rc == 0 and seen["argv"] == ["--seq_lens", "16"]
    monkeypatch.setitem(sys.modules, "phi3_lightning.compare", None)  # import fails
    rc, _, err = run_main("compare-attention")
    assert rc == 2 and "phi3_lightning.compare" in err


# ---------------------------------------------------------------------- one `error:` line instead of a traceback
def _error_line(rc: int, err: str) -> str:
    assert rc == 1 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_generate_with_a_file_that_is_not_a_checkpoint(tmp_path):
    readme = ROOT / "README.md"
    line = _error_line(*run_main("generate", "--checkpoint", readme, "--prompt", "x")[::2])
    assert f"{readme} is not a Lightning checkpoint (it starts with b'#" in line and "last.ckpt" in line
    line = _error_line(*run_main("export", "--checkpoint", readme, "--output", tmp_path / "out")[::2])
    assert "is not a Lightning checkpoint" in line and not (tmp_path / "out").exists()
    hf = tmp_path / "hf"
    Phi3ForCausalLM.from_config(get_preset("tiny")).save_pretrained(hf)
    line = _error_line(*run_main("generate", "--checkpoint", hf / "model.safetensors", "--prompt", "x")[::2])
    assert (
        "model.safetensors is not a Lightning checkpoint" in line
        and f"pass the directory that holds config.json ({hf})" in line
    )


def test_generate_rejects_sampling_settings_that_cannot_work(tmp_path):
    hf = tmp_path / "hf"
    Phi3ForCausalLM.from_config(get_preset("tiny")).save_pretrained(hf)
    base = ["generate", "--checkpoint", hf, "--tokenizer", "byte", "--prompt", "hi", "--max_new_tokens"]
    assert run_main(*base, "2", "--do_sample")[0] == 0  # the checkpoint itself is fine
    cases = [
        (["-1"], "max_new_tokens=-1 must be an integer >= 0"),
        # (the parser refuses the literal 'nan'/'inf'; 1e999 parses to inf)
        (["2", "--do_sample", "--temperature", "1e999"], "temperature=inf must be a finite number > 0 when sampling"),
        (["2", "--do_sample", "--top_p", "-0.5"], "top_p=-0.5 must be in (0, 1]"),
        (["2", "--do_sample", "--top_k", "0"], "top_k=0 must be an integer >= 1"),
        (["2", "--temperature", "0.7"], "temperature=0.7 only apply when sampling, but do_sample is off"),
    ]
    for extra, message in cases:
        rc, _, err = run_main(*base, *extra)
        assert message in _error_line(rc, err)


def test_generate_refuses_a_device_it_cannot_use_before_loading(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    missing = tmp_path / "not_loaded"  # the device is checked first: no load for nothing
    base = ["generate", "--checkpoint", missing, "--prompt", "hi", "--device"]
    cases = [
        ("foo", "--device 'foo' is not a torch device; use auto, cpu, cuda or cuda:N"),
        ("cuda", "--device 'cuda' but no CUDA device is available here; use --device cpu (or auto)"),
        ("cuda:1", "--device 'cuda:1' but no CUDA device is available here"),
        ("meta", "--device 'meta' holds no data; use auto, cpu, cuda or cuda:N"),
    ]
    for device, message in cases:
        assert message in _error_line(*run_main(*base, device)[::2])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    line = _error_line(*run_main(*base, "cuda:2")[::2])
    assert "--device 'cuda:2' but this machine has 2 CUDA device(s): cuda:0 .. cuda:1" in line


def test_generate_with_a_tokenizer_that_is_not_json(tmp_path):
    hf = tmp_path / "hf"
    Phi3ForCausalLM.from_config(get_preset("tiny")).save_pretrained(hf)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("<html>not found</html>")
    rc, _, err = run_main("generate", "--checkpoint", hf, "--tokenizer", tmp_path / "tok", "--prompt", "hi")
    assert f"tokenizer file {tmp_path / 'tok' / 'tokenizer.json'} is not valid JSON" in _error_line(rc, err)


def test_config_override_typo_and_bad_value_via_fit(tmp_path):
    args = small_args("causal_lm", tmp_path / "logs", tmp_path / "cache", steps=1)
    # (jsonargparse wraps a module's init error in its "Does not validate ..." block; the CLI prints our line only)
    rc, _, err = run_main("fit", *args, "--model.init_args.config_overrides", "{num_hiden_layers: 8}")
    _error_line(rc, err)
    assert (
        "error: config override 'num_hiden_layers' is not a Phi3Config field; did you mean 'num_hidden_layers'?" in err
    )
    assert "Union subtypes" not in err and "Namespace(" not in err
    rc, _, err = run_main("fit", *args, "--model.init_args.config_overrides", "{rms_norm_eps: 0}")
    _error_line(rc, err)
    assert "rms_norm_eps=0 must be a finite number > 0" in err


def test_trainer_settings_lightning_refuses_are_one_line_errors(tmp_path):
    """Lightning's MisconfigurationException (a user setting it refuses) escaped cli.main as a traceback."""
    args = small_args("causal_lm", tmp_path / "logs", tmp_path / "cache", steps=1)
    rc, _, err = run_main("fit", *args, "--trainer.max_steps", "-5")
    assert _error_line(rc, err).startswith("error: `max_steps` must be a non-negative integer or -1")
    assert "-5" in _error_line(rc, err)


def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    """yaml's own message says `in "<unicode string>"` (jsonargparse parses the file's text): the user must learn which
    of the --config files is broken, and where."""
    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer:\n  max_steps: 2\nmodel:\n  init_args:\n    attn_implementation: [sdpa\n")
    for argv in (("fit", "--config", LM, "--config", bad), ("compare-attention", "--config", bad)):
        rc, _, err = run_main(*argv)
        line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
        assert rc == 2 and "<unicode string>" not in err and "Traceback" not in err, err
        assert f"{bad} is not valid YAML" in line and "line 6, column 1" in line, line
        assert "line 5, column 26" in line, line  # where the unclosed '[' opened


def test_ckpt_path_and_weights_only_help_say_what_this_package_does():
    """Lightning's help for these two options advertises downloads from its model registry and ``weights_only=False``
    for trusted files; here remote checkpoints are refused and every checkpoint is read with weights_only=True."""
    for command in ("fit", "validate", "predict"):
        rc, out, _ = run_main(command, "--help")
        flat = " ".join(out.split())
        assert rc == 0 and "will be downloaded from the Lightning Model Registry" not in flat
        assert "use ``weights_only=False``" not in flat
        assert "'last' or 'best'" in flat and "remote checkpoints" in flat and "refused" in flat, flat[-3000:]
        assert "always torch.load(weights_only=True)" in flat


def test_weights_only_false_is_refused_not_silently_ignored(tmp_path):
    """Every checkpoint is read with weights_only=True (the Guarantees table): ``--weights_only false`` cannot be
    honoured, so it is an error naming the option, not a setting accepted and then not done."""
    args = small_args("causal_lm", tmp_path / "logs", tmp_path / "cache", steps=1)  # (were it not refused)
    for command in ("fit", "validate"):
        rc, _, err = run_main(command, *args, "--weights_only", "false")
        line = _error_line(rc, err)
        assert "--weights_only false" in line and "weights_only=True" in line and "drop" in line, line
    assert not (tmp_path / "logs").exists()  # refused before a run directory is made


def test_an_empty_or_non_mapping_config_file_is_named(tmp_path):
    """jsonargparse said only "Unexpected config: " (nothing after it for an empty file)."""
    empty, scalar = tmp_path / "empty.yaml", tmp_path / "scalar.yaml"
    empty.write_text("")
    scalar.write_text("just a string\n")
    for path, what in ((empty, "is empty"), (scalar, "holds 'just a string'")):
        rc, _, err = run_main("fit", "--config", path)
        line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
        assert rc == 2 and f"{path} {what}" in line and "a YAML mapping" in line and "`key: value`" in line, line
