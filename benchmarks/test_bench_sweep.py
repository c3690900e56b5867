"""kvmmu.sweep() with its defaults (every flavor, one version, reachable states).

The sweep runs in a forked child with a deadline (``--sweep-timeout``,
default 60 s) so a slow sweep cannot stall the suite. The child reports its
progress; on a timeout the run is stopped and the total is extrapolated from
the fraction done. extra_info: ``sweep_s`` (measured inside the child, or the
extrapolation), ``timed_out``, ``states``, ``chunks_done``/``chunks_total``.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

import kvmmu


def _child(conn, kwargs):
    t0 = time.perf_counter()

    def progress(done, total):
        conn.send(("progress", done, total, time.perf_counter() - t0))

    try:
        res = kvmmu.sweep(progress=progress, **kwargs)
        states = getattr(res, "states", None)
        conn.send(("done", time.perf_counter() - t0, states))
    except BaseException as exc:  # report, do not hang the parent
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def run_sweep(timeout: float, kwargs=None) -> dict:
    """Run kvmmu.sweep(**kwargs) in a forked child; return timing and progress."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, kwargs or {}), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    info = {"timed_out": False, "chunks_done": 0, "chunks_total": None, "states": None}
    deadline = t0 + timeout
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or not parent.poll(left):
                if time.perf_counter() >= deadline:
                    info["timed_out"] = True
                    break
                continue
            try:
                msg = parent.recv()
            except EOFError:
                info["error"] = "child exited without a result"
                break
            if msg[0] == "progress":
                _, done, total, at = msg
                info.update(chunks_done=done, chunks_total=total, progress_s=at)
            elif msg[0] == "done":
                info["sweep_s"] = msg[1]
                info["states"] = msg[2]
                break
            else:
                info["error"] = msg[1]
                break
    finally:
        if proc.is_alive():
            proc.kill()          # only the child this function started
        proc.join(5)
        parent.close()
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
