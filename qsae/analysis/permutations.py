"""Rollout labels, their questions, and permutations of the labels within questions.

The rollout-level tests (rollout_stats) and the baselines (baselines) share these: both check labels and
questions the same way, and both draw their nulls from the same permutations.
"""
from __future__ import annotations

import numpy as np

from qsae.analysis.features import UndefinedAUROCError

PERMUTATION_BATCH = 128  # permuted label rows drawn and multiplied at once, as a float64 [128, R] matrix


def checked_labels(labels: np.ndarray, n_rollouts: int) -> np.ndarray:
    """Labels as bool [R] (True = correct); UndefinedAUROCError unless both classes are present."""
    labels = np.asarray(labels)
    if labels.shape != (n_rollouts,):
        raise ValueError(f"labels must have shape ({n_rollouts},), one per rollout, got {labels.shape}")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be bool (or 0/1): True = correct rollout")
        labels = labels.astype(bool)
    if n_rollouts == 0:
        raise UndefinedAUROCError("AUROC undefined: no labelled rollouts")
    n_pos = int(labels.sum())
    if n_pos in (0, n_rollouts):
        outcome = "correct" if n_pos else "wrong"
        raise UndefinedAUROCError(f"AUROC undefined: all {n_rollouts} labelled rollouts are {outcome}")
    return labels


def question_codes(groups: np.ndarray, n_rollouts: int) -> np.ndarray:
    """[R] int: each rollout's question as 0 .. G - 1, in the order of the sorted question ids."""
    groups = np.asarray(groups)
    if groups.shape != (n_rollouts,):
        raise ValueError(f"groups must have shape ({n_rollouts},), one question per rollout, got {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(n_rollouts)


def is_stratified(codes: np.ndarray) -> bool:
    """True when some question has several rollouts: only then can labels move within questions."""
    return bool(len(codes)) and bool(np.bincount(codes).max() > 1)


def permuted_labels(
    labels: np.ndarray, groups: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> np.ndarray:
    """[P, R] bool: each row a random permutation of labels.

    When some question has more than one rollout, labels move only among the rollouts of one
    question (a stratified permutation: each question keeps its number of correct rollouts, so the
    null keeps question difficulty); otherwise they move across all rollouts. Questions with one
    rollout then keep their label. Rows are drawn in batches of PERMUTATION_BATCH; rng advances the
    same way whatever the batching.
    """
    labels = np.asarray(labels, dtype=bool)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    codes = question_codes(groups, len(labels))
    if not is_stratified(codes):
        codes = np.zeros_like(codes)  # one stratum: permute across all rollouts
    slots = np.argsort(codes, kind="stable")  # rollout positions, question after question
    slot_question, slot_label = codes[slots].astype(np.float64), labels[slots]
    out = np.empty((n_permutations, len(labels)), dtype=bool)
    for start in range(0, n_permutations, PERMUTATION_BATCH):
        batch = min(PERMUTATION_BATCH, n_permutations - start)
        # Question id + a uniform key in [0, 1): sorting shuffles slots within each question only.
        shuffle = np.argsort(slot_question + rng.random((batch, len(labels))), axis=1)
        out[start:start + batch][:, slots] = slot_label[shuffle]
    return out
