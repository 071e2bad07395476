"""Cluster engines a job can run on besides the local one: Slurm, Kubernetes with Kueue, Ray.

Each module has a `Backend` with the same verbs (submit, status, why, cancel, logs) that
stoker.jobs.Client calls for jobs whose record names that backend."""

from __future__ import annotations

from dataclasses import dataclass

from stoker.config import ConfigError


class BackendError(ConfigError):
    """The cluster cannot be reached or refused the request; one line saying which and why."""


@dataclass
class RemoteStatus:
    state: str  # one of stoker's states
    native: str  # the engine's own words for it
    reason: str = ""
    exit_code: int | None = None
    restarts: int = 0  # requeues or evictions: preemptions


def backend(name: str, pool):
    """The Backend object for `name` configured from the pool's table of that name."""
    if name == "slurm":
        from stoker.jobs.backends.slurm import Backend
    elif name == "kubernetes":
        from stoker.jobs.backends.kubernetes import Backend
    elif name == "ray":
        from stoker.jobs.backends.ray import Backend
    else:
        raise ConfigError(f"backend: no backend {name!r}; backends are: local, slurm, kubernetes, ray")
    return Backend(pool)
