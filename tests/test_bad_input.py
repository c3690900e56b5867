"""Bad input is refused with the right exception type and a message that names
the offending argument or field; edge-of-range input that is valid computes.

Two tables: ``BAD`` rows are ``(id, callable, exception type, message fragment)``
and the exception must be exactly that type (not a subclass); ``VALID`` rows are
``(id, callable, expected value)``.
"""
from __future__ import annotations

import numpy as np
import pytest

import kvmmu
from kvmmu.variants import as_python_variant

GD = kvmmu.GUEST_DTYPE
CD = kvmmu.CONTEXT_DTYPE
LINUX = dict(cr0=0x80050033, cr4=0x3406F0, efer=0xD01)


def G(n=None, **kw):
    """Linux long-mode states (MAXPHYADDR 46 unless given), repeated to n records."""
    fields = dict(LINUX, maxphyaddr=46)
    fields.update(kw)
    g = kvmmu.guests(**fields)
    return g if n is None else np.resize(g, n)


def dtype_with(change=None, drop=None, add=None):
    """GUEST_DTYPE's fields with one type changed, one dropped or one added."""
    fields = []
    for n in GD.names:
        if n == drop:
            continue
        t = GD.fields[n][0]
        if change and n in change:
            t = change[n]
        fields.append((n, t))
    if add:
        fields.append(add)
    return np.dtype(fields)


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def noncontig(a):
    big = np.zeros(a.size * 2, dtype=a.dtype)
    big[::2] = a
    return big[::2]


def custom(name="custom", **kw):
    return kvmmu.Variant(name, lambda rf, g, host, flavor: np.ones(len(g), bool), **kw)


def init(g=None, flavor="tdp", **kw):
    return lambda: kvmmu.init_mmu(G() if g is None else g, flavor, **kw)


def replay(g=None, flavor="tdp", **kw):
    return lambda: kvmmu.replay(G(3) if g is None else g, flavor, **kw)


# ---------------------------------------------------------------------------
# BAD: (id, callable, exact exception type, fragment of the message)

BAD = [
    # --- wrong guest arrays (init_mmu, replay, check_architectural share the check)
    ("float-array", init(np.zeros(3)), TypeError, "guests must have the structured dtype"),
    ("signed-int-array", init(np.zeros(3, np.int64)), TypeError,
     "guests must have the structured dtype"),
    ("uint64-array", init(np.zeros(3, np.uint64)), TypeError, "got dtype uint64"),
    ("object-array", init(np.array([1, 2], dtype=object)), TypeError, "got dtype object"),
    ("plain-list", init([tuple(G()[0])]), TypeError, "got list"),
    ("single-record", init(G()[0]), TypeError, "got void"),
    ("missing-field", init(np.zeros(2, dtype_with(drop="smm"))), TypeError,
     "missing field(s) ['smm']"),
    ("extra-field", init(np.zeros(2, dtype_with(add=("cr3", np.uint64)))), TypeError,
     "unexpected field(s) ['cr3']"),
    ("byteswapped-field", init(np.zeros(2, dtype_with({"cr4": np.dtype(">u8")}))), TypeError,
     "field 'cr4' must be uint64 in native byte order"),
    ("signed-field", init(np.zeros(2, dtype_with({"cr0": np.int64}))), TypeError,
     "field 'cr0'"),
    ("narrow-field", init(np.zeros(2, dtype_with({"efer": np.uint32}))), TypeError,
     "field 'efer'"),
    ("wide-maxphyaddr-field", init(np.zeros(2, dtype_with({"maxphyaddr": np.uint16}))),
     TypeError, "field 'maxphyaddr'"),
    ("uint8-bool-field", init(np.zeros(2, dtype_with({"smm": np.uint8}))), TypeError,
     "field 'smm'"),
    ("replay-float-array", replay(np.zeros(3)), TypeError, "guests must have the structured"),
    ("replay-missing-field", replay(np.zeros(3, dtype_with(drop="efer"))), TypeError,
     "missing field(s) ['efer']"),
    ("check-architectural-list", lambda: kvmmu.check_architectural([1, 2]), TypeError,
     "got list"),

    # --- kvmmu.guests() range checks
    ("guests-maxphyaddr--1", lambda: kvmmu.guests(maxphyaddr=-1), ValueError, "'maxphyaddr'"),
    ("guests-maxphyaddr-256", lambda: kvmmu.guests(maxphyaddr=256), ValueError, "'maxphyaddr'"),
    ("guests-maxphyaddr-array-300", lambda: kvmmu.guests(maxphyaddr=np.array([46, 300])),
     ValueError, "'maxphyaddr' must be in [0, 255], got 300 at index 1"),
    ("guests-maxphyaddr-float", lambda: kvmmu.guests(maxphyaddr=46.0), TypeError,
     "'maxphyaddr'"),
    ("guests-cr0-2**64", lambda: kvmmu.guests(cr0=2**64), ValueError, "'cr0'"),
    ("guests-cr4--1", lambda: kvmmu.guests(cr4=-1), ValueError, "'cr4'"),
    ("guests-efer-None", lambda: kvmmu.guests(efer=None), TypeError, "'efer'"),
    ("guests-smm-2", lambda: kvmmu.guests(smm=2), ValueError, "'smm'"),
    ("guests-unknown-field", lambda: kvmmu.guests(cr3=1), ValueError, "['cr3']"),
    ("guests-no-broadcast", lambda: kvmmu.guests(cr0=[1, 2], cr4=[1, 2, 3]), ValueError,
     "do not broadcast"),

    # --- strict=True (architectural states only)
    ("strict-guest-above-host", init(G(maxphyaddr=48), strict=True), ValueError,
     "MAXPHYADDR above the host's"),
    ("strict-guest-above-host-explicit",
     init(G(maxphyaddr=40), host=kvmmu.HostConfig(shadow_phys_bits=39), strict=True),
     ValueError, "MAXPHYADDR above the host's"),
    ("strict-guest-above-52",
     init(G(maxphyaddr=53), host=kvmmu.HostConfig(shadow_phys_bits=60), strict=True),
     ValueError, "MAXPHYADDR above 52"),
    ("strict-guest-below-32", init(G(maxphyaddr=0), strict=True), ValueError,
     "MAXPHYADDR below 32"),
    ("strict-second-state", init(G(maxphyaddr=np.array([46, 60])), strict=True), ValueError,
     "state 1"),
    ("strict-not-bool", init(strict=1), TypeError, "strict must be a bool"),
    pytest.param("strict-0d-batch", init(G(maxphyaddr=60).reshape(()), strict=True), ValueError,
                 "MAXPHYADDR above 52", id="strict-0d-batch", ),
    pytest.param("strict-2d-index-readable", init(G(maxphyaddr=np.array([[46, 60]])), strict=True),
                 ValueError, "state (0, 1) is not architectural", id="strict-2d-index-readable",),

    # --- building blocks
    ("reset-level-0", lambda: kvmmu.reset_rsvds_bits_mask(0, 0, 1, 1, 0, 0), ValueError,
     "level must be in [1, 5], got 0"),
    ("reset-level-6", lambda: kvmmu.reset_rsvds_bits_mask(6, 0, 1, 1, 0, 0), ValueError,
     "level must be in [1, 5], got 6"),
    ("reset-level-array", lambda: kvmmu.reset_rsvds_bits_mask([4, 6], 0, 1, 1, 0, 0),
     ValueError, "level must be in [1, 5], got 6 at index 1"),
    ("reset-level-str", lambda: kvmmu.reset_rsvds_bits_mask("4", 0, 1, 1, 0, 0), TypeError,
     "level"),
    ("reset-pa-negative", lambda: kvmmu.reset_rsvds_bits_mask(4, -1, 1, 1, 0, 0), ValueError,
     "pa_bits_rsvd"),
    ("reset-pa-float", lambda: kvmmu.reset_rsvds_bits_mask(4, 1.0, 1, 1, 0, 0), TypeError,
     "pa_bits_rsvd"),
    ("reset-nx-2", lambda: kvmmu.reset_rsvds_bits_mask(4, 0, 2, 1, 0, 0), ValueError, "nx"),
    ("reset-amd-2", lambda: kvmmu.reset_rsvds_bits_mask(4, 0, 1, 1, 0, 2), ValueError, "amd"),
    ("ept-hpl-0", lambda: kvmmu.reset_rsvds_bits_mask_ept(0, False, 0), ValueError,
     "huge_page_level must be in [1, 3], got 0"),
    ("ept-hpl-4", lambda: kvmmu.reset_rsvds_bits_mask_ept(0, False, 4), ValueError,
     "huge_page_level must be in [1, 3], got 4"),
    ("ept-execonly-2", lambda: kvmmu.reset_rsvds_bits_mask_ept(0, 2, 3), ValueError,
     "execonly"),
    ("rsvd-bits-s--1", lambda: kvmmu.rsvd_bits(-1, 63), ValueError, "s must be in [0, 255]"),
    ("rsvd-bits-s-256", lambda: kvmmu.rsvd_bits(256, 63), ValueError, "s must be in [0, 255]"),
    ("rsvd-bits-e--1", lambda: kvmmu.rsvd_bits(0, -1), ValueError, "e must be in"),
    ("perm-nx-2", lambda: kvmmu.update_permission_bitmask(1, 2, 0, 0), ValueError, "efer_nx"),
    ("perm-smap-float", lambda: kvmmu.update_permission_bitmask(1, 1, 0, 0.5), TypeError,
     "cr4_smap"),
    ("pkru-pke-2", lambda: kvmmu.update_pkru_bitmask(2, 0), ValueError, "cr4_pke"),
    ("is-rsvd-level-0", lambda: kvmmu.is_rsvd_gpte(init()()[0], 1, 0), ValueError,
     "level must be in [1, 5], got 0"),
    ("is-rsvd-level-6", lambda: kvmmu.is_rsvd_spte(init()()[0], 1, 6), ValueError,
     "level must be in [1, 5], got 6"),
    ("is-rsvd-pte--1", lambda: kvmmu.is_rsvd_gpte(init()()[0], -1, 1), ValueError, "pte"),
    ("is-rsvd-pte-2**64", lambda: kvmmu.is_rsvd_gpte(init()()[0], 2**64, 1), ValueError,
     "pte"),
    ("is-rsvd-ctx-is-guests", lambda: kvmmu.is_rsvd_gpte(G(), 1, 1), TypeError, "ctx"),

    # --- HostConfig
    ("host-shadow-phys-bits--1", lambda: kvmmu.HostConfig(shadow_phys_bits=-1), ValueError,
     "HostConfig.shadow_phys_bits"),
    ("host-shadow-phys-bits-256", lambda: kvmmu.HostConfig(shadow_phys_bits=256), ValueError,
     "HostConfig.shadow_phys_bits"),
    ("host-shadow-phys-bits-str", lambda: kvmmu.HostConfig(shadow_phys_bits="46"), TypeError,
     "HostConfig.shadow_phys_bits"),
    ("host-me-mask--1", lambda: kvmmu.HostConfig(shadow_me_mask=-1), ValueError,
     "HostConfig.shadow_me_mask"),
    ("host-me-value-2**64", lambda: kvmmu.HostConfig(shadow_me_value=2**64), ValueError,
     "HostConfig.shadow_me_value"),
    ("host-tdp-root-level-6", lambda: kvmmu.HostConfig(tdp_root_level=6), ValueError,
     "HostConfig.tdp_root_level"),
    ("host-max-tdp-level-0", lambda: kvmmu.HostConfig(max_tdp_level=0), ValueError,
     "HostConfig.max_tdp_level"),
    ("host-max-huge-page-level-4", lambda: kvmmu.HostConfig(max_huge_page_level=4), ValueError,
     "HostConfig.max_huge_page_level"),
    ("host-tdp-enabled-2", lambda: kvmmu.HostConfig(tdp_enabled=2), TypeError,
     "HostConfig.tdp_enabled"),
    ("host-not-a-config", init(host=5), TypeError, "host must be a kvmmu.HostConfig"),
    ("host-dict-unknown-key", init(host={"bogus": 1}), TypeError, "bogus"),
    ("host-dict-bad-value", init(host={"shadow_phys_bits": 300}), ValueError,
     "HostConfig.shadow_phys_bits"),

    # --- EptConfig
    ("ept-eptp-level-3", lambda: kvmmu.EptConfig(eptp_level=3), ValueError,
     "EptConfig.eptp_level must be 4 or 5"),
    ("ept-eptp-level-bool", lambda: kvmmu.EptConfig(eptp_level=True), TypeError,
     "EptConfig.eptp_level"),
    ("ept-huge-page-level-0", lambda: kvmmu.EptConfig(huge_page_level=0), ValueError,
     "EptConfig.huge_page_level"),
    ("ept-huge-page-level-4", lambda: kvmmu.EptConfig(huge_page_level=4), ValueError,
     "EptConfig.huge_page_level"),
    ("ept-root-mmu-smm-2", lambda: kvmmu.EptConfig(root_mmu_smm=2), TypeError,
     "EptConfig.root_mmu_smm"),
    ("ept-not-a-config", init(flavor="shadow_ept", ept=4), TypeError, "ept must be"),
    ("ept-dict-bad-level", init(flavor="shadow_ept", ept={"eptp_level": 3}), ValueError,
     "EptConfig.eptp_level"),

    # --- unknown choices
    ("unknown-flavor", init(flavor="npt"), ValueError, "flavor must be one of"),
    ("flavor-none", init(flavor=None), ValueError, "flavor must be one of"),
    ("unknown-version", init(version="v6.1"), ValueError, "version must be one of"),
    ("unknown-variant", init(variant="v518"), ValueError, "variant must be one of"),
    ("variant-not-str", init(variant=3), ValueError, "variant must be one of"),
    ("unknown-policy", replay(policy="always"), ValueError, "policy must be one of"),
    ("replay-unknown-flavor", replay(flavor="ept"), ValueError, "flavor must be one of"),
    ("replay-unknown-version", replay(version="6.16"), ValueError, "version must be one of"),
    ("replay-unknown-variant", replay(variant="v6"), ValueError, "variant must be one of"),
    ("decode-role-unknown-version", lambda: kvmmu.decode_role(1, "v5.18"), ValueError,
     "version must be one of"),
    ("workload-unknown", lambda: kvmmu.workload("nope"), ValueError, "workload must be one of"),

    # --- non-default variants under v6.16
    ("v616-patch01", init(version="v6.16", variant="patch01"), ValueError,
     "variant 'patch01' applies to version 'v5.17' only"),
    ("v616-final-replay", replay(version="v6.16", variant="final"), ValueError,
     "variant 'final' applies to version 'v5.17' only"),
    ("v616-literal-shadow", init(flavor="shadow", version="v6.16", variant="literal"),
     ValueError, "variant 'literal'"),
    ("v616-custom-variant", init(flavor="shadow", version="v6.16", variant=custom("mine")),
     ValueError, "variant 'mine' applies to version 'v5.17' only"),
    pytest.param("v616-custom-variant-named-v517",
                 init(flavor="shadow", version="v6.16", variant=custom("v517")),
                 ValueError, "variant",
                 id="v616-custom-variant-named-v517"),
    pytest.param("v616-python-v517",
                 init(flavor="shadow", version="v6.16", variant=as_python_variant("v517")),
                 ValueError, "variant", id="v616-python-v517"),

    # --- user variants that misbehave
    ("variant-not-callable", lambda: kvmmu.Variant("x", 5), TypeError, "uses_nx must be callable"),
    ("variant-empty-name", lambda: kvmmu.Variant("", lambda *a: True), TypeError, "Variant.name"),
    ("variant-guard-not-bool", lambda: kvmmu.Variant("x", lambda *a: True, inside_guard=1),
     TypeError, "inside_guard must be a bool"),
    ("uses-nx-wrong-shape",
     init(G(3), "shadow", variant=kvmmu.Variant("x", lambda rf, g, h, f: np.ones(2, bool))),
     ValueError, "uses_nx must return a bool array of shape (3,)"),
    ("uses-nx-float",
     init(G(3), "shadow", variant=kvmmu.Variant("x", lambda rf, g, h, f: np.ones(3))),
     ValueError, "uses_nx must return a bool array"),
    ("uses-nx-none",
     replay(G(3), "shadow_npt", variant=kvmmu.Variant("x", lambda rf, g, h, f: None)),
     ValueError, "uses_nx must return a bool array"),

    # --- out=
    ("out-wrong-dtype", init(out=np.zeros(1, GD)), ValueError,
     "out must have dtype kvmmu.CONTEXT_DTYPE"),
    ("out-wrong-length", init(out=np.zeros(2, CD)), ValueError, "out must have shape (1,)"),
    ("out-wrong-rank", init(G(2), out=np.zeros((1, 2), CD)), ValueError,
     "out must have shape (2,)"),
    ("out-read-only", init(out=readonly(np.zeros(1, CD))), ValueError, "out must be writeable"),
    ("out-non-contiguous", init(G(2), out=np.zeros(4, CD)[::2]), ValueError,
     "out must be C-contiguous"),
    ("out-not-an-array", init(out=[0]), TypeError, "out must be a numpy array"),
    ("replay-out-wrong-length", replay(out=np.zeros(2, CD)), ValueError,
     "out must have shape (3,)"),
    ("replay-out-wrong-dtype", replay(out=np.zeros(3, np.uint8)), ValueError,
     "out must have dtype"),

    # --- replay step arrays, rank, initial
    ("invalidate-too-short", replay(invalidate=[True, False]), ValueError,
     "invalidate must be a 1-D array with one entry per step (3)"),
    ("invalidate-too-long", replay(invalidate=np.zeros(4, bool)), ValueError,
     "invalidate must be a 1-D array"),
    ("invalidate-2d", replay(invalidate=np.zeros((3, 1), bool)), ValueError,
     "invalidate must be a 1-D array"),
    ("invalidate-scalar", replay(invalidate=True), ValueError, "invalidate must be a 1-D"),
    ("invalidate-float", replay(invalidate=[0.0, 1.0, 0.0]), TypeError, "invalidate must be"),
    ("vcpu-too-short", replay(vcpu=[0, 1]), ValueError,
     "vcpu must be a 1-D array with one entry per step (3)"),
    ("vcpu-too-long", replay(vcpu=np.zeros(5, np.int64)), ValueError, "vcpu must be a 1-D"),
    ("vcpu-float", replay(vcpu=[0.0, 1.0, 0.0]), TypeError, "vcpu must be integers"),
    ("replay-rank-2", replay(G(3).reshape(1, 3)), ValueError, "guests must be 1-D"),
    ("replay-rank-2-column", replay(G(3).reshape(3, 1)), ValueError, "guests must be 1-D"),
    ("replay-rank-0", replay(G().reshape(())), ValueError, "guests must be 1-D"),
    ("initial-wrong-dtype", replay(initial=np.zeros(1, GD)), TypeError,
     "initial must be a CONTEXT_DTYPE"),
    ("initial-wrong-count", replay(initial=np.zeros(2, CD)), ValueError,
     "initial must hold 1 context or one per vCPU (1)"),

    # --- threads
    ("threads-0", init(threads=0), ValueError, "threads must be >= 1"),
    ("threads-bool", init(threads=True), TypeError, "threads"),
    ("threads-float", init(threads=2.0), TypeError, "threads"),

    # --- roles
    ("decode-role-negative", lambda: kvmmu.decode_role(-1), ValueError, "u64"),
    ("pack-role-too-wide", lambda: kvmmu.pack_role({"level": 16}), ValueError, "'level'"),
    ("pack-role-unknown", lambda: kvmmu.pack_role({"lvl": 1}), ValueError, "['lvl']"),
]


def _row_id(row):
    return row.id if hasattr(row, "marks") else row[0]   # pytest.param rows carry their id


@pytest.mark.parametrize("case_id,fn,exc,fragment", BAD, ids=[_row_id(r) for r in BAD])
def test_bad_input_is_refused(case_id, fn, exc, fragment):
    with pytest.raises(Exception) as info:
        fn()
    assert type(info.value) is exc, (
        f"{case_id}: expected {exc.__name__}, got {type(info.value).__name__}: {info.value}")
    assert fragment in str(info.value), f"{case_id}: {fragment!r} not in {str(info.value)!r}"


# ---------------------------------------------------------------------------
# VALID: (id, callable, expected)

def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and all(
        np.array_equal(a[n], b[n]) for n in a.dtype.names)


def _gr(mpa, level_regs, row, col):
    return lambda: int(kvmmu.init_mmu(kvmmu.guests(**level_regs, maxphyaddr=mpa),
                                      "tdp")[0]["guest_rsvd"][row, col])


PAE = dict(cr0=0x80000001, cr4=0x20, efer=0x800)      # 32-bit PAE paging with NX
W8 = np.resize(kvmmu.guests(cr0=[0x80050033, 0x11, 0x80000011, 0x80010001],
                            cr4=[0x3406F0, 0, 0x10, 0x20], efer=[0xD01, 0, 0, 0x800],
                            maxphyaddr=[46, 36, 40, 52]), 8)


def _empty_check(fn, shape=(0,)):
    def run():
        r = fn()
        arr = r.contexts if isinstance(r, kvmmu.ReplayResult) else r
        return arr.dtype == CD and arr.shape == shape
    return run


VALID = [
    # empty batches
    ("empty-init", _empty_check(init(np.zeros(0, GD))), True),
    ("empty-init-2d", _empty_check(init(np.zeros((0, 3), GD)), (0, 3)), True),
    ("empty-init-strict", _empty_check(init(np.zeros(0, GD), strict=True)), True),
    ("empty-init-out", _empty_check(init(np.zeros(0, GD), out=np.zeros(0, CD))), True),
    ("empty-init-custom-variant",
     _empty_check(init(np.zeros(0, GD), "shadow", variant=custom())), True),
    ("empty-replay", _empty_check(replay(np.zeros(0, GD))), True),
    ("empty-replay-arrays",
     _empty_check(replay(np.zeros(0, GD), invalidate=np.zeros(0, bool),
                         vcpu=np.zeros(0, np.int64))), True),
    pytest.param("empty-replay-lists",
                 _empty_check(replay(np.zeros(0, GD), invalidate=[], vcpu=[])), True,
                 id="empty-replay-lists"),
    ("empty-replay-custom-variant",
     _empty_check(replay(np.zeros(0, GD), "shadow", variant=custom(inside_guard=False))), True),
    ("empty-replay-inits", lambda: kvmmu.replay(np.zeros(0, GD), "tdp").inits, 0),
    ("empty-check-architectural",
     lambda: kvmmu.check_architectural(np.zeros(0, GD)).ok.shape, (0,)),

    # non-contiguous and read-only inputs give the same answers
    ("noncontig-init", lambda: _same(kvmmu.init_mmu(noncontig(W8), "shadow"),
                                     kvmmu.init_mmu(W8, "shadow")), True),
    ("readonly-init", lambda: _same(kvmmu.init_mmu(readonly(W8), "nested", version="v6.16"),
                                    kvmmu.init_mmu(W8, "nested", version="v6.16")), True),
    ("readonly-noncontig-init",
     lambda: _same(kvmmu.init_mmu(readonly(W8)[::-1], "tdp"),
                   kvmmu.init_mmu(W8[::-1].copy(), "tdp")), True),
    ("noncontig-replay",
     lambda: _same(kvmmu.replay(noncontig(W8), "shadow_npt", vcpu=noncontig(np.arange(8) % 2),
                                invalidate=noncontig(np.arange(8) % 3 == 0)).contexts,
                   kvmmu.replay(W8, "shadow_npt", vcpu=np.arange(8) % 2,
                                invalidate=np.arange(8) % 3 == 0).contexts), True),
    ("readonly-replay",
     lambda: _same(kvmmu.replay(readonly(W8), "tdp", vcpu=readonly(np.arange(8) % 3),
                                initial=readonly(kvmmu.init_mmu(W8[:1], "tdp"))).contexts,
                   kvmmu.replay(W8, "tdp", vcpu=np.arange(8) % 3,
                                initial=kvmmu.init_mmu(W8[:1], "tdp")).contexts), True),
    ("readonly-building-blocks",
     lambda: int(kvmmu.reset_rsvds_bits_mask(readonly(np.array([3])),
                                             readonly(kvmmu.rsvd_bits(36, 63)), 1, 0, 0, 0)
                 .rsvd_bits_mask[0, 0, 2]), 0xFFFF_FFF0_0000_01E6),
    ("readonly-is-rsvd",
     lambda: bool(kvmmu.is_rsvd_gpte(readonly(kvmmu.init_mmu(W8[:1], "tdp")), 1 << 46, 1)[0]),
     True),

    # MAXPHYADDR 0, 53 and 255 compute (hand-known masks):
    # 0: 4-level PTE = all ones & bits 0..51 (NX on) = 0x000FFFFFFFFFFFFF
    ("maxphyaddr-0", _gr(0, LINUX, 0, 0), 0x000F_FFFF_FFFF_FFFF),
    # 53: 4-level: bits 53..63 & bits 0..51 = 0; PAE PTE: bits 53..62 = 0x3FF << 53
    ("maxphyaddr-53-4level", _gr(53, LINUX, 0, 0), 0),
    ("maxphyaddr-53-pae", _gr(53, PAE, 0, 0), 0x7FE0_0000_0000_0000),
    # 255: nothing above MAXPHYADDR; PAE PDPTE keeps 63 | 5..8 | 1..2 = 0x...1E6
    ("maxphyaddr-255-4level", _gr(255, LINUX, 0, 0), 0),
    ("maxphyaddr-255-pae-pdpte", _gr(255, PAE, 0, 2), 0x8000_0000_0000_01E6),
    ("maxphyaddr-guests-accepts-0-and-255",
     lambda: kvmmu.guests(maxphyaddr=[0, 53, 255])["maxphyaddr"].tolist(), [0, 53, 255]),
    # strict accepts a guest at the host's MAXPHYADDR (52 = 52)
    ("strict-guest-equal-host",
     lambda: kvmmu.init_mmu(G(maxphyaddr=52), "tdp", kvmmu.HostConfig(shadow_phys_bits=52),
                            strict=True).shape, (1,)),
    # host configs at the edges of their ranges
    ("host-shadow-phys-bits-0",
     lambda: int(kvmmu.init_mmu(G(), "tdp", kvmmu.HostConfig(shadow_phys_bits=0))[0]
                 ["shadow_zero"][0, 0]), 0x000F_FFFF_FFFF_FFFF),
    ("host-shadow-phys-bits-255",
     lambda: int(kvmmu.init_mmu(G(), "tdp", kvmmu.HostConfig(shadow_phys_bits=255))[0]
                 ["shadow_zero"][0, 0]), 0),
]


@pytest.mark.parametrize("case_id,fn,expected", VALID, ids=[_row_id(r) for r in VALID])
def test_valid_edge_input_computes(case_id, fn, expected):
    assert fn() == expected
