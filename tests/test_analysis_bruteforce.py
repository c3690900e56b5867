"""compare() and find_stale_roles() against brute force with the reference model.

The brute force is deliberately naive: contexts from kvmmu.reference one state
at a time, pairs of states compared directly.
"""
import itertools

import numpy as np
import pytest

import kvmmu
from kvmmu import reference
from kvmmu.analysis import cached_fields
from kvmmu.variants import resolve_variant

HIDDEN = ("maxphyaddr", "guest_gbpages", "guest_amd")
GUEST_NAMES = kvmmu.GUEST_DTYPE.names


def _small_space():
    # PG, WP, PAE, NX, LMA (LMA only with PG and PAE) x smm x two values per hidden input
    rows = []
    for pg, wp, pae, nx, lma, smm, mpa, gb, amd in itertools.product(
            (0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (36, 46), (0, 1), (0, 1)):
        if lma and not (pg and pae):
            continue
        rows.append(dict(cr0=(pg << 31) | (wp << 16) | pg, cr4=(pae << 5) | (1 << 20),
                         efer=(nx << 11) | (lma << 10) | (lma << 8), maxphyaddr=mpa,
                         guest_gbpages=gb, guest_amd=amd, smm=smm, guest_mode=0))
    return rows


def _ref_ctx(row, flavor, host, ept, version, variant):
    return reference.init_mmu_one(row, flavor, host, ept, version, variant)


def _key(ctx, flavor, version):
    if version == "v6.16" and flavor in ("tdp", "shadow", "shadow_npt"):
        return (ctx["role"], ctx["root_role"])
    return (ctx["role"], 0)


@pytest.mark.parametrize("version,variant", [("v5.17", "v517"), ("v5.17", "patch01"), ("v6.16", "v517")])
@pytest.mark.parametrize("flavor", kvmmu.FLAVORS)
def test_find_stale_roles_equals_brute_force(flavor, version, variant):
    rows = _small_space()
    hosts = [kvmmu.HostConfig(tdp_enabled=True), kvmmu.HostConfig(tdp_enabled=False)]
    epts = [kvmmu.EptConfig(huge_page_level=3), kvmmu.EptConfig(huge_page_level=1)]
    es = epts if flavor == "shadow_ept" else [epts[0]]
    fields = cached_fields(resolve_variant(variant))
    # every (state, host, ept) with its reference context
    table = []
    for (hi, h), (ei, e) in itertools.product(enumerate(hosts), enumerate(es)):
        for row in rows:
            ctx = _ref_ctx(row, flavor, h, e, version, variant)
            table.append((row, hi, ei, ctx))
    inputs = ["maxphyaddr", "guest_gbpages", "guest_amd", "host.tdp_enabled"]
    if flavor == "shadow_ept":
        inputs.append("ept.huge_page_level")
    want, union = {}, set()
    for name in inputs:
        stale = set()
        groups = {}
        for t in table:
            # everything but this input, plus the guard key
            rest = (tuple(t[0][k] for k in GUEST_NAMES if k != name), t[1] if name != "host.tdp_enabled" else None,
                    t[2] if name != "ept.huge_page_level" else None, _key(t[3], flavor, version))
            groups.setdefault(rest, []).append(t)
        for rest, members in groups.items():
            outs = {tuple(str(m[3][f]) for f in fields) for m in members}
            if len(outs) > 1:
                stale.add(rest[-1])
        want[name] = len(stale)
        union |= stale
    g = kvmmu.guests(**{k: np.array([r[k] for r in rows]) for k in GUEST_NAMES})
    rep = kvmmu.find_stale_roles(g, flavor, version=version, variant=variant, hosts=hosts,
                                 epts=es if flavor == "shadow_ept" else None)
    got = rep.counts_by_input
    for name, n in want.items():
        assert got.get(name, 0) == n, name
    assert rep.stale_groups == len(union)
    assert rep.distinct_roles == len({_key(t[3], flavor, version) for t in table})


@pytest.mark.parametrize("flavor", ["shadow", "shadow_npt", "tdp"])
@pytest.mark.parametrize("tdp", [True, False])
def test_compare_equals_brute_force(flavor, tdp):
    rows = _small_space()
    host = kvmmu.HostConfig(tdp_enabled=tdp)
    g = kvmmu.guests(**{k: np.array([r[k] for r in rows]) for k in GUEST_NAMES})
    for a, b in [("v517", "patch01"), ("v517", "literal"), ("final", "literal")]:
        res = kvmmu.compare(g, flavor, {"variant": a}, {"variant": b}, host=host, max_examples=3)
        counts = {f: 0 for f in kvmmu.CONTEXT_DTYPE.names}
        differing = []
        for i, row in enumerate(rows):
            ca = _ref_ctx(row, flavor, host, None, "v5.17", a)
            cb = _ref_ctx(row, flavor, host, None, "v5.17", b)
            diff = [f for f in counts if ca[f] != cb[f]]
            for f in diff:
                counts[f] += 1
            if diff:
                differing.append(i)
        assert res.counts == counts
        assert res.differing == len(differing)
        assert [ex["index"] for ex in res.examples] == differing[:3]
