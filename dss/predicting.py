"""``dss_train.py --predict-only``: the model in --model-dir classifies the test split of --data-dir.

The predictions go to a folder of their own: ``--output-dir``, by default
``<model dir>/predictions/<data dir's name>/`` (``outputs.predictions_dir``), so the training run's
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
from pathlib import Path

import numpy as np

from dss import checkpoint, dataset, engine, fileio, loader, outputs, stopping, threads, training, training_data
from dss import model as model_lib
from dss.cli import log

INFO_FILENAME = "predictions_info.json"
PREDICTION_FILES = (outputs.TEST_PREDICTIONS, outputs.PREDICTIONS, INFO_FILENAME)


class PredictionsExistError(FileExistsError):
    """The output folder holds predictions that another model or other data made."""


def made_by(model_path: Path, test: dict, data_dir: Path) -> dict:
    """What predictions_info.json records: the model file and the test split that made them."""
    with open(model_path, "rb") as handle:
        model_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    data_sha256 = checkpoint.dataset_fingerprint(test["images"], test["ids"], None, test["class_names"],
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


def predict_only(settings: training.Settings, stop: stopping.StopFlag | None = None) -> None:
    """No training: write the predictions of the model in the model dir for the data dir's test split
    (``stop``: a SIGTERM or Ctrl-C ends the run before the predictions are written)."""
    device = training.resolve_device(settings.device)
    threads.apply(settings.num_threads)
    model_path = settings.model_dir / model_lib.MODEL_FILENAME
    if not model_path.is_file():
        raise FileNotFoundError(f"--predict-only needs {model_path}; train first or point --model-dir at a trained model")
    networks, artifact = model_lib.load_ensemble(model_path, map_location=device)  # K members with --folds K
    class_names, preprocessing = list(artifact["class_names"]), artifact["preprocessing"]
    test = dataset.load_split(settings.data_dir, "test")
    trained = {"image_shape": (int(preprocessing["stored_image_size"]),) * 2,
               "resize_policy": preprocessing.get("resize_policy"), "class_names": class_names}
    training_data.check_agreement(test, trained, str(settings.data_dir), str(model_path), any_size=True)
    image_sizes = describe_image_sizes(int(test["images"].shape[1]), preprocessing, settings.data_dir)
    folder = settings.output_dir
    record = made_by(model_path, test, settings.data_dir)
    check_output_dir(folder, record, settings.overwrite)
    training.sweep_leftovers([folder])
    for network in networks:
        network.to(device).eval()
    amp_dtype, _ = engine.select_precision(device)
    # The training run's TTA unless --tta says otherwise: its temperature was fitted with it.
    tta = bool(artifact["hyperparameters"].get("tta", False)) if settings.tta is None else settings.tta
    inference = engine.Inference(settings.eval_batch_size, int(preprocessing["image_size"]), amp_dtype, tta,
                                 normalisation=model_lib.artifact_normalisation(artifact))
    temperature = model_lib.artifact_temperature(artifact)  # the training run's, so its probabilities are ours
    probs = engine.predict_ensemble_probs(networks, loader.DeviceImages(test["images"], device), inference,
                                          temperature)
    prior = np.asarray(preprocessing.get("class_prior") or np.full(len(class_names), 1.0 / len(class_names)))
    if stop is not None:
        stop.check("before writing the predictions", resumable=None)
    with fileio.StagedFiles() as stage:
        paths = (stage.path(folder / outputs.TEST_PREDICTIONS), stage.path(folder / outputs.PREDICTIONS))
        summary = outputs.write_test_predictions(paths, settings.data_dir, test, probs, prior, class_names)
        info = {**record, "tta": tta, "temperature": temperature, "members": len(networks),
                "image_sizes": image_sizes, **summary}
        fileio.write_json(stage.path(folder / INFO_FILENAME), info)
        stage.publish()
    log.info(f"predictions: {summary['num_images']} rows -> {folder / outputs.PREDICTIONS} "
             f"(and {outputs.TEST_PREDICTIONS}, the submission format)")
