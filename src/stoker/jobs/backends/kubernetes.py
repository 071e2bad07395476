"""Jobs on Kubernetes with Kueue: the objects, rendered from a JobSpec and queues.toml.

A job becomes an Indexed Job (one pod per host, completion index = node rank) and a headless
Service that gives pod 0 a stable name for the torchrun rendezvous. Kueue's labels put it in a
LocalQueue with a WorkloadPriorityClass; Kueue then admits it whole, and preempts it by deleting
its pods: they get SIGTERM and `terminationGracePeriodSeconds` to checkpoint to the run volume,
and the recreated pods resume from it. `render_kueue` turns queues.toml into the ResourceFlavor,
ClusterQueues (quota, cohort, borrowing, preemption), LocalQueues and WorkloadPriorityClasses.

queues.toml's `[kubernetes]` table:

    namespace = "ml"                 # where Jobs and LocalQueues live (default "default")
    image = "registry/stoker:0.1"    # the container image with stoker installed (required to submit)
    slot_resource = "nvidia.com/gpu" # what a slot is (default); "cpu" on CPU-only clusters
    run_volume_claim = "runs"        # a PVC mounted at /workspace, the jobs' working directory
    port = 29500                     # the rendezvous port on pod 0
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from stoker.config import ConfigError
from stoker.jobs.spec import JobSpec, PoolConfig

KUEUE_API = "kueue.x-k8s.io/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
FLAVOR = "default-flavor"
WORKDIR = "/workspace"
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass
class KubeConfig:
    namespace: str = "default"
    image: str = ""
    slot_resource: str = "nvidia.com/gpu"
    run_volume_claim: str = ""
    port: int = 29500

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "queues.toml: kubernetes") -> "KubeConfig":
        known = {"namespace", "image", "slot_resource", "run_volume_claim", "port"}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"{where}.{bad[0]}: unknown; keys are: {', '.join(sorted(known))}")
        cfg = cls(**d)
        dns_name(cfg.namespace, f"{where}.namespace")
        if isinstance(cfg.port, bool) or not isinstance(cfg.port, int) or not 1 <= cfg.port <= 65535:
            raise ConfigError(f"{where}.port: expected 1-65535, got {cfg.port!r}")
        return cfg


def dns_name(name: str, what: str) -> str:
    """`name` if it is a valid Kubernetes object name (RFC 1123 label), else a one-line error."""
    if not isinstance(name, str) or len(name) > 63 or not _NAME.fullmatch(name):
        raise ConfigError(f"{what}: {name!r} is not a Kubernetes name (lowercase letters, digits and '-', "
                          "starting and ending with a letter or digit, at most 63 characters)")
    return name


def object_name(spec: JobSpec, job_id: int) -> str:
    """A name for the job's objects: its own name made DNS-safe, with the id for uniqueness."""
    base = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")[:40] or "job"
    return f"{base}-{job_id}"


def _quantity(bytes_: int) -> str:
    return f"{max(1, bytes_ // 2**20)}Mi"


def job_objects(spec: JobSpec, job_id: int, cfg: KubeConfig) -> list[dict[str, Any]]:
    """The headless Service and the Indexed Job that run `spec` on `spec.hosts` pods."""
    if not cfg.image:
        raise ConfigError("queues.toml: kubernetes.image: needed to run jobs on Kubernetes (an image with stoker)")
    if spec.slots % spec.hosts:
        raise ConfigError(f"slots: {spec.slots} slots do not split evenly over {spec.hosts} hosts")
    name = object_name(spec, job_id)
    per_host = spec.slots // spec.hosts
    argv = list(spec.command)
    if argv[:2] == ["stoker", "train"]:
        argv += [f"--nproc={per_host}"] if not any(a.startswith("--nproc") for a in argv) else []
        if spec.hosts > 1:
            # Node rank from the pod's completion index; pod 0 serves the rendezvous.
            argv += [f"--nnodes={spec.hosts}", "--node-rank=$(NODE_RANK)",
                     f"--master={name}-0.{name}.{cfg.namespace}.svc:{cfg.port}"]
    resources: dict[str, Any] = {cfg.slot_resource: per_host if cfg.slot_resource != "cpu"
                                 else int(per_host * spec.cpus)}
    if cfg.slot_resource != "cpu":
        resources["cpu"] = f"{per_host * spec.cpus:g}"
    if spec.gpus and cfg.slot_resource != "nvidia.com/gpu":
        resources["nvidia.com/gpu"] = spec.gpus * per_host
    if spec.memory:
        resources["memory"] = _quantity(spec.memory // spec.hosts)
    env = [{"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
           {"name": "STOKER_JOB_ID", "value": str(job_id)},
           {"name": "OMP_NUM_THREADS", "value": str(max(1, int(spec.cpus)))}]
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    container: dict[str, Any] = {"name": "main", "image": cfg.image, "command": argv, "env": env,
                                 "ports": [{"containerPort": cfg.port, "name": "rendezvous"}],
                                 "resources": {"requests": resources, "limits": dict(resources)}}
    pod: dict[str, Any] = {"subdomain": name, "restartPolicy": "Never", "containers": [container],
                           "terminationGracePeriodSeconds": int(spec.grace if spec.grace is not None else 60)}
    if cfg.run_volume_claim:
        container["workingDir"] = WORKDIR
        container["volumeMounts"] = [{"name": "runs", "mountPath": WORKDIR}]
        pod["volumes"] = [{"name": "runs", "persistentVolumeClaim": {"claimName": cfg.run_volume_claim}}]
    labels = {"app.kubernetes.io/managed-by": "stoker", "stoker/job-id": str(job_id)}
    job_spec: dict[str, Any] = {"completionMode": "Indexed", "completions": spec.hosts, "parallelism": spec.hosts,
                                "backoffLimit": spec.retries, "suspend": True,
                                "template": {"metadata": {"labels": dict(labels, **{"stoker/job": name})},
                                             "spec": pod}}
    if spec.max_runtime:
        job_spec["activeDeadlineSeconds"] = int(spec.max_runtime)
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": name, "namespace": cfg.namespace,
                        "labels": dict(labels, **{QUEUE_LABEL: dns_name(spec.queue, "queue"),
                                                  PRIORITY_LABEL: dns_name(spec.priority, "priority")})},
           "spec": job_spec}
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": cfg.namespace, "labels": labels},
               "spec": {"clusterIP": "None", "selector": {"stoker/job": name},
                        "ports": [{"name": "rendezvous", "port": cfg.port}], "publishNotReadyAddresses": True}}
    return [service, job]


_RECLAIM = {"any": "Any", "lower_priority": "LowerPriority", "never": "Never"}
_WITHIN = {"lower_priority": "LowerPriority", "never": "Never"}
_STRATEGY = {"best_effort_fifo": "BestEffortFIFO", "strict_fifo": "StrictFIFO"}


def kueue_objects(pool: PoolConfig, cfg: KubeConfig) -> list[dict[str, Any]]:
    """queues.toml as Kueue objects: one flavor, a ClusterQueue and a LocalQueue per queue
    (same name), a WorkloadPriorityClass per priority class. Quotas count `slot_resource`."""
    out: list[dict[str, Any]] = [{"apiVersion": KUEUE_API, "kind": "ResourceFlavor",
                                  "metadata": {"name": FLAVOR}, "spec": {}}]
    for q in pool.queues.values():
        dns_name(q.name, f"queues.{q.name}")
        quota: dict[str, Any] = {"name": cfg.slot_resource, "nominalQuota": q.nominal_quota}
        if q.borrowing_limit is not None:
            quota["borrowingLimit"] = q.borrowing_limit
        spec: dict[str, Any] = {
            "namespaceSelector": {},
            "queueingStrategy": _STRATEGY[q.strategy],
            "resourceGroups": [{"coveredResources": [cfg.slot_resource],
                                "flavors": [{"name": FLAVOR, "resources": [quota]}]}],
            "preemption": {"withinClusterQueue": _WITHIN[q.within_queue],
                           "reclaimWithinCohort": _RECLAIM[q.reclaim_within_cohort] if q.cohort else "Never"}}
        if q.cohort:
            spec["cohortName"] = dns_name(q.cohort, f"queues.{q.name}.cohort")
        out.append({"apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": q.name}, "spec": spec})
        out.append({"apiVersion": KUEUE_API, "kind": "LocalQueue",
                    "metadata": {"name": q.name, "namespace": cfg.namespace}, "spec": {"clusterQueue": q.name}})
    for name, value in sorted(pool.priorities.items(), key=lambda kv: kv[1]):
        out.append({"apiVersion": KUEUE_API, "kind": "WorkloadPriorityClass",
                    "metadata": {"name": dns_name(name, f"priorities.{name}")}, "value": value,
                    "description": f"stoker priority class {name}"})
    return out


def to_yaml(objects: list[dict[str, Any]]) -> str:
    import yaml

    return "---\n".join(yaml.safe_dump(o, sort_keys=False) for o in objects)
