"""What TensorBoard shows, read the way the page reads it: a real ``tensorboard`` process on finished tiny runs (two
fit runs that differ by attention backend, one compare-attention run), queried over HTTP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from phi3_lightning.compare import compare_attention
from phi3_lightning.compare.report import CHARTS

from .modules.helpers import run_main, scalars, small_args

pytest.importorskip("tensorboard")

FIT_BACKENDS = ("sdpa", "eager")
CMP_BACKENDS = ("eager", "sdpa")
KINDS = ("padded", "packed")


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    logs, cache = root / "logs", root / "cache"
    for attn in FIT_BACKENDS:
        rc, _, err = run_main(
            "fit", *small_args("causal_lm", logs, cache), "--model.init_args.attn_implementation", attn
        )
        assert rc == 0, err[-3000:]
    compare_attention(
        preset="tiny",
        device="cpu",
        overrides={"num_hidden_layers": 1},
        backends=list(CMP_BACKENDS),
        seq_lens=[16, 32],
        batch_kinds=list(KINDS),
        warmup=0,
        repeats=1,
        memory=False,
        num_threads=1,
        log_dir=str(logs / "compare_attention"),
        run_name="tiny",
    )
    return logs


class _TensorBoard:
    """``tensorboard --logdir X --port 0 --load_fast false`` in a subprocess; killed on close."""

    def __init__(self, logdir: Path, timeout: float = 90.0) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logdir),
                "--port",
                "0",
                "--host",
                "127.0.0.1",
                "--load_fast",
                "false",
                "--reload_interval",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while self.url is None and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.2)
        if self.url is None:
            self.close()
            pytest.fail("tensorboard did not start:\n" + "".join(self.lines[-20:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"(http://[^\s/]+:\d+)/", line)
            if m and self.url is None:
                self.url = m.group(1)

    def get(self, path: str, **query: str):
        url = f"{self.url}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def wait_for_runs(self, runs: set[str], timeout: float = 60.0) -> dict:
        """The scalar tags per run, once every expected run is loaded."""
        deadline = time.monotonic() + timeout
        while True:
            tags = self.get("/data/plugin/scalars/tags")
            if runs <= set(tags) or time.monotonic() > deadline:
                return tags
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def board(logs):
    tb = _TensorBoard(logs)
    try:
        yield tb
    finally:
        tb.close()


def _fit_run(backend: str) -> str:
    return f"causal_lm/{backend}/version_0"


def _cmp_run(backend: str) -> str:
    return f"compare_attention/tiny/{backend}"


def test_fit_run_cards_are_train_val_perf_only(logs):
    """No flat `epoch` card, no hp_metric=-1 placeholder; the learning rate sits with the train/ cards."""
    tags = scalars(logs / _fit_run("sdpa"))
    assert "epoch" not in tags and "hp_metric" not in tags
    assert {t.split("/", 1)[0] for t in tags} == {"train", "val", "perf"}
    assert "train/lr/pg1" in tags and "val/loss" in tags


def test_served_data_overlays_backends_per_measure(board):
    """Scalars and custom-scalars data as the page fetches it: every backend's series, one chart per measure."""
    fit_runs = {_fit_run(b) for b in FIT_BACKENDS}
    cmp_runs = {_cmp_run(b) for b in CMP_BACKENDS}
    tags = board.wait_for_runs(fit_runs | cmp_runs)
    assert fit_runs | cmp_runs <= set(tags), sorted(tags)

    # fit runs: each backend's val/loss series, served
    for run in fit_runs:
        assert "epoch" not in tags[run] and "hp_metric" not in tags[run]
        points = board.get("/data/plugin/scalars/scalars", run=run, tag="val/loss")
        assert [p[1] for p in points] and all(p[2] > 0 for p in points)

    layout = board.get("/data/plugin/custom_scalars/layout")
    categories = {c["title"]: c["chart"] for c in layout["category"]}

    # fit runs: the val/ category has a chart per measure; its regex serves a line for every backend
    val_charts = {c["title"]: c["multiline"]["tag"][0] for c in categories["val"]}
    assert {"val/loss", "val/perplexity"} <= set(val_charts)
    for run in fit_runs:
        data = board.get("/data/plugin/custom_scalars/scalars", run=run, tag=val_charts["val/loss"])
        assert data["regex_valid"] and list(data["tag_to_events"]) == ["val/loss"], (run, data)

    # compare-attention: per batch kind, one chart per measure, one line (run) per backend
    for kind in KINDS:
        charts = categories[f"compare-attention {kind}"]
        assert [c["title"] for c in charts] == [title for title, _ in CHARTS]
        for chart, (_, measure) in zip(charts, CHARTS):
            if measure.endswith("peak_mib"):
                continue  # memory=False in this tiny run
            (regex,) = chart["multiline"]["tag"]
            for run in cmp_runs:
                data = board.get("/data/plugin/custom_scalars/scalars", run=run, tag=regex)
                series = data["tag_to_events"].get(f"compare/{kind}/{measure}")
                assert series and [p[1] for p in series] == [16, 32], (run, measure, data)
    # the layout's categories: the compare charts come before its spread chart
    titles = [c["title"] for c in layout["category"]]
    assert titles.index("compare-attention padded") < [i for i, t in enumerate(titles) if "spread" in t][0]


def test_hparams_tab_compares_runs_by_final_val_metrics(board, logs):
    experiment = board.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"val/loss", "val/perplexity"} <= metrics and "hp_metric" not in metrics
    groups = board.post(
        "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "startIndex": 0,
            "sliceSize": 100,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "val/loss"}}],
        },
    )
    by_run = {g["name"]: g for g in groups["sessionGroups"]}
    for backend in FIT_BACKENDS:
        g = by_run[_fit_run(backend)]
        assert g["hparams"]["attn_implementation"] == backend
        final = scalars(logs / _fit_run(backend))["val/loss"][-1][1]
        (loss,) = [m["value"] for m in g["metricValues"] if m["name"]["tag"] == "val/loss"]
        assert loss == pytest.approx(final)  # the last validation, not a placeholder


def test_logger_keeps_epoch_only_when_asked_and_writes_hparams_once_at_the_end(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from phi3_lightning.modules import Phi3TensorBoardLogger

    for log_epoch in (False, True):
        lg = Phi3TensorBoardLogger(str(tmp_path), name=f"e{log_epoch}", log_epoch=log_epoch)
        lg.log_hyperparams({"lr": 0.1, "attn": "sdpa"})
        lg.log_metrics({"train/loss": 3.0, "epoch": 0}, step=1)
        lg.log_metrics({"val/loss": 2.5, "epoch": 0}, step=2)
        lg.log_metrics({"val/loss": 2.0, "epoch": 0}, step=4)
        lg.finalize("success")
        ea = EventAccumulator(lg.log_dir, size_guidance={"scalars": 0, "tensors": 0})
        ea.Reload()
        assert ("epoch" in ea.Tags()["scalars"]) is log_epoch
        assert "hp_metric" not in ea.Tags()["scalars"]
        assert [e.step for e in ea.Scalars("val/loss")] == [2, 4]  # no extra point from the hparams summary
        content = ea.SummaryMetadata("_hparams_/experiment").plugin_data.content
        exp = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
        assert [m.name.tag for m in exp.metric_infos] == ["val/loss"]
        assert {h.name for h in exp.hparam_infos} == {"lr", "attn"}
