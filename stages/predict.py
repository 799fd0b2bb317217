"""Stage `predict`: the final segmenter labels the eval split at original resolution (optionally + dense CRF).

A DeepLabv3 segmenter runs on the images; a token head (`segment.model: token_head`) on their
cached patch tokens in features.h5, which must be the features it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import Provenance, open_artifact, write_predictions
from pipeline.config import Params
from pipeline.crf import crf_labels
from pipeline.errors import ArtifactError
from pipeline.index import read_index
from pipeline.probe import iter_probe_probs
from pipeline.progress import track
from pipeline.segmenter import predict_segmenter
from stages.segment import features_description, is_token_head, load_segmenter


def run(params: Params, index_path: Path, model_path: Path, features_path: Path, out: Path,
        name: str = "maskdistill") -> None:
    device = runtime.setup(params.base)
    index = read_index(index_path)
    ds = index.dataset
    model, state = load_segmenter(model_path, index.fingerprint)
    token_head = is_token_head(state)
    if token_head:
        _check_features(features_path, index.fingerprint, state["features"], model_path)
    else:
        model.to(device)
    c = int(state["num_classes"])
    eval_pos = index.positions(params.base.eval_split)
    methods = [name] + ([f"{name}_crf"] if params.crf.predict else [])
    inputs = {"index": str(index_path), "segmenter": str(model_path)}
    if token_head:
        inputs["features"] = str(features_path)
    prov = Provenance("predict", params.section_json("crf"), index.fingerprint, inputs)
    crf = params.crf

    def probabilities(block) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image, (C, H, W) probabilities) per eval image of `block`."""
        if not token_head:
            for i in block:
                image = ds.load_image(ds.samples[int(i)])
                with torch.inference_mode():
                    yield image, predict_segmenter(model, image, device=device)
            return
        with open_artifact(features_path, "useg.features", index.fingerprint) as f:
            tokens = f["patch_tokens"]
            for i in block:
                image = ds.load_image(ds.samples[int(i)])
                yield image, next(iter_probe_probs(model, tokens[int(i) : int(i) + 1], [image.shape[:2]]))

    def compute(block) -> Iterator[dict[str, np.ndarray]]:
        """Label maps per eval image of `block`: {method: labels}."""
        for image, probs in track(probabilities(block), "predict", total=len(block)):
            rec = {name: probs.argmax(0).astype(np.uint16)}
            if crf.predict:
                rec[f"{name}_crf"] = crf_labels(image, probs, crf).astype(np.uint16)
            yield rec

    records = dist.sharded(eval_pos, compute, out)
    if records is None:  # another rank writes the artifact
        return
    write_predictions(out, prov, [ds.samples[int(i)].id for i in eval_pos], eval_pos, {m: c for m in methods}, records)
    Console(stderr=True).print(f"predict: {len(eval_pos)} {params.base.eval_split} images, {c} classes -> {out}")


def _check_features(path: Path, fingerprint: str, expected: dict, model_path: Path) -> None:
    """The features must be those the token head was trained on (backbone, grid, input size)."""
    with open_artifact(path, "useg.features", fingerprint) as f:
        got = features_description(f)
    if got != expected:
        raise ArtifactError(f"{path}: features {got} differ from those {model_path} was trained on {expected}; "
                            "re-run `useg train-segmenter` after `useg features`")
