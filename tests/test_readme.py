"""Every command in README.md's fenced ``bash`` blocks runs as written.

Commands are run through the same entry points ``python -m ...`` calls (in this process, to save the start-up of a
new interpreter per command), from the repository root, with small overrides appended so the whole file takes about a
minute: fit trains 2 steps on 4 stdlib files (the README says so: "append --trainer.max_steps 2 ... for a smoke run")
and logs under a temp directory; compare-attention runs one short length once. Commands that need a GPU, a
checkpoint the README asks the user to fill in or to train first, a server (tensorboard) or that are the test suite
itself are skipped with that reason. A README command that matches no rule fails: add a rule, don't let it rot.
"""

from __future__ import annotations

import re
import shlex

import pytest

from .modules.helpers import ROOT, run_main

README = ROOT / "README.md"

FIT_SMOKE = [
    "--trainer.max_steps",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.val_check_interval",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--data.init_args.max_files",
    "4",
    "--data.init_args.max_length",
    "64",
    "--data.init_args.progress",
    "false",
]
COMPARE_SMOKE = [
    "--seq_lens",
    "[32]",
    "--batch_size",
    "1",
    "--warmup",
    "0",
    "--repeats",
    "1",
    "--time_budget_s",
    "0",
    "--batch_kinds",
    "[packed]",
    "--sliding_windows",
    "[null]",
    "--no_memory",
]


def readme_commands() -> list[str]:
    """The commands of the fenced bash blocks: continuation lines joined, comments dropped, ``for`` loops expanded,
    ``a && b`` split."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL):
        text = re.sub(r"\\\n\s*", " ", block)
        lines = [re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        i = 0
        while i < len(lines):
            m = re.match(r"for (\w+) in (.+); do$", lines[i])
            if m:
                end = lines.index("done", i)
                for value in m.group(2).split():
                    commands += [line.replace(f"${m.group(1)}", value) for line in lines[i + 1 : end]]
                i = end + 1
                continue
            commands += [c.strip() for c in lines[i].split("&&")]
            i += 1
    return list(dict.fromkeys(commands))  # each distinct command once


def plan(command: str) -> tuple[str, list[str]] | tuple[None, str]:
    """("cli" | "memory" | "report", argv) to run, or (None, reason to skip)."""
    argv = shlex.split(command)
    if argv[0] == "pip":
        return None, "installs the package (already installed for the tests)"
    if argv[:3] == ["python", "-m", "pytest"]:
        return None, "the test suite itself"
    if argv[0] == "tensorboard":
        return None, "starts a server; tests/test_tensorboard.py reads its data over HTTP"
    if argv[0] in ("torchrun", "srun"):
        return None, "a multi-GPU / multi-node launcher (tests/test_cli_distributed.py runs 2 CPU processes)"
    if argv[:2] != ["python", "-m"]:
        raise AssertionError(f"README command with no rule in tests/test_readme.py: {command}")
    module, args = argv[2], argv[3:]
    if module == "phi3_lightning.memory" or args[:1] == ["memory"]:
        return "cli", ["memory", *(args[1:] if args[:1] == ["memory"] else args)]
    if module == "phi3_lightning.data.report" or args[:1] == ["data-report"]:
        return "cli", ["data-report", *(args[1:] if args[:1] == ["data-report"] else args)]
    if module != "phi3_lightning":
        raise AssertionError(f"README command with no rule in tests/test_readme.py: {command}")
    if "configs/finetune/" in command:
        return None, "fine-tunes a real checkpoint: needs the checkpoint path the README asks you to fill in, and GPUs"
    if args[0] == "export" and ("..." in command or "phi3_mini_4k_lora" in command):
        return None, "exports the checkpoint of a GPU LoRA fine-tune (configs/finetune/phi3_mini_4k_lora.yaml)"
    if args[0] == "fit":
        return "cli", [*args, *FIT_SMOKE]
    if args[0] == "compare-attention":
        return "cli", [*args, *COMPARE_SMOKE]
    return "cli", args


COMMANDS = readme_commands()


def test_readme_has_the_commands_it_should():
    assert "python -m phi3_lightning fit --config configs/causal_lm.yaml" in COMMANDS
    assert any(c.startswith("python -m phi3_lightning compare-attention") for c in COMMANDS)
    assert sum("memory" in c for c in COMMANDS) >= 3
    assert len(COMMANDS) >= 10


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    return root / "logs", root / "cache"


@pytest.mark.parametrize("command", COMMANDS, ids=[re.sub(r"\W+", "_", c)[:80] for c in COMMANDS])
def test_readme_command_runs(command, sandbox, monkeypatch):
    kind, argv = plan(command)
    if kind is None:
        pytest.skip(argv)
    logs, cache = sandbox
    monkeypatch.chdir(ROOT)  # the README's paths (configs/...) are relative to the repository root
    if argv[0] == "fit":
        argv += ["--trainer.logger.init_args.save_dir", str(logs), "--data.init_args.cache_dir", str(cache)]
    elif argv[0] == "compare-attention":
        argv += ["--log_dir", str(logs / "compare_attention")]
    elif argv[0] == "generate":  # the checkpoint of the README's main job, trained here by its smoke run if need be
        i = argv.index("--checkpoint") + 1
        ckpt = logs / argv[i].removeprefix("logs/")
        if not ckpt.is_file():
            main_job = [
                *plan("python -m phi3_lightning fit --config configs/causal_lm.yaml")[1],
                "--trainer.logger.init_args.save_dir",
                str(logs),
                "--data.init_args.cache_dir",
                str(cache),
            ]
            assert run_main(*main_job)[0] == 0
        argv[i] = str(ckpt)
    rc, out, err = run_main(*argv)
    assert rc == 0, f"{command}\n-> exit {rc}\n{err[-3000:]}"
    if argv[0] == "fit":
        assert "wrote to" in err and "--ckpt_path last" in err
    elif argv[0] == "memory":
        assert "weights" in out
    elif argv[0] == "generate":
        assert out.startswith(argv[argv.index("--prompt") + 1])  # the prompt is echoed


def _defined_tests() -> set[str]:
    """Names of the test functions defined anywhere under tests/ (``def test_...``, at any indentation)."""
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names |= set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)\(", path.read_text(), flags=re.MULTILINE))
    return names


def test_every_test_and_test_file_the_readme_names_exists():
    """The README cites tests as evidence (the Guarantees table's "shown by" column, the numbers it checks): a test
    renamed or removed must not leave the README pointing at nothing. A name is a test file's stem (``test_runs``,
    as in ``test_runs.py``) or a test function somewhere under tests/."""
    text = README.read_text()
    files = set(re.findall(r"\btests/[\w/]+\.py\b", text))
    assert files, "the README names no test file: the pattern is stale"
    missing_files = sorted(f for f in files if not (ROOT / f).is_file())
    stems = {p.stem for p in (ROOT / "tests").rglob("test_*.py")}
    cited = set(re.findall(r"\b(test_\w+)\b", text)) - stems
    assert len(cited) >= 30, "the README names fewer tests than it did: the pattern is stale"
    missing_tests = sorted(cited - _defined_tests())
    assert not missing_files and not missing_tests, f"README names {missing_files + missing_tests}, which do not exist"
