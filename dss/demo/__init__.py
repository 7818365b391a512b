"""The demo wing: the synthetic camera-trap data set of ``make demo`` and the tests.

Owns: the generator (``sample``; ``python -m dss.demo ROOT``), its camera sites (``sites``) and the
drawing of backgrounds, animals and camera effects (``sample_drawing``).

May import: the shared base only.
"""
