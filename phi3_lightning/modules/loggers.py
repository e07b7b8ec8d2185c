"""TensorBoardLogger for fit runs that reads at a glance.

Compared with Lightning's own, :class:`Phi3TensorBoardLogger`

* writes no ``hp_metric = -1`` placeholder: the hyperparameters go to TensorBoard once, when the run ends, with the
  final ``val/*`` (and ``test/*``) metrics as the HPARAMS tab's metric columns, so that tab compares runs;
* drops Lightning's ``epoch`` scalar unless ``log_epoch`` is set (flat for runs trained by steps);
* writes a custom-scalars layout (one chart per measure under ``train/``, ``val/``, ``perf/``) into its run, so
  ``tensorboard --logdir logs/<config>`` shows, on its CUSTOM SCALARS tab, one chart per measure with one line per
  run (``<backend>/version_N``): backends overlaid per measure. TensorBoard merges the layouts of all runs.
"""

from __future__ import annotations

import re
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

LAYOUT_GROUPS = ("train", "val", "test", "perf")  # tag prefixes charted in the custom-scalars layout, in this order
METRIC_GROUPS = ("val", "test")  # final values become the HPARAMS tab's metrics


class Phi3TensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, plus hparams with final metrics, no ``epoch`` scalar, a per-measure layout.

    Args:
        save_dir: root directory of the logs; a run writes to ``<save_dir>/<name>/<version>``.
        name: the run's directory under ``save_dir``; the CLI replaces it by ``--run_name`` when given, and ``auto``
            by ``<config file stems joined by +>/<attention backend>``.
        version: the version directory: N (``version_N``) or a string; null: the next free ``version_N``.
        log_epoch: also log Lightning's ``epoch`` scalar (useful for runs trained by epochs; flat for step-based runs).
        default_hp_metric: Lightning's ``hp_metric = -1`` placeholder; off here (the final metrics replace it).
        kwargs: any other argument of Lightning's TensorBoardLogger (``log_graph``, ``prefix``, ``sub_dir`` ...).
    """

    def __init__(
        self,
        save_dir: str = "logs",
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_epoch: bool = False,
        default_hp_metric: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, default_hp_metric=default_hp_metric, **kwargs)
        self.log_epoch = log_epoch
        self._tags: dict[str, None] = {}  # every scalar tag logged, in first-seen order
        self._final: dict[str, float] = {}  # last value of each val/* and test/* tag
        self._hparams_params: dict[str, Any] | None = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.log_epoch:
            metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        for k, v in metrics.items():
            self._tags.setdefault(k, None)
            if k.split("/", 1)[0] in METRIC_GROUPS:
                self._final[k] = float(v)
        if metrics:
            super().log_metrics(metrics, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Keep the params (hparams.yaml as before); TensorBoard gets them with the final metrics at the end."""
        super().log_hyperparams(params, *args, **kwargs)
        self._hparams_params = self.hparams

    def layout(self) -> dict:
        """Custom-scalars layout: one category per group, one chart per logged measure (regex = the exact tag)."""
        out = {}
        for group in LAYOUT_GROUPS:
            tags = [t for t in self._tags if t.split("/", 1)[0] == group]
            if tags:
                out[group] = {t: ["Multiline", [f"^{re.escape(t)}$"]] for t in tags}
        return out

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._tags:
            self._write_summaries()
        super().finalize(status)

    def _write_summaries(self) -> None:
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        from torch.utils.tensorboard.summary import hparams

        writer = self.experiment._get_file_writer()
        layout = self.layout()
        if layout:
            self.experiment.add_custom_scalars(layout)
        if self._final:
            params = self._sanitize_params(_flatten_dict(_convert_params(self._hparams_params or {})))
            # the metric values shown are the last points of these tags' own series (already logged)
            exp, ssi, sei = hparams(params, dict(self._final))
            for summary in (exp, ssi, sei):
                writer.add_summary(summary)
        self.experiment.flush()
