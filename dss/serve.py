"""SageMaker hosting handlers: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

dss_train.py re-exports them, so the training entry point is also the inference script
(``estimator.deploy()`` serves ``model.pth`` with them). Requests:

    image/jpeg, image/png, application/x-image   raw bytes of one image (format decided by content)
    application/json                             ["<base64>", ...] or {"instances": ["<base64>", ...]}

Response (application/json): for one image ``{"<class>": p, ..., "predicted_class": "<class>"}``,
for several a list of those, in request order.

Images are decoded and resized exactly as preprocess.py did for training
(``dss.images.decode_and_resize`` with the image size and resize policy stored in the model
artifact), then go through the same ``eval_transform`` as validation. The SageMaker handler
contract gives ``input_fn`` no access to the model, so ``input_fn`` only unpacks the request
into image byte strings and checks they are JPEG/PNG; ``predict_fn``, which has the model and
therefore its stored preprocessing config, decodes and resizes them.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dss import engine, images, loader, model as model_lib

MODEL_FILENAME = "model.pth"
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_CONTENT_TYPE = "application/json"
PREDICT_BATCH_SIZE = 256  # images per forward pass


@dataclass
class ServedModel:
    """What ``model_fn`` returns: the network plus the preprocessing it was trained with."""

    network: torch.nn.Module
    class_names: list[str]
    image_size: int  # stored (decode) size, px
    input_size: int  # network input size, px
    resize_policy: str
    device: torch.device
    amp_dtype: torch.dtype | None


def model_fn(model_dir: str, device: str = "auto") -> ServedModel:
    """Load ``model_dir/model.pth`` (weights_only) in eval mode on the GPU when there is one."""
    path = Path(model_dir) / MODEL_FILENAME
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    network, artifact = model_lib.load_model_artifact(path, map_location=torch_device)
    network.to(torch_device).eval()
    preprocessing = artifact["preprocessing"]
    amp_dtype, _ = engine.select_precision(torch_device)
    return ServedModel(
        network=network,
        class_names=list(artifact["class_names"]),
        image_size=int(preprocessing["stored_image_size"]),
        input_size=int(preprocessing["image_size"]),
        resize_policy=str(preprocessing.get("resize_policy", "squash")),
        device=torch_device,
        amp_dtype=amp_dtype,
    )


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


def input_fn(request_body: bytes | str, content_type: str) -> list[bytes]:
    """The request as a list of JPEG/PNG byte strings. Bad requests raise ValueError (a 4xx)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type in IMAGE_CONTENT_TYPES:
        if isinstance(request_body, str):
            raise ValueError(f"{media_type} request body must be bytes, got text")
        return [_check_image_bytes(bytes(request_body), "request body")]
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
        return [_check_image_bytes(_decode_base64(item, f"instance {index}"), f"instance {index}")
                for index, item in enumerate(payload)]
    raise ValueError(f"unsupported content type {content_type!r}; send one of "
                     f"{', '.join(IMAGE_CONTENT_TYPES + (JSON_CONTENT_TYPE,))}")


def decode_batch(image_bytes: list[bytes], image_size: int, resize_policy: str) -> np.ndarray:
    """Decode and resize like preprocess.py: uint8 (N, image_size, image_size, 3)."""
    batch = np.empty((len(image_bytes), image_size, image_size, 3), dtype=np.uint8)
    for index, data in enumerate(image_bytes):
        try:
            batch[index], _ = images.decode_and_resize(data, image_size, resize_policy)
        except images.ImageSkip as exc:
            raise ValueError(f"image {index} cannot be used ({exc.reason}): {exc}") from exc
    return batch


@torch.no_grad()
def predict_fn(batch: list[bytes] | np.ndarray, model: ServedModel) -> dict:
    """Class probabilities for the images: ``{"class_names": [...], "probs": (N, C) float64}``.

    ``batch`` is ``input_fn``'s list of image bytes, or an already decoded uint8 (N, S, S, 3) array.
    """
    if isinstance(batch, np.ndarray):
        pixels = batch
    else:
        pixels = decode_batch(batch, model.image_size, model.resize_policy)
    outputs = []
    for start in range(0, len(pixels), PREDICT_BATCH_SIZE):
        # (B, S, S, 3) uint8 -> (B, 3, S, S) view, as DeviceImages hands batches to eval_transform.
        chunk = torch.from_numpy(np.ascontiguousarray(pixels[start:start + PREDICT_BATCH_SIZE])).to(model.device)
        inputs = loader.eval_transform(chunk.permute(0, 3, 1, 2), model.input_size)
        with torch.autocast(model.device.type, dtype=model.amp_dtype, enabled=model.amp_dtype is not None):
            logits = model.network(inputs)
        outputs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    probs = np.concatenate(outputs).astype(np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    return {"class_names": list(model.class_names), "probs": probs}


def output_fn(prediction: dict, accept: str | None = JSON_CONTENT_TYPE) -> str:
    """JSON: one image -> ``{class: prob, ..., "predicted_class": name}``; several -> a list."""
    media_type = (accept or JSON_CONTENT_TYPE).split(";")[0].strip().lower()
    if media_type not in (JSON_CONTENT_TYPE, "*/*"):
        raise ValueError(f"unsupported accept type {accept!r}; this endpoint answers {JSON_CONTENT_TYPE}")
    names = prediction["class_names"]
    records = []
    for row in np.asarray(prediction["probs"]):
        record = {name: float(p) for name, p in zip(names, row)}
        record["predicted_class"] = names[int(np.argmax(row))]
        records.append(record)
    return json.dumps(records[0] if len(records) == 1 else records)
