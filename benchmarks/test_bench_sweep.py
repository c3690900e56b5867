"""kvmmu.sweep() with its defaults (every flavor, one version, reachable states).

The sweep runs in a fresh child interpreter (``subprocess``, not ``fork``:
libgomp deadlocks in a forked child once the parent has run an OpenMP
region, which the thread benchmarks do) with a deadline (``--sweep-timeout``,
default 60 s), so a slow sweep cannot stall the suite. The child reports its
progress; on a timeout it is stopped and the total is extrapolated from the
fraction done. extra_info: ``sweep_s`` (timed inside the child around the
``kvmmu.sweep`` call only, or the extrapolation), ``timed_out``, ``states``,
``inits``, ``chunks_done``/``chunks_total``.
"""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time

import pytest

import kvmmu

CHILD = r"""
import json, sys, time
import kvmmu
kwargs = json.loads(sys.argv[1])
def emit(*a):
    sys.stdout.write(json.dumps(a) + "\n"); sys.stdout.flush()
t0 = time.perf_counter()
def progress(done, total):
    emit("progress", done, total, time.perf_counter() - t0)
try:
    res = kvmmu.sweep(progress=progress, **kwargs)
    emit("done", time.perf_counter() - t0, getattr(res, "states", None),
         getattr(res, "inits", None))
except BaseException as exc:
    emit("error", repr(exc))
"""


def run_sweep(timeout: float, kwargs=None) -> dict:
    """Run kvmmu.sweep(**kwargs) in a child interpreter; return timing and progress."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(kwargs or {})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    info = {"timed_out": False, "chunks_done": 0, "chunks_total": None, "states": None}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.perf_counter() + timeout
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                info["timed_out"] = True
                break
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                info["error"] = "child exited without a result: " + proc.stderr.read()[-2000:]
                break
            msg = json.loads(line)
            if msg[0] == "progress":
                _, done, total, at = msg
                info.update(chunks_done=done, chunks_total=total, progress_s=at)
            elif msg[0] == "done":
                info.update(sweep_s=msg[1], states=msg[2], inits=msg[3])
                break
            else:
                info["error"] = msg[1]
                break
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()          # only the child this function started
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    if info["timed_out"]:
        done, total = info["chunks_done"], info["chunks_total"]
        info["elapsed_at_timeout_s"] = timeout
        if done and total:
            info["sweep_s"] = info["progress_s"] * total / done
            info["sweep_s_is_extrapolated"] = True
    return info


def test_sweep_defaults(benchmark, request):
    if not hasattr(kvmmu, "sweep"):
        pytest.skip("kvmmu.sweep does not exist yet (being written); nothing to measure")
    smoke = bool(request.config.getoption("benchmark_disable"))
    timeout = float(request.config.getoption("sweep_timeout"))
    if smoke:
        # the smoke run only checks that the harness works, on a tiny sweep
        kwargs = {"flavors": ["shadow"], "maxphyaddrs": [46], "check_guard": False}
        timeout = min(timeout, 30.0)
    else:
        kwargs = {}
    benchmark.group = "sweep"
    benchmark.name = "kvmmu.sweep() defaults" if not kwargs else "kvmmu.sweep(small)"
    holder = {}

    def once():
        holder.update(run_sweep(timeout, kwargs))

    benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    info = holder
    if "error" in info:
        pytest.fail(f"kvmmu.sweep() failed in the child: {info['error']}")
    benchmark.extra_info.update(kind="sweep", impl="kvmmu", timeout_s=timeout,
                                kwargs=repr(kwargs), **info)
    if info.get("states"):
        benchmark.extra_info["n"] = int(info["states"])
        if info.get("sweep_s") and not info["timed_out"]:
            benchmark.extra_info["ns_per_state"] = info["sweep_s"] / info["states"] * 1e9
