"""Hosting handlers (dss.predict.serve, re-exported by dss_train.py) on real JPEG/PNG bytes, called
directly and the way the SageMaker inference toolkit calls them."""

from __future__ import annotations

import base64
import inspect
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dss_train
from dss import images
from dss.models import loader, prediction
from dss.predict import serve
from dss.models import model as model_lib

CLASS_NAMES = ["antelope_duiker", "bird", "blank"]
STORED_SIZE = 24  # px, as preprocess stored the training images
INPUT_SIZE = 32   # px, network input (dss_train.py --image-size)


def _write_model(folder, hyperparameters: dict):
    torch.manual_seed(0)
    network = model_lib.build_model(len(CLASS_NAMES), "none")
    preprocessing = {"image_size": INPUT_SIZE, "stored_image_size": STORED_SIZE, "resize_policy": "squash",
                     "mean": list(loader.IMAGENET_MEAN), "std": list(loader.IMAGENET_STD)}
    model_lib.save_model_artifact(folder / model_lib.MODEL_FILENAME, network.eval(), CLASS_NAMES, preprocessing,
                                  hyperparameters)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _write_model(tmp_path_factory.mktemp("served"), {"epochs": 1, "tta": False})


@pytest.fixture(scope="module")
def served(model_dir):
    return serve.model_fn(str(model_dir))


class FakeContext:
    """What the model server hands the toolkit (mms/TorchServe ``Context``): only the parts
    the handlers could look at. A CPU worker has no ``gpu_id``."""

    def __init__(self, model_dir):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}


def call_like_the_toolkit(handler, *arguments, context):
    """sagemaker_inference.transformer.Transformer._run_handler_function's rule: call with the
    toolkit's arguments when the handler has that many parameters, append ``context`` when it
    has exactly one more, else TypeError."""
    num_parameters = len(inspect.signature(handler).parameters)
    if num_parameters == len(arguments):
        return handler(*arguments)
    if num_parameters == len(arguments) + 1:
        return handler(*arguments, context)
    raise TypeError(f"{handler.__name__} takes {num_parameters} arguments but {len(arguments)} were given")


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
    assert not served.networks[0].training
    assert served.tta is False
    assert served.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# (name, what the toolkit passes) for each handler: one more parameter than that receives its context.
TOOLKIT_ARGUMENTS = {
    "model_fn": ("model_dir",),
    "input_fn": ("request_body", "request_content_type"),
    "predict_fn": ("data", "model"),
    "output_fn": ("prediction", "accept"),
}


@pytest.mark.parametrize("name", sorted(TOOLKIT_ARGUMENTS))
def test_handler_signatures_fit_the_toolkit(name):
    parameters = list(inspect.signature(getattr(serve, name)).parameters.values())
    expected = TOOLKIT_ARGUMENTS[name]
    assert [p.name for p in parameters] == [*expected, "context"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)
    # The toolkit's own arguments are required; only the trailing context has a default.
    assert all(p.default is inspect.Parameter.empty for p in parameters[:-1])
    assert parameters[-1].default is None


def test_handlers_called_the_way_the_toolkit_calls_them(model_dir):
    """model_fn(model_dir, context), then per request input_fn/predict_fn/output_fn with the
    context as the extra argument; JSON bodies arrive decoded to str, as the toolkit does."""
    context = FakeContext(model_dir)
    model = call_like_the_toolkit(serve.model_fn, str(model_dir), context=context)
    assert isinstance(model, serve.ServedModel) and model.class_names == CLASS_NAMES
    bodies = [_encoded("JPEG", seed=11), _encoded("PNG", seed=12)]
    request = json.dumps([base64.b64encode(body).decode("ascii") for body in bodies])
    data = call_like_the_toolkit(serve.input_fn, request, "application/json", context=context)
    prediction = call_like_the_toolkit(serve.predict_fn, data, model, context=context)
    response = json.loads(call_like_the_toolkit(serve.output_fn, prediction, "application/json", context=context))
    assert [item["predicted_class"] for item in response] == [
        json.loads(serve.output_fn(serve.predict_fn(serve.input_fn(body, "image/jpeg"), model), None))["predicted_class"]
        for body in bodies]
    # Also explicitly with a context in every position the toolkit could use it.
    single = serve.output_fn(serve.predict_fn(serve.input_fn(bodies[0], "image/jpeg", context), model, context),
                             "application/json", context)
    single = json.loads(single)
    assert single["predicted_class"] == response[0]["predicted_class"]
    # float32 forward passes of a batch of 2 and of 1 image agree to rounding, not bit for bit.
    assert single["probabilities"] == pytest.approx(response[0]["probabilities"], rel=1e-5)


def test_device_environment_variable_overrides(model_dir, monkeypatch):
    monkeypatch.setenv(serve.DEVICE_ENV_VAR, "cpu")
    assert serve.model_fn(str(model_dir), FakeContext(model_dir)).device == torch.device("cpu")
    monkeypatch.setenv(serve.DEVICE_ENV_VAR, "not-a-device")
    with pytest.raises(ValueError, match=serve.DEVICE_ENV_VAR):
        serve.model_fn(str(model_dir))
    if not torch.cuda.is_available():
        monkeypatch.setenv(serve.DEVICE_ENV_VAR, "cuda")
        with pytest.raises(ValueError, match="no GPU"):
            serve.model_fn(str(model_dir))


def test_missing_model_file_names_the_path(tmp_path):
    with pytest.raises(model_lib.ModelArtifactError, match="model.pth"):
        serve.model_fn(str(tmp_path))


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/x-image", "image/png"])
def test_single_image_request_returns_class_probabilities(served, content_type):
    body = _encoded("PNG" if content_type == "image/png" else "JPEG", seed=1)
    batch = serve.input_fn(body, content_type)
    response = json.loads(serve.output_fn(serve.predict_fn(batch, served), "application/json"))
    assert set(response) == {"probabilities", "predicted_class"}
    assert list(response["probabilities"]) == CLASS_NAMES
    probs = np.array([response["probabilities"][name] for name in CLASS_NAMES])
    assert np.all(probs > 0) and abs(probs.sum() - 1.0) < 1e-9
    assert response["predicted_class"] == CLASS_NAMES[int(np.argmax(probs))]


def test_handlers_use_the_training_preprocessing(served):
    """The served probabilities equal the training code path: decode_and_resize at the stored
    size, then prediction.predict_probs (eval_transform to the network size)."""
    body = _encoded("JPEG", seed=2)
    served_probs = serve.predict_fn(serve.input_fn(body, "image/jpeg"), served)["probs"]
    pixels, _ = images.decode_and_resize(body, STORED_SIZE, "squash")
    expected = prediction.predict_probs(served.networks[0], loader.DeviceImages(pixels[None], served.device),
                                    prediction.Inference(8, INPUT_SIZE, served.amp_dtype))
    np.testing.assert_allclose(served_probs, expected, rtol=1e-5, atol=1e-7)


def test_model_trained_with_tta_is_served_with_tta(tmp_path):
    served_tta = serve.model_fn(str(_write_model(tmp_path, {"epochs": 1, "tta": True})))
    assert served_tta.tta is True
    body = _encoded("JPEG", seed=8)
    served_probs = serve.predict_fn(serve.input_fn(body, "image/jpeg"), served_tta)["probs"]
    pixels, _ = images.decode_and_resize(body, STORED_SIZE, "squash")
    device_images = loader.DeviceImages(pixels[None], served_tta.device)
    with_flip = prediction.predict_probs(served_tta.networks[0], device_images,
                                     prediction.Inference(8, INPUT_SIZE, served_tta.amp_dtype, tta=True))
    without_flip = prediction.predict_probs(served_tta.networks[0], device_images,
                                        prediction.Inference(8, INPUT_SIZE, served_tta.amp_dtype))
    np.testing.assert_allclose(served_probs, with_flip, rtol=1e-5, atol=1e-7)
    assert not np.allclose(with_flip, without_flip, rtol=1e-6, atol=1e-9)


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
        assert set(got) == {"probabilities", "predicted_class"}
        assert got["predicted_class"] == single["predicted_class"]
        for name in CLASS_NAMES:
            assert got["probabilities"][name] == pytest.approx(single["probabilities"][name], rel=1e-5)


def _b64(body: bytes) -> str:
    return base64.b64encode(body).decode("ascii")


JPEG_A, PNG_B = _encoded("JPEG", seed=21), _encoded("PNG", seed=22)


@pytest.mark.parametrize("body, content_type, expected_length", [
    (json.dumps([_b64(JPEG_A)]), "application/json", 1),                          # one-item list
    (json.dumps({"instances": [{"b64": _b64(JPEG_A)}]}), "application/json", 1),  # one-item instances
    (json.dumps([_b64(JPEG_A), _b64(PNG_B)]), "application/json", 2),              # two items
    (JPEG_A, "image/jpeg", None),                                                  # raw JPEG: an object
], ids=["one_item_list", "one_item_instances", "two_items", "raw_jpeg"])
def test_response_is_a_list_exactly_when_the_request_was_a_list(model_dir, body, content_type, expected_length):
    """The whole handler chain as the toolkit runs it, on a model.pth written by save_model_artifact."""
    context = FakeContext(model_dir)
    model = call_like_the_toolkit(serve.model_fn, str(model_dir), context=context)
    data = call_like_the_toolkit(serve.input_fn, body, content_type, context=context)
    prediction = call_like_the_toolkit(serve.predict_fn, data, model, context=context)
    response = json.loads(call_like_the_toolkit(serve.output_fn, prediction, "application/json", context=context))
    alone = json.loads(serve.output_fn(serve.predict_fn(serve.input_fn(JPEG_A, "image/jpeg"), model), None))
    assert set(alone) == {"probabilities", "predicted_class"}
    if expected_length is None:
        assert response == alone
        return
    assert isinstance(response, list) and len(response) == expected_length
    assert response[0]["predicted_class"] == alone["predicted_class"]
    assert response[0]["probabilities"] == pytest.approx(alone["probabilities"], rel=1e-5)


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


@pytest.mark.parametrize("accept", [None, "", "*/*", "application/json", "Application/JSON; charset=utf-8"])
def test_json_accept_types(served, accept):
    prediction = serve.predict_fn(serve.input_fn(_encoded("JPEG", seed=7), "image/jpeg"), served)
    response = json.loads(serve.output_fn(prediction, accept))
    assert set(response) == {"probabilities", "predicted_class"}


@pytest.mark.parametrize("accept", ["text/csv", "application/x-npy", "image/jpeg"])
def test_unsupported_accept_type(served, accept):
    prediction = serve.predict_fn(serve.input_fn(_encoded("JPEG", seed=7), "image/jpeg"), served)
    with pytest.raises(ValueError, match="unsupported accept type"):
        serve.output_fn(prediction, accept)


def test_stored_temperature_and_normalisation_are_applied(tmp_path):
    """model.pth's temperature and mean/std (--temperature-scaling, --arch) reach the served probabilities."""
    from dss.models import calibration

    folder = _write_model(tmp_path, {"epochs": 1, "tta": False, "temperature": 2.5})
    artifact = torch.load(folder / model_lib.MODEL_FILENAME, weights_only=True)
    artifact["preprocessing"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    torch.save(artifact, folder / model_lib.MODEL_FILENAME)
    served_t = serve.model_fn(str(folder))
    assert served_t.temperature == 2.5
    assert served_t.normalisation == loader.Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    body = _encoded("JPEG", seed=5)
    served_probs = serve.predict_fn(serve.input_fn(body, "image/jpeg"), served_t)["probs"]
    pixels, _ = images.decode_and_resize(body, STORED_SIZE, "squash")
    how = prediction.Inference(8, INPUT_SIZE, served_t.amp_dtype, normalisation=served_t.normalisation)
    logits = prediction.predict_logits(served_t.networks[0], loader.DeviceImages(pixels[None], served_t.device), how)
    np.testing.assert_allclose(served_probs, calibration.apply_temperature(logits, 2.5), rtol=0, atol=1e-12)
