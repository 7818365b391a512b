"""Train/validation splits.

Test sites never appear in the training data, so the default validation split is grouped by
camera site: a site's images are all in train or all in validation, and the validation score
measures what the leaderboard measures (a random split lets the model memorise backgrounds).
Within that constraint the split is stratified: the greedy assignment plus local search below
pulls every class's validation share towards ``val_fraction``.

The split functions return a bool mask over the samples, True = validation; ``make_folds``
returns a fold index per sample for K-fold training (each fold is the validation set of one
model), with the same grouping and stratification.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SPLIT_CHOICES = ("site", "random")

# The overall size of the validation set counts this many times as much as one class's share.
_SIZE_WEIGHT = 2.0
_MAX_SEARCH_PASSES = 50
_RESTARTS = 8
_TIE = 1e-12  # cost changes smaller than this are no improvement (float noise)
# Pair swaps between folds look at every pair of sites, (sites, sites, classes) floats; above this
# many sites only single moves run (600 sites x 8 classes: 23 MB per array).
_MAX_SWAP_SITES = 600


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


# --------------------------------------------------------------------------- K folds
def make_folds(labels: np.ndarray, sites: Sequence[str] | None, k: int, seed: int) -> np.ndarray:
    """int64 (N,) fold index in 0..k-1 per sample. With ``sites``: grouped by site (no site in two
    folds) and stratified by class as far as the sites allow (``_site_folds``). With None:
    random folds stratified per class (fold sizes and each class's counts differ by at most 1).
    Deterministic for a seed; every fold is non-empty."""
    labels = _check_inputs(labels, 0.5)  # (the fraction is not used here; 0.5 passes its check)
    if not 2 <= k <= labels.size:
        raise ValueError(f"need 2 <= folds <= {labels.size} (the number of labelled images), got {k}")
    rng = np.random.default_rng(seed)
    if sites is None:
        folds = np.empty(labels.size, dtype=np.int64)
        # Each class's shuffled members deal out round-robin, continuing where the previous class stopped.
        order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
        folds[order] = np.arange(order.size) % k
        return folds
    sites = np.asarray([str(site) for site in sites])
    if sites.shape != labels.shape:
        raise ValueError(f"sites has {sites.size} entries but labels has {labels.size}; they must match one per image")
    site_names, site_of_sample = np.unique(sites, return_inverse=True)
    if site_names.size < k:
        raise ValueError(f"{k} site-grouped folds need at least {k} distinct sites, found {site_names.size}; "
                         "use fewer folds or random folds")
    counts = np.zeros((site_names.size, int(labels.max()) + 1), dtype=np.float64)
    np.add.at(counts, (site_of_sample, labels), 1.0)
    return _site_folds(counts, k, rng)[site_of_sample]


def _site_folds(counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of each site (counts: (sites, classes) images). Greedy, largest site first (ties in a
    seeded order): each site joins the fold whose cost (``_SiteProblem.cost`` against 1/k of every
    class) it raises least, i.e. the fold furthest below its targets; then single-site moves and
    pair swaps between folds while they lower the summed cost."""
    problem = _SiteProblem(counts, 1.0 / k)
    shuffled = rng.permutation(counts.shape[0])
    order = shuffled[np.argsort(-counts[shuffled].sum(axis=1), kind="stable")]
    fold_of = np.full(counts.shape[0], -1, dtype=np.int64)
    totals = np.zeros((k, counts.shape[1]))                      # (folds, classes) images so far
    for placed, site in enumerate(order):
        rise = problem.cost(totals + counts[site]) - problem.cost(totals)
        empty = np.flatnonzero(totals.sum(axis=1) == 0)
        if empty.size and empty.size >= order.size - placed:    # the last sites must fill the empty folds
            rise = np.where(totals.sum(axis=1) == 0, rise, np.inf)
        fold_of[site] = int(np.argmin(rise))
        totals[fold_of[site]] += counts[site]
    swaps = counts.shape[0] <= _MAX_SWAP_SITES
    for _ in range(_MAX_SEARCH_PASSES):
        if not (_move_sites(problem, counts, fold_of, totals, order)
                or (swaps and _swap_sites(problem, counts, fold_of, totals))):
            break
    return fold_of


def _move_sites(problem: _SiteProblem, counts: np.ndarray, fold_of: np.ndarray, totals: np.ndarray,
                order: np.ndarray) -> bool:
    """One pass moving single sites to the fold where that lowers the summed cost most (never
    emptying a fold); ``fold_of`` and ``totals`` are updated in place. True when any moved."""
    moved = False
    for site in order:
        home = fold_of[site]
        if np.sum(fold_of == home) == 1:
            continue
        leave = problem.cost(totals[home] - counts[site]) - problem.cost(totals[home])
        change = leave + problem.cost(totals + counts[site]) - problem.cost(totals)  # (folds,)
        change[home] = 0.0
        target = int(np.argmin(change))
        if change[target] < -_TIE:
            totals[home] -= counts[site]
            totals[target] += counts[site]
            fold_of[site], moved = target, True
    return moved


def _swap_sites(problem: _SiteProblem, counts: np.ndarray, fold_of: np.ndarray, totals: np.ndarray) -> bool:
    """The one swap of two sites between folds that lowers the summed cost most, if any."""
    # delta[i, j]: what site i's fold gains when i leaves and j joins (j's fold gets the opposite).
    delta = counts[None, :, :] - counts[:, None, :]
    before = problem.cost(totals)                                # (folds,)
    gain_i = problem.cost(totals[fold_of][:, None, :] + delta) - before[fold_of][:, None]
    gain_j = problem.cost(totals[fold_of][None, :, :] - delta) - before[fold_of][None, :]
    change = np.where(fold_of[:, None] != fold_of[None, :], gain_i + gain_j, np.inf)
    i, j = np.unravel_index(int(np.argmin(change)), change.shape)
    if not change[i, j] < -_TIE:
        return False
    totals[fold_of[i]] += delta[i, j]
    totals[fold_of[j]] -= delta[i, j]
    fold_of[i], fold_of[j] = fold_of[j], fold_of[i]
    return True
