"""Jobs on Kubernetes with Kueue: the objects, rendered from a JobSpec and queues.toml.

A job becomes an Indexed Job (one pod per host, completion index = node rank) and a headless
Service that gives pod 0 a stable name for the torchrun rendezvous. Kueue's labels put it in a
LocalQueue with a WorkloadPriorityClass; Kueue then admits it whole, and preempts it by deleting
its pods: they get SIGTERM and `terminationGracePeriodSeconds` to checkpoint to the run volume,
and the recreated pods resume from it. `render_kueue` turns queues.toml into the ResourceFlavor,
ClusterQueues (quota, cohort, borrowing and lending limits, preemption), LocalQueues and WorkloadPriorityClasses.

queues.toml's `[kubernetes]` table:

    namespace = "ml"                 # where Jobs and LocalQueues live (default "default")
    image = "registry/stoker:0.1"    # the container image with stoker installed (required to submit)
    slot_resource = "nvidia.com/gpu" # what a slot is (default); "cpu" on CPU-only clusters
    run_volume_claim = "runs"        # a PVC mounted at /workspace, the jobs' working directory
    port = 29500                     # the rendezvous port on pod 0
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any

from stoker.config import ConfigError
from stoker.jobs.backends import BackendError, RemoteStatus
from stoker.jobs.spec import JobSpec, PoolConfig, check_keys, check_port
from stoker.launch import with_nproc

KUEUE_API = "kueue.x-k8s.io/v1beta2"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICA = "node"  # the JobSet's one replicated Job: a pod per host
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
        check_keys(d, {f.name for f in fields(cls)}, where)
        cfg = cls(**d)
        dns_name(cfg.namespace, f"{where}.namespace")
        check_port(cfg.port, f"{where}.port")
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


def job_objects(spec: JobSpec, job_id: int, cfg: KubeConfig, workload: str = "job") -> list[dict[str, Any]]:
    """The objects that run `spec` on `spec.hosts` pods: a headless Service and an Indexed Job,
    or (workload "jobset") one JobSet, whose controller makes the Job and the Service itself."""
    if not cfg.image:
        raise ConfigError("queues.toml: kubernetes.image: needed to run jobs on Kubernetes (an image with stoker)")
    if spec.slots % spec.hosts:
        raise ConfigError(f"slots: {spec.slots} slots do not split evenly over {spec.hosts} hosts")
    name = object_name(spec, job_id)
    # Pod 0's stable DNS name serves the rendezvous.
    first = f"{name}-{REPLICA}-0-0" if workload == "jobset" else f"{name}-0"
    per_host = spec.slots // spec.hosts
    argv = with_nproc(spec.command, per_host)
    if argv[:2] == ["stoker", "train"] and spec.hosts > 1:
        # Node rank from the pod's completion index.
        argv += [f"--nnodes={spec.hosts}", "--node-rank=$(NODE_RANK)",
                 f"--master={first}.{name}.{cfg.namespace}.svc:{cfg.port}"]
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
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container],
                           "terminationGracePeriodSeconds": int(spec.grace if spec.grace is not None else 60)}
    if cfg.run_volume_claim:
        container["workingDir"] = WORKDIR
        container["volumeMounts"] = [{"name": "runs", "mountPath": WORKDIR}]
        pod["volumes"] = [{"name": "runs", "persistentVolumeClaim": {"claimName": cfg.run_volume_claim}}]
    labels = {"app.kubernetes.io/managed-by": "stoker", "stoker/job-id": str(job_id)}
    kueue = {QUEUE_LABEL: dns_name(spec.queue, "queue"), PRIORITY_LABEL: dns_name(spec.priority, "priority")}
    job_spec: dict[str, Any] = {"completionMode": "Indexed", "completions": spec.hosts, "parallelism": spec.hosts,
                                "template": {"metadata": {"labels": dict(labels, **{"stoker/job": name})},
                                             "spec": pod}}
    if spec.max_runtime:
        job_spec["activeDeadlineSeconds"] = int(spec.max_runtime)
    if workload == "jobset":
        # A failed pod fails its Job; the JobSet then restarts every Job (all hosts) up to `retries` times.
        job_spec["backoffLimit"] = 0
        return [{"apiVersion": JOBSET_API, "kind": "JobSet",
                 "metadata": {"name": name, "namespace": cfg.namespace, "labels": dict(labels, **kueue)},
                 "spec": {"suspend": True, "network": {"enableDNSHostnames": True, "subdomain": name,
                                                       "publishNotReadyAddresses": True},
                          "failurePolicy": {"maxRestarts": spec.retries},
                          "replicatedJobs": [{"name": REPLICA, "replicas": 1, "template": {
                              "metadata": {"labels": dict(labels)}, "spec": job_spec}}]}}]
    pod["subdomain"] = name
    job_spec.update(backoffLimit=spec.retries, suspend=True)
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": name, "namespace": cfg.namespace, "labels": dict(labels, **kueue)},
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
        if q.lending_limit is not None:
            quota["lendingLimit"] = q.lending_limit
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


# Talking to a cluster: the kubernetes client with the user's kubeconfig.

class _Api:
    """The client's API objects, or one-line errors when there is no cluster to talk to."""

    def __init__(self):
        try:
            import kubernetes
        except ImportError:
            raise BackendError("kubernetes: the client is not installed: pip install 'stoker[kubernetes]'") from None
        self.k8s = kubernetes
        try:
            # $KUBECONFIG as it is now (the client reads it once, when imported)
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except Exception as e:  # ConfigException, a missing or unreadable file: no cluster configured
            raise BackendError(f"kubernetes: no usable kubeconfig (~/.kube/config or $KUBECONFIG): {e}") from None
        self.core = kubernetes.client.CoreV1Api()
        self.batch = kubernetes.client.BatchV1Api()
        self.custom = kubernetes.client.CustomObjectsApi()

    def call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self.k8s.client.exceptions.ApiException as e:
            raise BackendError(f"kubernetes: {what}: {e.status} {e.reason}") from None
        except Exception as e:  # urllib3's connection errors: the API server is not reachable
            raise BackendError(f"kubernetes: {what}: cannot reach the API server ({type(e).__name__})") from None

    def read(self, what: str, fn, *args):
        """`call`, but None when the object does not exist (404)."""
        try:
            return self.call(what, fn, *args)
        except BackendError as e:
            if f"{what}: 404 " in str(e):
                return None
            raise


def apply(objects: list[dict[str, Any]], api: _Api | None = None) -> str:
    """Create the objects; the job's remote id: the Job's name, or `jobset/NAME` for a JobSet."""
    api = api or _Api()
    name = ""
    for obj in objects:
        ns, what = obj["metadata"].get("namespace", "default"), f"create {obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "Service":
            api.call(what, api.core.create_namespaced_service, ns, obj)
        elif obj["kind"] == "Job":
            api.call(what, api.batch.create_namespaced_job, ns, obj)
            name = obj["metadata"]["name"]
        elif obj["kind"] == "JobSet":
            api.call(what, api.custom.create_namespaced_custom_object, *_JOBSET, ns, "jobsets", obj)
            name = f"jobset/{obj['metadata']['name']}"
    return name


_KUEUE_PLURALS = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues", "LocalQueue": "localqueues",
                  "WorkloadPriorityClass": "workloadpriorityclasses"}


def apply_kueue(objects: list[dict[str, Any]], api: _Api | None = None) -> list[str]:
    """Create the Kueue objects, or replace those that exist (queues.toml changed); one line each."""
    api = api or _Api()
    group, version = KUEUE_API.split("/")
    done = []
    for obj in objects:
        kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace")
        plural = _KUEUE_PLURALS[kind]
        where = (group, version, ns, plural) if ns else (group, version, plural)
        create = api.custom.create_namespaced_custom_object if ns else api.custom.create_cluster_custom_object
        try:
            api.call(f"create {kind} {name}", create, *where, obj)
            done.append(f"created {kind} {name}")
            continue
        except BackendError as e:
            if f"create {kind} {name}: 409 " not in str(e):  # anything but "it exists already"
                raise
        get = api.custom.get_namespaced_custom_object if ns else api.custom.get_cluster_custom_object
        replace = api.custom.replace_namespaced_custom_object if ns else api.custom.replace_cluster_custom_object
        current = api.call(f"read {kind} {name}", get, *where, name)
        body = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
        api.call(f"replace {kind} {name}", replace, *where, name, body)
        done.append(f"updated {kind} {name}")
    return done


_JOBSET = ("jobset.x-k8s.io", "v1alpha2")


def _jobset(remote_id: str) -> str | None:
    """The JobSet's name when the remote id names one."""
    return remote_id[len("jobset/"):] if remote_id.startswith("jobset/") else None


def _jobset_status(name: str, namespace: str, api: _Api) -> RemoteStatus:
    from stoker.jobs.policy import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED

    js = api.read(f"read JobSet {name}", api.custom.get_namespaced_custom_object_status, *_JOBSET, namespace,
                  "jobsets", name)
    if js is None:
        return RemoteStatus(CANCELLED, "the JobSet is gone (deleted)")
    conds = {c.get("type"): c for c in js.get("status", {}).get("conditions", []) if c.get("status") == "True"}
    if "Completed" in conds:
        return RemoteStatus(SUCCEEDED, "Completed", exit_code=0)
    if "Failed" in conds:
        return RemoteStatus(FAILED, "Failed", conds["Failed"].get("reason") or "")
    if js.get("spec", {}).get("suspend"):
        return RemoteStatus(PENDING, "Suspended", "waiting for Kueue to admit it")
    return RemoteStatus(RUNNING, "Running", f"{js.get('status', {}).get('restarts', 0)} restart(s)")


def status(name: str, namespace: str, api: _Api | None = None) -> RemoteStatus:
    """The state of the Job (or `jobset/NAME`) in stoker's words and Kubernetes'."""
    from stoker.jobs.policy import CANCELLED, FAILED, PENDING, PREEMPTED, RUNNING, SUCCEEDED

    api = api or _Api()
    if _jobset(name):
        return _jobset_status(_jobset(name), namespace, api)
    job = api.read(f"read Job {name}", api.batch.read_namespaced_job_status, name, namespace)
    if job is None:
        return RemoteStatus(CANCELLED, "the Job is gone (deleted)")
    conds = {c.type: c for c in (job.status.conditions or []) if c.status == "True"}
    if "Complete" in conds:
        return RemoteStatus(SUCCEEDED, "Complete", exit_code=0)
    if "Failed" in conds:
        return RemoteStatus(FAILED, "Failed", conds["Failed"].reason or "")
    if job.spec.suspend:
        # Kueue holds it: not admitted yet, or evicted (preempted) and waiting to run again.
        evicted = "Suspended" in conds and job.status.start_time is not None
        return RemoteStatus(PREEMPTED if evicted else PENDING, "Suspended",
                            "evicted by Kueue; waits to run again" if evicted else "waiting for Kueue to admit it")
    return RemoteStatus(RUNNING, "Running", f"{job.status.active or 0} pod(s) active")


def logs(name: str, namespace: str, api: _Api | None = None) -> str:
    api = api or _Api()
    js = _jobset(name)
    selector = f"jobset.sigs.k8s.io/jobset-name={js}" if js else f"batch.kubernetes.io/job-name={name}"
    pods = api.call(f"list pods of {name}", api.core.list_namespaced_pod, namespace, label_selector=selector)
    out = []
    for pod in sorted(pods.items, key=lambda p: p.metadata.name):
        text = api.call(f"read log of {pod.metadata.name}", api.core.read_namespaced_pod_log, pod.metadata.name,
                        namespace)
        out.append(f"--- pod {pod.metadata.name}\n{text}")
    return "".join(out)


def cancel(name: str, namespace: str, api: _Api | None = None) -> None:
    """Delete the Job (its pods get SIGTERM and their grace period) and its Service, or the JobSet."""
    api = api or _Api()
    if _jobset(name):
        api.call(f"delete JobSet {_jobset(name)}", api.custom.delete_namespaced_custom_object, *_JOBSET, namespace,
                 "jobsets", _jobset(name), propagation_policy="Background")
        return
    api.call(f"delete Job {name}", api.batch.delete_namespaced_job, name, namespace,
             propagation_policy="Background")
    api.call(f"delete Service {name}", api.core.delete_namespaced_service, name, namespace)


def why(name: str, namespace: str, queue: str, api: _Api | None = None) -> list[str]:
    """Kueue's answer: the Workload's condition message and the position in its LocalQueue
    (Kueue's visibility API)."""
    api = api or _Api()
    name = _jobset(name) or name  # the Workload's owner: the Job, or the JobSet
    lines = []
    wls = api.call("list Kueue workloads", api.custom.list_namespaced_custom_object, "kueue.x-k8s.io", "v1beta2",
                   namespace, "workloads")
    for wl in wls.get("items", []):
        owners = [o.get("name") for o in wl.get("metadata", {}).get("ownerReferences", [])]
        if name not in owners:
            continue
        for c in wl.get("status", {}).get("conditions", []):
            if c.get("type") in ("QuotaReserved", "Admitted", "Evicted", "Preempted") and c.get("message"):
                lines.append(f"Kueue {c['type']}={c.get('status')}: {c['message']}")
        try:
            pending = api.custom.api_client.call_api(
                f"/apis/visibility.kueue.x-k8s.io/v1beta1/namespaces/{namespace}/localqueues/{queue}/pendingworkloads",
                "GET", response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True)
            for item in pending.get("items", []):
                if item.get("metadata", {}).get("name") == wl["metadata"]["name"]:
                    lines.insert(0, f"position {item.get('positionInLocalQueue', 0) + 1} in LocalQueue {queue} "
                                    f"({item.get('positionInClusterQueue', 0) + 1} in its ClusterQueue)")
        except Exception:
            lines.append("(Kueue's visibility API did not answer: no position)")
    return lines or [f"Job {name}: no Kueue workload found for it (is Kueue installed, and the queue labels right?)"]


class Backend:
    """The verbs stoker.jobs.Client calls for a Kubernetes job (remote_id: the Job's name)."""

    name = "Kubernetes"

    def __init__(self, pool, api: _Api | None = None):
        self.pool, self.cfg, self._api = pool, KubeConfig.from_dict(pool.kubernetes), api

    @property
    def api(self) -> _Api:
        if self._api is None:
            self._api = _Api()
        return self._api

    def submit(self, spec: JobSpec, job_id: int, job_dir) -> str:
        objects = job_objects(spec, job_id, self.cfg, self.pool.queues[spec.queue].workload)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "objects.yaml").write_text(to_yaml(objects))  # what was sent, for the record
        return apply(objects, self.api)

    def status(self, remote_id: str, spec: JobSpec) -> RemoteStatus:
        return status(remote_id, self.cfg.namespace, self.api)

    def why(self, remote_id: str, spec: JobSpec) -> list[str]:
        return why(remote_id, self.cfg.namespace, spec.queue, self.api)

    def cancel(self, remote_id: str, spec: JobSpec) -> None:
        cancel(remote_id, self.cfg.namespace, self.api)

    def logs(self, remote_id: str, spec: JobSpec) -> str | None:
        return logs(remote_id, self.cfg.namespace, self.api)
