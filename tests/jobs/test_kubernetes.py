"""Jobs and queues as Kubernetes and Kueue objects, checked offline: the built-in kinds with
kubernetes-validate (the API server's own schemas), Kueue's kinds against the CRD schemas
Kueue publishes (tests/jobs/data/kueue-v1beta2.json)."""

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from stoker.cli import main
from stoker.config import ConfigError
from stoker.jobs.backends.kubernetes import KubeConfig, job_objects, kueue_objects
from stoker.jobs.spec import JobSpec, pool_from_dict

K8S_VERSION = "1.33"
KUEUE = json.loads((Path(__file__).parent / "data" / "kueue-v1beta2.json").read_text())["schemas"]
JOBSET = json.loads((Path(__file__).parent / "data" / "jobset-v1alpha2.json").read_text())["schemas"]["JobSet"]


def unknown_fields(obj, schema, path=""):
    """Keys of `obj` the schema does not name, where it names its fields (CRD schemas allow
    unknown fields by default; the API server prunes them, so a typo would vanish silently)."""
    out = []
    if isinstance(obj, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for k, v in obj.items():
            if k not in schema["properties"]:
                out.append(f"{path}.{k}")
            else:
                out += unknown_fields(v, schema["properties"][k], f"{path}.{k}")
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out
POOL = {"slots": 8, "kubernetes": {"image": "registry.example/stoker:0.1", "namespace": "ml", "run_volume_claim": "runs"},
        "priorities": {"urgent": 500},
        "queues": {"team-a": {"nominal_quota": 4, "cohort": "lab", "borrowing_limit": 2},
                   "team-b": {"nominal_quota": 4, "cohort": "lab", "strategy": "strict_fifo", "lending_limit": 3,
                              "reclaim_within_cohort": "lower_priority", "within_queue": "never"}}}


def train_spec(**kw):
    return JobSpec(command=["stoker", "train", "run.toml", "--train.out_dir=runs/big"], name="big run", queue="team-a",
                   priority="low", **kw)


def test_a_two_host_job_is_a_valid_indexed_job_with_its_rendezvous():
    cfg = KubeConfig.from_dict(POOL["kubernetes"])
    service, job = job_objects(train_spec(slots=8, hosts=2, max_runtime="2h", grace="120s", memory="64GiB"), 7, cfg)
    for obj in (service, job):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any unknown or mistyped field
    name = job["metadata"]["name"]
    assert name == "big-run-7" and service["metadata"]["name"] == name and service["spec"]["clusterIP"] == "None"
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and labels["kueue.x-k8s.io/priority-class"] == "low"
    s = job["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"], s["suspend"]) == ("Indexed", 2, 2, True)
    assert s["activeDeadlineSeconds"] == 7200 and s["backoffLimit"] == 3
    pod = s["template"]["spec"]
    assert pod["subdomain"] == name and pod["terminationGracePeriodSeconds"] == 120
    c = pod["containers"][0]
    # One torchrun per host: 4 ranks each, the node rank from the completion index, pod 0 the master.
    assert c["command"][-4:] == ["--nproc=4", "--nnodes=2", "--node-rank=$(NODE_RANK)",
                                 f"--master={name}-0.{name}.ml.svc:29500"]
    rank = next(e for e in c["env"] if e["name"] == "NODE_RANK")
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert c["resources"]["requests"] == {"nvidia.com/gpu": 4, "cpu": "4", "memory": "32768Mi"}
    assert c["volumeMounts"][0]["mountPath"] == c["workingDir"] and pod["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "runs"}
    assert service["spec"]["selector"] == {"stoker/job": name} == {"stoker/job": s["template"]["metadata"]["labels"]["stoker/job"]}


def test_a_queue_that_says_jobset_gets_a_valid_jobset():
    pool = pool_from_dict({**POOL, "queues": {**POOL["queues"], "team-a": {**POOL["queues"]["team-a"],
                                                                           "workload": "jobset"}}})
    cfg = KubeConfig.from_dict(POOL["kubernetes"])
    [js] = job_objects(train_spec(slots=8, hosts=2, max_runtime="2h", grace="120s"), 7, cfg,
                       pool.queues["team-a"].workload)
    jsonschema.validate(js, JOBSET)
    assert unknown_fields(js, JOBSET) == []
    name = js["metadata"]["name"]
    assert (js["apiVersion"], js["kind"], name) == ("jobset.x-k8s.io/v1alpha2", "JobSet", "big-run-7")
    labels = js["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and labels["kueue.x-k8s.io/priority-class"] == "low"
    s = js["spec"]
    assert s["suspend"] is True and s["failurePolicy"] == {"maxRestarts": 3}
    # The JobSet controller makes the headless Service: pods are NAME-node-0-K.NAME.
    assert s["network"] == {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True}
    [rj] = s["replicatedJobs"]
    assert (rj["name"], rj["replicas"]) == ("node", 1)
    # The Job it stamps out is a valid batch/v1 Job: one pod per host, indexed, failing fast
    # (the JobSet restarts all hosts together).
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{name}-node-0"}, "spec": rj["template"]["spec"]}
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    j = rj["template"]["spec"]
    assert (j["completionMode"], j["completions"], j["parallelism"], j["backoffLimit"]) == ("Indexed", 2, 2, 0)
    assert j["activeDeadlineSeconds"] == 7200 and j["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert j["template"]["spec"]["containers"][0]["command"][-1] == f"--master={name}-node-0-0.{name}.ml.svc:29500"
    # The checks catch a wrong field: neither is vacuous.
    assert unknown_fields({**js, "spec": {**s, "maxRestarts": 3}}, JOBSET) == [".spec.maxRestarts"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**js, "spec": {**s, "replicatedJobs": [{**rj, "replicas": "one"}]}}, JOBSET)
    with pytest.raises(ConfigError, match="workload: expected one of job, jobset"):
        pool_from_dict({"queues": {"a": {"nominal_quota": 1, "workload": "pytorchjob"}}})


def test_queues_become_valid_kueue_objects_that_say_what_queues_toml_says():
    pool = pool_from_dict(POOL)
    objects = kueue_objects(pool, KubeConfig.from_dict(POOL["kubernetes"]))
    for obj in objects:
        jsonschema.validate(obj, KUEUE[obj["kind"]])
        assert obj["apiVersion"] == "kueue.x-k8s.io/v1beta2" and unknown_fields(obj, KUEUE[obj["kind"]]) == []
    by = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    a, b = by[("ClusterQueue", "team-a")]["spec"], by[("ClusterQueue", "team-b")]["spec"]
    quota = a["resourceGroups"][0]["flavors"][0]["resources"][0]
    assert quota == {"name": "nvidia.com/gpu", "nominalQuota": 4, "borrowingLimit": 2}
    assert a["cohortName"] == b["cohortName"] == "lab"
    assert b["resourceGroups"][0]["flavors"][0]["resources"][0]["lendingLimit"] == 3
    assert a["preemption"] == {"withinClusterQueue": "LowerPriority", "reclaimWithinCohort": "Any"}
    assert b["preemption"] == {"withinClusterQueue": "Never", "reclaimWithinCohort": "LowerPriority"}
    assert (a["queueingStrategy"], b["queueingStrategy"]) == ("BestEffortFIFO", "StrictFIFO")
    assert by[("LocalQueue", "team-b")]["spec"] == {"clusterQueue": "team-b"}
    assert by[("LocalQueue", "team-b")]["metadata"]["namespace"] == "ml"
    assert {n: o["value"] for (k, n), o in by.items() if k == "WorkloadPriorityClass"} == {
        "low": 0, "normal": 100, "high": 200, "urgent": 500}
    # The schema does catch a wrong field: the check is not vacuous.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**by[("ClusterQueue", "team-a")], "spec": {**a, "queueingStrategy": "LIFO"}},
                            KUEUE["ClusterQueue"])


def test_cli_renders_yaml_and_bad_input_is_one_line(tmp_path, capsys):
    import tomli_w

    (tmp_path / "queues.toml").write_text(tomli_w.dumps(POOL))
    assert main(["jobs", "--home", str(tmp_path), "kueue"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs].count("ClusterQueue") == 2 and len(docs) == 1 + 2 * 2 + 4
    assert main(["jobs", "--home", str(tmp_path), "manifest", "--queue", "team-b", "--slots", "2", "--", "stoker",
                 "train", "--train.steps=10"]) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["Service", "Job"]
    for argv, words in ((["manifest", "--queue", "nope", "--", "true"], "no queue 'nope'"),
                        (["manifest", "--slots", "3", "--hosts", "2", "--queue", "team-a", "--", "true"], "evenly")):
        assert main(["jobs", "--home", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0]
    with pytest.raises(ConfigError, match="not a Kubernetes name"):
        kueue_objects(pool_from_dict({"slots": 1, "queues": {"Team_A": {"nominal_quota": 1}}}), KubeConfig())
    with pytest.raises(ConfigError, match="kubernetes.image"):
        job_objects(train_spec(), 1, KubeConfig())
