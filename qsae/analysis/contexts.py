"""Top-activating rows per feature, and their text contexts for the release's characterization file."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from qsae.analysis.features import firing_entries


def top_activating_rows(
    indices: np.ndarray, values: np.ndarray, n_features: int, top: int = 10
) -> dict[int, list[tuple[int, float]]]:
    """For every feature that fires, its `top` largest activations as (row, activation), descending.

    Equal activations keep row order. One sort of all firing entries by (feature, -activation, row);
    each feature's group then starts with its strongest rows.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    rows, features, activations = firing_entries(indices, values, n_features)
    order = np.lexsort((rows, -activations, features))
    rows, features, activations = rows[order], features[order], activations[order]
    n_active = np.bincount(features, minlength=n_features)
    rank = np.arange(len(features)) - (np.cumsum(n_active) - n_active)[features]
    keep = rank < top
    result: dict[int, list[tuple[int, float]]] = {}
    for feature, row, activation in zip(features[keep].tolist(), rows[keep].tolist(), activations[keep].tolist()):
        result.setdefault(feature, []).append((row, activation))
    return result


def describe_contexts(
    top_rows: dict[int, list[tuple[int, float]]],
    row_token: Sequence[str],
    row_context: Callable[[int], tuple[str, str]],
) -> dict[str, list[dict]]:
    """JSON-ready {"<feature>": [{"row", "token", "left", "activation"}]}.

    "token" is row_token[row]; "left" is the text before it, the first item of row_context(row).
    """
    return {
        str(feature): [
            {"row": row, "token": row_token[row], "left": row_context(row)[0], "activation": activation}
            for row, activation in rows
        ]
        for feature, rows in top_rows.items()
    }
