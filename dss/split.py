"""Train/validation splits.

Test sites never appear in the training data, so the default validation split is grouped by
camera site: a site's images are all in train or all in validation, and the validation score
measures what the leaderboard measures (a random split lets the model memorise backgrounds).
Within that constraint the split is stratified: the greedy assignment plus local search below
pulls every class's validation share towards ``val_fraction``.

All functions return a bool mask over the samples, True = validation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SPLIT_CHOICES = ("site", "random")

# The overall size of the validation set counts this many times as much as one class's share.
_SIZE_WEIGHT = 2.0
_MAX_SEARCH_PASSES = 50
_RESTARTS = 8


def _check_inputs(labels: np.ndarray, val_fraction: float) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {labels.shape}")
    if labels.size < 2:
        raise ValueError(f"need at least 2 labelled samples to split into train and validation, got {labels.size}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {labels.min()}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    return labels.astype(np.int64, copy=False)


def site_grouped_split(labels: np.ndarray, sites: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """Assign whole sites to validation so that each class's share in validation is close to
    ``val_fraction``. Deterministic for a seed; both sides are non-empty; no site on both sides.

    Method: shuffle the sites with the seed, add each site to validation when that brings the
    per-class histogram (and the overall size) closer to the target, then improve with passes
    that move one site across or swap a pair while that lowers the cost; the best of a few
    seeded restarts wins.
    """
    labels = _check_inputs(labels, val_fraction)
    sites = np.asarray([str(site) for site in sites])
    if sites.shape != labels.shape:
        raise ValueError(f"sites has {sites.size} entries but labels has {labels.size}; they must match one per image")
    site_names, site_of_sample = np.unique(sites, return_inverse=True)
    if site_names.size < 2:
        raise ValueError(
            f"a site-grouped split needs at least 2 distinct sites, found {site_names.size} "
            f"({', '.join(site_names[:3])}); use --split-by random, or add site information to the features CSV")

    num_classes = int(labels.max()) + 1
    # counts[s, c]: images of class c at site s.
    counts = np.zeros((site_names.size, num_classes), dtype=np.float64)
    np.add.at(counts, (site_of_sample, labels), 1.0)
    problem = _SiteProblem(counts, val_fraction)

    # A few seeded restarts of greedy + local search; keep the best (ties: the first).
    rng = np.random.default_rng(seed)
    best_mask, best_cost = None, np.inf
    for _ in range(_RESTARTS):
        mask, cost = problem.solve(rng.permutation(site_names.size))
        if cost < best_cost - 1e-12:
            best_mask, best_cost = mask, cost
    return best_mask[site_of_sample]


class _SiteProblem:
    """Choose a set of sites for validation whose class histogram is close to
    ``val_fraction`` x the overall histogram (cost: see ``cost``)."""

    def __init__(self, counts: np.ndarray, val_fraction: float):
        self.counts = counts                                   # (sites, classes)
        self.class_totals = np.maximum(counts.sum(axis=0), 1.0)
        self.total = float(counts.sum())
        self.targets = val_fraction * counts.sum(axis=0)
        self.size_target = val_fraction * self.total

    def cost(self, val_counts: np.ndarray) -> np.ndarray:
        """Squared relative distance from the target (0 = perfect) for histograms (..., classes)."""
        class_error = (val_counts - self.targets) / self.class_totals
        size_error = (val_counts.sum(axis=-1) - self.size_target) / self.total
        return np.sum(class_error ** 2, axis=-1) + _SIZE_WEIGHT * size_error ** 2

    def solve(self, order: np.ndarray) -> tuple[np.ndarray, float]:
        counts = self.counts
        num_sites = counts.shape[0]
        in_val = np.zeros(num_sites, dtype=bool)
        val_counts = np.zeros(counts.shape[1])
        current = float(self.cost(val_counts))
        # Greedy pass in the shuffled order: add a site when it brings validation closer to the target.
        for site in order:
            candidate = float(self.cost(val_counts + counts[site]))
            if candidate < current:
                in_val[site], val_counts, current = True, val_counts + counts[site], candidate
        # Local search: move one site across, else swap the best pair, while that helps.
        for _ in range(_MAX_SEARCH_PASSES):
            improved = False
            for site in order:
                sign = -1.0 if in_val[site] else 1.0
                new_val_sites = in_val.sum() + int(sign)
                if new_val_sites == 0 or new_val_sites == num_sites:
                    continue
                candidate = float(self.cost(val_counts + sign * counts[site]))
                if candidate < current - 1e-12:
                    in_val[site] = not in_val[site]
                    val_counts, current, improved = val_counts + sign * counts[site], candidate, True
            if not improved:
                val_sites, train_sites = np.flatnonzero(in_val), np.flatnonzero(~in_val)
                if val_sites.size and train_sites.size:
                    # delta[i, j]: histogram change when validation site i and training site j swap.
                    delta = counts[train_sites][None, :, :] - counts[val_sites][:, None, :]
                    costs = self.cost(val_counts + delta)
                    i, j = np.unravel_index(int(np.argmin(costs)), costs.shape)
                    if costs[i, j] < current - 1e-12:
                        in_val[val_sites[i]], in_val[train_sites[j]] = False, True
                        val_counts, current, improved = val_counts + delta[i, j], float(costs[i, j]), True
            if not improved:
                break
        # Both sides must be non-empty: if one is empty, move the site whose move costs least.
        if not in_val.any() or in_val.all():
            sign = -1.0 if in_val.all() else 1.0
            costs = self.cost(val_counts + sign * counts)
            site = int(np.argmin(costs))
            in_val[site] = not in_val[site]
            val_counts, current = val_counts + sign * counts[site], float(costs[site])
        return in_val, current


def random_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A random split stratified per class (the prototype's choice; it ignores sites, so its
    validation score is optimistic for new sites). Deterministic for a seed; both sides non-empty."""
    labels = _check_inputs(labels, val_fraction)
    rng = np.random.default_rng(seed)
    mask = np.zeros(labels.size, dtype=bool)
    for class_index in np.unique(labels):
        members = np.flatnonzero(labels == class_index)
        members = members[rng.permutation(members.size)]
        mask[members[:int(round(val_fraction * members.size))]] = True
    if not mask.any():
        mask[rng.integers(labels.size)] = True
    if mask.all():
        mask[rng.integers(labels.size)] = False
    return mask


def make_split(labels: np.ndarray, sites: Sequence[str] | None, val_fraction: float, seed: int,
               split_by: str) -> np.ndarray:
    """Dispatch on ``split_by`` ("site" or "random"); returns the validation mask."""
    if split_by == "site":
        if sites is None:
            raise ValueError("split_by='site' needs the site of every image; use --split-by random when there are none")
        return site_grouped_split(labels, sites, val_fraction, seed)
    if split_by == "random":
        return random_split(labels, val_fraction, seed)
    raise ValueError(f"split_by must be one of {', '.join(SPLIT_CHOICES)}, got {split_by!r}")
