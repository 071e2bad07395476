"""A team's job queue: priorities, quotas, gang admission and checkpoint-aware preemption.

`Client` is the Python SDK (the same verbs as `stoker jobs`); `JobSpec` describes a job.
"""

from stoker.jobs.client import Client, QueueStatus
from stoker.jobs.spec import JobSpec, PoolConfig, load_pool, load_spec

__all__ = ["Client", "JobSpec", "PoolConfig", "QueueStatus", "load_pool", "load_spec"]
