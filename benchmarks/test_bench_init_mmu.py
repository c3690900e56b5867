"""init_mmu throughput: kvmmu vs the scalar reference model vs a NumPy guest table.

Groups are named so that the rows pytest-benchmark compares are the ones a
reader wants side by side:

* ``init_mmu <flavor> <version> N=<n>``: kvmmu (``out=`` preallocated,
  ``threads=1``), the reference model (per-state Python loop, N <= 10^3 only;
  ns/state in extra_info is what the report extrapolates from) and, for
  ``tdp v5.17``, the NumPy guest table (N = 10^3, 10^6);
* ``guest table N=<n>``: the guest reserved-bit table alone -- the compiled
  kernel kvmmu runs for it, the public building block, NumPy -- next to the
  full-context init_mmu;
* ``threads <flavor> <version> N=<n>``: threads=1 vs threads=2;
* ``one-state call``: the fixed cost of ``init_mmu`` on one state, and where it goes;
* ``allocation N=<n>``: ``out=`` preallocated vs allocated per call.

Every benchmark stores ``n`` and ``ns_per_state`` (median) in extra_info.
"""
from __future__ import annotations

import numpy as np
import pytest

import kvmmu
from kvmmu import _core, engine
from kvmmu import reference as ref

from conftest import FLAVOR_EPT, FLAVOR_HOSTS, init_kwargs, record, size_id, thread_sizes
from numpy_guest_table import guest_rsvd_tdp_v517

FLAVORS = kvmmu.FLAVORS
VERSIONS = kvmmu.VERSIONS
NUMPY_CASE = ("tdp", "v5.17")     # the flavor/version the NumPy baseline implements
REF_ROUNDS = 5


def _group(flavor, version, n):
    return f"init_mmu {flavor} {version} N={size_id(n)}"


# ---------------------------------------------------------------------------
# init_mmu per flavor / version / N


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_init_mmu(benchmark, flavor, version, init_n, guests_of, out_of):
    g = guests_of(init_n)
    out = out_of(init_n)
    kw = init_kwargs(flavor)
    benchmark.group = _group(flavor, version, init_n)
    benchmark.name = f"kvmmu init_mmu {flavor} {version} N={size_id(init_n)}"
    benchmark(kvmmu.init_mmu, g, flavor, version=version, out=out, threads=1, **kw)
    record(benchmark, init_n, impl="kvmmu", kind="init_mmu", flavor=flavor, version=version,
           threads=1)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_reference(benchmark, flavor, version, ref_n, batches):
    """The plain-Python scalar model, one state at a time (input already Python dicts)."""
    states = batches.reference_inputs(ref_n)
    host = FLAVOR_HOSTS[flavor]
    ept = FLAVOR_EPT.get(flavor)
    init_one = ref.init_mmu_one

    def loop():
        for s in states:
            init_one(s, flavor, host, ept, version)

    benchmark.group = _group(flavor, version, ref_n)
    benchmark.name = f"reference {flavor} {version} N={size_id(ref_n)}"
    benchmark.pedantic(loop, rounds=REF_ROUNDS if ref_n > 1 else 200, iterations=1,
                       warmup_rounds=1)
    record(benchmark, ref_n, impl="reference", kind="init_mmu", flavor=flavor, version=version)


def test_numpy_guest_table(benchmark, numpy_n, guests_of):
    """What a user writes without kvmmu: np.where over columns (guest table only)."""
    g = guests_of(numpy_n)
    flavor, version = NUMPY_CASE
    host = FLAVOR_HOSTS[flavor]
    benchmark.group = _group(flavor, version, numpy_n)
    benchmark.name = f"numpy guest table {flavor} {version} N={size_id(numpy_n)}"
    benchmark(guest_rsvd_tdp_v517, g, host.tdp_enabled, host.host_gbpages)
    record(benchmark, numpy_n, impl="numpy", kind="guest_table", flavor=flavor, version=version)


# ---------------------------------------------------------------------------
# the guest reserved-bit table alone


def _table_inputs(g):
    """reset_rsvds_bits_mask arguments of a tdp/v5.17 init, derived once (untimed)."""
    cr0, cr4, efer = g["cr0"], g["cr4"], g["efer"]
    pg = (cr0 >> np.uint64(31)) & np.uint64(1)
    lma = (efer >> np.uint64(10)) & np.uint64(1)
    la57 = (cr4 >> np.uint64(12)) & np.uint64(1)
    pae = (cr4 >> np.uint64(5)) & np.uint64(1)
    level = np.where(pg == 0, 0, np.where(lma == 1, np.where(la57 == 1, 5, 4),
                                          np.where(pae == 1, 3, 2))).astype(np.int64)
    # paging off writes nothing; the building block only accepts levels 1..5, and
    # level 1 is the same no-op (section 7.1: "other (0, 1, ...)")
    level = np.maximum(level, 1)
    pa = np.ascontiguousarray(kvmmu.rsvd_bits(g["maxphyaddr"].astype(np.int64), 63))
    nx = np.ascontiguousarray(((efer >> np.uint64(11)) & np.uint64(1)).astype(np.uint8))
    gb = np.ones(g.size, np.uint8)
    pse = np.ascontiguousarray(((cr4 >> np.uint64(4)) & np.uint64(1)).astype(np.uint8))
    amd = np.ascontiguousarray(g["guest_amd"].astype(np.uint8))
    return level, pa, nx, gb, pse, amd


def _table_group(n):
    return f"guest table N={size_id(n)}"


def test_guest_table_core_kernel(benchmark, numpy_n, guests_of):
    """kvmmu's compiled guest-table kernel (the part of init_mmu the NumPy code replaces)."""
    g = guests_of(numpy_n)
    args = _table_inputs(g)
    masks = np.zeros((numpy_n, 10), dtype=np.uint64)
    bad = np.zeros(numpy_n, dtype=np.uint64)
    benchmark.group = _table_group(numpy_n)
    benchmark.name = f"kvmmu core guest-table kernel N={size_id(numpy_n)}"
    benchmark(_core.reset_rsvds_bits_mask, *args, masks, bad)
    # what it computed is the init_mmu guest table (paging-off rows stay zero)
    ctx = kvmmu.init_mmu(g[:1000], "tdp")
    assert np.array_equal(masks[:1000].reshape(-1, 2, 5), ctx["guest_rsvd"])
    record(benchmark, numpy_n, impl="kvmmu_core_table", kind="guest_table", flavor="tdp",
           version="v5.17")


def test_guest_table_public(benchmark, numpy_n, guests_of):
    """kvmmu.reset_rsvds_bits_mask (validated building block, allocates its output)."""
    g = guests_of(numpy_n)
    level, pa, nx, gb, pse, amd = _table_inputs(g)
    benchmark.group = _table_group(numpy_n)
    benchmark.name = f"kvmmu.reset_rsvds_bits_mask N={size_id(numpy_n)}"
    benchmark(kvmmu.reset_rsvds_bits_mask, level, pa, nx, gb, pse, amd)
    record(benchmark, numpy_n, impl="kvmmu_public_table", kind="guest_table", flavor="tdp",
           version="v5.17")


def test_guest_table_numpy(benchmark, numpy_n, guests_of):
    g = guests_of(numpy_n)
    benchmark.group = _table_group(numpy_n)
    benchmark.name = f"numpy guest table N={size_id(numpy_n)}"
    benchmark(guest_rsvd_tdp_v517, g)
    record(benchmark, numpy_n, impl="numpy", kind="guest_table", flavor="tdp", version="v5.17")


def test_guest_table_full_context(benchmark, numpy_n, guests_of, out_of):
    g = guests_of(numpy_n)
    out = out_of(numpy_n)
    benchmark.group = _table_group(numpy_n)
    benchmark.name = f"kvmmu init_mmu full context N={size_id(numpy_n)}"
    benchmark(kvmmu.init_mmu, g, "tdp", out=out, threads=1)
    record(benchmark, numpy_n, impl="kvmmu", kind="full_context", flavor="tdp", version="v5.17",
           threads=1)


# ---------------------------------------------------------------------------
# thread scaling


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("flavor,version", [("tdp", "v5.17"), ("tdp", "v6.16"),
                                            ("shadow", "v5.17")])
def test_threads(benchmark, flavor, version, threads, thread_n, guests_of, out_of, batches):
    if threads > 1 and not kvmmu.openmp_enabled():
        pytest.skip("kvmmu._core was built without OpenMP: threads > 1 runs serially")
    g = guests_of(thread_n)
    out = out_of(thread_n)
    kw = init_kwargs(flavor)
    benchmark.group = f"threads {flavor} {version} N={size_id(thread_n)}"
    benchmark.name = f"threads={threads} {flavor} {version} N={size_id(thread_n)}"
    benchmark(kvmmu.init_mmu, g, flavor, version=version, out=out, threads=threads, **kw)
    record(benchmark, thread_n, impl="kvmmu", kind="threads", flavor=flavor, version=version,
           threads=threads)


# ---------------------------------------------------------------------------
# one-state call: fixed cost and where it goes


ONE = "one-state call"


@pytest.fixture
def one_state(guests_of, out_of):
    g = guests_of(1).copy()
    out = np.zeros(1, dtype=kvmmu.CONTEXT_DTYPE)
    return g, out


@pytest.mark.parametrize("flavor", ["tdp", "shadow"])
def test_one_state_init_mmu(benchmark, flavor, one_state):
    g, out = one_state
    kw = init_kwargs(flavor)
    benchmark.group = ONE
    benchmark.name = f"init_mmu(1 state, out=, host=HostConfig) {flavor}"
    benchmark(kvmmu.init_mmu, g, flavor, out=out, **kw)
    record(benchmark, 1, impl="kvmmu", kind="one_state", part="init_mmu", flavor=flavor)


def test_one_state_defaults(benchmark, one_state):
    """init_mmu(g, 'tdp'): host=None and out=None, the call a user writes first."""
    g, _ = one_state
    benchmark.group = ONE
    benchmark.name = "init_mmu(1 state) tdp, all defaults"
    benchmark(kvmmu.init_mmu, g, "tdp")
    record(benchmark, 1, impl="kvmmu", kind="one_state", part="init_mmu_defaults", flavor="tdp")


def _need(name):
    f = getattr(engine, name, None)
    if f is None:
        pytest.skip(f"kvmmu.engine.{name} no longer exists (breakdown needs updating)")
    return f


def test_one_state_part_as_guest_records(benchmark, one_state):
    g, _ = one_state
    f = _need("as_guest_records")
    benchmark.group = ONE
    benchmark.name = "part: engine.as_guest_records"
    benchmark(f, g)
    record(benchmark, 1, impl="kvmmu", kind="one_state", part="as_guest_records")


def test_one_state_part_make_params(benchmark):
    f = _need("make_params")
    host = FLAVOR_HOSTS["tdp"]
    benchmark.group = ONE
    benchmark.name = "part: engine.make_params (host given)"
    benchmark(f, "tdp", host, None, "v5.17", "v517")
    record(benchmark, 1, impl="kvmmu", kind="one_state", part="make_params")


def test_one_state_part_host_config(benchmark):
    benchmark.group = ONE
    benchmark.name = "part: HostConfig() + EptConfig() construction"

    def build():
        kvmmu.HostConfig()
        kvmmu.EptConfig()

    benchmark(build)
    record(benchmark, 1, impl="kvmmu", kind="one_state", part="config_construction")


def test_one_state_part_prepare_out(benchmark, one_state):
    g, out = one_state
    f = _need("_prepare_out")
    benchmark.group = ONE
    benchmark.name = "part: engine._prepare_out"
    benchmark(f, out, g.shape)
    record(benchmark, 1, impl="kvmmu", kind="one_state", part="prepare_out")


def test_one_state_part_views(benchmark, one_state):
    g, out = one_state
    benchmark.group = ONE
    benchmark.name = "part: uint8 views of guests and out"

    def views():
        g.reshape(-1).view(np.uint8)
        out.reshape(-1).view(np.uint8)

    benchmark(views)
    record(benchmark, 1, impl="kvmmu", kind="one_state", part="byte_views")


def test_one_state_part_core(benchmark, one_state):
    """_core.init_mmu alone: params dict -> struct, buffer acquisition, one init."""
    g, out = one_state
    params = _need("make_params")("tdp", FLAVOR_HOSTS["tdp"], None, "v5.17", "v517")[0]
    gb = g.reshape(-1).view(np.uint8)
    ob = out.reshape(-1).view(np.uint8)
    empty = np.zeros(0, dtype=np.uint8)
    pmin = getattr(engine, "PARALLEL_MIN", 16384)
    benchmark.group = ONE
    benchmark.name = "part: _core.init_mmu (compiled call only)"
    benchmark(_core.init_mmu, gb, ob, 1, params, empty, 1, pmin)
    record(benchmark, 1, impl="kvmmu", kind="one_state", part="core_call")


def test_one_state_reference(benchmark, batches):
    s = batches.reference_inputs(1)[0]
    host = FLAVOR_HOSTS["tdp"]
    benchmark.group = ONE
    benchmark.name = "reference init_mmu_one tdp"
    benchmark(ref.init_mmu_one, s, "tdp", host)
    record(benchmark, 1, impl="reference", kind="one_state", part="reference", flavor="tdp")


# ---------------------------------------------------------------------------
# allocation: out= preallocated vs a fresh output per call


@pytest.mark.parametrize("prealloc", [True, False], ids=["out=prealloc", "out=None"])
def test_allocation(benchmark, prealloc, request, guests_of, out_of):
    thread_n = thread_sizes(request.config)[0]      # 10^6 (smoke: 2*10^4), never 10^7
    g = guests_of(thread_n)
    out = out_of(thread_n) if prealloc else None
    benchmark.group = f"allocation N={size_id(thread_n)}"
    benchmark.name = f"init_mmu tdp v5.17 threads=1 {'out=prealloc' if prealloc else 'out=None'}"
    benchmark(kvmmu.init_mmu, g, "tdp", out=out, threads=1)
    record(benchmark, thread_n, impl="kvmmu", kind="allocation", prealloc=prealloc,
           flavor="tdp", version="v5.17", threads=1)


# ---------------------------------------------------------------------------
# batch composition: the same N, states that are more or less alike

LINUX = dict(cr0=0x80050033, cr4=0x3006f0, efer=0xd01)


def _mix_batch(kind, n, guests_of):
    if kind == "random_full_width":
        return guests_of(n)
    if kind == "random_consulted_bits":
        return kvmmu.workload("random", n=n, seed=0).guests
    # one paging mode (Linux long mode), per-state MAXPHYADDR / vendor from a numpy RNG
    return guests_of(n, cr0=LINUX["cr0"], cr4=LINUX["cr4"], efer=LINUX["efer"],
                     maxphyaddr=lambda rng, k: rng.choice([36, 39, 46, 52], k),
                     guest_amd=lambda rng, k: rng.integers(0, 2, k).astype(bool),
                     guest_gbpages=True)


@pytest.mark.parametrize("mix", ["random_full_width", "random_consulted_bits", "uniform_long_mode"])
@pytest.mark.parametrize("flavor", ["tdp", "shadow"])
def test_batch_mix(benchmark, flavor, mix, request, guests_of, out_of):
    """Branchy per-state code pays for unpredictable paging modes: same N, other states."""
    n = thread_sizes(request.config)[0]
    g = _mix_batch(mix, n, guests_of)
    out = out_of(n)
    benchmark.group = f"batch mix {flavor} v5.17 N={size_id(n)}"
    benchmark.name = f"init_mmu {flavor} v5.17 threads=1 {mix}"
    benchmark(kvmmu.init_mmu, g, flavor, out=out, threads=1, **init_kwargs(flavor))
    record(benchmark, n, impl="kvmmu", kind="batch_mix", mix=mix, flavor=flavor,
           version="v5.17", threads=1)
