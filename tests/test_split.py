"""Train/validation split: site grouping, stratification, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dss.split import make_split, random_split, site_grouped_split


def camera_sites(num_sites: int = 40, num_classes: int = 5, seed: int = 0):
    """Sites of very different sizes, each with its own class mix (like real camera traps)."""
    rng = np.random.default_rng(seed)
    labels, sites = [], []
    for site in range(num_sites):
        size = int(rng.integers(5, 200))
        mix = rng.dirichlet(np.full(num_classes, 0.7))
        labels.extend(rng.choice(num_classes, size=size, p=mix))
        sites.extend([f"S{site:04d}"] * size)
    return np.asarray(labels, dtype=np.int64), sites


def test_no_site_on_both_sides_and_shares_close_to_target():
    labels, sites = camera_sites()
    mask = site_grouped_split(labels, sites, 0.2, seed=0)
    sites = np.asarray(sites)
    assert not set(sites[mask]) & set(sites[~mask])
    assert abs(mask.mean() - 0.2) < 0.02
    for class_index in np.unique(labels):
        share = mask[labels == class_index].mean()
        assert abs(share - 0.2) < 0.05, (class_index, share)


def test_stratification_beats_a_random_choice_of_sites():
    labels, sites = camera_sites(seed=3)
    sites = np.asarray(sites)

    def class_error(mask):
        return sum(abs(mask[labels == c].mean() - 0.25) for c in np.unique(labels))

    ours = class_error(site_grouped_split(labels, sites, 0.25, seed=1))
    rng = np.random.default_rng(1)
    names = np.unique(sites)
    random_errors = []
    for _ in range(20):
        chosen = rng.choice(names, size=len(names) // 4, replace=False)
        random_errors.append(class_error(np.isin(sites, chosen)))
    assert ours < min(random_errors)


def test_deterministic_for_a_seed_and_seed_matters():
    labels, sites = camera_sites()
    first = site_grouped_split(labels, sites, 0.2, seed=7)
    assert np.array_equal(first, site_grouped_split(labels, sites, 0.2, seed=7))
    assert not np.array_equal(first, site_grouped_split(labels, sites, 0.2, seed=8))


def test_two_sites_gives_one_each():
    labels = np.array([0, 1, 0, 1, 0, 1])
    sites = ["a", "a", "a", "b", "b", "b"]
    mask = site_grouped_split(labels, sites, 0.1, seed=0)
    assert mask.any() and not mask.all()
    assert len(set(np.asarray(sites)[mask])) == 1


def test_one_site_is_an_actionable_error():
    with pytest.raises(ValueError, match="at least 2 distinct sites.*--split-by random"):
        site_grouped_split(np.array([0, 1, 0]), ["s", "s", "s"], 0.2, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_out_of_range(fraction):
    labels, sites = camera_sites(num_sites=5)
    with pytest.raises(ValueError, match="val_fraction"):
        site_grouped_split(labels, sites, fraction, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        random_split(labels, fraction, seed=0)


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match="sites has 2 entries but labels has 3"):
        site_grouped_split(np.array([0, 1, 2]), ["a", "b"], 0.5, seed=0)


def test_random_split_is_stratified_per_class():
    labels = np.repeat(np.arange(4), [100, 40, 20, 10])
    mask = random_split(labels, 0.2, seed=0)
    assert [int(mask[labels == c].sum()) for c in range(4)] == [20, 8, 4, 2]
    assert np.array_equal(mask, random_split(labels, 0.2, seed=0))


def test_make_split_dispatch_and_errors():
    labels, sites = camera_sites(num_sites=10)
    assert np.array_equal(make_split(labels, sites, 0.2, 0, "site"), site_grouped_split(labels, sites, 0.2, 0))
    assert np.array_equal(make_split(labels, sites, 0.2, 0, "random"), random_split(labels, 0.2, 0))
    with pytest.raises(ValueError, match="split_by must be one of site, random"):
        make_split(labels, sites, 0.2, 0, "class")
    with pytest.raises(ValueError, match="needs the site"):
        make_split(labels, None, 0.2, 0, "site")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=2, max_size=80),
       st.floats(0.05, 0.95), st.integers(0, 10_000))
def test_properties_hold_for_any_input(rows, fraction, seed):
    sites = [f"site{site}" for site, _ in rows]
    labels = np.array([label for _, label in rows])
    if len(set(sites)) < 2:
        with pytest.raises(ValueError):
            site_grouped_split(labels, sites, fraction, seed)
        return
    mask = site_grouped_split(labels, sites, fraction, seed)
    sites = np.asarray(sites)
    assert mask.dtype == bool and mask.shape == labels.shape
    assert mask.any() and not mask.all()
    assert not set(sites[mask]) & set(sites[~mask])
    random_mask = random_split(labels, fraction, seed)
    assert random_mask.any() and not random_mask.all()
