"""The process the local engine starts for each attempt of a job: it runs the job's command,
passes a stop request on to it, and writes its exit code to a file when it ends.

It lets the engine learn how an attempt ended even when the engine itself was restarted in the
meantime (the shim is then no longer its child). Standard library only: it starts fast.

    python -m stoker.jobs.shim --job ID --attempt N --exit-file PATH -- COMMAND...
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: python -m stoker.jobs.shim --job ID --attempt N --exit-file PATH -- COMMAND...", file=sys.stderr)
        return 2
    opts, cmd = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    o = dict(zip(opts[::2], opts[1::2]))
    exit_file = o["--exit-file"]
    print(f"--- job {o.get('--job')} attempt {o.get('--attempt')}: started {time.strftime('%Y-%m-%d %H:%M:%S')} "
          f"in {os.getcwd()}: {' '.join(cmd)}", flush=True)
    try:
        # Its own process group, so that a stop reaches the command and whatever it started.
        child = subprocess.Popen(cmd, process_group=0)
    except OSError as e:
        print(f"--- cannot start {cmd[0]!r}: {e.strerror or e}", flush=True)
        code = 127
    else:
        def forward(signum, frame):
            try:
                os.killpg(child.pid, signum)
            except OSError:
                pass

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, forward)
        rc = child.wait()
        code = rc if rc >= 0 else 128 - rc  # killed by signal N: 128 + N, as a shell says
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as f:
        json.dump({"exit_code": code, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, exit_file)
    print(f"--- job {o.get('--job')} attempt {o.get('--attempt')}: exit {code} at {time.strftime('%H:%M:%S')}",
          flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
