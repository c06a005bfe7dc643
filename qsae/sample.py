"""Which stored rows a run trains on and analyses, and which questions it holds out.

1. Rows left out: special and chat-template tokens, and tokens whose residual norm is far above the
   layer's median (attention sinks: Qwen models give a few tokens norms ~100x the median; they cost
   variance explained and leave dead latents). A token is left out at every layer when its norm is
   high at any captured layer, so every layer trains on the same tokens and one labels.npy serves all.
2. A seeded cap on the rows that remain (capture.max_tokens_per_layer), as the original release's.
3. The split by question: all rollouts of a question fall on one side, so no held-out token has a
   neighbour from its own rollout in training. It is made once, saved as <run>/saes/split.json with
   the rules of 1 and 2, and read back by the trainers and by `qsae analyze`, which refuses a config
   that would change it.
The rows it gives (a RowSelection) are worked out once after training and saved for the stages after
it (analysis/selection.safetensors).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qsae.files import atomic_write, atomic_write_json
from qsae.rollout import read_rollouts
from qsae.rundir import RunDir
from qsae.store import MANIFEST, read_layer_table, read_manifest, sample_rows

SPLIT_FILE = "split.json"
METADATA = ["rollout_id", "position", "special", "norm"]


class SplitMismatchError(ValueError):
    """A config or store that would give other held-out rows than the saved split."""


@dataclass(frozen=True)
class RowRules:
    """What decides the rows: the masks, the cap and the split's seed and size."""

    exclude_special: bool = True
    max_norm_multiple: float = 10.0  # 0 = keep every norm
    max_rows: int | None = None  # seeded cap on the rows that pass the masks
    holdout_fraction: float = 0.1  # share of questions held out
    seed: int = 0  # seeds the cap and the split

    @classmethod
    def from_config(cls, cfg) -> RowRules:
        """The rules a PipelineConfig sets (CONFIG_KEYS)."""
        return cls(**{name: getattr(getattr(cfg, section), key) for name, (section, key) in CONFIG_KEYS.items()})


CONFIG_KEYS = {  # RowRules field -> (config section, key)
    "exclude_special": ("capture", "exclude_special_tokens"),
    "max_norm_multiple": ("capture", "max_norm_multiple"),
    "max_rows": ("capture", "max_tokens_per_layer"),
    "holdout_fraction": ("train", "holdout_fraction"),
    "seed": ("train", "split_seed"),
}


@dataclass
class Split:
    """Held-out and training rollouts, whole questions on each side."""

    rules: RowRules
    heldout_questions: list[str]
    heldout_rollout_ids: list[int]
    train_rollout_ids: list[int]
    rows: dict = field(default_factory=dict)  # the counts of the RowSelection it gave (select_rows)

    def to_json(self) -> dict:
        return {"unit": "question", **asdict(self)}


def split_by_question(question_of: dict[int, str], rules: RowRules) -> Split:
    """Hold out round(fraction x questions) questions (at least one, leaving at least one), chosen with
    default_rng(seed) from the questions in sorted order; every rollout follows its question."""
    questions = sorted(set(question_of.values()))
    if len(questions) < 2:
        raise ValueError(f"a train/held-out split by question needs at least 2 questions, got {len(questions)}")
    n_held = min(max(round(len(questions) * rules.holdout_fraction), 1), len(questions) - 1)
    chosen = np.random.default_rng(rules.seed).choice(len(questions), size=n_held, replace=False)
    held = {questions[i] for i in chosen}
    return Split(
        rules=rules,
        heldout_questions=sorted(held),
        heldout_rollout_ids=sorted(r for r, q in question_of.items() if q in held),
        train_rollout_ids=sorted(r for r, q in question_of.items() if q not in held),
    )


@dataclass
class RowSelection:
    """The sampled rows (store order, the same tokens at every layer) and which are held out."""

    rows: np.ndarray  # sorted row indices into each layer's shards, in shard order
    rollout_id: np.ndarray  # per sampled row
    heldout: np.ndarray  # bool per sampled row
    heldout_positions: dict[int, np.ndarray]  # held-out rollout -> positions of all its rows that pass the masks
    counts: dict  # JSON-ready: stored, special, high_norm, median_norm, norm_threshold, excluded, sampled, ...

    @property
    def train_rows(self) -> np.ndarray:
        """Positions in the sample of the training rows."""
        return np.flatnonzero(~self.heldout)

    @property
    def heldout_rows(self) -> np.ndarray:
        return np.flatnonzero(self.heldout)


def read_row_metadata(store_dir: Path, layers: list[int]) -> dict:
    """rollout_id, position and special of every stored row (the same at every layer; checked), and
    each layer's residual norms. The memory-mapped residuals themselves are not read."""
    tables = {layer: read_layer_table(store_dir, layer).select(METADATA) for layer in layers}
    first = tables[layers[0]]
    meta = {name: first.column(name).to_numpy(zero_copy_only=False) for name in ("rollout_id", "position", "special")}
    for layer, table in tables.items():
        if not (np.array_equal(table.column("rollout_id").to_numpy(), meta["rollout_id"])
                and np.array_equal(table.column("position").to_numpy(), meta["position"])):
            raise ValueError(f"layer {layer}'s rows in {store_dir} are not the same tokens as layer {layers[0]}'s; "
                             "the store is inconsistent")
    meta["norm"] = {layer: table.column("norm").to_numpy() for layer, table in tables.items()}
    return meta


def select_rows(store_dir: Path, layers: list[int], split: Split) -> RowSelection:
    """Apply the split's rules to the store: masks, then the seeded cap, then held-out by rollout."""
    rules = split.rules
    meta = read_row_metadata(Path(store_dir), layers)
    n_stored = len(meta["rollout_id"])
    special = meta["special"] if rules.exclude_special else np.zeros(n_stored, dtype=bool)
    high_any = np.zeros(n_stored, dtype=bool)
    medians, thresholds, high_norm = {}, {}, {}
    for layer, norm in meta["norm"].items():
        medians[str(layer)] = float(np.median(norm[~special])) if (~special).any() else 0.0
        thresholds[str(layer)] = rules.max_norm_multiple * medians[str(layer)] if rules.max_norm_multiple else None
        high = norm > thresholds[str(layer)] if rules.max_norm_multiple else np.zeros(n_stored, dtype=bool)
        high_norm[str(layer)] = int((high & ~special).sum())
        high_any |= high
    excluded = special | high_any
    known = np.isin(meta["rollout_id"], split.heldout_rollout_ids + split.train_rollout_ids)
    if not known.all():
        unknown = sorted(set(meta["rollout_id"][~known].tolist()))[:5]
        raise SplitMismatchError(f"the store in {store_dir} holds rollouts the split does not list (e.g. {unknown}); "
                                 "it was captured again after the split was made: train again")
    eligible = np.flatnonzero(~excluded)
    rows = eligible[sample_rows(len(eligible), rules.max_rows, rules.seed)]
    rollout_id = meta["rollout_id"][rows]
    heldout = np.isin(rollout_id, split.heldout_rollout_ids)
    held = eligible[np.isin(meta["rollout_id"][eligible], split.heldout_rollout_ids)]
    held = held[np.argsort(meta["rollout_id"][held], kind="stable")]  # grouped by rollout, positions in order
    ids, starts = np.unique(meta["rollout_id"][held], return_index=True)
    heldout_positions = {int(r): positions for r, positions in zip(ids, np.split(meta["position"][held], starts[1:]))}
    counts = {
        "stored": n_stored,
        "beyond_float16": left_out_at_capture(Path(store_dir)),
        "special": int(meta["special"].sum()),
        "special_excluded": rules.exclude_special,
        "high_norm": high_norm,
        "median_norm": medians,
        "norm_threshold": thresholds,
        "high_norm_any_layer": int((high_any & ~special).sum()),
        "excluded": int(excluded.sum()),
        "sampled": len(rows),
        "train": int((~heldout).sum()),
        "heldout": int(heldout.sum()),
    }
    return RowSelection(rows, rollout_id, heldout, heldout_positions, counts)


def left_out_at_capture(store_dir: Path) -> int:
    """Tokens capture left out of a float16 store at every layer, their residual beyond its range (as
    high-norm rows are left out of training); a store written without capture's manifest has none."""
    if not (store_dir / MANIFEST).exists():
        return 0
    return sum(entry.get("beyond_float16", 0) for entry in read_manifest(store_dir)["shards"].values())


def plan_split(run: RunDir, layers: list[int], rules: RowRules) -> Split:
    """Split the run's rollouts by question, select the rows, check both sides have rows, and save
    the split (with the selection's counts) where the trainers and the analysis read it."""
    rollouts = read_rollouts(run.rollouts)
    split = split_by_question({r.rollout_id: r.question_id for r in rollouts}, rules)
    selection = select_rows(run.store, layers, split)
    counts = selection.counts
    if counts["train"] < 1 or counts["heldout"] < 2:
        cap = (f"capture.max_tokens_per_layer = {rules.max_rows:,} keeps {counts['sampled']:,} of them"
               if rules.max_rows is not None and rules.max_rows < counts["stored"] - counts["excluded"] else None)
        remedy = f"raise capture.max_tokens_per_layer ({cap})" if cap else "capture more questions"
        raise ValueError(f"the split leaves {counts['train']} training and {counts['heldout']} held-out rows "
                         f"({counts['excluded']} of {counts['stored']} stored rows excluded): {remedy}, or change "
                         "train.holdout_fraction")
    split.rows = counts
    save_split(run, split)
    return split


def save_split(run: RunDir, split: Split) -> None:
    atomic_write_json(run.split, split.to_json())


def training_rows(run: RunDir, layers: list[int]) -> np.ndarray:
    """The store rows (sorted) the SAEs train on, from the run's saved split: what the trainers stream."""
    selection = select_rows(run.store, layers, load_split(run))
    return selection.rows[selection.train_rows]


def load_split(run: RunDir) -> Split:
    path = run.split
    if not path.exists():
        raise FileNotFoundError(f"no train/held-out split at {path}: run the train stage first")
    try:
        data = json.loads(path.read_text())
        return Split(rules=RowRules(**data["rules"]), heldout_questions=data["heldout_questions"],
                     heldout_rollout_ids=data["heldout_rollout_ids"], train_rollout_ids=data["train_rollout_ids"],
                     rows=data.get("rows", {}))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a qsae split file ({err})") from err


def trained_selection(run: RunDir, layers: list[int], rules: RowRules, question_of: dict[int, str]) -> RowSelection:
    """The rows the SAEs were trained and held out on, from the saved split; refuses rules (a config)
    or a store that would give other rows."""
    split = load_split(run)
    check_same_split(split, rules, question_of)
    selection = select_rows(run.store, layers, split)
    if split.rows and selection.counts != split.rows:
        raise SplitMismatchError("the activation store no longer gives the rows the SAEs were trained on "
                                 f"(split.json: {split.rows}, now: {selection.counts}); train again")
    return selection


def save_selection(path: Path, selection: RowSelection) -> None:
    """A RowSelection as one safetensors file (its counts in the metadata), read back by load_selection."""
    held = sorted(selection.heldout_positions)
    lengths = [len(selection.heldout_positions[r]) for r in held]
    arrays = {"rows": selection.rows.astype(np.int64), "rollout_id": selection.rollout_id.astype(np.int64),
              "heldout": selection.heldout.astype(np.uint8), "heldout_rollouts": np.asarray(held, dtype=np.int64),
              "heldout_lengths": np.asarray(lengths, dtype=np.int64),
              "heldout_positions": np.concatenate([np.zeros(0, np.int64)] + [
                  np.asarray(selection.heldout_positions[r], dtype=np.int64) for r in held])}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={"counts": json.dumps(selection.counts)}))


def load_selection(path: Path) -> RowSelection:
    if not path.exists():
        raise FileNotFoundError(f"no row selection at {path}: run the analyze stage first")
    arrays = load_file(str(path))
    with safe_open(str(path), framework="np") as f:
        counts = json.loads(f.metadata()["counts"])
    ends = np.cumsum(arrays["heldout_lengths"])
    positions = np.split(arrays["heldout_positions"], ends[:-1]) if len(ends) else []
    return RowSelection(arrays["rows"], arrays["rollout_id"], arrays["heldout"].astype(bool),
                        {int(r): p for r, p in zip(arrays["heldout_rollouts"].tolist(), positions)}, counts)


def check_same_split(saved: Split, rules: RowRules, question_of: dict[int, str]) -> None:
    """Refuse a config (or rollouts) that would give another split than the one the SAEs trained on."""
    changed = [f"{'.'.join(CONFIG_KEYS[name])}: saved {getattr(saved.rules, name)!r}, config {getattr(rules, name)!r}"
               for name in CONFIG_KEYS if getattr(saved.rules, name) != getattr(rules, name)]
    if changed:
        raise SplitMismatchError("the config would change the train/held-out split the SAEs were trained with ("
                                 + "; ".join(changed) + "); use the run's own settings, or train again")
    if sorted(question_of) != sorted(saved.heldout_rollout_ids + saved.train_rollout_ids):
        raise SplitMismatchError("the run's rollouts are not the ones its split was made from; train again")
