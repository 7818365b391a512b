"""Device-resident images, batch indices and batched augmentation (run on the CPU here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dss.models.loader import (IMAGENET_MEAN, IMAGENET_STD, DeviceImages, GpuAugment, eval_transform, num_train_batches,
                        train_batch_indices)

CPU = torch.device("cpu")



pytestmark = pytest.mark.usefixtures("one_cpu_thread")

def random_images(count: int = 12, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device=CPU)
    gen.manual_seed(seed)
    return gen


def augmented(augment: GpuAugment, batch: torch.Tensor, seed: int) -> torch.Tensor:
    """One batch through ``augment`` with the draws of a generator seeded with ``seed``."""
    return augment.apply(batch, augment.draw(len(batch), generator(seed)))


def normalise_reference(images_nhwc: np.ndarray) -> np.ndarray:
    """The ImageNet normalisation written out in numpy: (B, 3, H, W) float."""
    scaled = images_nhwc.astype(np.float64) / 255.0
    normalised = (scaled - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return normalised.transpose(0, 3, 1, 2)


def test_device_images_gather_matches_numpy():
    images = random_images()
    stored = DeviceImages(images, CPU)
    assert len(stored) == 12
    index = torch.tensor([3, 0, 11, 3])
    batch = stored.gather(index)
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 16, 16)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(batch.numpy(), images[[3, 0, 11, 3]].transpose(0, 3, 1, 2))
    assert np.array_equal(stored.slice(10, 20).numpy(), images[10:].transpose(0, 3, 1, 2))


def test_device_images_accepts_read_only_arrays_without_copy():
    images = random_images()
    images.setflags(write=False)
    stored = DeviceImages(images, CPU, resident=False)
    assert stored.resident  # on a CPU the host is the device
    assert stored.storage.data_ptr() == images.ctypes.data


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 8), np.uint8),
                                 np.zeros((2, 8, 8, 4), np.uint8), [[1, 2, 3]]])
def test_device_images_rejects_wrong_arrays(bad):
    with pytest.raises(ValueError, match=r"uint8 array of shape \(N, H, W, 3\)"):
        DeviceImages(bad, CPU)


def test_batch_indices_cover_a_permutation_and_drop_the_last_partial_batch():
    batches = list(train_batch_indices(10, 4, generator(0), CPU))
    assert [b.numel() for b in batches] == [4, 4] == [4] * num_train_batches(10, 4)
    assert len(set(torch.cat(batches).tolist())) == 8
    kept = list(train_batch_indices(10, 4, generator(0), CPU, drop_last=False))
    assert sorted(torch.cat(kept).tolist()) == list(range(10))
    assert num_train_batches(10, 4, drop_last=False) == 3


def test_batch_indices_keep_a_lone_partial_batch_and_are_seeded():
    only = list(train_batch_indices(3, 8, generator(0), CPU))
    assert len(only) == 1 and sorted(only[0].tolist()) == [0, 1, 2]
    first = torch.cat(list(train_batch_indices(50, 8, generator(5), CPU)))
    again = torch.cat(list(train_batch_indices(50, 8, generator(5), CPU)))
    other = torch.cat(list(train_batch_indices(50, 8, generator(6), CPU)))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_augment_shape_dtype_range_and_layout():
    batch = torch.from_numpy(random_images(8, 24)).permute(0, 3, 1, 2)
    out = augmented(GpuAugment(16), batch, 0)
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    low = (0.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    per_channel = out.permute(1, 0, 2, 3).reshape(3, -1)
    assert torch.all(per_channel.min(dim=1).values >= low - 1e-5)
    assert torch.all(per_channel.max(dim=1).values <= high + 1e-5)


def test_augment_is_deterministic_for_a_seed():
    batch = torch.from_numpy(random_images(8)).permute(0, 3, 1, 2)
    augment = GpuAugment(16)
    assert torch.equal(augmented(augment, batch, 1), augmented(augment, batch, 1))
    assert not torch.equal(augmented(augment, batch, 1), augmented(augment, batch, 2))


def test_identity_settings_reproduce_the_eval_transform_exactly():
    images = random_images(4)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    identity = GpuAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, grey_p=0.0, brightness=0.0,
                          contrast=0.0)
    out = augmented(identity, batch, 0)
    np.testing.assert_allclose(out.numpy(), normalise_reference(images), atol=1e-5)
    flipped = augmented(GpuAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, grey_p=0.0, brightness=0.0,
                                   contrast=0.0), batch, 0)
    np.testing.assert_allclose(flipped.numpy(), normalise_reference(images)[..., ::-1], atol=1e-5)


def test_centre_crop_of_a_quarter_area_is_the_upsampled_centre():
    images = random_images(2, 32)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    augment = GpuAugment(32, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_p=0.0, grey_p=0.0, brightness=0.0,
                         contrast=0.0)
    draws = torch.full((2, GpuAugment.NUM_DRAWS), 0.5)        # centred crop, half the side
    out = augment.apply(batch, draws)
    centre = batch[:, :, 8:24, 8:24].float()
    expected = F.interpolate(centre, size=(32, 32), mode="bilinear", align_corners=False)
    reference = eval_transform(expected.round().clamp(0, 255).to(torch.uint8).contiguous(), 32)
    # Border pixels differ: the crop samples real neighbours where interpolate clamps at its edge.
    torch.testing.assert_close(out[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=0.03, rtol=0)


def test_greyscale_brightness_and_contrast():
    images = random_images(3)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    draws = torch.full((3, GpuAugment.NUM_DRAWS), 0.5)
    draws[:, 5] = 0.0                                          # greyscale on
    grey = GpuAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, grey_p=1.0, brightness=0.0,
                      contrast=0.0).apply(batch, draws)
    pixels = grey * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-5, rtol=0)
    luma = (images.astype(np.float64) * [0.299, 0.587, 0.114]).sum(-1) / 255.0
    np.testing.assert_allclose(pixels[:, 2].numpy(), luma, atol=1e-5)

    dark = np.full((1, 16, 16, 3), 100, np.uint8)
    draws = torch.full((1, GpuAugment.NUM_DRAWS), 0.5)
    draws[0, 6] = 1.0                                          # brightness factor 1 + 0.3
    bright = GpuAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, grey_p=0.0, brightness=0.3,
                        contrast=0.3).apply(torch.from_numpy(dark).permute(0, 3, 1, 2), draws)
    np.testing.assert_allclose(bright.numpy(), normalise_reference(np.full_like(dark, 130)), atol=1e-5)


def test_eval_transform_normalises_and_resizes():
    images = random_images(3, 16)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    same = eval_transform(batch, 16)
    assert same.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(same.numpy(), normalise_reference(images), atol=1e-5)
    larger = eval_transform(batch, 24)
    assert larger.shape == (3, 3, 24, 24) and larger.is_contiguous(memory_format=torch.channels_last)
    flat = torch.full((1, 3, 16, 16), 77, dtype=torch.uint8)
    np.testing.assert_allclose(eval_transform(flat, 8).numpy(), normalise_reference(np.full((1, 8, 8, 3), 77)),
                               atol=1e-5)


NO_JITTER = dict(grey_p=0.0, brightness=0.0, contrast=0.0)


def full_frame_augments(out_size: int, flip_p: float) -> list[GpuAugment]:
    """Both resampling paths of GpuAugment set to the whole frame: the no-crop configuration
    (--crop-scale 1) and the random-crop one with draws that pick the whole frame (u_area = 1)."""
    return [GpuAugment(out_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=flip_p, **NO_JITTER),
            GpuAugment(out_size, scale=(0.6, 1.0), ratio=(1.0, 1.0), flip_p=flip_p, **NO_JITTER)]


def whole_frame_draws(count: int) -> torch.Tensor:
    draws = torch.full((count, GpuAugment.NUM_DRAWS), 0.5)
    draws[:, 0] = 1.0                                          # area share 1: the crop is the frame
    return draws


@pytest.mark.parametrize("stored, out", [(96, 64), (16, 16), (24, 40)])
def test_identity_augment_equals_eval_transform(stored, out):
    """With no flip, jitter or crop the training input is the evaluation/serving input."""
    batch = torch.from_numpy(random_images(3, stored, seed=4)).permute(0, 3, 1, 2)
    reference = eval_transform(batch, out)
    for flip_p, expected in ((0.0, reference), (1.0, reference.flip(3))):
        for augment in full_frame_augments(out, flip_p):
            out_images = augment.apply(batch, whole_frame_draws(3))
            assert out_images.shape == (3, 3, out, out) and out_images.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out_images, expected, atol=1e-4, rtol=0)


def checkerboard(size: int) -> torch.Tensor:
    """uint8 (1, 3, size, size) of alternating 0/255 pixels: all energy at the highest frequency."""
    board = ((np.add.outer(np.arange(size), np.arange(size)) % 2) * 255).astype(np.uint8)
    return torch.from_numpy(np.repeat(board[None, :, :, None], 3, axis=3)).permute(0, 3, 1, 2)


def test_training_and_serving_resample_a_fine_pattern_alike():
    """A 1-px checkerboard stored at 384 px, fed at 224 px: without antialiasing it aliases into
    coarse stripes; training must see the same smooth grey as evaluation and serving."""
    batch = checkerboard(384)
    reference = eval_transform(batch, 224)
    for augment in full_frame_augments(224, flip_p=0.0):
        torch.testing.assert_close(augment.apply(batch, whole_frame_draws(1)), reference, atol=1e-4, rtol=0)


def test_random_crops_are_resampled_with_the_eval_filter():
    """A crop of half the side (48 of 96 px at offset 24) to 16 px equals eval_transform of that crop,
    but at its border, where the crop's filter reads the real pixels beyond the crop."""
    batch = torch.from_numpy(random_images(2, 96, seed=5)).permute(0, 3, 1, 2)
    augment = GpuAugment(16, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_p=0.0, **NO_JITTER)
    out = augment.apply(batch, torch.full((2, GpuAugment.NUM_DRAWS), 0.5))
    reference = eval_transform(batch[:, :, 24:72, 24:72].contiguous(), 16)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=1e-4, rtol=0)
    # And a crop of a fine pattern is smooth, as eval_transform makes it (no aliasing in the crops).
    crops = GpuAugment(224, scale=(0.6, 1.0), **NO_JITTER).apply(checkerboard(384).expand(4, -1, -1, -1),
                                                                  GpuAugment(224).draw(4, generator(3)))
    smooth = eval_transform(checkerboard(384), 224)
    # Per-crop spread of the grey (normalised units): ~0.15 like eval_transform's, ~0.75 when aliased.
    assert crops.std(dim=(1, 2, 3)).max() < 1.5 * smooth.std()
