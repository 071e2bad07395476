"""Jobs on a real Ray cluster (one head started by the test) through the Ray Jobs API: a
data-preparation job, a training job stopped with a checkpoint and resubmitted, Ray's pending
reason, and the local record when the head cannot be reached."""

import filecmp
import sys
import time

import pytest

from conftest import TINY, assert_curves_close, losses, run_train

from stoker.config import ConfigError
from stoker.data.prepare import default_sources, prepare
from stoker.jobs import Client
from stoker.jobs.backends.ray import RayConfig, entrypoint, submit_args
from stoker.jobs.spec import JobSpec, pool_from_dict

from .ray_cluster import RayHead, free_port


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(cpus=2).start()
    yield head
    head.stop()


def _client(home, address):
    (home / "queues.toml").write_text(f'[ray]\naddress = "{address}"\n'
                                      '[queues.default]\nnominal_quota = 2\nbackend = "ray"\n')
    return Client(home, autostart=False)


def test_entrypoint_and_resources_from_the_spec(tmp_path):
    spec = JobSpec.from_dict({"name": "tune a/b", "command": ["stoker", "train", "run.toml"], "slots": 2, "cpus": 1.5,
                              "gpus": 1, "memory": "3GiB", "env": {"A": "x y"}, "workdir": "/data/my runs"}, "t")
    args = submit_args(spec, 7, RayConfig())
    assert args["entrypoint"] == "cd '/data/my runs' && exec stoker train run.toml --nproc=2"
    assert (args["entrypoint_num_cpus"], args["entrypoint_num_gpus"], args["entrypoint_memory"]) == (3.0, 2, 3 * 2**30)
    assert args["runtime_env"]["env_vars"] == {"STOKER_JOB_ID": "7", "OMP_NUM_THREADS": "1", "A": "x y"}
    assert args["submission_id"].startswith("stoker-7-tune-a-b-") and "working_dir" not in args["runtime_env"]
    up = submit_args(spec, 7, RayConfig(upload_workdir=True))
    assert up["runtime_env"]["working_dir"] == "/data/my runs" and up["entrypoint"].startswith("stoker train")
    assert submit_args(spec, 7, RayConfig())["submission_id"] != args["submission_id"]  # unique per submission
    with pytest.raises(ConfigError, match="one node.*asks for 2 hosts"):
        entrypoint(JobSpec.from_dict({"command": ["stoker", "train"], "slots": 2, "hosts": 2}, "t"), RayConfig())
    for bad, msg in [({"adress": "x"}, "ray.adress: unknown"), ({"upload_workdir": "yes"}, "true or false"),
                     ({"address": 8265}, "head's address")]:
        with pytest.raises(ConfigError, match=msg):
            pool_from_dict({"ray": bad})


def test_data_preparation_job_on_ray_matches_a_local_run(ray_head, tmp_path):
    c = _client(tmp_path, ray_head.address)
    src = default_sources()[0] / "json"
    j = c.submit(command=["stoker", "prepare", "--out", str(tmp_path / "ray-data"), "--vocab-size", "300",
                          "--val-fraction", "0.1", str(src)], name="prep", workdir=tmp_path, cpus=1)
    s = c.wait(j, timeout=180)
    assert (s.state, s.exit_code, s.backend) == ("succeeded", 0, "ray") and s.remote_id.startswith(f"stoker-{j}-prep-")
    assert "tokens" in "".join(c.logs(j)).lower()
    prepare([src], tmp_path / "here", vocab_size=300, val_fraction=0.1, progress=False)
    # BPE training and packing are deterministic: the job's files equal a run in this process.
    for name in ("tokenizer.json", "train_00000.bin", "val_00000.bin"):
        assert filecmp.cmp(tmp_path / "ray-data" / name, tmp_path / "here" / name, shallow=False), name
    failing = c.submit(command=["sh", "-c", "echo bad input >&2; exit 3"], workdir=tmp_path)
    f = c.wait(failing, timeout=120)
    assert (f.state, f.exit_code) == ("failed", 3) and "bad input" in "".join(c.logs(failing))


def test_pending_reason_and_cancel_of_a_waiting_job(ray_head, tmp_path):
    c = _client(tmp_path, ray_head.address)
    big = c.submit(command=["true"], cpus=4, workdir=tmp_path)  # the head has 2 CPUs: Ray holds it
    time.sleep(2)
    assert c.status(big).state == "pending"
    w = c.why(big).text()
    assert "PENDING" in w and "needs 4 CPU" in w
    # Ray cannot withdraw a job waiting for resources; stoker's record says cancelled at once.
    assert c.cancel(big) == "cancelled" and "waiting for Ray's resources" in c.status(big).reason


def _train(data, out, steps):
    return ["stoker", "train", *TINY, f"--data.dir={data}", f"--train.out_dir={out}", f"--train.steps={steps}",
            f"--train.decay_steps={steps}", "--train.ckpt_every=0"]


def test_stopped_train_job_checkpoints_and_resumes_when_resubmitted(ray_head, small_data, tmp_path):
    c = _client(tmp_path, ray_head.address)
    out, steps = tmp_path / "run", 200
    j = c.submit(command=_train(small_data, out, steps), name="train", workdir=tmp_path)
    deadline = time.time() + 180
    while not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 10):
        assert time.time() < deadline and c.status(j).state in ("pending", "running"), "".join(c.logs(j))
        time.sleep(0.1)
    first = c.status(j).remote_id
    c.cancel(j)  # Ray: SIGTERM to the job's processes; the trainer writes its checkpoint and exits
    assert c.wait(j, timeout=120).state == "cancelled"
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and 10 <= int(ckpts[0].name.split("_")[1]) < steps
    with pytest.raises(ConfigError, match="only a job that failed or was cancelled"):
        c.resubmit(c.submit(command=["sleep", "30"], workdir=tmp_path))  # running: not sent twice
    assert c.resubmit(j) == j
    s = c.wait(j, timeout=300)
    assert s.state == "succeeded" and s.remote_id != first
    assert "resum" in "".join(c.logs(j)).lower()
    assert [e.detail for e in s.history if e.detail.startswith("resubmitting")] == [f"resubmitting (was {first})"]
    # The reference in a process of its own with one thread, as the job had (OMP_NUM_THREADS
    # from its cpus): the resume restores model, optimizer, schedule, data position and RNG, so
    # the curves agree to fp32 rounding.
    run_train(small_data, tmp_path / "ref", f"--train.steps={steps}", f"--train.decay_steps={steps}",
              "--train.ckpt_every=0")
    assert_curves_close(losses(out), losses(tmp_path / "ref"), range(1, steps + 1), 1e-5)


def test_unreachable_head_keeps_the_job_for_resubmit(ray_head, tmp_path):
    c = _client(tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ConfigError) as e:
        c.submit(command=[sys.executable, "-c", "print('made it')"], workdir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "cannot reach the Ray head" in msg and "stoker jobs resubmit" in msg
    [rec] = c.list()
    assert rec.state == "failed" and "not submitted" in rec.reason and not rec.remote_id
    _client(tmp_path, ray_head.address)  # the address fixed in queues.toml
    assert c.resubmit(rec.id) == rec.id
    s = c.wait(rec.id, timeout=120)
    assert s.state == "succeeded" and "made it" in "".join(c.logs(rec.id))
