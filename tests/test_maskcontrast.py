"""MaskContrast: the loss on hand-built cases, the queue, the momentum update, views, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import load_params
from pipeline.errors import ParamsError
from pipeline.maskcontrast import (
    ContrastConfig,
    PrototypeQueue,
    ViewSampler,
    balanced_bce,
    build_contrast_model,
    contrastive_logits,
    contrastive_loss,
    enet_weights,
    key_prototypes,
    majority_label,
    momentum_update,
    retrieve,
    saliency_prototype,
    train_maskcontrast,
)


def _emb(vectors: list[list[list[float]]]) -> torch.Tensor:
    """(B, P, D) nested lists -> (B, D, 1, P) unit embeddings."""
    x = torch.tensor(vectors, dtype=torch.float32)
    x = x / x.norm(dim=2, keepdim=True)
    return x.permute(0, 2, 1)[:, :, None, :]


def test_loss_two_images_two_masks_by_hand():
    # Image 0: pixels along x and y, only the first salient. Image 1: both salient, along y and (1, 1).
    q = _emb([[[1, 0], [0, 1]], [[0, 1], [1, 1]]])
    q_mask = torch.tensor([[[True, False]], [[True, True]]])
    # Keys: image 0's mask holds x and (1, 1); image 1's mask holds y only.
    k = _emb([[[1, 0], [1, 1]], [[0, 1], [1, 0]]])
    k_mask = torch.tensor([[[True, True]], [[True, False]]])
    protos = key_prototypes(k, k_mask)
    s = 1 / math.sqrt(2)
    p0 = np.array([1 + s, s]) / np.linalg.norm([1 + s, s])
    np.testing.assert_allclose(protos.numpy(), [p0, [0, 1]], atol=1e-6)

    queue = torch.tensor([[-1.0, 0.0]])
    t = 0.5
    logits, target = contrastive_logits(q, q_mask, protos, queue, t)
    assert target.tolist() == [0, 1, 1]
    # Rows: the 3 salient query pixels x, y, (1,1)/sqrt2; columns: p0, p1 = y, queue = -x.
    pixels = [np.array([1, 0]), np.array([0, 1]), np.array([s, s])]
    bank = [p0, np.array([0, 1]), np.array([-1, 0])]
    expect = np.array([[px @ b / t for b in bank] for px in pixels])
    np.testing.assert_allclose(logits.numpy(), expect, atol=1e-6)

    # ENet weights: target 0 holds 1/3 of the pixels, target 1 holds 2/3, the queue 0.
    w = [1 / math.log(1.02 + 1 / 3), 1 / math.log(1.02 + 2 / 3), 1 / math.log(1.02)]
    np.testing.assert_allclose(enet_weights(target, 3).numpy(), w, rtol=1e-6)
    nll = [-(row[y] - math.log(sum(math.exp(v) for v in row))) for row, y in zip(expect, [0, 1, 1])]
    by_hand = (w[0] * nll[0] + w[1] * nll[1] + w[1] * nll[2]) / (w[0] + 2 * w[1])
    assert contrastive_loss(logits, target).item() == pytest.approx(by_hand, rel=1e-5)


def test_no_queue_uses_only_the_batch_prototypes():
    q = _emb([[[1, 0]], [[0, 1]]])
    mask = torch.ones(2, 1, 1, dtype=torch.bool)
    logits, target = contrastive_logits(q, mask, torch.eye(2), torch.zeros(0, 2), 1.0)
    assert logits.shape == (2, 2) and target.tolist() == [0, 1]
    np.testing.assert_allclose(logits.numpy(), np.eye(2))


def test_balanced_bce_by_hand():
    logits = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1, 0], [0, 0]]])
    # every pixel costs ln 2; positives weigh 3/4 (share of negatives), negatives 1/4
    expect = (0.75 * math.log(2) + 0.25 * 3 * math.log(2)) / 4
    assert balanced_bce(logits, target).item() == pytest.approx(expect, rel=1e-6)
    good = torch.tensor([[[9.0, -9.0], [-9.0, -9.0]]])
    assert balanced_bce(good, target).item() < 1e-3


def test_queue_is_fifo_and_checks_the_batch():
    q = PrototypeQueue(4, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(q.entries.norm(dim=1), torch.ones(4))
    q.push(torch.tensor([[1.0, 0], [0, 1]]))
    q.push(torch.tensor([[2.0, 0], [0, 2]]))
    q.push(torch.tensor([[3.0, 0], [0, 3]]))
    assert q.entries[:, 0].tolist() == [3, 0, 2, 0] and q.ptr == 2
    with pytest.raises(ValueError):
        q.push(torch.ones(3, 2))
    empty = PrototypeQueue(0, 2, torch.Generator())
    empty.push(torch.ones(2, 2))
    assert empty.entries.shape == (0, 2)


def test_momentum_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    momentum_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


def test_queue_must_be_a_multiple_of_the_batch():
    with pytest.raises(ParamsError, match="contrast.queue_size"):
        ContrastConfig(batch_size=16, queue_size=100)


def test_views_keep_the_salient_share_and_the_ablation_repeats_the_view():
    torch.manual_seed(0)
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[20:40, 30:60] = True
    cfg = ContrastConfig(crop_size=32, batch_size=2, queue_size=4)
    xq, mq, xk, mk = ViewSampler(cfg).pair(image, mask)
    assert xq.shape == (3, 32, 32) and mq.shape == (32, 32) and mq.dtype == torch.bool
    for m in (mq, mk):
        assert 0.01 <= m.float().mean() <= 0.99
    same = ViewSampler(ContrastConfig(crop_size=32, batch_size=2, queue_size=4, views=False)).pair(image, mask)
    assert torch.equal(same[0], same[2]) and torch.equal(same[1], same[3])
    # an empty mask never gives a valid view
    assert ViewSampler(cfg).pair(image, np.zeros_like(mask)) is None


def _toy_data(n: int = 6):
    rng = np.random.default_rng(1)
    data = []
    for i in range(n):
        image = rng.integers(0, 80, (48, 48, 3), dtype=np.uint8)
        mask = np.zeros((48, 48), bool)
        mask[8 + i : 30 + i, 10:34] = True
        image[mask] = (200, 40 * (i % 3), 90)
        data.append((image, mask))
    return data


def test_training_is_deterministic_and_logs_finite_losses():
    data = _toy_data()
    cfg = ContrastConfig(epochs=2, batch_size=2, queue_size=4, crop_size=32, lr=0.01)
    logs: list[dict] = []
    m1 = train_maskcontrast(lambda j: data[j], len(data), cfg, progress=False, log=logs.append)
    m2 = train_maskcontrast(lambda j: data[j], len(data), cfg, progress=False)
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) and r["contrastive"] > 0 for r in logs)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    emb, sal = m1(torch.zeros(1, 3, 40, 56))
    assert emb.shape == (1, 32, 40, 56) and sal.shape == (1, 40, 56)


@pytest.mark.parametrize("ablation", [{"queue_size": 0}, {"momentum_encoder": False}, {"views": False}])
def test_ablations_train(ablation):
    data = _toy_data(4)
    cfg = ContrastConfig(epochs=1, batch_size=2, crop_size=32, **{"queue_size": 4, **ablation})
    logs: list[dict] = []
    train_maskcontrast(lambda j: data[j], len(data), cfg, progress=False, log=logs.append)
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])


def test_eval_helpers():
    emb = torch.tensor([[[1.0, 3.0], [5.0, 7.0]], [[0.0, 0.0], [2.0, 2.0]]])  # (D=2, H=2, W=2)
    sal = torch.tensor([[0.9, 0.1], [0.6, 0.2]])
    # weighted by 0.9 and 0.6 over the two salient pixels
    np.testing.assert_allclose(saliency_prototype(emb, sal), [(0.9 * 1 + 0.6 * 5) / 1.5, (0.6 * 2) / 1.5], rtol=1e-6)
    assert saliency_prototype(emb, torch.zeros(2, 2)) is None
    gt = np.array([[1, 1], [2, 255]])
    assert majority_label(gt, np.array([[True, True], [True, True]]), 3) == 1
    assert majority_label(gt, np.array([[False, False], [False, True]]), 3) == -1
    bank = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert retrieve(np.array([[0.1, 2.0], [3.0, 0.2]]), bank, np.array([7, 4])).tolist() == [4, 7]


def test_params_have_the_contrast_sections():
    p = load_params("params.yaml")
    assert p.contrast_mine.method == "saliency"
    assert p.contrast.temperature == 0.5 and p.contrast.key_momentum == 0.999
    assert p.contrast_eval.kmeans_seeds == 5 and p.contrast_eval.pca_dim == 32


def test_model_outputs():
    model = build_contrast_model(None)
    low, sal = model.forward_lowres(torch.zeros(2, 3, 64, 64))
    assert low.shape == (2, 32, 4, 4) and sal.shape == (2, 4, 4)


def test_frozen_vit_trunk_trains_only_the_head():
    from pipeline.models.backbones import create_backbone

    torch.manual_seed(0)
    vit = create_backbone("dinov2_vits14")
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    data = _toy_data(4)
    cfg = ContrastConfig(epochs=1, batch_size=2, queue_size=4, crop_size=28, backbone="features")
    model = train_maskcontrast(lambda j: data[j], len(data), cfg, progress=False, vit=vit)
    trunk = model.deeplab.backbone.vit.state_dict()
    assert all(torch.equal(before[k], trunk[k]) for k in before)
    emb, sal = model(torch.zeros(1, 3, 42, 56))
    assert emb.shape == (1, 32, 42, 56) and sal.shape == (1, 42, 56)
