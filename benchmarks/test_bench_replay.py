"""Replay: the role guard's skip path vs always recomputing, per workload.

Group ``replay <workload> <flavor> <version>`` holds three rows:

* ``skip_if_same_role`` -- KVM's guard (nothing written when the role matches);
* ``force`` -- the body runs every step;
* ``bare compare floor`` -- ``kvmmu._core.bare_compare_loop`` over the same
  step's role words: a nogil loop that only compares neighbouring uint64
  roles, i.e. the least a skip can cost.

Group ``replay floors`` adds the other part of every replay step, skipped or
not: writing the step's 216-byte context into ``out`` (timed here as a NumPy
broadcast of one record's bytes into an ``(n, 216)`` uint8 view).

extra_info holds ``n`` (steps), ``ns_per_init`` (= ns_per_state) and, for the
replays, ``skip_fraction`` and ``recomputes``.
"""
from __future__ import annotations

import numpy as np
import pytest

import kvmmu
from kvmmu import _core

from conftest import init_kwargs, record, replay_steps

CASES = [("tdp", "v5.17"), ("shadow", "v6.16")]
WORKLOADS = ("boot", "cr0wp_toggle", "context_switch", "cpuid_update", "random")


def make_workload(name: str, n: int) -> "kvmmu.Workload":
    """Each built-in workload at ``n`` steps (boot: 9 mode switches + n - 9 steady steps)."""
    if name == "boot":
        return kvmmu.workload("boot", steady_steps=max(n - 9, 0))
    return kvmmu.workload(name, n=n)


_CACHE = {}


def _workload(name, n):
    w = _CACHE.get((name, n))
    if w is None:
        w = _CACHE[(name, n)] = make_workload(name, n)
    return w


def _group(name, flavor, version):
    return f"replay {name} {flavor} {version}"


@pytest.mark.parametrize("policy", ["skip_if_same_role", "force"])
@pytest.mark.parametrize("flavor,version", CASES)
@pytest.mark.parametrize("name", WORKLOADS)
def test_replay(benchmark, name, flavor, version, policy, request):
    w = _workload(name, replay_steps(request.config))
    n = w.guests.shape[0]
    out = np.zeros(n, dtype=kvmmu.CONTEXT_DTYPE)
    kw = init_kwargs(flavor)
    benchmark.group = _group(name, flavor, version)
    benchmark.name = f"replay {policy} {name} {flavor} {version}"
    res = benchmark(kvmmu.replay, w.guests, flavor, version=version, policy=policy,
                    invalidate=w.invalidate, vcpu=w.vcpu, out=out, **kw)
    record(benchmark, n, impl="kvmmu", kind="replay", workload=name, flavor=flavor,
           version=version, policy=policy, skip_fraction=res.skip_fraction,
           recomputes=res.recomputes, skips=res.skips)
    if "ns_per_state" in benchmark.extra_info:
        benchmark.extra_info["ns_per_init"] = benchmark.extra_info["ns_per_state"]


@pytest.mark.parametrize("flavor,version", CASES)
@pytest.mark.parametrize("name", WORKLOADS)
def test_bare_compare_floor(benchmark, name, flavor, version, request):
    loop = getattr(_core, "bare_compare_loop", None)
    if loop is None:
        pytest.skip("kvmmu._core has no bare_compare_loop(uint64[::1] roles) -> int yet "
                    "(the skip-path floor needs it; a compiled module cannot be added from "
                    "benchmarks/). Rebuild with `pip install -e . --no-build-isolation` once "
                    "it is in _core.pyx.")
    w = _workload(name, replay_steps(request.config))
    n = w.guests.shape[0]
    # the role sequence the guard compares: the role each step computes
    roles = np.ascontiguousarray(
        kvmmu.init_mmu(w.guests, flavor, version=version, **init_kwargs(flavor))["role"])
    benchmark.group = _group(name, flavor, version)
    benchmark.name = f"bare compare floor {name} {flavor} {version}"
    same = benchmark(loop, roles)
    record(benchmark, n, impl="bare_compare_loop", kind="replay_floor", workload=name,
           flavor=flavor, version=version, equal_neighbours=int(same))
    if "ns_per_state" in benchmark.extra_info:
        benchmark.extra_info["ns_per_init"] = benchmark.extra_info["ns_per_state"]


def test_replay_copy_floor(benchmark, request):
    """Writing n contexts of 216 bytes (what replay does per step besides the init)."""
    n = replay_steps(request.config)
    out = np.zeros(n, dtype=kvmmu.CONTEXT_DTYPE)
    rows = out.view(np.uint8).reshape(n, kvmmu.CONTEXT_DTYPE.itemsize)
    one = kvmmu.init_mmu(kvmmu.guests(cr0=0x80050033, cr4=0x3006f0, efer=0xd01), "tdp")
    row = one.view(np.uint8).reshape(-1)
    benchmark.group = "replay floors"
    benchmark.name = "copy floor: write one 216-byte context per step"
    benchmark(rows.__setitem__, slice(None), row)
    record(benchmark, n, impl="numpy", kind="replay_copy_floor")
