"""SageMaker hosting handlers: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

dss_train.py re-exports them, so the training entry point is also the inference script
(``estimator.deploy()`` serves ``model.pth`` with them).

Requests (Content-Type):

    image/jpeg, image/png, application/x-image   raw bytes of one image (format decided by content)
    application/json                             ["<base64>", ...] or {"instances": ["<base64>", ...]}
                                                 (an item may also be {"b64": "<base64>"})

Response (Accept: application/json, */* or none; any other Accept is a ValueError): its shape
follows the request's, not the number of images:

    raw image bytes  {"probabilities": {"<class>": p, ...}, "predicted_class": "<class>"}
    a JSON list      [{"probabilities": {...}, "predicted_class": "..."}, ...] in request order,
                     a list also for a list of one (["<base64>"] or {"instances": ["<base64>"]})

The probabilities of one image sum to 1 (softmax, float64) and are keyed by every class name
stored in the model artifact, in the artifact's class order.

Handler signatures follow the SageMaker inference toolkit (sagemaker-inference, used by the
PyTorch serving containers): it counts each handler's parameters and, when there is one more
than it passes, passes its request ``context`` as the last argument. So every handler takes an
optional trailing ``context`` (unused except for a worker's ``gpu_id``) and nothing else optional.

Images are decoded and resized exactly as preprocess.py did for training
(``dss.images.decode_and_resize`` with the stored image size and resize policy from the model
artifact), then predicted by ``dss.models.prediction.predict_ensemble_probs`` (configured by ``spec_from_artifact``), the same computation that produces
the validation and test probabilities (``eval_transform`` to the network input size, mixed
precision on GPUs, test-time flip averaging when the model was trained with ``--tta true``).
The handler contract gives ``input_fn`` no access to the model, so ``input_fn`` only unpacks
the request into image byte strings (an ``ImageRequest``, which remembers whether the request
was a list) and checks they are JPEG/PNG; ``predict_fn``, which has
the model and therefore its stored preprocessing, decodes and resizes them.

Device: the GPU the model server assigned to this worker (``context.system_properties["gpu_id"]``)
or ``cuda`` when there is one, else the CPU. ``DSS_SERVE_DEVICE`` (e.g. ``cpu``, ``cuda:1``)
overrides that.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dss import images
from dss.models import loader, model as model_lib
from dss.models import prediction

DEVICE_ENV_VAR = "DSS_SERVE_DEVICE"
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_CONTENT_TYPE = "application/json"
ANY_CONTENT_TYPE = "*/*"
PREDICT_BATCH_SIZE = 256  # images per forward pass


@dataclass
class ServedModel:
    """What ``model_fn`` returns: the network(s), the device, and how they predict
    (``dss.models.prediction.spec_from_artifact`` of the artifact: the preprocessing they were
    trained with, TTA, temperature, normalisation)."""

    networks: list[torch.nn.Module]  # one, or the K members of a --folds K run (their probabilities are averaged)
    device: torch.device
    spec: prediction.PredictionSpec

    @property
    def class_names(self) -> list[str]:
        return self.spec.class_names

    @property
    def image_size(self) -> int:
        """Stored (decode) size, px: requests are resized as preprocess resized the training images."""
        return self.spec.stored_size

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def resize_policy(self) -> str:
        return self.spec.resize_policy

    @property
    def tta(self) -> bool:
        return self.spec.tta

    @property
    def temperature(self) -> float:
        return self.spec.temperature

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.spec.inference.amp_dtype

    @property
    def normalisation(self) -> loader.Normalisation:
        """The network's input mean/std, from the artifact."""
        return self.spec.inference.normalisation


@dataclass
class ImageRequest:
    """What ``input_fn`` returns: the request's images and whether they came as a JSON list."""

    images: list[bytes]  # JPEG/PNG byte strings, in request order
    is_list: bool  # a JSON list (even of one image): the response is a list too


def _media_type(value: str | None) -> str:
    """``"Image/JPEG; q=1"`` -> ``"image/jpeg"``; None -> ``""``."""
    return (value or "").split(";")[0].strip().lower()


def serving_device(context=None) -> torch.device:
    """``$DSS_SERVE_DEVICE`` when set; else the worker's GPU (``gpu_id`` from the model server's
    context) or ``cuda`` when torch sees a GPU; else the CPU."""
    requested = os.environ.get(DEVICE_ENV_VAR, "").strip()
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as exc:
            raise ValueError(f"{DEVICE_ENV_VAR}={requested!r} is not a torch device (try cpu, cuda or cuda:0)") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{DEVICE_ENV_VAR}={requested!r} but torch sees no GPU; use cpu or unset it")
        return device
    if not torch.cuda.is_available():
        return torch.device("cpu")
    properties = getattr(context, "system_properties", None)
    gpu_id = properties.get("gpu_id") if isinstance(properties, dict) else None
    return torch.device("cuda", int(gpu_id)) if gpu_id is not None else torch.device("cuda")


def model_fn(model_dir: str, context=None) -> ServedModel:
    """Load ``model_dir/model.pth`` (weights_only) in eval mode on ``serving_device(context)``."""
    device = serving_device(context)
    networks, artifact = model_lib.load_ensemble(Path(model_dir) / model_lib.MODEL_FILENAME, map_location=device)
    for network in networks:
        network.to(device).eval()
    return ServedModel(networks, device, prediction.spec_from_artifact(artifact, device, PREDICT_BATCH_SIZE))


def _check_image_bytes(data: bytes, where: str) -> bytes:
    if images.sniff_format(data) is None:
        raise ValueError(f"{where} is not a JPEG or PNG image ({len(data)} bytes, starting {data[:8]!r})")
    return data


def _decode_base64(item, where: str) -> bytes:
    if isinstance(item, dict):
        # {"b64": "..."} is the TensorFlow-serving spelling of a binary value; accept it too.
        item = item.get("b64", item.get("image"))
    if not isinstance(item, str):
        raise ValueError(f"{where} must be a base64 string, got {type(item).__name__}")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{where} is not valid base64 ({exc})") from exc


def input_fn(request_body: bytes | str, request_content_type: str, context=None) -> ImageRequest:
    """The request's JPEG/PNG byte strings; ``is_list`` for a JSON request (always a list).
    Bad requests raise ValueError (a 4xx).

    The toolkit hands application/json bodies over already decoded to ``str``; bytes work too."""
    media_type = _media_type(request_content_type)
    if media_type in IMAGE_CONTENT_TYPES:
        if isinstance(request_body, str):
            raise ValueError(f"{media_type} request body must be bytes, got text")
        return ImageRequest([_check_image_bytes(bytes(request_body), "request body")], is_list=False)
    if media_type == JSON_CONTENT_TYPE:
        try:
            payload = json.loads(request_body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"request body is not valid JSON ({exc})") from exc
        if isinstance(payload, dict):
            if "instances" not in payload:
                raise ValueError('JSON request must be a list of base64 images or {"instances": [...]}')
            payload = payload["instances"]
        if not isinstance(payload, list) or not payload:
            raise ValueError("JSON request must hold a non-empty list of base64 images")
        return ImageRequest([_check_image_bytes(_decode_base64(item, f"instance {index}"), f"instance {index}")
                             for index, item in enumerate(payload)], is_list=True)
    raise ValueError(f"unsupported content type {request_content_type!r}; send one of "
                     f"{', '.join(IMAGE_CONTENT_TYPES + (JSON_CONTENT_TYPE,))}")


def decode_batch(image_bytes: list[bytes], image_size: int, resize_policy: str) -> np.ndarray:
    """Decode and resize like preprocess.py: uint8 (N, image_size, image_size, 3)."""
    batch = np.empty((len(image_bytes), image_size, image_size, 3), dtype=np.uint8)
    for index, decoded in enumerate(images.decode_each(image_bytes, image_size, resize_policy)):
        if isinstance(decoded, images.ImageSkip):  # a bad request: the client sent an unusable image
            raise ValueError(f"image {index} cannot be used ({decoded.reason}): {decoded}") from decoded
        batch[index], _ = decoded
    return batch


def predict_fn(data: ImageRequest, model: ServedModel, context=None) -> dict:
    """Class probabilities for ``input_fn``'s images: ``{"class_names": [...], "probs": (N, C) float64,
    "is_list": bool}``, rows in request order, from the shared ``prediction.predict_ensemble_probs`` (the
    mean of the members); ``is_list`` is the request's, for ``output_fn``."""
    pixels = decode_batch(data.images, model.image_size, model.resize_policy)
    probs = prediction.predict_ensemble_probs(model.networks, loader.DeviceImages(pixels, model.device),
                                              model.spec.inference, model.temperature)
    return {"class_names": list(model.class_names), "probs": probs, "is_list": data.is_list}


def output_fn(prediction: dict, accept: str | None, context=None) -> str:
    """JSON text: a list of ``{"probabilities": {class: p, ...}, "predicted_class": name}`` in request
    order when the request was a list (``prediction["is_list"]``), even of one; else that one object.
    Accept other than JSON/any is a ValueError."""
    media_type = _media_type(accept)
    if media_type not in ("", JSON_CONTENT_TYPE, ANY_CONTENT_TYPE):
        raise ValueError(f"unsupported accept type {accept!r}; this endpoint answers {JSON_CONTENT_TYPE}")
    names = list(prediction["class_names"])
    probs = np.asarray(prediction["probs"], dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"prediction probs have shape {probs.shape}, expected (N, {len(names)}) for the class names")
    records = [{"probabilities": {name: float(p) for name, p in zip(names, row)},
                "predicted_class": names[int(np.argmax(row))]}
               for row in probs]
    if prediction["is_list"]:
        return json.dumps(records)
    if len(records) != 1:
        raise ValueError(f"a request that is not a list has one image, got {len(records)} predictions")
    return json.dumps(records[0])
