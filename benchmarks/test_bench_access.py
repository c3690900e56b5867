"""Access verdicts over access.c's flag space.

* ``accessc space``: the whole main loop of kvm-unit-tests x86/access.c for
  the four CPU configurations of docs/access-c-model.md (MAXPHYADDR 36/46 x
  PKU yes/no, 52,985,856 words) through :func:`kvmmu.accessc.verdicts`, in
  chunks of 2**20 words with one reused ``out=`` buffer (memory stays at
  about 50 MB of results plus the word lists), threads=1 and 2; and each
  configuration alone.
* ``access records``: the generic :func:`kvmmu.access.access_verdicts` on
  10**6 ACCESS_DTYPE records built by :func:`kvmmu.accessc.inputs`.

extra_info: ``n``, ``ns_per_state`` / ``ns_per_verdict`` (median), ``threads``.
Smoke mode (``--benchmark-disable``): 20,000 words per configuration.

Run::

    python -m pytest benchmarks/test_bench_access.py -q -p no:cacheprovider \\
        --benchmark-json=/tmp/bench-access.json
"""
from __future__ import annotations

import numpy as np
import pytest

import kvmmu
from kvmmu import accessc
from kvmmu.access import ACCESS_RESULT_DTYPE, access_verdicts

from conftest import record, smoke_mode

CONFIGS = sorted(accessc.MAIN_COUNTS, reverse=True)      # (46, False) ... (36, True)
CHUNK = 1 << 20
SMOKE_WORDS = 20_000


def _cid(c):
    return f"maxphyaddr={c[0]}-{'pku' if c[1] else 'nopku'}"


@pytest.fixture(scope="module")
def spaces(request):
    """The main-loop words of each configuration (a prefix in smoke mode)."""
    out = {}
    for mp, pku in CONFIGS:
        w = accessc.enumerate(mp, pku)
        out[(mp, pku)] = w[:SMOKE_WORDS].copy() if smoke_mode(request.config) else w
    return out


@pytest.fixture(scope="module")
def out_buffer():
    buf = np.empty(CHUNK, dtype=ACCESS_RESULT_DTYPE)
    buf.view(np.uint8)[:] = 0            # touch every page before timing
    return buf


def _run(words_by_config, buf, threads):
    for (mp, _pku), words in words_by_config:
        for c in accessc.chunks(words, CHUNK):
            accessc.verdicts(c, mp, out=buf[:c.size], threads=threads)


def _faults(words_by_config, buf):
    n = 0
    for (mp, _pku), words in words_by_config:
        for c in accessc.chunks(words, CHUNK):
            n += int(np.count_nonzero(accessc.verdicts(c, mp, out=buf[:c.size])["fault"]))
    return n


def _extra(benchmark, n):
    s = getattr(benchmark, "stats", None)
    if s is not None and n:
        benchmark.extra_info["ns_per_verdict"] = s.stats.median / n * 1e9
        benchmark.extra_info["ns_per_verdict_min"] = s.stats.min / n * 1e9
        benchmark.extra_info["seconds_median"] = s.stats.median


@pytest.mark.parametrize("threads", [1, 2])
def test_accessc_whole_space(benchmark, spaces, out_buffer, threads, request):
    items = [(c, spaces[c]) for c in CONFIGS]
    n = sum(w.size for _, w in items)
    benchmark.group = "accessc space (all four configurations)"
    benchmark.name = f"accessc.verdicts threads={threads}"
    rounds = 1 if smoke_mode(request.config) else 3
    benchmark.pedantic(_run, args=(items, out_buffer, threads), rounds=rounds,
                       iterations=1, warmup_rounds=0)
    record(benchmark, n, impl="kvmmu", kind="accessc", threads=threads)
    if not smoke_mode(request.config) and threads == 1:
        # outside the timing: the space and its fault count are the doc's
        assert n == sum(v[0] for v in accessc.MAIN_COUNTS.values())
        faults = _faults(items, out_buffer)
        assert faults == sum(v[1] for v in accessc.MAIN_COUNTS.values())
        benchmark.extra_info["faults"] = faults
    _extra(benchmark, n)


@pytest.mark.parametrize("config", CONFIGS, ids=_cid)
def test_accessc_configuration(benchmark, spaces, out_buffer, config, request):
    words = spaces[config]
    benchmark.group = "accessc space per configuration"
    benchmark.name = f"accessc.verdicts {_cid(config)}"
    rounds = 1 if smoke_mode(request.config) else 3
    benchmark.pedantic(_run, args=([(config, words)], out_buffer, None), rounds=rounds,
                       iterations=1, warmup_rounds=0)
    record(benchmark, words.size, impl="kvmmu", kind="accessc", config=_cid(config))
    _extra(benchmark, words.size)


def test_access_records(benchmark, spaces, request):
    n = SMOKE_WORDS if smoke_mode(request.config) else 10**6
    words = spaces[(36, True)][:n]
    acc, _ = accessc.inputs(words, 36)
    out = np.empty(acc.size, dtype=ACCESS_RESULT_DTYPE)
    benchmark.group = "access records"
    benchmark.name = f"access_verdicts N={acc.size}"
    benchmark(access_verdicts, acc, out=out)
    record(benchmark, acc.size, impl="kvmmu", kind="access_verdicts")
    _extra(benchmark, acc.size)
    assert kvmmu.access.ACCESS_RESULT_DTYPE == out.dtype
