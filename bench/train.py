"""How fast is the training loop, and how close to the model's own limit? Prints a table of images/s.

    python bench/train.py                                   # CPU defaults: 32 px, batch 128
    python bench/train.py --steps 3 --num-images 256        # quick check that the benchmark works
    python bench/train.py --device cuda --image-size 224 --batch-size 256 --num-images 9866 --save
    python bench/train.py --compare-recipes --epochs 6 --image-size 64   # our recipe vs the prototype's

Rows (same model, batch, precision, memory format and image size; synthetic uint8 images):
  (a) ours: DeviceImages + GpuAugment + engine.train_one_epoch (one epoch of --steps batches, after
      a warm-up epoch)
  (b) model-only limit: the same forward/backward/optimizer/scheduler steps on one normalised
      batch already on the device, no data pipeline, no augmentation
  (c) naive: per-sample PIL transforms (RandomHorizontalFlip, ToTensor, Normalize) in a torch
      DataLoader with --naive-workers workers, fp32, contiguous, loss.item() every step (the prototype)
  predict: prediction.predict_probs in batches of --predict-batch-size vs one image at a time
Ratios (a)/(b) (how much of the model's limit the pipeline keeps) and (a)/(c).
``--compare-recipes``: train dss_train.py's defaults (read from its parser: AdamW, warm-up + cosine,
batched augmentation) and the prototype's recipe (Adam, flip only, plain cross-entropy, its best epoch
chosen on a random 25% split of the training images) for the same epochs on dss.demo.sample demo data,
both scored on the same site-grouped validation set. Timings on a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from dss.train import engine  # noqa: E402
from dss import fileio
from dss.cli import str2bool  # noqa: E402
from dss.models.loader import IMAGENET_MEAN, IMAGENET_STD, DeviceImages, GpuAugment, eval_transform  # noqa: E402
from dss.models.model import ARCHITECTURES, build_model  # noqa: E402
from dss.models import prediction

PRECISIONS = {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--image-size", type=int, default=32, help="stored and network input size, px")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per row")
    parser.add_argument("--num-images", type=int, default=0,
                        help="synthetic images on the device (default: batch-size x steps)")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="auto: bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, fp32 on CPU")
    parser.add_argument("--channels-last", type=str2bool, default=True)
    parser.add_argument("--compile", type=str2bool, default=False, help="torch.compile the model (rows a, b)")
    parser.add_argument("--arch", default="resnet18", choices=ARCHITECTURES,
                        help="network of rows (a), (b) and the prediction rows")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--naive-workers", type=int, default=0, help="DataLoader workers for row (c)")
    parser.add_argument("--naive-steps", type=int, default=0, help="timed steps for row (c) (default: --steps)")
    parser.add_argument("--predict-batch-size", type=int, default=512)
    parser.add_argument("--single-predictions", type=int, default=64, help="images predicted one at a time")
    parser.add_argument("--skip", default="", help="comma-separated rows to skip: a,b,c,predict")
    parser.add_argument("--compare-recipes", action="store_true", help="the recipe comparison instead of speed")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per recipe (--compare-recipes)")
    parser.add_argument("--demo-train", type=int, default=1200, help="demo training images (--compare-recipes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="also write the table under bench/results/")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    return prediction.select_precision(device) if name == "auto" else PRECISIONS[name]


def precision_name(amp_dtype, use_scaler) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype] + (" + GradScaler" if use_scaler
                                                                                      else "")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{platform.node()}: {cpu}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def synthetic_images(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (count, size, size, 3) smooth random images and labels in 0..7 (content does not matter for speed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(small, -(-size // 4), axis=1), -(-size // 4), axis=2)[:, :size, :size]
    return np.ascontiguousarray(images), rng.integers(0, 8, count).astype(np.int64)


def train_loop(args, device, amp_dtype, use_scaler, total_steps: int) -> engine.TrainLoop:
    """Model, optimizer, scheduler, scaler, loss and augmentation built the same way for rows (a) and (b)."""
    torch.manual_seed(args.seed)
    model = build_model(8, "none", args.arch).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model, "adamw", 1e-3, 0.05)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    return engine.TrainLoop(
        torch.compile(model) if args.compile else model, optimizer,
        engine.build_scheduler(optimizer, total_steps, total_steps // 10),
        torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None,
        nn.CrossEntropyLoss(label_smoothing=0.1), GpuAugment(args.image_size), generator, args.batch_size, amp_dtype,
        progress=False)


def measure_ours(images, labels, args, device, amp_dtype, use_scaler) -> float:
    """Row (a): images/s of engine.train_one_epoch over the device-resident images."""
    stored = DeviceImages(images, device)
    device_labels = torch.from_numpy(labels).to(device)
    loop = train_loop(args, device, amp_dtype, use_scaler, 1000)
    warm = DeviceImages(images[:args.batch_size * 2], device)
    engine.train_one_epoch(loop, warm, device_labels[:args.batch_size * 2], 0, 0)
    result = engine.train_one_epoch(loop, stored, device_labels, 1, 2)
    return result["train_images_per_s"]


def measure_model_only(images, labels, args, device, amp_dtype, use_scaler, steps: int) -> float:
    """Row (b): the same training steps (engine.train_step) on one normalised batch already on the device."""
    loop = train_loop(args, device, amp_dtype, use_scaler, 1000)
    batch = torch.from_numpy(images[:args.batch_size]).to(device).permute(0, 3, 1, 2)
    inputs = eval_transform(batch, args.image_size)
    if not args.channels_last:
        inputs = inputs.contiguous()
    targets = torch.from_numpy(labels[:args.batch_size]).to(device)
    for _ in range(2):
        engine.train_step(loop, inputs, targets)
    synchronize(device)
    started = time.perf_counter()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        total += engine.train_step(loop, inputs, targets)[1].detach()
    total.item()
    return steps * args.batch_size / (time.perf_counter() - started)


class _PilDataset(torch.utils.data.Dataset):
    """The prototype's pipeline: one PIL image per sample through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def measure_naive(images, labels, args, device, steps: int) -> float:
    """Row (c): per-sample PIL transforms in a DataLoader, fp32, contiguous, loss.item() per step."""
    torch.manual_seed(args.seed)
    model = build_model(8, "none", args.arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    count = min(len(images), args.batch_size * (steps + 1))
    loader = torch.utils.data.DataLoader(_PilDataset(images[:count], labels[:count]), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.naive_workers, drop_last=True,
                                         pin_memory=device.type == "cuda")
    model.train()
    started, seen, running_loss = None, 0, 0.0
    for batch_number, (inputs, targets) in enumerate(loader):
        if batch_number == 1:                  # the first batch is warm-up (worker start, first kernels)
            synchronize(device)
            started = time.perf_counter()
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        if batch_number >= 1:
            seen += inputs.shape[0]
    return seen / (time.perf_counter() - started)


def measure_predict(images, args, device, amp_dtype) -> tuple[float, float]:
    """(batched images/s via prediction.predict_probs, one-image-at-a-time images/s)."""
    torch.manual_seed(args.seed)
    model = build_model(8, "none", args.arch).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stored = DeviceImages(images, device)
    how = prediction.Inference(args.predict_batch_size, args.image_size, amp_dtype)
    prediction.predict_probs(model, DeviceImages(images[:args.predict_batch_size], device), how)
    started = time.perf_counter()
    prediction.predict_probs(model, stored, how)
    batched = len(stored) / (time.perf_counter() - started)

    single = min(args.single_predictions, len(stored))
    model.eval()
    with torch.inference_mode():
        started = None
        for index in range(single + 1):
            if index == 1:
                synchronize(device)
                started = time.perf_counter()
            inputs = eval_transform(stored.slice(index, index + 1), args.image_size)
            with prediction.autocast(device, amp_dtype):
                torch.softmax(model(inputs).float(), dim=1).cpu()
    one_at_a_time = single / (time.perf_counter() - started)
    return batched, one_at_a_time


def speed_rows(args, device) -> list[tuple[str, str]]:
    amp_dtype, use_scaler = resolve_precision(args.precision, device)
    num_images = args.num_images or args.batch_size * args.steps
    images, labels = synthetic_images(num_images, args.image_size, args.seed)
    steps = max(num_images // args.batch_size, 1)
    skip = set(filter(None, args.skip.split(",")))
    setting = (f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {precision_name(amp_dtype, use_scaler)}, "
               f"channels_last={args.channels_last}, compile={args.compile}")
    rows, rates = [], {}
    if "a" not in skip:
        rates["a"] = measure_ours(images, labels, args, device, amp_dtype, use_scaler)
        rows.append((f"(a) ours: DeviceImages + GpuAugment + train_one_epoch ({setting}, {num_images} images)",
                     f"{rates['a']:,.0f}"))
    if "b" not in skip:
        rates["b"] = measure_model_only(images, labels, args, device, amp_dtype, use_scaler, steps)
        rows.append((f"(b) model-only limit ({setting}, {steps} steps)", f"{rates['b']:,.0f}"))
    if "c" not in skip:
        naive_steps = args.naive_steps or steps
        rates["c"] = measure_naive(images, labels, args, device, naive_steps)
        rows.append((f"(c) naive: PIL transforms in a DataLoader, {args.naive_workers} workers, fp32, "
                     f"batch {args.batch_size}, {naive_steps} steps", f"{rates['c']:,.0f}"))
    if "a" in rates and "b" in rates:
        rows.append(("ratio (a)/(b)", f"{rates['a'] / rates['b']:.2f}"))
    if "a" in rates and "c" in rates:
        rows.append(("ratio (a)/(c)", f"{rates['a'] / rates['c']:.1f}"))
    if "predict" not in skip:
        batched, single = measure_predict(images, args, device, amp_dtype)
        rows.append((f"predict: predict_probs, batch {args.predict_batch_size} ({num_images} images)",
                     f"{batched:,.0f}"))
        rows.append((f"predict: one image at a time ({min(args.single_predictions, num_images)} images)",
                     f"{single:,.0f}"))
    return rows


@dataclass
class RecipeSetting:
    """What both recipes share in a comparison: epochs, sizes, seed, device, precision."""

    epochs: int
    image_size: int
    seed: int
    device: torch.device
    amp_dtype: torch.dtype | None = None
    arch: str = "resnet18"


@dataclass
class RecipeRun:
    """A trained recipe: the model holds the weights of the epoch the recipe itself chooses
    (``chosen_epoch``); ``history`` has per epoch its number and, when a ``val`` set was given, its
    ``val_logloss`` and ``val_acc``."""

    model: nn.Module
    chosen_epoch: int
    history: list[dict]


def _recipe_parts(recipe: str, model: nn.Module, images: np.ndarray, labels: np.ndarray, setting: RecipeSetting):
    """(images, labels, batch size, optimizer, scheduler, augmentation, loss, choice set or None) of a recipe."""
    if recipe == "ours":
        import dss_train

        # Exactly dss_train.py's defaults: optimizer, lr, weight decay, warm-up, smoothing, batch.
        defaults = dss_train.parse_args(["--weights", "none"])
        steps_per_epoch = max(len(images) // defaults.batch_size, 1)
        optimizer = engine.build_optimizer(model, defaults.optimizer, defaults.learning_rate, defaults.weight_decay)
        scheduler = engine.build_scheduler(optimizer, setting.epochs * steps_per_epoch,
                                           int(round(defaults.warmup_epochs * steps_per_epoch)))
        return (images, labels, defaults.batch_size, optimizer, scheduler, GpuAugment(setting.image_size),
                nn.CrossEntropyLoss(label_smoothing=defaults.label_smoothing), None)
    if recipe != "prototype":
        raise ValueError(f"recipe must be 'ours' or 'prototype', got {recipe!r}")
    # The prototype: a random 75/25 split of the training images chooses the best epoch (by accuracy);
    # Adam lr 1e-3, horizontal flips only, plain cross-entropy, batch 32.
    from dss.train.split import random_split

    choice_mask = random_split(labels, 0.25, setting.seed)
    choice = (DeviceImages(images[choice_mask], setting.device), labels[choice_mask])
    augment = GpuAugment(setting.image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), grey_p=0.0, brightness=0.0,
                         contrast=0.0)
    return (images[~choice_mask], labels[~choice_mask], 32, torch.optim.Adam(model.parameters(), lr=1e-3), None,
            augment, nn.CrossEntropyLoss(), choice)


def train_recipe(recipe: str, images: np.ndarray, labels: np.ndarray, num_classes: int, setting: RecipeSetting,
                 val: tuple[DeviceImages, np.ndarray] | None = None) -> RecipeRun:
    """Train ``recipe`` ('ours': dss_train.py's defaults; 'prototype': the prototype's recipe) from
    scratch on uint8 ``images`` (N, S, S, 3) and class indices ``labels``. Ours keeps the epoch with the
    lowest log loss on ``val`` (the last epoch without one), the prototype the epoch with the highest
    accuracy on its own random 25% split; the returned model holds that epoch's weights."""
    torch.manual_seed(setting.seed)
    model = build_model(num_classes, "none", setting.arch).to(setting.device)
    generator = torch.Generator(device=setting.device)
    generator.manual_seed(setting.seed)
    fit_images, fit_labels, batch_size, optimizer, scheduler, augment, loss_fn, choice = _recipe_parts(
        recipe, model, images, labels, setting)
    stored = DeviceImages(fit_images, setting.device)
    device_labels = torch.from_numpy(fit_labels).to(setting.device)
    loop = engine.TrainLoop(model, optimizer, scheduler, None, loss_fn, augment, generator, batch_size,
                            setting.amp_dtype, progress=False)
    how = prediction.Inference(256, setting.image_size, setting.amp_dtype)
    history, best_key, best_state, chosen_epoch, step = [], None, None, setting.epochs, 0
    for epoch in range(1, setting.epochs + 1):
        step += engine.train_one_epoch(loop, stored, device_labels, epoch, step)["steps"]
        scores = {"epoch": epoch}
        if val is not None:
            scores.update(engine.evaluate(model, val[0], val[1], nn.CrossEntropyLoss(), how))
        history.append(scores)
        if choice is not None:
            key = -engine.evaluate(model, choice[0], choice[1], loss_fn, how)["val_acc"]
        else:
            key = scores["val_logloss"] if val is not None else -epoch
        if best_key is None or key < best_key:
            best_key, chosen_epoch = key, epoch
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    model.load_state_dict(best_state)
    return RecipeRun(model, chosen_epoch, history)


def recipe_rows(args, device) -> list[tuple[str, str]]:
    """dss_train.py's default recipe vs the prototype's on demo data, both scored on the site-grouped
    validation split that dss_train.py itself makes (same val_fraction and seed)."""
    import dss_train
    from dss.data.dataset import load_split
    from dss.demo.sample import write_demo_dataset
    from dss.train.split import make_split

    defaults = dss_train.parse_args(["--weights", "none"])
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "demo", Path(tmp) / "pickles"
        write_demo_dataset(root, n_train=args.demo_train, n_test=1, seed=args.seed, scale=0.25)
        subprocess.run([sys.executable, str(REPO_ROOT / "preprocess.py"), "--input", str(root), "--output-dir",
                        str(out), "--image-size", str(args.image_size)], check=True, capture_output=True)
        data = load_split(out, "train")
    labels = np.asarray(data["labels"], dtype=np.int64)
    num_classes = len(data["class_names"])
    val_mask = make_split(labels, data["sites"], defaults.val_fraction, args.seed, "site")
    train_images, train_labels = data["images"][~val_mask], labels[~val_mask]
    val = (DeviceImages(data["images"][val_mask], device), labels[val_mask])
    setting = RecipeSetting(args.epochs, args.image_size, args.seed, device,
                            resolve_precision(args.precision, device)[0])
    ours = train_recipe("ours", train_images, train_labels, num_classes, setting, val)
    naive = train_recipe("prototype", train_images, train_labels, num_classes, setting, val)
    sizes = f"{len(train_labels)} train / {int(val_mask.sum())} site-grouped val images, {args.image_size} px"

    def cell(scores: dict) -> str:
        return f"logloss {scores['val_logloss']:.4f}, acc {scores['val_acc']:.3f}"

    return [
        (f"setting: {args.epochs} epochs each, from scratch, {sizes}", ""),
        (f"ours (dss_train.py defaults: {defaults.optimizer}, lr {defaults.learning_rate}, warm-up + cosine, "
         f"batched augmentation), last epoch", cell(ours.history[-1])),
        (f"ours, epoch {ours.chosen_epoch} chosen by val log loss (what dss_train.py keeps)",
         cell(ours.history[ours.chosen_epoch - 1])),
        ("prototype (Adam lr 1e-3, flip only, batch 32), last epoch", cell(naive.history[-1])),
        (f"prototype, epoch {naive.chosen_epoch} chosen by accuracy on its random 25% split",
         cell(naive.history[naive.chosen_epoch - 1])),
    ]


def format_table(title: str, rows: list[tuple[str, str]], device: torch.device) -> str:
    lines = [f"# {title}", "",
             f"date: {datetime.datetime.now().isoformat(timespec='seconds')}  ",
             f"machine: {machine_description(device)}  ",
             f"torch {torch.__version__}, python {platform.python_version()}, device {device}", "",
             "| what | result |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.compare_recipes:
        title, rows = "Training recipes on demo data (val log loss / accuracy, site-grouped val)", recipe_rows(args,
                                                                                                              device)
    else:
        title, rows = "Training throughput (images/s)", speed_rows(args, device)
    table = format_table(title, rows, device)
    print(table)
    if args.save:
        kind = "recipes" if args.compare_recipes else "train"
        path = REPO_ROOT / "bench" / "results" / f"{kind}-{device.type}-{datetime.date.today().isoformat()}.md"
        fileio.write_text(path, table)
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
