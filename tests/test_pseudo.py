"""Pseudo-label bookkeeping: pasting clustered masks, segmenter targets."""

import numpy as np

from pipeline.pseudo import paste_cluster_masks, segmenter_classes, training_target


def test_paste_puts_the_highest_score_on_top():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    out = paste_cluster_masks([a, b], labels=[0, 2], scores=[0.9, 0.5], hw=(4, 4))
    assert out[0].tolist() == [1, 1, 1, 1]  # a only
    assert out[1].tolist() == [1, 1, 1, 1]  # overlap: a (higher score) wins
    assert out[2].tolist() == [3, 3, 3, 3]  # b only, cluster 2 -> label 3
    assert out[3].tolist() == [0, 0, 0, 0]  # background


def test_targets_object_and_scene_centric():
    pseudo = np.array([[0, 1], [2, 3]], np.uint16)
    assert training_target(pseudo, scene_centric=False).tolist() == [[0, 1], [2, 3]]
    assert training_target(pseudo, scene_centric=True).tolist() == [[255, 0], [1, 2]]
    assert segmenter_classes(5, scene_centric=False) == 6
    assert segmenter_classes(5, scene_centric=True) == 5


def test_filter_diagnostic_pasted_pixel_precision():
    from stages.filter import diagnostic

    # rows: background, pseudo-class 1, pseudo-class 2; Hungarian maps them to classes 0, 1, 2
    conf = np.array([[50, 5, 0], [10, 30, 0], [0, 5, 20]])
    d = diagnostic(conf)
    assert d["matching"] == "hungarian-counts"
    assert d["pasted_pixels"] == 65
    assert abs(d["pasted_pixel_precision"] - 100 * 50 / 65) < 1e-3
    assert abs(d["pixel_accuracy"] - 100 * 100 / 120) < 1e-3


def test_filter_warns_about_images_without_detection():
    from stages.filter import empty_images_warning

    assert empty_images_warning(0, 3, 0.05) is None
    some = empty_images_warning(2, 4, 0.05)
    assert "2 of 4 train images" in some and "filter.score_floor 0.05" in some
    assert "distill.epochs" not in some
    every = empty_images_warning(3, 3, 0.05)
    assert "3 of 3 train images" in every and "Every pseudo-label is background" in every
    assert "distill.epochs" in every
