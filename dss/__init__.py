"""DSS animal classification: camera-trap images -> pickles -> fine-tuned ResNet18.

The shared base, here in ``dss/``, is what every wing may use: command-line conventions and the
log (``cli``), atomic files (``fileio``), SageMaker conventions (``sagemaker``), image decoding
(``images``), scores and plots (``metrics``), processes and devices (``distributed``), CPU threads
(``threads``) and stopping a run (``stopping``). It imports no wing.

The wings, by stage (each ``__init__`` says what it owns and which wings it may import):
``data`` (the pickle contract) <- ``ingest`` (preprocess.py); ``data`` <- ``models`` <- ``predict``
<- ``train`` (dss_train.py); ``demo`` (the synthetic data). ``tests/test_layout.py`` checks that
every import runs that way and that there is no import circle.
"""

__version__ = "0.1.0"
