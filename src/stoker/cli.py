"""The `stoker` command: a thin shell over the library.

User errors (bad config, missing data, bad arguments) end with one line naming what is
wrong and exit code 2; internal errors keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from stoker.config import ConfigError, TrainConfig, config_help, load_config
from stoker.errors import RunError

USAGE_ERROR = 2


def _fail(msg: str) -> int:
    print(f"stoker: error: {msg}", file=sys.stderr)
    return USAGE_ERROR


def _summary_table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    return table


def train_table(s: dict):
    return _summary_table("training run", [
        ("steps", f"{s['start_step']} -> {s['steps']}" + (" (stopped early)" if s["stopped_early"] else "")),
        ("parameters", f"{s['params'] / 1e6:.2f} M" + (
            f" ({s['trainable_params']:,} trained: {s['trainable_params'] / s['params']:.2%})"
            if s.get("trainable_params", s["params"]) < s["params"] else "")),
        ("tokens seen", f"{s['tokens']:,}"),
        ("final train loss", f"{s['train_loss']:.4f}"),
        ("final val loss", f"{s['val_loss']:.4f}"),
        ("throughput", f"{s['tokens_per_s']:,.0f} tokens/s"),
        ("MFU", f"{s['mfu']:.1%}"),
        ("wall time", f"{s['seconds']:.1f} s"),
        ("run directory", s["out_dir"]),
    ])


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `--section.key=value` and `--section.key value` out of argv; return (others, overrides)."""
    others, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=")[0]:
            if "=" not in a:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {a!r} has no value; write {a}=VALUE")
                a, i = f"{a}={argv[i + 1]}", i + 1
            overrides.append(a)
        else:
            others.append(a)
        i += 1
    return others, overrides


def cmd_prepare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from stoker.data.clean import clean_config, report_table
    from stoker.data.prepare import prepare, summary_table

    try:
        flags = {"quality": args.quality, "hap": args.hap, "pii": args.pii or None, "dedup": args.dedup,
                 "near_threshold": args.near_threshold, "shingle": args.shingle, "workers": args.workers,
                 "engine": args.engine, "ray_address": args.ray_address}
        clean = clean_config(args.config, args.clean, {k: v for k, v in flags.items() if v is not None})
        summary = prepare(args.sources or None, args.out, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                          tokenizer=args.tokenizer, clean=clean)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    if summary.get("clean"):
        Console().print(report_table(summary["clean"]))
    Console().print(summary_table(summary))
    return 0


def _launch(nproc: int, argv: list[str], env: dict[str, str] | None = None, **rendezvous) -> int:
    from stoker.launch import run_local

    return run_local(nproc, argv, env, **rendezvous)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    try:
        cfg = load_config(args.config, overrides)
        hosts = args.nnodes > 1 or args.master is not None
        if args.nproc > 1 or hosts:
            par, world = cfg.parallel, args.nproc * args.nnodes
            procs = f"--nnodes {args.nnodes} x --nproc {args.nproc} = {world}" if hosts else f"--nproc {args.nproc}"
            if par.world not in (1, world):
                raise ConfigError(
                    f"parallel.pp={par.pp} x parallel.dp_replicate={par.dp_replicate} x parallel.dp_shard={par.dp_shard} "
                    f"x parallel.tp={par.tp} = {par.world} does not match {procs}"
                )
            if par.world == 1:
                par.dp_replicate = world  # what the workers will run: data parallel over all of them
                cfg.validate()  # a batch that N processes cannot split: one line here, not one per worker
            argv = ["train"] + ([args.config] if args.config else []) + overrides
            from stoker.launch import prepare_host

            env = prepare_host(args.nnodes, args.node_rank, args.master, par.ifname, par.connect_timeout_s)
            if cfg.train.device != "cuda":
                import torch

                from stoker.train.metrics import peak_flops

                peak_flops(torch.device("cpu"), cfg.train.dtype)  # probe the CPU's peak while it is idle
            rendezvous = dict(nnodes=args.nnodes, node_rank=args.node_rank, master=args.master,
                              connect_timeout_s=par.connect_timeout_s) if hosts else {}
            return _launch(args.nproc, argv, env, **rendezvous)
        from stoker.train.trainer import train

        summary = train(cfg)
    except ConfigError as e:
        return _fail(str(e))
    if int(os.environ.get("RANK", "0")) == 0:
        from rich.console import Console

        Console().print(train_table(summary))
    return 0


def cmd_tune(args: argparse.Namespace, overrides: list[str]) -> int:
    """`stoker tune BASE RECORDS --method M`: `stoker train` with the tuning settings filled in."""
    out = args.out or str(Path("runs") / f"{Path(args.base).name}-{args.method}")
    tuned = [f"--model.init_from={args.base}", f"--tune.data={args.records}", f"--tune.method={args.method}",
             f"--train.out_dir={out}"] + ([f"--tune.val_data={args.val}"] if args.val else [])
    spec = Path(args.base) / "model.json"
    if args.config is None and spec.is_file():  # rows no longer than the base's context unless told
        try:
            context = int(json.loads(spec.read_text())["block_size"])
            tuned.append(f"--train.seq_len={min(context, TrainConfig.seq_len)}")
        except (ValueError, KeyError, TypeError):
            pass  # the trainer names what is wrong with it
    return cmd_train(args, tuned + overrides)


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        return _fail(str(e))
    print(cfg.to_toml(), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stoker.generate import evaluate

    if args.data and Path(args.data).is_file() or args.adapter:
        return _eval_records(args)
    try:
        r = evaluate(args.run_dir, batches=args.batches, data_dir=args.data, seq_len=args.seq_len)
    except ConfigError as e:
        return _fail(str(e))
    print(f"step {r['step']}: val loss {r['val_loss']:.4f} nats/token, perplexity {r['perplexity']:.2f} "
          f"({r['windows']} windows, {r['tokens']:,} tokens)")
    return 0


def _eval_records(args: argparse.Namespace) -> int:
    """`stoker eval RUN --data records.jsonl [--adapter DIR]`: completion loss and exact match."""
    from stoker.generate import load_trained
    from stoker.tune.adapters import apply_adapter
    from stoker.tune.evaluate import evaluate_records
    from stoker.tune.records import RecordError

    if not (args.data and Path(args.data).is_file()):
        return _fail("--adapter: measured on records: give --data FILE.jsonl")
    try:
        model, tok, step = load_trained(args.run_dir)
        if args.adapter:
            apply_adapter(model, args.adapter)
        r = evaluate_records(model, tok, args.data, limit=args.limit)
    except (ConfigError, RecordError) as e:
        return _fail(str(e))
    print(f"step {step}{' + ' + args.adapter if args.adapter else ''}: completion loss {r['loss']:.4f} nats/token, "
          f"exact match {r['accuracy']:.1%} ({r['records']} records, {r['tokens']:,} completion tokens)")
    return 0


def cmd_generate(args: argparse.Namespace, argv: list[str]) -> int:
    if args.server and args.chat:
        return _fail("--chat: not with --server yet; run it on the model directory")
    if args.server:
        return _generate_remote(args)
    from stoker.generate import generate

    if args.run_dir is None:
        return _fail("give a run directory, or --server URL to ask a running server")
    if args.tp < 1:
        return _fail(f"--tp: must be >= 1, got {args.tp}")
    if args.tp > 1 and "WORLD_SIZE" not in os.environ:
        from stoker.generate import run_model_config

        try:
            run_model_config(args.run_dir, args.tp)  # here: a failure in every worker would read as a crash
        except ConfigError as e:
            return _fail(str(e))
        return _launch(args.tp, argv)  # this same command in each of tp processes
    try:
        text = generate(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                        tp=args.tp, chat=args.chat)
    except ConfigError as e:
        return _fail(str(e))
    finally:
        from stoker.parallel.mesh import shutdown

        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(text if args.chat else args.prompt + text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from stoker.generate import export

    try:
        if args.format == "hf":
            from stoker.models.hf import export_hf

            if not args.out:
                return _fail("--out: give the directory for the Hugging Face model (--format hf)")
            path = export_hf(args.run_dir, args.out)
            print(f"wrote {path} (config.json, model.safetensors, tokenizer): "
                  "transformers' AutoModelForCausalLM.from_pretrained reads it")
            return 0
        path = export(args.run_dir, args.out)
    except ConfigError as e:
        return _fail(str(e))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from stoker.models.hf import import_hf

    try:
        out = import_hf(args.model_dir, args.out)
    except ConfigError as e:
        return _fail(str(e))
    print(f"wrote {out}: stoker eval / generate / serve it, or train from it with --model.init_from={out}")
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    from stoker.serve.client import Client, ServeError

    try:
        r = Client(args.server).generate(args.prompt, model=args.run_dir, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    except ServeError as e:
        return _fail(f"{args.server}: {e}")
    except OSError as e:
        return _fail(f"{args.server}: cannot reach the server ({e})")
    print(args.prompt + r["generated_text"])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from stoker.serve.server import serve

    try:
        serve(args.run_dirs, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
              max_loaded=args.max_loaded, max_queue=args.max_queue, kv_budget_mb=args.kv_budget_mb,
              max_body_mb=args.max_body_mb, batch_invariant=args.batch_invariant, prefill_chunk=args.prefill_chunk,
              prefix_cache_mb=args.prefix_cache_mb, dtype=args.dtype, adapters=args.adapter,
              max_adapters=args.max_adapters, kv_keep_s=args.kv_keep_s)
    except (ConfigError, FileNotFoundError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from stoker.dashboard import dashboard

    try:
        dashboard(args.runs, host=args.host, port=args.port, jobs_home=args.jobs_home, servers=args.serve,
                  api_key=args.api_key, serve_api_key=args.serve_api_key)
    except ConfigError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    return 0


def cmd_hosts(args: argparse.Namespace) -> int:
    from stoker.parallel.hosts import MAX_HOSTS, EmulatedHosts, parse_rate

    def fail(msg: str) -> int:
        print(f"stoker hosts: {msg}", file=sys.stderr)
        return USAGE_ERROR

    if args.clean:
        from stoker.parallel.hosts import remove_stale

        try:
            removed = remove_stale()
        except ConfigError as e:
            return fail(str(e))
        print("\n".join(f"removed {r}" for r in removed) or "nothing left behind by earlier runs")
        return 0
    if args.hosts is None:
        return fail("--hosts K is required (or --clean)")
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if cmd[:1] != ["train"]:
        return fail("give the command after --, e.g. stoker hosts --hosts 2 -- train --parallel.dp_replicate=2")
    if not 1 <= args.hosts <= MAX_HOSTS:
        return fail(f"--hosts: must be 1 .. {MAX_HOSTS}, got {args.hosts}")
    if args.nproc_per_host < 1:
        return fail(f"--nproc-per-host: must be >= 1, got {args.nproc_per_host}")
    try:
        if args.rate is not None:
            parse_rate(args.rate, "--rate")

        def stop(signum, frame):
            raise KeyboardInterrupt  # a kill ends like Ctrl-C: the hosts stop and are removed

        signal.signal(signal.SIGTERM, stop)
        with EmulatedHosts(args.hosts, args.rate, pin=not args.no_pin) as h:
            r = h.run(cmd, nproc_per_host=args.nproc_per_host, timeout=args.timeout or float("inf"), echo=True)
    except ConfigError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return 130
    for run in r.hosts:
        print(f"host {run.host} ({h.addr(run.host)}): exit {run.returncode}, sent {run.tx_bytes / 1e6:,.2f} MB, "
              f"received {run.rx_bytes / 1e6:,.2f} MB")
    print(f"{args.hosts} hosts, {args.rate or 'unlimited'} links: {r.seconds:.1f} s"
          + (f" (stopped at --timeout {args.timeout:g} s)" if r.timed_out else ""))
    return r.worst or (124 if r.timed_out else 0)


def cmd_demo(args: argparse.Namespace) -> int:
    from stoker.demo import demo

    try:
        demo(data_dir=args.data_dir, out_dir=args.out_dir, minutes=args.minutes)
    except ConfigError as e:
        return _fail(str(e))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stoker", description="Train, evaluate, sample, export and serve GPT-style models.")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="text files -> BPE tokenizer + packed token shards",
                        description="Train a byte-level BPE tokenizer and write packed train/val token shards. "
                                    "With no SRC, uses the Python standard library's own source files.")
    pp.add_argument("sources", nargs="*", metavar="SRC", help="files or folders (.txt .md .py .jsonl)")
    pp.add_argument("--out", required=True, help="output data directory")
    pp.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    pp.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out (default 0.02)")
    pp.add_argument("--tokenizer", metavar="DIR", default=None,
                    help="use the tokenizer in DIR (tokenizer.json, e.g. a `stoker import` run) instead of training "
                         "one: data for continued pre-training of that model")
    pp.add_argument("--clean", action="store_true",
                    help="every cleaning stage at its default: --quality auto --hap 1 --pii --dedup both")
    pp.add_argument("--config", metavar="PREPARE.toml", default=None,
                    help="cleaning settings from a [clean] table (keys as these flags: quality, hap, pii, dedup, "
                         "near_threshold, shingle, num_perm, workers, engine, ray_address, batch_bytes); flags given "
                         "here override it")
    pp.add_argument("--quality", choices=("off", "auto", "prose", "code"), default=None,
                    help="drop low-quality documents: Gopher/C4 rules for prose, line-length, alphanumeric and "
                         "generated-file rules for source code; auto picks by file suffix (default off)")
    pp.add_argument("--hap", type=float, default=None, metavar="SCORE",
                    help="drop documents with more than SCORE hateful, abusive or profane words per 100 words, "
                         "by the shipped word list (a hate word counts thrice; default off)")
    pp.add_argument("--pii", action="store_true",
                    help="redact e-mail addresses, public IP addresses, phone numbers, card numbers (Luhn-checked) "
                         "and secrets as <EMAIL>, <IP_ADDRESS>, <PHONE_NUMBER>, <CREDIT_CARD>, <SECRET>")
    pp.add_argument("--dedup", choices=("off", "exact", "near", "both"), default=None,
                    help="remove exact duplicates (normalised text) and/or near duplicates (MinHash LSH); the "
                         "copy kept is the one whose path sorts first (default off)")
    pp.add_argument("--near-threshold", type=float, default=None,
                    help="Jaccard similarity of word shingles from which documents are near duplicates (default 0.8)")
    pp.add_argument("--shingle", type=int, default=None, help="words per MinHash shingle (default 5)")
    pp.add_argument("--workers", type=int, default=None,
                    help="processes for the per-document cleaning stages (default 0: every core)")
    pp.add_argument("--engine", choices=("local", "ray"), default=None,
                    help="where the per-document cleaning stages run: local worker processes (default) or Ray Data "
                         "(the same output); an interrupted run continues from its finished batches either way")
    pp.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="with --engine ray: the cluster to join (its workers need stoker installed); default: a "
                         "local Ray started for the run")

    keys = ("config keys, with their defaults (a [section] key in CONFIG.toml, or --section.key=value):\n"
            + config_help())
    pt = sub.add_parser("train", help="train or resume a model", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train per CONFIG.toml and --section.key=value overrides (e.g. --train.steps=100\n"
                                    "--model.preset=tiny). Resumes from the latest checkpoint in train.out_dir.\n"
                                    "SIGTERM/SIGINT: finish the step, checkpoint, exit; a second Ctrl-C exits at once.",
                        epilog=keys)
    pt.add_argument("config", nargs="?", help="TOML file with [model] [data] [train] [parallel] tables")
    pt.add_argument("--nproc", type=int, default=1,
                    help="launch N processes under torchrun; the parallel.* sizes split them (default: all DDP)")
    pt.add_argument("--nnodes", type=int, default=1,
                    help="hosts taking part (run this command on each, with the same --master and its own "
                         "--node-rank); the parallel.* sizes multiply to --nnodes x --nproc")
    pt.add_argument("--node-rank", type=int, default=0, help="this host's rank, 0 .. --nnodes - 1 (0: the master)")
    pt.add_argument("--master", metavar="HOST:PORT", default=None,
                    help="node 0's address and a free port there, reachable from every host (e.g. 10.0.0.1:29500)")

    pu = sub.add_parser("tune", help="tune a trained model on instruction records: LoRA, prompt tuning, full",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Tune BASE (a run of `stoker train` or `stoker import`) on RECORDS, JSONL lines of\n"
                                    '{"prompt": ..., "completion": ...} or {"messages": [...]}; the loss counts the\n'
                                    "completions only. `stoker train` with model.init_from, tune.data and tune.method\n"
                                    "set: every --section.key=value override works (--tune.lora_rank=16,\n"
                                    "--train.steps=300, ...), and so do resuming and --nproc. LoRA and prompt tuning\n"
                                    "write OUT/adapter in PEFT's format; full fine-tuning's OUT is a model like any run.",
                        epilog=keys)
    pu.add_argument("base", help="the run directory of the model to tune")
    pu.add_argument("records", help="JSONL instruction records (tune.data)")
    pu.add_argument("--method", choices=("lora", "prompt", "multitask-prompt", "full"), default="lora",
                    help="lora (default): low-rank updates of the projections; prompt: learned virtual tokens; "
                         "multitask-prompt: a shared prompt with a factor per record task; full: every weight")
    pu.add_argument("--out", default=None, help="run directory (default runs/<BASE name>-<method>)")
    pu.add_argument("--val", default=None, help="validation records (default: tune.val_fraction of RECORDS)")
    pu.add_argument("--config", default=None, help="TOML file of settings, as `stoker train` takes")
    pu.add_argument("--nproc", type=int, default=1, help="launch N processes under torchrun (data parallel)")
    pu.set_defaults(nnodes=1, node_rank=0, master=None)

    pc = sub.add_parser("config", help="print the resolved config as TOML",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Resolve defaults, CONFIG.toml and --section.key=value overrides as `stoker train`\n"
                                    "does, validate them, and print the result as TOML that `stoker train` reads.",
                        epilog=keys)
    pc.add_argument("config", nargs="?", help="TOML file with [model] [data] [train] [parallel] tables")

    pe = sub.add_parser("eval", help="validation loss and perplexity of a run's latest checkpoint")
    pe.add_argument("run_dir", help="a train.out_dir, or a run written by `stoker import`")
    pe.add_argument("--batches", type=int, default=16, help="val batches of 8 windows (default 16)")
    pe.add_argument("--data", metavar="DIR|FILE.jsonl", default=None,
                    help="prepared data to take the val split from (default: the run's data.dir; needed for an "
                         "imported model); must be tokenized with the run's tokenizer (stoker prepare --tokenizer RUN). "
                         "Or instruction records (JSONL, as tune.data): the loss on their completions and the share "
                         "whose greedy completion is exact")
    pe.add_argument("--adapter", metavar="DIR", default=None,
                    help="a LoRA or prompt-tuning adapter in PEFT's format (a tuning run's adapter/, or PEFT's "
                         "save_pretrained) to apply to RUN_DIR's model; with --data FILE.jsonl")
    pe.add_argument("--limit", type=int, default=0, help="with records: only the first N (default 0: all)")
    pe.add_argument("--seq-len", type=int, default=None,
                    help="tokens per window (default: the run's train.seq_len; for an imported model the context, "
                         "at most 1024)")

    pg = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    pg.add_argument("run_dir", nargs="?", help="a train.out_dir (with --server: a model name, default the first)")
    pg.add_argument("--prompt", default="", help="text to continue")
    pg.add_argument("--max-new-tokens", type=int, default=200)
    pg.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    pg.add_argument("--top-k", type=int, default=50, help="sample from the K most likely tokens (0: all)")
    pg.add_argument("--seed", type=int, default=None)
    pg.add_argument("--chat", action="store_true",
                    help="the prompt is a user's message: put it in the model's chat template (an imported model's "
                         "tokenizer_config.json) and print the reply")
    pg.add_argument("--tp", type=int, default=1,
                    help="split the model over N processes by tensor parallelism (launches torchrun)")
    pg.add_argument("--server", metavar="URL", help="ask a `stoker serve` server instead of loading the model "
                                                    "(API key from $STOKER_API_KEY)")

    px = sub.add_parser("export", help="write a run's latest checkpoint as one safetensors file, or as a "
                                       "Hugging Face model directory",
                        description="Gather the latest checkpoint (written under any parallel layout) into one "
                                    "plain safetensors file for inference, the model shape in its metadata; or, with "
                                    "--format hf, into a Hugging Face model directory (config.json, "
                                    "model.safetensors, tokenizer) for transformers.")
    px.add_argument("run_dir", help="a train.out_dir, or a directory written by `stoker import`")
    px.add_argument("--format", choices=("stoker", "hf"), default="stoker",
                    help="stoker: one safetensors file (default); hf: a Hugging Face model directory")
    px.add_argument("--out", default=None, help="output file (default: RUN_DIR/model.safetensors); with --format hf "
                                                "a new directory")

    pi = sub.add_parser("import", help="a local Hugging Face model directory (GPT-2, Llama) as a stoker run",
                        description="Read a local Hugging Face model directory (config.json, model.safetensors or "
                                    "its sharded files with their index, tokenizer.json and tokenizer_config.json) "
                                    "of the GPT-2 or Llama architecture, and write a run directory that eval, "
                                    "generate, serve and `train --model.init_from` take. Nothing is downloaded; "
                                    "pickle weights (*.bin) are refused, since loading them runs code.")
    pi.add_argument("model_dir", help="the Hugging Face model directory")
    pi.add_argument("--out", required=True, help="the run directory to write (new, or empty)")

    ps = sub.add_parser("serve", help="serve run directories over HTTP with continuous batching",
                        description="HTTP server: OpenAI-compatible POST /v1/completions and /v1/chat/completions, task API "
                                    "/api/v1/task/text-generation and /api/v1/task/tokenization, GET /v1/models, "
                                    "/health, /metrics (Prometheus). Models load on first request; the least "
                                    "recently used is unloaded beyond --max-loaded.")
    ps.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a train.out_dir, or NAME=RUN_DIR to alias it")
    ps.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ps.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    ps.add_argument("--api-key", default=os.environ.get("STOKER_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every path but /health (default "
                         "$STOKER_API_KEY; unset: no key; empty: refused)")
    ps.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per model (default 8)")
    ps.add_argument("--max-loaded", type=int, default=1, help="models resident at once (default 1)")
    ps.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting per model before answering 429 (default 64)")
    ps.add_argument("--kv-budget-mb", type=int, default=1024, help="KV cache memory per model in MiB (default 1024)")
    ps.add_argument("--kv-keep-s", type=float, default=60,
                    help="seconds the batch's KV buffer is kept once no request runs, so that the next burst "
                         "reuses its memory instead of paying fresh pages (default 60; 0: freed at once)")
    ps.add_argument("--max-body-mb", type=float, default=4,
                    help="largest request body in MiB; a larger one gets 413 without being read (default 4)")
    ps.add_argument("--prefill-chunk", type=int, default=256,
                    help="most prompt tokens prefilled per engine step, so that a long prompt does not stall "
                         "running decodes (default 256)")
    ps.add_argument("--prefix-cache-mb", type=int, default=256,
                    help="memory per model for keys and values of prompt prefixes that later prompts share, a "
                         "system prompt say (default 256; 0: off)")
    ps.add_argument("--batch-invariant", action="store_true",
                    help="a request's greedy text is the same alone or in any batch: every decode step runs "
                         "--max-batch rows, each prompt is prefilled alone, no prefix cache (slower)")
    ps.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="serve an adapter (a PEFT adapter directory or a `stoker tune` run) on the model as NAME: "
                         "a request's \"model\": NAME picks it, requests for different adapters share the batch. "
                         "Repeat for more; those in a run's adapters/ directory are served too. A multitask "
                         "prompt serves each task as NAME:TASK")
    ps.add_argument("--max-adapters", type=int, default=8,
                    help="adapters loaded at once per model; beyond it the least recently used one not in use "
                         "gives way (default 8)")
    ps.add_argument("--dtype", default="auto", choices=("fp32", "bf16", "auto"),
                    help="weights and cache: auto (default: bf16 on a GPU; on a CPU, whichever of the two runs "
                         "a decode step's linear layers faster, timed at start, about 0.4 s), fp32, or bf16 (half "
                         "the memory traffic)")

    pb = sub.add_parser("dashboard", help="a web page of runs (live curves), the job queue and served models",
                        description="Web dashboard: run directories under --runs (loss and validation curves, live "
                                    "while training; learning rate, throughput, MFU, memory per rank, config, "
                                    "checkpoints, adapters; several runs on one plot), the job queue (quotas, "
                                    "pending reasons, history, logs, cancel and resubmit), and `stoker serve` "
                                    "servers (models, adapters, /metrics charts, a streaming playground). "
                                    "Open the printed URL in a browser.")
    pb.add_argument("--runs", default="runs", help="directory whose run directories are shown, up to 3 levels "
                                                   "down (default runs); nothing outside it is readable")
    pb.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    pb.add_argument("--port", type=int, default=8050, help="TCP port (default 8050; 0: any free port)")
    pb.add_argument("--jobs-home", default=None, help="job store to show (default $STOKER_JOBS_HOME or ~/.stoker/jobs)")
    pb.add_argument("--serve", action="append", default=[], metavar="URL",
                    help="a `stoker serve` server to show, e.g. http://127.0.0.1:8000 (repeat for more)")
    pb.add_argument("--api-key", default=os.environ.get("STOKER_API_KEY"),
                    help="require 'Authorization: Bearer KEY' for the data (the page asks for it once); cancel "
                         "and resubmit are enabled only with a key (default $STOKER_API_KEY)")
    pb.add_argument("--serve-api-key", default=None,
                    help="key the servers given by --serve require (default: the --api-key)")

    from stoker.parallel.plan import add_parser as add_plan_parser

    add_plan_parser(sub)

    from stoker.jobs.cli import add_parser as add_jobs_parser

    add_jobs_parser(sub)

    ph = sub.add_parser("hosts", help="run `stoker train` across K hosts emulated on this machine (root)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Emulate K hosts on this machine and run `stoker train ARGS` across them, one\n"
                                    "node per host (--nnodes K, host 0 the master). Each host is a network namespace\n"
                                    "with its own interface on a shared bridge, its link limited to --rate each way\n"
                                    "(tc tbf), its processes pinned to their own cores with one thread each. Prints\n"
                                    "every host's output, then its exit code and the bytes its link sent and\n"
                                    "received; exits with the worst exit code. The namespaces, bridge and links are\n"
                                    "removed however the run ends. Needs root (ip netns, tc).",
                        epilog="example:\n  stoker hosts --hosts 2 --rate 1gbit --nproc-per-host 2 -- train "
                               "--parallel.dp_replicate=2 --parallel.dp_shard=2\n  stoker hosts --clean")
    ph.add_argument("--hosts", type=int, default=None, metavar="K", help="number of emulated hosts")
    ph.add_argument("--clean", action="store_true",
                    help="only remove what runs killed outright (SIGKILL) left behind: namespaces and links "
                         "named stk<pid>... whose process is gone; a run in progress is never touched")
    ph.add_argument("--rate", default=None, help="link rate each way, e.g. 100mbit, 250mbit, 1gbit, 500kbit "
                                                 "(default: unlimited)")
    ph.add_argument("--nproc-per-host", type=int, default=1, metavar="P", help="processes per host (default 1)")
    ph.add_argument("--no-pin", action="store_true",
                    help="let the processes run on any core (default: host i on its own cores, wrapping around)")
    ph.add_argument("--timeout", type=float, default=0, metavar="S",
                    help="stop every host after S seconds (default 0: no limit)")
    ph.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- train ARGS",
                    help="the `stoker train` arguments for every host")

    pd = sub.add_parser("demo", help="prepare the stdlib corpus, train a small model, show a sample")
    pd.add_argument("--data-dir", default="data/stdlib")
    pd.add_argument("--out-dir", default="runs/demo")
    pd.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except RunError as e:  # the run cannot go on (full disk, divergence, damaged file): say why, once
        print(f"stoker: error: {e}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides: list[str] = []
    if argv[:1] in (["train"], ["config"], ["tune"]):
        try:
            argv, overrides = _split_overrides(argv)
        except ConfigError as e:
            return _fail(str(e))
    command: list[str] = []
    if argv[:1] == ["jobs"]:
        from stoker.jobs.cli import split_command

        argv, command = split_command(argv)
    args = build_parser().parse_args(argv)
    args.job_command = command  # `jobs submit ... -- COMMAND`
    if args.command == "train":
        return cmd_train(args, overrides)
    if args.command == "tune":
        return cmd_tune(args, overrides)
    if args.command == "config":
        return cmd_config(args, overrides)
    if args.command == "generate":
        return cmd_generate(args, argv)
    if args.command == "jobs":
        from stoker.jobs.cli import cmd_jobs

        try:
            return cmd_jobs(args)
        except ConfigError as e:
            return _fail(str(e))
    if args.command == "plan":
        from stoker.parallel.plan import cmd_plan

        try:
            return cmd_plan(args)
        except ConfigError as e:
            return _fail(str(e))
    return {"prepare": cmd_prepare, "eval": cmd_eval, "export": cmd_export, "import": cmd_import, "demo": cmd_demo,
            "serve": cmd_serve, "hosts": cmd_hosts, "dashboard": cmd_dashboard}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
