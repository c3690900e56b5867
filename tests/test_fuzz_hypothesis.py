"""A bounded fuzz of the public API in the normal suite (the atheris harness in fuzz/
goes further): whatever dtype, shape, layout, value or option, a call returns or
raises TypeError/ValueError, and a successful init_mmu agrees with the reference."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmmu
from kvmmu import reference

FIELD_TYPES = [np.uint64, np.uint8, np.bool_, np.int64, np.int8, np.float64, ">u8", "<u4"]
NAMES = st.sampled_from(list(kvmmu.FLAVORS) + ["bogus", ""])
VERSIONS = st.sampled_from(list(kvmmu.VERSIONS) + ["v5.18", None])
VARIANTS = st.sampled_from(list(kvmmu.VARIANTS) + ["v6", 3])


@st.composite
def guest_arrays(draw):
    n = draw(st.integers(0, 6))
    kind = draw(st.integers(0, 5))
    if kind == 0:
        names = draw(st.lists(st.sampled_from(list(kvmmu.GUEST_DTYPE.names) + ["extra"]),
                              min_size=1, max_size=9, unique=True))
        dt = np.dtype([(nm, draw(st.sampled_from(FIELD_TYPES))) for nm in names])
        return np.zeros(n, dtype=dt)
    if kind == 1:
        return draw(st.sampled_from([np.zeros(n), np.zeros(n, np.uint64), list(range(n)), None, "x"]))
    raw = draw(st.binary(min_size=n * kvmmu.GUEST_DTYPE.itemsize, max_size=n * kvmmu.GUEST_DTYPE.itemsize))
    g = np.frombuffer(raw, dtype=kvmmu.GUEST_DTYPE).copy()     # any byte in every field
    if kind == 3 and n > 1:
        g = g[::2]
    if kind == 4:
        g.setflags(write=False)
    if kind == 5 and n:
        g = g.reshape(1, n)
    return g


@st.composite
def hosts(draw):
    try:
        return kvmmu.HostConfig(
            tdp_enabled=draw(st.booleans()), shadow_phys_bits=draw(st.integers(-2, 260)),
            shadow_me_mask=draw(st.integers(0, 2**64 - 1)), host_tdp_is_amd=draw(st.booleans()),
            tdp_root_level=draw(st.integers(-1, 6)), max_tdp_level=draw(st.integers(0, 6)),
            max_huge_page_level=draw(st.integers(0, 4)))
    except (TypeError, ValueError):
        return draw(st.sampled_from([None, {"tdp_enabled": False}, "host"]))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=guest_arrays(), flavor=NAMES, version=VERSIONS, variant=VARIANTS, host=hosts(),
       strict=st.sampled_from([False, True, 1]), threads=st.sampled_from([None, 1, 2, 0, -1]))
def test_init_mmu_never_crashes(g, flavor, version, variant, host, strict, threads):
    try:
        ctx = kvmmu.init_mmu(g, flavor, host, version=version, variant=variant, strict=strict,
                             threads=threads)
    except (TypeError, ValueError):
        return
    recs = np.ascontiguousarray(g).reshape(-1)
    assert ctx.shape == np.shape(g)
    for i in range(min(recs.size, 2)):
        want = reference.init_mmu_one({k: int(recs[i][k]) for k in kvmmu.GUEST_DTYPE.names}, flavor,
                                      host if isinstance(host, kvmmu.HostConfig) else kvmmu.HostConfig(**(host or {})),
                                      kvmmu.EptConfig(), version, variant)
        got = ctx.reshape(-1)[i]
        assert int(got["role"]) == want["role"]
        assert [[int(x) for x in r] for r in got["guest_rsvd"]] == want["guest_rsvd"]
        assert [[int(x) for x in r] for r in got["shadow_zero"]] == want["shadow_zero"]


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=guest_arrays(), flavor=NAMES, policy=st.sampled_from(list(kvmmu.POLICIES) + ["skip"]),
       inv=st.one_of(st.none(), st.lists(st.booleans(), max_size=7)),
       vcpu=st.one_of(st.none(), st.lists(st.integers(-3, 3), max_size=7)))
def test_replay_never_crashes(g, flavor, policy, inv, vcpu):
    try:
        kvmmu.replay(g, flavor, policy=policy, invalidate=None if inv is None else np.array(inv, bool),
                     vcpu=None if vcpu is None else np.array(vcpu, np.int64))
    except (TypeError, ValueError):
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(level=st.integers(-2, 7), pa=st.integers(-1, 2**64), flag=st.integers(-1, 2),
       pte=st.integers(0, 2**64 - 1), hpl=st.integers(-1, 5), s=st.integers(-1, 300), e=st.integers(-1, 300))
def test_building_blocks_never_crash(level, pa, flag, pte, hpl, s, e):
    for call in (lambda: kvmmu.reset_rsvds_bits_mask(level, pa, flag, 1, 0, flag),
                 lambda: kvmmu.reset_rsvds_bits_mask_ept(pa, flag, hpl),
                 lambda: kvmmu.rsvd_bits(s, e),
                 lambda: kvmmu.update_permission_bitmask(flag, 1, flag, 0),
                 lambda: kvmmu.is_rsvd_spte(kvmmu.init_mmu(kvmmu.guests(), "tdp")[0], pte, level)):
        try:
            call()
        except (TypeError, ValueError):
            pass
