"""Dense CRF refinement (Krähenbühl & Koltun 2011) of segmenter probabilities.

MaskContrast's post-processing, reused by MaskDistill for its "+ CRF" results and for
CRF self-training: the segmenter's CRF-refined predictions on the training images become
the labels of the next training round. Settings are the official ones: 10 mean-field
iterations, a Gaussian kernel (sxy 1, compat 3) and a bilateral kernel (sxy 67, srgb 3,
compat 4), unaries -log(softmax). The official code passes the image in BGR order; with
one `srgb` for all three channels the colour distance, hence the result, is the same.

Uses `pydensecrf2` (module `pydensecrf`), Philipp Krähenbühl's C++ code.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
from pydensecrf.utils import unary_from_softmax

from pipeline.sections import CRFConfig  # noqa: F401  (the params section, torch-free; re-exported)
from pipeline.segmenter import predict_segmenter_batch


def dense_crf_probs(
    image: np.ndarray,
    probs: np.ndarray,
    iters: int = 10,
    gauss_sxy: float = 1.0,
    gauss_compat: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_compat: float = 4.0,
) -> np.ndarray:
    """Mean-field marginals (C, H, W) float32 of a dense CRF over `probs` (see `dense_crf`)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.require(image, dtype=np.uint8, requirements=["C", "W"]), compat=bilateral_compat
    )
    return np.asarray(crf.inference(iters), np.float32).reshape(c, h, w)


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    iters: int = 10,
    gauss_sxy: float = 1.0,
    gauss_compat: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_compat: float = 4.0,
) -> np.ndarray:
    """Refine class probabilities with a fully connected CRF and return the label map.

    Args:
        image: uint8 RGB (H, W, 3), the image the probabilities belong to.
        probs: float (C, H, W) softmax probabilities at the image's size, C <= 255.
        iters: Mean-field iterations.
        gauss_sxy: Spatial std (px) of the smoothness kernel.
        gauss_compat: Weight of the smoothness kernel (Potts).
        bilateral_sxy: Spatial std (px) of the appearance kernel.
        bilateral_srgb: Colour std of the appearance kernel.
        bilateral_compat: Weight of the appearance kernel (Potts).

    Returns:
        uint8 label map (H, W): argmax of the CRF marginals.

    Raises:
        ValueError: Wrong dtypes or shapes, or more than 255 classes.
    """
    if probs.shape[0] > 255:
        raise ValueError(f"at most 255 classes fit a uint8 label map (255 = ignore), got {probs.shape[0]}")
    q = dense_crf_probs(
        image, probs, iters, gauss_sxy, gauss_compat, bilateral_sxy, bilateral_srgb, bilateral_compat
    )
    return q.argmax(0).astype(np.uint8)


def crf_labels(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    """`dense_crf` with the kernel settings of `cfg`: a `CRFConfig`, or the `crf` params
    section, whose pipeline keys (`rounds`, `predict`) are not passed on."""
    return dense_crf(image, probs, cfg.iters, cfg.gauss_sxy, cfg.gauss_compat,
                     cfg.bilateral_sxy, cfg.bilateral_srgb, cfg.bilateral_compat)


def crf_self_training_labels(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    cfg: CRFConfig = CRFConfig(),
    size: tuple[int, int] | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> Iterator[np.ndarray]:
    """The next self-training round's labels: the segmenter's CRF-refined predictions.

    Args:
        model: The current segmenter (`pipeline.segmenter`).
        images: uint8 RGB training images.
        cfg: CRF settings (a `CRFConfig` or the `crf` params section; see `crf_labels`).
        size: Network input size, None = each image as is.
        batch_size: Images per forward pass.
        device: Where the model lives.

    Yields:
        One uint8 label map (H, W) per image, in order (no ignore pixels).
    """
    probs = predict_segmenter_batch(model, images, size, batch_size, device)
    for image, p in zip(images, probs):
        yield crf_labels(image, p, cfg)
