"""Starting or joining the Ray cluster every tunefetch job runs on."""

from __future__ import annotations

import os
from contextlib import contextmanager

from cluster.config import TunefetchConfig

# Lines worker processes print for the user (training progress): the CLI shows them and sends
# the rest of the frameworks' output to a log file.
PROGRESS_MARKER = "[tunefetch]"

# Process-level switches Ray reads at start-up, before any of its processes exist:
# - a single-node Ray binds and advertises 127.0.0.1 instead of the host's interface, so all
#   traffic of the demo and tests stays on loopback;
# - no auth token file is written into the user's home directory;
# - Ray Train's controller collects reported metrics every 0.2 s instead of 2 s: a worker's
#   next `report` waits until the previous one is collected, and we report at every log step.
_LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                  "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def configure_process(config: TunefetchConfig) -> None:
    """Sets Ray's start-up switches for a local Ray; call before anything imports `ray`
    (Ray reads some of them at import time)."""
    if not config.ray.address:
        for key, value in _LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)


@contextmanager
def ray_runtime(config: TunefetchConfig):
    """Connects to `ray.address` or starts a local Ray; shuts down only what it started."""
    configure_process(config)
    import ray

    if ray.is_initialized():
        yield
        return
    if config.ray.address:
        ray.init(address=config.ray.address, log_to_driver=True)
    else:
        ray.init(num_cpus=config.ray.num_cpus, _node_ip_address="127.0.0.1",
                 configure_logging=True, logging_level="WARNING", log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
