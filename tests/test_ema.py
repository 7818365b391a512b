"""Weight EMA: averages of known sequences, buffers, wrappers, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dss.train.ema import WeightEMA

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny() -> nn.Module:
    """A convolution and a BatchNorm: parameters, float buffers and an integer buffer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def set_all(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(value)


def test_constant_weights_stay_constant():
    model = tiny()
    ema = WeightEMA(model, decay=0.9)
    for _ in range(5):
        ema.update(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[name], tensor), name


def test_decay_zero_copies_the_latest_weights():
    model = tiny()
    ema = WeightEMA(model, decay=0.0)
    set_all(model, 3.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[name], tensor), name


def test_the_average_of_a_known_sequence_and_the_warm_up():
    model = tiny()
    set_all(model, 0.0)
    ema = WeightEMA(model, decay=0.5, warmup=False)
    for value in (1.0, 2.0, 4.0):
        set_all(model, value)
        ema.update(model)
    # avg = 0.5 * (0.5 * (0.5 * 0 + 0.5 * 1) + 0.5 * 2) + 0.5 * 4 = 2.625, buffers (BN stats) included.
    for name in ("0.weight", "1.bias", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(ema.module.state_dict()[name], torch.full_like(model.state_dict()[name], 2.625))
    assert ema.updates == 3

    warm = WeightEMA(model, decay=0.99)
    assert warm.current_decay() == pytest.approx(0.1)                          # (1 + 0) / (10 + 0)
    set_all(model, 10.0)
    warm.update(model)                                                         # 0.1 * 4 + 0.9 * 10
    torch.testing.assert_close(warm.module[0].weight, torch.full_like(model[0].weight, 9.4))
    warm.updates = 10_000
    assert warm.current_decay() == 0.99


def test_integer_buffers_are_copied_and_the_copy_is_frozen_in_eval_mode():
    model = tiny().train()
    ema = WeightEMA(model, decay=0.9)
    model(torch.randn(2, 3, 8, 8))          # BN updates its statistics and counts one batch
    ema.update(model)
    assert int(ema.module[1].num_batches_tracked) == 1
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_wrapped_models_are_averaged_by_their_plain_names():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    model = tiny()
    ema = WeightEMA(Wrapper(model), decay=0.0)
    assert set(ema.module.state_dict()) == set(model.state_dict())
    set_all(model, 2.0)
    ema.update(Wrapper(model))
    torch.testing.assert_close(ema.module[0].weight, model[0].weight)
    target = tiny()
    ema.copy_to(Wrapper(target))
    torch.testing.assert_close(target[0].weight, model[0].weight)


def test_state_dict_round_trip_continues_identically(tmp_path):
    model = tiny()
    ema = WeightEMA(model, decay=0.8)
    for value in (1.0, 2.0):
        set_all(model, value)
        ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    resumed = WeightEMA(tiny(), decay=0.8)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert resumed.updates == 2
    set_all(model, 5.0)
    ema.update(model)
    resumed.update(model)
    for name, tensor in ema.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], tensor), name


def test_decay_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        WeightEMA(tiny(), decay=1.0)


def test_a_real_network_trains_with_ema_and_the_average_is_saved_with_its_arch(tmp_path):
    """channels_last efficientnet_b0 (BatchNorm, stochastic depth): step, update, save the average."""
    from dss.models.model import build_model, load_model_artifact, save_model_artifact

    torch.manual_seed(0)
    network = build_model(3, "none", "efficientnet_b0").to(memory_format=torch.channels_last).train()
    ema = WeightEMA(network, decay=0.5, warmup=False)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3)
    before = ema.module.features[0][0].weight.clone()
    inputs = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    nn.functional.cross_entropy(network(inputs), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    ema.update(network)
    torch.testing.assert_close(ema.module.features[0][0].weight, 0.5 * before + 0.5 * network.features[0][0].weight)
    assert ema.module.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    preprocessing = {"image_size": 32, "stored_image_size": 32, "resize_policy": "squash",
                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    save_model_artifact(tmp_path / "model.pth", ema.module, ["a", "b", "c"], preprocessing, {})
    loaded, info = load_model_artifact(tmp_path / "model.pth")
    assert info["arch"] == "efficientnet_b0"
    with torch.no_grad():
        outputs = ema.module(inputs)
        assert torch.isfinite(outputs).all()
        torch.testing.assert_close(loaded(inputs), outputs)
