"""kvmmu.dask: the same numbers as the single-process path, on a real (local) cluster.

A LocalCluster of two worker processes stands in for a cluster: tasks, their
arguments and their partial results cross process boundaries by pickling,
exactly as they would between machines.
"""
from __future__ import annotations

import numpy as np
import pytest

REASON = "kvmmu.dask needs the dask extra: pip install 'kvmmu[dask]' (dask[array], distributed)"
pytest.importorskip("dask", reason=REASON)
da = pytest.importorskip("dask.array", reason=REASON)
distributed = pytest.importorskip("distributed", reason=REASON)

import kvmmu  # noqa: E402
from kvmmu import dask as kd  # noqa: E402

SHADOW = kvmmu.HostConfig(tdp_enabled=False)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def random_guests(n: int, seed: int = 0) -> np.ndarray:
    """Random registers (every bit), MAXPHYADDR bytes and flags."""
    rng = np.random.default_rng(seed)
    g = np.zeros(n, dtype=kvmmu.GUEST_DTYPE)
    for reg in ("cr0", "cr4", "efer"):
        g[reg] = rng.integers(0, 1 << 64, n, dtype=np.uint64, endpoint=False)
    g["maxphyaddr"] = rng.integers(0, 256, n)
    for f in ("guest_amd", "guest_gbpages", "smm", "guest_mode"):
        g[f] = rng.integers(0, 2, n).astype(bool)
    return g


def assert_same_contexts(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == kvmmu.CONTEXT_DTYPE and a.shape == b.shape
    for f in kvmmu.CONTEXT_DTYPE.names:  # field by field: padding bytes are not results
        assert np.array_equal(a[f], b[f]), f


def sweep_dict(r: kvmmu.SweepResult) -> dict:
    d = r.to_dict()
    d.pop("seconds")
    return d


def test_docstring_examples():
    import doctest

    res = doctest.testmod(kd, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


# -- init_mmu ----------------------------------------------------------------

@pytest.mark.parametrize("chunks", [1000, 128, (1, 99, 400, 500), (333, 333, 334)])
def test_init_mmu_matches_numpy_on_cluster(client, chunks):
    g = random_guests(1000)
    user = kvmmu.Variant("never_nx", uses_nx=lambda rf, gs, host, fl: np.zeros(len(gs), bool))
    for flavor, host, version, variant in [("shadow", SHADOW, "v5.17", "literal"),
                                           ("shadow", SHADOW, "v5.17", user),   # cloudpickled
                                           ("shadow_ept", None, "v5.17", "v517"),
                                           ("tdp", None, "v6.16", "v517")]:
        lazy = kd.init_mmu(g, flavor, host, version=version, variant=variant, chunks=chunks)
        assert isinstance(lazy, da.Array) and lazy.dtype == kvmmu.CONTEXT_DTYPE
        got = client.compute(lazy).result()
        assert_same_contexts(got, kvmmu.init_mmu(g, flavor, host, version=version, variant=variant))


def test_init_mmu_dask_input_2d_and_threads_scheduler():
    g = random_guests(600, seed=1).reshape(20, 30)
    x = da.from_array(g, chunks=(7, 13))
    lazy = kd.init_mmu(x, "shadow_npt", kvmmu.HostConfig(host_tdp_is_amd=True), variant="final",
                       threads=1)
    assert lazy.chunks == x.chunks
    assert_same_contexts(lazy.compute(scheduler="threads"),
                         kvmmu.init_mmu(g, "shadow_npt", kvmmu.HostConfig(host_tdp_is_amd=True),
                                        variant="final"))
    # rechunking a dask input
    assert kd.init_mmu(x, "tdp", chunks=(10, 30)).chunks == ((10, 10), (30,))


def test_init_mmu_never_probes_the_kernel_and_checks_eagerly():
    calls = []

    def uses_nx(rf, guests, host, flavor):
        calls.append(len(guests))
        return rf["efer_nx"].astype(bool)

    v = kvmmu.Variant("probe", uses_nx)
    g = random_guests(100, seed=2)
    lazy = kd.init_mmu(g, "shadow", SHADOW, variant=v, chunks=30)
    assert calls == []                     # meta given: nothing ran to build the graph
    lazy.compute(scheduler="synchronous")
    assert sorted(calls) == [10, 30, 30, 30]
    with pytest.raises(ValueError, match="flavor"):
        kd.init_mmu(g, "bogus")
    with pytest.raises(ValueError, match="applies to version"):
        kd.init_mmu(g, "shadow", version="v6.16", variant="patch01")
    with pytest.raises(TypeError, match="GUEST_DTYPE"):
        kd.init_mmu(da.zeros(4, dtype=np.uint64), "tdp")
    with pytest.raises(TypeError, match="GUEST_DTYPE"):
        kd.init_mmu([1, 2], "tdp")


# -- sweep ---------------------------------------------------------------------

SWEEP = dict(flavors=["shadow", "shadow_npt"], maxphyaddrs=[36, 46], chunk_size=1024)


@pytest.fixture(scope="module")
def reference_sweep():
    return kvmmu.sweep(**SWEEP)


def check_same_sweep(got: kvmmu.SweepResult, ref: kvmmu.SweepResult) -> None:
    assert got.states == ref.states and got.inits == ref.inits
    for a, b in zip(got.cells, ref.cells, strict=True):
        assert (a.version, a.flavor, a.host) == (b.version, b.flavor, b.host)
        assert a.states == b.states and a.distinct_roles == b.distinct_roles
        assert a.variant_mismatch == b.variant_mismatch
        assert a.variant_fields == b.variant_fields
    for a, b in zip(got.guard, ref.guard, strict=True):
        assert (a.flavor, a.version, a.variant) == (b.flavor, b.version, b.variant)
        assert a.stale_groups == b.stale_groups
        assert a.counts_by_input == b.counts_by_input
        assert a.distinct_roles == b.distinct_roles
        assert a.stale_groups_any_inputs == b.stale_groups_any_inputs
        assert a.rows == b.rows
        assert a.groups() == b.groups()    # the same example groups, too
    assert sweep_dict(got) == sweep_dict(ref)
    assert got.summary().splitlines()[1:] == ref.summary().splitlines()[1:]


def test_sweep_on_cluster_matches_single_process(client, reference_sweep):
    seen = []
    got = kd.sweep(**SWEEP, scheduler=client, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
    assert reference_sweep.differs       # the sweep is not trivially empty
    assert sum(r.stale_groups for r in reference_sweep.guard) > 0
    check_same_sweep(got, reference_sweep)


def test_sweep_threads_scheduler_and_tree_shape(reference_sweep):
    check_same_sweep(kd.sweep(**SWEEP, scheduler="threads", split_every=2), reference_sweep)


def test_sweep_by_address_other_versions_and_flavors(client):
    kw = dict(flavors=["shadow_ept", "tdp"], versions=["v5.17", "v6.16"], maxphyaddrs=[39],
              reachable_only=False, chunk_size=700)
    check_same_sweep(kd.sweep(**kw, scheduler=client.scheduler.address), kvmmu.sweep(**kw))


def test_sweep_partials_merge_and_errors():
    plan, _, parts = kd.sweep_partials(flavors=["nested"], maxphyaddrs=[36], chunk_size=4096)
    part = parts[0].compute(scheduler="synchronous")
    assert isinstance(part, kd.SweepPartial) and part.chunks == 3 and len(plan) == 1
    with pytest.raises(ValueError, match="flavor"):
        kd.sweep(flavors=["bogus"])
    with pytest.raises(ValueError, match="chunk_size"):
        kd.sweep(chunk_size=0)
    with pytest.raises(TypeError, match="scheduler"):
        kd.sweep(flavors=["tdp"], maxphyaddrs=[36], scheduler=42)
    with pytest.raises(ValueError, match="scheduler address"):
        kd.sweep(flavors=["tdp"], maxphyaddrs=[36], scheduler="thread")


def test_local_cluster_keeps_default_malloc_in_workers():
    import os

    cluster = kd.local_cluster(n_workers=1, scheduler_kwargs={"dashboard_address": ":0"})
    try:
        with distributed.Client(cluster, set_as_default=False) as c:
            env = c.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
            assert list(env.values()) == [None]
            r = kd.sweep(flavors=["tdp"], maxphyaddrs=[36], chunk_size=4096, scheduler=c)
            assert r.cells[0].states == 10240
    finally:
        cluster.close()


# -- compare and find_stale_roles ---------------------------------------------

def test_compare_matches_including_examples(client):
    g = np.concatenate(list(kvmmu.enumerate_states(maxphyaddrs=[36, 52])))
    a, b = {"variant": "v517"}, {"variant": "literal"}
    ref = kvmmu.compare(g, "shadow", a, b, host=SHADOW, max_examples=7)
    assert ref.differing > 7
    got = kd.compare(g, "shadow", a, b, host=SHADOW, max_examples=7,
                     chunks=(5000, 3, 7997, g.size - 13000), scheduler=client)
    assert got.to_dict() == ref.to_dict()
    got = kd.compare(da.from_array(g, chunks=999), "shadow", a, b, host=SHADOW, max_examples=7,
                     scheduler="threads")
    assert got.to_dict() == ref.to_dict()
    got = kd.compare(g[:4000], "shadow", a, b, host=SHADOW, max_examples=7, chunks=1500,
                     scheduler=client.cluster)              # a cluster object: its own client
    assert got.to_dict() == kvmmu.compare(g[:4000], "shadow", a, b, host=SHADOW,
                                          max_examples=7).to_dict()


def test_find_stale_roles_matches_counts(client):
    rng = np.random.default_rng(3)
    g = np.concatenate(list(kvmmu.enumerate_states(maxphyaddrs=[36, 46])))
    g = g[rng.permutation(g.size)]                      # hidden-input twins far apart
    hosts = [SHADOW, kvmmu.HostConfig(tdp_enabled=True)]
    ref = kvmmu.find_stale_roles(g, "shadow", hosts=hosts)
    got = kd.find_stale_roles(g, "shadow", hosts=hosts, chunks=3000, scheduler=client)
    assert ref.stale_groups > 0
    for attr in ("stale_groups", "counts_by_input", "distinct_roles", "stale_groups_any_inputs",
                 "rows", "hidden_inputs"):
        assert getattr(got, attr) == getattr(ref, attr), attr
    assert {(x.role, x.root_role) for x in got.groups()} <= \
        {k for s in ref._stale_by_input.values() for k in s}
    with pytest.raises(ValueError, match="different chunks"):
        kd.find_stale_roles(da.from_array(g, chunks=3000), "shadow", hosts=hosts,
                            scheduler="synchronous")


def test_cli_sweep_scheduler_matches_single_process(client, capsys):
    import json

    from kvmmu.cli import main

    args = ["sweep", "--flavor", "shadow", "--maxphyaddr", "46", "--chunk-size", "2048", "--json"]
    assert main(args) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(args + ["--scheduler", client.scheduler.address]) == 0
    remote = json.loads(capsys.readouterr().out)
    for d in (local, remote):
        d.pop("seconds")
    assert remote == local
