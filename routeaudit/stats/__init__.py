"""The statistics engine, one module per family (like scipy.stats):

=================  ===========================================================================
``rng``            reproducible random streams per (audit, cell, seed)
``partitions``     confidence bins, routing strata, the calibration/evaluation split
``gaps``           matched-confidence gap statistics and their exact fixed-point form
``permutation``    the within-confidence-bin permutation test
``bootstrap``      bootstrap intervals (gap, paired worst-tile ECE, grouped means, gains)
``multitest``      Holm and Benjamini–Hochberg
``seeds``          the seed-stability rule and per-seed summaries
=================  ===========================================================================

Every function is pure: arrays and parameters in, numbers out, randomness only through the
generator passed in. Nothing loops in Python over permutations, replicates or bins. numpy
runs everything on the CPU; torch is imported only when a GPU ``device`` is asked for.
"""

from __future__ import annotations

from routeaudit.stats.bootstrap import (
    bootstrap_ci,
    bootstrap_gap,
    bootstrap_worst_tile_ece,
    cluster_bootstrap_mean,
    paired_gain,
)
from routeaudit.stats.gaps import GapResult, gap_statistics
from routeaudit.stats.multitest import benjamini_hochberg, holm
from routeaudit.stats.partitions import (
    MatchedPartition,
    confidence_bins,
    matched_partition,
    quantile_strata,
    stratified_split,
    within_bin_strata,
)
from routeaudit.stats.permutation import PermutationResult, within_bin_permutation_test
from routeaudit.stats.rng import rng_for, torch_generator_for
from routeaudit.stats.seeds import seed_summary, stable

__all__ = [
    "GapResult",
    "MatchedPartition",
    "PermutationResult",
    "benjamini_hochberg",
    "bootstrap_ci",
    "bootstrap_gap",
    "bootstrap_worst_tile_ece",
    "cluster_bootstrap_mean",
    "confidence_bins",
    "gap_statistics",
    "holm",
    "matched_partition",
    "paired_gain",
    "quantile_strata",
    "rng_for",
    "seed_summary",
    "stable",
    "stratified_split",
    "torch_generator_for",
    "within_bin_permutation_test",
    "within_bin_strata",
]
