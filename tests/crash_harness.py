"""A fork server for crash tests: it imports the package once, then runs each ``surgery`` command in
a forked child, which can be told to kill itself with SIGKILL at a chosen point of a chosen step.

Start it with ``python -c "import crash_harness; crash_harness.serve()"`` (this directory on the
path). It prints ``ready``, then answers each request line on stdin, a JSON object

    {"argv": ["run", "recipe.yaml"], "cwd": "...", "log": "...", "kill": null or {...}}

with a JSON line ``{"status": N}``: the exit code, or minus the signal that ended the child. The
child's stdout and stderr go to ``log``. A ``kill`` is

    {"stage": "capture", "at": "progress", "after": 2, "desc": "fam capture"}  # before item 3 of a
                                                                          # progress bar of that stage
    {"stage": "fuse", "at": "write", "after": 2}   # on the 2nd file written in that stage: half of
                                                    # it lands under its final name, then SIGKILL

Forking a process that already ran OpenMP work hangs, so the server does no tensor work itself;
each child runs on one thread (the same for every run, so outputs compare bit for bit).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from contextlib import contextmanager


def serve() -> None:
    from plugin_registries import manager

    import surgery.cli  # noqa: F401  (the heavy imports happen here, once)

    manager()
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


def _child(request: dict) -> None:
    code = 1
    try:
        import torch

        os.chdir(request["cwd"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        torch.set_num_threads(1)
        if request.get("kill"):
            install_kill(**request["kill"])
        from surgery.cli import main

        sys.argv = ["surgery", *request["argv"]]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def install_kill(stage: str, at: str, after: int, desc: str = "") -> None:
    """Patch the core so that this process kills itself inside the first step of ``stage``."""
    from surgery.core import io
    from surgery.runtime import runner
    from surgery.runtime.context import StepContext

    state = {"stage": None, "count": 0}
    compute = runner.Run._compute

    def tracked_compute(self, step, final, fp):
        state["stage"], state["count"] = step.stage, 0
        return compute(self, step, final, fp)

    runner.Run._compute = tracked_compute

    prefix = desc
    if at == "progress":
        progress = StepContext.progress

        def killing_progress(self, iterable, desc, total=None):
            for item in progress(self, iterable, desc, total):
                if state["stage"] == stage and desc.startswith(prefix):
                    if state["count"] == after:
                        _die()
                    state["count"] += 1
                yield item

        StepContext.progress = killing_progress
    elif at == "write":
        atomic_path = io.atomic_path

        @contextmanager
        def killing_atomic_path(path):
            with atomic_path(path) as tmp:
                yield tmp
                if state["stage"] == stage:
                    state["count"] += 1
                    if state["count"] == after:  # the data only half on disk, yet renamed into place
                        data = tmp.read_bytes()
                        tmp.write_bytes(data[: len(data) // 2])
                        os.replace(tmp, path)
                        _die()

        for module in list(sys.modules.values()):  # every module that imported it by name
            if getattr(module, "__name__", "").startswith("surgery") and getattr(module, "atomic_path", None) is atomic_path:
                module.atomic_path = killing_atomic_path
    else:
        raise ValueError(f"unknown kill point {at!r}")


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
