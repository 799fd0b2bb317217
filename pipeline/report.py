"""Pieces of the static run report: metrics tables, charts, crops and the HTML page.

Pure functions over arrays and dicts; `stages/report.py` finds the inputs and writes the
folder. Every PNG goes through the deterministic writers of :mod:`pipeline.viz` (no
timestamp or software tag), so only the HTML page (date, commit) differs between two runs.
The page has inline CSS and no script: it opens from disk with no network.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from pipeline import viz
from pipeline.artifacts import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Marker in the page's <head>: a folder whose index.html carries it may be replaced.
GENERATOR = "useg report"

#: Keys shown first in a metrics table when present (the rest keep their file order).
LEADING_KEYS = ("miou", "pixel_accuracy")


# ----------------------------------------------------------------------------- metrics tables


def format_value(value: Any) -> str:
    """Text of one metrics value: numbers with one decimal, integers as they are.

    A non-zero float under 0.05 in magnitude would print as 0.0; it gets three significant
    digits instead (a loss of 0.0123 stays readable).
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if v != 0.0 and abs(v) < 0.05:
            return f"{v:.3g}"
        return f"{v:.1f}"
    if isinstance(value, (list, tuple)):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def metrics_rows(metrics: Mapping[str, Any], root_label: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """Flatten a nested metrics dict into table rows.

    Every dict that holds scalars becomes a row labelled by its key path (``a / b``); its
    nested dicts become rows of their own. The root's scalars form a row named
    ``root_label``. Columns are the union of the scalar keys, ``LEADING_KEYS`` first.

    Args:
        metrics: Parsed metrics.json (any nesting).
        root_label: Label of the row of top-level scalars.

    Returns:
        (columns, rows) with rows as (label, {column: value}).
    """
    rows: list[tuple[str, dict[str, Any]]] = []

    def visit(node: Mapping[str, Any], path: list[str]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        if scalars:
            rows.append((" / ".join(path) if path else root_label, scalars))
        for k, v in node.items():
            if isinstance(v, Mapping):
                visit(v, path + [str(k)])

    if not isinstance(metrics, Mapping):
        metrics = {"value": metrics}
    visit(metrics, [])
    seen: list[str] = []
    for _, values in rows:
        seen.extend(k for k in values if k not in seen)
    columns = [k for k in LEADING_KEYS if k in seen] + [k for k in seen if k not in LEADING_KEYS]
    return columns, rows


def html_table(columns: Sequence[str], rows: Sequence[tuple[str, Mapping[str, Any]]], corner: str = "") -> str:
    """An HTML table: one row per (label, values); numbers right-aligned."""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for label, values in rows:
        cells = []
        for c in columns:
            v = values.get(c)
            cls = ' class="num"' if isinstance(v, numbers.Real) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{esc(format_value(v)) if c in values else ''}</td>")
        body.append(f"<tr><th scope=\"row\">{esc(label)}</th>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th>{esc(corner)}</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ----------------------------------------------------------------------------- charts


def save_figure(fig: Figure, out_path: Path) -> None:
    """Write a matplotlib figure as a PNG without metadata, atomically (as `viz.confusion_png`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write_bytes(out_path, buf.getvalue())


def _new_figure(width: float, height: float) -> Figure:
    """An Agg figure outside pyplot (no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def series_colors(n: int) -> list[tuple[float, float, float]]:
    """Colours of n series from the viz palette, as matplotlib RGB floats."""
    return [tuple(float(c) / 255.0 for c in rgb) for rgb in viz.palette(n)]


def per_class_iou_png(series: Mapping[str, Sequence[float | None]], class_names: Sequence[str], out_path: Path) -> None:
    """Grouped horizontal bars: per class, one bar per method (IoU in percent).

    Args:
        series: {method label: IoU per class, None where undefined}, all of len(class_names).
        class_names: Classes, drawn top to bottom in this order.
        out_path: PNG file to write (its folder must exist).
    """
    names = list(class_names)
    labels = list(series)
    if not names or not labels:
        raise ValueError("per_class_iou_png needs at least one class and one series")
    for label in labels:
        if len(series[label]) != len(names):
            raise ValueError(f"series {label!r} has {len(series[label])} values for {len(names)} classes")
    n, m = len(names), len(labels)
    bar = 0.8 / m
    fig = _new_figure(9.0, max(3.0, 0.2 * n * m + 0.35 * n + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    centres = np.arange(n, dtype=np.float64)
    for j, (label, color) in enumerate(zip(labels, series_colors(m))):
        vals = np.array([np.nan if v is None else float(v) for v in series[label]])
        y = centres - 0.4 + bar * (j + 0.5)
        ax.barh(y, np.nan_to_num(vals, nan=0.0), height=bar, color=color, label=label)
        for yy, v in zip(y, vals):
            ax.text((0.0 if np.isnan(v) else v) + 0.8, yy, "n/a" if np.isnan(v) else f"{v:.1f}",
                    va="center", ha="left", fontsize=7)
    ax.set_yticks(centres, labels=names)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    ncol = min(m, 3)
    legend_h = (0.22 * math.ceil(m / ncol) + 0.15) / fig.get_figheight()
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0.0, legend_h, 1.0, 1.0))
    save_figure(fig, out_path)


def per_class_series(data: Any) -> dict[str, dict[str, float | None]]:
    """Every ``per_class_iou`` mapping in a per_class.json, keyed by its path ("" at the root).

    Reads evaluate's {predictor: {method: {...}}}, the probe's flat {...} and any other nesting.
    """
    found: dict[str, dict[str, float | None]] = {}

    def visit(node: Any, path: list[str]) -> None:
        if not isinstance(node, Mapping):
            return
        if isinstance(node.get("per_class_iou"), Mapping):
            found["/".join(path)] = dict(node["per_class_iou"])
        for k, v in node.items():
            if k != "per_class_iou":
                visit(v, path + [str(k)])

    visit(data, [])
    return found


def read_dvclive_curves(plots_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every DVCLive metric TSV under ``plots_dir`` (``<name>.tsv``: [timestamp,] step, value).

    Returns:
        {metric name (path below plots_dir, no suffix): (steps, values)}, sorted by name;
        files without a numeric row are left out.
    """
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in sorted(Path(plots_dir).rglob("*.tsv")):
        name = path.relative_to(plots_dir).with_suffix("").as_posix()
        steps, values = [], []
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            fields = [f for f in (reader.fieldnames or []) if f not in ("timestamp", "step")]
            if not fields:
                continue
            for row in reader:
                try:
                    value = float(row[fields[-1]])
                    step = float(row["step"]) if row.get("step") not in (None, "") else float(len(steps))
                except (TypeError, ValueError):
                    continue
                steps.append(step)
                values.append(value)
        if steps:
            curves[name] = (np.asarray(steps), np.asarray(values))
    return curves


def curves_png(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, out_path: Path) -> None:
    """One line plot per metric (own y scale), in a grid of up to 3 columns, under one title."""
    if not curves:
        raise ValueError("curves_png needs at least one curve")
    n = len(curves)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = _new_figure(4.0 * cols, 2.8 * rows + 0.4)
    color = series_colors(4)[3]
    for i, (name, (steps, values)) in enumerate(curves.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(steps, values, color=color, marker="o" if len(steps) <= 20 else None, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out_path)


# ----------------------------------------------------------------------------- label maps and crops


def map_labels(labels: np.ndarray, mapping: Sequence[int]) -> np.ndarray:
    """Predicted ids to GT classes through an evaluate mapping; unmatched (-1) or unknown ids -> 255."""
    lut = np.asarray(list(mapping), dtype=np.int64)
    ids = np.asarray(labels, dtype=np.int64)
    valid = ids < lut.size
    out = np.where(valid, lut[np.where(valid, ids, 0)], -1)
    return np.where(out < 0, viz.IGNORE_INDEX, out).astype(np.uint8 if lut.size == 0 or lut.max() < 255 else np.uint16)


def masked_crop(image: np.ndarray, mask: np.ndarray, box: Sequence[int], dim: float = 0.3) -> np.ndarray:
    """The image inside a mask's box with the pixels outside the mask dimmed.

    Args:
        image: uint8 RGB (H, W, 3).
        mask: (H, W) bool or 0/1, same size.
        box: (x0, y0, x1, y1), x1 and y1 exclusive (as `mining.mask_box`); clipped to the image.
        dim: Brightness kept outside the mask, in [0, 1].

    Returns:
        uint8 RGB crop, at least 1x1.
    """
    img = np.asarray(image)
    m = np.asarray(mask).astype(bool)
    if img.shape[:2] != m.shape:
        raise ValueError(f"image size {img.shape[:2]} differs from mask size {m.shape}")
    h, w = m.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    x1, y1 = max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)
    crop = img[y0:y1, x0:x1].astype(np.float32)
    inside = m[y0:y1, x0:x1, None]
    return np.where(inside, crop, np.rint(crop * dim)).astype(np.uint8)


def square_tile(image: np.ndarray, fill: tuple[int, int, int] = (235, 235, 235)) -> np.ndarray:
    """Pad an RGB crop to a centred square (so every gallery tile has the same size)."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[...] = fill
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def gt_pixel_counts(gt: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels of each GT class under a mask (ignored pixels left out): int64 (num_classes,)."""
    vals = np.asarray(gt)[np.asarray(mask).astype(bool)]
    vals = vals[vals != viz.IGNORE_INDEX].astype(np.int64)
    return np.bincount(vals, minlength=num_classes)[:num_classes]


def class_shares(counts: np.ndarray, names: Sequence[str], top: int = 3) -> str:
    """'name 45%, name 30%, ...' of the largest entries of a count vector; 'none labelled' when empty."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return "none labelled"
    order = np.argsort(-counts, kind="stable")[:top]
    return ", ".join(f"{names[i]} {100 * counts[i] / total:.0f}%" for i in order if counts[i] > 0)


def cam_pseudo_labels(cams: np.ndarray, bg_threshold: float = 0.1, background: bool = True) -> np.ndarray:
    """TransFGU's pseudo-label of each token from one image's concept CAMs, in numpy.

    The same rule as `pipeline.transfgu.pseudo_label_target` without a teacher (kept torch-free
    for the report): min-max over all the image's maps, then, object-centric, a background
    channel relu(bg_threshold - max) first, and the arg-max.

    Args:
        cams: (C, h, w) concept maps of one image.

    Returns:
        (h, w) int64 labels: 0 = background and c + 1 = concept c, or concept ids when
        `background` is False (scene-centric).
    """
    maps = np.asarray(cams, dtype=np.float32)
    lo, hi = maps.min(), maps.max()
    norm = (maps - lo) / max(float(hi - lo), 1e-12)
    if background:
        norm = np.concatenate([np.maximum(bg_threshold - norm.max(0, keepdims=True), 0.0), norm])
    return norm.argmax(0).astype(np.int64)


# ----------------------------------------------------------------------------- the page


@dataclass
class Section:
    """One section of the page: HTML parts, or the notes that say why it is (partly) empty."""

    anchor: str
    title: str
    parts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def add(self, part: str) -> None:
        self.parts.append(part)

    def html(self) -> str:
        notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in self.notes)
        return f'<section id="{self.anchor}"><h2>{html.escape(self.title)}</h2>{notes}{"".join(self.parts)}</section>'


def figure_html(src: str, caption: str, alt: str | None = None) -> str:
    """An <img> by relative path with a caption (plain text, escaped)."""
    esc = html.escape
    return (f'<figure><img src="{esc(src)}" alt="{esc(alt or caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1150px;
  padding:16px 24px;color:#1d1d1f;background:#fff;line-height:1.4}
h1{margin:0 0 4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}h3{margin:18px 0 6px}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:8px 0}
dl.meta dt{font-weight:600}dl.meta dd{margin:0}
nav ul{display:flex;flex-wrap:wrap;gap:4px 18px;padding:0;list-style:none}
table{border-collapse:collapse;margin:6px 0 14px;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 9px;text-align:left}thead th{background:#f0f0f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}tbody th{font-weight:500;background:#fafafa}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #e3e3e3}
figcaption{font-size:13px;color:#555}p.note{color:#8a5a00;background:#fff8e6;border-left:4px solid #f0b429;
  padding:4px 10px;margin:6px 0}p.caption{font-size:13px;color:#555}code{font-size:13px}
"""


def render_page(title: str, meta: Sequence[tuple[str, str]], sections: Sequence[Section]) -> str:
    """The whole page: header with run metadata, a table of contents and the sections."""
    esc = html.escape
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in meta)
    toc = "".join(f'<li><a href="#{s.anchor}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(s.html() for s in sections)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body><header><h1>{esc(title)}</h1><dl class=\"meta\">{dl}</dl></header>"
        f"<nav><ul>{toc}</ul></nav>\n{body}\n</body></html>\n"
    )
