"""`stoker jobs` from the command line: bad input is one line and exit 2; --json carries the
fields scripts rely on."""

import json

import pytest

from stoker.cli import main


def run(capsys, home, *argv):
    code = main(["jobs", "--home", str(home), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stoker: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("spec, words", [
    ("command = ['true']\nslot = 2\n", ["unknown field 'slot'", "slots"]),
    ("command = ['true']\nslots = 'two'\n", ["slots", "integer"]),
    ("command = 'true'\n", ["command", "list of strings"]),
    ("name = 'x'\n", ["needs command"]),
    ("command = ['true'\n", ["not valid TOML"]),
    ("command = ['true']\nmax_runtime = 'soon'\n", ["max_runtime", "duration"]),
    ("command = ['true']\nmemory = 'lots'\n", ["memory", "size"]),
    ("command = ['true']\nqueue = 'nope'\n", ["no queue 'nope'", "default"]),
    ("command = ['true']\npriority = 'urgent'\n", ["no class 'urgent'", "low (0), normal (100), high (200)"]),
    ("command = ['true']\nslots = 3\n", ["slots", "never hold more than 2"]),
    ("command = ['true']\nhosts = 2\n", ["hosts", "1 host"]),
    ("command = ['true']\ngpus = 1\n", ["gpus", "this host has 0"]),
    ("command = ['stoker', 'train', '--nproc=3']\nslots = 2\n", ["--nproc 3", "2 slot"]),
    ("command = ['true']\nenv = { A = true }\n", ["env"]),
])
def test_bad_job_specs_are_one_line_and_exit_2(capsys, tmp_path, spec, words):
    home = tmp_path / "jobs"
    home.mkdir()
    (home / "queues.toml").write_text("slots = 2\n")
    (tmp_path / "job.toml").write_text(spec)
    one_line_error(*run(capsys, home, "submit", str(tmp_path / "job.toml"))[::2], *words)
    assert run(capsys, home, "list", "--json")[1].strip() == "[]"  # nothing was queued


@pytest.mark.parametrize("pool, words", [
    ("slots = 2\n[queues.a]\nnominal_quota = 3\n", ["nominal quotas add up to 3", "2"]),
    ("slots = 2\n[queues.a]\nquota = 1\n", ["queues.a.quota", "nominal_quota"]),
    ("slot = 2\n", ["unknown key 'slot'"]),
    ("slots = 2\n[queues.a]\nnominal_quota = 1\nlending_limit = 2\n", ["lending_limit", "0 to nominal_quota (1)"]),
    ("[queues.a]\nnominal_quota = 1\nstrategy = 'lifo'\n", ["strategy", "strict_fifo"]),
    ("[scheduler]\ngrace = 'forever'\n", ["scheduler.grace", "duration"]),
    ("[scheduler]\npatience = 1\n", ["scheduler.patience: unknown", "aging_per_hour, grace, retry_pause"]),
    ("[slurm]\nport = 0\n", ["slurm.port", "1-65535"]),
])
def test_bad_queues_toml_is_one_line_and_exit_2(capsys, tmp_path, pool, words):
    (tmp_path / "queues.toml").write_text(pool)
    one_line_error(*run(capsys, tmp_path, "submit", "--", "true")[::2], "queues.toml", *words)


def test_cli_verbs_on_unknown_or_finished_jobs_and_missing_input(capsys, tmp_path):
    one_line_error(*run(capsys, tmp_path, "status", "7")[::2], "no job 7")
    one_line_error(*run(capsys, tmp_path, "why", "7")[::2], "no job 7")
    one_line_error(*run(capsys, tmp_path, "submit")[::2], "SPEC.toml", "--")
    one_line_error(*run(capsys, tmp_path, "submit", str(tmp_path / "none.toml"))[::2], "no such job spec")
    one_line_error(*run(capsys, tmp_path, "submit", "--slots", "0", "--", "true")[::2], "slots", ">= 1")
    one_line_error(*run(capsys, tmp_path, "submit", "--env", "X", "--", "true")[::2], "NAME=VALUE")
    one_line_error(*run(capsys, tmp_path, "submit", "--workdir", str(tmp_path / "no"), "--", "true")[::2], "workdir")


def test_submit_prints_the_id_and_json_verbs_carry_the_contract_fields(capsys, jobs_home, daemon):
    (jobs_home / "queues.toml").write_text("slots = 2\n[queues.a]\nnominal_quota = 1\ncohort = 'lab'\n"
                                           "[queues.b]\nnominal_quota = 1\ncohort = 'lab'\n")
    daemon.start()
    code, out, _ = run(capsys, jobs_home, "submit", "--queue", "a", "--priority", "high", "--", "sleep", "30")
    assert code == 0 and out.strip() == "1"
    code, out, _ = run(capsys, jobs_home, "submit", "--json", "--queue", "a", "--slots", "2", "--", "true")
    assert json.loads(out) == {"id": 2}
    from stoker.jobs import Client

    c = Client(jobs_home, autostart=False)
    c.wait(1, timeout=30, states=("running",))
    s = json.loads(run(capsys, jobs_home, "status", "1", "--json")[1])
    for key in ("id", "state", "queue", "priority", "slots", "restarts", "preemptions", "exit_code", "history"):
        assert key in s
    assert (s["id"], s["state"], s["queue"], s["priority"], s["slots"]) == (1, "running", "a", "high", 1)
    w = json.loads(run(capsys, jobs_home, "why", "2", "--json")[1])
    # Job 2 needs both slots: a's own one is taken by job 1, and b lends its unused one.
    assert w["state"] == "pending" and w["position"] == 1
    assert any("queue 'a' uses 1 of its nominal quota of 1" in r and "can lend it 1 more" in r for r in w["reasons"])
    q = {x["name"]: x for x in json.loads(run(capsys, jobs_home, "queues", "--json")[1])}
    assert (q["a"]["used"], q["a"]["waiting"], q["b"]["used"]) == (1, 1, 0)
    assert run(capsys, jobs_home, "cancel", "2")[1].strip() == "job 2: cancelled"
    code, out, _ = run(capsys, jobs_home, "cancel", "1")
    assert code == 0 and "SIGTERM" in out
    assert c.wait(1, timeout=30).state == "cancelled"
    one_line_error(*run(capsys, jobs_home, "cancel", "1")[::2], "job 1 already cancelled")
    rows = json.loads(run(capsys, jobs_home, "list", "--json")[1])
    assert [(r["id"], r["state"]) for r in rows] == [(1, "cancelled"), (2, "cancelled")]
