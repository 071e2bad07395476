"""A team's job queue: priorities, quotas, gang admission and checkpoint-aware preemption.

`Client` is the Python SDK (the same verbs as `stoker jobs`); `JobSpec` describes a job.
Imported on first use, so that the shim each job attempt runs under starts without them.
"""

from importlib import import_module

_WHERE = {"Client": "client", "QueueStatus": "client", "JobSpec": "spec", "PoolConfig": "spec",
          "load_pool": "spec", "load_spec": "spec"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"stoker.jobs.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'stoker.jobs' has no attribute {name!r}")
