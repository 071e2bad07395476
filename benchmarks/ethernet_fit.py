"""The planner against a finished `benchmarks/ethernet.py` run, with its compute efficiency
fitted to each run's compute-only time: its own local steps for a paired run, else the
compute-only baseline runs around it. (This machine's speed drifts by 10-20% within minutes,
so one fitted figure for the whole benchmark would mostly measure the drift.)

    python benchmarks/ethernet_fit.py benchmarks/results/ethernet-2hosts.json

`stoker plan --calibrate` measures the efficiency on a small model (preset tiny), whose small
matmuls run further below peak than a larger model's; the benchmark's own compute-only runs say
what this model gets. Everything else (link rates, latency, overlap, gloo's factors) stays as
calibrated. Prints, per run, the measured and predicted step time and their ratio, and the
predicted against measured model-state bytes per rank (layout.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def _bench():
    spec = importlib.util.spec_from_file_location("ethernet", Path(__file__).with_name("ethernet.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ethernet"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="JSON written by benchmarks/ethernet.py")
    a = p.parse_args()
    eth = _bench()
    d = json.loads(Path(a.results).read_text())
    s = d["settings"]
    from stoker.data.prepare import load_meta

    vocab = load_meta("data/stdlib")["vocab_size"]
    planner = eth.Planner(s["preset"], vocab, s["batch"], s["seq_len"], s["dtype"])
    print(f"{'hosts':>5} {'rate':>9} {'strategy':<26} {'meas s':>7} {'pred s':>7} {'pred/meas':>9} "
          f"{'state MB meas':>13} {'pred':>7}")
    fitted, compute = {}, {}
    for b in d["baselines"]:
        if not b["ok"] or b["hosts"] in fitted:
            continue
        k = b["hosts"]
        e0 = planner.constants.efficiency
        # The compute-only runs: one process per host, batch/k each, no communication.
        row = planner.predict(1, "unlimited", {"parallel.dp_replicate": 1}, batch=s["batch"] // k, sharing=k)
        fitted[k], compute[k] = e0 * row.compute_s / b["step_s"], (e0, row.compute_s)
        print(f"{k} hosts: compute-only {b['step_s']:.2f} s/step measured, {row.compute_s:.2f} s predicted at the "
              f"calibrated efficiency {e0:.2f}; fitted efficiency {fitted[k]:.2f}")
    ratios = []
    for r in d["runs"]:
        if not r["ok"]:
            continue
        planner.constants.efficiency = fitted.get(r["hosts"], planner.constants.efficiency)
        if r.get("baseline_s") and r["hosts"] in compute:  # this run's own compute-only time
            e0, c = compute[r["hosts"]]
            planner.constants.efficiency = e0 * c / r["baseline_s"]
        run = eth.Run(**{f: r[f] for f in ("hosts", "rate", "strategy", "args", "steps_total", "window")})
        run.auto_choice, run.step_s = r.get("auto_choice"), r["step_s"]
        eth.predict_run(run, planner)
        pred = run.predicted
        if not pred.step_s:
            continue
        ratio = pred.step_s / r["step_s"]
        ratios.append(ratio)
        meas_mb = (r["state_bytes"] or 0) / 1e6
        print(f"{r['hosts']:>5} {r['rate']:>9} {eth.label(run):<26} {r['step_s']:>7.2f} {pred.step_s:>7.2f} "
              f"{ratio:>9.2f} {meas_mb:>13.0f} {pred.state_bytes / 1e6:>7.0f}")
    within = sum(abs(x - 1) <= 0.2 for x in ratios)
    print(f"{within} of {len(ratios)} runs predicted within 20% of the measured step time")


if __name__ == "__main__":
    main()
