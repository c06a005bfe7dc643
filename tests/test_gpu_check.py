"""benchmarks/gpu_check.py as CI runs it: `--smoke` in a subprocess that can import neither Ray, vLLM
nor accelerate and finds qsae only through the script's own path (as on the GPU machine, which has
none of them and no install of qsae), and its refusal to run the full check without CUDA."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
BLOCKED = ("ray", "vllm", "accelerate")  # the GPU machine has torch and transformers alone
# `python -c LAUNCHER SCRIPT ARGS` runs SCRIPT as `python SCRIPT ARGS` would, after two changes that
# make this machine look like the GPU machine: None in sys.modules makes `import ray` raise
# ModuleNotFoundError and importlib.util.find_spec("ray") return None, exactly as when Ray is not
# installed; and dropping the editable install's finder leaves the script's own sys.path entry as the
# only way to import qsae (the launcher's working directory is a temporary one).
LAUNCHER = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
NO_CUDA_LINE = "no CUDA device: run with --smoke for the CPU check"


def launch(script: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    # No visible GPU whatever the machine: the smoke check then compares CPU with CPU, and the full
    # check must refuse.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", LAUNCHER.format(blocked=BLOCKED), str(script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_path):
    """One `--smoke` run: (process, table text, JSON). tiny_path builds the tiny model beforehand."""
    out_dir = tmp_path_factory.mktemp("gpu_check")
    proc = launch(SCRIPT, "--smoke", "--out", out_dir / "x.txt", cwd=out_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out_dir / "x.txt").is_file() and (out_dir / "x.json").is_file()
    return proc, (out_dir / "x.txt").read_text(), json.loads((out_dir / "x.json").read_text())


def table_rows(text: str) -> list[list[str]]:
    """The table's data lines split into columns (separated by two or more spaces)."""
    lines = text.strip().splitlines()
    assert re.split(r"\s{2,}", lines[1]) == ["what", "setting", "seconds", "tokens/s", "FVU", "held-out FVU",
                                             "peak GPU GiB", "note"]
    return [re.split(r"\s{2,}", line.strip(), maxsplit=7) for line in lines[2:]]


def test_launcher_makes_ray_vllm_and_installed_qsae_unimportable(tmp_path):
    for module in (*BLOCKED, "qsae"):
        script = tmp_path / f"import_{module}.py"
        script.write_text(f"import {module}\n")
        proc = launch(script, cwd=tmp_path)
        assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr, (module, proc.stderr[-2000:])


def test_smoke_writes_the_printed_table_and_its_json(smoke):
    proc, text, raw = smoke
    assert text.strip() in proc.stdout
    assert text.splitlines()[0] == raw["header"]
    assert f"torch {torch.__version__}" in raw["header"] and raw["torch"] == torch.__version__
    assert raw["device"] == "cpu" and raw["cuda"] is None and raw["smoke"] is True
    assert all(row["ok"] for row in raw["rows"]), [row["note"] for row in raw["rows"]]


def test_smoke_has_every_row_and_the_table_matches_the_json(smoke):
    _, text, raw = smoke
    sizes = raw["sizes"]
    expected = [(f"train n={sizes['n_features']}", "original"), (f"train n={sizes['n_features']}", "modern"),
                (f"train n={sizes['n_features']}", "modern bf16"), (f"train n={sizes['wide_features']}", "modern"),
                (f"train n={sizes['wide_features']}", "modern bf16"), ("capture tiny", "cpu vs cpu fp32")]
    assert [(row["what"], row["setting"]) for row in raw["rows"]] == expected
    lines = table_rows(text)
    assert [(line[0], line[1]) for line in lines] == expected
    for line, row in zip(lines, raw["rows"]):
        assert float(line[3].replace(",", "")) == pytest.approx(row["tokens_per_s"], abs=0.5)
        for column, key in ((4, "fvu"), (5, "held_out_fvu")):
            assert line[column] == "-" if row[key] is None else float(line[column]) == pytest.approx(row[key], abs=6e-5)
        assert line[6] == "-" and row["peak_gpu_gib"] is None  # no GPU, no peak
        assert line[7] == row["note"]


def test_smoke_training_rows_learn(smoke):
    _, _, raw = smoke
    training = [row for row in raw["rows"] if row["what"].startswith("train")]
    assert len(training) == 5
    for row in training:
        assert row["tokens_per_s"] > 0 and row["seconds"] > 0, row
        for key in ("fvu", "held_out_fvu"):
            assert math.isfinite(row[key]) and 0 < row[key] < 1.5, (row["what"], row["setting"], key, row[key])
    release_shape = training[:3]
    for row in release_shape:  # every epoch of every row, and the FVU in the table is the last epoch's
        assert row["raw"]["tokens"] == raw["sizes"]["train_rows"] * raw["sizes"]["epochs"]
        assert row["fvu"] == row["raw"]["fvu_per_epoch"][-1]
        assert row["raw"]["config"]["shuffle_buffer_rows"] >= raw["sizes"]["train_rows"]
    assert [row["raw"]["config"]["autocast_bf16"] for row in release_shape] == [False, False, True]


def test_smoke_wide_rows_run_the_budget_and_extrapolate(smoke):
    _, _, raw = smoke
    sizes = raw["sizes"]
    for row in raw["rows"][3:5]:
        info = row["raw"]
        assert info["config"]["n_features"] == sizes["wide_features"]
        assert info["steps"] == info["max_steps"] == math.ceil(sizes["wide_tokens"] / sizes["batch_size"])
        assert not info["cut_by_time"]
        # The rate leaves out the steps before a latent can be dead, and the note's hours follow from it.
        assert info["rate_steps"] == [sizes["wide_dead_after_steps"] + 1, info["steps"]]
        hours = 600_000_000 / row["tokens_per_s"] / 3600
        assert info["extrapolated_hours"] == pytest.approx(hours)
        assert f"{hours:.1f} h" in row["note"]
        assert 0 <= info["dead_fraction"] <= 1


def test_smoke_capture_compares_exactly_on_cpu(smoke):
    _, text, raw = smoke
    row = raw["rows"][-1]
    assert row["raw"]["device"] == "cpu" and row["raw"]["passed"]
    assert row["raw"]["max_abs_diff"] == 0.0 and row["raw"]["max_rel_diff"] == 0.0
    assert row["note"].startswith("PASS") and "PASS" in text.splitlines()[-1]
    assert row["tokens_per_s"] > 0 and row["raw"]["response_rows"] > 0
    assert len(row["raw"]["layers"]) > 1


def test_without_cuda_the_full_check_refuses_and_writes_nothing(tmp_path):
    proc = launch(SCRIPT, cwd=tmp_path)  # the default --out is gpu_check.txt in the working directory
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and NO_CUDA_LINE in proc.stderr
    assert list(tmp_path.iterdir()) == []
