"""The camera sites of the demo data: ``Site`` (where a camera's frames come from: frame size,
class mix, infrared tone) and ``SiteLook`` (what the camera adds under the strong site shift).
Planned by ``dss.demo.sample``, drawn by ``dss.demo.sample_drawing``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SiteLook:
    """What a camera adds to its frames under the strong site shift (the normal demo has none)."""

    tint: tuple             # per-channel gain of the scene (R, G, B): the site's colour cast
    contrast: float         # the scene's contrast around its mean
    gain: float             # exposure of every frame of the site
    noise: float            # multiplier on the sensor noise
    animal_scale: float     # camera distance: animals look this much larger (>1) or smaller


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
    look: SiteLook | None = None  # strong site shift only
