"""The models wing: the networks and how they see and score pixels.

Owns: the torchvision backbones (``backbones``), the network and its model.pth artifact (``model``),
the images on the device, the one resampling and the training augmentation (``loader``),
temperature scaling (``calibration``), and how a network predicts, configured from an artifact in
one place (``prediction.spec_from_artifact``).

May import: the shared base and ``dss.data``.
"""
