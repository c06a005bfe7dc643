"""A plain install: the wheel, installed into a fresh target, runs the embedded default from another
directory (its config, the bundled questions and the browser's files ship in the package)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
# The embedded default, shortened: the point is what the installed package finds, not the statistics.
SHORT = ["rollout.num_questions=12", "rollout.max_new_tokens=64", "capture.questions_per_shard=4", "train.epochs=2",
         "release.bootstrap=20", "release.permutations=50", "causal.questions=2"]


def test_a_plain_install_runs_the_embedded_default_from_any_directory(tiny_path, tmp_path):
    source, wheels, target = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A copy without build outputs: setuptools would reuse a checkout's build/ and hide a missing file.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "runs", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True,
                   capture_output=True)
    [wheel] = wheels.glob("qsae-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, ahead of the source checkout
    found = subprocess.run([sys.executable, "-c", "import qsae.config as c; print(c.__file__); print(c.DEFAULT_CONFIG)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(path).is_relative_to(target) for path in found), found
    done = subprocess.run([str(target / "bin" / "qsae"), "release", "--out", "run", *SHORT], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    release = elsewhere / "run" / "release"
    assert f"release written to {release}" in done.stdout
    assert (release / "README.md").exists() and (release / "browser" / "index.html").exists()
