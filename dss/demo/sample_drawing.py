"""Drawing for the demo data generator (``dss.demo.sample``): site backgrounds, the seven animals, and
camera effects (infrared tone curve, flash vignette, sensor noise), plus each site's ``SiteLook``
(colour cast, contrast, exposure, noise level, animal size) under the strong site shift.

Every random choice comes from the numpy Generator passed in, so a seed gives the same pixels.
Frames are (height, width, 3) uint8 RGB; animal shapes are laid out in body lengths by ``_Pose``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dss.demo.sites import Site, SiteLook


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
    if site.look is not None:
        scene = _cast(scene, site.look)
    return np.clip(scene, 0, 255).astype(np.uint8)


def _cast(scene: np.ndarray, look: SiteLook) -> np.ndarray:
    """The strong site shift's scene: contrast around the scene's mean, then the colour cast."""
    mean = scene.mean()
    return ((scene - mean) * look.contrast + mean) * np.asarray(look.tint, dtype=np.float32)


# --------------------------------------------------------------------------- animals
class _Pose:
    """Animal-local coordinates -> frame pixels.

    Local units: ``u`` forward along the body, ``v`` downwards, both in body lengths; the body
    centre is (0, 0). ``direction`` mirrors the animal (+1 faces right), ``tilt`` rotates it (rad).
    Shapes are drawn on ``draw``; widths and radii are in body lengths too.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, x0: float, y0: float, length_px: float, direction: int,
                 tilt: float):
        self.draw = draw
        self.x0, self.y0, self.length = x0, y0, length_px
        self.direction = direction
        self.cos, self.sin = math.cos(tilt), math.sin(tilt)

    def point(self, u: float, v: float) -> tuple[float, float]:
        u = u * self.direction
        return (self.x0 + self.length * (u * self.cos - v * self.sin),
                self.y0 + self.length * (u * self.sin + v * self.cos))

    def width(self, relative: float) -> int:
        return max(1, round(relative * self.length))

    def ellipse(self, u, v, ru, rv, fill, turn: float = 0.0, outline=None, line_width: float = 0.0):
        """Centre (u, v) and radii (ru, rv) in body lengths, turned by ``turn`` rad; a 28-point polygon.
        ``outline`` (a colour) is drawn ``line_width`` body lengths wide."""
        angles = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        c, s = math.cos(turn), math.sin(turn)
        points = [self.point(u + ru * math.cos(a) * c - rv * math.sin(a) * s,
                             v + ru * math.cos(a) * s + rv * math.sin(a) * c) for a in angles]
        self.draw.polygon(points, fill=fill, outline=outline, width=self.width(line_width) if outline else 1)

    def polygon(self, points, fill):
        self.draw.polygon([self.point(u, v) for u, v in points], fill=fill)

    def line(self, points, relative_width: float, fill):
        self.draw.line([self.point(u, v) for u, v in points], fill=fill, width=self.width(relative_width), joint="curve")

    def dot(self, u, v, relative_radius: float, fill):
        x, y = self.point(u, v)
        r = max(0.6, relative_radius * self.length)
        self.draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _tone(rgb, gain: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(channel * gain, 0, 255)) for channel in rgb)


def _legs(pose, hips, length: float, width: float, fill, rng):
    for u in hips:
        knee = u + rng.uniform(-0.06, 0.06)
        pose.line([(u, 0.05), (knee, length * 0.55), (knee + rng.uniform(-0.05, 0.05), length)], width, fill)


def _draw_duiker(pose, rng, gain):
    coat = _tone((rng.uniform(130, 175), rng.uniform(65, 95), rng.uniform(30, 55)), gain)
    dark = _tone((60, 35, 20), gain)
    _legs(pose, (-0.32, -0.22, 0.22, 0.3), 0.5, 0.035, coat, rng)
    pose.ellipse(0, 0, 0.5, 0.19, coat)
    pose.line([(0.33, -0.05), (0.5, -0.3)], 0.1, coat)
    pose.ellipse(0.56, -0.33, 0.12, 0.065, coat, turn=0.5)
    pose.line([(0.5, -0.4), (0.44, -0.55)], 0.025, dark)
    pose.line([(0.54, -0.4), (0.49, -0.55)], 0.025, dark)
    pose.line([(-0.45, -0.12), (0.3, -0.16)], 0.04, dark)  # dorsal stripe
    pose.line([(-0.5, -0.05), (-0.58, 0.06)], 0.04, coat)


def _draw_bird(pose, rng, gain):
    body = _tone((rng.uniform(35, 70),) * 2 + (rng.uniform(45, 80),), gain)
    light = _tone((225, 225, 230), gain)
    beak = _tone((200, 170, 90), gain)
    pose.line([(0.0, 0.2), (0.02, 0.55)], 0.03, beak)
    pose.line([(0.15, 0.2), (0.18, 0.55)], 0.03, beak)
    pose.polygon([(-0.4, -0.05), (-0.8, -0.3), (-0.78, 0.12)], body)  # tail fan
    pose.ellipse(0, 0, 0.5, 0.3, body)
    pose.ellipse(-0.05, -0.05, 0.38, 0.18, _tone(body, 0.7), turn=-0.2)  # folded wing
    pose.dot(0.45, -0.32, 0.14, body)
    pose.polygon([(0.55, -0.36), (0.78, -0.3), (0.55, -0.26)], beak)
    if rng.random() < 0.7:  # guineafowl dots
        for _ in range(rng.integers(10, 22)):
            a, r = rng.uniform(0, 2 * np.pi), math.sqrt(rng.uniform(0, 1))
            pose.dot(0.42 * r * math.cos(a), 0.24 * r * math.sin(a), 0.03, light)


def _draw_civet(pose, rng, gain):
    coat = _tone((rng.uniform(150, 190), rng.uniform(140, 175), rng.uniform(105, 135)), gain)
    dark = _tone((25, 22, 20), gain)
    _legs(pose, (-0.3, -0.22, 0.25, 0.32), 0.28, 0.045, dark, rng)
    # Long tail with alternating dark and light rings: the genet/civet signature.
    bend = rng.uniform(-0.15, 0.15)
    points = [(-0.42 - 0.6 * t, 0.02 + bend * math.sin(np.pi * t) + 0.1 * t) for t in np.linspace(0, 1, 9)]
    for i in range(len(points) - 1):
        pose.line([points[i], points[i + 1]], 0.07, dark if i % 2 else coat)
    pose.ellipse(0, 0, 0.46, 0.13, coat)
    pose.polygon([(0.38, -0.1), (0.7, 0.02), (0.38, 0.1)], coat)
    pose.polygon([(0.42, -0.1), (0.47, -0.22), (0.52, -0.09)], dark)
    pose.line([(0.45, 0.0), (0.62, 0.02)], 0.04, dark)  # face mask
    for row_v in (-0.07, 0.0, 0.07):
        for u in np.arange(-0.35, 0.32, 0.11):
            pose.dot(u + rng.uniform(-0.02, 0.02), row_v, 0.028, dark)


def _draw_hog(pose, rng, gain):
    base = (rng.uniform(20, 45),) * 3 if rng.random() < 0.7 else (rng.uniform(140, 175), rng.uniform(60, 80), 30)
    coat = _tone(base, gain)
    _legs(pose, (-0.32, -0.2, 0.2, 0.3), 0.48, 0.09, coat, rng)
    pose.ellipse(0, 0, 0.5, 0.3, coat)
    pose.polygon([(0.35, -0.2), (0.72, 0.02), (0.74, 0.17), (0.38, 0.22)], coat)
    pose.ellipse(0.74, 0.1, 0.03, 0.07, _tone(base, 1.6))  # snout disc
    pose.polygon([(0.38, -0.2), (0.42, -0.33), (0.48, -0.18)], coat)
    for u in np.linspace(-0.4, 0.35, 10):  # bristles along the back
        pose.line([(u, -0.27), (u - 0.04, -0.36)], 0.02, coat)


def _draw_leopard(pose, rng, gain):
    coat = _tone((rng.uniform(190, 225), rng.uniform(150, 180), rng.uniform(70, 100)), gain)
    spot = _tone((30, 25, 15), gain)
    _legs(pose, (-0.34, -0.24, 0.26, 0.34), 0.42, 0.065, coat, rng)
    lift = rng.uniform(-0.25, 0.1)
    tail = [(-0.46 - 0.5 * t, -0.02 + 0.2 * math.sin(np.pi * t) + lift * t * t) for t in np.linspace(0, 1, 8)]
    pose.line(tail, 0.045, coat)
    pose.ellipse(0, 0, 0.48, 0.16, coat)
    pose.dot(0.5, -0.12, 0.11, coat)
    pose.dot(0.46, -0.22, 0.035, coat)
    pose.dot(0.56, -0.22, 0.035, coat)
    for _ in range(rng.integers(22, 36)):  # rosettes
        a, r = rng.uniform(0, 2 * np.pi), math.sqrt(rng.uniform(0, 1))
        pose.ellipse(0.42 * r * math.cos(a), 0.13 * r * math.sin(a), 0.03, 0.03, None,
                     outline=spot, line_width=0.012)
    for u, v in tail[1::2]:
        pose.dot(u, v, 0.02, spot)


def _draw_monkey(pose, rng, gain):
    fur = _tone((rng.uniform(20, 45),) * 3 if rng.random() < 0.6 else (rng.uniform(90, 120), rng.uniform(80, 100), 70), gain)
    pale = _tone((215, 210, 200), gain)
    pose.line([(-0.1, 0.25), (-0.35, 0.5), (-0.45, 0.85), (-0.3, 1.0)], 0.04, fur)  # long tail
    pose.line([(0.05, 0.2), (0.28, 0.35), (0.15, 0.55)], 0.08, fur)
    pose.line([(-0.05, 0.2), (-0.18, 0.4), (-0.1, 0.56)], 0.08, fur)
    pose.line([(0.08, -0.2), (0.32, -0.02), (0.42, -0.2)], 0.07, fur)  # arm reaching up
    pose.line([(-0.05, -0.2), (-0.22, 0.05)], 0.07, fur)
    pose.ellipse(0, 0, 0.16, 0.3, fur)
    if rng.random() < 0.6:  # colobus mantle
        pose.ellipse(-0.08, -0.05, 0.06, 0.2, pale)
    pose.dot(0.05, -0.42, 0.13, fur)
    pose.dot(0.1, -0.41, 0.07, pale)


def _draw_rodent(pose, rng, gain):
    coat = _tone((rng.uniform(110, 150), rng.uniform(90, 120), rng.uniform(65, 90)), gain)
    tail = _tone((rng.uniform(150, 190),) * 3, gain)
    curl = rng.uniform(-0.2, 0.2)
    pose.line([(-0.3, 0.1), (-0.7, 0.25), (-1.05, 0.15 + curl), (-1.25, -0.05 + curl)], 0.045, tail)
    pose.ellipse(0, 0, 0.36, 0.22, coat)
    pose.ellipse(0.36, 0.02, 0.16, 0.11, coat, turn=0.3)
    pose.dot(0.28, -0.17, 0.08, _tone(coat, 1.3))
    pose.dot(0.5, 0.06, 0.03, _tone(coat, 0.4))
    pose.line([(0.1, 0.18), (0.15, 0.3)], 0.04, coat)
    pose.line([(-0.2, 0.18), (-0.22, 0.3)], 0.04, coat)


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
                rng: np.random.Generator, is_day: bool, scale: float = 1.0) -> None:
    """Draw one ``class_name`` animal at a random place, size, facing and brightness; ``scale``
    multiplies its size (the camera's distance under the strong site shift)."""
    draw_body, length_range, centre_range, eye = _ANIMALS[class_name]
    length = rng.uniform(*length_range) * height * rng.uniform(0.85, 1.2) * scale
    pose = _Pose(draw, x0=rng.uniform(0.12, 0.88) * width, y0=rng.uniform(*centre_range) * height,
                 length_px=length, direction=int(rng.choice((-1, 1))), tilt=rng.uniform(-0.15, 0.15))
    draw_body(pose, rng, rng.uniform(0.7, 1.3))
    if not is_day and rng.random() < 0.7:  # infrared eye-shine
        pose.dot(eye[0], eye[1], 0.025, (250, 250, 250))


def render_frame(site: Site, background: np.ndarray, class_name: str, rng: np.random.Generator,
                 is_day: bool) -> Image.Image:
    """One RGB frame of ``site`` showing ``class_name`` (no animal for ``blank``).

    Night frames are converted to grey (R=G=B) after drawing, with the infrared tone curve,
    a flash vignette and per-pixel noise shared by all three channels. A site with a ``look``
    (strong site shift) scales the animal, the exposure and the noise.
    """
    height, width = background.shape[:2]
    frame = Image.fromarray(background)
    draw = ImageDraw.Draw(frame)
    # 1.0 leaves the normal demo's numbers exactly as they were (x * 1.0 == x).
    animal_scale, gain, noise = (1.0, 1.0, 1.0) if site.look is None else (
        site.look.animal_scale, site.look.gain, site.look.noise)
    if rng.random() < (0.6 if class_name == "blank" else 0.3):
        _draw_distractor(draw, rng, width, height)
    if class_name != "blank":
        draw_animal(draw, class_name, width, height, rng, is_day, animal_scale)
    if rng.random() < 0.15:  # motion or focus blur
        frame = frame.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 2.0) * height / 540))

    exposure = rng.uniform(0.8, 1.2) * gain
    if is_day:
        pixels = np.asarray(frame, dtype=np.float32) * exposure
        pixels += rng.uniform(2, 5) * noise * _sensor_noise(rng, width, height, 3)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    # Infrared: luminance through the site's tone curve (a 256-entry table), the flash vignette,
    # then noise shared by R, G and B so the stored pixels stay exactly grey.
    levels = np.arange(256, dtype=np.float32)
    tone_curve = 255 * np.clip(levels * exposure / 255, 0, 1) ** site.night_gamma * site.night_gain
    grey = tone_curve[np.asarray(frame.convert("L"))] * _flash_vignette(width, height)
    grey += rng.uniform(4, 10) * noise * _sensor_noise(rng, width, height, 1)[:, :, 0]
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
