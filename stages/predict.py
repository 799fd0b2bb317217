"""Stage `predict`: the final segmenter labels the eval split at original resolution (optionally + dense CRF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from pipeline import runtime
from pipeline.artifacts import Provenance, RaggedWriter, string_dataset, write_artifact
from pipeline.config import Params
from pipeline.crf import dense_crf
from pipeline.index import read_index
from pipeline.progress import track
from pipeline.segmenter import predict_segmenter
from stages.segment import load_segmenter

SCHEMA = "useg.predictions"


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
    with write_artifact(out, SCHEMA, prov) as f:
        string_dataset(f, "ids", [ds.samples[int(i)].id for i in eval_pos])
        f.create_dataset("positions", data=eval_pos, track_times=False)
        f.attrs["methods"] = ",".join(methods)
        writers = {}
        for m in methods:
            g = f.create_group(m)
            g.attrs["num_clusters"] = c
            writers[m] = RaggedWriter(g, "labels", np.uint16, 2)
        for i in track(eval_pos, "predict"):
            image = ds.load_image(ds.samples[int(i)])
            with torch.inference_mode():
                probs = predict_segmenter(model, image, device=device)
            writers[name].append(probs.argmax(0).astype(np.uint16))
            if params.crf.predict:
                writers[f"{name}_crf"].append(dense_crf(image, probs, crf.iters, crf.gauss_sxy, crf.gauss_compat,
                                                        crf.bilateral_sxy, crf.bilateral_srgb, crf.bilateral_compat).astype(np.uint16))
        for w in writers.values():
            w.close()
    Console(stderr=True).print(f"predict: {len(eval_pos)} {params.base.eval_split} images, {c} classes -> {out}")
