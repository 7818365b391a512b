"""Hosting handlers (dss.serve, re-exported by dss_train.py) on real JPEG/PNG bytes."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dss_train
from dss import engine, images, loader, serve
from dss import model as model_lib

CLASS_NAMES = ["antelope_duiker", "bird", "blank"]
STORED_SIZE = 24  # px, as preprocess stored the training images
INPUT_SIZE = 32   # px, network input (dss_train.py --image-size)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    network = model_lib.build_model(len(CLASS_NAMES), "none")
    preprocessing = {"image_size": INPUT_SIZE, "stored_image_size": STORED_SIZE, "resize_policy": "squash",
                     "mean": list(loader.IMAGENET_MEAN), "std": list(loader.IMAGENET_STD)}
    model_lib.save_model_artifact(folder / "model.pth", network.eval(), CLASS_NAMES, preprocessing, {"epochs": 1})
    return folder


@pytest.fixture(scope="module")
def served(model_dir):
    return serve.model_fn(str(model_dir), device="cpu")


def _encoded(fmt: str, seed: int, size=(96, 54)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_dss_train_reexports_the_handlers():
    assert dss_train.model_fn is serve.model_fn
    assert dss_train.input_fn is serve.input_fn
    assert dss_train.predict_fn is serve.predict_fn
    assert dss_train.output_fn is serve.output_fn


def test_model_fn_reads_the_stored_preprocessing(served):
    assert served.class_names == CLASS_NAMES
    assert (served.image_size, served.input_size, served.resize_policy) == (STORED_SIZE, INPUT_SIZE, "squash")
    assert not served.network.training


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/x-image", "image/png"])
def test_single_image_request_returns_class_probabilities(served, content_type):
    body = _encoded("PNG" if content_type == "image/png" else "JPEG", seed=1)
    batch = serve.input_fn(body, content_type)
    response = json.loads(serve.output_fn(serve.predict_fn(batch, served), "application/json"))
    assert set(response) == set(CLASS_NAMES) | {"predicted_class"}
    probs = np.array([response[name] for name in CLASS_NAMES])
    assert np.all(probs > 0) and abs(probs.sum() - 1.0) < 1e-9
    assert response["predicted_class"] == CLASS_NAMES[int(np.argmax(probs))]


def test_handlers_use_the_training_preprocessing(served):
    """The served probabilities equal the training code path: decode_and_resize at the stored
    size, then engine.predict_probs (eval_transform to the network size)."""
    body = _encoded("JPEG", seed=2)
    served_probs = serve.predict_fn(serve.input_fn(body, "image/jpeg"), served)["probs"]
    pixels, _ = images.decode_and_resize(body, STORED_SIZE, "squash")
    expected = engine.predict_probs(served.network, loader.DeviceImages(pixels[None], "cpu"), 8, INPUT_SIZE, None)
    np.testing.assert_allclose(served_probs, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wrap", [False, True])
def test_json_batch_of_base64_images_returns_a_list_in_order(served, wrap):
    bodies = [_encoded("JPEG", seed=3), _encoded("PNG", seed=4), _encoded("JPEG", seed=5, size=(40, 90))]
    encoded = [base64.b64encode(body).decode("ascii") for body in bodies]
    request = json.dumps({"instances": encoded} if wrap else encoded)
    response = json.loads(serve.output_fn(serve.predict_fn(serve.input_fn(request, "application/json"), served),
                                          "application/json"))
    assert isinstance(response, list) and len(response) == 3
    singles = [json.loads(serve.output_fn(serve.predict_fn(serve.input_fn(body, "image/jpeg"), served), None))
               for body in bodies]
    for got, single in zip(response, singles):
        assert got["predicted_class"] == single["predicted_class"]
        assert got[CLASS_NAMES[0]] == pytest.approx(single[CLASS_NAMES[0]], rel=1e-5)


@pytest.mark.parametrize("body, content_type, fragment", [
    (b"<html>Service Unavailable</html>", "image/jpeg", "not a JPEG or PNG"),
    (b"", "image/jpeg", "not a JPEG or PNG"),
    (b"{}", "application/json", "instances"),
    (b"not json", "application/json", "not valid JSON"),
    (json.dumps(["%%%not base64"]).encode(), "application/json", "not valid base64"),
    (b"\xff\xd8\xff" + b"x" * 10, "text/csv", "unsupported content type"),
])
def test_bad_requests_raise_value_error(body, content_type, fragment):
    with pytest.raises(ValueError, match=fragment):
        serve.input_fn(body, content_type)


def test_truncated_jpeg_is_a_clear_value_error(served):
    body = _encoded("JPEG", seed=6)[:60]  # JPEG magic, cut-off data
    batch = serve.input_fn(body, "image/jpeg")
    with pytest.raises(ValueError, match="image 0 cannot be used"):
        serve.predict_fn(batch, served)


def test_unsupported_accept_type(served):
    prediction = serve.predict_fn(serve.input_fn(_encoded("JPEG", seed=7), "image/jpeg"), served)
    with pytest.raises(ValueError, match="accept"):
        serve.output_fn(prediction, "text/csv")
