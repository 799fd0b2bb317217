"""Segmentation metrics with the papers' evaluation protocol.

Protocol (design.md, "Evaluation"):

- One confusion matrix is accumulated over the whole split at original resolution
  (:func:`confusion_matrix` per image, summed, or :func:`split_confusion`). GT pixels
  equal to 255 are ignored.
- Rows are predicted ids (clusters, or classes for supervised predictions), columns are
  GT classes.
- Predicted ids are mapped to classes by one of:

  * :func:`hungarian_match` one-to-one, K = C, maximising matched pixels
    (``by="counts"``, MaskDistill / TransFGU) or summed IoU (``by="iou"``, MaskContrast);
  * :func:`majority_match` many-to-one for over-clustering (K > C): each cluster goes to
    its majority GT class. Reported separately, never mixed with Hungarian numbers;
  * :func:`identity_match` for supervised predictions (linear probe): no matching.

- IoU of class c is ``TP / (TP + FP + FN)`` on the class confusion after mapping.
  A class with no GT pixels and no predicted pixels has an undefined IoU (nan) and is
  left out of the mean (``np.nanmean``); a class that is predicted but absent from the
  GT counts with IoU 0. All scores are in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment

IGNORE_INDEX = 255
MATCH_METHODS = ("hungarian-counts", "hungarian-iou", "majority", "identity")


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_pred: int, num_classes: int) -> np.ndarray:
    """Count (predicted id, GT class) pairs over the valid pixels of one or more images.

    Args:
        pred: Integer predicted ids (clusters or classes), any shape.
        gt: Integer GT classes, same shape as ``pred``; 255 marks ignored pixels.
        num_pred: Number of predicted ids K; every value of ``pred`` must be in [0, K).
        num_classes: Number of GT classes C; every value of ``gt`` other than 255 must be
            in [0, C).

    Returns:
        int64 array (K, C): ``conf[k, c]`` is the number of pixels predicted ``k`` whose
        GT class is ``c``.

    Raises:
        ValueError: on a shape mismatch, a non-integer array, or an id out of range (the
            message names the offending value).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from GT shape {gt.shape}")
    for name, arr in (("prediction", pred), ("GT", gt)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if num_pred < 1 or num_classes < 1:
        raise ValueError(f"num_pred ({num_pred}) and num_classes ({num_classes}) must be >= 1")
    valid = gt != IGNORE_INDEX
    p = pred[valid].astype(np.int64, copy=False)
    g = gt[valid].astype(np.int64, copy=False)
    _check_range(p, num_pred, "predicted id", "num_pred")
    _check_range(g, num_classes, "GT class id", "num_classes")
    counts = np.bincount(p * num_classes + g, minlength=num_pred * num_classes)
    return counts.reshape(num_pred, num_classes).astype(np.int64, copy=False)


def _check_range(values: np.ndarray, upper: int, what: str, bound_name: str) -> None:
    """Raise ValueError naming the first value outside [0, upper)."""
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0:
        raise ValueError(f"{what} {lo} is negative")
    if hi >= upper:
        extra = " (255 is the only ignore value)" if what == "GT class id" else ""
        raise ValueError(f"{what} {hi} is out of range: {bound_name} = {upper}{extra}")


def split_confusion(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_pred: int, num_classes: int
) -> np.ndarray:
    """Sum :func:`confusion_matrix` over an iterable of (prediction, GT) label maps.

    Streams: only one image pair is held at a time.

    Args:
        pairs: (prediction, GT) per image, each at the image's original resolution.
        num_pred: Number of predicted ids K.
        num_classes: Number of GT classes C.

    Returns:
        int64 array (K, C) over the whole split.
    """
    total = np.zeros((num_pred, num_classes), dtype=np.int64)
    for pred, gt in pairs:
        total += confusion_matrix(pred, gt, num_pred, num_classes)
    return total


@dataclass(frozen=True, eq=False)
class MatchResult:
    """Scores of predictions after mapping predicted ids to GT classes.

    Attributes:
        method: One of ``MATCH_METHODS``.
        mapping: (K,) int64, the class assigned to each predicted id; -1 = unmatched.
        miou: Mean IoU in percent over the classes whose IoU is defined (see module doc).
        pixel_accuracy: Correct pixels over valid GT pixels, in percent.
        per_class_iou: (C,) IoU in percent; nan for classes absent from GT and predictions.
        class_confusion: (C, C) int64 after mapping; rows = predicted class, cols = GT.
            Pixels of unmatched ids are in no row (they still count as misses of their
            GT class in the scores).
    """

    method: str
    mapping: np.ndarray
    miou: float
    pixel_accuracy: float
    per_class_iou: np.ndarray
    class_confusion: np.ndarray

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        """JSON-able summary for ``metrics.json`` (nan becomes None, floats rounded to 1e-4).

        Args:
            class_names: Names of the C classes; defaults to ``"0"``, ``"1"``, ...

        Returns:
            ``{"method", "miou", "pixel_accuracy", "num_predicted", "num_classes",
            "per_class_iou": {name: iou or None}, "mapping": [class per predicted id]}``.
        """
        num_classes = self.per_class_iou.shape[0]
        names = class_names if class_names is not None else [str(c) for c in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names given for {num_classes} classes")
        return {
            "method": self.method,
            "miou": _json_float(self.miou),
            "pixel_accuracy": _json_float(self.pixel_accuracy),
            "num_predicted": int(self.mapping.shape[0]),
            "num_classes": int(num_classes),
            "per_class_iou": {n: _json_float(v) for n, v in zip(names, self.per_class_iou)},
            "mapping": [int(m) for m in self.mapping],
        }


def _json_float(value: float) -> float | None:
    """Round to 4 decimals; nan becomes None (JSON has no nan)."""
    value = float(value)
    return None if np.isnan(value) else round(value, 4)


def hungarian_match(conf: np.ndarray, by: str = "counts") -> MatchResult:
    """One-to-one matching of K = C clusters to classes (scipy ``linear_sum_assignment``).

    Args:
        conf: (K, C) confusion matrix, rows = clusters, cols = GT classes, K == C.
        by: ``"counts"`` maximises the number of matched pixels (MaskDistill, TransFGU);
            ``"iou"`` maximises the summed IoU of the matched pairs (MaskContrast).

    Returns:
        MatchResult with method ``"hungarian-counts"`` or ``"hungarian-iou"``.

    Raises:
        ValueError: if K != C (use :func:`majority_match` for over-clustering) or ``by``
            is unknown.
    """
    conf = _check_conf(conf)
    k, c = conf.shape
    if k != c:
        raise ValueError(
            f"Hungarian matching needs as many clusters as classes, got K={k}, C={c}; "
            "use majority_match for over-clustering (K > C), reported separately"
        )
    if by == "counts":
        score = conf.astype(np.float64)
    elif by == "iou":
        score = _pairwise_iou(conf)
    else:
        raise ValueError(f"unknown matching criterion by={by!r}; allowed: 'counts', 'iou'")
    rows, cols = linear_sum_assignment(score, maximize=True)
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[rows] = cols
    return _result(f"hungarian-{by}", conf, mapping)


def majority_match(conf: np.ndarray) -> MatchResult:
    """Many-to-one mapping for over-clustering: each cluster goes to its majority class.

    Ties go to the lowest class id; a cluster with no valid pixel stays unmatched (-1).

    Args:
        conf: (K, C) confusion matrix, rows = clusters, cols = GT classes, any K.

    Returns:
        MatchResult with method ``"majority"``.
    """
    conf = _check_conf(conf)
    mapping = np.argmax(conf, axis=1).astype(np.int64)
    mapping[conf.sum(axis=1) == 0] = -1
    return _result("majority", conf, mapping)


def identity_match(conf: np.ndarray) -> MatchResult:
    """Scores of supervised predictions (e.g. the linear probe): predicted id = class.

    Args:
        conf: (C, C) confusion matrix, rows = predicted classes, cols = GT classes.

    Returns:
        MatchResult with method ``"identity"``.

    Raises:
        ValueError: if the matrix is not square.
    """
    conf = _check_conf(conf)
    k, c = conf.shape
    if k != c:
        raise ValueError(f"identity matching needs a square confusion matrix, got {k}x{c}")
    return _result("identity", conf, np.arange(k, dtype=np.int64))


def apply_mapping(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Merge the rows of a (K, C) confusion matrix into a (C, C) class confusion.

    Args:
        conf: (K, C) confusion, rows = predicted ids.
        mapping: (K,) class per predicted id; rows mapped to -1 are dropped.

    Returns:
        int64 (C, C): rows = predicted class, cols = GT class.
    """
    conf = _check_conf(conf)
    mapping = np.asarray(mapping, dtype=np.int64)
    k, c = conf.shape
    if mapping.shape != (k,):
        raise ValueError(f"mapping has shape {mapping.shape}, expected ({k},)")
    if mapping.size and (mapping.min() < -1 or mapping.max() >= c):
        raise ValueError(f"mapping values must be in [-1, {c}), got {mapping.min()}..{mapping.max()}")
    out = np.zeros((c, c), dtype=np.int64)
    keep = mapping >= 0
    np.add.at(out, mapping[keep], conf[keep])
    return out


def per_class_iou(class_confusion: np.ndarray, gt_totals: np.ndarray | None = None) -> np.ndarray:
    """IoU per class in percent: TP / (TP + FP + FN); nan where TP + FP + FN = 0.

    Args:
        class_confusion: (C, C), rows = predicted class, cols = GT class.
        gt_totals: (C,) valid GT pixels per class; defaults to the column sums. Pass the
            column sums of the unmapped confusion when some clusters are unmatched, so
            their pixels count as misses.

    Returns:
        float64 (C,).
    """
    cc = _check_conf(class_confusion)
    tp = np.diag(cc).astype(np.float64)
    gt = cc.sum(axis=0) if gt_totals is None else np.asarray(gt_totals)
    union = cc.sum(axis=1) + gt - tp
    iou = np.full(tp.shape, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return 100.0 * iou


def miou_from_class_confusion(class_confusion: np.ndarray, gt_totals: np.ndarray | None = None) -> float:
    """Mean IoU in percent over the classes whose IoU is defined (nanmean of :func:`per_class_iou`)."""
    iou = per_class_iou(class_confusion, gt_totals)
    return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def pixel_accuracy(class_confusion: np.ndarray, total: int | None = None) -> float:
    """Correct pixels over all valid GT pixels, in percent (nan if there are none).

    Args:
        class_confusion: (C, C) after mapping.
        total: Number of valid GT pixels; defaults to the matrix sum.
    """
    cc = _check_conf(class_confusion)
    n = int(cc.sum()) if total is None else int(total)
    return 100.0 * float(np.trace(cc)) / n if n > 0 else float("nan")


def _result(method: str, conf: np.ndarray, mapping: np.ndarray) -> MatchResult:
    """Build a MatchResult from a (K, C) confusion and a cluster -> class mapping."""
    cc = apply_mapping(conf, mapping)
    gt_totals = conf.sum(axis=0)
    return MatchResult(
        method=method,
        mapping=mapping,
        miou=miou_from_class_confusion(cc, gt_totals),
        pixel_accuracy=pixel_accuracy(cc, int(gt_totals.sum())),
        per_class_iou=per_class_iou(cc, gt_totals),
        class_confusion=cc,
    )


def _pairwise_iou(conf: np.ndarray) -> np.ndarray:
    """IoU of every (cluster, class) pair as if the cluster were mapped to that class alone."""
    inter = conf.astype(np.float64)
    union = conf.sum(axis=1, keepdims=True) + conf.sum(axis=0, keepdims=True) - inter
    iou = np.zeros_like(inter)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


def _check_conf(conf: np.ndarray) -> np.ndarray:
    """Validate a confusion matrix: 2-D, integer, non-negative."""
    conf = np.asarray(conf)
    if conf.ndim != 2:
        raise ValueError(f"confusion matrix must be 2-D, got shape {conf.shape}")
    if not np.issubdtype(conf.dtype, np.integer):
        raise ValueError(f"confusion matrix must hold integer counts, got dtype {conf.dtype}")
    if conf.size and conf.min() < 0:
        raise ValueError("confusion matrix has negative counts")
    return conf.astype(np.int64, copy=False)


def resize_nearest(label_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map, sampling the source at the target pixel centres.

    Args:
        label_map: (H, W) ids.
        size: (height, width) of the result.

    Returns:
        Array (height, width), same dtype.
    """
    src_h, src_w = label_map.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * src_h / size[0]).astype(np.int64), src_h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * src_w / size[1]).astype(np.int64), src_w - 1)
    return label_map[rows[:, None], cols[None, :]]
