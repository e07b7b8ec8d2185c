"""Rows of results -> the summary table (terminal + TensorBoard text), a chart (Pillow) and TensorBoard scalars."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# name -> what it is. Every measure is one TensorBoard series compare/<batch>/<name> in each backend's run directory
# (<run>/<backend>), so TensorBoard draws one chart per measure with one line per backend.
MEASURES: dict[str, str] = {
    "fwd_ms": "median forward time (no grad), milliseconds",
    "fwd_bwd_ms": "median forward+backward time of the loss, milliseconds",
    "fwd_tokens_per_s": "real (non-padding) tokens per second, forward",
    "fwd_bwd_tokens_per_s": "real (non-padding) tokens per second, forward+backward",
    "fwd_peak_mib": "peak memory of one forward, MiB",
    "fwd_bwd_peak_mib": "peak memory of one forward+backward, MiB",
    "logits_max_abs_err": "max |logits - fp64 reference| over real tokens",
    "logits_rel_err": "max |logits - ref| / max |ref| over real tokens",
    "grad_max_abs_err": "max |grad - fp64 reference grad| over all parameters",
    "grad_rel_err": "||grad - ref||_2 / ||ref||_2 over all parameters",
}
FWD_MEASURES = ("fwd_ms", "fwd_tokens_per_s", "fwd_peak_mib", "logits_max_abs_err", "logits_rel_err")
FWD_BWD_MEASURES = ("fwd_bwd_ms", "fwd_bwd_tokens_per_s", "fwd_bwd_peak_mib", "grad_max_abs_err", "grad_rel_err")


@dataclass
class Row:
    """One backend on one batch: measures that ran, and why the others did not."""

    batch: str  # setting name: "padded", "packed", "padded_w64", ...
    seq_len: int
    backend: str
    tokens: int  # real tokens in the batch
    values: dict[str, float] = field(default_factory=dict)
    not_measured: dict[str, str] = field(default_factory=dict)  # "forward" / "forward+backward" -> reason
    failures: list[str] = field(default_factory=list)  # out of tolerance or an unexpected error
    timings: dict[str, Any] = field(default_factory=dict)  # "fwd_ms" / "fwd_bwd_ms" -> bench.Timing (spread)
    noisy: list[str] = field(default_factory=list)  # why the times of this row are too noisy to rank backends

    @property
    def ok(self) -> bool:
        return not self.failures


def setting_name(kind: str, window: int | None) -> str:
    return kind if window is None else f"{kind}_w{window}"


def _fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "n/a"
    if kind == "ms":
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "mib":
        return f"{v:.1f}"
    return f"{v:.1e}"


COLUMNS = [  # (header, measure, format)
    ("fwd ms", "fwd_ms", "ms"),
    ("fwd+bwd ms", "fwd_bwd_ms", "ms"),
    ("fwd tok/s", "fwd_tokens_per_s", "int"),
    ("fwd+bwd tok/s", "fwd_bwd_tokens_per_s", "int"),
    ("fwd MiB", "fwd_peak_mib", "mib"),
    ("fwd+bwd MiB", "fwd_bwd_peak_mib", "mib"),
    ("logits err", "logits_rel_err", "err"),
    ("grad err", "grad_rel_err", "err"),
]


def _fmt_time(r: Row, measure: str) -> str:
    """``median (q1-q3)`` in ms: the median and its interquartile range."""
    v = r.values.get(measure)
    t = r.timings.get(measure)
    if v is None or t is None:
        return _fmt(v, "ms")
    return f"{_fmt(v, 'ms')} ({_fmt(t.q1 * 1e3, 'ms')}-{_fmt(t.q3 * 1e3, 'ms')})"


def table(rows: list[Row], backend_labels: dict[str, str] | None = None) -> str:
    """A Markdown pipe table, aligned so it reads the same in a terminal and in TensorBoard's text tab.

    Times are ``median (q1-q3)``; ``n`` is the number of timed calls of each; ``timing`` says "noisy" where the
    spread is too large to rank backends on that row; ``ok`` is correctness alone (what ``--check`` gates).
    """
    labels = backend_labels or {}
    header = ["batch", "T", "backend"] + [c[0] for c in COLUMNS] + ["n", "timing", "ok"]
    body = []
    for r in rows:
        cells = [r.batch, str(r.seq_len), labels.get(r.backend, r.backend)]
        cells += [_fmt_time(r, m) if f == "ms" else _fmt(r.values.get(m), f) for _, m, f in COLUMNS]
        n = max((t.n for t in r.timings.values()), default=0)
        cells += [str(n) if n else "n/a", "noisy" if r.noisy else ("ok" if r.timings else "n/a")]
        cells.append("yes" if r.ok else "NO")
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    right = [False, True, False] + [True] * len(COLUMNS) + [True, False, False]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(cells, widths, right)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if rj else (":" + "-" * (w + 1)) for w, rj in zip(widths, right)) + "|"
    return "\n".join([line(header), sep] + [line(c) for c in body])


# ----------------------------------------------------------------------------- chart
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _nice_max(v: float) -> float:
    """Smallest 4 * step >= v with step a round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k): round grid labels."""
    if v <= 0 or not math.isfinite(v):
        return 1.0
    e = 10 ** math.floor(math.log10(v / 4))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if 4 * m * e >= v:
            return 4 * m * e
    return 40 * e


def chart(
    rows: list[Row],
    title: str,
    measures=(("fwd_ms", "forward ms"), ("fwd_bwd_ms", "forward+backward ms")),
    panel=(380, 260),
) -> np.ndarray:
    """(H, W, 3) uint8 image: one panel per (measure, batch setting), one line per backend over seq_len."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    settings = list(dict.fromkeys(r.batch for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    color = {b: _COLORS[i % len(_COLORS)] for i, b in enumerate(backends)}
    pw, ph = panel
    top = 46
    img = Image.new("RGB", (max(1, len(settings)) * pw, top + len(measures) * ph), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=font)
    x = 8  # legend
    for b in backends:
        draw.line([(x, 30), (x + 18, 30)], fill=color[b], width=3)
        draw.text((x + 22, 24), b, fill="black", font=font)
        x += 34 + int(draw.textlength(b, font=font))
    if any(r.noisy for r in rows):
        draw.ellipse([x, 26, x + 8, 34], fill="white", outline=(90, 90, 90), width=2)
        draw.text((x + 14, 24), "noisy: spread too large to rank (whiskers: IQR)", fill="black", font=font)
    ml, mr, mt, mb = 52, 12, 22, 30  # panel margins
    for mi, (measure, label) in enumerate(measures):
        for si, setting in enumerate(settings):
            ox, oy = si * pw, top + mi * ph
            sub = [r for r in rows if r.batch == setting]
            lens = sorted({r.seq_len for r in sub})
            vals = [r.values[measure] for r in sub if measure in r.values]
            ymax = _nice_max(max(vals) if vals else 0.0)
            x0, x1, y0, y1 = ox + ml, ox + pw - mr, oy + ph - mb, oy + mt
            draw.text((ox + ml, oy + 4), f"{setting}: {label}", fill="black", font=font)
            draw.rectangle([x0, y1, x1, y0], outline=(120, 120, 120))
            for k in range(5):  # y grid and ticks
                yv = ymax * k / 4
                yy = y0 - (y0 - y1) * k / 4
                draw.line([(x0, yy), (x1, yy)], fill=(225, 225, 225))
                txt = f"{yv:.4g}"
                draw.text((x0 - 6 - draw.textlength(txt, font=font), yy - 6), txt, fill="black", font=font)

            def xpos(t, lens=lens, x0=x0, x1=x1):  # this chart's axis (bound now, not the loop's last)
                i = lens.index(t)
                return x0 + (x1 - x0) * ((i + 0.5) / len(lens))

            draw.text((x1 - draw.textlength("T", font=font), y0 + 16), "T", fill=(90, 90, 90), font=font)
            for t in lens:
                draw.text((xpos(t) - draw.textlength(str(t), font=font) / 2, y0 + 6), str(t), fill="black", font=font)
            missing = [b for b in backends if not any(r.backend == b and measure in r.values for r in sub)]
            if missing:  # say which backends have no line here (unavailable for this measure)
                txt = "n/a: " + ", ".join(missing)
                draw.text((x1 - 4 - draw.textlength(txt, font=font), y1 + 4), txt, fill=(170, 0, 0), font=font)
            for b in backends:
                pts = [
                    (xpos(r.seq_len), y0 - (y0 - y1) * r.values[measure] / ymax)
                    for r in sorted(sub, key=lambda r: r.seq_len)
                    if r.backend == b and measure in r.values
                ]
                if len(pts) > 1:
                    draw.line(pts, fill=color[b], width=2)
                mine = [r for r in sorted(sub, key=lambda r: r.seq_len) if r.backend == b and measure in r.values]
                for (px, py), r in zip(pts, mine):
                    t = r.timings.get(measure)
                    if t is not None:  # interquartile range as a whisker
                        lo, hi = (y0 - (y0 - y1) * min(v * 1e3 / ymax, 1.0) for v in (t.q1, t.q3))
                        draw.line([(px, lo), (px, hi)], fill=color[b], width=1)
                    if r.noisy:  # hollow: too noisy to rank
                        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill="white", outline=color[b], width=2)
                    else:
                        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color[b])
    return np.asarray(img, dtype=np.uint8)


# ----------------------------------------------------------------------------- tensorboard
CHARTS = [  # (chart title, measure): the custom-scalars layout, in this order for every batch setting
    ("forward ms", "fwd_ms"),
    ("forward+backward ms", "fwd_bwd_ms"),
    ("forward tokens/s", "fwd_tokens_per_s"),
    ("forward+backward tokens/s", "fwd_bwd_tokens_per_s"),
    ("forward peak memory MiB", "fwd_peak_mib"),
    ("forward+backward peak memory MiB", "fwd_bwd_peak_mib"),
    ("logits error (max|d| / max|ref|)", "logits_rel_err"),
    ("grad error (||d|| / ||ref||)", "grad_rel_err"),
]
TIMED = ("fwd_ms", "fwd_bwd_ms")
LAYOUT_PREFIX = "compare-attention"  # custom-scalars categories: "compare-attention padded", ...


def scalar_tag(setting: str, measure: str) -> str:
    return f"compare/{setting}/{measure}"


def spread_tag(setting: str, measure: str, what: str) -> str:
    """``q1`` / ``q3`` (ms) and ``rel_iqr`` (IQR / median) of a timed measure."""
    return f"compare_spread/{setting}/{measure}/{what}"


def layout(settings: list[str], max_spread: float) -> dict:
    """Custom-scalars layout: per batch setting, one chart per measure whose lines are the backends (runs)."""
    out = {}
    for setting in settings:
        charts = {title: ["Multiline", [f"^{scalar_tag(setting, m)}$"]] for title, m in CHARTS}
        out[f"{LAYOUT_PREFIX} {setting}"] = charts
    out[f"{LAYOUT_PREFIX} timing spread (IQR / median; above {max_spread:g} = noisy)"] = {
        f"{setting} {title}": ["Multiline", [f"^{spread_tag(setting, m, 'rel_iqr')}$"]]
        for setting in settings
        for title, m in CHARTS
        if m in TIMED
    }
    return out


def write_tensorboard(
    log_dir: str, rows: list[Row], summary: str, image: np.ndarray, config_text: str, max_spread: float = 0.1
) -> None:
    """``<log_dir>``: the summary table, the config, the chart and the custom-scalars layout; ``<log_dir>/<backend>``:
    that backend's scalars (step = sequence length), one run per backend so every chart overlays the backends."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=log_dir)
    try:
        settings = list(dict.fromkeys(r.batch for r in rows))
        writer.add_custom_scalars(layout(settings, max_spread))
        writer.add_text("compare/summary", summary)
        writer.add_text("compare/config", config_text)
        writer.add_image("compare/chart", image, dataformats="HWC")
    finally:
        writer.close()
    for backend in dict.fromkeys(r.backend for r in rows):
        writer = SummaryWriter(log_dir=f"{log_dir}/{backend}")
        try:
            for r in sorted((r for r in rows if r.backend == backend), key=lambda r: r.seq_len):
                for m, v in r.values.items():
                    writer.add_scalar(scalar_tag(r.batch, m), v, global_step=r.seq_len)
                for m, t in r.timings.items():
                    writer.add_scalar(spread_tag(r.batch, m, "q1"), t.q1 * 1e3, global_step=r.seq_len)
                    writer.add_scalar(spread_tag(r.batch, m, "q3"), t.q3 * 1e3, global_step=r.seq_len)
                    writer.add_scalar(spread_tag(r.batch, m, "rel_iqr"), t.rel_spread, global_step=r.seq_len)
        finally:
            writer.close()
