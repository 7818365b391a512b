"""ResNet18 construction, starting weights, and the model artifact (weights_only loading, E8/F6)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from dss.models.model import ModelArtifactError, WeightsError, build_model, load_model_artifact, save_model_artifact
from tests.conftest import clean_env

PREPROCESSING = {"image_size": 32, "stored_image_size": 32, "resize_policy": "squash",
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CLASSES = ["antelope_duiker", "bird", "blank"]



pytestmark = pytest.mark.usefixtures("one_cpu_thread")

def test_build_model_random_init_has_the_class_count():
    model = build_model(5, "none")
    assert model.fc.out_features == 5
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_weights_from_a_local_torchvision_file_keep_the_backbone_and_replace_the_head(tmp_path):
    torch.manual_seed(1)
    source = resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model(3, str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (3, 512)


def test_weights_with_compile_prefix_and_matching_head_load_fully(tmp_path):
    source = resnet18(num_classes=3)
    path = tmp_path / "compiled.pth"
    torch.save({f"_orig_mod.{name}": tensor for name, tensor in source.state_dict().items()}, path)
    model = build_model(3, str(path))
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_wrapper_prefixes_are_stripped_in_any_nesting():
    """DDP around a compiled module names parameters module._orig_mod.*; the reverse nesting too."""
    from dss.models.model import strip_wrapper_prefixes

    tensor = torch.zeros(1)
    names = {"module._orig_mod.fc.weight": tensor, "_orig_mod.module.fc.bias": tensor, "conv1.weight": tensor}
    assert sorted(strip_wrapper_prefixes(names)) == ["conv1.weight", "fc.bias", "fc.weight"]
    assert list(names) == ["module._orig_mod.fc.weight", "_orig_mod.module.fc.bias", "conv1.weight"]  # not changed


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    state = resnet18(num_classes=10).state_dict()
    del state["layer2.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"partial\.pth.*missing 1 tensors.*layer2\.0\.conv1\.weight.*extra"):
        build_model(3, str(path))


def test_missing_weights_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found.*imagenet, none, or PATH"):
        build_model(3, str(tmp_path / "nope.pth"))


def test_imagenet_download_failure_names_the_alternatives(tmp_path):
    """No network (a proxy on a closed port makes it fail fast): a clear error, never a silent fallback."""
    script = textwrap.dedent("""
        from dss.models.model import WeightsError, build_model
        try:
            build_model(8, "imagenet")
        except WeightsError as error:
            print("WEIGHTS_ERROR", error)
        else:
            print("LOADED")
    """)
    env = clean_env(TORCH_HOME=str(tmp_path / "torch-home"), HTTPS_PROXY="http://127.0.0.1:9",
                    https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                    http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "WEIGHTS_ERROR" in result.stdout, result.stdout + result.stderr
    assert "--weights PATH" in result.stdout and "--weights none" in result.stdout
    assert not any((tmp_path / "torch-home").rglob("*.pth"))


def test_artifact_round_trip_is_plain_data(tmp_path):
    torch.manual_seed(0)
    model = build_model(len(CLASSES), "none")
    model.eval()
    path = tmp_path / "model.pth"
    save_model_artifact(path, model, CLASSES, PREPROCESSING,
                        {"learning_rate": np.float64(0.001), "epochs": 3, "scale": (0.35, 1.0), "out": tmp_path})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "dss-model" and raw["version"] == 1 and raw["arch"] == "resnet18"
    assert raw["hyperparameters"] == {"learning_rate": 0.001, "epochs": 3, "scale": [0.35, 1.0], "out": str(tmp_path)}
    loaded, info = load_model_artifact(path)
    assert info["class_names"] == CLASSES and info["preprocessing"] == PREPROCESSING
    assert "state_dict" not in info and not loaded.training
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs), rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_artifact_strips_the_torch_compile_prefix(tmp_path):
    class CompiledLike(nn.Module):        # what torch.compile's OptimizedModule looks like to state_dict()
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    model = build_model(3, "none")
    assert next(iter(CompiledLike(model).state_dict())).startswith("_orig_mod.")
    save_model_artifact(tmp_path / "model.pth", CompiledLike(model), CLASSES, PREPROCESSING, {})
    loaded, _ = load_model_artifact(tmp_path / "model.pth")
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


def test_artifact_refuses_values_that_are_not_plain_data(tmp_path):
    with pytest.raises(TypeError, match="hyperparameters.optimizer is a object"):
        save_model_artifact(tmp_path / "model.pth", build_model(3, "none"), CLASSES, PREPROCESSING,
                            {"optimizer": object()})
    with pytest.raises(ValueError, match="preprocessing is missing std"):
        save_model_artifact(tmp_path / "model.pth", build_model(3, "none"), CLASSES,
                            {k: v for k, v in PREPROCESSING.items() if k != "std"}, {})
    assert not (tmp_path / "model.pth").exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_even_when_env_forces_unsafe_loading(tmp_path, monkeypatch):
    """E8: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 must not switch our explicit weights_only=True off."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    torch.save({"format": "dss-model", "version": 1, "arch": "resnet18", "payload": _RunsCode(marker)}, path)
    with pytest.raises(ModelArtifactError, match=r"refusing to load .*model\.pth"):
        load_model_artifact(path)
    with pytest.raises(WeightsError, match=r"cannot read weights file .*model\.pth"):
        build_model(3, str(path))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_damaged_or_foreign_files_are_refused_with_the_file_name(tmp_path):
    good = tmp_path / "model.pth"
    save_model_artifact(good, build_model(3, "none"), CLASSES, PREPROCESSING, {})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ModelArtifactError, match="truncated.pth"):
        load_model_artifact(truncated)
    plain_state = tmp_path / "state.pth"
    torch.save(resnet18().state_dict(), plain_state)
    with pytest.raises(ModelArtifactError, match="state.pth is not a dss-model artifact"):
        load_model_artifact(plain_state)
    with pytest.raises(ModelArtifactError, match="model file not found"):
        load_model_artifact(tmp_path / "absent.pth")
    pickled = tmp_path / "pickled.pth"
    pickled.write_bytes(pickle.dumps({"format": "dss-model"}))
    with pytest.raises(ModelArtifactError, match="pickled.pth"):
        load_model_artifact(pickled)


def test_an_artifact_can_seed_a_new_model(tmp_path):
    previous = build_model(3, "none")
    save_model_artifact(tmp_path / "model.pth", previous, CLASSES, PREPROCESSING, {})
    model = build_model(5, str(tmp_path / "model.pth"))
    assert torch.equal(model.layer1[0].conv1.weight, previous.layer1[0].conv1.weight)
    assert model.fc.out_features == 5
