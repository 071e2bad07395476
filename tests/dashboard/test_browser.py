"""Each dashboard page in a real browser (headless Chromium over the DevTools protocol), against a
live training run, a live job queue (a running job and one waiting for its slot) and a live
`stoker serve`. A screenshot of each page is kept under build/test-artifacts/dashboard (or
$STOKER_TEST_ARTIFACTS/dashboard)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
from dashboard import browser
from jobs.conftest import Daemon
from stoker.dashboard import Settings, create_app
from stoker.dashboard.app import LOOPBACK
from stoker.jobs.client import Client
from stoker.serve.client import Client as ServeClient
from stoker.serve.models import ModelPool
from stoker.serve.server import BackgroundServer
from stoker.serve.server import create_app as serve_app

KEY = "browser-key"
ARTIFACTS = Path(os.environ.get("STOKER_TEST_ARTIFACTS") or Path(__file__).parents[2] / "build" / "test-artifacts") / "dashboard"


@pytest.fixture(scope="module")
def chromium():
    reason = browser.why_not()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def live(chromium, runs_root, small_data, tmp_path):
    """A runs directory with a finished run and one training now, a job store whose one slot a
    running job holds while another waits, a model server, and the dashboard over all three."""
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(runs_root / "short", root / "short")
    train = subprocess.Popen([sys.executable, "-m", "stoker", "train", *TINY, f"--data.dir={small_data}",
                              f"--train.out_dir={root / 'live'}", "--train.steps=1000000", "--train.eval_every=25",
                              "--train.ckpt_every=0"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    home = tmp_path / "jobs"
    home.mkdir()
    (home / "queues.toml").write_text("slots = 1\n")
    jobs = Client(home)
    ticking = jobs.submit(command=["sh", "-c", "echo started; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.5; done"],
                          workdir=tmp_path, name="ticker")
    waiting = jobs.submit(command=["echo", "my turn"], workdir=tmp_path, name="waiter")
    torch.set_num_threads(1)
    pool = ModelPool({"short": root / "short"}, max_batch=4)
    chrome = None
    try:
        with BackgroundServer(serve_app(pool, api_key=KEY)) as serve_url:
            settings = Settings(root, jobs_home=home, servers=[serve_url], api_key=KEY)
            with BackgroundServer(create_app(settings, allowed_hosts=LOOPBACK)) as url:
                jobs.wait(ticking, timeout=60, states=("running",))
                deadline = time.time() + 120
                while not (root / "live" / "metrics.jsonl").exists() or (root / "live" / "metrics.jsonl").stat().st_size == 0:
                    assert train.poll() is None and time.time() < deadline, train.stderr.read().decode()[-2000:]
                    time.sleep(0.2)
                chrome = browser.Browser(tmp_path / "chromium")
                yield {"url": url, "serve": serve_url, "root": root, "jobs": jobs, "ticking": ticking,
                       "waiting": waiting, "browser": chrome}
    finally:
        if chrome:
            chrome.close()
        pool.close()
        os.killpg(train.pid, signal.SIGTERM)
        try:
            train.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(train.pid, signal.SIGKILL)
        jobs.close()
        Daemon(home).cleanup()


def points(b, selector: str) -> list[int]:
    """Points drawn by each line of the chart `selector`."""
    return b.eval(f"[...document.querySelectorAll('{selector} polyline')]"
                  ".map(p => p.getAttribute('points').split(' ').filter(Boolean).length)")


def test_every_page_in_a_browser(live):
    b, url, shots = live["browser"], live["url"], []

    def shot(name: str) -> None:
        assert b.console_errors() == []
        shots.append(b.screenshot(ARTIFACTS / f"{name}.png"))

    # Runs: the key asked for once, then both runs, the live one running.
    b.goto(url + "/#/runs")
    b.wait_for("!document.getElementById('key-form').classList.contains('hidden')")
    b.eval(f"document.getElementById('key-input').value = {json.dumps(KEY)};"
           "document.getElementById('key-form').requestSubmit(); true")
    b.wait_for("document.querySelectorAll('main tbody tr').length === 2")
    rows = b.eval("[...document.querySelectorAll('main tbody tr')].map(r => [...r.cells].map(c => c.innerText))")
    states = {r[1]: r[2] for r in rows}
    assert states == {"live": "running", "short": "done"}, rows
    shot("runs")

    # Compare: two runs picked in the table, their losses on one plot.
    b.eval("document.querySelector('input[data-run=\"live\"]').click();"
           "document.querySelector('input[data-run=\"short\"]').click();"
           "document.getElementById('compare').click(); true")
    b.wait_for("location.hash === '#/compare/live,short' && !!document.getElementById('compare-chart')")
    live_pts, short_pts = points(b, "#compare-chart")
    assert live_pts > 0 and short_pts == 30  # `short` logged 30 steps
    shot("compare")

    # A run: its loss curve reaches further while it trains; validation points and memory per rank drawn.
    b.goto(url + "/#/runs/live")
    last = "+document.querySelector('#loss-chart').getAttribute('data-last-x')"
    assert int(b.wait_for("+document.querySelector('#loss-chart')?.getAttribute('data-points')")) > 0
    step1 = int(b.eval(last))
    step2 = int(b.wait_for(f"{last} > {step1} && {last}", timeout=20))
    assert step2 > step1 > 0
    b.wait_for("document.querySelector('#loss-chart polyline[data-series=\"validation\"]')"
               ".getAttribute('points').length > 0", timeout=30)
    assert b.eval("document.querySelectorAll('svg[aria-label=\"memory per rank\"] rect').length") >= 4
    assert "[train]" in b.eval("document.getElementById('config').innerText")
    shot("run")

    # Jobs: quota used by the running job, the waiting job's reason in the scheduler's words.
    jobs, waiting = live["jobs"], live["waiting"]
    b.goto(url + "/#/jobs")
    why = b.wait_for(f"document.querySelector('.why-text[data-job=\"{waiting}\"]')?.innerText")
    assert why.startswith("position 1 of 1 waiting in queue 'default'")
    assert "free slots in the pool: 0 of 1; the job needs 1" in why
    assert why.split("; ")[:2] == jobs.why(waiting).reasons[:2]
    queue = b.eval("[...document.querySelectorAll('main table')[0].tBodies[0].rows[0].cells].map(c => c.innerText)")
    assert queue[:4] == ["default", "–", "1", "1"]  # name, cohort, quota, used
    shot("jobs")

    # A running job: its history and the tail of its log, live.
    b.goto(url + f"/#/jobs/{live['ticking']}")
    b.wait_for("document.getElementById('log').innerText.includes('started')")
    b.wait_for("/tick [3-9]/.test(document.getElementById('log').innerText)", timeout=20)
    history = b.eval("[...document.querySelectorAll('main table')[1].tBodies[0].rows].map(r => r.cells[1].innerText)")
    assert history[-1] == "running"
    shot("job")

    # The waiting job: cancelled with its button.
    b.goto(url + f"/#/jobs/{waiting}")
    b.wait_for("document.querySelectorAll('#why li').length > 1")
    b.eval("document.getElementById('cancel').click(); true")
    b.wait_for("document.getElementById('action-message').innerText.includes('cancelled')")
    assert jobs.status(waiting).state == "cancelled"

    # Models: the served model, a streamed playground answer, the metrics charted.
    b.goto(url + "/#/models")
    b.wait_for("!!document.getElementById('send-0')")
    prompt = "def main():"
    b.eval(f"document.getElementById('prompt-0').value = {json.dumps(prompt)};"
           "document.getElementById('max-tokens-0').value = 24; document.getElementById('send-0').click(); true")
    assert b.wait_for("document.getElementById('output-0').getAttribute('data-done')") == "1"
    text = b.eval("document.getElementById('output-0').textContent")
    want = ServeClient(live["serve"], api_key=KEY).complete(prompt, model="short", max_tokens=24, temperature=0)
    assert text == want["choices"][0]["text"] and text
    assert "pieces" in b.eval("document.getElementById('playground-status-0').innerText")
    b.wait_for("Math.max(...[...document.querySelectorAll('#server-0-charts svg')].slice(0, 1)"
               ".map(s => +s.getAttribute('data-points'))) > 1", timeout=20)
    models = b.eval("[...document.querySelectorAll('.server tbody tr')].map(r => r.cells[0].innerText)")
    assert models == ["short"]
    shot("models")

    for p in shots:
        assert p.stat().st_size > 10_000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
