"""``dss_train.py --predict-only``: the model in --model-dir classifies the test split of --data-dir.

The predictions go to a folder of their own: ``--output-dir``, by default
``<model dir>/predictions/<data dir's name>/`` (``results.predictions_dir``), so the training run's
submission beside model.pth and the predictions of other weeks stay as they are. The folder gets
test_predictions.csv (the submission format), predictions.csv (readable: site, predicted class)
and predictions_info.json (which model and which data made them), published together.

A folder that already holds predictions is written only when its predictions_info.json names the
same model (sha256 of model.pth) and the same data (fingerprint of the test split): a re-run
replaces its own outputs. Predictions of another model or other data, or prediction files without
a record (a training run's submission), are replaced only with ``--overwrite``.

The data may be stored at another size than the model's training data (``describe_image_sizes``):
the images are resized to the network input as in training. Another resize policy or other class
names cannot be made equal and are refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from dss import distributed, fileio, stopping, threads
from dss.cli import log
from dss.data import agreement, dataset
from dss.models import loader, prediction
from dss.models import model as model_lib
from dss.predict import results

INFO_FILENAME = "predictions_info.json"
PREDICTION_FILES = (results.TEST_PREDICTIONS, results.PREDICTIONS, INFO_FILENAME)


class PredictionsExistError(FileExistsError):
    """The output folder holds predictions that another model or other data made."""


def made_by(model_path: Path, test: dict, data_dir: Path) -> dict:
    """What predictions_info.json records: the model file and the test split that made them."""
    with open(model_path, "rb") as handle:
        model_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    data_sha256 = dataset.content_fingerprint(test["images"], test["ids"], None, test["class_names"],
                                                 test["sites"])
    return {"model": {"path": str(Path(model_path).resolve()), "sha256": model_sha256},
            "data": {"path": str(Path(data_dir).resolve()), "sha256": data_sha256, "num_images": len(test["ids"])}}


def _describe(record: dict) -> str:
    model, data = record["model"], record["data"]
    return (f"model {model['path']} (sha256 {model['sha256'][:12]}) on {data['path']} "
            f"({data['num_images']} images, data sha256 {data['sha256'][:12]})")


def check_output_dir(folder: Path, ours: dict, overwrite: bool) -> None:
    """Refuse (PredictionsExistError) to write into ``folder`` when it holds predictions that were
    not made by this model on this data, unless ``overwrite``."""
    present = [name for name in PREDICTION_FILES if (folder / name).exists()]
    if not present or overwrite:
        return
    try:
        recorded = json.loads((folder / INFO_FILENAME).read_text(encoding="utf-8"))
        theirs = {part: {key: recorded[part][key] for key in ours[part]} for part in ("model", "data")}
    except (OSError, ValueError, KeyError, TypeError):
        theirs = None
    advice = ("Pass --output-dir with a new folder (by default each data dir gets its own, "
              "<model dir>/predictions/<data dir name>/), or --overwrite to replace them.")
    if theirs is None:
        raise PredictionsExistError(
            f"{folder} already holds {', '.join(present)} without a record of what made them (a training run's "
            f"outputs?); --predict-only would replace them. {advice}")
    same_model = theirs["model"]["sha256"] == ours["model"]["sha256"]
    same_data = theirs["data"]["sha256"] == ours["data"]["sha256"]
    if same_model and same_data:
        return  # a re-run of the same model on the same data replaces its own predictions
    what = " and ".join(part for part, same in (("another model", same_model), ("other data", same_data)) if not same)
    raise PredictionsExistError(
        f"{folder} already holds predictions of {what}: made by {_describe(theirs)}; this run: "
        f"{_describe(ours)}. {advice}")


def describe_image_sizes(stored: int, preprocessing: dict, data_dir: Path) -> dict:
    """predictions_info.json's "image_sizes" (px): the data's ``stored`` size, the model's training
    data's (``model_stored``) and its ``network_input``. Every batch is resized to the network input
    with ``loader.eval_transform``'s antialiased bilinear resize, as the training run's evaluation was,
    so data stored at another size (the README's weekly --image-size 224) needs no re-run of
    preprocess.py; one log line says so, and a warning when the images are upsampled."""
    model_stored, network_input = int(preprocessing["stored_image_size"]), int(preprocessing["image_size"])
    sizes = {"stored": stored, "model_stored": model_stored, "network_input": network_input,
             "resized": stored != network_input, "upsampled": stored < network_input}
    if stored != model_stored:
        log.info(f"note: {data_dir} stores images at {stored} px, the model was trained on {model_stored} px: "
                 f"resizing them to its {network_input} px input (antialiased bilinear, as its evaluation did)")
    if stored != model_stored and sizes["upsampled"]:
        log.info(f"warning: the {stored} px images are upsampled to {network_input} px, so they hold less detail "
                 f"than the training images; preprocess.py --image-size {model_stored} gives the model what it saw")
    return sizes


@dataclass(frozen=True)
class PredictOptions:
    """What --predict-only takes from dss_train.py's settings (``of``): the folders, --overwrite,
    --device, --tta (None: the model's own), --eval-batch-size and --num-threads."""

    model_dir: Path
    data_dir: Path
    output_dir: Path
    overwrite: bool
    device: str
    tta: bool | None
    eval_batch_size: int
    num_threads: int | None

    @classmethod
    def of(cls, settings) -> PredictOptions:
        return cls(**{item.name: getattr(settings, item.name) for item in fields(cls)})


def predict_only(options: PredictOptions, stop: stopping.StopFlag | None = None) -> None:
    """No training: write the predictions of the model in the model dir for the data dir's test split
    (``stop``: a SIGTERM or Ctrl-C ends the run before the predictions are written)."""
    device = distributed.resolve_device(options.device)
    threads.apply(options.num_threads)
    model_path = options.model_dir / model_lib.MODEL_FILENAME
    if not model_path.is_file():
        raise FileNotFoundError(f"--predict-only needs {model_path}; train first or point --model-dir at a trained model")
    networks, artifact = model_lib.load_ensemble(model_path, map_location=device)  # K members with --folds K
    # The training run's TTA unless --tta says otherwise: its temperature was fitted with it.
    spec = prediction.spec_from_artifact(artifact, device, options.eval_batch_size, tta=options.tta)
    test = dataset.load_split(options.data_dir, "test")
    trained = {"image_shape": (spec.stored_size,) * 2, "resize_policy": spec.resize_policy,
               "class_names": spec.class_names}
    agreement.check_agreement(test, trained, str(options.data_dir), str(model_path), any_size=True)
    image_sizes = describe_image_sizes(int(test["images"].shape[1]), artifact["preprocessing"], options.data_dir)
    folder = options.output_dir
    record = made_by(model_path, test, options.data_dir)
    check_output_dir(folder, record, options.overwrite)
    fileio.sweep_leftovers([folder])
    for network in networks:
        network.to(device).eval()
    probs = prediction.predict_ensemble_probs(networks, loader.DeviceImages(test["images"], device), spec.inference,
                                              spec.temperature)
    prior = np.asarray(artifact["preprocessing"].get("class_prior") or np.full(len(spec.class_names),
                                                                              1.0 / len(spec.class_names)))
    if stop is not None:
        stop.check("before writing the predictions", resumable=None)
    with fileio.StagedFiles() as stage:
        paths = (stage.path(folder / results.TEST_PREDICTIONS), stage.path(folder / results.PREDICTIONS))
        summary = results.write_test_predictions(paths, options.data_dir, test, probs, prior, spec.class_names)
        info = {**record, "tta": spec.tta, "temperature": spec.temperature, "members": len(networks),
                "image_sizes": image_sizes, **summary}
        fileio.write_json(stage.path(folder / INFO_FILENAME), info)
        stage.publish()
    log.info(f"predictions: {summary['num_images']} rows -> {folder / results.PREDICTIONS} "
             f"(and {results.TEST_PREDICTIONS}, the submission format)")
