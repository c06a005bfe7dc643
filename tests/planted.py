"""Planted sparse dictionaries: data whose true features are known, for training tests."""
from __future__ import annotations

import numpy as np
import torch

from qsae.sae import TopKSAE


def planted_rows(n_rows: int, d: int, n_atoms: int, active: int, seed: int, atom_seed: int | None = None) -> np.ndarray:
    """Rows that are sums of `active` unit atoms out of `n_atoms`, with positive coefficients: a TopK
    SAE with k = active can explain them almost fully. The atoms come from `atom_seed` (default
    `seed`), so rows drawn with another `seed` and the same `atom_seed` are held-out data."""
    atoms = np.random.default_rng(seed if atom_seed is None else atom_seed).standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    rng = np.random.default_rng(seed if atom_seed is None else [seed, atom_seed])
    support = np.argsort(rng.random((n_rows, n_atoms)), axis=1)[:, :active]
    codes = np.zeros((n_rows, n_atoms))
    np.put_along_axis(codes, support, rng.uniform(0.5, 2.0, (n_rows, active)), axis=1)
    return (codes @ atoms).astype(np.float32)


def variance_explained(sae: TopKSAE, rows: np.ndarray) -> float:
    """Pooled: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    x = torch.from_numpy(rows)
    with torch.no_grad():
        x_hat = sae(x)
    return 1.0 - ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


# The quality gate's dataset: sums of ACTIVE of N_ATOMS known unit atoms with positive coefficients,
# plus small Gaussian noise, the atoms used with power-law frequencies like features in real
# activations. Shared by the in-process gate (test_quality) and the command-line one (test_cli).
GATE_D, GATE_ATOMS, GATE_ACTIVE, GATE_ROWS, GATE_BATCH = 64, 256, 4, 16_384, 256
ZIPF_EXPONENT = 1.2  # atom i (from 1) is used with probability proportional to i ** -1.2
NOISE = 0.02  # per-dimension standard deviation, against coefficients in [0.5, 2]


def power_law_rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows [GATE_ROWS, GATE_D] float32, atoms [GATE_ATOMS, GATE_D] unit norm, occurrences per atom).
    Each row draws GATE_ACTIVE distinct atoms with probability proportional to the power law, by the
    Gumbel top-k trick (the top GATE_ACTIVE of log p + Gumbel noise are a weighted sample without
    replacement)."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((GATE_ATOMS, GATE_D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    log_p = -ZIPF_EXPONENT * np.log(np.arange(1, GATE_ATOMS + 1))
    keys = log_p + rng.gumbel(size=(GATE_ROWS, GATE_ATOMS))
    support = np.argpartition(-keys, GATE_ACTIVE, axis=1)[:, :GATE_ACTIVE]
    codes = np.zeros((GATE_ROWS, GATE_ATOMS))
    np.put_along_axis(codes, support, rng.uniform(0.5, 2.0, (GATE_ROWS, GATE_ACTIVE)), axis=1)
    rows = codes @ atoms + NOISE * rng.standard_normal((GATE_ROWS, GATE_D))
    return rows.astype(np.float32), atoms, np.bincount(support.ravel(), minlength=GATE_ATOMS)


def learnable(occurrences: np.ndarray, batch_size: int = GATE_BATCH) -> np.ndarray:
    """Atoms present on average in at least one row of every batch, so that every optimiser step
    carries some gradient toward them. Rarer atoms get a latent only by chance and are not held
    against the trainer."""
    return occurrences >= GATE_ROWS // batch_size


def best_cosine(atoms: np.ndarray, sae: TopKSAE) -> np.ndarray:
    """For each true atom, the largest cosine similarity with any decoder row."""
    decoder = sae.W_dec.detach().double().numpy()
    decoder /= np.linalg.norm(decoder, axis=1, keepdims=True)
    return (atoms @ decoder.T).max(axis=1)
