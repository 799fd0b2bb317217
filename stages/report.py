"""Stage `report`: one self-contained static HTML page (index.html + PNGs) for a run.

Sections: metrics tables (every results/*/metrics.json), per-class IoU bars, the evaluate
confusion matrices, DVCLive training curves, sample label maps (image | GT | each method) from
the eval-split predictions, a crop gallery per discovered cluster (masks.h5 + clusters.h5), and
TransFGU's CAM pseudo-labels on train images with each concept's share of the pixels (cams.h5).
A section whose inputs are missing or stale is skipped with a note on the page, never a crash;
only a missing or unreadable image index stops the command. The folder is built beside OUT and
swapped in whole, so no PNG of an earlier report is left behind.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
from rich.console import Console

from pipeline import __version__
from pipeline import report as rep
from pipeline import viz
from pipeline.artifacts import RaggedReader, open_artifact, read_strings, staged_folder
from pipeline.config import Params
from pipeline.errors import DataError, UsegError
from pipeline.index import ImageIndex, read_index
from pipeline.metrics import confusion_matrix, resize_nearest
from pipeline.progress import track

#: Height in pixels of every tile of the sample grid.
SAMPLE_TILE = 144

#: metrics.json files shown first, with a caption; any other results/*/metrics.json follows.
KNOWN_METRICS = {
    "evaluate": "Unsupervised methods and baselines on the eval split: mIoU and pixel accuracy in percent; "
                "Hungarian matching when K = number of classes, majority vote (own key) when K is larger.",
    "probe": "Supervised linear probe on frozen patch tokens: the ceiling, trained on the train split's GT.",
    "filter": "Pseudo-label diagnostic against the train split's GT: never used for selection.",
}


def run(
    params: Params,
    index_path: Path,
    results_dir: Path,
    predictions_dir: Path,
    masks_path: Path,
    clusters_path: Path,
    out_dir: Path,
    num_samples: int = 6,
    crops_per_cluster: int = 8,
    cams_path: Path | None = None,
) -> Path:
    """Write OUT_DIR/index.html and its PNGs; returns the page's path.

    Raises:
        UsegError: the index is missing or unreadable, OUT_DIR holds something other than a
            report, or a count is below its minimum.
    """
    if num_samples < 0 or crops_per_cluster < 0:
        raise UsegError(f"--samples {num_samples} / --crops {crops_per_cluster}: counts must be >= 0")
    if not index_path.exists():
        raise DataError(f"{index_path}: image index not found (run `useg prepare` first)")
    _check_replaceable(out_dir)
    index = read_index(index_path)
    with staged_folder(out_dir) as tmp:
        per_class = _read_json(results_dir / "evaluate" / "per_class.json")
        sections = [
            metrics_section(results_dir, out_dir),
            per_class_section(index, results_dir, per_class, out_dir, tmp),
            confusion_section(results_dir, tmp),
            curves_section(results_dir, out_dir, tmp),
            samples_section(params, index, predictions_dir, per_class, tmp, num_samples),
            gallery_section(index, masks_path, clusters_path, tmp, crops_per_cluster),
            cams_section(params, index, cams_path, tmp, num_samples),
        ]
        page = rep.render_page(f"useg report: {index.dataset.name}", _meta(params, index, index_path), sections)
        (tmp / "index.html").write_text(page, encoding="utf-8")
    skipped = sum(bool(s.notes) for s in sections)
    Console(stderr=True).print(f"report: {out_dir / 'index.html'} ({len(sections)} sections, {skipped} with notes)")
    return out_dir / "index.html"


# ----------------------------------------------------------------------------- folder handling


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty folder or an earlier report may be replaced (never e.g. `--out results`)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UsegError(f"{out_dir}: exists and is not a folder")
    page = out_dir / "index.html"
    is_report = page.is_file() and f'content="{rep.GENERATOR}"' in page.read_text(errors="replace")[:2000]
    if any(out_dir.iterdir()) and not is_report:
        raise UsegError(f"{out_dir}: folder is not empty and holds no earlier useg report: choose another --out")


def _stage_dirs(results_dir: Path, out_dir: Path) -> list[Path]:
    """The stage folders under RESULTS, sorted; hidden (temporary) folders and the report itself left out."""
    if not results_dir.is_dir():
        return []
    return sorted(d for d in results_dir.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.resolve() != out_dir.resolve())


def _read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _meta(params: Params, index: ImageIndex, index_path: Path) -> list[tuple[str, str]]:
    ds = index.dataset
    counts = {}
    for s in ds.samples:
        counts[s.split] = counts.get(s.split, 0) + 1
    root = ds.samples[0].image.parent if ds.samples else "?"
    return [
        ("dataset", f"{ds.name} ({root})"),
        ("images", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))),
        ("classes", f"{ds.num_classes}: {', '.join(ds.class_names)}" if ds.class_names else "none (unlabelled)"),
        ("eval split", params.base.eval_split),
        ("index", f"{index_path} (fingerprint {index.fingerprint[:12]})"),
        ("code version", f"useg {__version__}"),
    ]


# ----------------------------------------------------------------------------- sections


def metrics_section(results_dir: Path, out_dir: Path) -> rep.Section:
    """A table per results/*/metrics.json (evaluate, probe, filter first)."""
    sec = rep.Section("metrics", "Metrics")
    found = sorted(d.name for d in _stage_dirs(results_dir, out_dir) if (d / "metrics.json").is_file())
    order = [n for n in KNOWN_METRICS if n in found] + [n for n in found if n not in KNOWN_METRICS]
    for name in ("evaluate", "probe"):
        if name not in found:
            sec.note(f"skipped: {results_dir / name / 'metrics.json'} not found (run `useg {name}`)")
    for name in order:
        path = results_dir / name / "metrics.json"
        data = _read_json(path)
        if data is None:
            sec.note(f"skipped: {path} is not valid JSON")
            continue
        columns, rows = rep.metrics_rows(data, root_label=name)
        if not rows:
            sec.note(f"skipped: {path} holds no values")
            continue
        caption = KNOWN_METRICS.get(name, "")
        if not caption and (results_dir / name / "plots" / "metrics").is_dir():
            caption = "DVCLive summary of training: the values logged at the last step."
        sec.add(f"<h3><code>{path.as_posix()}</code></h3>" + (f'<p class="caption">{caption}</p>' if caption else ""))
        sec.add(rep.html_table(columns, rows, corner=name))
    return sec


def _class_order(names: list[str], per_class_iou: dict) -> list[str]:
    """The dataset's class order where it names the same classes, else the file's order."""
    return names if set(names) == set(per_class_iou) else list(per_class_iou)


def per_class_section(index: ImageIndex, results_dir: Path, per_class: dict | None, out_dir: Path, tmp: Path) -> rep.Section:
    """Grouped bars of per-class IoU: the evaluated methods with the probe beside them, then one
    chart per other results/*/per_class.json (e.g. contrast_eval)."""
    sec = rep.Section("per-class", "Per-class IoU")
    path = results_dir / "evaluate" / "per_class.json"
    probe = rep.per_class_series(_read_json(results_dir / "probe" / "per_class.json"))
    series = rep.per_class_series(per_class)
    if not per_class:
        sec.note(f"skipped: {path} not found or not valid JSON (run `useg evaluate`)")
    elif not series:
        sec.note(f"skipped: {path} holds no per_class_iou entries")
    else:
        series.update({f"probe{'/' + k if k else ''} (supervised)": v for k, v in probe.items()})
        _per_class_chart(index, series, tmp / "per_class_iou.png")
        sec.add(f"<h3><code>{path.as_posix()}</code></h3>")
        sec.add(rep.figure_html("per_class_iou.png", "IoU per GT class (percent) after matching; n/a = class absent "
                                "from both GT and prediction. The probe is supervised (the ceiling)."))
    others = [d / "per_class.json" for d in _stage_dirs(results_dir, out_dir)
              if d.name not in ("evaluate", "probe") and (d / "per_class.json").is_file()]
    for other in others:
        found = rep.per_class_series(_read_json(other))
        if not found:
            sec.note(f"skipped: {other} is not valid JSON or holds no per_class_iou entries")
            continue
        name = f"per_class_iou_{other.parent.name}.png"
        _per_class_chart(index, found, tmp / name)
        sec.add(f"<h3><code>{other.as_posix()}</code></h3>")
        sec.add(rep.figure_html(name, f"IoU per GT class (percent) from {other}."))
    return sec


def _per_class_chart(index: ImageIndex, series: dict[str, dict], out_path: Path) -> None:
    names = _class_order(index.dataset.class_names, next(iter(series.values())))
    rep.per_class_iou_png({k: [v.get(n) for n in names] for k, v in series.items()}, names, out_path)


def confusion_section(results_dir: Path, tmp: Path) -> rep.Section:
    """Copies of the evaluate stage's confusion.png files."""
    sec = rep.Section("confusion", "Confusion matrices")
    pngs = sorted((results_dir / "evaluate").glob("*/confusion.png"))
    if not pngs:
        sec.note(f"skipped: no {results_dir / 'evaluate'}/*/confusion.png (run `useg evaluate`)")
        return sec
    for png in pngs:
        name = f"confusion_{png.parent.name}.png"
        shutil.copyfile(png, tmp / name)
        sec.add(rep.figure_html(name, f"{png.parent.name}: rows = GT class, columns = predicted class after "
                                      "matching, each row normalised (percent of the class's GT pixels)."))
    return sec


def curves_section(results_dir: Path, out_dir: Path, tmp: Path) -> rep.Section:
    """One figure of DVCLive curves per stage (results/<stage>/plots/metrics/**.tsv)."""
    sec = rep.Section("curves", "Training curves")
    dirs = [d / "plots" / "metrics" for d in _stage_dirs(results_dir, out_dir) if (d / "plots" / "metrics").is_dir()]
    for d in dirs:
        stage = d.parents[1].name
        curves = rep.read_dvclive_curves(d)
        if not curves:
            sec.note(f"skipped {stage}: no readable .tsv under {d}")
            continue
        name = f"curves_{stage}.png"
        rep.curves_png(curves, stage, tmp / name)
        sec.add(rep.figure_html(name, f"{stage}: DVCLive metrics per step ({d}); one record per epoch."))
    if not dirs:
        sec.note(f"skipped: no DVCLive curves ({results_dir}/<stage>/plots/metrics/*.tsv; written by distill, segment)")
    return sec


def _fit(title: str, chars: int) -> str:
    """Shorten a column title to about `chars` characters, keeping both ends."""
    if len(title) <= chars:
        return title
    keep = max(1, (chars - 2) // 2)
    return f"{title[:keep]}..{title[-keep:]}"


def _mapping_for(per_class: dict | None, pred: str, method: str) -> tuple[str, list[int]] | None:
    """The evaluate mapping of a predictor's method: (key, cluster -> class), or None."""
    entries = (per_class or {}).get(pred) or {}
    for key in [method] + sorted(k for k in entries if k.startswith(f"{method}_overclustered_k")):
        res = entries.get(key)
        if isinstance(res, dict) and isinstance(res.get("mapping"), list):
            return key, [int(v) for v in res["mapping"]]
    return None


def samples_section(
    params: Params, index: ImageIndex, predictions_dir: Path, per_class: dict | None, tmp: Path, n: int
) -> rep.Section:
    """A grid image | GT | each method for `n` eval images spread over the split."""
    sec = rep.Section("samples", "Sample predictions")
    if n == 0:
        sec.note("skipped: --samples 0")
        return sec
    files = sorted(p for p in predictions_dir.glob("*.h5") if not p.name.startswith("."))
    if not files:
        sec.note(f"skipped: no predictions artifacts in {predictions_dir} (run `useg baseline` / `useg predict`)")
        return sec
    ds = index.dataset
    columns: list[tuple[str, RaggedReader, dict[str, int], list[int] | None]] = []
    captions: list[str] = []
    opened = []
    try:
        for path in files:
            try:
                f = open_artifact(path, "useg.predictions", index.fingerprint)
            except UsegError as e:
                sec.note(f"skipped {path.name}: {e}")
                continue
            opened.append(f)
            rows = {id_: j for j, id_ in enumerate(read_strings(f, "ids"))}
            for method in str(f.attrs.get("methods", "")).split(","):
                if not method or method not in f:
                    continue
                title = method if method.startswith(path.stem) else f"{path.stem}/{method}"
                found = _mapping_for(per_class, path.stem, method)
                if found:
                    captions.append(f"{title}: mapped to GT classes by evaluate ({found[0]}; black = unmatched)")
                else:
                    captions.append(f"{title}: raw cluster ids (no evaluate mapping found), palette colours by id")
                columns.append((title, RaggedReader(f[method], "labels"), rows, found[1] if found else None))
        if not columns:
            sec.note(f"skipped: no readable predictions in {predictions_dir}")
            return sec
        eval_ids = [ds.samples[int(i)].id for i in index.positions(params.base.eval_split)]
        shared = [i for i in eval_ids if all(i in rows for _, _, rows, _ in columns)]
        if not shared:
            sec.note(f"skipped: the predictions artifacts share no image of the '{params.base.eval_split}' split")
            return sec
        pick = [shared[j] for j in _evenly_spaced(len(shared), n)]
        by_id = {s.id: s for s in ds.samples}
        titles = ["image"] + (["ground truth"] if ds.has_labels else []) + [_fit(c[0], SAMPLE_TILE // 6) for c in columns]
        grid = []
        for id_ in track(pick, "report: sample predictions"):
            s = by_id[id_]
            row = [ds.load_image(s)] + ([ds.load_mask(s)] if ds.has_labels else [])
            for _, reader, rows, mapping in columns:
                labels = reader[rows[id_]]
                row.append(rep.map_labels(labels, mapping) if mapping is not None else labels.astype(np.int64))
            grid.append(row)
        viz.overlay_grid(grid, titles, tmp / "samples.png", tile_height=SAMPLE_TILE)
    finally:
        for f in opened:
            f.close()
    sec.add(rep.figure_html("samples.png", f"{len(pick)} images of the '{params.base.eval_split}' split, evenly spaced; "
                                           "colours are the viz palette by class id."))
    sec.add("<ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in captions) + "</ul>")
    return sec


def gallery_section(index: ImageIndex, masks_path: Path, clusters_path: Path, tmp: Path, m: int) -> rep.Section:
    """Per cluster, its `m` masks nearest the centroid as crops of their box, outside dimmed."""
    sec = rep.Section("clusters", "Cluster gallery")
    if m == 0:
        sec.note("skipped: --crops 0")
        return sec
    for path in (masks_path, clusters_path):
        if not path.exists():
            sec.note(f"skipped: {path} not found (no mask mining / clustering in this run)")
            return sec
    masks = _open_or_note(sec, masks_path, "useg.masks", index)
    if masks is None:
        return sec
    with masks:
        clusters = _open_or_note(sec, clusters_path, "useg.clusters", index)
        if clusters is None:
            return sec
        with clusters:
            image_index = masks["image_index"][()]
            boxes = masks["box"][()]
            labels = clusters["label"][()].astype(np.int64)
            dist = clusters["distance"][()] if "distance" in clusters else np.zeros(len(labels), dtype=np.float32)
            k = int(clusters.attrs.get("num_clusters", int(labels.max()) + 1 if labels.size else 0))
            if len(labels) != len(image_index):
                sec.note(f"skipped: {clusters_path} has {len(labels)} labels for {len(image_index)} masks in "
                         f"{masks_path}: re-run `useg cluster`")
                return sec
            reader = RaggedReader(masks, "masks")
            _gallery(index, reader, image_index, boxes, labels, dist, k, m, tmp, sec)
    return sec


def _gallery(index, reader, image_index, boxes, labels, dist, k: int, m: int, tmp: Path, sec: rep.Section) -> None:
    ds = index.dataset
    sizes = np.bincount(labels, minlength=k)
    chosen = {}
    for c in range(k):
        members = np.flatnonzero(labels == c)
        chosen[c] = [int(j) for j in members[np.argsort(dist[members], kind="stable")][:m]]
    gt_counts = _gt_pixel_counts(index, reader, image_index) if ds.has_labels else None
    cache: dict[int, np.ndarray] = {}
    parts = []
    for c in track(range(k), "report: cluster gallery"):
        head = f"cluster {c}: {_count(int(sizes[c]), 'mask')}"
        if gt_counts is not None and sizes[c]:
            head += "; GT pixels under its masks: " + rep.class_shares(gt_counts[labels == c].sum(0), ds.class_names)
        if not chosen[c]:
            parts.append(f"<h3>{html.escape(head)}</h3><p class=\"caption\">no masks</p>")
            continue
        tiles, titles = [], []
        for j in chosen[c]:
            p = int(image_index[j])
            if p not in cache:
                cache[p] = ds.load_image(ds.samples[p])
            tiles.append(rep.square_tile(rep.masked_crop(cache[p], reader[j], boxes[j])))
            titles.append(ds.samples[p].id[-14:])
        name = f"cluster_{c:03d}.png"
        viz.overlay_grid([tiles], titles, tmp / name, tile_height=112)
        caption = (f"cluster {c}: the {_count(len(tiles), 'mask')} nearest its centroid (image id above each crop); "
                   "outside the mask dimmed.")
        parts.append(f"<h3>{html.escape(head)}</h3>" + rep.figure_html(name, caption, alt=f"cluster {c}"))
    sec.add(f'<p class="caption">{k} clusters; crops of each mask\'s bounding box, sorted by distance to the '
            "cluster centroid.</p>" + "".join(parts))


def cams_section(params: Params, index: ImageIndex, cams_path: Path | None, tmp: Path, n: int) -> rep.Section:
    """TransFGU's pseudo-labels: `n` train images (image | GT | arg-max of the CAMs), and per
    concept the share of the train tokens it wins, with the GT classes under them."""
    sec = rep.Section("cams", "TransFGU CAM pseudo-labels")
    if n == 0:
        sec.note("skipped: --samples 0")
        return sec
    if cams_path is None or not cams_path.exists():
        sec.note(f"skipped: {cams_path} not found (no TransFGU `cams` stage in this run)")
        return sec
    f = _open_or_note(sec, cams_path, "useg.cams", index)
    if f is None:
        return sec
    ds = index.dataset
    bg = params.transfgu.bg_threshold
    with f:
        positions = f["positions"][()]
        if not len(positions):
            sec.note(f"skipped: {cams_path} holds no image")
            return sec
        cams = f["cams"]
        background = not bool(f.attrs["scene_centric"])
        k = cams.shape[1] + background
        names = (["background"] if background else []) + [f"concept {c}" for c in range(cams.shape[1])]
        won = np.zeros(k, dtype=np.int64)
        under = np.zeros((k, ds.num_classes), dtype=np.int64)
        pick = set(_evenly_spaced(len(positions), n))
        grid = []
        for j in track(range(len(positions)), "report: CAM pseudo-labels"):
            labels = rep.cam_pseudo_labels(cams[j], bg, background)
            won += np.bincount(labels.ravel(), minlength=k)
            if not ds.has_labels and j not in pick:
                continue
            sample = ds.samples[int(positions[j])]
            image = ds.load_image(sample) if j in pick else None
            gt = ds.load_mask(sample) if ds.has_labels else None
            full = resize_nearest(labels, gt.shape if gt is not None else image.shape[:2])
            if gt is not None:
                under += confusion_matrix(full, gt, k, ds.num_classes)
            if image is not None:
                grid.append([image] + ([gt] if gt is not None else []) + [full])
    titles = ["image"] + (["ground truth"] if ds.has_labels else []) + ["CAM pseudo-label"]
    viz.overlay_grid(grid, titles, tmp / "cams.png", tile_height=SAMPLE_TILE)
    sec.add(rep.figure_html("cams.png", f"{len(grid)} of the {len(positions)} train images, evenly spaced: the arg-max "
                                        "of the min-max normalised CAMs on the token grid (the training target before "
                                        "bootstrapping), shown by nearest neighbour; colours by label id, "
                                        + ("0 = background." if background else "no background (scene-centric).")))
    rows = []
    for c in range(k):
        line = f"{names[c]}: {100 * won[c] / max(won.sum(), 1):.1f}% of the train tokens"
        if ds.has_labels:
            line += "; GT pixels under it: " + rep.class_shares(under[c], ds.class_names)
        rows.append(f"<li>{html.escape(line)}</li>")
    sec.add("<ul>" + "".join(rows) + "</ul>")
    return sec


def _evenly_spaced(count: int, n: int) -> list[int]:
    """Up to `n` distinct indices spread evenly over range(count), first and last included."""
    return [int(j) for j in np.unique(np.linspace(0, count - 1, min(n, count)).round())]


def _open_or_note(sec: rep.Section, path: Path, schema: str, index: ImageIndex):
    """The artifact opened (schema and dataset checked), or None with the reason noted on the section."""
    try:
        return open_artifact(path, schema, index.fingerprint)
    except UsegError as e:
        sec.note(f"skipped: {e}")
        return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _gt_pixel_counts(index: ImageIndex, reader: RaggedReader, image_index: np.ndarray) -> np.ndarray:
    """Pixels of each GT class under each mask: int64 (masks, classes); zeros where sizes differ."""
    ds = index.dataset
    out = np.zeros((len(image_index), ds.num_classes), dtype=np.int64)
    for p in track(np.unique(image_index), "report: GT classes of the masks"):
        gt = ds.load_mask(ds.samples[int(p)])
        for j in np.flatnonzero(image_index == p):
            mask = reader[int(j)]
            if mask.shape == gt.shape:
                out[j] = rep.gt_pixel_counts(gt, mask, ds.num_classes)
    return out
