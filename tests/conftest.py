"""Shared fixtures: the cached tiny model and one local Ray for the tests that need it."""
from __future__ import annotations

import pytest
import torch

from qsae.models import load_model, resolve_model_path


@pytest.fixture(scope="session")
def tiny_path() -> str:
    """The tiny Qwen3.5 hybrid model (built once, then cached under QSAE_CACHE or ~/.cache/qsae)."""
    return resolve_model_path("tiny")


@pytest.fixture(scope="session")
def tiny(tiny_path):
    """(model, tokenizer) in float32 on CPU."""
    torch.manual_seed(0)
    return load_model(tiny_path, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray cluster; logical CPUs above the core count so actors and trainers fit at once."""
    import ray  # imported here: the interop environment (SAELens, sparsify) has no Ray

    from qsae.distributed.connect import LOCAL_RUNTIME_ENV

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env=LOCAL_RUNTIME_ENV)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium (tests/browser.py); skipped where none is installed, except in CI."""
    from browser import Browser, skip_unless_chromium

    skip_unless_chromium()
    with Browser() as browser:
        yield browser
