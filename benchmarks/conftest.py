"""Shared options and fixtures of the kvmmu benchmark suite.

Run (numbers + JSON for ``benchmarks/report.py``)::

    python -m pytest benchmarks -q --benchmark-json=/tmp/bench.json -p no:cacheprovider
    python benchmarks/report.py /tmp/bench.json

Smoke mode (every benchmark body runs once, on small batches, < 60 s)::

    python -m pytest benchmarks -q --benchmark-disable

``--slow`` adds the 10^7-state sizes (about 2.2 GB of output buffer).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from typing import Callable, Dict, List

import numpy as np
import pytest

import kvmmu

# ---------------------------------------------------------------------------
# options and sizes


def pytest_addoption(parser):
    group = parser.getgroup("kvmmu benchmarks")
    group.addoption("--slow", action="store_true", default=False,
                    help="also run the 10^7-state sizes (init_mmu, thread scaling)")
    group.addoption("--sweep-timeout", type=float, default=60.0,
                    help="seconds before the kvmmu.sweep() benchmark gives up and "
                         "extrapolates from its progress (default 60)")


def smoke_mode(config) -> bool:
    """True when benchmarks are disabled: bodies run once, so keep batches small."""
    try:
        return bool(config.getoption("benchmark_disable"))
    except ValueError:
        return True


#: Batch sizes of the init_mmu groups (full run).
INIT_SIZES = [1, 10**3, 10**6]
SLOW_SIZES = [10**7]
#: Batch sizes in smoke mode: same code paths (10^4 > PARALLEL_MIN), tiny batches.
SMOKE_INIT_SIZES = [1, 10**3, 20_000]
#: Largest batch the reference model runs (it is extrapolated beyond).
REFERENCE_MAX = 10**3
#: Replay workload length (steps).
REPLAY_STEPS = 1 << 18
SMOKE_REPLAY_STEPS = 2_000


def init_sizes(config) -> List[int]:
    if smoke_mode(config):
        return list(SMOKE_INIT_SIZES)
    return INIT_SIZES + (SLOW_SIZES if config.getoption("slow") else [])


def thread_sizes(config) -> List[int]:
    if smoke_mode(config):
        return [20_000]
    return [10**6] + (SLOW_SIZES if config.getoption("slow") else [])


def replay_steps(config) -> int:
    return SMOKE_REPLAY_STEPS if smoke_mode(config) else REPLAY_STEPS


def size_id(n: int) -> str:
    """1 -> '1', 1000 -> '1e3', 20000 -> '2e4'."""
    if n < 10:
        return str(n)
    e = len(str(n)) - 1
    m = n / 10**e
    return f"1e{e}" if m == 1 else f"{m:g}e{e}"


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    if "init_n" in metafunc.fixturenames:
        sizes = init_sizes(cfg)
        metafunc.parametrize("init_n", sizes, ids=[f"N={size_id(n)}" for n in sizes])
    if "ref_n" in metafunc.fixturenames:
        sizes = [n for n in init_sizes(cfg) if n <= REFERENCE_MAX]
        metafunc.parametrize("ref_n", sizes, ids=[f"N={size_id(n)}" for n in sizes])
    if "numpy_n" in metafunc.fixturenames:
        sizes = [n for n in init_sizes(cfg) if n >= 10**3 and n <= 10**6]
        metafunc.parametrize("numpy_n", sizes, ids=[f"N={size_id(n)}" for n in sizes])
    if "thread_n" in metafunc.fixturenames:
        sizes = thread_sizes(cfg)
        metafunc.parametrize("thread_n", sizes, ids=[f"N={size_id(n)}" for n in sizes])


# ---------------------------------------------------------------------------
# configuration shared by kvmmu and the reference model

#: The host each flavor is benchmarked with: the configuration the kernel
#: reaches it under (shadow paging means TDP disabled), otherwise the defaults.
FLAVOR_HOSTS: Dict[str, kvmmu.HostConfig] = {
    "tdp": kvmmu.HostConfig(),
    "shadow": kvmmu.HostConfig(tdp_enabled=False),
    "shadow_npt": kvmmu.HostConfig(),
    "shadow_ept": kvmmu.HostConfig(),
    "nested": kvmmu.HostConfig(),
}
FLAVOR_EPT: Dict[str, object] = {"shadow_ept": kvmmu.EptConfig()}


def init_kwargs(flavor: str) -> dict:
    kw = {"host": FLAVOR_HOSTS[flavor]}
    if flavor in FLAVOR_EPT:
        kw["ept"] = FLAVOR_EPT[flavor]
    return kw


# ---------------------------------------------------------------------------
# batches and buffers (session-cached: generating 10^7 states takes seconds)


class BatchCache:
    """Random full-width states and preallocated ``out=`` buffers, by size."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._guests: Dict[int, np.ndarray] = {}
        self._out: np.ndarray = np.empty(0, dtype=kvmmu.CONTEXT_DTYPE)
        self._dicts: Dict[int, list] = {}

    def guests(self, n: int) -> np.ndarray:
        """``n`` random states over all 64 bits of CR0/CR4/EFER (kvmmu.workload('random'))."""
        g = self._guests.get(n)
        if g is None:
            g = kvmmu.workload("random", n=n, full_width=True, seed=self.seed).guests
            self._guests[n] = g
        return g

    def out(self, n: int) -> np.ndarray:
        """A preallocated, already touched CONTEXT_DTYPE buffer of ``n`` records.

        One allocation is shared by every size (a prefix slice is C-contiguous);
        it is written once up front so page faults are not part of any timing.
        """
        if self._out.shape[0] < n:
            buf = np.empty(n, dtype=kvmmu.CONTEXT_DTYPE)
            buf.view(np.uint8)[:] = 0          # touch every page now
            self._out = buf
        return self._out[:n]

    def reference_inputs(self, n: int) -> list:
        """The same states as plain dicts of Python ints (the reference model's input)."""
        d = self._dicts.get(n)
        if d is None:
            g = self.guests(n)
            cols = {name: g[name].tolist() for name in g.dtype.names}
            d = [{name: int(cols[name][i]) for name in cols} for i in range(n)]
            self._dicts[n] = d
        return d

    def release_above(self, n: int) -> None:
        """Drop cached batches larger than ``n`` (the 10^7 ones are 2.5 GB together)."""
        for k in [k for k in self._guests if k > n]:
            del self._guests[k]
        if self._out.shape[0] > n:
            self._out = np.empty(0, dtype=kvmmu.CONTEXT_DTYPE)


@pytest.fixture(scope="session")
def batches() -> BatchCache:
    return BatchCache()


@pytest.fixture
def guests_of(batches) -> Callable[..., np.ndarray]:
    """``guests_of(n)``: a cached random batch; ``guests_of(n, **fields)`` builds one with
    :func:`kvmmu.guests` from a numpy RNG (seed 0)."""

    def make(n: int, **fields) -> np.ndarray:
        if not fields:
            return batches.guests(n)
        rng = np.random.default_rng(0)
        cols = {k: (v(rng, n) if callable(v) else v) for k, v in fields.items()}
        return kvmmu.guests(**cols)

    return make


@pytest.fixture
def out_of(batches) -> Callable[[int], np.ndarray]:
    """``out_of(n)``: a preallocated CONTEXT_DTYPE buffer for ``out=``."""
    return batches.out


# ---------------------------------------------------------------------------
# recording helpers


def record(benchmark, n: int, **info) -> None:
    """Store the batch size, the labels and ns per state (median and min) in extra_info."""
    benchmark.extra_info["n"] = int(n)
    benchmark.extra_info.update(info)
    stats = getattr(benchmark, "stats", None)
    if stats is None or not n:
        return
    s = stats.stats
    benchmark.extra_info["ns_per_state"] = s.median / n * 1e9
    benchmark.extra_info["ns_per_state_min"] = s.min / n * 1e9


# ---------------------------------------------------------------------------
# machine description stored in the JSON


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cython_version() -> str:
    try:
        import Cython

        return Cython.__version__
    except ImportError:
        return "not installed"


def pytest_sessionstart(session):
    session.config._kvmmu_load_start = os.getloadavg() if hasattr(os, "getloadavg") else None


def pytest_benchmark_update_machine_info(config, machine_info):
    import kvmmu._core as core

    machine_info["kvmmu"] = {
        "version": kvmmu.__version__,
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "cython": _cython_version(),
        "openmp_enabled": bool(kvmmu.openmp_enabled()),
        "max_threads": int(core.max_threads()),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "debug_build": bool(core.debug_build()) if hasattr(core, "debug_build") else None,
        "has_bare_compare_loop": hasattr(core, "bare_compare_loop"),
        "has_sweep": hasattr(kvmmu, "sweep"),
        "slow": bool(config.getoption("slow")),
        "loadavg_start": getattr(config, "_kvmmu_load_start", None),
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "pytest"] + list(config.invocation_params.args)),
    }
