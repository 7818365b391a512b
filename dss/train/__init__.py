"""The train wing: dss_train.py's training run, from the flags to the files it leaves.

Owns: the flags and the settings derived from them (``training_args``), the run's parts
(``training``: fingerprint, config.json, device and seeds, network, loss, records), the training
data and its split (``training_data``, ``split``), K folds (``crossval``), the loop and evaluation
(``engine``, ``ema``), checkpoints and what they must match (``checkpoint``, ``fingerprints``), the
end of a run (``finishing``), its outputs and diagnostics (``outputs``, ``diagnostics``), earlier
runs kept aside (``previous_runs``) and MLflow (``tracking``).

May import: the shared base, ``dss.data``, ``dss.models`` and ``dss.predict`` (the result files and
prediction it shares with --predict-only).
"""
