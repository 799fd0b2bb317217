"""Known-answer tests for pipeline.metrics: every expected number is computed by hand here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.metrics import (
    apply_mapping,
    confusion_matrix,
    hungarian_match,
    identity_match,
    majority_match,
    miou_from_class_confusion,
    per_class_iou,
    pixel_accuracy,
    split_confusion,
)


def test_confusion_matrix_counts_rows_pred_cols_gt_and_ignores_255() -> None:
    pred = np.array([[0, 0, 1], [2, 1, 1]])
    gt = np.array([[0, 1, 1], [255, 1, 0]], dtype=np.uint8)
    conf = confusion_matrix(pred, gt, num_pred=3, num_classes=2)
    # pixels (pred, gt): (0,0) (0,1) (1,1) [ignored] (1,1) (1,0)
    expected = np.array([[1, 1], [1, 2], [0, 0]])
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64
    assert conf.sum() == 5  # the 255 pixel is not counted


def test_confusion_matrix_ignored_pixel_may_hold_any_prediction() -> None:
    pred = np.array([0, 7])
    gt = np.array([0, 255])
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 1, 1), [[1]])


@pytest.mark.parametrize(
    ("pred", "gt", "message"),
    [
        (np.array([0, 3]), np.array([0, 1]), "predicted id 3"),
        (np.array([0, -1]), np.array([0, 1]), "predicted id -1"),
        (np.array([0, 1]), np.array([0, 5]), "GT class id 5"),
        (np.array([0, 1]), np.array([0, 1, 1]), "shape"),
        (np.array([0.0, 1.0]), np.array([0, 1]), "integer"),
    ],
)
def test_confusion_matrix_rejects_bad_input(pred: np.ndarray, gt: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_matrix(pred, gt, num_pred=3, num_classes=2)


def test_split_confusion_sums_images() -> None:
    a = (np.array([0, 1]), np.array([0, 1]))
    b = (np.array([1, 1]), np.array([0, 255]))
    np.testing.assert_array_equal(split_confusion([a, b], 2, 2), [[1, 0], [1, 1]])


def test_hungarian_finds_non_identity_permutation() -> None:
    conf = np.array([[0, 10, 2], [8, 1, 0], [1, 0, 6]])
    res = hungarian_match(conf)
    np.testing.assert_array_equal(res.mapping, [1, 0, 2])
    # class confusion after mapping: rows = predicted class
    np.testing.assert_array_equal(res.class_confusion, [[8, 1, 0], [0, 10, 2], [1, 0, 6]])
    # GT totals per class: 9, 11, 8; predicted totals: 9, 12, 7
    iou = np.array([8 / (9 + 9 - 8), 10 / (12 + 11 - 10), 6 / (7 + 8 - 6)]) * 100
    np.testing.assert_allclose(res.per_class_iou, iou)
    assert res.miou == pytest.approx(iou.mean())
    assert res.pixel_accuracy == pytest.approx(100 * 24 / 28)
    assert res.method == "hungarian-counts"


def test_counts_and_iou_matching_differ() -> None:
    conf = np.array([[0, 4, 8], [4, 8, 0], [0, 2, 0]])
    # cluster sizes 12, 12, 2; GT class sizes 4, 14, 8; 26 pixels
    by_counts = hungarian_match(conf, by="counts")
    np.testing.assert_array_equal(by_counts.mapping, [2, 1, 0])  # 8 + 8 + 0 = 16 pixels
    iou_counts = np.array([0.0, 8 / (12 + 14 - 8), 8 / (12 + 8 - 8)]) * 100
    np.testing.assert_allclose(by_counts.per_class_iou, iou_counts)
    assert by_counts.miou == pytest.approx(iou_counts.mean())
    assert by_counts.pixel_accuracy == pytest.approx(100 * 16 / 26)

    by_iou = hungarian_match(conf, by="iou")
    np.testing.assert_array_equal(by_iou.mapping, [2, 0, 1])  # 8 + 4 + 2 = 14 pixels
    iou_iou = np.array([4 / (12 + 4 - 4), 2 / (2 + 14 - 2), 8 / (12 + 8 - 8)]) * 100
    np.testing.assert_allclose(by_iou.per_class_iou, iou_iou)
    assert by_iou.miou == pytest.approx(iou_iou.mean())
    assert by_iou.pixel_accuracy == pytest.approx(100 * 14 / 26)
    assert by_iou.method == "hungarian-iou"

    assert by_iou.miou > by_counts.miou  # each method wins on its own criterion
    assert by_counts.pixel_accuracy > by_iou.pixel_accuracy


def test_majority_vote_over_clustering() -> None:
    conf = np.array([[5, 1], [0, 3], [2, 2], [4, 0]])  # K=4 clusters, C=2 classes
    res = majority_match(conf)
    np.testing.assert_array_equal(res.mapping, [0, 1, 0, 0])  # tie in cluster 2 -> class 0
    np.testing.assert_array_equal(res.class_confusion, [[11, 3], [0, 3]])
    # GT totals: 11, 6; predicted totals: 14, 3
    iou = np.array([11 / (14 + 11 - 11), 3 / (3 + 6 - 3)]) * 100
    np.testing.assert_allclose(res.per_class_iou, iou)
    assert res.miou == pytest.approx(iou.mean())
    assert res.pixel_accuracy == pytest.approx(100 * 14 / 17)
    assert res.method == "majority"


def test_majority_leaves_empty_cluster_unmatched() -> None:
    res = majority_match(np.array([[3, 0], [0, 0], [0, 2]]))
    np.testing.assert_array_equal(res.mapping, [0, -1, 1])
    assert res.miou == pytest.approx(100.0)


def test_hungarian_requires_k_equal_c() -> None:
    with pytest.raises(ValueError, match="majority_match"):
        hungarian_match(np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="by="):
        hungarian_match(np.eye(2, dtype=np.int64), by="dice")


def test_identity_match_and_absent_class_handling() -> None:
    # class 2: no GT pixel, no prediction -> nan, excluded from the mean
    # class 3: predicted on 2 pixels but absent from GT -> IoU 0, included
    conf = np.array(
        [
            [6, 2, 0, 0],
            [0, 4, 0, 0],
            [0, 0, 0, 0],
            [2, 0, 0, 0],
        ]
    )
    res = identity_match(conf)
    # class 0: TP 6, predicted 8, GT 8; class 1: TP 4, predicted 4, GT 6
    expected = np.array([6 / (8 + 8 - 6), 4 / (4 + 6 - 4), np.nan, 0.0]) * 100
    np.testing.assert_allclose(res.per_class_iou, expected)
    assert res.miou == pytest.approx((60.0 + 400 / 6 + 0.0) / 3)
    assert res.pixel_accuracy == pytest.approx(100 * 10 / 14)
    with pytest.raises(ValueError, match="square"):
        identity_match(np.zeros((3, 2), dtype=np.int64))


def test_permuted_copy_of_gt_scores_100() -> None:
    gt = np.zeros((32, 48), dtype=np.uint8)
    gt[:, 16:32] = 1
    gt[8:24, 36:44] = 2
    gt[0, 0] = 255
    perm = np.array([2, 0, 1])
    pred = perm[np.where(gt == 255, 0, gt)]
    conf = confusion_matrix(pred, gt, 3, 3)
    for by in ("counts", "iou"):
        res = hungarian_match(conf, by=by)
        assert res.miou == pytest.approx(100.0)
        assert res.pixel_accuracy == pytest.approx(100.0)
        np.testing.assert_array_equal(res.mapping[perm], [0, 1, 2])
    assert identity_match(conf).miou < 1.0


def test_helpers_and_unmatched_pixels_count_as_misses() -> None:
    conf = np.array([[4, 0], [0, 2], [1, 1]])
    cc = apply_mapping(conf, np.array([0, 1, -1]))
    np.testing.assert_array_equal(cc, [[4, 0], [0, 2]])
    gt_totals = conf.sum(axis=0)  # 5, 3: the unmatched cluster's pixels are misses
    np.testing.assert_allclose(per_class_iou(cc, gt_totals), [80.0, 100 * 2 / 3])
    assert miou_from_class_confusion(cc) == pytest.approx(100.0)
    assert pixel_accuracy(cc, total=int(gt_totals.sum())) == pytest.approx(75.0)
    assert np.isnan(miou_from_class_confusion(np.zeros((2, 2), dtype=np.int64)))


def test_to_dict_is_json_with_none_for_nan() -> None:
    conf = np.array([[3, 0, 0], [0, 1, 0], [0, 0, 0]])
    d = identity_match(conf).to_dict(["sky", "road", "car"])
    json.dumps(d, allow_nan=False)
    assert d["method"] == "identity"
    assert d["miou"] == 100.0
    assert d["per_class_iou"] == {"sky": 100.0, "road": 100.0, "car": None}
    assert d["mapping"] == [0, 1, 2]
    with pytest.raises(ValueError, match="class names"):
        identity_match(conf).to_dict(["sky"])
