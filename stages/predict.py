"""Stage `predict`: the final segmenter labels the eval split at original resolution (optionally + dense CRF)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import Provenance, write_predictions
from pipeline.config import Params
from pipeline.crf import crf_labels
from pipeline.index import read_index
from pipeline.progress import track
from pipeline.segmenter import predict_segmenter
from stages.segment import load_segmenter

def run(params: Params, index_path: Path, model_path: Path, out: Path, name: str = "maskdistill") -> None:
    device = runtime.setup(params.base)
    index = read_index(index_path)
    ds = index.dataset
    model, state = load_segmenter(model_path, index.fingerprint)
    model.to(device)
    c = int(state["num_classes"])
    eval_pos = index.positions(params.base.eval_split)
    methods = [name] + ([f"{name}_crf"] if params.crf.predict else [])
    prov = Provenance("predict", params.section_json("crf"), index.fingerprint,
                      {"index": str(index_path), "segmenter": str(model_path)})
    crf = params.crf

    def compute(block) -> Iterator[dict[str, np.ndarray]]:
        """Label maps per eval image of `block`: {method: labels}."""
        for i in track(block, "predict"):
            image = ds.load_image(ds.samples[int(i)])
            with torch.inference_mode():
                probs = predict_segmenter(model, image, device=device)
            rec = {name: probs.argmax(0).astype(np.uint16)}
            if crf.predict:
                rec[f"{name}_crf"] = crf_labels(image, probs, crf).astype(np.uint16)
            yield rec

    records = dist.sharded(eval_pos, compute, out)
    if records is None:  # another rank writes the artifact
        return
    write_predictions(out, prov, [ds.samples[int(i)].id for i in eval_pos], eval_pos, {m: c for m in methods}, records)
    Console(stderr=True).print(f"predict: {len(eval_pos)} {params.base.eval_split} images, {c} classes -> {out}")
