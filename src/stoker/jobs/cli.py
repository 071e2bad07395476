"""`stoker jobs ...`: the job queue's command line (a thin shell over stoker.jobs.Client)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from stoker.config import ConfigError
from stoker.jobs.policy import STATES
from stoker.jobs.spec import BACKENDS

EPILOG = """examples:
  stoker jobs submit --priority low --slots 1 -- stoker train --model.preset=tiny --train.out_dir=runs/a
  stoker jobs submit job.toml
  stoker jobs submit --backend slurm --slots 8 --hosts 2 -- stoker train run.toml
  stoker jobs submit --backend ray --cpus 4 -- stoker prepare --out data corpus/
  stoker jobs kueue --out kueue.yaml
  stoker jobs list
  stoker jobs why 3
  stoker jobs logs 3 -f
  stoker jobs cancel 3
  stoker jobs queues

The pool: HOME/queues.toml (HOME: --home, $STOKER_JOBS_HOME or ~/.stoker/jobs); without it one
queue `default` holds every slot (this host's GPUs, else its CPU cores) and the priority classes
are low (0), normal (100) and high (200). See docs/jobs.md."""


def add_parser(sub) -> None:
    p = sub.add_parser("jobs", help="a team's job queue: submit, watch, cancel; priorities, quotas, preemption",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Queue jobs on this machine's slots, or on Slurm, Kubernetes with Kueue or Ray "
                                   "(--backend, or a queue's backend in queues.toml). A job gets all its slots at once "
                                   "or waits; a higher-priority job preempts lower ones (SIGTERM: `stoker train` "
                                   "checkpoints; SIGKILL after the grace period) and they resume when admitted again.",
                       epilog=EPILOG)
    p.add_argument("--home", default=None, help="the queue's directory (default $STOKER_JOBS_HOME or ~/.stoker/jobs)")
    verbs = p.add_subparsers(dest="verb", required=True)

    s = verbs.add_parser("submit", help="queue a job; prints its id",
                         usage="stoker jobs submit [options] (SPEC.toml | -- COMMAND [ARG ...])",
                         description="Queue SPEC.toml, or the COMMAND after -- with the options given. Options "
                                     "given with a SPEC.toml override its fields.")
    s.add_argument("spec", nargs="?", default=None, metavar="SPEC.toml", help="a job spec file (see docs/jobs.md)")
    s.add_argument("--name", help="a name to show (default: from the command)")
    s.add_argument("--queue", help="queue (default: default)")
    s.add_argument("--priority", help="priority class: low, normal (default), high, or one from queues.toml")
    s.add_argument("--slots", type=int, help="processes, all admitted together (default 1)")
    s.add_argument("--hosts", type=int, help="hosts (the local engine has 1)")
    s.add_argument("--cpus", type=float, help="CPU cores per slot (default 1; sets OMP_NUM_THREADS)")
    s.add_argument("--memory", help="memory for the job, e.g. 8GiB")
    s.add_argument("--gpus", type=int, help="GPUs per slot (default 0)")
    s.add_argument("--max-runtime", dest="max_runtime", help="stop it (SIGTERM, grace, SIGKILL) after this much "
                                                              "running, e.g. 2h (default: no limit)")
    s.add_argument("--retries", type=int, help="restarts after failures, with exponential backoff (default 3)")
    s.add_argument("--grace", help="time between SIGTERM and SIGKILL, e.g. 120s (default: the pool's, 60 s)")
    s.add_argument("--not-preemptible", dest="preemptible", action="store_false", default=None,
                   help="never preempt this job")
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="an environment variable")
    s.add_argument("--workdir", help="directory to run in (default: here)")
    s.add_argument("--backend", choices=BACKENDS, default=None,
                   help="where it runs (default: the queue's backend in queues.toml, else local)")
    s.add_argument("--json", action="store_true", help="print {\"id\": N}")

    ls = verbs.add_parser("list", help="jobs and their states")
    ls.add_argument("--state", action="append", choices=STATES, help="only these states (repeatable)")
    ls.add_argument("--all", action="store_true", help="every job (default: the last 50)")
    ls.add_argument("--json", action="store_true", help="a JSON list")

    st = verbs.add_parser("status", help="one job: state, counts, exit code and its history of states")
    st.add_argument("id", type=int)
    st.add_argument("--json", action="store_true", help="JSON with id, state, queue, priority, slots, restarts, "
                                                        "preemptions, exit_code, history, ...")
    w = verbs.add_parser("why", help="a waiting job's place in its queue and why it waits")
    w.add_argument("id", type=int)
    w.add_argument("--json", action="store_true")
    lg = verbs.add_parser("logs", help="a job's output (every attempt)")
    lg.add_argument("id", type=int)
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    rs = verbs.add_parser("resubmit", help="send a cluster job again: one its cluster never got, or one that ended (stopped, failed); a training job resumes from its checkpoint")
    rs.add_argument("id", type=int)
    c = verbs.add_parser("cancel", help="cancel a job (a running one gets SIGTERM, then SIGKILL after the grace)")
    c.add_argument("id", type=int, nargs="+")
    q = verbs.add_parser("queues", help="queues: quota, use, borrowing, waiting jobs")
    q.add_argument("--json", action="store_true")
    k = verbs.add_parser("kueue", help="queues.toml as Kueue objects (YAML for kubectl apply)",
                         description="Render the pool's queues as Kueue v1beta2 objects: a ResourceFlavor, a ClusterQueue "
                                     "and a LocalQueue per queue (quota, cohort, borrowing limit, preemption policy, "
                                     "queueing strategy) and a WorkloadPriorityClass per priority class. Quotas count "
                                     "[kubernetes] slot_resource (default nvidia.com/gpu).")
    k.add_argument("--out", help="write to this file (default: standard output)")
    k.add_argument("--apply", action="store_true",
                   help="create them in the cluster of your kubeconfig (existing ones are replaced)")
    m = verbs.add_parser("manifest", help="a job as Kubernetes objects: an Indexed Job and its headless Service, or a JobSet",
                         usage="stoker jobs manifest [options] (SPEC.toml | -- COMMAND [ARG ...])",
                         description="Render a job (a SPEC.toml or the command after --, with submit's options) as "
                                     "the Indexed Job, one pod per host, and the headless Service for its rendezvous, "
                                     "labelled for Kueue, for `kubectl apply -f`; a JobSet instead when the job's queue "
                                     "says workload = \"jobset\". Needs [kubernetes] image in queues.toml.")
    m.add_argument("spec", nargs="?", default=None, metavar="SPEC.toml")
    for opt in ("--name", "--queue", "--priority", "--max-runtime", "--grace", "--memory"):
        m.add_argument(opt, dest=opt[2:].replace("-", "_"))
    for opt in ("--slots", "--hosts", "--gpus", "--retries"):
        m.add_argument(opt, type=int, dest=opt[2:])
    m.add_argument("--cpus", type=float)
    m.add_argument("--id", type=int, default=0, help="the number in the objects' names (default 0)")
    m.add_argument("--out", help="write to this file (default: standard output)")
    d = verbs.add_parser("daemon", help="run the scheduler in the foreground (the CLI starts one when needed)")
    d.add_argument("--poll", type=float, default=0.5, help="seconds between passes when nothing wakes it (default 0.5)")
    d.add_argument("--exit-when-idle", type=float, default=None, metavar="S",
                   help="exit after S seconds with no job waiting or running (default: run until stopped)")


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """`jobs ... submit ... -- COMMAND...`: (the options, the job's command), split at the first --."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


FIELDS = ("name", "queue", "priority", "slots", "hosts", "cpus", "memory", "gpus", "max_runtime", "retries", "grace",
          "preemptible", "workdir")


def _spec(args: argparse.Namespace):
    """The job `submit` and `manifest` were given: SPEC.toml or the command after --, with the
    options given overriding its fields."""
    from stoker.jobs.spec import JobSpec, load_spec

    fields = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    env = getattr(args, "env", None)
    if env:
        bad = [e for e in env if "=" not in e]
        if bad:
            raise ConfigError(f"--env: expected NAME=VALUE, got {bad[0]!r}")
        fields["env"] = dict(e.split("=", 1) for e in env)
    if args.spec and args.job_command:
        raise ConfigError("give a SPEC.toml or a command after --, not both")
    if args.spec:
        spec = load_spec(args.spec)
        return JobSpec.from_dict({**spec.to_dict(), **fields}, args.spec) if fields else spec
    if args.job_command:
        return JobSpec.from_dict({"command": args.job_command, **fields}, args.verb)
    raise ConfigError(f"give a SPEC.toml, or the command after --: stoker jobs {args.verb} -- stoker train ...")


def _render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stoker.jobs.backends import kubernetes as k8s
    from stoker.jobs.spec import load_pool
    from stoker.jobs.store import default_home

    home = Path(args.home) if args.home else default_home()
    pool = load_pool(home / "queues.toml")
    cfg = k8s.KubeConfig.from_dict(pool.kubernetes)
    if args.verb == "kueue":
        objects = k8s.kueue_objects(pool, cfg)
        if args.apply:
            for line in k8s.apply_kueue(objects):
                print(line)
            return 0
    else:
        spec = _spec(args)
        pool.check(spec, backend="kubernetes")  # its queue and priority class exist
        objects = k8s.job_objects(spec, args.id, cfg, pool.queues[spec.queue].workload)
    text = k8s.to_yaml(objects)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {len(objects)} objects to {args.out}")
    else:
        print(text, end="")
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1))


def cmd_jobs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from stoker.jobs.client import Client

    if args.verb == "daemon":
        from stoker.jobs.local import Engine

        return Engine(args.home, poll_s=args.poll).run(args.exit_when_idle)
    if args.verb in ("kueue", "manifest"):
        return _render(args)
    client = Client(args.home)
    con = Console()
    if args.verb == "submit":
        job_id = client.submit(_spec(args), backend=args.backend)
        _print_json({"id": job_id}) if args.json else print(job_id)
        return 0
    if args.verb == "list":
        jobs = client.list(tuple(args.state) if args.state else None, None if args.all else 50)
        if args.json:
            _print_json([j.to_dict() for j in jobs])
            return 0
        t = Table(title=f"jobs ({client.home})")
        for col in ("id", "name", "state", "queue", "priority", "slots", "restarts", "preempted", "exit"):
            t.add_column(col, no_wrap=True, justify="right" if col in ("id", "slots", "restarts", "preempted", "exit")
                         else "left")
        t.add_column("reason", min_width=30)  # the one column that wraps
        for j in jobs:
            t.add_row(str(j.id), j.name, j.state + (f" ({j.stopping})" if j.stopping else ""), j.queue,
                      j.priority_class, str(j.slots), str(j.restarts), str(j.preemptions),
                      "-" if j.exit_code is None else str(j.exit_code), j.reason)
        con.print(t)
        return 0
    if args.verb == "status":
        j = client.status(args.id)
        if args.json:
            _print_json(j.to_dict())
            return 0
        t = Table(title=f"job {j.id}: {j.name}", show_header=False)
        for k, v in (("state", j.state + (f" (stopping: {j.stopping})" if j.stopping else "")),
                     ("queue", j.queue), ("priority", f"{j.priority_class} ({j.priority})"), ("slots", str(j.slots)),
                     ("command", " ".join(j.spec.command)), ("attempts", str(j.attempt)),
                     ("restarts", f"{j.restarts} of {j.retries}"), ("preemptions", str(j.preemptions)),
                     ("exit code", "-" if j.exit_code is None else str(j.exit_code)),
                     ("run time", f"{j.runtime_used:.1f} s" + (f" of {j.max_runtime:g}" if j.max_runtime else "")),
                     ("reason", j.reason), ("log", str(client.store.job_dir(j.id) / "output.log"))):
            t.add_row(k, v)
        con.print(t)
        h = Table(title="history")
        for col in ("time", "state", "detail"):
            h.add_column(col)
        for e in j.history:
            h.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time)), e.state, e.detail)
        con.print(h)
        return 0
    if args.verb == "why":
        w = client.why(args.id)
        if args.json:
            _print_json({"id": w.id, "state": w.state, "position": w.position, "ahead": w.ahead, "reasons": w.reasons})
            return 0
        print(f"job {w.id} ({w.state}):")
        for r in w.reasons:
            print(f"  {r}")
        return 0
    if args.verb == "logs":
        for chunk in client.logs(args.id, follow=args.follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        return 0
    if args.verb == "resubmit":
        print(client.resubmit(args.id))
        return 0
    if args.verb == "cancel":
        for i in args.id:
            print(f"job {i}: {client.cancel(i)}" + ("" if client.status(i).state == "cancelled"
                                                    else " (asked to stop: SIGTERM, SIGKILL after the grace period)"))
        return 0
    if args.verb == "queues":
        qs = client.queues()
        if args.json:
            _print_json([dict(vars(q), borrowed=q.borrowed) for q in qs])
            return 0
        pool = client.pool()
        t = Table(title=f"queues: {pool.slots} slots; priorities "
                        + ", ".join(f"{k} {v}" for k, v in sorted(pool.priorities.items(), key=lambda kv: kv[1])))
        for col in ("queue", "cohort", "nominal quota", "borrowing limit", "slots used", "borrowed", "running",
                    "waiting", "strategy"):
            t.add_column(col)
        for q in qs:
            t.add_row(q.name, q.cohort or "-", str(q.nominal_quota),
                      "-" if q.borrowing_limit is None else str(q.borrowing_limit), str(q.used), str(q.borrowed),
                      str(q.running), str(q.waiting), q.strategy)
        con.print(t)
        return 0
    raise AssertionError(args.verb)
