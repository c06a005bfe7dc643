"""The README's cluster command for real: `ray job submit --working-dir . --runtime-env
cluster/runtime_env.yaml -- python jobs/release.py ...` against a Ray head started with `ray start`.

The head runs on loopback, on ports of its own and under a temporary directory of its own, so the
in-process `ray.init()` clusters of the other tests neither find it nor clash with it. It has a token
of its own (Ray token auth, as a `ray start --head` has by default where a token exists) that only
this module's subprocesses see. It is stopped by signalling its process group, not with `ray stop`,
which would kill every Ray on the machine, the other tests' included.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow  # Ray, subprocesses or whole runs: `make test` runs it, `make test-fast` not

ROOT = Path(__file__).resolve().parent.parent
# This interpreter's bin/: its `ray`, and the `python` that the job's entrypoint names. The head runs
# the entrypoint with its own PATH, so it gets this environment's Python and packages.
BIN = Path(sys.executable).parent
SMALL = ["rollout.num_questions=8", "train.epochs=3", "train.n_features=64", "train.k=8", "release.bootstrap=20",
         "release.permutations=50", "causal.enabled=false", "autointerp.enabled=false"]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def head_env(token: str) -> dict[str, str]:
    """The environment of the head and of the job client: this one, less any Ray address, plus the token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain: stop at once on SIGTERM
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def wait_for_jobs_api(address: str, token: str, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"the Jobs API at {address} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` stops the processes it started; then whatever is left of its
    process group (workers, the job's driver) is killed."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head with the Jobs API on loopback; yields (dashboard address, client environment)."""
    token = secrets.token_hex(16)
    env = head_env(token)
    gcs_port, dashboard_port, agent_port, client_port = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="qsae-ray-")  # short: Ray's unix sockets live under it
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    command = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(agent_port), "--ray-client-server-port", str(client_port),
        "--min-worker-port", "0", "--max-worker-port", "0",
        "--num-cpus", "4", "--object-store-memory", str(10**9),
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    with open(log, "w") as log_file:
        head = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_for_jobs_api(address, token, head, log)
        yield address, env
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not port_open(gcs_port) and not port_open(dashboard_port), "the Ray head is still running"


def submit(address: str, env: dict, *entrypoint: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address,
         "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"),
         "--", *entrypoint],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def test_job_imports_the_shipped_working_dir(ray_head):
    address, env = ray_head
    done = submit(address, env, "python", "-c", "import os, qsae; print('QSAE_FROM', qsae.__file__, os.getcwd(), sep='|')", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("QSAE_FROM|"))
    _, module_file, cwd = line.split("|")
    assert not Path(cwd).is_relative_to(ROOT), "the job ran in the checkout, not in the shipped working dir"
    assert Path(module_file) == Path(cwd) / "qsae" / "__init__.py", "qsae was not imported from the shipped copy"


def test_job_submit_runs_the_pipeline(ray_head, tiny_path, tmp_path):
    """The README's cluster command, on configs/tiny_vllm.toml where vLLM is installed (vLLM rollouts
    and vLLM-hooked capture in the job's actor pool), else on the embedded default."""
    address, env = ray_head
    out = tmp_path / "run"
    vllm = importlib.util.find_spec("vllm") is not None
    config, layers = (["--config", "configs/tiny_vllm.toml"], ["1", "3", "5"]) if vllm else ([], ["3", "7", "11"])
    done = submit(address, env, "python", "jobs/release.py", *config, "--out", str(out), *SMALL)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    release = out / "release"
    assert f"release written to {release}" in done.stdout  # the driver's own log, streamed back
    summary = json.loads((release / "final_summary.json").read_text())
    assert sorted(summary["layers"], key=int) == layers
    for row in summary["layers"].values():
        assert 0 < row["variance_explained"] <= 1
        assert row["dead"] + row["rare"] + row["healthy"] + row["dense"] == 64
    assert summary["rollouts"]["n"] == 8
    card = (release / "README.md").read_text()
    assert card.startswith("---\n") and all(f"L{layer}" in card for layer in layers)
    for layer in layers:
        assert (release / f"sae_L{layer}_n64_k8.safetensors").exists()
    rollouts = pq.read_table(out / "rollouts.parquet").to_pylist()
    assert {r["engine"] for r in rollouts} == {"vllm" if vllm else "transformers"}
    manifest = json.loads((out / "activations" / "manifest.json").read_text())
    stored = sum(entry["rows"][layers[1]] for entry in manifest["shards"].values())
    assert stored == sum(r["n_response_tokens"] for r in rollouts)
    # the fidelity in the model's loss (for vLLM's rollouts, through transformers' Qwen3ForCausalLM)
    fidelity = json.loads((release / "fidelity.json").read_text())["layers"]
    assert sorted(fidelity, key=int) == layers
    assert all(entry["ce_clean"] < entry["ce_zero"] and entry["n_tokens"] > 0 for entry in fidelity.values())
