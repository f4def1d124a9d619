"""A process that imports torch, torch.distributed and savegame once, then forks the ranks of test jobs.

Started by launch.py. A fresh interpreter spends about 3 s of CPU importing torch and its
distributed packages, and a test job starts two or three of them; a fork of this process
starts in milliseconds. The zygote never runs a torch operation or starts a thread, so
forking it is as safe as starting a new interpreter.

stdin, one JSON line per rank: {"script", "args", "env", "cwd", "out", "err"}.
stdout: "pid PID" once the rank is forked, "exit PID CODE" when it ended (CODE as
subprocess reports it: negative for a signal).

A forked rank sets its environment, working directory and standard streams as a new
process would have them, reseeds what a new interpreter seeds at random, and runs the
script as ``__main__``; it ends as the interpreter's exit would (threads joined, atexit
handlers run, streams flushed, the same exit code), without the module teardown.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import runpy
import signal
import sys
import threading
import traceback
from typing import Any

import numpy
import torch
import torch._dynamo  # DistributedDataParallel imports it when first built: 2 s
import torch.distributed
import torch.distributed.checkpoint
import torch.distributed.fsdp
import torch.nn.parallel

import savegame  # noqa: F401  (imported for its import time)


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())


def reap(signum: int, frame: Any) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")


def serve() -> dict[str, Any]:
    """Fork a rank per request; return the request in the child, exit when stdin closes in the zygote."""
    signal.signal(signal.SIGCHLD, reap)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return dict(request)
        say(f"pid {pid}")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sys.exit(0)


def become(request: dict[str, Any]) -> None:
    """Turn this fork into the rank ``request`` describes."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["out"]), (2, request["err"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin, for its whole life
    random.seed()
    numpy.random.seed()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))


def run(request: dict[str, Any]) -> int:
    """Run the script; its exit code as the interpreter would give it."""
    try:
        runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def end(code: int) -> None:
    """Exit as the interpreter does (threads joined, atexit handlers run, streams flushed), without tearing
    down torch's modules one by one: that takes the interpreter 1-3 s, longer than the test's work."""
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx does first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    wanted = serve()
    become(wanted)
    end(run(wanted))
