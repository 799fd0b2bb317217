"""Tests for pipeline.probe on a tiny synthetic problem with a known answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.probe import (
    ProbeConfig,
    ProbeModel,
    evaluate_probe,
    iter_probe_probs,
    predict_probe,
    resize_nearest,
    token_majority,
    train_linear_probe,
)

GRID = (6, 8)
CELL = 4  # GT pixels per token side: images are 24x32
NUM_CLASSES = 3
DIM = 16


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tokens = class embedding of their cell + noise; GT = the cell classes at 4x, with some 255.

    Classes are constant over 2x2-token blocks, so most class borders have straight runs
    (random classes per token would leave many corners, where bilinear upsampling
    legitimately rounds the border off).
    """
    rng = np.random.default_rng(seed)
    embed = np.random.default_rng(123).normal(size=(NUM_CLASSES, DIM))
    blocks = rng.integers(0, NUM_CLASSES, size=(n, GRID[0] // 2, GRID[1] // 2))
    cells = np.kron(blocks, np.ones((1, 2, 2), dtype=np.int64))
    tokens = embed[cells.reshape(n, -1)] + 0.3 * rng.normal(size=(n, GRID[0] * GRID[1], DIM))
    labels = []
    for c in cells:
        gt = np.kron(c, np.ones((CELL, CELL), dtype=np.int64)).astype(np.uint8)
        gt[0, :5] = 255
        labels.append(gt)
    return tokens.astype(np.float16), labels


CFG = ProbeConfig(epochs=15, lr=1e-2, batch_size=8, seed=0)


@pytest.mark.parametrize("loss_target", ["upsampled", "token-majority"])
def test_probe_recovers_linearly_encoded_classes(loss_target: str) -> None:
    tokens, labels = _synthetic(32, seed=0)
    val_tokens, val_labels = _synthetic(8, seed=1)
    cfg = ProbeConfig(**{**CFG.__dict__, "loss_target": loss_target})
    model = train_linear_probe(tokens, GRID, labels, NUM_CLASSES, cfg)
    assert model.history[-1] < model.history[0]
    res = evaluate_probe(model, val_tokens, val_labels)
    assert res.method == "identity"
    # bilinear upsampling puts straight class borders on the cell borders: near-perfect
    assert res.miou > 95.0


def test_probe_with_shuffled_labels_is_near_chance() -> None:
    tokens, labels = _synthetic(32, seed=0)
    val_tokens, val_labels = _synthetic(8, seed=1)
    shuffled = labels[1:] + labels[:1]  # every image gets another image's GT
    model = train_linear_probe(tokens, GRID, shuffled, NUM_CLASSES, CFG)
    assert evaluate_probe(model, val_tokens, val_labels).miou < 45.0


def test_probe_is_deterministic_and_leaves_global_state_alone() -> None:
    tokens, labels = _synthetic(16, seed=0)
    torch.use_deterministic_algorithms(False)  # another test in this process may have set it (runtime.setup)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = train_linear_probe(tokens, GRID, labels, NUM_CLASSES, ProbeConfig(epochs=3, batch_size=4))
    after = torch.rand(1)
    b = train_linear_probe(tokens, GRID, labels, NUM_CLASSES, ProbeConfig(epochs=3, batch_size=4))
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert before == after  # the global RNG was not consumed
    assert not torch.are_deterministic_algorithms_enabled()
    c = train_linear_probe(tokens, GRID, labels, NUM_CLASSES, ProbeConfig(epochs=3, batch_size=4, seed=1))
    assert not np.array_equal(a.weight, c.weight)


def test_predict_probe_sizes_and_state_round_trip() -> None:
    tokens, labels = _synthetic(8, seed=0)
    model = train_linear_probe(tokens, GRID, labels, NUM_CLASSES, ProbeConfig(epochs=2))
    restored = ProbeModel.from_state(model.to_state())
    sizes = [(24, 32), (30, 41)]
    preds = predict_probe(restored, tokens[:2], sizes)
    assert [p.shape for p in preds] == sizes
    assert all(p.dtype == np.uint8 and p.max() < NUM_CLASSES for p in preds)
    np.testing.assert_array_equal(preds[0], predict_probe(model, tokens[:1], sizes[:1])[0])


def test_probe_probabilities_match_its_labels() -> None:
    tokens, labels = _synthetic(8, seed=0)
    model = train_linear_probe(tokens, GRID, labels, NUM_CLASSES, CFG)
    sizes = [(24, 32), (30, 41), (7, 5)]
    probs = list(iter_probe_probs(model, tokens[:3], sizes, batch_size=2))
    assert [p.shape for p in probs] == [(NUM_CLASSES, *s) for s in sizes]
    assert all(p.dtype == np.float32 and p.min() >= 0 for p in probs)
    for p in probs:
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    for p, pred in zip(probs, predict_probe(model, tokens[:3], sizes)):
        np.testing.assert_array_equal(p.argmax(0), pred)
    with pytest.raises(ValueError, match="2 sizes for 3 token sets"):
        next(iter_probe_probs(model, tokens[:3], sizes[:2]))


def test_token_majority_and_resize_nearest_known_answer() -> None:
    gt = np.array(
        [
            [0, 0, 1, 1],
            [0, 1, 1, 255],
            [255, 255, 2, 2],
            [255, 255, 2, 1],
        ],
        dtype=np.uint8,
    )
    # 2x2 cells: {0,0,0,1} -> 0; {1,1,1,255} -> 1; all ignored -> 255; {2,2,2,1} -> 2
    np.testing.assert_array_equal(token_majority(gt, (2, 2), 3, samples=2), [[0, 1], [255, 2]])
    # samples at source rows/cols 1 and 3 (the target pixel centres)
    np.testing.assert_array_equal(resize_nearest(gt, (2, 2)), [[1, 255], [255, 1]])
    np.testing.assert_array_equal(resize_nearest(gt, (4, 4)), gt)


def test_probe_rejects_bad_input() -> None:
    tokens, labels = _synthetic(4, seed=0)
    with pytest.raises(ValueError, match="grid 5x8"):
        train_linear_probe(tokens, (5, 8), labels, NUM_CLASSES, CFG)
    with pytest.raises(ValueError, match="3 label maps for 4"):
        train_linear_probe(tokens, GRID, labels[:3], NUM_CLASSES, CFG)
    labels[2] = labels[2].copy()
    labels[2][5, 5] = 7
    with pytest.raises(ValueError, match="label map 2 has class id 7"):
        train_linear_probe(tokens, GRID, labels, NUM_CLASSES, CFG)
    with pytest.raises(ValueError, match="loss_target"):
        ProbeConfig(loss_target="pixels")
    with pytest.raises(ValueError, match="epochs"):
        ProbeConfig(epochs=0)


def test_probe_reads_tokens_from_h5py(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    tokens, labels = _synthetic(8, seed=0)
    cfg = ProbeConfig(epochs=2, batch_size=4)
    with h5py.File(tmp_path / "features.h5", "w") as f:
        f.create_dataset("patch_tokens", data=tokens, chunks=(2, *tokens.shape[1:]))
    with h5py.File(tmp_path / "features.h5", "r") as f:
        from_h5 = train_linear_probe(f["patch_tokens"], GRID, labels, NUM_CLASSES, cfg)
        preds_h5 = predict_probe(from_h5, f["patch_tokens"], [(24, 32)] * 8)
    from_np = train_linear_probe(tokens, GRID, labels, NUM_CLASSES, cfg)
    np.testing.assert_array_equal(from_h5.weight, from_np.weight)
    np.testing.assert_array_equal(preds_h5[3], predict_probe(from_np, tokens, [(24, 32)] * 8)[3])
