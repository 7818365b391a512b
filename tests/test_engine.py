"""The training loop, evaluation and prediction on tiny CPU problems (weights "none")."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dss.train import engine
from dss.models.prediction import Inference, predict_probs, select_precision
from dss.train.engine import (NonFiniteLossError, TrainLoop, build_optimizer, build_scheduler, class_weights_balanced,
                              evaluate, train_one_epoch)
from dss.models.loader import DeviceImages, GpuAugment, eval_transform
from dss.models.model import build_model
from dss.models import prediction

CPU = torch.device("cpu")
SIZE = 16



pytestmark = pytest.mark.usefixtures("one_cpu_thread")

def colour_problem(count: int = 48, seed: int = 0):
    """Three classes told apart by which colour channel is bright: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    images = rng.integers(0, 60, (count, SIZE, SIZE, 3)).astype(np.uint8)
    for index, label in enumerate(labels):
        images[index, :, :, label] += 180
    return images, labels.astype(np.int64)


def seeded_generator(seed: int = 0) -> torch.Generator:
    generator = torch.Generator(device=CPU)
    generator.manual_seed(seed)
    return generator


def make_run(lr: float = 3e-3, seed: int = 0, optimizer_name: str = "adamw"):
    torch.manual_seed(seed)
    model = build_model(3, "none").to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, optimizer_name, lr, 0.01)
    scheduler = build_scheduler(optimizer, total_steps=100, warmup_steps=2)
    return model, optimizer, scheduler


def run_epoch(model, optimizer, scheduler, stored, labels, generator, epoch=1, start_step=0, loss_fn=None,
              sync_every=16, **kwargs):
    augment = GpuAugment(SIZE, scale=(0.6, 1.0), grey_p=0.0)
    loop = TrainLoop(model, optimizer, scheduler, None, loss_fn or nn.CrossEntropyLoss(label_smoothing=0.1), augment,
                     generator, 16, sync_every=sync_every, progress=False)
    return train_one_epoch(loop, stored, torch.from_numpy(labels), epoch, start_step, **kwargs)


def at(batch_size: int, tta: bool = False) -> Inference:
    """Evaluation and prediction in float32 at the test image size."""
    return Inference(batch_size, SIZE, tta=tta)


def test_select_precision_cpu_and_gpu_generations(monkeypatch):
    assert select_precision(CPU) == (None, False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert select_precision(torch.device("cuda")) == (torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert select_precision(torch.device("cuda")) == (torch.float16, True)


def test_scheduler_warms_up_then_decays_to_zero():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    expected = [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert lrs[4:] == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_optimizers_and_weight_decay_groups():
    model = build_model(3, "none")
    adamw = build_optimizer(model, "adamw", 1e-3, 0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    decayed = {id(p) for p in adamw.param_groups[0]["params"]}
    assert id(model.conv1.weight) in decayed and id(model.bn1.weight) not in decayed
    assert adamw.param_groups[1]["weight_decay"] == 0.0
    assert isinstance(build_optimizer(model, "adam", 1e-3, 0.0), torch.optim.Adam)
    assert isinstance(build_optimizer(model, "sgd", 1e-3, 0.0), torch.optim.SGD)
    with pytest.raises(ValueError, match="adamw, adam, sgd"):
        build_optimizer(model, "lamb", 1e-3, 0.0)


def test_class_weights_balanced_formula():
    labels = np.array([0, 0, 0, 1, 2, 2])
    weights = class_weights_balanced(labels, 4)
    assert weights.dtype == torch.float32
    np.testing.assert_allclose(weights.numpy(), [6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2), 1.0], rtol=1e-6)


def test_training_reduces_the_loss():
    images, labels = colour_problem()
    stored = DeviceImages(images, CPU)
    model, optimizer, scheduler = make_run(lr=1e-3)
    generator = seeded_generator()
    before = evaluate(model, stored, labels, nn.CrossEntropyLoss(), at(64))["val_loss"]
    history = [run_epoch(model, optimizer, scheduler, stored, labels, generator, epoch=epoch, start_step=3 * epoch)
               for epoch in range(1, 6)]
    after = evaluate(model, stored, labels, nn.CrossEntropyLoss(), at(64))
    assert history[0]["steps"] == 3 and history[0]["images"] == 48 and not history[0]["stopped_early"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after["val_loss"] < 0.5 * before
    assert after["val_acc"] >= 0.9
    assert set(history[0]) >= {"train_loss", "train_acc", "images", "seconds", "train_images_per_s", "steps",
                               "stopped_early"}


def test_same_seed_same_weights_and_resume_mid_epoch_matches():
    images, labels = colour_problem()
    stored = DeviceImages(images, CPU)
    model, optimizer, scheduler = make_run()
    run_epoch(model, optimizer, scheduler, stored, labels, seeded_generator(4))

    # Interrupted after one step, state kept, then resumed with skip_batches from the epoch's generator state.
    model_b, optimizer_b, scheduler_b = make_run()
    first = run_epoch(model_b, optimizer_b, scheduler_b, stored, labels, seeded_generator(4),
                      stop_requested=lambda: True)
    assert first["stopped_early"] and first["steps"] == 1
    resumed_model = copy.deepcopy(model_b)
    resumed_optimizer = build_optimizer(resumed_model, "adamw", 3e-3, 0.01)
    # Build the scheduler before loading the optimizer state: building it resets the lr to step 0's.
    resumed_scheduler = build_scheduler(resumed_optimizer, total_steps=100, warmup_steps=2)
    resumed_optimizer.load_state_dict(optimizer_b.state_dict())
    resumed_scheduler.load_state_dict(scheduler_b.state_dict())
    rest = run_epoch(resumed_model, resumed_optimizer, resumed_scheduler, stored, labels, seeded_generator(4),
                     start_step=1, skip_batches=1)
    assert rest["steps"] == 2
    for (name, expected), actual in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


def test_poisoned_loss_reports_the_exact_step_without_syncing_every_step():
    images, labels = colour_problem()
    stored = DeviceImages(images, CPU)
    model, optimizer, scheduler = make_run()
    calls = {"n": 0}
    cross_entropy = nn.CrossEntropyLoss()

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = cross_entropy(logits, targets)
        return loss * float("nan") if calls["n"] == 2 else loss

    with pytest.raises(NonFiniteLossError, match="step 11 \\(epoch 4\\)") as caught:
        run_epoch(model, optimizer, scheduler, stored, labels, seeded_generator(), epoch=4, start_step=10,
                  loss_fn=poisoned, sync_every=16)
    assert caught.value.step == 11 and caught.value.epoch == 4


def test_huge_learning_rate_diverges_into_a_non_finite_loss_error():
    images, labels = colour_problem()
    stored = DeviceImages(images, CPU)
    model, optimizer, scheduler = make_run(lr=1e30, optimizer_name="sgd")
    generator = seeded_generator()
    with pytest.raises(NonFiniteLossError) as caught:
        for epoch in range(1, 6):
            run_epoch(model, optimizer, scheduler, stored, labels, generator, epoch=epoch, start_step=3 * (epoch - 1),
                      sync_every=1)
    assert 0 <= caught.value.step < 15


def test_predict_probs_rows_sum_to_one_batch_size_does_not_matter_and_tta_averages_flips():
    images, _ = colour_problem(20)
    stored = DeviceImages(images, CPU)
    torch.manual_seed(0)
    model = build_model(3, "none")
    model.train()
    probs = predict_probs(model, stored, at(7))
    assert model.training                     # mode restored
    assert probs.shape == (20, 3) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(predict_probs(model, stored, at(64)), probs, atol=1e-5)

    model.eval()
    with torch.no_grad():
        inputs = eval_transform(torch.from_numpy(images).permute(0, 3, 1, 2), SIZE)
        expected = 0.5 * (F.softmax(model(inputs).double(), 1) + F.softmax(model(inputs.flip(3)).double(), 1))
    tta = predict_probs(model, stored, at(8, tta=True))
    np.testing.assert_allclose(tta, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(tta.sum(axis=1), 1.0, atol=1e-12)
    assert not np.allclose(tta, probs, atol=1e-6)


@pytest.mark.parametrize("tta", [False, True])
def test_evaluate_reports_the_objective_and_the_plain_metric(tta):
    images, labels = colour_problem(24)
    stored = DeviceImages(images, CPU)
    torch.manual_seed(0)
    model = build_model(3, "none").eval()
    weights = torch.tensor([1.0, 2.0, 0.5])
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)
    result = evaluate(model, stored, labels, loss_fn, at(10, tta=tta))
    probs = result["probs"]
    log_probs = torch.from_numpy(np.log(probs)).float()
    if not tta:
        with torch.no_grad():
            logits = model(eval_transform(torch.from_numpy(images).permute(0, 3, 1, 2), SIZE))
        assert result["val_loss"] == pytest.approx(loss_fn(logits, torch.from_numpy(labels)).item(), rel=1e-5)
    # Written out: smoothed, weighted cross-entropy (PyTorch's definition) on the predicted probabilities.
    smooth = 0.1
    per_sample_weight = weights[labels]
    nll = -(log_probs[np.arange(24), labels] * per_sample_weight).sum() / per_sample_weight.sum()
    uniform = -(log_probs * weights).sum(dim=1).sum() / (3 * per_sample_weight.sum())
    assert result["val_loss"] == pytest.approx(((1 - smooth) * nll + smooth * uniform).item(), rel=1e-4)
    assert result["val_logloss"] == pytest.approx(-np.mean(np.log(probs[np.arange(24), labels])), rel=1e-9)
    assert result["val_acc"] == pytest.approx(np.mean(probs.argmax(1) == labels))


def test_evaluate_rejects_mismatched_labels():
    stored = DeviceImages(colour_problem(6)[0], CPU)
    with pytest.raises(ValueError, match=r"labels has shape \(5,\), expected \(6,\)"):
        evaluate(build_model(3, "none"), stored, np.zeros(5, np.int64), nn.CrossEntropyLoss(), at(4))


def test_modules_export_the_documented_names():
    for name in ("NonFiniteLossError", "train_one_epoch", "build_scheduler", "build_optimizer", "evaluate",
                 "class_weights_balanced", "TrainLoop"):
        assert callable(getattr(engine, name))
    for name in ("select_precision", "predict_probs", "predict_logits", "predict_ensemble_probs", "Inference",
                 "spec_from_artifact"):
        assert callable(getattr(prediction, name))


@pytest.mark.parametrize("tta", [False, True])
def test_predict_logits_softmax_to_the_predicted_probs_and_evaluate_returns_them(tta):
    """Temperature scaling is fitted on these logits: at T = 1 they give exactly the served probs
    (with TTA: the log of the averaged flip probabilities, not the averaged logits)."""
    images, labels = colour_problem(12)
    stored = DeviceImages(images, CPU)
    torch.manual_seed(0)
    model = build_model(3, "none").eval()
    logits = prediction.predict_logits(model, stored, at(5, tta=tta))
    probs = predict_probs(model, stored, at(5, tta=tta))
    assert logits.shape == (12, 3) and logits.dtype == np.float64
    np.testing.assert_allclose(F.softmax(torch.from_numpy(logits), dim=1).numpy(), probs, rtol=0, atol=1e-12)
    with torch.no_grad():
        inputs = eval_transform(torch.from_numpy(images).permute(0, 3, 1, 2), SIZE)
        raw = model(inputs).double()
        if tta:
            raw = torch.log(0.5 * (F.softmax(raw, 1) + F.softmax(model(inputs.flip(3)).double(), 1)))
    # Equal up to a per-row constant (log-probabilities), so equal after centring each row.
    centred = logits - logits.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(centred, (raw - raw.mean(dim=1, keepdim=True)).numpy(), atol=1e-5)
    result = evaluate(model, stored, labels, nn.CrossEntropyLoss(), at(5, tta=tta))
    np.testing.assert_allclose(result["logits"], logits, atol=1e-12)
    np.testing.assert_allclose(np.exp(result["logits"]), result["probs"], atol=1e-15)


def test_the_weight_average_follows_every_optimizer_step():
    from dss.train.ema import WeightEMA

    images, labels = colour_problem(48)
    model, optimizer, scheduler = make_run()
    initial = copy.deepcopy(model.state_dict())
    ema = WeightEMA(model, decay=0.9)
    loop = TrainLoop(model, optimizer, scheduler, None, nn.CrossEntropyLoss(), GpuAugment(SIZE), seeded_generator(),
                     16, progress=False, ema=ema)
    stats = train_one_epoch(loop, DeviceImages(images, CPU), torch.from_numpy(labels), 1, 0)
    assert ema.updates == stats["steps"] == 3
    averaged = ema.module.conv1.weight
    assert not torch.equal(averaged, initial["conv1.weight"]) and not torch.equal(averaged, model.conv1.weight)
