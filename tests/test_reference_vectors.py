"""The scalar reference model against the kernel-computed vectors, plus replay
semantics whose expected values are worked out by hand from
docs/kvm-mmu-model.md.

The module is imported by file path so this test works whether or not the
kvmmu package (and its compiled extension) is built.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_REF_PATH = Path(__file__).resolve().parents[1] / "src" / "kvmmu" / "reference.py"
_VECTORS = Path(__file__).parent / "vectors"


def _load_reference():
    name = "kvmmu_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _REF_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ref = _load_reference()

U64 = (1 << 64) - 1


# =============================================================================
# Kernel vectors
# =============================================================================

def _to_int(value):
    """Hex strings -> ints, recursively (numbers stay as they are)."""
    if isinstance(value, str):
        return int(value, 16)
    if isinstance(value, list):
        return [_to_int(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_int(v) for k, v in value.items()}
    return value


def _load_vectors():
    records = []
    for version in ("v5.17", "v6.16"):
        path = _VECTORS / f"kernel-vectors-{version}.jsonl"
        with path.open() as f:
            for line in f:
                if line.strip():
                    records.append(json.loads(line))
    return records


VECTORS = _load_vectors()


def _vector_id(record):
    return f"{record['version']}-{record['id']}-{record['flavor']}"


def _inputs(record):
    guest = _to_int(record["guest"])
    host = _to_int(record["host"])
    ept = record["ept"]            # plain numbers (or null)
    return guest, host, ept


def test_vector_files_complete():
    assert len(VECTORS) == 1000
    assert sum(r["version"] == "v5.17" for r in VECTORS) == 500
    assert {r["flavor"] for r in VECTORS} == set(ref.FLAVORS)


@pytest.mark.parametrize("record", VECTORS, ids=_vector_id)
def test_kernel_vector(record):
    guest, host, ept = _inputs(record)
    expect = _to_int(record["expect"])
    got = ref.init_mmu_one(guest, record["flavor"], host, ept, record["version"])

    fields = [k for k in expect if k != "shadow_zero_variants"]
    mismatches = {k: (hex(got[k]) if isinstance(got[k], int) else got[k],
                      hex(expect[k]) if isinstance(expect[k], int) else expect[k])
                  for k in fields if got[k] != expect[k]}
    assert not mismatches, f"{_vector_id(record)}: field -> (model, kernel): {mismatches}"
    if record["version"] == "v5.17":
        assert got["root_role"] == 0      # v5.17 has no root_role


_VARIANT_VECTORS = [r for r in VECTORS if "shadow_zero_variants" in r["expect"]]


def test_variant_vectors_present():
    # every v5.17 shadow / shadow_npt record carries the four variants
    expected = [r for r in VECTORS if r["version"] == "v5.17"
                and r["flavor"] in ("shadow", "shadow_npt")]
    assert len(_VARIANT_VECTORS) == len(expected) > 0


@pytest.mark.parametrize("variant", ref.VARIANTS)
@pytest.mark.parametrize("record", _VARIANT_VECTORS, ids=_vector_id)
def test_kernel_vector_shadow_zero_variants(record, variant):
    guest, host, ept = _inputs(record)
    expect = _to_int(record["expect"]["shadow_zero_variants"][variant])
    got = ref.init_mmu_one(guest, record["flavor"], host, ept, "v5.17", variant)
    assert got["shadow_zero"] == expect, (
        f"{_vector_id(record)} variant {variant}: "
        f"{[[hex(v) for v in row] for row in got['shadow_zero']]}")


# =============================================================================
# Small unit checks
# =============================================================================

def test_rsvd_bits_edges():
    assert ref.rsvd_bits(0, 63) == U64
    assert ref.rsvd_bits(7, 7) == 0x80
    assert ref.rsvd_bits(13, 20) == 0x1FE000
    assert ref.rsvd_bits(8, 7) == 0
    assert ref.rsvd_bits(64, 63) == 0
    assert ref.rsvd_bits(255, 63) == 0
    assert ref.rsvd_bits(60, 64) == 0          # end 64 mod 64 = 0 < 60
    assert ref.reserved_gpa_bits(0) == U64
    assert ref.reserved_gpa_bits(52) == 0xFFF0_0000_0000_0000
    assert ref.reserved_gpa_bits(64) == 0
    assert ref.reserved_gpa_bits(200) == 0


def test_reset_rsvds_keeps_unwritten_slots():
    table = ref.RsvdTable([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], bad_mt_xwr=0xFF)
    ref.reset_rsvds_bits_mask(table, 2, 0, True, True, False, False)
    # level 2 writes [0][0], [0][1], [1][0], [1][1] only
    assert table.rsvd_bits_mask == [[0, 0, 3, 4, 5], [0, 0, 8, 9, 10]]
    assert table.bad_mt_xwr == 0
    ref.reset_rsvds_bits_mask(table, 0, U64, False, False, True, True)
    assert table.rsvd_bits_mask == [[0, 0, 3, 4, 5], [0, 0, 8, 9, 10]]


def test_ept_bad_mt_xwr_bytes():
    t = ref.reset_rsvds_bits_mask_ept(ref.RsvdTable(), 0, False, 3)
    # bytes 2, 3, 7 all ones; every other byte has bits 2, 4 and 6
    assert t.bad_mt_xwr == 0xFF54_5454_FFFF_5454
    t = ref.reset_rsvds_bits_mask_ept(ref.RsvdTable(), 0, True, 3)
    assert t.bad_mt_xwr == 0xFF44_4444_FFFF_4444


def test_pkru_bitmask_by_hand():
    assert ref.pkru_bitmask(False, True) == 0
    # index i has pfec = 2i: W = i&1, U = i&2, leaf-user = i&4, F = i&8.
    # AD bit set for i in 4..7 (leaf user, no fetch); WD for i = 7 (user write)
    # always, and for i = 5 (supervisor write) only with CR0.WP.
    def mask(entries):
        m = 0
        for i, bits in entries.items():
            m |= bits << (2 * i)
        return m
    assert ref.pkru_bitmask(True, False) == mask({4: 1, 5: 1, 6: 1, 7: 3})
    assert ref.pkru_bitmask(True, True) == mask({4: 1, 5: 3, 6: 1, 7: 3})


# =============================================================================
# Replay semantics (expected values derived by hand from the doc)
# =============================================================================

# Host: shadow paging (TDP off), host MAXPHYADDR 46, no memory encryption.
HOST_SHADOW = {
    "tdp_enabled": 0, "shadow_phys_bits": 46, "shadow_me_mask": 0,
    "shadow_me_value": 0, "host_gbpages": 1, "host_tdp_is_amd": 0,
    "tdp_ad_disabled": 0, "tdp_root_level": 0, "max_tdp_level": 4,
    "max_huge_page_level": 2,
}

CR0_PG = 1 << 31
CR0_WP = 1 << 16
CR4_PAE = 1 << 5
EFER_NX = 1 << 11


def _guest(cr0, cr4=0, efer=0, maxphyaddr=36, **kw):
    g = {"cr0": cr0, "cr4": cr4, "efer": efer, "maxphyaddr": maxphyaddr,
         "guest_amd": 0, "guest_gbpages": 0, "smm": 0, "guest_mode": 0}
    g.update(kw)
    return g


# PAE guest with WP and NX, MAXPHYADDR 36.
PAE_GUEST = _guest(CR0_PG | CR0_WP, CR4_PAE, EFER_NX)

# v5.17 shadow role of PAE_GUEST (doc 2.1, 2.2, 4.1, 4.2):
#   base: level 3 (no LMA), access 7 (0x700), efer_nx (0x1000), cr0_wp (0x2000)
#   ext:  valid (1), cr0_pg (4), cr4_pae (8)
PAE_ROLE_V517 = 0x0000_000D_0000_3703

# Guest table, level 3 (doc 7.1): HI = bits 36..62 (NX on, so no bit 63).
_HI_G36 = 0x7FFF_FFF0_0000_0000
PAE_GUEST_RSVD = [
    [_HI_G36, _HI_G36, (1 << 63) | _HI_G36 | 0x1E0 | 0x6, 0, 0],
    [_HI_G36, _HI_G36 | 0x1FE000, 0, 0, 0],
]
# Guest table with MAXPHYADDR 40: HI = bits 40..62.
_HI_G40 = 0x7FFF_FF00_0000_0000
PAE_GUEST_RSVD_40 = [
    [_HI_G40, _HI_G40, (1 << 63) | _HI_G40 | 0x1E0 | 0x6, 0, 0],
    [_HI_G40, _HI_G40 | 0x1FE000, 0, 0, 0],
]
# Shadow-zero table, level 3, host MAXPHYADDR 46, uses_nx = 1 (TDP off):
_HI_H46 = 0x7FFF_C000_0000_0000
PAE_SHADOW_ZERO = [
    [_HI_H46, _HI_H46, (1 << 63) | _HI_H46 | 0x1E0 | 0x6, 0, 0],
    [_HI_H46, _HI_H46 | 0x1FE000, 0, 0, 0],
]
# WP=1, NX=1, no SMEP/SMAP: write faults 0x33, user faults 0x0f, fetch faults 0x55.
PAE_PERMISSIONS = [0, 0x33, 0x0F, 0x3F] * 2 + [0x55, 0x77, 0x5F, 0x7F] * 2


def test_single_init_by_hand():
    got = ref.init_mmu_one(PAE_GUEST, "shadow", HOST_SHADOW)
    assert got == {
        "role": PAE_ROLE_V517, "root_role": 0, "root_level": 3,
        "shadow_root_level": 3, "guest_rsvd": PAE_GUEST_RSVD, "guest_bad_mt_xwr": 0,
        "shadow_zero": PAE_SHADOW_ZERO, "shadow_bad_mt_xwr": 0,
        "permissions": PAE_PERMISSIONS, "pkru_mask": 0,
    }


def test_guard_skip_leaves_context_unchanged():
    # Step 2 changes only MAXPHYADDR, which is not in the role: the guard skips
    # and the (now stale) guest table of step 1 stays.
    states, recomputed = ref.replay(
        [PAE_GUEST, dict(PAE_GUEST, maxphyaddr=40)], "shadow", HOST_SHADOW)
    assert recomputed == [True, False]
    assert states[1] == states[0]
    assert states[1]["guest_rsvd"] == PAE_GUEST_RSVD
    # ... whereas the force policy recomputes it.
    states, recomputed = ref.replay(
        [PAE_GUEST, dict(PAE_GUEST, maxphyaddr=40)], "shadow", HOST_SHADOW,
        policy="force")
    assert recomputed == [True, True]
    assert states[1]["guest_rsvd"] == PAE_GUEST_RSVD_40


def test_invalidate_forces_recompute():
    guests = [PAE_GUEST, dict(PAE_GUEST, maxphyaddr=40)]
    states, recomputed = ref.replay(guests, "shadow", HOST_SHADOW,
                                    invalidate_steps=[0, 1])
    assert recomputed == [True, True]
    assert states[1]["role"] == PAE_ROLE_V517          # ext.valid set again
    assert states[1]["guest_rsvd"] == PAE_GUEST_RSVD_40

    ctx = ref.Context()
    ref.init_context(ctx, PAE_GUEST, "shadow", HOST_SHADOW)
    ref.invalidate(ctx, "v5.17")
    assert ctx.role == PAE_ROLE_V517 & ~(1 << 32)
    assert ctx.root_role == 0
    # v6.16 additionally marks root_role.invalid (bit 11)
    ctx = ref.Context()
    ref.invalidate(ctx, "v6.16")
    assert ctx.root_role == 0x800 and ctx.role == 0


def test_paging_off_keeps_previous_guest_tables():
    # Step 2 turns paging off.  v5.17 shadow role with PG=0: level 3, direct,
    # access 7, ext.valid only.  Guest metadata is not touched; uses_nx is 1
    # (TDP off) so the shadow-zero table is rewritten with the same contents.
    states, recomputed = ref.replay([PAE_GUEST, _guest(0)], "shadow", HOST_SHADOW)
    assert recomputed == [True, True]
    s = states[1]
    assert s["role"] == 0x0000_0001_0000_0783   # level 3 | direct 0x80 | access 0x700
    assert s["root_level"] == 0 and s["shadow_root_level"] == 3
    assert s["guest_rsvd"] == PAE_GUEST_RSVD
    assert s["permissions"] == PAE_PERMISSIONS
    assert s["shadow_zero"] == PAE_SHADOW_ZERO
    # A fresh context with paging off has an all-zero guest table instead.
    fresh = ref.init_mmu_one(_guest(0), "shadow", HOST_SHADOW)
    assert fresh["guest_rsvd"] == [[0] * 5, [0] * 5]
    assert fresh["permissions"] == [0] * 16


def _garbage_context(role, shadow_root_level):
    ctx = ref.Context()
    ctx.role = role
    ctx.root_level = 3
    ctx.shadow_root_level = shadow_root_level
    junk = 0xDEAD_BEEF_0000_0000
    ctx.guest_rsvd = ref.RsvdTable([[junk + i for i in range(5)],
                                    [junk + 5 + i for i in range(5)]])
    ctx.shadow_zero = ref.RsvdTable([[junk + 10 + i for i in range(5)],
                                     [junk + 15 + i for i in range(5)]])
    return ctx, junk


@pytest.mark.parametrize("variant", ["v517", "final", "literal", "patch01"])
def test_patch01_rewrites_shadow_zero_when_skipped(variant):
    initial, junk = _garbage_context(PAE_ROLE_V517, 3)
    states, recomputed = ref.replay([PAE_GUEST], "shadow", HOST_SHADOW,
                                    variant=variant, initial=initial)
    assert recomputed == [False]
    s = states[0]
    # The rest of the body is skipped under every variant.
    assert s["guest_rsvd"] == initial.guest_rsvd.rsvd_bits_mask
    assert s["permissions"] == [0] * 16
    if variant == "patch01":
        # Outside the guard: level-3 slots rewritten (uses_nx = 1 for shadow),
        # the slots level 3 does not write keep the old contents.
        expected = [row[:] for row in PAE_SHADOW_ZERO]
        expected[1][2] = junk + 17
        expected[0][3], expected[1][3] = junk + 13, junk + 18
        expected[0][4], expected[1][4] = junk + 14, junk + 19
        assert s["shadow_zero"] == expected
    else:
        assert s["shadow_zero"] == initial.shadow_zero.rsvd_bits_mask
    # the starting context passed in is copied, not mutated
    assert initial.shadow_zero.rsvd_bits_mask[0][0] == junk + 10


def test_override_uses_nx_and_placement():
    # uses_nx=False on a level-3 table adds bit 63 to every written slot.
    got = ref.init_mmu_one(PAE_GUEST, "shadow", HOST_SHADOW, uses_nx=False)
    hi = _HI_H46 | (1 << 63)
    assert got["shadow_zero"] == [[hi, hi, hi | 0x1E0 | 0x6, 0, 0],
                                  [hi, hi | 0x1FE000, 0, 0, 0]]
    initial, junk = _garbage_context(PAE_ROLE_V517, 3)
    ctx = initial.copy()
    assert ref.init_context(ctx, PAE_GUEST, "shadow", HOST_SHADOW,
                            inside_guard=False) is False
    assert ctx.shadow_zero.rsvd_bits_mask[0][0] == _HI_H46


def test_per_vcpu_contexts():
    states, recomputed = ref.replay([PAE_GUEST] * 3, "shadow", HOST_SHADOW,
                                    vcpu=[0, 1, 0])
    assert recomputed == [True, True, False]
    assert states[0] == states[1] == states[2]


def test_v616_tdp_guard_compares_root_role():
    # Intel host, 5-level TDP available and not forced: the TDP level is 4 for
    # guest MAXPHYADDR <= 48 and 5 above.  cpu_role is identical in both steps,
    # root_role differs in its level, so v6.16 recomputes.
    host = dict(HOST_SHADOW, tdp_enabled=1, max_tdp_level=5)
    states, recomputed = ref.replay(
        [PAE_GUEST, dict(PAE_GUEST, maxphyaddr=52)], "tdp", host, version="v6.16")
    assert recomputed == [True, True]
    assert states[0]["role"] == states[1]["role"]
    # cpu_role: level 3, access 7, efer_nx, cr0_wp; ext.valid only (v6 layout)
    assert states[0]["role"] == 0x0000_0001_0000_3703
    # root_role: access 7, efer_nx, cr0_wp, direct, level from the TDP rule
    assert states[0]["root_role"] == 0x3784 and states[1]["root_role"] == 0x3785
    assert (states[0]["shadow_root_level"], states[1]["shadow_root_level"]) == (4, 5)
    assert states[0]["root_level"] == states[1]["root_level"] == 3


def test_v616_nested_guard_ignores_root_role():
    # nested_mmu never touches root_role; an invalidate sets its invalid bit,
    # which stays, while the cleared ext.valid forces the recompute.
    states, recomputed = ref.replay([PAE_GUEST, PAE_GUEST], "nested", HOST_SHADOW,
                                    version="v6.16", invalidate_steps=[0, 1])
    assert recomputed == [True, True]
    assert states[1]["root_role"] == 0x800
    assert states[1]["shadow_root_level"] == 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        ref.init_mmu_one(PAE_GUEST, "shadow", HOST_SHADOW, version="v6.16",
                         variant="patch01")
    with pytest.raises(ValueError):
        ref.init_mmu_one(PAE_GUEST, "shadow_ept", HOST_SHADOW)
    with pytest.raises(ValueError):
        ref.init_mmu_one(PAE_GUEST, "bogus", HOST_SHADOW)
