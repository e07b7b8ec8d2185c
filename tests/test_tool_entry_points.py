"""The tools' own module entry points (``python -m phi3_lightning.memory``, ``.data.report``, ``.compare``, the usage
their docstrings show) report bad input as ``python -m phi3_lightning <command>`` does: one line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .modules.helpers import ROOT


@pytest.mark.parametrize(
    "module, args, named",
    [
        ("phi3_lightning.memory", ["--config", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
        ("phi3_lightning.data.report", ["--corpus", "lm", "--tokenizer", "/nonexistent/tok"], "/nonexistent/tok"),
        ("phi3_lightning.compare", ["--preset", "nope", "--backends", "[eager]"], "'nope'"),
    ],
)
def test_tool_module_entry_points_give_one_line_errors(module, args, named, tmp_path):
    # these printed a FileNotFoundError / ValueError traceback
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PHI3_LIGHTNING_TRACEBACK", None)
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and named in out.stderr, out.stderr
