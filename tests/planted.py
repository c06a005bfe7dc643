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
