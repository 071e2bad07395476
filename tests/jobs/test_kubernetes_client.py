"""The Kubernetes backend's calls, against a recorded fake of the API (no cluster exists here):
what submit creates, how a Job's status reads as stoker's states, Kueue's answer to why, logs,
cancel; and one-line errors with no kubeconfig or no reachable API server."""

from types import SimpleNamespace as NS

import kubernetes
import pytest
import tomli_w

from stoker.config import ConfigError
from stoker.jobs import Client
from stoker.jobs.backends import kubernetes as k8s

POOL = {"kubernetes": {"image": "registry.example/stoker:0.1", "namespace": "ml"},
        "queues": {"team-a": {"nominal_quota": 4, "backend": "kubernetes"}}}


class FakeApi:
    """Records every call; answers with what the test put in `jobs`, `pods`, `workloads`."""

    def __init__(self):
        self.k8s = kubernetes
        self.calls = []
        self.jobs, self.jobsets, self.pods, self.workloads, self.pending = {}, {}, {}, [], []
        rec = self._rec
        self.core = NS(create_namespaced_service=rec("create_service"), delete_namespaced_service=rec("delete_service"),
                       list_namespaced_pod=rec("list_pods", lambda ns, label_selector: NS(items=[
                           NS(metadata=NS(name=n)) for n in sorted(self.pods)])),
                       read_namespaced_pod_log=rec("read_log", lambda name, ns: self.pods[name]))
        self.batch = NS(create_namespaced_job=rec("create_job"), delete_namespaced_job=rec("delete_job"),
                        read_namespaced_job_status=rec("read_job", self._job))
        self.custom = NS(list_namespaced_custom_object=rec("list_workloads", lambda *a: {"items": self.workloads}),
                         create_namespaced_custom_object=rec("create_custom"),
                         delete_namespaced_custom_object=rec("delete_custom"),
                         get_namespaced_custom_object_status=rec("read_jobset", self._jobset),
                         api_client=NS(call_api=rec("visibility", lambda path, method, **kw: {"items": self.pending})))

    def _rec(self, what, answer=None):
        def call(*args, **kwargs):
            self.calls.append((what, args, kwargs))
            return answer(*args, **kwargs) if answer else None
        return call

    def _job(self, name, ns):
        if name not in self.jobs:
            raise kubernetes.client.exceptions.ApiException(status=404, reason="Not Found")
        return self.jobs[name]

    def _jobset(self, group, version, ns, plural, name):
        if name not in self.jobsets:
            raise kubernetes.client.exceptions.ApiException(status=404, reason="Not Found")
        return self.jobsets[name]

    call, read = k8s._Api.call, k8s._Api.read


def job_status(suspend, active=0, started=False, conditions=()):
    return NS(spec=NS(suspend=suspend), status=NS(active=active, start_time="t" if started else None,
                                                  conditions=[NS(type=t, status="True", reason=r) for t, r in conditions]))


@pytest.fixture
def fake(monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(k8s, "_Api", lambda: api)
    return api


def test_submit_creates_the_objects_and_status_follows_the_job_through_kueue(tmp_path, fake):
    (tmp_path / "queues.toml").write_text(tomli_w.dumps(POOL))
    c = Client(tmp_path, autostart=False)
    j = c.submit(command=["stoker", "train", "--train.steps=10"], queue="team-a", priority="low", slots=2, hosts=2)
    made = [(w, a[0], a[1]["kind"]) for w, a, _ in fake.calls if w.startswith("create")]
    assert made == [("create_service", "ml", "Service"), ("create_job", "ml", "Job")]
    body = fake.calls[1][1][1]
    name = body["metadata"]["name"]
    assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and body["spec"]["completions"] == 2
    fake.jobs[name] = job_status(True)
    s = c.status(j)
    assert (s.backend, s.remote_id) == ("kubernetes", name) and (c.store.job_dir(j) / "objects.yaml").exists()
    # Kueue's life of a Job: suspended until admitted, running, evicted by a preemption, done.
    for st, expect, preempted in ((job_status(True), "pending", 0), (job_status(False, active=2), "running", 0),
                                  (job_status(True, started=True, conditions=[("Suspended", "JobSuspended")]),
                                   "preempted", 1),
                                  (job_status(False, active=2, started=True), "running", 1),
                                  (job_status(False, started=True, conditions=[("Complete", None)]), "succeeded", 1)):
        fake.jobs[name] = st
        s = c.status(j)
        assert (s.state, s.preemptions) == (expect, preempted)
    assert s.exit_code == 0 and [e.state for e in s.history][-1] == "succeeded"


def test_why_logs_and_cancel(tmp_path, fake):
    (tmp_path / "queues.toml").write_text(tomli_w.dumps(POOL))
    c = Client(tmp_path, autostart=False)
    j = c.submit(command=["true"], queue="team-a", slots=4)
    name = c.store.get(j).remote_id
    fake.jobs[name] = job_status(True)
    fake.workloads = [{"metadata": {"name": f"job-{name}-abc", "ownerReferences": [{"name": name}]},
                       "status": {"conditions": [{"type": "QuotaReserved", "status": "False",
                                                  "message": "couldn't assign flavors: insufficient quota"}]}},
                      {"metadata": {"name": "someone-else", "ownerReferences": [{"name": "other"}]}}]
    fake.pending = [{"metadata": {"name": "x"}, "positionInLocalQueue": 0, "positionInClusterQueue": 0},
                    {"metadata": {"name": f"job-{name}-abc"}, "positionInLocalQueue": 1, "positionInClusterQueue": 3}]
    assert c.why(j).reasons == ["position 2 in LocalQueue team-a (4 in its ClusterQueue)",
                                "Kueue QuotaReserved=False: couldn't assign flavors: insufficient quota"]
    path = [a for w, a, _ in fake.calls if w == "visibility"][0][0]
    assert path == "/apis/visibility.kueue.x-k8s.io/v1beta1/namespaces/ml/localqueues/team-a/pendingworkloads"
    fake.pods = {f"{name}-1-xyz": "rank 1 says hi\n", f"{name}-0-abc": "rank 0 says hi\n"}
    assert "".join(c.logs(j)) == f"--- pod {name}-0-abc\nrank 0 says hi\n--- pod {name}-1-xyz\nrank 1 says hi\n"
    c.cancel(j)
    deletes = [(w, a, kw) for w, a, kw in fake.calls if w.startswith("delete")]
    assert deletes == [("delete_job", (name, "ml"), {"propagation_policy": "Background"}),
                       ("delete_service", (name, "ml"), {})]
    del fake.jobs[name]  # the Job is gone once deleted
    assert c.status(j).state == "cancelled"


def test_no_kubeconfig_or_no_api_server_is_one_line_and_the_job_stays_on_record(tmp_path, monkeypatch):
    (tmp_path / "queues.toml").write_text(tomli_w.dumps(POOL))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    c = Client(tmp_path, autostart=False)
    with pytest.raises(ConfigError, match=r"^kubernetes: no usable kubeconfig .*recorded as job 1;") as e:
        c.submit(command=["true"], queue="team-a")
    assert "\n" not in str(e.value)
    assert (c.status(1).state, c.status(1).remote_id) == ("failed", "")
    # A kubeconfig whose API server does not answer (a closed local port).
    (tmp_path / "kubeconfig").write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\nclusters: [{name: x, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "contexts: [{name: x, context: {cluster: x, user: u}}]\nusers: [{name: u, user: {token: t}}]\n")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.setattr(kubernetes.client.Configuration, "retries", 0, raising=False)
    with pytest.raises(ConfigError, match=r"^kubernetes: create Service .*: cannot reach the API server"):
        c.resubmit(1)
    assert c.status(1).state == "failed" and "cannot reach" in c.status(1).reason


def jobset_status(suspend, conditions=()):
    return {"spec": {"suspend": suspend},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r} for t, r in conditions]}}


def test_a_jobset_queue_creates_a_jobset_and_follows_it(tmp_path, fake):
    pool = {**POOL, "queues": {"team-a": {**POOL["queues"]["team-a"], "workload": "jobset"}}}
    (tmp_path / "queues.toml").write_text(tomli_w.dumps(pool))
    c = Client(tmp_path, autostart=False)
    j = c.submit(command=["stoker", "train"], queue="team-a", slots=2, hosts=2)
    [(what, args, _)] = [call for call in fake.calls if call[0].startswith("create")]
    assert what == "create_custom" and args[:4] == ("jobset.x-k8s.io", "v1alpha2", "ml", "jobsets")
    name = args[4]["metadata"]["name"]
    assert args[4]["kind"] == "JobSet" and c.store.get(j).remote_id == f"jobset/{name}"
    # Kueue's life of a JobSet: suspended until admitted, running, suspended again by an
    # eviction (a preemption: it ran before), running, completed.
    for st, expect, preempted in ((jobset_status(True), "pending", 0), (jobset_status(False), "running", 0),
                                  (jobset_status(True, [("Suspended", "SuspendedJobs")]), "preempted", 1),
                                  (jobset_status(False), "running", 1),
                                  (jobset_status(False, [("Completed", "AllJobsCompleted")]), "succeeded", 1)):
        fake.jobsets[name] = st
        s = c.status(j)
        assert (s.state, s.preemptions) == (expect, preempted)
    fake.workloads = [{"metadata": {"name": f"jobset-{name}-1", "ownerReferences": [{"name": name}]},
                       "status": {"conditions": [{"type": "Admitted", "status": "True", "message": "admitted"}]}}]
    j2 = c.submit(command=["true"], queue="team-a")
    name2 = c.store.get(j2).remote_id.split("/")[1]
    fake.jobsets[name2] = jobset_status(True)
    fake.workloads[0]["metadata"]["ownerReferences"] = [{"name": name2}]
    assert c.why(j2).reasons == ["Kueue Admitted=True: admitted"]
    fake.pods = {f"{name2}-node-0-0-abc": "hi\n"}
    assert "".join(c.logs(j2)) == f"--- pod {name2}-node-0-0-abc\nhi\n"
    selectors = [kw["label_selector"] for w, _, kw in fake.calls if w == "list_pods"]
    assert selectors == [f"jobset.sigs.k8s.io/jobset-name={name2}"]
    c.cancel(j2)
    [(_, args, kw)] = [call for call in fake.calls if call[0] == "delete_custom"]
    assert args == ("jobset.x-k8s.io", "v1alpha2", "ml", "jobsets", name2) and kw == {"propagation_policy": "Background"}
    del fake.jobsets[name2]
    assert c.status(j2).state == "cancelled"


def test_kueue_apply_creates_what_is_missing_and_replaces_what_exists(tmp_path, fake, capsys):
    from stoker.cli import main

    existing = {"team-a": {"metadata": {"name": "team-a", "resourceVersion": "41"}}}

    def create(*args):
        if args[-1]["kind"] == "ClusterQueue" and args[-1]["metadata"]["name"] in existing:
            raise kubernetes.client.exceptions.ApiException(status=409, reason="AlreadyExists")

    rec = fake._rec
    fake.custom.create_cluster_custom_object = rec("create_cluster", create)
    fake.custom.create_namespaced_custom_object = rec("create_namespaced", create)
    fake.custom.get_cluster_custom_object = rec("get_cluster", lambda g, v, plural, name: existing[name])
    fake.custom.replace_cluster_custom_object = rec("replace_cluster")
    (tmp_path / "queues.toml").write_text(tomli_w.dumps(POOL))
    assert main(["jobs", "--home", str(tmp_path), "kueue", "--apply"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["created ResourceFlavor default-flavor", "updated ClusterQueue team-a", "created LocalQueue team-a",
                   "created WorkloadPriorityClass low", "created WorkloadPriorityClass normal",
                   "created WorkloadPriorityClass high"]
    [(_, args, _)] = [c for c in fake.calls if c[0] == "replace_cluster"]
    assert args[:4] == ("kueue.x-k8s.io", "v1beta2", "clusterqueues", "team-a")
    assert args[4]["metadata"]["resourceVersion"] == "41" and args[4]["spec"]["resourceGroups"]
    [(_, args, _)] = [c for c in fake.calls if c[0] == "create_namespaced"]
    assert args[:4] == ("kueue.x-k8s.io", "v1beta2", "ml", "localqueues")
