"""Where it fails: site_metrics.csv recomputed from its inputs, calibration.png and top_losses.png
as real PNG files, and the top-loss order."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dss.models import calibration
from dss import metrics
from dss.train.diagnostics import plot_calibration, plot_top_losses, site_metrics, top_losses, write_site_metrics

CLASSES = ["antelope", "bird", "blank"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def held_out(num: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(CLASSES)), num)
    labels = rng.integers(0, len(CLASSES), num)
    sites = rng.choice(["S01", "S02", "S03", "S04"], num)
    return sites, labels, probs


def png_size(path) -> tuple[int, int]:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    height, width = imread(path).shape[:2]
    return width, height


def test_site_metrics_csv_numbers_recompute_from_the_predictions(tmp_path):
    sites, labels, probs = held_out()
    write_site_metrics(tmp_path / "site_metrics.csv", site_metrics(sites, labels, probs, CLASSES))
    table = pd.read_csv(tmp_path / "site_metrics.csv", dtype={"site": str})
    assert list(table.columns) == ["site", "images", "accuracy", "log_loss", "mean_true_prob",
                                   "n_antelope", "n_bird", "n_blank"]
    assert sorted(table["site"]) == ["S01", "S02", "S03", "S04"] and table["images"].sum() == len(labels)
    assert list(table["log_loss"]) == sorted(table["log_loss"], reverse=True)         # worst site first
    for row in table.itertuples():
        members = sites == row.site
        assert row.images == members.sum()
        assert row.log_loss == metrics.log_loss(probs[members], labels[members])      # exact: repr floats
        assert row.accuracy == metrics.accuracy(probs[members], labels[members])
        assert row.mean_true_prob == pytest.approx(probs[members, labels[members]].mean(), rel=1e-12)
        counts = np.bincount(labels[members], minlength=len(CLASSES))
        assert [row.n_antelope, row.n_bird, row.n_blank] == list(counts)


def test_site_metrics_checks_its_inputs():
    sites, labels, probs = held_out()
    with pytest.raises(ValueError, match="sites has 59 entries"):
        site_metrics(sites[:-1], labels, probs, CLASSES)
    with pytest.raises(ValueError, match="3 columns but there are 2 class names"):
        site_metrics(sites, labels, probs, CLASSES[:2])


def test_calibration_png_is_written_and_returns_the_ece(tmp_path):
    _, labels, probs = held_out(500)
    ece = plot_calibration(probs, labels, tmp_path / "calibration.png", subject="out-of-fold")
    assert ece == calibration.expected_calibration_error(probs, labels)
    width, height = png_size(tmp_path / "calibration.png")
    assert width > 100 and height > 100


def test_top_losses_are_the_highest_losses_in_order_and_the_png_is_written(tmp_path):
    _, labels, probs = held_out(40, seed=2)
    images = np.random.default_rng(2).integers(0, 256, (40, 24, 24, 3), dtype=np.uint8)
    shown = plot_top_losses(images, labels, probs, CLASSES, tmp_path / "top_losses.png", k=6,
                            ids=[f"ZJ{i:06d}" for i in range(40)])
    losses = -np.log(probs[np.arange(40), labels])
    np.testing.assert_array_equal(shown, np.argsort(-losses)[:6])
    order, top = top_losses(probs, labels, 6)
    np.testing.assert_array_equal(order, shown)
    assert np.all(np.diff(top) <= 0) and top[0] == pytest.approx(losses.max())
    width, height = png_size(tmp_path / "top_losses.png")
    assert width > 100 and height > 100
    assert len(plot_top_losses(images[:3], labels[:3], probs[:3], CLASSES, tmp_path / "few.png")) == 3  # k > N


def test_top_losses_refuse_images_that_do_not_match():
    _, labels, probs = held_out(5)
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\) with N = 5"):
        plot_top_losses(np.zeros((4, 8, 8, 3), np.uint8), labels, probs, CLASSES, "unused.png")
