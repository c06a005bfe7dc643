"""Joining a Ray cluster, or starting a local one."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import ray

from qsae import console
from qsae.config import ray_host_port

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds with a clear message, instead of Ray's endless retries, when nothing listens at
    the address or what does is not Ray: Ray's GCS and client server speak gRPC, so they answer an
    HTTP/2 preface with a SETTINGS frame (frame type 4). Clusters with TLS on are not probed."""
    try:
        with socket.create_connection(ray_host_port(address), timeout=timeout_s) as connection:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            connection.settimeout(timeout_s)
            connection.sendall(HTTP2_PREFACE)
            reply = connection.recv(9)
    except socket.timeout:
        reply = b""
    except OSError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {err}") from err
    if len(reply) < 4 or reply[3] != 4:
        raise ConnectionError(f"something answers at {address}, but it is not a Ray cluster (no gRPC reply); "
                              "give the head's GCS port (6379 unless set otherwise) or ray://host:10001")


# Ray Train's controller takes a worker's report once per poll (every 2 s by default), and the worker's
# next report waits until it has: polling faster keeps per-step metric reports from stalling training.
# A local Ray gets it here; cluster jobs get it from cluster/runtime_env.yaml.
LOCAL_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}


def ray_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else RAY_ADDRESS (as under `ray job submit`); None starts a local Ray."""
    return address or os.environ.get("RAY_ADDRESS")


def check_ray_address(address: str | None) -> None:
    """Before anything is written: a cluster address answers as Ray (check_reachable)."""
    address = ray_address(address)
    if address and address not in ("auto", "local"):
        check_reachable(address)


def connect_ray(address: str | None) -> bool:
    """Join the cluster in `address` or RAY_ADDRESS, else start a local Ray; False where this process
    is connected already."""
    address = ray_address(address)
    if ray.is_initialized():
        return False
    runtime_env = LOCAL_RUNTIME_ENV if address is None else None
    ray.init(address=address, log_to_driver=True, configure_logging=False, runtime_env=runtime_env)
    return True


@contextmanager
def ray_session(address: str | None):
    """Connected to Ray within the block; disconnected after it where the block connected, so Ray's
    last lines arrive while its output still goes where the caller sent it."""
    connected = connect_ray(address)
    console.handle_sigterm()  # Ray's own handler would abort the driver with a stack dump
    try:
        yield
    finally:
        if connected:
            ray.shutdown()
