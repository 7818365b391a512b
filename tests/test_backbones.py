"""Every --arch: construction, head replacement, starting weights, normalisation, channels_last
training steps, torch.compile tracing, and the model artifact that remembers its arch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchvision.models
from torch import nn

from dss.models import backbones
from dss.models.loader import IMAGENET_MEAN, IMAGENET_STD, DeviceImages, Normalisation, eval_transform
from dss.models import prediction
from dss.models.model import (ARCHITECTURES, ModelArtifactError, WeightsError, build_model, load_model_artifact, model_arch,
                       save_model_artifact)
from tests.conftest import clean_env

PREPROCESSING = {"image_size": 32, "stored_image_size": 32, "resize_policy": "squash",
                 "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
CLASSES = ["antelope_duiker", "bird", "blank"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def head_of(model: nn.Module, arch: str) -> nn.Linear:
    return model.get_submodule(backbones.backbone(arch).head)


def test_the_list_holds_the_required_backbones_and_an_unknown_name_lists_them():
    assert {"resnet18", "resnet50", "convnext_tiny", "efficientnet_v2_s"} <= set(ARCHITECTURES)
    assert ARCHITECTURES[0] == backbones.DEFAULT_ARCH == "resnet18"
    with pytest.raises(ValueError, match="unknown architecture 'vgg11'; --arch takes one of resnet18, .*efficientnet_v2_s"):
        build_model(3, "none", "vgg11")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_arch_trains_channels_last_at_32_px_and_round_trips_through_the_artifact(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(len(CLASSES), "none", arch).to(memory_format=torch.channels_last)
    assert head_of(model, arch).out_features == len(CLASSES) and model_arch(model) == arch
    inputs = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss = nn.functional.cross_entropy(model(inputs), torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    save_model_artifact(tmp_path / "model.pth", model, CLASSES, PREPROCESSING, {})
    assert torch.load(tmp_path / "model.pth", weights_only=True)["arch"] == arch
    loaded, info = load_model_artifact(tmp_path / "model.pth")
    assert info["arch"] == arch and type(loaded) is type(model) and model_arch(loaded) == arch
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_local_torchvision_file_keeps_the_backbone_and_replaces_the_head(arch, tmp_path):
    torch.manual_seed(1)
    source = getattr(torchvision.models, arch)(weights=None)          # 1000 ImageNet classes
    path = tmp_path / f"{arch}.pth"
    torch.save(source.state_dict(), path)
    model = build_model(len(CLASSES), str(path), arch)
    head = backbones.head_prefix(arch)
    own, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(own[name], tensor) for name, tensor in theirs.items() if not name.startswith(head))
    assert head_of(model, arch).out_features == len(CLASSES)


def test_a_file_for_another_arch_is_refused_with_both_names(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"r18\.pth do not fit a torchvision resnet50"):
        build_model(3, str(tmp_path / "r18.pth"), "resnet50")
    save_model_artifact(tmp_path / "model.pth", build_model(3, "none", "efficientnet_b0"), CLASSES, PREPROCESSING, {})
    with pytest.raises(WeightsError, match="is a efficientnet_b0 model artifact; train with --arch efficientnet_b0"):
        build_model(3, str(tmp_path / "model.pth"), "resnet18")
    seeded = build_model(5, str(tmp_path / "model.pth"), "efficientnet_b0")
    assert model_arch(seeded) == "efficientnet_b0" and head_of(seeded, "efficientnet_b0").out_features == 5


def test_imagenet_download_failure_names_the_alternatives_for_every_arch(tmp_path):
    """No network (a proxy on a closed port fails fast): the same clear error for each arch."""
    script = textwrap.dedent("""
        from dss.models.model import ARCHITECTURES, WeightsError, build_model
        for arch in ARCHITECTURES:
            try:
                build_model(8, "imagenet", arch)
            except WeightsError as error:
                print("WEIGHTS_ERROR", error)
            else:
                print("LOADED", arch)
    """)
    env = clean_env(TORCH_HOME=str(tmp_path / "torch-home"), HTTPS_PROXY="http://127.0.0.1:9",
                    https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                    http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("WEIGHTS_ERROR", "LOADED"))]
    assert len(lines) == len(ARCHITECTURES), result.stdout + result.stderr
    for arch, line in zip(ARCHITECTURES, lines):
        assert line.startswith(f"WEIGHTS_ERROR could not download the ImageNet weights for {arch} ")
        assert f"local torchvision {arch} state dict" in line
        assert "--weights PATH" in line and "--weights none" in line
    assert not any((tmp_path / "torch-home").rglob("*.pth"))


def test_artifacts_without_an_arch_are_resnet18_and_unknown_archs_are_refused(tmp_path):
    save_model_artifact(tmp_path / "model.pth", build_model(3, "none"), CLASSES, PREPROCESSING, {})
    payload = torch.load(tmp_path / "model.pth", weights_only=True)
    del payload["arch"]                                  # written before --arch existed
    torch.save(payload, tmp_path / "old.pth")
    loaded, info = load_model_artifact(tmp_path / "old.pth")
    assert info["arch"] == "resnet18" and isinstance(loaded, torchvision.models.ResNet)
    payload["arch"] = "alexnet"
    torch.save(payload, tmp_path / "alien.pth")
    with pytest.raises(ModelArtifactError, match="arch 'alexnet' .*one of resnet18, "):
        load_model_artifact(tmp_path / "alien.pth")


def test_the_arch_is_found_through_compile_and_ddp_wrappers_and_can_be_given(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self, name, inner):
            super().__init__()
            self.add_module(name, inner)

    network = build_model(3, "none", "efficientnet_b0")
    assert model_arch(Wrapper("module", Wrapper("_orig_mod", network))) == "efficientnet_b0"
    assert model_arch(torchvision.models.resnet18()) == "resnet18"      # built elsewhere: the default
    plain = torchvision.models.efficientnet_b0(num_classes=3)
    save_model_artifact(tmp_path / "model.pth", plain, CLASSES, PREPROCESSING, {}, arch="efficientnet_b0")
    assert load_model_artifact(tmp_path / "model.pth")[1]["arch"] == "efficientnet_b0"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_normalisation_comes_from_the_weights_transforms(arch):
    mean, std = backbones.normalisation(arch)
    transforms = backbones.imagenet_weights(arch).transforms()
    assert mean == tuple(transforms.mean) and std == tuple(transforms.std)
    assert backbones.imagenet_input_size(arch) == (384 if arch == "efficientnet_v2_s" else 224)


def test_eval_transform_and_inference_use_the_given_normalisation():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    custom = Normalisation([0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    expected = (pixels / 255.0 - 0.5) / np.array([0.25, 0.5, 1.0])
    np.testing.assert_allclose(eval_transform(batch, 32, custom).permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)
    torch.testing.assert_close(eval_transform(batch, 32, Normalisation()), eval_transform(batch, 32))
    with pytest.raises(ValueError, match="3 means and 3 positive stds"):
        Normalisation((0.5, 0.5), (1.0, 1.0, 0.0))

    model = build_model(3, "none").eval()
    images = DeviceImages(pixels, torch.device("cpu"))
    probs = prediction.predict_probs(model, images, prediction.Inference(8, 32, normalisation=custom))
    with torch.no_grad():
        reference = torch.softmax(model(eval_transform(batch, 32, custom)).double(), dim=1).numpy()
    np.testing.assert_allclose(probs, reference, atol=1e-6)


# resnet18 (the default) in make test; every other arch in make test-all.
@pytest.mark.parametrize("arch", [arch if arch == backbones.DEFAULT_ARCH else pytest.param(arch, marks=pytest.mark.slow)
                                  for arch in ARCHITECTURES])
def test_each_arch_compiles_without_graph_breaks(arch):
    """torch.compile(fullgraph=True) captures every arch's forward in one graph (channels_last) and
    trains through it. The "eager" backend stops after graph capture, where an architecture can
    fail (graph breaks, unsupported ops); inductor's code generation is the same for every network
    and takes minutes on a shared 2-core CI machine (the GPU benchmark compiles for real)."""
    torch._dynamo.reset()
    model = build_model(3, "none", arch).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    inputs = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss = compiled(inputs).logsumexp(dim=1).mean()
    loss.backward()
    assert torch.isfinite(loss) and model_arch(compiled) == arch
