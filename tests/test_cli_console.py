"""What a run tells its user on the console: where it writes (start and end), how to continue it and open TensorBoard,
a progress bar counting steps out of max_steps, a model summary with a real FLOPs figure, none of Lightning's noise;
and generate echoing its prompt."""

from __future__ import annotations

import re
import shlex

import pytest

from .modules.helpers import run_main, run_module, small_args


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """One 2-step fit as a user runs it (a subprocess, progress bar and model summary on)."""
    root = tmp_path_factory.mktemp("console")
    logs, cache = root / "logs", root / "cache"
    args = [
        *small_args("causal_lm", logs, cache, steps=2, val_every=2),
        "--trainer.enable_progress_bar",
        "true",
        "--trainer.enable_model_summary",
        "true",
    ]
    proc = run_module("fit", *args, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, root, logs


def test_fit_says_where_it_writes_and_how_to_continue(fit_run):
    proc, _, logs = fit_run
    err = proc.stderr
    run = logs / "causal_lm" / "sdpa" / "version_0"
    assert f"fit: run causal_lm/sdpa/version_0 writes to {run}" in err
    assert f"fit: run causal_lm/sdpa/version_0 wrote to {run}" in err
    assert f"checkpoints: {run / 'checkpoints'} (last.ckpt, best-step=2.ckpt)" in err
    assert f"TensorBoard: tensorboard --logdir {run.parent}" in err
    assert re.search(r"throughput: [\d,]+ real tokens/s", err)
    resume = next(line for line in err.splitlines() if "continue it" in line)
    assert resume.rstrip().endswith("--run_version 0 --ckpt_path last")


def test_printed_resume_command_continues_the_run(fit_run):
    proc, _, logs = fit_run
    line = next(line for line in proc.stderr.splitlines() if "continue it" in line)
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[:4] == ["python", "-m", "phi3_lightning", "fit"]
    argv = argv[4:]
    argv[argv.index("--trainer.max_steps") + 1] = "3"  # train one step further
    rc, _, err = run_main("fit", *argv)
    assert rc == 0, err[-3000:]
    assert not (logs / "causal_lm" / "sdpa" / "version_1").exists()  # the same run, continued in place


def test_console_has_steps_flops_and_no_noise(fit_run):
    proc, _, _ = fit_run
    out, err = proc.stdout, proc.stderr
    assert "Step 2/2" in out
    assert "Epoch 0/-2" not in out and "v_num" not in out
    both = out + err  # Lightning's logging goes to stdout or stderr depending on its handlers
    assert "Total FLOPs" not in both and "training FLOPs per token (6N + attention at 64 tokens per row" in both
    assert "| FLOPs" not in both and "459 K      trainable params" in both
    assert "Tip: For seamless cloud logging" not in out + err
    assert "LeafSpec" not in err and "FutureWarning" not in err
    # CausalLMModule's own on_before_batch_transfer (a host-side label check) is the hook meant to run
    assert "on_before_batch_transfer" not in out + err


def test_validate_says_where_it_writes(fit_run):
    _, root, logs = fit_run
    run = logs / "causal_lm" / "sdpa" / "version_0"
    rc, _, err = run_main(
        "validate", *small_args("causal_lm", logs, root / "cache"), "--ckpt_path", run / "checkpoints" / "last.ckpt"
    )
    assert rc == 0, err[-3000:]
    assert f"validate: run causal_lm/sdpa/version_0 wrote to {run / 'validate'}" in err


def test_generate_echoes_the_prompt_unless_told_not_to(fit_run):
    _, _, logs = fit_run
    ckpt = logs / "causal_lm" / "sdpa" / "version_0" / "checkpoints" / "last.ckpt"
    args = ["generate", "--checkpoint", ckpt, "--max_new_tokens", "8", "--prompt", "import os\n"]
    rc, echoed, err = run_main(*args)
    assert rc == 0, err
    rc, bare, err = run_main(*args, "--echo_prompt", "false")
    assert rc == 0, err
    assert echoed == "import os\n" + bare
    rc, chat, err = run_main(*args, "--chat")
    assert rc == 0, err
    assert chat.startswith("user> import os\n") and "\nassistant> " in chat


def test_batch_transfer_hook_filter_is_narrow():
    """Only Lightning's "overridden in LightningModule but passed a LightningDataModule" note about
    ``on_before_batch_transfer`` is dropped: the same note for another hook, and the warning that the DataModule's
    hook replaces the module's (our label check would not run), still show."""
    import warnings

    from phi3_lightning.cli import _quiet_known_lightning_noise

    def shown(message: str) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _quiet_known_lightning_noise()
            warnings.warn_explicit(
                message,
                UserWarning,
                "data_connector.py",
                378,
                module="lightning.pytorch.trainer.connectors.data_connector",
            )
        return any(str(w.message) == message for w in caught)

    ours = (
        "You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a "
        "`LightningDataModule`. It will use the implementation from `LightningModule` instance."
    )
    assert not shown(ours)
    assert shown(ours.replace("on_before_batch_transfer", "transfer_batch_to_device"))
    assert shown(
        "You have overridden `on_before_batch_transfer` in both `LightningModule` and `LightningDataModule`. It will "
        "use the implementation from `LightningDataModule` instance."
    )


@pytest.mark.parametrize(
    "given, expected",
    [
        # an option given twice (the printed command, with a higher max_steps appended): the last value only
        (
            "--config a.yaml --trainer.max_steps 4 --run_version 0 --ckpt_path last --trainer.max_steps 8",
            "--config a.yaml --trainer.max_steps 8",
        ),
        (
            "--trainer.max_steps=4 --seed_everything 1 --trainer.max_steps 8",
            "--seed_everything 1 --trainer.max_steps 8",
        ),
        ("--model.lr 1 --model.init_args.lr 2", "--model.init_args.lr 2"),  # two spellings of one option
        ("--ckpt_path=x.ckpt --run_version=3 --run_name a --run_name b", "--run_name b"),
        # --config files: every one, in order (a later file overrides an earlier one)
        ("--config a.yaml --config b.yaml --config a.yaml", "--config a.yaml --config b.yaml --config a.yaml"),
        ("-c a.yaml --model.lr 1 -c b.yaml", "-c a.yaml --model.lr 1 -c b.yaml"),
        # something between the two that can change what the option refers to: both kept
        ("--model.lr 1 --config b.yaml --model.lr 2", "--model.lr 1 --config b.yaml --model.lr 2"),
        ("--model.lr 1 --model Other --model.lr 2", "--model.lr 1 --model Other --model.lr 2"),
        (
            "--trainer.callbacks+ A --trainer.callbacks.patience 1 --trainer.callbacks+ B --trainer.callbacks.patience 2",
            "--trainer.callbacks+ A --trainer.callbacks.patience 1 --trainer.callbacks+ B --trainer.callbacks.patience 2",
        ),
        ("--model.x.y 1 --model.x 2 --model.x 3", "--model.x.y 1 --model.x 3"),
    ],
)
def test_resume_command_keeps_the_last_value_of_a_repeated_option(given, expected):
    from phi3_lightning.cli import resume_command

    argv = ["fit", *shlex.split(given)]
    assert resume_command(argv, "version_0") == (
        f"python -m phi3_lightning fit {expected} --run_version 0 --ckpt_path last".replace("  ", " ")
    )
