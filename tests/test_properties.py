"""Property tests: the compiled core agrees with the plain-Python reference model
(``kvmmu.reference``) on any input.

Every test draws full-width registers, any MAXPHYADDR byte and any valid host /
EPT configuration, runs the batch API once, and compares each record with the
reference field by field. The whole file is sized to run in well under a minute
on two cores.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmmu
from kvmmu import reference as ref
from kvmmu import engine
from kvmmu.variants import as_python_variant
from kernel_vectors import context_as_dict

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
GUEST_NAMES = kvmmu.GUEST_DTYPE.names
CTX_KEYS = kvmmu.CONTEXT_DTYPE.names

# (flavor, version, variant): variants only exist under v5.17.
VERSION_VARIANTS = [("v5.17", v) for v in kvmmu.VARIANTS] + [("v6.16", "v517")]
COMBOS = [(f, ver, var) for f in kvmmu.FLAVORS for ver, var in VERSION_VARIANTS]
COMBO_IDS = [f"{f}-{ver}-{var}" for f, ver, var in COMBOS]

# KVMMU_PROP_SCALE=10 multiplies every example budget (for a long soak run).
SCALE = max(1, int(os.environ.get("KVMMU_PROP_SCALE", "1")))


def budget(n):
    return settings(PROP, max_examples=n * SCALE)


PROP = settings(deadline=None, max_examples=30 * SCALE,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------
# strategies

CR0_BITS = (31, 16)                      # PG, WP
CR4_BITS = (4, 5, 12, 20, 21, 22)        # PSE, PAE, LA57, SMEP, SMAP, PKE
EFER_BITS = (10, 11)                     # LMA, NX (LME, bit 8, is never consulted)


def _interesting(bits):
    """A register built from the consulted bits, optionally with noise elsewhere."""
    consulted = sum(1 << b for b in bits)

    def build(sel, noise, use_noise):
        v = sum(1 << b for b, s in zip(bits, sel) if s)
        if use_noise:
            v |= noise & ~consulted & U64
        return v

    return st.builds(build, st.lists(st.booleans(), min_size=len(bits), max_size=len(bits)),
                     st.integers(0, U64), st.booleans())


def register(bits, realistic):
    return st.one_of(
        st.integers(0, U64),                     # fully random u64
        _interesting(bits),
        _interesting(bits),                      # weight the consulted bits
        st.sampled_from(realistic),
    )


cr0_st = register(CR0_BITS, [0, 0x60000010, 0x11, 0x80000011, 0x80050033, 0x80040033, U64])
cr4_st = register(CR4_BITS, [0, 0x20, 0x10, 0x3006f0, 0x3406f0, 0x7406f0, U64])
efer_st = register(EFER_BITS, [0, 0x500, 0xd01, 0x901, 0x100, U64])

BYTE_EDGES = [0, 1, 31, 63, 64, 65, 254, 255] + list(range(32, 53))
maxphyaddr_st = st.one_of(st.sampled_from(BYTE_EDGES), st.integers(0, 255))

guest_st = st.fixed_dictionaries({
    "cr0": cr0_st,
    "cr4": cr4_st,
    "efer": efer_st,
    "maxphyaddr": maxphyaddr_st,
    "guest_amd": st.booleans(),
    "guest_gbpages": st.booleans(),
    "smm": st.booleans(),
    "guest_mode": st.booleans(),
})

u64_mask_st = st.one_of(st.just(0), st.integers(0, U64),
                        st.integers(0, 63).map(lambda b: 1 << b),
                        st.integers(30, 58).map(lambda b: 0x3F << b))   # MKTME-like KeyID bits

host_st = st.builds(
    kvmmu.HostConfig,
    tdp_enabled=st.booleans(),
    shadow_phys_bits=maxphyaddr_st,
    shadow_me_mask=u64_mask_st,
    shadow_me_value=u64_mask_st,
    host_gbpages=st.booleans(),
    host_tdp_is_amd=st.booleans(),
    tdp_ad_disabled=st.booleans(),
    tdp_root_level=st.one_of(st.just(0), st.integers(0, 5)),
    max_tdp_level=st.one_of(st.sampled_from([4, 5]), st.integers(1, 5)),
    max_huge_page_level=st.integers(1, 3),
)

ept_st = st.builds(
    kvmmu.EptConfig,
    execonly=st.booleans(),
    huge_page_level=st.integers(1, 3),
    accessed_dirty=st.booleans(),
    eptp_level=st.sampled_from([4, 5]),
    root_mmu_smm=st.sampled_from([None, False, True]),
)


# ---------------------------------------------------------------------------
# helpers

def make_guests(dicts):
    """GUEST_DTYPE array from plain dicts, written field by field (not via the engine)."""
    g = np.zeros(len(dicts), dtype=kvmmu.GUEST_DTYPE)
    for i, d in enumerate(dicts):
        for n in GUEST_NAMES:
            g[n][i] = d[n]
    return g


def ref_guest(rec):
    return {n: int(rec[n]) for n in GUEST_NAMES}


def dict_to_record(d):
    """A CONTEXT_DTYPE record holding a reference context dict."""
    r = np.zeros(1, dtype=kvmmu.CONTEXT_DTYPE)
    for k in ("role", "root_role", "root_level", "shadow_root_level", "guest_bad_mt_xwr",
              "shadow_bad_mt_xwr", "pkru_mask"):
        r[k][0] = d[k]
    r["guest_rsvd"][0] = np.array(d["guest_rsvd"], dtype=np.uint64)
    r["shadow_zero"][0] = np.array(d["shadow_zero"], dtype=np.uint64)
    r["permissions"][0] = np.array(d["permissions"], dtype=np.uint8)
    return r[0]


def _fmt(v):
    if isinstance(v, list):
        return [_fmt(x) for x in v]
    return hex(v)


def assert_ctx(rec, want, where):
    got = context_as_dict(rec)
    assert set(got) == set(want) == set(CTX_KEYS)
    for k in CTX_KEYS:
        assert got[k] == want[k], (f"{where}: {k}: core {_fmt(got[k])} != "
                                   f"reference {_fmt(want[k])}")


def same(a, b):
    """Two structured arrays hold the same values, field by field (padding ignored)."""
    assert a.dtype.names == b.dtype.names and a.shape == b.shape
    return all(np.array_equal(a[n], b[n]) for n in a.dtype.names)


def snapshot(a):
    if a is None:
        return None
    if a.dtype.names is None:
        return a.tobytes()
    return {n: a[n].tobytes() for n in a.dtype.names}


def ref_role_fields(role):
    """Decoded v5.17 role fields as 1-element arrays, from the reference's own layouts."""
    out = {}
    for name, (shift, width) in ref.BASE_LAYOUT["v5.17"].items():
        out[name] = np.array([(role & U32) >> shift & ((1 << width) - 1)], dtype=np.uint8)
    for name, (shift, width) in ref.EXT_LAYOUT["v5.17"].items():
        out[name] = np.array([(role >> 32) >> shift & ((1 << width) - 1)], dtype=np.uint8)
    return out


# ---------------------------------------------------------------------------
# 1. init_mmu == reference.init_mmu_one

@pytest.mark.parametrize("flavor,version,variant", COMBOS, ids=COMBO_IDS)
@PROP
@given(states=st.lists(guest_st, min_size=1, max_size=12), host=host_st, ept=ept_st)
def test_init_mmu_matches_reference(flavor, version, variant, states, host, ept):
    g = make_guests(states)
    ctx = kvmmu.init_mmu(g, flavor, host, ept, version=version, variant=variant)
    assert ctx.shape == g.shape and ctx.dtype == kvmmu.CONTEXT_DTYPE
    for i, s in enumerate(states):
        want = ref.init_mmu_one(s, flavor, host, ept, version, variant)
        assert_ctx(ctx[i], want, f"state {i} {s}")


@PROP
@given(states=st.lists(guest_st, min_size=1, max_size=6), host=host_st, ept=ept_st,
       combo=st.sampled_from(COMBOS), shape=st.sampled_from(["2d", "col"]))
def test_init_mmu_multidimensional_batches(states, host, ept, combo, shape):
    """A 2-D batch gives a 2-D result, each element the reference's."""
    flavor, version, variant = combo
    g = make_guests(states)
    g2 = g.reshape(1, -1) if shape == "2d" else g.reshape(-1, 1)
    ctx = kvmmu.init_mmu(g2, flavor, host, ept, version=version, variant=variant)
    assert ctx.shape == g2.shape
    for i, s in enumerate(states):
        want = ref.init_mmu_one(s, flavor, host, ept, version, variant)
        assert_ctx(ctx.reshape(-1)[i], want, f"state {i}")


# ---------------------------------------------------------------------------
# 2. replay == reference.replay

@st.composite
def replay_case(draw):
    pool = draw(st.lists(guest_st, min_size=1, max_size=4))
    # Sometimes vary only the CPUID fields of a pool entry, so that the role
    # repeats while MAXPHYADDR / vendor / gbpages change under it.
    if draw(st.booleans()):
        base = pool[0]
        for _ in range(draw(st.integers(1, 3))):
            pool.append(dict(base, maxphyaddr=draw(maxphyaddr_st),
                             guest_amd=draw(st.booleans()), guest_gbpages=draw(st.booleans())))
    n = draw(st.integers(1, 40))
    idx = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    steps = [pool[i] for i in idx]
    inv = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))
    ids = draw(st.lists(st.integers(-5, 1000), min_size=1, max_size=3, unique=True))
    vcpu = None if len(ids) == 1 and draw(st.booleans()) else \
        draw(st.lists(st.sampled_from(ids), min_size=n, max_size=n))
    policy = draw(st.sampled_from(kvmmu.POLICIES))
    host = draw(host_st)
    ept = draw(ept_st)
    kind = draw(st.sampled_from(["none", "init", "garbage"]))
    initial = None
    if kind == "init":
        f0, ver0, var0 = draw(st.sampled_from(COMBOS))
        initial = ref.init_mmu_one(draw(guest_st), f0, host, draw(ept_st), ver0, var0)
    elif kind == "garbage":
        initial = {
            "role": draw(st.integers(0, U64)), "root_role": draw(st.integers(0, U32)),
            "root_level": draw(st.integers(0, 255)), "shadow_root_level": draw(st.integers(0, 255)),
            "guest_rsvd": [[draw(st.integers(0, U64)) for _ in range(5)] for _ in range(2)],
            "guest_bad_mt_xwr": draw(st.integers(0, U64)),
            "shadow_zero": [[draw(st.integers(0, U64)) for _ in range(5)] for _ in range(2)],
            "shadow_bad_mt_xwr": draw(st.integers(0, U64)),
            "permissions": [draw(st.integers(0, 255)) for _ in range(16)],
            "pkru_mask": draw(st.integers(0, U32)),
        }
    return steps, inv, vcpu, policy, host, ept, initial


def _check_replay(res, steps, want_states, want_flags, vcpu, where=""):
    assert res.contexts.shape == (len(steps),)
    assert res.recomputed.dtype == bool
    assert res.recomputed.tolist() == want_flags, where
    for i in range(len(steps)):
        assert_ctx(res.contexts[i], want_states[i], f"{where} step {i} {steps[i]}")
    # final: the last context of each vCPU, in ascending id order
    ids = [0] * len(steps) if vcpu is None else list(vcpu)
    assert res.vcpu_ids.tolist() == sorted(set(ids))
    for k, vid in enumerate(res.vcpu_ids.tolist()):
        last = max(i for i, v in enumerate(ids) if v == vid)
        assert_ctx(res.final[k], want_states[last], f"{where} final vcpu {vid}")
    assert res.recomputes == sum(want_flags)


@pytest.mark.parametrize("flavor,version,variant", COMBOS, ids=COMBO_IDS)
@budget(20)
@given(case=replay_case())
def test_replay_matches_reference(flavor, version, variant, case):
    steps, inv, vcpu, policy, host, ept, initial = case
    g = make_guests(steps)
    res = kvmmu.replay(
        g, flavor, host, ept, version=version, variant=variant, policy=policy,
        initial=None if initial is None else dict_to_record(initial),
        invalidate=None if inv is None else np.array(inv, dtype=bool),
        vcpu=None if vcpu is None else np.array(vcpu, dtype=np.int64))
    want_states, want_flags = ref.replay(
        steps, flavor, host, ept, version, variant, policy,
        initial=None if initial is None else ref.Context.from_dict(initial),
        invalidate_steps=inv, vcpu=vcpu)
    _check_replay(res, steps, want_states, want_flags, vcpu)
    if policy == "force":
        assert all(want_flags)


# ---------------------------------------------------------------------------
# 3. user-defined variants


@pytest.mark.parametrize("name", kvmmu.VARIANTS)
@pytest.mark.parametrize("flavor", ["shadow", "shadow_npt", "tdp"])
@budget(15)
@given(states=st.lists(guest_st, min_size=1, max_size=10), host=host_st, ept=ept_st)
def test_python_variant_init_equals_builtin(name, flavor, states, host, ept):
    g = make_guests(states)
    py = as_python_variant(name)
    assert py.native_rule is None and py.name == name
    a = kvmmu.init_mmu(g, flavor, host, ept, variant=name)
    b = kvmmu.init_mmu(g, flavor, host, ept, variant=py)
    assert same(a, b)


@pytest.mark.parametrize("name", kvmmu.VARIANTS)
@pytest.mark.parametrize("flavor", ["shadow", "shadow_npt"])
@budget(15)
@given(case=replay_case())
def test_python_variant_replay_equals_builtin(name, flavor, case):
    steps, inv, vcpu, policy, host, ept, initial = case
    g = make_guests(steps)
    kw = dict(policy=policy,
              initial=None if initial is None else dict_to_record(initial),
              invalidate=None if inv is None else np.array(inv, dtype=bool),
              vcpu=None if vcpu is None else np.array(vcpu, dtype=np.int64))
    a = kvmmu.replay(g, flavor, host, ept, variant=name, **kw)
    b = kvmmu.replay(g, flavor, host, ept, variant=as_python_variant(name), **kw)
    assert same(a.contexts, b.contexts)
    assert a.recomputed.tolist() == b.recomputed.tolist()
    assert same(a.final, b.final)


# Custom uses_nx functions: each returns something different in kind (bool
# array, integer array, a scalar to broadcast), depending on role fields,
# guest records, the host and the flavor.
def _nx_wp_xor_mpa(rf, g, host, flavor):
    return rf["cr0_wp"].astype(bool) ^ (g["maxphyaddr"] & 1).astype(bool)


def _nx_smep_int(rf, g, host, flavor):
    return rf["cr4_smep"].astype(np.int32) * 3 + rf["smm"].astype(np.int32)


def _nx_scalar(rf, g, host, flavor):
    return bool(host.tdp_enabled) != (flavor == "shadow")


def _nx_level(rf, g, host, flavor):
    return (rf["level"] == 4) | (g["cr4"] >> np.uint64(40) & np.uint64(1)).astype(bool)


CUSTOM_FNS = [_nx_wp_xor_mpa, _nx_smep_int, _nx_scalar, _nx_level]


def _custom_expected(fn, s, flavor, host, ept):
    """The custom function applied to one state, on fields decoded from the reference role."""
    role = ref.init_mmu_one(s, flavor, host, ept, "v5.17", "v517")["role"]
    gg = make_guests([s])
    val = np.asarray(fn(ref_role_fields(role), gg, host, flavor))
    return bool(np.broadcast_to(val, (1,))[0])


@pytest.mark.parametrize("fn", CUSTOM_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("inside_guard", [True, False])
@budget(15)
@given(states=st.lists(guest_st, min_size=1, max_size=8), host=host_st, ept=ept_st,
       flavor=st.sampled_from(kvmmu.FLAVORS))
def test_custom_variant_init_matches_reference(fn, inside_guard, states, host, ept, flavor):
    var = kvmmu.Variant("custom", fn, inside_guard)
    g = make_guests(states)
    ctx = kvmmu.init_mmu(g, flavor, host, ept, version="v5.17", variant=var)
    for i, s in enumerate(states):
        nx = _custom_expected(fn, s, flavor, host, ept)
        want = ref.init_mmu_one(s, flavor, host, ept, "v5.17", "v517", uses_nx=nx,
                                inside_guard=inside_guard)
        assert_ctx(ctx[i], want, f"state {i} uses_nx={nx}")


@pytest.mark.parametrize("inside_guard", [True, False])
@pytest.mark.parametrize("flavor", ["shadow", "shadow_npt"])
@budget(25)
@given(case=replay_case(), fn=st.sampled_from(CUSTOM_FNS))
def test_custom_variant_replay_matches_reference(inside_guard, flavor, case, fn):
    steps, inv, vcpu, policy, host, ept, initial = case
    var = kvmmu.Variant("custom", fn, inside_guard)
    res = kvmmu.replay(make_guests(steps), flavor, host, ept, version="v5.17", variant=var,
                       policy=policy,
                       initial=None if initial is None else dict_to_record(initial),
                       invalidate=None if inv is None else np.array(inv, dtype=bool),
                       vcpu=None if vcpu is None else np.array(vcpu, dtype=np.int64))
    # reference loop with the per-step uses_nx override
    ids = [0] * len(steps) if vcpu is None else list(vcpu)
    contexts = {}
    want_states, want_flags = [], []
    for i, s in enumerate(steps):
        ctx = contexts.get(ids[i])
        if ctx is None:
            ctx = ref.Context() if initial is None else ref.Context.from_dict(initial)
            contexts[ids[i]] = ctx
        if inv is not None and inv[i]:
            ref.invalidate(ctx, "v5.17")
        nx = _custom_expected(fn, s, flavor, host, ept)
        want_flags.append(ref.init_context(ctx, s, flavor, host, ept, "v5.17", "v517",
                                           force=policy == "force", uses_nx=nx,
                                           inside_guard=inside_guard))
        want_states.append(ctx.as_dict())
    _check_replay(res, steps, want_states, want_flags, vcpu)


def test_custom_variant_called_once_per_batch_with_records():
    calls = []

    def fn(rf, g, host, flavor):
        calls.append((sorted(rf), g.dtype, g.shape, flavor))
        return np.ones(len(g), bool)

    g = make_guests([dict(cr0=0x80050033, cr4=0x20, efer=0x500 | i << 11, maxphyaddr=40,
                          guest_amd=0, guest_gbpages=0, smm=0, guest_mode=0) for i in (0, 1, 0)])
    kvmmu.init_mmu(g, "shadow", kvmmu.HostConfig(tdp_enabled=False),
                   variant=kvmmu.Variant("c", fn))
    assert len(calls) == 1
    names, dt, shape, flavor = calls[0]
    assert dt == kvmmu.GUEST_DTYPE and shape == (3,) and flavor == "shadow"
    assert set(names) == {n for n, _, _ in kvmmu.roles.role_fields("v5.17")}


# ---------------------------------------------------------------------------
# 4. independence from threads and input layout; inputs never mutated

def _reordered(g):
    """Same fields and field types, reversed order, packed (different offsets)."""
    dt = np.dtype([(n, kvmmu.GUEST_DTYPE.fields[n][0]) for n in reversed(GUEST_NAMES)])
    out = np.zeros(g.shape, dtype=dt)
    for n in GUEST_NAMES:
        out[n] = g[n]
    return out


def _strided(g, junk):
    """A non-contiguous view holding g, with different records in between."""
    big = np.zeros(g.size * 3, dtype=kvmmu.GUEST_DTYPE)
    big[:] = np.resize(junk, big.size)
    big[1::3] = g
    view = big[1::3]
    assert view.size == 1 or not view.flags.c_contiguous
    return view


def _readonly(g):
    r = g.copy()
    r.flags.writeable = False
    return r


@budget(40)
@given(states=st.lists(guest_st, min_size=1, max_size=24), junk=guest_st,
       combo=st.sampled_from(COMBOS), host=host_st, ept=ept_st)
def test_init_mmu_layout_and_threads_independent(states, junk, combo, host, ept):
    flavor, version, variant = combo
    g = make_guests(states)
    before = snapshot(g)
    base = kvmmu.init_mmu(g, flavor, host, ept, version=version, variant=variant, threads=1)
    assert snapshot(g) == before
    layouts = {
        "strided": _strided(g, make_guests([junk])),
        "readonly": _readonly(g),
        "reordered": _reordered(g),
        "reordered-strided": _reordered(np.repeat(g, 2))[::2],
        "fortran-2d": np.asfortranarray(np.stack([g, g], axis=1)),
    }
    for name, arr in layouts.items():
        snap = snapshot(arr)
        got = kvmmu.init_mmu(arr, flavor, host, ept, version=version, variant=variant)
        assert snapshot(arr) == snap, f"{name}: input was modified"
        if name == "fortran-2d":
            assert got.shape == arr.shape
            assert same(got[:, 0], base) and same(got[:, 1], base)
        else:
            assert same(got, base), name
    # threads: force the OpenMP path even for a small batch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "PARALLEL_MIN", 1)
        for t in (1, 2):
            got = kvmmu.init_mmu(g, flavor, host, ept, version=version, variant=variant, threads=t)
            assert same(got, base), f"threads={t}"
    # out= is filled identically, whatever it held before
    out = np.empty(g.shape, dtype=kvmmu.CONTEXT_DTYPE)
    out.view(np.uint8)[:] = 0xA5
    res = kvmmu.init_mmu(g, flavor, host, ept, version=version, variant=variant, out=out)
    assert res is out and same(out, base)


def test_init_mmu_threads_large_batch():
    """Above PARALLEL_MIN the batch is split across threads: same answers."""
    w = kvmmu.workload("random", n=engine.PARALLEL_MIN + 1234, seed=7, full_width=True)
    host = kvmmu.HostConfig(tdp_enabled=False, shadow_me_mask=1 << 47)
    before = snapshot(w.guests)
    for flavor in kvmmu.FLAVORS:
        for version, variant in VERSION_VARIANTS:
            one = kvmmu.init_mmu(w.guests, flavor, host, version=version, variant=variant,
                                 threads=1)
            two = kvmmu.init_mmu(w.guests, flavor, host, version=version, variant=variant,
                                 threads=2)
            assert same(one, two), (flavor, version, variant)
    assert snapshot(w.guests) == before
    # spot-check the big batch against the reference
    one = kvmmu.init_mmu(w.guests, "shadow", host, version="v5.17")
    for i in range(0, w.guests.size, 997):
        want = ref.init_mmu_one(ref_guest(w.guests[i]), "shadow", host, None, "v5.17")
        assert_ctx(one[i], want, f"state {i}")


@budget(30)
@given(case=replay_case(), combo=st.sampled_from(COMBOS), junk=guest_st)
def test_replay_layout_independent_and_inputs_untouched(case, combo, junk):
    flavor, version, variant = combo
    steps, inv, vcpu, policy, host, ept, initial = case
    g = make_guests(steps)
    init_rec = None if initial is None else np.array([dict_to_record(initial)])
    inv_arr = None if inv is None else np.array(inv, dtype=bool)
    vcpu_arr = None if vcpu is None else np.array(vcpu, dtype=np.int64)
    kw = dict(version=version, variant=variant, policy=policy)
    base = kvmmu.replay(g, flavor, host, ept, initial=init_rec, invalidate=inv_arr,
                        vcpu=vcpu_arr, **kw)
    snaps = [snapshot(a) for a in (g, init_rec, inv_arr, vcpu_arr)]

    def strided_1d(a):
        if a is None:
            return None
        big = np.zeros(a.size * 2, dtype=a.dtype)
        big[::2] = a
        return big[::2]

    for name, arr in {"strided": _strided(g, make_guests([junk])), "readonly": _readonly(g),
                      "reordered": _reordered(g)}.items():
        got = kvmmu.replay(arr, flavor, host, ept, initial=init_rec,
                           invalidate=strided_1d(inv_arr), vcpu=strided_1d(vcpu_arr), **kw)
        assert same(got.contexts, base.contexts), name
        assert got.recomputed.tolist() == base.recomputed.tolist(), name
    after = [snapshot(a) for a in (g, init_rec, inv_arr, vcpu_arr)]
    assert after == snaps, "replay modified an input"
    # out= is used as given
    out = np.empty(len(steps), dtype=kvmmu.CONTEXT_DTYPE)
    got = kvmmu.replay(g, flavor, host, ept, initial=init_rec, invalidate=inv_arr,
                       vcpu=vcpu_arr, out=out, **kw)
    assert got.contexts is out and same(out, base.contexts)
