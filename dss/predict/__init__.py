"""The predict wing: a trained model's predictions, as users read and review them.

Owns: ``--predict-only`` (``predicting``), the SageMaker hosting handlers (``serve``), and the
result files a training run and --predict-only write alike (``results``: the submission and
predictions.csv).

May import: the shared base, ``dss.data`` and ``dss.models``.
"""
