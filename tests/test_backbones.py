"""Backbones: output shapes, position-grid interpolation, determinism, checkpoint layouts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.errors import ParamsError, WeightsError
from pipeline.models import create_backbone, list_backbones
from pipeline.models.backbones import Backbone
from pipeline.models.vit import interpolate_pos_embed

VITS = {  # name -> (patch, dim, heads)
    "dinov2_vits14": (14, 384, 6),
    "dino_vits16": (16, 384, 6),
    "dino_vits8": (8, 384, 6),
    "dino_vitb8": (8, 768, 12),
    "dino_vitb16": (16, 768, 12),
}
CNNS = {"mobilenet_v2": 1280, "resnet50": 2048}


def seeded(name: str, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return create_backbone(name)


def image(h: int, w: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def forward(model: Backbone, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


def test_registry_lists_all_names() -> None:
    assert set(list_backbones()) == set(VITS) | set(CNNS)


def test_unknown_name_is_a_params_error() -> None:
    with pytest.raises(ParamsError, match="allowed: .*dinov2_vits14"):
        create_backbone("vit_huge")


@pytest.mark.parametrize("name", sorted(VITS))
def test_vit_output_shapes(name: str) -> None:
    patch, dim, heads = VITS[name]
    model = seeded(name)
    assert (model.patch_size, model.embed_dim, model.num_heads) == (patch, dim, heads)
    out = forward(model, image(3 * patch, 5 * patch))
    assert out.grid == (3, 5)
    assert out.patch_tokens.shape == (2, 15, dim)
    assert out.cls.shape == (2, dim)
    assert out.cls_attn.shape == (2, heads, 15)
    assert out.keys.shape == (2, 15, dim)
    assert out.cls_query.shape == (2, dim)
    cls_to_cls = model.last_attn[:, :, 0, 0]
    torch.testing.assert_close(out.cls_attn.sum(-1) + cls_to_cls, torch.ones(2, heads))


@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnn_output_shapes(name: str) -> None:
    model = seeded(name)
    out = forward(model, image(64, 96))
    assert model.patch_size == 32 and model.num_heads is None
    assert out.grid == (2, 3)
    assert out.patch_tokens.shape == (2, 6, CNNS[name])
    assert out.cls is None and out.cls_attn is None and out.keys is None and out.cls_query is None


def test_dinov2_position_grid_interpolates_to_non_square_input() -> None:
    model = seeded("dinov2_vits14")
    out = forward(model, image(476, 364, batch=1))
    assert out.grid == (34, 26)
    assert out.patch_tokens.shape == (1, 34 * 26, 384)
    assert torch.isfinite(out.patch_tokens).all()


@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_interpolate_pos_embed_known_answers(offset: float) -> None:
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert interpolate_pos_embed(pos, (37, 37), offset) is pos
    const = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 37 * 37, 8), 0.5)], dim=1)
    resized = interpolate_pos_embed(const, (34, 26), offset)
    assert resized.shape == (1, 1 + 34 * 26, 8)
    torch.testing.assert_close(resized[:, 1:], torch.full((1, 34 * 26, 8), 0.5))


def test_input_not_multiple_of_patch_is_rejected() -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        forward(seeded("dinov2_vits14"), image(30, 28))


def test_random_init_and_forward_are_deterministic() -> None:
    x = image(42, 56)
    a, b = seeded("dinov2_vits14", 3), seeded("dinov2_vits14", 3)
    out_a, out_a2, out_b = forward(a, x), forward(a, x), forward(b, x)
    assert torch.equal(out_a.patch_tokens, out_a2.patch_tokens)
    assert torch.equal(out_a.patch_tokens, out_b.patch_tokens)
    assert torch.equal(out_a.keys, out_b.keys)
    assert not torch.equal(out_a.patch_tokens, forward(seeded("dinov2_vits14", 4), x).patch_tokens)


def test_keys_and_query_are_head_major_and_match_cls_attention() -> None:
    model = seeded("dino_vits16")
    out = forward(model, image(32, 48))
    heads, head_dim = 6, 64
    q = out.cls_query.view(2, heads, head_dim)
    k = out.keys.view(2, 6, heads, head_dim)
    logits = torch.einsum("bhd,bphd->bhp", q, k) * head_dim**-0.5
    # softmax over CLS + patches: ratios between patches depend on the patch logits only
    expected = logits - logits[..., :1]
    actual = out.cls_attn.log() - out.cls_attn[..., :1].log()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_last_attention_is_in_the_autograd_graph() -> None:
    model = seeded("dino_vits16")
    model.retain_attn_grad = True
    out = model(image(32, 32))
    weights = torch.linspace(0, 1, out.cls_attn.shape[-1])
    (out.cls_attn * weights).sum().backward()
    grad = model.last_attn.grad
    assert grad is not None and grad.shape == (2, 6, 5, 5)
    assert grad[:, :, 0].abs().sum() > 0 and grad[:, :, 1:].abs().sum() == 0


# --- checkpoint layouts ----------------------------------------------------------------------


def assert_same_outputs(a: Backbone, b: Backbone, x: torch.Tensor) -> None:
    out_a, out_b = forward(a, x), forward(b, x)
    assert torch.equal(out_a.patch_tokens, out_b.patch_tokens)
    if out_a.cls is not None:
        assert torch.equal(out_a.cls, out_b.cls) and torch.equal(out_a.keys, out_b.keys)


def test_dino_plain_state_dict_loads(tmp_path: Path) -> None:
    ref = seeded("dino_vits16")
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(ref.core.state_dict(), path)
    assert_same_outputs(ref, create_backbone("dino_vits16", path), image(32, 48))


def test_dino_training_checkpoint_loads_the_teacher(tmp_path: Path) -> None:
    teacher, student = seeded("dino_vits16", 0), seeded("dino_vits16", 1)
    head = {"head.mlp.0.weight": torch.randn(16, 384), "head.last_layer.weight_g": torch.ones(65, 1)}
    ckpt = {
        "student": {f"module.backbone.{k}": v for k, v in student.core.state_dict().items()}
        | {f"module.{k}": v for k, v in head.items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher.core.state_dict().items()} | head,
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    assert_same_outputs(teacher, create_backbone("dino_vits16", path), image(32, 48))


def test_torchvision_mobilenet_v2_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2().eval()
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(tv.state_dict(), path)
    x = image(64, 64)
    out = forward(create_backbone("mobilenet_v2", path), x)
    with torch.no_grad():
        expected = tv.features(x).flatten(2).transpose(1, 2)
    assert torch.equal(out.patch_tokens, expected)


def resnet_layer4(tv: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        return tv.layer4(tv.layer3(tv.layer2(tv.layer1(x)))).flatten(2).transpose(1, 2)


def test_torchvision_resnet50_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    x = image(64, 64)
    assert torch.equal(forward(create_backbone("resnet50", path), x).patch_tokens, resnet_layer4(tv, x))


def test_moco_v2_resnet50_loads_the_query_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc_q, enc_k = torchvision.models.resnet50().eval(), torchvision.models.resnet50().eval()
    trunk = lambda m: {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}  # noqa: E731
    mlp_head = {"fc.0.weight": torch.randn(8, 2048), "fc.0.bias": torch.zeros(8), "fc.2.weight": torch.randn(4, 8)}
    state = (
        {f"module.encoder_k.{k}": v for k, v in trunk(enc_k).items()}
        | {f"module.encoder_q.{k}": v for k, v in (trunk(enc_q) | mlp_head).items()}
        | {"module.queue": torch.randn(4, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    )
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}}}, path)
    x = image(64, 64)
    assert torch.equal(forward(create_backbone("resnet50", path), x).patch_tokens, resnet_layer4(enc_q, x))


def test_missing_keys_name_the_file_and_the_keys(tmp_path: Path) -> None:
    state = {k: v for k, v in seeded("dino_vits16").core.state_dict().items() if not k.startswith("blocks.11.")}
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"truncated\.pth.*missing.*blocks\.11\.norm1\.weight"):
        create_backbone("dino_vits16", path)


def test_unknown_layout_is_a_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder": {"weird.weight": torch.ones(3)}}, path)
    with pytest.raises(WeightsError, match=r"other\.pth: unknown checkpoint layout.*first missing: cls_token"):
        create_backbone("dino_vits16", path)


def test_wrong_shapes_are_a_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "vits16.pth"
    torch.save(seeded("dino_vits16").core.state_dict(), path)
    shapes = r"tensor 'cls_token' has shape \(1, 1, 384\), expected \(1, 1, 768\)"
    with pytest.raises(WeightsError, match=rf"vits16\.pth: {shapes}"):
        create_backbone("dino_vitb16", path)


def test_unreadable_or_absent_file_is_a_weights_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth: not a readable"):
        create_backbone("resnet50", garbage)
    with pytest.raises(WeightsError, match="absent.pth: checkpoint file not found"):
        create_backbone("resnet50", tmp_path / "absent.pth")
