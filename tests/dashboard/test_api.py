"""The dashboard's JSON API, endpoint by endpoint, against real run directories, a real job
store and a real `stoker serve` server; and its refusals (paths outside the runs directory,
a missing or wrong key, a foreign Host, a POST that is not JSON)."""

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from jobs.conftest import Daemon
from stoker.dashboard import Settings, create_app
from stoker.dashboard.app import LOG_TAIL_BYTES, LOOPBACK, parse_metrics, quantile
from stoker.jobs.client import Client
from stoker.runs import open_run_dir
from stoker.serve.client import Client as ServeClient
from stoker.serve.models import ModelPool
from stoker.serve.server import BackgroundServer
from stoker.serve.server import create_app as serve_app

KEY = "s3cret-key"


def client(settings: Settings, key: str | None = KEY) -> TestClient:
    c = TestClient(create_app(settings, allowed_hosts=LOOPBACK), base_url="http://127.0.0.1:8050")
    if key:
        c.headers["Authorization"] = f"Bearer {key}"
    return c


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_runs_table_and_detail_agree_with_the_run_directory(runs_root, tmp_path):
    c = client(Settings(runs_root, jobs_home=tmp_path / "none", api_key=KEY))
    rows = c.get("/api/runs").json()
    assert [r["name"] for r in rows] == ["short"]
    row, recs = rows[0], records(runs_root / "short")
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    assert row["state"] == "done" and row["step"] == row["steps"] == 30
    assert row["loss"] == train[-1]["loss"] and row["val_loss"] == val[-1]["val_loss"]
    assert row["tokens"] == 30 * 8 * 64  # steps x batch_size x seq_len of this run's config
    assert row["params"] == sum(p.numel() for p in _model(runs_root / "short").parameters())
    assert row["layout"] == "single process" and row["checkpoints"] == 1

    d = c.get("/api/runs/short").json()
    assert d["config"]["train"]["steps"] == 30 and d["model_config"]["n_layer"] == 4
    assert d["layout_detail"]["per_rank"][0]["params"] > 0
    assert [k["step"] for k in d["checkpoint_list"]] == [30] and d["checkpoint_list"][0]["bytes"] > 0

    m = c.get("/api/runs/short/metrics").json()
    assert m["train"]["step"] == [r["step"] for r in train] and m["train"]["loss"] == [r["loss"] for r in train]
    assert m["val"]["step"] == [10, 20, 30] and m["val"]["val_loss"] == [r["val_loss"] for r in val]
    # Nothing new since: the next poll is empty.
    again = c.get(f"/api/runs/short/metrics?offset={m['offset']}&inode={m['inode']}").json()
    assert again["train"]["step"] == [] and not again["reset"]
    for bad in ("offset=-1", "offset=x", "inode=-5"):
        assert c.get(f"/api/runs/short/metrics?{bad}").status_code == 422


def _model(run):
    from stoker.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(**json.loads((run / "model.json").read_text())))


def test_metrics_polling_sends_only_new_whole_lines_and_restarts_after_a_rewrite(runs_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "short", root / "live")
    c = client(Settings(root, jobs_home=tmp_path / "none", api_key=KEY))
    first = c.get("/api/runs/live/metrics").json()
    path = root / "live" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({"step": 31, "loss": 1.5, "lr": 1e-3}) + "\n" + '{"step": 32, "lo')  # a line half written
    new = c.get(f"/api/runs/live/metrics?offset={first['offset']}&inode={first['inode']}").json()
    assert new["train"]["step"] == [31] and new["train"]["loss"] == [1.5] and not new["reset"]
    with open(path, "a") as f:
        f.write('ss": 1.25}\n')
    rest = c.get(f"/api/runs/live/metrics?offset={new['offset']}&inode={new['inode']}").json()
    assert rest["train"]["step"] == [32] and rest["train"]["loss"] == [1.25]
    # A resume rewrites the file (a new inode): the whole file comes again, marked as a reset.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    tmp.replace(path)
    after = c.get(f"/api/runs/live/metrics?offset={rest['offset']}&inode={rest['inode']}").json()
    assert after["reset"] and after["train"]["step"] == [1]


def test_state_is_running_while_a_process_holds_the_runs_lock(runs_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "short", root / "r")
    c = client(Settings(root, jobs_home=tmp_path / "none", api_key=KEY))
    lock = open_run_dir(root / "r")  # what `stoker train` holds while it writes there
    try:
        assert c.get("/api/runs/r").json()["state"] == "running"
    finally:
        lock.close()
    assert c.get("/api/runs/r").json()["state"] == "done"
    cfg = root / "r" / "config.toml"
    cfg.write_text(cfg.read_text().replace("steps = 30", "steps = 100"))
    assert c.get("/api/runs").json()[0]["state"] == "stopped"  # ended before its last step


def test_no_path_outside_the_runs_directory_is_readable(runs_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "short", root / "team" / "a")
    outside = tmp_path / "private"
    shutil.copytree(runs_root / "short", outside)  # a run, but not under --runs
    (outside / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 123.25}) + "\n")
    (root / "link").symlink_to(outside)
    (root / ".hidden").mkdir()
    shutil.copytree(runs_root / "short", root / ".hidden" / "run")
    c = client(Settings(root, jobs_home=tmp_path / "none", api_key=KEY))
    assert c.get("/api/runs/team/a").status_code == 200
    names = [r["name"] for r in c.get("/api/runs").json()]
    assert names == ["team/a"]  # the link leads outside; the hidden folder is skipped
    for bad in ["link", "link/metrics", "..%2Fprivate", "%2E%2E/private", "team/..%2F..%2Fprivate", "team/../../private",
                str(outside).lstrip("/"), "%2F" + str(outside).lstrip("/").replace("/", "%2F"), ".hidden/run",
                "team%5C..%5C..%5Cprivate", "team", "team/a/checkpoints", "..", "%2E%2E"]:
        for suffix in ("", "/metrics"):
            r = c.get(f"/api/runs/{bad}{suffix}")
            assert r.status_code == 404, (bad, suffix, r.text)
            assert "123.25" not in r.text
    for bad in ["../app.py", "..%2Fapp.py", "%2E%2E%2F__init__.py", "app.py", "..%2F..%2F..%2Fpyproject.toml"]:
        r = c.get(f"/static/{bad}")
        assert r.status_code == 404 and "import" not in r.text, bad


def test_every_api_path_needs_the_key_when_one_is_set(runs_root, tmp_path):
    s = Settings(runs_root, jobs_home=tmp_path / "jobs", servers=["http://127.0.0.1:9"], api_key=KEY)
    gets = ["/api/runs", "/api/runs/short", "/api/runs/short/metrics", "/api/jobs", "/api/jobs/1", "/api/jobs/1/log",
            "/api/serve", "/api/serve/0/metrics"]
    posts = ["/api/jobs/1/cancel", "/api/jobs/1/resubmit", "/api/serve/0/completions"]
    for key in (None, "wrong", KEY + "x", ""):
        c = client(s, key=None)
        if key is not None:
            c.headers["Authorization"] = f"Bearer {key}"
        for p in gets:
            assert c.get(p).status_code == 401, p
        for p in posts:
            r = c.post(p, json={"prompt": "x"})
            assert r.status_code == 401 and "API key" in r.json()["error"], p
    ok = client(s)
    assert ok.get("/api/runs").status_code == 200 and ok.get("/api/runs/short").status_code == 200
    # The page and the fact that a key is needed are public; nothing else is.
    anon = client(s, key=None)
    assert anon.get("/").status_code == 200 and anon.get("/static/app.js").status_code == 200
    assert anon.get("/api/info").json() == {"auth": True, "actions": True}  # where the data lives: not for them
    assert ok.get("/api/info").json()["runs"] == str(runs_root)
    # Without a key set, reading is open but cancel and resubmit are refused.
    open_ = client(Settings(runs_root, jobs_home=tmp_path / "jobs"), key=None)
    assert open_.get("/api/runs").status_code == 200
    r = open_.post("/api/jobs/1/cancel", json={})
    assert r.status_code == 403 and "--api-key" in r.json()["error"]


def test_foreign_host_and_non_json_posts_are_refused(runs_root, tmp_path):
    c = client(Settings(runs_root, jobs_home=tmp_path / "none", api_key=KEY))
    assert c.get("/api/runs", headers={"Host": "evil.example:8050"}).status_code == 421  # DNS rebinding
    assert c.get("/api/runs", headers={"Host": "localhost:8050"}).status_code == 200
    assert c.get("/api/runs", headers={"Host": "[::1]:8050"}).status_code == 200
    # A form or text/plain POST (what another site's page can send unasked) is refused.
    r = c.post("/api/jobs/1/cancel", content="{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = c.post("/api/jobs/1/cancel", data={"a": "b"})
    assert r.status_code == 415
    page = c.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"] and page.headers["x-frame-options"] == "DENY"


@pytest.fixture
def store(tmp_path):
    home = tmp_path / "jobs"
    home.mkdir()
    (home / "queues.toml").write_text("slots = 1\n")
    yield home
    Daemon(home).cleanup()


def test_jobs_queues_reasons_history_log_cancel_and_resubmit(store, runs_root, tmp_path):
    jobs = Client(store, autostart=False)  # no daemon: the jobs wait, with reasons
    a = jobs.submit(command=["sleep", "30"], workdir=tmp_path, name="first")
    b = jobs.submit(command=["echo", "hi"], workdir=tmp_path, name="second", priority="high")
    c = client(Settings(runs_root, jobs_home=store, api_key=KEY))
    j = c.get("/api/jobs").json()
    assert j["exists"] and [q["name"] for q in j["queues"]] == ["default"]
    q = j["queues"][0]
    assert (q["nominal_quota"], q["used"], q["waiting"], q["borrowed"]) == (1, 0, 2, 0)
    by_id = {x["id"]: x for x in j["jobs"]}
    assert by_id[a]["state"] == "pending" and by_id[a]["command"] == ["sleep", "30"]
    # The high-priority job is first in line; the other says it waits behind it.
    assert by_id[b]["why"][0] == "position 1 of 2 waiting in queue 'default'"
    assert by_id[a]["why"][0] == "position 2 of 2 waiting in queue 'default'"
    assert any(f"{b} (high)" in line for line in by_id[a]["why"])
    assert by_id[a]["why"] == jobs.why(a).reasons

    d = c.get(f"/api/jobs/{a}").json()
    assert d["name"] == "first" and [e["state"] for e in d["history"]] == ["pending"] and d["why"] == jobs.why(a).reasons

    log = store / "jobs" / str(a) / "output.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"line {i}\n" for i in range(20000))  # over the tail's size
    log.write_text(text)
    tail = c.get(f"/api/jobs/{a}/log").json()
    assert tail["truncated"] and tail["bytes"] == len(text) and text.endswith(tail["text"])
    assert len(tail["text"]) == LOG_TAIL_BYTES

    assert c.post(f"/api/jobs/{a}/cancel", json={}).json() == {"id": a, "state": "cancelled"}
    assert jobs.status(a).state == "cancelled"
    assert c.post(f"/api/jobs/{a}/cancel", json={}).status_code == 409  # already cancelled
    assert c.post(f"/api/jobs/{b}/resubmit", json={}).status_code == 409  # still waiting
    r = c.post(f"/api/jobs/{a}/resubmit", json={}).json()
    assert r["was"] == a and r["id"] not in (a, b)
    assert jobs.status(r["id"]).spec.command == ["sleep", "30"] and jobs.status(r["id"]).state in ("pending", "admitted", "running")
    for bad in ("/api/jobs/999", "/api/jobs/999/log"):
        assert c.get(bad).status_code == 404
    assert c.post("/api/jobs/999/cancel", json={}).status_code == 404
    assert c.post(f"/api/jobs/{a}/delete", json={}).status_code == 404
    assert c.get("/api/jobs/x").status_code == 422


def test_no_job_store_is_shown_as_such_and_not_created(runs_root, tmp_path):
    c = client(Settings(runs_root, jobs_home=tmp_path / "nojobs", api_key=KEY))
    assert c.get("/api/jobs").json() == {"home": str(tmp_path / "nojobs"), "exists": False, "queues": [], "jobs": []}
    assert c.get("/api/jobs/1").status_code == 404
    assert not (tmp_path / "nojobs").exists()


def test_quantile_interpolates_within_buckets_as_prometheus_does():
    # histogram_quantile: rank q*total, linear within the bucket that reaches it.
    b = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)]
    assert quantile(0.5, b) == pytest.approx(0.1 + 0.4 * (20 - 10) / (30 - 10))
    assert quantile(0.25, b) == pytest.approx(0.1 * 10 / 10)
    assert quantile(0.99, b) == pytest.approx(0.5 + 0.5 * (39.6 - 30) / 10)
    assert quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.99, [(1.0, 1.0), (float("inf"), 10.0)]) == 1.0  # past the last finite bound


@pytest.fixture(scope="module")
def server(runs_root):
    torch.set_num_threads(1)
    pool = ModelPool({"short": runs_root / "short"}, max_batch=4)
    with BackgroundServer(serve_app(pool, api_key=KEY)) as url:
        yield url
    pool.close()


def test_served_models_metrics_and_a_streamed_playground(server, runs_root, tmp_path):
    c = client(Settings(runs_root, jobs_home=tmp_path / "none", servers=[server, "http://127.0.0.1:9"], api_key=KEY))
    s = c.get("/api/serve").json()
    assert s[0]["ok"] and [m["id"] for m in s[0]["models"]] == ["short"] and s[0]["models"][0]["context_length"] == 64
    assert not s[1]["ok"] and "cannot reach the server" in s[1]["error"]
    assert c.get("/api/serve/1/metrics").json()["ok"] is False
    assert c.get("/api/serve/2/metrics").status_code == 404

    want = ServeClient(server, api_key=KEY).complete("def main", model="short", max_tokens=12, temperature=0)
    r = c.post("/api/serve/0/completions", json={"model": "short", "prompt": "def main", "max_tokens": 12})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2  # streamed in pieces
    text = "".join(ch["text"] for e in events[:-1] for ch in json.loads(e)["choices"])
    assert text == want["choices"][0]["text"]

    m = c.get("/api/serve/0/metrics").json()
    short = m["models"]["short"]
    assert short["generated_tokens"] == 24 and short["requests"] == 2
    assert 0 < short["latency_p50"] <= short["latency_p90"] <= short["latency_p99"]
    assert short["queue_depth"] == 0 and short["memory_bytes"] > 0

    r = c.post("/api/serve/0/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "not found" in r.json()["error"]
    assert c.post("/api/serve/1/completions", json={"prompt": "x"}).status_code == 502
    assert c.post("/api/serve/0/completions", json={"prompt": ""}).status_code == 422
    assert c.post("/api/serve/0/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 422
    assert c.post("/api/serve/0/completions", json={"prompt": "x", "bogus": 1}).status_code == 422
    # A key the server refuses is the dashboard's configuration, not the browser's: 502, not 401.
    wrong = client(Settings(runs_root, jobs_home=tmp_path / "none", servers=[server], api_key=KEY, serve_api_key="nope"))
    assert "API key" in wrong.get("/api/serve").json()[0]["error"]
    r = wrong.post("/api/serve/0/completions", json={"prompt": "x"})
    assert r.status_code == 502 and "401" in r.json()["error"]


def test_parse_metrics_reads_the_servers_exposition():
    text = """# TYPE stoker_tokens_per_second gauge
stoker_tokens_per_second{model="a"} 12.5
# TYPE stoker_queue_depth gauge
stoker_queue_depth{model="a"} 3.0
# TYPE stoker_request_latency_seconds histogram
stoker_request_latency_seconds_bucket{finish_reason="length",le="1.0",model="a"} 1.0
stoker_request_latency_seconds_bucket{finish_reason="length",le="+Inf",model="a"} 2.0
stoker_request_latency_seconds_bucket{finish_reason="stop",le="1.0",model="a"} 1.0
stoker_request_latency_seconds_bucket{finish_reason="stop",le="+Inf",model="a"} 2.0
stoker_request_latency_seconds_count{finish_reason="length",model="a"} 2.0
stoker_request_latency_seconds_count{finish_reason="stop",model="a"} 2.0
"""
    a = parse_metrics(text)["a"]
    assert a["tokens_per_s"] == 12.5 and a["queue_depth"] == 3 and a["requests"] == 4
    assert a["latency_p50"] == pytest.approx(1.0)  # 2 of 4 within 1 s, summed over finish reasons


def test_cli_help_and_bad_arguments(tmp_path, capsys):
    from stoker.cli import main

    with pytest.raises(SystemExit):
        main(["dashboard", "--help"])
    assert "--runs" in capsys.readouterr().out
    assert main(["dashboard", "--runs", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["dashboard", "--runs", str(tmp_path), "--serve", "127.0.0.1:8000"]) == 2
    assert "--serve" in capsys.readouterr().err
    assert main(["dashboard", "--runs", str(tmp_path), "--api-key", ""]) == 2
    assert "empty" in capsys.readouterr().err


def test_odd_requests_get_a_4xx_never_a_5xx(runs_root, tmp_path):
    home = tmp_path / "jobs"
    Client(home, autostart=False).close()  # a store...
    (home / "queues.toml").write_text("slots = 'x'\n")  # ...whose pool does not parse
    c = TestClient(create_app(Settings(runs_root, jobs_home=home, servers=["http://127.0.0.1:9"], api_key=KEY),
                              allowed_hosts=LOOPBACK), base_url="http://127.0.0.1:8050", raise_server_exceptions=False)
    c.headers["Authorization"] = f"Bearer {KEY}"
    gets = ["/api/runs/a%00b", "/api/runs/a%00b/metrics", "/api/runs/" + "x" * 5000, "/api/runs/short/metrics?offset=1e99",
            "/api/jobs/99999999999999999999999", "/api/jobs/0", "/api/jobs/-3/log", "/api/serve/99999999999999999999",
            "/api/serve/-1/metrics", "/api/jobs", "/static/a%00b", "/api/nothing", "/static/"]
    for p in gets:
        r = c.get(p)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (p, r.status_code, r.text[:200])
    assert "queues.toml" in c.get("/api/jobs").json()["error"]  # named, as `stoker jobs` names it
    for p, body in [("/api/serve/0/completions", b"{"), ("/api/serve/0/completions", b"[]"),
                    ("/api/jobs/1/cancel", b"{}"), ("/api/serve/0/completions", '{"prompt": "\\ud800"}'.encode())]:
        r = c.post(p, content=body, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500 or r.status_code == 502, (p, body, r.status_code, r.text[:200])
    assert c.delete("/api/runs").status_code == 405
