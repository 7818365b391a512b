"""Synthetic camera-trap frames in the Conser-vision layout: the embedded demo dataset.

    python -m dss.sample data/demo                                  # 1,200 train / 300 test, real frame sizes
    python -m dss.sample /tmp/tiny --train 160 --test 40 --scale 0.1   # tiny frames for tests
    python -m dss.sample /tmp/demo --seed 3                         # another draw of the same design

Writes, under DIR:
    train_features/ZJ000000.jpg ...   test_features/ZJ001200.jpg ...
    train_labels.csv      id + one one-hot column (0.0/1.0) per class, in CLASS_NAMES order
    train_features.csv    id, filepath, site          (test_features.csv likewise)

What the frames imitate (so the pipeline meets the same problems as on the real set):
- frame sizes 960x540, 640x360 and 360x240 (times ``scale``), one size per camera site;
- most frames are night infrared: grey pixels (R=G=B) stored as RGB JPEG; the rest are colour;
- the real class shares, and 24 train / 8 test camera sites with no site in both splits;
  each site has its own background (trees, ground, vegetation, brightness) and its own mix of
  classes, so a validation split that is not grouped by site over-estimates accuracy;
- every class but ``blank`` is a drawn animal with a class-specific silhouette and coat pattern
  (spotted long body for leopard, banded tail for civet/genet, tall dark bulk for hog, ...), at a
  random place, size, facing and brightness, with distractors (branches, rocks) and sensor noise.
  Animals stay visible after the whole frame is squashed to 64x64.

The same seed gives byte-identical files (seeded numpy Generators per site and per image, fixed
JPEG settings, nothing taken from the clock). Every JPEG carries a comment marker, which is how a
re-run recognises a folder it may overwrite; any other content in DIR makes it stop instead.
Only numpy and Pillow are used.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dss import fileio

CLASS_NAMES = (
    "antelope_duiker", "bird", "blank", "civet_genet", "hog", "leopard", "monkey_prosimian", "rodent",
)
# Shares of the real training set (16,488 images), in CLASS_NAMES order.
CLASS_SHARES = (0.150, 0.100, 0.134, 0.147, 0.059, 0.137, 0.151, 0.122)
# Camera frame sizes (width, height) of the real set and how often a site's camera has each.
FRAME_SIZES = ((960, 540), (640, 360), (360, 240))
FRAME_SIZE_WEIGHTS = (0.5, 0.3, 0.2)
MIN_SIDE_PX = 16
JPEG_QUALITY = 85
DEMO_MARKER = b"dss.sample synthetic demo frame"
DEFAULT_N_TRAIN = 1200
DEFAULT_N_TEST = 300
DEFAULT_TRAIN_SITES = 24
DEFAULT_TEST_SITES = 8
FIRST_SITE_NUMBER = 1

# How much more (>1) or less (<1) often a class is seen by day than its site's average:
# civets, genets and rodents are mostly nocturnal, monkeys and birds mostly diurnal.
_DAY_FACTOR = {
    "antelope_duiker": 1.2, "bird": 1.6, "blank": 1.0, "civet_genet": 0.2, "hog": 1.0,
    "leopard": 0.7, "monkey_prosimian": 1.8, "rodent": 0.5,
}
_LAYOUT_FILES = ("train_labels.csv", "train_features.csv", "test_features.csv")
_IMAGE_DIRS = {"train": "train_features", "test": "test_features"}
_ID_RE = re.compile(r"^ZJ\d{6}\.jpg$")


@dataclass(frozen=True)
class Site:
    """One camera: where its frames come from and how they look."""

    name: str
    split: str
    index: int              # position in the site list; seeds the background
    width: int              # frame size in px, after ``scale``
    height: int
    weight: float           # relative number of frames this camera contributes
    day_fraction: float     # share of colour (daylight) frames before the class factor
    class_affinity: tuple   # relative frequency of each class at this site
    night_gamma: float      # tone curve of the infrared frames
    night_gain: float


# --------------------------------------------------------------------------- planning
def scaled_frame_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """A real frame size times ``scale``, at least MIN_SIDE_PX a side."""
    width, height = size
    return max(MIN_SIDE_PX, round(width * scale)), max(MIN_SIDE_PX, round(height * scale))


def allocate_counts(total: int, shares) -> np.ndarray:
    """Split ``total`` into integer counts proportional to ``shares`` (largest remainder)."""
    shares = np.asarray(shares, dtype=np.float64)
    exact = total * shares / shares.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def make_sites(plan_rng: np.random.Generator, n_train_sites: int, n_test_sites: int, scale: float,
               frame_sizes=None) -> list[Site]:
    """Train sites then test sites, with distinct random names like ``S0117``.

    ``frame_sizes``: None for the real mix (FRAME_SIZES with FRAME_SIZE_WEIGHTS), else a list of
    (width, height) drawn with equal weights (a benchmark asks for 960x540 only)."""
    sizes, weights = (FRAME_SIZES, FRAME_SIZE_WEIGHTS) if frame_sizes is None else (
        list(frame_sizes), [1 / len(frame_sizes)] * len(frame_sizes))
    numbers = plan_rng.permutation(np.arange(FIRST_SITE_NUMBER, FIRST_SITE_NUMBER + 4 * (n_train_sites + n_test_sites)))
    sites = []
    for index in range(n_train_sites + n_test_sites):
        size = sizes[plan_rng.choice(len(sizes), p=weights)]
        width, height = scaled_frame_size(size, scale)
        sites.append(Site(
            name=f"S{numbers[index]:04d}",
            split="train" if index < n_train_sites else "test",
            index=index,
            width=width,
            height=height,
            weight=float(plan_rng.gamma(2.0, 1.0)),
            day_fraction=float(plan_rng.uniform(0.1, 0.45)),
            # gamma(2) per class: every class occurs everywhere, but mixes differ by site.
            class_affinity=tuple(float(a) for a in plan_rng.gamma(2.0, 1.0, size=len(CLASS_NAMES))),
            night_gamma=float(plan_rng.uniform(0.7, 1.0)),
            night_gain=float(plan_rng.uniform(0.8, 1.15)),
        ))
    return sites


def plan_split(plan_rng: np.random.Generator, sites: list[Site], n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Class index and site index per image: exact class shares, sites drawn by affinity."""
    counts = allocate_counts(n_images, CLASS_SHARES)
    labels = plan_rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), counts))
    weights = np.array([[site.weight * site.class_affinity[c] for c in range(len(CLASS_NAMES))] for site in sites])
    probabilities = weights / weights.sum(axis=0, keepdims=True)  # (sites, classes)
    site_choice = np.array([plan_rng.choice(len(sites), p=probabilities[:, label]) for label in labels], dtype=np.int64)
    return labels, site_choice


# --------------------------------------------------------------------------- backgrounds
def _smooth_field(rng: np.random.Generator, width: int, height: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in [-1, 1]-ish, (height, width) float32: a small random grid upsampled."""
    grid = rng.standard_normal((cells[1], cells[0])).astype(np.float32)
    image = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def render_background(seed: int, site: Site) -> np.ndarray:
    """The site's empty scene, (height, width, 3) uint8 colour: canopy, ground, trunks, leaves, grass."""
    rng = np.random.default_rng([seed, 2, site.index])
    width, height = site.width, site.height
    horizon = rng.uniform(0.3, 0.65) * height
    canopy = np.array([rng.uniform(30, 70), rng.uniform(60, 110), rng.uniform(30, 60)])
    ground = np.array([rng.uniform(90, 150), rng.uniform(75, 120), rng.uniform(45, 80)])
    rows = np.arange(height, dtype=np.float32)[:, None, None]
    # Canopy above the horizon, ground below, blended over a soft edge.
    blend = np.clip((rows - horizon) / (0.08 * height) + 0.5, 0.0, 1.0)
    depth = np.clip(rows / height, 0.0, 1.0)
    scene = (1 - blend) * canopy * (0.8 + 0.4 * depth) + blend * ground * (0.7 + 0.5 * depth)
    scene = np.broadcast_to(scene, (height, width, 3)).astype(np.float32)
    scene = scene + rng.uniform(12, 35) * _smooth_field(rng, width, height, (9, 5))[:, :, None]

    image = Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 5)):  # tree trunks, slightly slanted
        x = rng.uniform(0, width)
        half = rng.uniform(0.015, 0.06) * width
        slant = rng.uniform(-0.05, 0.05) * width
        bottom = rng.uniform(horizon, height)
        tone = rng.uniform(35, 90)
        color = tuple(int(tone * f) for f in (1.0, 0.85, 0.7))
        draw.polygon([(x - half + slant, 0), (x + half + slant, 0), (x + half * 1.3, bottom), (x - half * 1.3, bottom)], fill=color)
    leaf_scale = rng.uniform(0.008, 0.03) * width
    for _ in range(rng.integers(60, 400)):  # leaves and bushes, site-specific size and density
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = leaf_scale * rng.uniform(0.5, 1.5), leaf_scale * rng.uniform(0.3, 1.0)
        green = rng.uniform(0.6, 1.4)
        color = (int(canopy[0] * green), int(min(255, canopy[1] * green * 1.2)), int(canopy[2] * green))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=color)
    blade_width = max(1, round(0.003 * width))
    for _ in range(rng.integers(30, 250)):  # grass blades on the ground
        x, y = rng.uniform(0, width), rng.uniform(horizon, height)
        length = rng.uniform(0.03, 0.1) * height
        lean = rng.uniform(-0.4, 0.4) * length
        tone = rng.uniform(0.7, 1.3)
        draw.line([(x, y), (x + lean, y - length)], fill=(int(70 * tone), int(110 * tone), int(50 * tone)), width=blade_width)

    scene = np.asarray(image, dtype=np.float32)
    scene = scene * rng.uniform(0.7, 1.2) + rng.uniform(3, 10) * rng.standard_normal((height, width, 1), dtype=np.float32)
    return np.clip(scene, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- animals
class _Pose:
    """Animal-local coordinates -> frame pixels.

    Local units: ``u`` forward along the body, ``v`` downwards, both in body lengths; the body
    centre is (0, 0). ``direction`` mirrors the animal (+1 faces right), ``tilt`` rotates it (rad).
    """

    def __init__(self, x0: float, y0: float, length_px: float, direction: int, tilt: float):
        self.x0, self.y0, self.length = x0, y0, length_px
        self.direction = direction
        self.cos, self.sin = math.cos(tilt), math.sin(tilt)

    def point(self, u: float, v: float) -> tuple[float, float]:
        u = u * self.direction
        return (self.x0 + self.length * (u * self.cos - v * self.sin),
                self.y0 + self.length * (u * self.sin + v * self.cos))

    def width(self, relative: float) -> int:
        return max(1, round(relative * self.length))

    def ellipse(self, draw, u, v, ru, rv, fill, turn: float = 0.0, outline=None, line_width: float = 0.0):
        angles = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        c, s = math.cos(turn), math.sin(turn)
        points = [self.point(u + ru * math.cos(a) * c - rv * math.sin(a) * s,
                             v + ru * math.cos(a) * s + rv * math.sin(a) * c) for a in angles]
        draw.polygon(points, fill=fill, outline=outline, width=self.width(line_width) if outline else 1)

    def polygon(self, draw, points, fill):
        draw.polygon([self.point(u, v) for u, v in points], fill=fill)

    def line(self, draw, points, relative_width: float, fill):
        draw.line([self.point(u, v) for u, v in points], fill=fill, width=self.width(relative_width), joint="curve")

    def dot(self, draw, u, v, relative_radius: float, fill):
        x, y = self.point(u, v)
        r = max(0.6, relative_radius * self.length)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _tone(rgb, gain: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(channel * gain, 0, 255)) for channel in rgb)


def _legs(pose, draw, hips, length: float, width: float, fill, rng):
    for u in hips:
        knee = u + rng.uniform(-0.06, 0.06)
        pose.line(draw, [(u, 0.05), (knee, length * 0.55), (knee + rng.uniform(-0.05, 0.05), length)], width, fill)


def _draw_duiker(pose, draw, rng, gain):
    coat = _tone((rng.uniform(130, 175), rng.uniform(65, 95), rng.uniform(30, 55)), gain)
    dark = _tone((60, 35, 20), gain)
    _legs(pose, draw, (-0.32, -0.22, 0.22, 0.3), 0.5, 0.035, coat, rng)
    pose.ellipse(draw, 0, 0, 0.5, 0.19, coat)
    pose.line(draw, [(0.33, -0.05), (0.5, -0.3)], 0.1, coat)
    pose.ellipse(draw, 0.56, -0.33, 0.12, 0.065, coat, turn=0.5)
    pose.line(draw, [(0.5, -0.4), (0.44, -0.55)], 0.025, dark)
    pose.line(draw, [(0.54, -0.4), (0.49, -0.55)], 0.025, dark)
    pose.line(draw, [(-0.45, -0.12), (0.3, -0.16)], 0.04, dark)  # dorsal stripe
    pose.line(draw, [(-0.5, -0.05), (-0.58, 0.06)], 0.04, coat)


def _draw_bird(pose, draw, rng, gain):
    body = _tone((rng.uniform(35, 70),) * 2 + (rng.uniform(45, 80),), gain)
    light = _tone((225, 225, 230), gain)
    beak = _tone((200, 170, 90), gain)
    pose.line(draw, [(0.0, 0.2), (0.02, 0.55)], 0.03, beak)
    pose.line(draw, [(0.15, 0.2), (0.18, 0.55)], 0.03, beak)
    pose.polygon(draw, [(-0.4, -0.05), (-0.8, -0.3), (-0.78, 0.12)], body)  # tail fan
    pose.ellipse(draw, 0, 0, 0.5, 0.3, body)
    pose.ellipse(draw, -0.05, -0.05, 0.38, 0.18, _tone(body, 0.7), turn=-0.2)  # folded wing
    pose.dot(draw, 0.45, -0.32, 0.14, body)
    pose.polygon(draw, [(0.55, -0.36), (0.78, -0.3), (0.55, -0.26)], beak)
    if rng.random() < 0.7:  # guineafowl dots
        for _ in range(rng.integers(10, 22)):
            a, r = rng.uniform(0, 2 * np.pi), math.sqrt(rng.uniform(0, 1))
            pose.dot(draw, 0.42 * r * math.cos(a), 0.24 * r * math.sin(a), 0.03, light)


def _draw_civet(pose, draw, rng, gain):
    coat = _tone((rng.uniform(150, 190), rng.uniform(140, 175), rng.uniform(105, 135)), gain)
    dark = _tone((25, 22, 20), gain)
    _legs(pose, draw, (-0.3, -0.22, 0.25, 0.32), 0.28, 0.045, dark, rng)
    # Long tail with alternating dark and light rings: the genet/civet signature.
    bend = rng.uniform(-0.15, 0.15)
    points = [(-0.42 - 0.6 * t, 0.02 + bend * math.sin(np.pi * t) + 0.1 * t) for t in np.linspace(0, 1, 9)]
    for i in range(len(points) - 1):
        pose.line(draw, [points[i], points[i + 1]], 0.07, dark if i % 2 else coat)
    pose.ellipse(draw, 0, 0, 0.46, 0.13, coat)
    pose.polygon(draw, [(0.38, -0.1), (0.7, 0.02), (0.38, 0.1)], coat)
    pose.polygon(draw, [(0.42, -0.1), (0.47, -0.22), (0.52, -0.09)], dark)
    pose.line(draw, [(0.45, 0.0), (0.62, 0.02)], 0.04, dark)  # face mask
    for row_v in (-0.07, 0.0, 0.07):
        for u in np.arange(-0.35, 0.32, 0.11):
            pose.dot(draw, u + rng.uniform(-0.02, 0.02), row_v, 0.028, dark)


def _draw_hog(pose, draw, rng, gain):
    base = (rng.uniform(20, 45),) * 3 if rng.random() < 0.7 else (rng.uniform(140, 175), rng.uniform(60, 80), 30)
    coat = _tone(base, gain)
    _legs(pose, draw, (-0.32, -0.2, 0.2, 0.3), 0.48, 0.09, coat, rng)
    pose.ellipse(draw, 0, 0, 0.5, 0.3, coat)
    pose.polygon(draw, [(0.35, -0.2), (0.72, 0.02), (0.74, 0.17), (0.38, 0.22)], coat)
    pose.ellipse(draw, 0.74, 0.1, 0.03, 0.07, _tone(base, 1.6))  # snout disc
    pose.polygon(draw, [(0.38, -0.2), (0.42, -0.33), (0.48, -0.18)], coat)
    for u in np.linspace(-0.4, 0.35, 10):  # bristles along the back
        pose.line(draw, [(u, -0.27), (u - 0.04, -0.36)], 0.02, coat)


def _draw_leopard(pose, draw, rng, gain):
    coat = _tone((rng.uniform(190, 225), rng.uniform(150, 180), rng.uniform(70, 100)), gain)
    spot = _tone((30, 25, 15), gain)
    _legs(pose, draw, (-0.34, -0.24, 0.26, 0.34), 0.42, 0.065, coat, rng)
    lift = rng.uniform(-0.25, 0.1)
    tail = [(-0.46 - 0.5 * t, -0.02 + 0.2 * math.sin(np.pi * t) + lift * t * t) for t in np.linspace(0, 1, 8)]
    pose.line(draw, tail, 0.045, coat)
    pose.ellipse(draw, 0, 0, 0.48, 0.16, coat)
    pose.dot(draw, 0.5, -0.12, 0.11, coat)
    pose.dot(draw, 0.46, -0.22, 0.035, coat)
    pose.dot(draw, 0.56, -0.22, 0.035, coat)
    for _ in range(rng.integers(22, 36)):  # rosettes
        a, r = rng.uniform(0, 2 * np.pi), math.sqrt(rng.uniform(0, 1))
        pose.ellipse(draw, 0.42 * r * math.cos(a), 0.13 * r * math.sin(a), 0.03, 0.03, None,
                     outline=spot, line_width=0.012)
    for u, v in tail[1::2]:
        pose.dot(draw, u, v, 0.02, spot)


def _draw_monkey(pose, draw, rng, gain):
    fur = _tone((rng.uniform(20, 45),) * 3 if rng.random() < 0.6 else (rng.uniform(90, 120), rng.uniform(80, 100), 70), gain)
    pale = _tone((215, 210, 200), gain)
    pose.line(draw, [(-0.1, 0.25), (-0.35, 0.5), (-0.45, 0.85), (-0.3, 1.0)], 0.04, fur)  # long tail
    pose.line(draw, [(0.05, 0.2), (0.28, 0.35), (0.15, 0.55)], 0.08, fur)
    pose.line(draw, [(-0.05, 0.2), (-0.18, 0.4), (-0.1, 0.56)], 0.08, fur)
    pose.line(draw, [(0.08, -0.2), (0.32, -0.02), (0.42, -0.2)], 0.07, fur)  # arm reaching up
    pose.line(draw, [(-0.05, -0.2), (-0.22, 0.05)], 0.07, fur)
    pose.ellipse(draw, 0, 0, 0.16, 0.3, fur)
    if rng.random() < 0.6:  # colobus mantle
        pose.ellipse(draw, -0.08, -0.05, 0.06, 0.2, pale)
    pose.dot(draw, 0.05, -0.42, 0.13, fur)
    pose.dot(draw, 0.1, -0.41, 0.07, pale)


def _draw_rodent(pose, draw, rng, gain):
    coat = _tone((rng.uniform(110, 150), rng.uniform(90, 120), rng.uniform(65, 90)), gain)
    tail = _tone((rng.uniform(150, 190),) * 3, gain)
    curl = rng.uniform(-0.2, 0.2)
    pose.line(draw, [(-0.3, 0.1), (-0.7, 0.25), (-1.05, 0.15 + curl), (-1.25, -0.05 + curl)], 0.045, tail)
    pose.ellipse(draw, 0, 0, 0.36, 0.22, coat)
    pose.ellipse(draw, 0.36, 0.02, 0.16, 0.11, coat, turn=0.3)
    pose.dot(draw, 0.28, -0.17, 0.08, _tone(coat, 1.3))
    pose.dot(draw, 0.5, 0.06, 0.03, _tone(coat, 0.4))
    pose.line(draw, [(0.1, 0.18), (0.15, 0.3)], 0.04, coat)
    pose.line(draw, [(-0.2, 0.18), (-0.22, 0.3)], 0.04, coat)


# Per class: drawing function, body length range in frame heights, body-centre height range
# (fraction of frame height), eye position in local units (None: no eyes).
_ANIMALS = {
    "antelope_duiker": (_draw_duiker, (0.55, 0.8), (0.45, 0.75), (0.62, -0.35)),
    "bird": (_draw_bird, (0.32, 0.45), (0.6, 0.85), (0.5, -0.34)),
    "civet_genet": (_draw_civet, (0.6, 0.85), (0.6, 0.85), (0.55, -0.03)),
    "hog": (_draw_hog, (0.6, 0.85), (0.5, 0.75), (0.55, -0.08)),
    "leopard": (_draw_leopard, (0.75, 1.0), (0.5, 0.75), (0.55, -0.14)),
    "monkey_prosimian": (_draw_monkey, (0.45, 0.62), (0.3, 0.6), (0.1, -0.44)),
    "rodent": (_draw_rodent, (0.32, 0.45), (0.7, 0.9), (0.42, -0.02)),
}


def _draw_distractor(draw, rng, width: int, height: int):
    """Something that is not an animal: a fallen branch, a pale rock or a bright leaf cluster."""
    kind = rng.integers(3)
    if kind == 0:
        x, y = rng.uniform(0, width), rng.uniform(0.5, 1.0) * height
        length, angle = rng.uniform(0.3, 0.7) * width, rng.uniform(-0.4, 0.4)
        tone = rng.uniform(40, 110)
        draw.line([(x, y), (x + length * math.cos(angle), y + length * math.sin(angle))],
                  fill=(int(tone), int(tone * 0.85), int(tone * 0.7)), width=max(1, round(rng.uniform(0.01, 0.03) * height)))
    elif kind == 1:
        cx, cy = rng.uniform(0, width), rng.uniform(0.6, 1.0) * height
        rx, ry = rng.uniform(0.06, 0.15) * height, rng.uniform(0.04, 0.09) * height
        tone = rng.uniform(110, 180)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=(int(tone),) * 3)
    else:
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        for _ in range(rng.integers(5, 15)):
            r = rng.uniform(0.02, 0.05) * height
            x, y = cx + rng.normal(0, 0.06 * height), cy + rng.normal(0, 0.06 * height)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(int(rng.uniform(90, 150)), int(rng.uniform(150, 210)), 70))


def draw_animal(draw: ImageDraw.ImageDraw, class_name: str, width: int, height: int,
                rng: np.random.Generator, is_day: bool) -> None:
    """Draw one ``class_name`` animal at a random place, size, facing and brightness."""
    draw_body, length_range, centre_range, eye = _ANIMALS[class_name]
    length = rng.uniform(*length_range) * height * rng.uniform(0.85, 1.2)
    pose = _Pose(x0=rng.uniform(0.12, 0.88) * width, y0=rng.uniform(*centre_range) * height,
                 length_px=length, direction=int(rng.choice((-1, 1))), tilt=rng.uniform(-0.15, 0.15))
    draw_body(pose, draw, rng, rng.uniform(0.7, 1.3))
    if not is_day and rng.random() < 0.7:  # infrared eye-shine
        pose.dot(draw, eye[0], eye[1], 0.025, (250, 250, 250))


def render_frame(site: Site, background: np.ndarray, class_name: str, rng: np.random.Generator,
                 is_day: bool) -> Image.Image:
    """One RGB frame of ``site`` showing ``class_name`` (no animal for ``blank``).

    Night frames are converted to grey (R=G=B) after drawing, with the infrared tone curve,
    a flash vignette and per-pixel noise shared by all three channels.
    """
    height, width = background.shape[:2]
    frame = Image.fromarray(background)
    draw = ImageDraw.Draw(frame)
    if rng.random() < (0.6 if class_name == "blank" else 0.3):
        _draw_distractor(draw, rng, width, height)
    if class_name != "blank":
        draw_animal(draw, class_name, width, height, rng, is_day)
    if rng.random() < 0.15:  # motion or focus blur
        frame = frame.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 2.0) * height / 540))

    exposure = rng.uniform(0.8, 1.2)
    if is_day:
        pixels = np.asarray(frame, dtype=np.float32) * exposure
        pixels += rng.uniform(2, 5) * _sensor_noise(rng, width, height, 3)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    # Infrared: luminance through the site's tone curve (a 256-entry table), the flash vignette,
    # then noise shared by R, G and B so the stored pixels stay exactly grey.
    levels = np.arange(256, dtype=np.float32)
    tone_curve = 255 * np.clip(levels * exposure / 255, 0, 1) ** site.night_gamma * site.night_gain
    grey = tone_curve[np.asarray(frame.convert("L"))] * _flash_vignette(width, height)
    grey += rng.uniform(4, 10) * _sensor_noise(rng, width, height, 1)[:, :, 0]
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")


_NOISE_MARGIN_PX = 64


@functools.lru_cache(maxsize=8)
def _noise_tile(width: int, height: int, channels: int) -> np.ndarray:
    """A fixed standard-normal tile a little larger than the frame (drawing fresh noise per frame
    would be the slowest step of the generator)."""
    rng = np.random.default_rng([width, height, channels])
    return rng.standard_normal((height + _NOISE_MARGIN_PX, width + _NOISE_MARGIN_PX, channels), dtype=np.float32)


def _sensor_noise(rng: np.random.Generator, width: int, height: int, channels: int) -> np.ndarray:
    """(height, width, channels) unit-variance noise: the tile seen from a random offset."""
    top, left = rng.integers(0, _NOISE_MARGIN_PX + 1, size=2)
    return _noise_tile(width, height, channels)[top:top + height, left:left + width]


@functools.lru_cache(maxsize=8)
def _flash_vignette(width: int, height: int) -> np.ndarray:
    """(height, width) float32 gain: the infrared flash lights the centre of the frame most."""
    rows = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    cols = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    return 1.15 - 0.45 * (rows ** 2 + cols ** 2) / 2


def encode_jpeg(image: Image.Image) -> bytes:
    """Fixed JPEG settings, so the bytes depend only on the pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, comment=DEMO_MARKER)
    return buffer.getvalue()


# --------------------------------------------------------------------------- writing
def _is_demo_jpeg(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return image.format == "JPEG" and image.info.get("comment") == DEMO_MARKER
    except OSError:
        return False


def _check_target(root: Path) -> list[Path]:
    """Refuse to write into a folder holding anything but an earlier demo; return its old images."""
    if not root.exists():
        return []
    if not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a folder")
    old_images = []
    for entry in sorted(root.iterdir()):
        if entry.name in _LAYOUT_FILES and entry.is_file():
            continue
        if entry.name in _IMAGE_DIRS.values() and entry.is_dir():
            for image in sorted(entry.iterdir()):
                if not (_ID_RE.match(image.name) and image.is_file() and _is_demo_jpeg(image)):
                    raise FileExistsError(
                        f"{image}: not a demo frame written by dss.sample; refusing to write the demo "
                        f"dataset into {root} (choose an empty or new folder)")
                old_images.append(image)
            continue
        raise FileExistsError(
            f"{entry}: {root} holds files other than an earlier demo dataset; "
            "choose an empty or new folder")
    return old_images


def write_demo_dataset(root: str | os.PathLike, n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST,
                       seed: int = 0, scale: float = 1.0, n_train_sites: int = DEFAULT_TRAIN_SITES,
                       n_test_sites: int = DEFAULT_TEST_SITES, frame_sizes=None) -> dict:
    """Write a synthetic dataset in the Conser-vision layout under ``root``; return a summary.

    ``scale`` multiplies the real frame sizes (0.1 gives about 96x54 frames); ``frame_sizes``, a list of
    (width, height), replaces the real mix of sizes (before ``scale``). A folder that already
    holds an earlier demo is replaced (its old frames are removed); any other content is refused.
    The summary: root, n_train, n_test, class_counts / test_class_counts (name -> count),
    train_sites / test_sites (names), grey_frames (count over both splits), frame_sizes ("WxH" -> count).
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if n_train_sites < 1 or n_test_sites < 1:
        raise ValueError(f"need at least one train and one test site, got {n_train_sites} and {n_test_sites}")
    root = Path(root)
    old_images = _check_target(root)
    # The CSVs go first and come back last: a run killed midway leaves no CSV naming missing frames.
    for name in _LAYOUT_FILES:
        (root / name).unlink(missing_ok=True)
    for image in old_images:
        image.unlink()

    plan_rng = np.random.default_rng([seed, 0])
    sites = make_sites(plan_rng, n_train_sites, n_test_sites, scale, frame_sizes)
    split_sites = {"train": sites[:n_train_sites], "test": sites[n_train_sites:]}
    backgrounds: dict[int, np.ndarray] = {}
    rows = {"train": [], "test": []}  # (id, site name, class index)
    grey_frames = 0
    frame_sizes: dict[str, int] = {}
    next_number = 0
    for split, count in (("train", n_train), ("test", n_test)):
        labels, site_choice = plan_split(plan_rng, split_sites[split], count)
        day_draws = plan_rng.random(count)
        folder = root / _IMAGE_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        for label, site_position, day_draw in zip(labels, site_choice, day_draws):
            site = split_sites[split][site_position]
            class_name = CLASS_NAMES[label]
            if site.index not in backgrounds:
                backgrounds[site.index] = render_background(seed, site)
            is_day = day_draw < min(0.9, site.day_fraction * _DAY_FACTOR[class_name])
            image_id = f"ZJ{next_number:06d}"
            frame = render_frame(site, backgrounds[site.index], class_name,
                                 np.random.default_rng([seed, 1, next_number]), is_day)
            fileio.write_bytes(folder / f"{image_id}.jpg", encode_jpeg(frame))
            rows[split].append((image_id, site.name, int(label)))
            grey_frames += not is_day
            size_key = f"{site.width}x{site.height}"
            frame_sizes[size_key] = frame_sizes.get(size_key, 0) + 1
            next_number += 1

    for split in ("train", "test"):
        lines = ["id,filepath,site"] + [f"{i},{_IMAGE_DIRS[split]}/{i}.jpg,{s}" for i, s, _ in rows[split]]
        fileio.write_text(root / f"{split}_features.csv", "\n".join(lines) + "\n")
    one_hot = [",".join("1.0" if c == label else "0.0" for c in range(len(CLASS_NAMES))) for _, _, label in rows["train"]]
    lines = ["id," + ",".join(CLASS_NAMES)] + [f"{row[0]},{values}" for row, values in zip(rows["train"], one_hot)]
    fileio.write_text(root / "train_labels.csv", "\n".join(lines) + "\n")

    def class_counts(split):
        counts = np.bincount([label for _, _, label in rows[split]], minlength=len(CLASS_NAMES))
        return {name: int(n) for name, n in zip(CLASS_NAMES, counts)}

    return {
        "root": str(root),
        "n_train": n_train,
        "n_test": n_test,
        "class_counts": class_counts("train"),
        "test_class_counts": class_counts("test"),
        "train_sites": sorted({site for _, site, _ in rows["train"]}),
        "test_sites": sorted({site for _, site, _ in rows["test"]}),
        "grey_frames": grey_frames,
        "frame_sizes": dict(sorted(frame_sizes.items())),
    }


# --------------------------------------------------------------------------- CLI
def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return number


def parse_args(argv=None) -> argparse.Namespace:
    from dss.cli import non_negative_int, positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder to write (new, empty, or an earlier demo dataset)")
    parser.add_argument("--train", type=positive_int, default=DEFAULT_N_TRAIN, help="number of train images")
    parser.add_argument("--test", type=non_negative_int, default=DEFAULT_N_TEST, help="number of test images")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--scale", type=_positive_float, default=1.0,
                        help="multiplier on the real frame sizes 960x540/640x360/360x240 (min 16 px a side)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        summary = write_demo_dataset(args.root, n_train=args.train, n_test=args.test, seed=args.seed, scale=args.scale)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"wrote demo dataset {summary['root']}: {summary['n_train']} train / {summary['n_test']} test images, "
          f"{len(summary['train_sites'])} train / {len(summary['test_sites'])} test sites, "
          f"{summary['grey_frames']} grey, sizes {summary['frame_sizes']}, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
