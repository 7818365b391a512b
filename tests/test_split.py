"""Train/validation split: site grouping, stratification, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dss.train.split import make_folds, make_split, random_split, site_grouped_split


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


# --------------------------------------------------------------------------- K folds
def test_site_folds_never_split_a_site_and_balance_classes_and_sizes():
    labels, sites = camera_sites(num_sites=60, seed=5)
    folds = make_folds(labels, sites, 5, seed=0)
    sites = np.asarray(sites)
    assert folds.dtype == np.int64 and set(folds) == set(range(5))
    assert all(len(set(folds[sites == site])) == 1 for site in set(sites))
    assert np.array_equal(folds, make_folds(labels, list(sites), 5, seed=0))            # deterministic
    sizes = np.bincount(folds) / labels.size
    assert np.all(np.abs(sizes - 0.2) < 0.03), sizes
    for class_index in np.unique(labels):
        shares = np.bincount(folds[labels == class_index], minlength=5) / np.sum(labels == class_index)
        assert np.all(np.abs(shares - 0.2) < 0.07), (class_index, shares)


def test_site_folds_are_better_balanced_than_random_site_folds():
    labels, sites = camera_sites(num_sites=50, seed=7)
    sites = np.asarray(sites)
    names = np.unique(sites)

    def class_error(folds):
        return sum(abs(np.mean(folds[labels == c] == f) - 0.2) for c in np.unique(labels) for f in range(5))

    ours = class_error(make_folds(labels, sites, 5, seed=0))
    rng = np.random.default_rng(0)
    random_errors = []
    for _ in range(20):
        fold_of_site = dict(zip(names, rng.permutation(names.size) % 5))
        random_errors.append(class_error(np.array([fold_of_site[site] for site in sites])))
    assert ours < min(random_errors)


def test_one_dominant_site_keeps_its_own_fold_and_every_fold_gets_sites():
    labels = np.array([0] * 500 + [1] * 10 + [2] * 10 + [0] * 5 + [1] * 5)
    sites = ["big"] * 500 + ["a"] * 10 + ["b"] * 10 + ["c"] * 5 + ["d"] * 5
    folds = make_folds(labels, sites, 3, seed=1)
    assert set(folds) == {0, 1, 2}
    assert set(folds[:500]).isdisjoint(folds[500:])          # the big site is alone in its fold


def test_random_folds_without_sites_are_stratified_to_one_image():
    labels = np.repeat(np.arange(4), [103, 41, 20, 7])
    folds = make_folds(labels, None, 5, seed=3)
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1
    for class_index in range(4):
        counts = np.bincount(folds[labels == class_index], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(folds, make_folds(labels, None, 5, seed=3))
    assert not np.array_equal(folds, make_folds(labels, None, 5, seed=4))


def test_fold_errors_name_the_problem():
    labels, sites = camera_sites(num_sites=3)
    with pytest.raises(ValueError, match="5 site-grouped folds need at least 5 distinct sites, found 3"):
        make_folds(labels, sites, 5, seed=0)
    with pytest.raises(ValueError, match="need 2 <= folds"):
        make_folds(labels, sites, 1, seed=0)
    with pytest.raises(ValueError, match="sites has 2 entries"):
        make_folds(np.array([0, 1, 2]), ["a", "b"], 2, seed=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3)), min_size=2, max_size=120),
       st.integers(2, 6), st.integers(0, 10_000))
def test_fold_properties_hold_for_any_input(rows, k, seed):
    sites = np.asarray([f"site{site}" for site, _ in rows])
    labels = np.array([label for _, label in rows])
    if len(set(sites)) < k:
        with pytest.raises(ValueError):
            make_folds(labels, sites, k, seed)
        return
    folds = make_folds(labels, sites, k, seed)
    assert set(folds) == set(range(k))
    assert all(len(set(folds[sites == site])) == 1 for site in set(sites))
