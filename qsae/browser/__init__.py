"""The release's static feature browser: `browser/` in the release, opened from file:// with no
server and no network request.

index.html, app.js and style.css (this package's files) are copied as they are; the data goes
beside them as JS files that call `QSAE.add(name, object)`, so the page loads each with a <script>
tag (which file:// allows, where fetch is refused): data/release.js (front page), one
data/layer_L.js per layer (its table of live features) and one data/layer_L_block_B.js per
BLOCK_SIZE features (their pages), loaded when a feature of the block is opened.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

ASSETS = ("index.html", "app.js", "style.css")
BLOCK_SIZE = 256  # features per block file
TABLE_COLUMNS = ("feature", "fire_rate", "token_auroc", "rollout_auroc", "rollout_q", "max_activation", "tokens")


def data_script(name: str, obj: dict) -> str:
    """A data file's text: QSAE.add("name", {...});"""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"QSAE.add({json.dumps(name)}, {text});\n"


def write_data(out: Path, name: str, obj: dict) -> None:
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data" / f"{name}.js").write_text(data_script(name, obj), encoding="utf-8")


def write_assets(out: Path, charts: Iterable[Path]) -> list[str]:
    """The page's own files, and copies of the charts under charts/; returns the charts' paths in out."""
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    for name in ASSETS:
        shutil.copyfile(here / name, out / name)
    (out / "charts").mkdir(exist_ok=True)
    copied = []
    for chart in charts:
        shutil.copyfile(chart, out / "charts" / chart.name)
        copied.append(f"charts/{chart.name}")
    return copied


def table_row(record: dict) -> list:
    """A feature's row in its layer's table: TABLE_COLUMNS, "tokens" the distinct firing tokens of
    its top contexts (what the filter box searches)."""
    firing = dict.fromkeys(e["tokens"][e["at"]].strip() for e in record["top"])
    return [record["feature"], record["fire_rate"], record["token_auroc"], record["rollout_auroc"],
            record["rollout_q"], record["max_activation"], " ".join(t for t in firing if t)]


class LayerPages:
    """A layer's table and block files, written as its live features' records (feature_data's
    LayerFeatures.record) arrive in ascending feature order: a block file once its block is
    complete, so one block's records are held at a time; the table at close()."""

    def __init__(self, out: Path, layer: int, n_features: int):
        self.out, self.layer, self.n_features = out, layer, n_features
        self.rows: list[list] = []
        self.block: int | None = None
        self.pages: dict[str, dict] = {}

    def add(self, record: dict) -> None:
        if record["feature"] // BLOCK_SIZE != self.block:
            self._write_block()
            self.block, self.pages = record["feature"] // BLOCK_SIZE, {}
        self.pages[str(record["feature"])] = record
        self.rows.append(table_row(record))

    def _write_block(self) -> None:
        if self.block is not None:
            write_data(self.out, f"layer_{self.layer}_block_{self.block}",
                       {"layer": self.layer, "block": self.block, "features": self.pages})

    def close(self) -> int:
        """Writes the last block and the table; returns how many features the table lists."""
        self._write_block()
        self.block, self.pages = None, {}
        write_data(self.out, f"layer_{self.layer}", {"layer": self.layer, "n_features": self.n_features,
                                                     "block_size": BLOCK_SIZE, "columns": list(TABLE_COLUMNS),
                                                     "rows": self.rows})
        return len(self.rows)
