"""The baselines compute what kvmmu computes, so the comparisons are honest.

* the NumPy guest table equals ``kvmmu.init_mmu(..., "tdp", version="v5.17")["guest_rsvd"]``
  bit for bit (random full-width states, every MAXPHYADDR byte, the hosts that
  change ``guest_can_use_gbpages``);
* the reference loop the benchmarks time gives kvmmu's contexts.
"""
from __future__ import annotations

import numpy as np
import pytest

import kvmmu
from kvmmu import reference as ref

from conftest import FLAVOR_EPT, FLAVOR_HOSTS, init_kwargs
from numpy_guest_table import guest_rsvd_tdp_v517

N = 20_000


def _states(full_width: bool, seed: int) -> np.ndarray:
    g = kvmmu.workload("random", n=N, full_width=full_width, seed=seed).guests.copy()
    # every MAXPHYADDR byte, including 0 (all bits) and >= 64 (no bits)
    g["maxphyaddr"] = np.random.default_rng(seed).integers(0, 256, N)
    return g


HOSTS = {
    "default": kvmmu.HostConfig(),
    "no_host_gbpages": kvmmu.HostConfig(host_gbpages=False),
    "tdp_disabled": kvmmu.HostConfig(tdp_enabled=False),
}


@pytest.mark.parametrize("host", list(HOSTS), ids=list(HOSTS))
@pytest.mark.parametrize("full_width", [True, False], ids=["full_width", "consulted_bits"])
def test_numpy_guest_table_matches_kvmmu(full_width, host):
    g = _states(full_width, seed=1 + full_width)
    h = HOSTS[host]
    want = kvmmu.init_mmu(g, "tdp", h, version="v5.17")["guest_rsvd"]
    got = guest_rsvd_tdp_v517(g, tdp_enabled=h.tdp_enabled, host_gbpages=h.host_gbpages)
    assert got.dtype == np.uint64 and got.shape == want.shape
    bad = np.flatnonzero((got != want).reshape(N, -1).any(axis=1))
    assert bad.size == 0, (f"{bad.size} states differ, first {int(bad[0])}: "
                           f"numpy {got[bad[0]].tolist()} kvmmu {want[bad[0]].tolist()}")


def test_numpy_guest_table_every_level_seen():
    """The random batch exercises paging off and levels 2, 3, 4, 5 (else the check is weak)."""
    g = _states(True, seed=3)
    ctx = kvmmu.init_mmu(g, "tdp")
    assert set(np.unique(ctx["root_level"]).tolist()) == {0, 2, 3, 4, 5}



@pytest.mark.parametrize("version", kvmmu.VERSIONS)
@pytest.mark.parametrize("flavor", kvmmu.FLAVORS)
def test_reference_loop_matches_kvmmu(flavor, version):
    g = kvmmu.workload("random", n=200, full_width=True, seed=0).guests
    ctx = kvmmu.init_mmu(g, flavor, version=version, **init_kwargs(flavor))
    cols = {name: g[name].tolist() for name in g.dtype.names}
    for i in range(g.size):
        state = {name: int(cols[name][i]) for name in cols}
        got = ref.init_mmu_one(state, flavor, FLAVOR_HOSTS[flavor], FLAVOR_EPT.get(flavor), version)
        for field, value in got.items():
            want = ctx[field][i]
            assert np.array_equal(np.asarray(value, dtype=np.uint64), want.astype(np.uint64)), \
                (flavor, version, i, field)
