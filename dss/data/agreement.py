"""Whether two splits, or a split and a model, were preprocessed alike: the stored image size, the
resize policy and the class names. Another size, policy or class list would give silently wrong
predictions, so training (train vs test) and --predict-only (model vs data) refuse them here.
"""

from __future__ import annotations

from dss.data import dataset


def preprocessing_of(data: dict) -> dict:
    """What two splits seen by one model must share: stored image (H, W) in px, resize policy
    (None when the pickle does not say) and class names."""
    return {"image_shape": tuple(int(side) for side in data["images"].shape[1:3]),
            "resize_policy": data["info"].get("resize_policy"), "class_names": list(data["class_names"])}


def _px(shape: tuple[int, int]) -> str:
    return f"{shape[0]} px" if shape[0] == shape[1] else f"{shape[0]}x{shape[1]} px"


def check_agreement(data: dict, expected: dict, source: str, reference: str, any_size: bool = False) -> None:
    """Refuse the split ``data`` (read from ``source``) when it was preprocessed otherwise than
    ``expected`` (``preprocessing_of`` the split or model named ``reference``) says: another
    image size, resize policy or class list would give silently wrong predictions. An unlabelled
    split without class names, or a pickle without a resize policy, passes on those points.
    ``any_size``: another stored size passes (--predict-only resizes it to the network input, as
    the training run's evaluation resized its own)."""
    seen, problems = preprocessing_of(data), []
    if not any_size and seen["image_shape"] != tuple(expected["image_shape"]):
        problems.append(f"images are stored at {_px(seen['image_shape'])} but {reference} has "
                        f"{_px(expected['image_shape'])} images (re-run preprocess.py with --image-size "
                        f"{expected['image_shape'][0]})")
    if seen["resize_policy"] is not None and expected["resize_policy"] not in (None, seen["resize_policy"]):
        problems.append(f"resize policy is {seen['resize_policy']!r} but {reference} has {expected['resize_policy']!r}")
    if seen["class_names"] and seen["class_names"] != expected["class_names"]:
        problems.append(f"class names are {seen['class_names']} but {reference} has {expected['class_names']}")
    if problems:
        raise dataset.DatasetError(f"{source} does not match {reference}: " + "; ".join(problems))
