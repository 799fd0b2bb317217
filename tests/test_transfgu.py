"""TransFGU: windows, CAM pseudo-labels, decoder, losses, bootstrapping, augmentation, training."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import build_section
from pipeline.errors import ParamsError
from pipeline.models.backbones import ViTBackbone
from pipeline.models.vit import ViTConfig
from pipeline.transfgu import (
    VOC_UPDATE_INTERVALS,
    Bootstrapper,
    MaskTransformerDecoder,
    TransFGUConfig,
    alpha_at,
    category_loss,
    concept_cams,
    crop_for_window,
    discover_concepts,
    embedding_loss,
    foreground_map,
    is_teacher_update,
    keep_top_mass,
    pseudo_label_maps,
    pseudo_label_target,
    random_resized_crop_pair,
    select_windows,
    sliding_windows,
    train_transfgu,
    uncertainty_loss,
    upsample,
    window_embeddings,
)

DIM = 48


def tiny_vit(seed: int = 0) -> ViTBackbone:
    """A random 2-block ViT: patch 8, 48-d, 3 heads."""
    torch.manual_seed(seed)
    return ViTBackbone(ViTConfig(patch_size=8, embed_dim=DIM, depth=2, num_heads=3, pos_grid=4)).eval()


def uniform_last_attention(vit: ViTBackbone) -> ViTBackbone:
    """Zero the last block's query and key projections: every attention row is uniform (1 / N)."""
    qkv = vit.core.blocks[-1].attn.qkv
    with torch.no_grad():
        qkv.weight[: 2 * DIM].zero_()
        qkv.bias[: 2 * DIM].zero_()
    return vit


# ------------------------------------------------------------------------------- config


def test_config_defaults_and_bad_values() -> None:
    cfg = TransFGUConfig()
    assert cfg.window_fractions == [0.6, 0.5, 0.4, 0.3]
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip) == (1e-4, 5e-4, 1.0)
    assert (cfg.weight_cat, cfg.weight_unc, cfg.weight_emb) == (1.0, 0.3, 1.0)
    assert cfg.bootstrap_start == 5 and cfg.bootstrap_every == VOC_UPDATE_INTERVALS
    with pytest.raises(ParamsError, match="transfgu.window_fractions"):
        TransFGUConfig(window_fractions=[0.5, 1.5])
    with pytest.raises(ParamsError, match="transfgu.bootstrap_every"):
        TransFGUConfig(bootstrap_every=[5, 0])
    with pytest.raises(ParamsError, match="transfgu.d_model"):
        TransFGUConfig(d_model=100, decoder_heads=6)
    with pytest.raises(ParamsError, match="transfgu.fg_min"):
        build_section(TransFGUConfig, {"fg_min": 1.5}, "transfgu")
    with pytest.raises(ParamsError, match="transfgu.scene_centric"):
        build_section(TransFGUConfig, {"scene_centric": "yes"}, "transfgu")
    with pytest.raises(ParamsError, match="transfgu.windows"):
        build_section(TransFGUConfig, {"windows": "some"}, "transfgu")
    with pytest.raises(ParamsError, match="transfgu.windows"):  # every window needs the no-background set-up
        TransFGUConfig(windows="all")
    with pytest.raises(ParamsError, match="transfgu.num_stuff"):
        TransFGUConfig(windows="all", scene_centric=True, num_things=5, num_stuff=6)


def test_concept_counts_per_recipe() -> None:
    from types import SimpleNamespace

    from stages.transfgu import concept_counts

    def counts(**kw):
        return concept_counts(SimpleNamespace(transfgu=TransFGUConfig(**kw)), 11)

    assert counts() == (10, 0)  # object-centric: the foreground classes
    assert counts(scene_centric=True, num_things=5, num_stuff=6) == (5, 6)
    assert counts(scene_centric=True, windows="all") == (11, 0)  # every window: all the classes
    assert counts(scene_centric=True, windows="all", num_things=7) == (7, 0)
    with pytest.raises(ParamsError, match="num_stuff >= 1"):
        counts(scene_centric=True, num_things=5)


# ---------------------------------------------------------------------- concept discovery


def test_foreground_map_is_head_mean_above_its_mean() -> None:
    # 2 heads, 4 patches: head mean = [0.1, 0.4, 0.3, 0.2], mean 0.25.
    attn = torch.tensor([[0.0, 0.6, 0.2, 0.2], [0.2, 0.2, 0.4, 0.2]])
    fg = foreground_map(attn, (2, 2))
    assert fg.tolist() == [[False, True], [True, False]]
    assert foreground_map(attn[None], (2, 2)).shape == (1, 2, 2)


def test_sliding_windows_sizes_and_strides_on_16x16() -> None:
    windows = sliding_windows(16, 16)
    # side = round(f * 16): 10, 8, 6, 5; stride = side // 2; the last start touches the edge.
    expected_starts = {10: [0, 5, 6], 8: [0, 4, 8], 6: [0, 3, 6, 9, 10], 5: [0, 2, 4, 6, 8, 10, 11]}
    by_side: dict[int, list] = {}
    for y0, x0, y1, x1 in windows:
        assert y1 - y0 == x1 - x0
        by_side.setdefault(y1 - y0, []).append((y0, x0))
    assert list(by_side) == [10, 8, 6, 5]
    for side, starts in expected_starts.items():
        assert by_side[side] == [(y, x) for y in starts for x in starts]
    assert len(windows) == 9 + 9 + 25 + 49
    # Every patch is covered by windows of every size.
    for side in by_side:
        cover = np.zeros((16, 16), bool)
        for y0, x0 in by_side[side]:
            cover[y0 : y0 + side, x0 : x0 + side] = True
        assert cover.all()
    # Tiny grids: stride at least 1, side at least 1.
    assert sliding_windows(2, 3, (0.3,)) == [(y, x, y + 1, x + 1) for y in range(2) for x in range(3)]


def test_select_windows_on_a_hand_made_foreground() -> None:
    fg = np.zeros((8, 8), bool)
    fg[:4, :4] = True  # a 4x4 object in the top-left corner
    windows = [
        (0, 0, 4, 4),  # fg share 1.0 -> thing
        (0, 0, 5, 5),  # 16/25 = 0.64 -> thing
        (0, 2, 4, 6),  # 0.5 exactly -> neither (strict >)
        (2, 2, 6, 6),  # 0.25 fg, 0.75 bg -> neither
        (3, 3, 8, 8),  # 1/25 fg, 0.96 bg -> stuff
        (4, 4, 8, 8),  # all background -> stuff
    ]
    things, stuff = select_windows(fg, windows, scene_centric=True)
    assert things == [(0, 0, 4, 4), (0, 0, 5, 5)]
    assert stuff == [(3, 3, 8, 8), (4, 4, 8, 8)]
    things2, stuff2 = select_windows(torch.from_numpy(fg), windows, scene_centric=False)
    assert things2 == things and stuff2 == []
    # The official Cityscapes recipe: every window, whatever the attention says, and no stuff list.
    assert select_windows(fg, windows, scene_centric=True, every_window=True) == (windows, [])


def test_crop_for_window_slices_patches_and_resizes() -> None:
    image = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(3, 32, 32)
    crop = crop_for_window(image, (1, 2, 3, 4), (4, 4), 8, 16)  # patches rows 1-2, cols 2-3
    torch.testing.assert_close(crop, image[:, 8:24, 16:32])  # same size: bilinear is the identity
    assert crop_for_window(image, (0, 0, 2, 2), (4, 4), 8, 32).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="multiple of the patch"):
        crop_for_window(image, (0, 0, 2, 2), (4, 4), 8, 20)


def test_window_embeddings_and_discover_concepts() -> None:
    vit = tiny_vit()
    torch.manual_seed(3)
    things, stuff = window_embeddings(vit, torch.randn(1, 3, 32, 32), TransFGUConfig(crop_size=16, scene_centric=True))
    assert things.shape[1] == DIM and stuff.shape[1] == DIM and things.shape[0] + stuff.shape[0] > 0
    every, none = window_embeddings(
        vit, torch.randn(1, 3, 32, 32), TransFGUConfig(crop_size=16, scene_centric=True, windows="all")
    )
    assert every.shape == (len(sliding_windows(4, 4)), DIM) and none.shape == (0, DIM)
    # Two tight bundles of directions: spherical K-means finds both.
    rng = np.random.default_rng(0)
    a, b = np.eye(8)[0], np.eye(8)[1]
    x = np.concatenate([a * 5 + 0.01 * rng.normal(size=(20, 8)), b * 0.2 + 0.001 * rng.normal(size=(20, 8))])
    centroids = discover_concepts(x, 2, iters=20, seed=0)
    assert centroids.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    sims = centroids @ np.stack([a, b]).T
    assert sorted(sims.argmax(1).tolist()) == [0, 1] and sims.max(1).min() > 0.99


# -------------------------------------------------------------------------------- CAMs


def test_keep_top_mass_is_the_smallest_prefix_reaching_the_mass() -> None:
    v = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])  # sorted: 0.4, 0.3, 0.2 (sum 0.9 >= 0.8), 0.1
    assert keep_top_mass(v, 0.8).tolist() == [False, True, False, True, True]
    assert keep_top_mass(v, 0.7).tolist() == [False, True, False, True, False]  # 0.4 + 0.3 reaches 0.7
    assert not keep_top_mass(torch.zeros(4), 0.8).any()


def test_concept_cams_on_uniform_attention_match_an_independent_gradient() -> None:
    vit = uniform_last_attention(tiny_vit())
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32)
    concepts = torch.randn(4, DIM)
    cams = concept_cams(vit, x, concepts, mass=0.8, batch=3)  # 2 batched VJPs
    assert cams.shape == (4, 4, 4)
    assert all(p.grad is None for p in vit.parameters())  # nothing leaked into the backbone

    with torch.no_grad():
        out = vit(x)
    torch.testing.assert_close(out.cls_attn, torch.full_like(out.cls_attn, 1 / 17))  # the known pattern

    vit.retain_attn_grad = True
    dropped_some = False
    for c in range(4):
        out = vit(x.clone().requires_grad_(True))
        loss = 1 - F.cosine_similarity(out.cls, concepts[c : c + 1], dim=1).sum()
        loss.backward()
        g = vit.last_attn.grad[0, :, 0, 1:].mean(0)  # (16,) CLS row to the patches, head mean
        vit.zero_grad(set_to_none=True)
        cam = cams[c].flatten()
        assert (g > 0).any() and (g < 0).any()
        # Zero exactly where the gradient is positive; elsewhere the normalised uniform attention (1) plus a kept part.
        assert torch.all(cam[g > 0] == 0)
        assert torch.all(cam[g < 0] >= 1 - 1e-6)
        kept = torch.where(g < 0, cam - 1, torch.zeros_like(cam))
        neg = (-g).clamp(min=0)
        order = neg.argsort(descending=True)
        n = int((kept > 1e-9).sum())
        assert set(torch.nonzero(kept > 1e-9).flatten().tolist()) == set(order[:n].tolist())
        torch.testing.assert_close(kept[order[:n]], neg[order[:n]], atol=1e-6, rtol=1e-4)
        total = float(neg.sum())
        assert float(neg[order[:n]].sum()) >= 0.8 * total - 1e-7
        assert float(neg[order[: n - 1]].sum()) < 0.8 * total
        dropped_some |= n < int((g < 0).sum())
    assert dropped_some  # the 80% cut removed some negative-gradient patch in at least one map


def test_concept_cams_work_on_a_frozen_backbone_and_batch_sizes_agree() -> None:
    vit = tiny_vit(seed=2)
    for p in vit.parameters():
        p.requires_grad_(False)
    torch.manual_seed(4)
    x, concepts = torch.randn(1, 3, 32, 24), torch.randn(5, DIM)
    one = concept_cams(vit, x, concepts, batch=1)
    allc = concept_cams(vit, x, concepts, batch=8)
    assert one.shape == (5, 4, 3)
    torch.testing.assert_close(one, allc)
    assert (one >= 0).all() and (one > 0).any()


# ----------------------------------------------------------------------------- decoder


def test_decoder_shapes_orthogonal_classes_and_mask_norm() -> None:
    torch.manual_seed(0)
    dec = MaskTransformerDecoder(16, 5, d_model=24, depth=2, heads=3, dropout=0.1).eval()
    torch.testing.assert_close(dec.cls_emb @ dec.cls_emb.T, torch.eye(5), atol=1e-5, rtol=0)
    logits, classes = dec(torch.randn(2, 12, 16), (3, 4))
    assert logits.shape == (2, 5, 3, 4) and classes.shape == (2, 5, 24)
    torch.testing.assert_close(classes.norm(dim=-1), torch.ones(2, 5))
    # mask_norm: LayerNorm over K at init -> zero mean and unit (biased) variance per pixel
    # (slightly below 1: eps 1e-5 against the small spread of the cosines).
    torch.testing.assert_close(logits.mean(1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.var(1, unbiased=False), torch.ones(2, 3, 4), atol=2e-2, rtol=0)
    assert upsample(logits, (24, 32)).shape == (2, 5, 24, 32)
    with pytest.raises(ValueError, match="grid"):
        dec(torch.randn(1, 12, 16), (3, 3))


# ------------------------------------------------------------------------------ losses


def test_pseudo_label_target_by_hand() -> None:
    # One image, 2 concepts, 4 pixels; joint min-max: min 0, max 10.
    cams = torch.tensor([[[[0.0, 0.3, 10.0, 2.0]], [[0.0, 0.2, 3.0, 6.0]]]])
    maps = pseudo_label_maps(cams)
    # normalised: c1 = [0, .03, 1, .2], c2 = [0, .02, .3, .6]; bg = relu(0.1 - max) = [.1, .07, 0, 0]
    torch.testing.assert_close(maps[0, :, 0], torch.tensor([[0.1, 0.07, 0, 0], [0, 0.03, 1, 0.2], [0, 0.02, 0.3, 0.6]]))
    assert pseudo_label_target(cams).tolist() == [[[0, 0, 1, 2]]]
    # A concept at 0.08 < 0.1 still beats bg = 0.02: background needs max < 0.05 (official formula).
    assert pseudo_label_target(torch.tensor([[[[0.0, 0.8, 10.0]]]])).tolist() == [[[0, 1, 1]]]
    # Bootstrapped: 0.5 softmax(teacher) + 0.5 maps. The teacher is sure of class 0 at pixel 3:
    # 0.5 * ~1 + 0 > 0.5 * 0.6 + 0.5 * ~0.
    teacher = torch.zeros(1, 3, 1, 4)
    teacher[0, 0, 0, 3] = 20.0
    assert pseudo_label_target(cams, teacher).tolist() == [[[0, 0, 1, 0]]]
    # Scene-centric: no background channel.
    assert pseudo_label_target(cams, background=False).tolist() == [[[0, 0, 0, 1]]]


@pytest.mark.parametrize("background", [True, False])
def test_report_cam_labels_match_the_training_target(background: bool) -> None:
    """The report's torch-free pseudo-labels are the training target's (no teacher)."""
    from pipeline.report import cam_pseudo_labels

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        cams = torch.rand(1, 4, 6, 7, generator=g) ** 3  # skewed: background wins somewhere
        cams[0, 1, :2] = 0.0  # a zeroed region (positive gradient) like the real CAMs have
        expect = pseudo_label_target(cams, background=background)[0].numpy()
        np.testing.assert_array_equal(cam_pseudo_labels(cams[0].numpy(), 0.1, background), expect)


def test_embedding_loss_by_hand() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])  # cosines: 0, 1/sqrt2, 1/sqrt2
    expect = 1 + (2 / math.sqrt(2)) / 3
    assert embedding_loss(e).item() == pytest.approx(expect, abs=1e-6)
    assert embedding_loss(e[None].repeat(2, 1, 1)).item() == pytest.approx(expect, abs=1e-6)
    assert embedding_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-7)


def test_uncertainty_loss_by_hand_on_two_pixels() -> None:
    # Channel 0 (background) is ignored; things: pixel a softmax [.75, .25] (margin .5), pixel b [.5, .5] (1).
    logits = torch.tensor([[[[9.0, -9.0]], [[math.log(3), 0.0]], [[0.0, 0.0]]]])  # (1, 3, 1, 2)
    both = torch.tensor([[[True, True]]])
    assert uncertainty_loss(logits, both).item() == pytest.approx(0.75, abs=1e-6)
    assert uncertainty_loss(logits, torch.tensor([[[True, False]]])).item() == pytest.approx(0.5, abs=1e-6)
    assert uncertainty_loss(logits, torch.tensor([[[False, False]]])).item() == 0.0
    # One thing class (background + 1 channel, e.g. Weizmann horses): its softmax is 1, margin 0.
    one = uncertainty_loss(logits[:, :2].requires_grad_(), both)
    assert one.item() == 0.0 and one.requires_grad
    # All channels (scene-centric): pixel b is [1/3, 1/3, 1/3]-ish -> margin 1.
    p = logits.softmax(1)[0, :, 0, 0].sort(descending=True)[0]
    assert uncertainty_loss(logits, both, skip_background=False).item() == pytest.approx(
        (1 - (p[0] - p[1]).item() + 1.0) / 2, abs=1e-6
    )


def test_alpha_schedule_and_category_loss() -> None:
    assert alpha_at(0, 50) == pytest.approx(0.03) and alpha_at(49, 50) == pytest.approx(0.10)
    assert alpha_at(100, 50) == pytest.approx(0.10)
    assert [round(alpha_at(k, 8), 6) for k in range(10)] == [0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.1, 0.1]
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    ce = F.cross_entropy(logits, target)
    assert category_loss(logits, target).item() == pytest.approx(ce.item())
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(7))
    expect = ce - 0.05 * F.cross_entropy(logits, perm[target])
    got = category_loss(logits, target, 0.05, torch.Generator().manual_seed(7))
    assert got.item() == pytest.approx(expect.item(), abs=1e-6)


# ----------------------------------------------------------------------- bootstrapping


def test_bootstrapper_resets_the_student_and_copies_it_into_the_teacher() -> None:
    torch.manual_seed(0)
    student = MaskTransformerDecoder(8, 3, d_model=12, depth=1, heads=2)
    initial = copy.deepcopy(student.state_dict())
    boot = Bootstrapper(student)
    assert boot.teacher is None
    opt = torch.optim.Adam(student.parameters(), lr=0.1)
    for _ in range(2):
        logits, emb = student(torch.randn(2, 4, 8), (2, 2))
        loss = logits.square().mean() + embedding_loss(emb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = copy.deepcopy(student.state_dict())
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    for k in initial:  # the snapshot is a copy, not a view of the live parameters
        assert torch.equal(boot.initial[k], initial[k])

    boot.update(student)
    for k in initial:
        assert torch.equal(student.state_dict()[k], initial[k])
        assert torch.equal(boot.teacher.state_dict()[k], trained[k])
    assert not boot.teacher.training and not any(p.requires_grad for p in boot.teacher.parameters())
    with torch.no_grad():  # the teacher does not share storage with the student
        next(student.parameters()).add_(1.0)
    assert torch.equal(boot.teacher.state_dict()["proj_dec.weight"], trained["proj_dec.weight"])


def test_official_teacher_update_schedule() -> None:
    updates = [e for e in range(100) if is_teacher_update(e, 5, VOC_UPDATE_INTERVALS, 10)]
    assert updates == [5, 10, 15, 20, 25, 30, 35] + list(range(40, 90, 4)) + [90, 93, 96, 99]


# ------------------------------------------------------------------------ augmentation


def test_roi_align_crop_matches_a_slice_for_an_integer_box() -> None:
    image = torch.rand(3, 48, 48)
    maps = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 6, 6)
    box = (1 / 6, 2 / 6, 4 / 6, 5 / 6)  # label cells rows 1-3, cols 2-4; pixels 8:32, 16:40
    img, lab, used = random_resized_crop_pair(image, maps, out_size=24, patch=8, box=box)
    torch.testing.assert_close(lab, maps[:, 1:4, 2:5])
    torch.testing.assert_close(img, image[:, 8:32, 16:40])
    assert used == pytest.approx(box)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        img, lab, (y0, x0, y1, x1) = random_resized_crop_pair(image, maps, (0.4, 1.0), 16, 8, gen)
        assert img.shape == (3, 16, 16) and lab.shape == (2, 2, 2)
        assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1 and 0.4 - 1 / 48 <= y1 - y0 <= 1


# ---------------------------------------------------------------------------- training


def test_train_transfgu_runs_bootstraps_and_is_deterministic() -> None:
    vit = tiny_vit()

    def tokens_fn(x: torch.Tensor) -> torch.Tensor:
        return vit(x).patch_tokens

    def cams_fn(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(j)
        return torch.rand(3, 32, 32, generator=g), torch.rand(2, 4, 4, generator=g)

    cfg = TransFGUConfig(
        epochs=3, batch_size=2, train_size=16, d_model=24, decoder_heads=3, decoder_depth=1,
        bootstrap_start=1, bootstrap_every=[2], alpha_ramp_epochs=8,
    )
    runs = []
    for _ in range(2):
        logs: list[dict] = []
        dec = train_transfgu(tokens_fn, cams_fn, 4, cfg, in_dim=DIM, patch_size=8, progress=False, log=logs.append)
        runs.append((logs, dec.state_dict()))
    logs = runs[0][0]
    assert [e["epoch"] for e in logs] == [0, 1, 2]
    assert [e["teacher_updated"] for e in logs] == [False, False, True]  # epoch 2: >= 1 and 2 % 2 == 0
    assert [e["alpha"] for e in logs] == [0.0, 0.0, pytest.approx(0.03)]
    assert all(np.isfinite(e["loss"]) and e["emb"] >= 0 and 0 <= e["unc"] <= 1 for e in logs)
    assert dec.num_classes == 3 and not dec.training
    assert [e["loss"] for e in runs[0][0]] == [e["loss"] for e in runs[1][0]]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_train_transfgu_with_one_thing_concept() -> None:
    """A two-class object-centric set (Weizmann horses) has one concept: background + 1 channel."""
    vit = tiny_vit()

    def cams_fn(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(j)
        return torch.rand(3, 32, 32, generator=g), torch.rand(1, 4, 4, generator=g)

    cfg = TransFGUConfig(epochs=2, batch_size=2, train_size=16, d_model=24, decoder_heads=3, decoder_depth=1, bootstrap_start=1, bootstrap_every=[1])
    logs: list[dict] = []
    dec = train_transfgu(lambda x: vit(x).patch_tokens, cams_fn, 4, cfg, in_dim=DIM, patch_size=8, progress=False, log=logs.append)
    assert dec.num_classes == 2
    assert [e["teacher_updated"] for e in logs] == [False, True]
    assert all(np.isfinite(e["loss"]) and e["unc"] == 0.0 and 0.0 <= e["emb"] <= 2.0 for e in logs)  # emb: background vs horse
