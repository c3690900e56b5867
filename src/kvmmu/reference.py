"""Scalar reference model of KVM's x86 MMU role and reserved-bit derivation.

This module is the readable yardstick of kvmmu: one vCPU state at a time, plain
Python integers (u64 values always masked to 64 bits), no numpy.  It follows
``docs/kvm-mmu-model.md`` (the facts sheet) rule by rule, for two kernels:

* ``v5.17`` -- one ``mmu_role`` per context, which is both the description of
  the guest paging mode and the key of the cache guard;
* ``v6.16`` -- ``cpu_role`` (guest paging mode) plus ``root_role`` (format of
  the shadow/TDP pages).

Every function names the kernel function (``arch/x86/kvm/mmu/mmu.c`` unless
stated otherwise) whose *behaviour* it reproduces.  The code is an independent
rewrite from the facts sheet and the kernel-computed vectors; no kernel source
is copied.

Behaviour that is deliberately reproduced, stale state included:

* the guard: if the newly computed role(s) equal the cached one(s), nothing is
  written at all;
* table slots a paging level does not write keep their old contents;
* with paging off, the guest reserved-bit table, ``permissions`` and
  ``pkru_mask`` keep their old contents (a fresh :class:`Context` is all zero).

Registers are taken raw: no architectural fix-ups are applied (e.g. EFER.LMA=1
with CR0.PG=0 is processed by the same rules as the kernel would).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "FLAVORS",
    "VERSIONS",
    "VARIANTS",
    "rsvd_bits",
    "reserved_gpa_bits",
    "RsvdTable",
    "reset_rsvds_bits_mask",
    "reset_rsvds_bits_mask_ept",
    "permission_bitmask",
    "pkru_bitmask",
    "Context",
    "init_context",
    "invalidate",
    "init_mmu_one",
    "replay",
]

FLAVORS = ("tdp", "shadow", "shadow_npt", "shadow_ept", "nested")
VERSIONS = ("v5.17", "v6.16")
VARIANTS = ("v517", "patch01", "final", "literal")
POLICIES = ("skip_if_same_role", "force")

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

# --- architectural register bits (only these are ever consulted) ----------
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
EFER_LMA = 1 << 10
EFER_NX = 1 << 11

# --- paging levels ----------------------------------------------------------
PT32_ROOT_LEVEL = 2      # 2-level 32-bit paging
PT32E_ROOT_LEVEL = 3     # PAE
PT64_ROOT_4LEVEL = 4
PT64_ROOT_5LEVEL = 5
PG_LEVEL_2M = 2          # enum pg_level: 1 = 4K, 2 = 2M, 3 = 1G
PG_LEVEL_1G = 3

# --- access bits (ACC_* form) and page-fault error code bits -----------------
ACC_EXEC = 1
ACC_WRITE = 2
ACC_USER = 4
ACC_ALL = 7
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3      # reused as the SMAP-override / "leaf is user" marker
PFERR_FETCH = 1 << 4


# =============================================================================
# Role layouts (doc section 2).  Fields are (shift, width) inside a 32-bit word;
# the 64-bit role is ``base | ext << 32``.
# =============================================================================

_BASE_COMMON = {
    "level": (0, 4),
    "has_4_byte_gpte": (4, 1),
    "quadrant": (5, 2),
    "direct": (7, 1),
    "access": (8, 3),
    "invalid": (11, 1),
    "efer_nx": (12, 1),
    "cr0_wp": (13, 1),
    "smep_andnot_wp": (14, 1),
    "smap_andnot_wp": (15, 1),
    "ad_disabled": (16, 1),
    "guest_mode": (17, 1),
    "smm": (24, 8),
}

BASE_LAYOUT = {
    "v5.17": dict(_BASE_COMMON),
    # v6 added passthrough and is_mirror in previously unused bits.
    "v6.16": dict(_BASE_COMMON, passthrough=(18, 1), is_mirror=(19, 1)),
}

EXT_LAYOUT = {
    "v5.17": {
        "valid": (0, 1), "execonly": (1, 1), "cr0_pg": (2, 1), "cr4_pae": (3, 1),
        "cr4_pse": (4, 1), "cr4_pke": (5, 1), "cr4_smap": (6, 1),
        "cr4_smep": (7, 1), "cr4_la57": (8, 1), "efer_lma": (9, 1),
    },
    # v6 dropped cr0_pg / cr4_pae (derivable from the base half of cpu_role)
    # and shifted every later bit down by two.
    "v6.16": {
        "valid": (0, 1), "execonly": (1, 1), "cr4_pse": (2, 1), "cr4_pke": (3, 1),
        "cr4_smap": (4, 1), "cr4_smep": (5, 1), "cr4_la57": (6, 1),
        "efer_lma": (7, 1),
    },
}

INVALID_BIT = 1 << 11          # base role ``invalid``
EXT_VALID_BIT = 1 << 32        # ext role ``valid`` inside the 64-bit role


def _pack(layout: Mapping[str, tuple[int, int]], fields: Mapping[str, int]) -> int:
    """Pack named bitfields into one word (GCC/x86 allocation, bit 0 upward)."""
    word = 0
    for name, value in fields.items():
        shift, width = layout[name]
        word |= (int(value) & ((1 << width) - 1)) << shift
    return word


def _unpack(layout: Mapping[str, tuple[int, int]], word: int, name: str) -> int:
    shift, width = layout[name]
    return (word >> shift) & ((1 << width) - 1)


def _role_u64(version: str, base: Mapping[str, int], ext: Mapping[str, int]) -> int:
    return _pack(BASE_LAYOUT[version], base) | _pack(EXT_LAYOUT[version], ext) << 32


def _base_field(version: str, role: int, name: str) -> int:
    return _unpack(BASE_LAYOUT[version], role & U32, name)


def _ext_field(version: str, role: int, name: str) -> int:
    return _unpack(EXT_LAYOUT[version], (role >> 32) & U32, name)


# =============================================================================
# Bit-range helpers (kvm_host.h / mmu.h)
# =============================================================================

def rsvd_bits(s: int, e: int) -> int:
    """Bits ``s..e`` inclusive (kernel ``rsvd_bits``).

    The end index is taken modulo 64 and the result is empty when it is below
    the start, so a start >= 64 (e.g. a CPUID MAXPHYADDR of 64..255) gives 0.
    """
    s = int(s)
    e = int(e) % 64
    if s < 0:
        raise ValueError(f"rsvd_bits: negative start bit {s}")
    if e < s:
        return 0
    return ((1 << (e - s + 1)) - 1) << s


def reserved_gpa_bits(maxphyaddr: int) -> int:
    """Guest-physical bits above MAXPHYADDR (``kvm_vcpu_reserved_gpa_bits_raw``)."""
    return rsvd_bits(maxphyaddr, 63)


# =============================================================================
# Reserved-bit tables (doc section 7)
# =============================================================================

class RsvdTable:
    """``struct rsvd_bits_validate``: ``rsvd_bits_mask[row][level-1]`` + ``bad_mt_xwr``.

    The row is bit 7 of the entry being checked (0: non-leaf or 4K PTE,
    1: large page / PAT bit of a 4K PTE).
    """

    __slots__ = ("rsvd_bits_mask", "bad_mt_xwr")

    def __init__(self, rsvd_bits_mask=None, bad_mt_xwr: int = 0):
        if rsvd_bits_mask is None:
            rsvd_bits_mask = [[0] * 5 for _ in range(2)]
        self.rsvd_bits_mask = [[int(v) & U64 for v in row] for row in rsvd_bits_mask]
        self.bad_mt_xwr = int(bad_mt_xwr) & U64

    def copy(self) -> "RsvdTable":
        return RsvdTable(self.rsvd_bits_mask, self.bad_mt_xwr)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RsvdTable):
            return NotImplemented
        return (self.rsvd_bits_mask == other.rsvd_bits_mask
                and self.bad_mt_xwr == other.bad_mt_xwr)

    def __repr__(self) -> str:
        rows = [[hex(v) for v in row] for row in self.rsvd_bits_mask]
        return f"RsvdTable({rows}, bad_mt_xwr={self.bad_mt_xwr:#x})"


def reset_rsvds_bits_mask(table: RsvdTable, level: int, pa_bits_rsvd: int, nx, gbpages,
                          pse, amd) -> RsvdTable:
    """Legacy / PAE / long-mode table (``__reset_rsvds_bits_mask``), in place.

    Only the slots that ``level`` defines are written; the others keep their
    previous value.  ``bad_mt_xwr`` is always cleared (no memtype/XWR checks in
    this format).  Returns ``table`` for convenience.
    """
    mask = table.rsvd_bits_mask
    table.bad_mt_xwr = 0
    pa_bits_rsvd = int(pa_bits_rsvd) & U64
    level = int(level)

    bit7 = rsvd_bits(7, 7)
    bit63 = rsvd_bits(63, 63)
    # PAE entries may use physical-address bits up to 62; 64-bit paging stops at 51.
    if level == PT32E_ROOT_LEVEL:
        high = pa_bits_rsvd & rsvd_bits(0, 62)
    else:
        high = pa_bits_rsvd & rsvd_bits(0, 51)
    if not nx:
        high |= bit63                           # XD bit is reserved without EFER.NX
    # AMD reserves bit 8 of non-leaf PML4Es/PML5Es.
    nonleaf_bit8 = rsvd_bits(8, 8) if amd else 0
    # Without 1 GiB pages, PS in a PDPTE is reserved.
    gbpages_bit7 = 0 if gbpages else bit7

    if level == PT32_ROOT_LEVEL:
        # 32-bit entries have no reserved bits, except a 4 MiB PDE under PSE,
        # where PSE-36 is assumed (is_cpuid_PSE36() is 1): bits 17..21.
        mask[0][1] = 0
        mask[0][0] = 0
        mask[1][0] = 0
        mask[1][1] = rsvd_bits(17, 21) if pse else 0
    elif level == PT32E_ROOT_LEVEL:
        # PDPTE: bit 63 is reserved even with NX (NX doesn't exist in PDPTEs),
        # as are bits 1..2 and 5..8.  Row 1 of the PDPTE is never consulted,
        # so [1][2] is not written.
        mask[0][2] = bit63 | high | rsvd_bits(5, 8) | rsvd_bits(1, 2)
        mask[0][1] = high
        mask[0][0] = high
        mask[1][1] = high | rsvd_bits(13, 20)   # 2 MiB page: bits 13..20 below the frame
        mask[1][0] = high
    elif level in (PT64_ROOT_4LEVEL, PT64_ROOT_5LEVEL):
        if level == PT64_ROOT_5LEVEL:
            mask[0][4] = high | nonleaf_bit8 | bit7   # PML5E: PS is reserved
            mask[1][4] = mask[0][4]
        mask[0][3] = high | nonleaf_bit8 | bit7       # PML4E: PS is reserved
        mask[1][3] = mask[0][3]
        mask[0][2] = high | gbpages_bit7
        mask[1][2] = high | gbpages_bit7 | rsvd_bits(13, 29)   # 1 GiB page
        mask[0][1] = high
        mask[1][1] = high | rsvd_bits(13, 20)                  # 2 MiB page
        mask[0][0] = high
        mask[1][0] = high
    # Any other level (0 = paging off, 1, >5): no slot is written.
    return table


def _repeat_byte(byte: int) -> int:
    return byte * 0x0101010101010101


def reset_rsvds_bits_mask_ept(table: RsvdTable, pa_bits_rsvd: int, execonly,
                              huge_page_level: int) -> RsvdTable:
    """EPT-format table (``__reset_rsvds_bits_mask_ept``), in place; all ten slots."""
    mask = table.rsvd_bits_mask
    high = (int(pa_bits_rsvd) & U64) & rsvd_bits(0, 51)
    huge_page_level = int(huge_page_level)
    # PS (bit 7) is reserved at a level whose page size is not supported.
    large_1g = rsvd_bits(7, 7) if huge_page_level < PG_LEVEL_1G else 0
    large_2m = rsvd_bits(7, 7) if huge_page_level < PG_LEVEL_2M else 0

    mask[0][4] = high | rsvd_bits(3, 7)
    mask[0][3] = high | rsvd_bits(3, 7)
    mask[0][2] = high | rsvd_bits(3, 6) | large_1g
    mask[0][1] = high | rsvd_bits(3, 6) | large_2m
    mask[0][0] = high
    mask[1][4] = mask[0][4]
    mask[1][3] = mask[0][3]
    mask[1][2] = high | rsvd_bits(12, 29) | large_1g    # 1 GiB leaf
    mask[1][1] = high | rsvd_bits(12, 20) | large_2m    # 2 MiB leaf
    mask[1][0] = high

    # bad_mt_xwr is indexed by the entry's low 6 bits: memtype << 3 | XWR.
    bad = 0
    for memtype in (2, 3, 7):                 # reserved memory types: whole byte
        bad |= 0xFF << (memtype * 8)
    bad |= _repeat_byte(1 << 0b010)           # write-only
    bad |= _repeat_byte(1 << 0b110)           # write+execute without read
    if not execonly:
        bad |= _repeat_byte(1 << 0b100)       # execute-only needs the VMX capability
    table.bad_mt_xwr = bad & U64
    return table


# =============================================================================
# Permission and protection-key bitmaps (doc section 10)
# =============================================================================

def permission_bitmask(cr0_wp, efer_nx, cr4_smep, cr4_smap, ept) -> list[int]:
    """``update_permission_bitmask``: 16 bytes, bit ``a`` of byte ``i`` set when an
    access with error code ``i << 1`` to a leaf with ACC bits ``a`` faults."""
    permissions = []
    for index in range(16):
        pfec = index << 1
        is_write = bool(pfec & PFERR_WRITE)
        is_user = bool(pfec & PFERR_USER)
        is_fetch = bool(pfec & PFERR_FETCH)
        smap_override = bool(pfec & PFERR_RSVD)   # CPL < 3 with EFLAGS.AC = 1
        byte = 0
        for acc in range(8):
            executable = bool(acc & ACC_EXEC)
            writable = bool(acc & ACC_WRITE)
            user_page = bool(acc & ACC_USER)

            write_fault = is_write and not writable
            user_fault = is_user and not user_page
            fetch_fault = is_fetch and not executable
            smep_fault = smap_fault = False
            if not ept:
                if not efer_nx:
                    fetch_fault = False           # no NX: nothing is non-executable
                if not cr0_wp and not is_user:
                    write_fault = False           # CR0.WP=0: supervisor may write anything
                supervisor_to_user = not is_user and user_page
                if cr4_smep:
                    smep_fault = is_fetch and supervisor_to_user
                if cr4_smap:
                    smap_fault = (not is_fetch and not smap_override
                                  and supervisor_to_user)
            if write_fault or user_fault or fetch_fault or smep_fault or smap_fault:
                byte |= 1 << acc
        permissions.append(byte)
    return permissions


def pkru_bitmask(cr4_pke, cr0_wp) -> int:
    """``update_pkru_bitmask``: two bits (AD low, WD high) at offset ``pfec`` for
    each index ``i`` (``pfec = i << 1``); zero without (long-mode) CR4.PKE."""
    if not cr4_pke:
        return 0
    mask = 0
    for index in range(16):
        pfec = index << 1
        is_fetch = bool(pfec & PFERR_FETCH)
        is_user = bool(pfec & PFERR_USER)
        is_write = bool(pfec & PFERR_WRITE)
        leaf_is_user = bool(pfec & PFERR_RSVD)   # stands for the leaf's U bit here
        # Protection keys only apply to data accesses to user pages ...
        check_access = not is_fetch and leaf_is_user
        # ... and write-disable only to writes that CR0.WP (or CPL 3) enforces.
        check_write = check_access and is_write and (is_user or bool(cr0_wp))
        mask |= (int(check_access) | int(check_write) << 1) << pfec
    return mask & U32


# =============================================================================
# The context (the modelled fields of struct kvm_mmu)
# =============================================================================

class Context:
    """The fields of ``struct kvm_mmu`` that kvmmu models; fresh = all zero.

    * ``role``: v5.17 ``mmu_role.as_u64``; v6.16 ``cpu_role.as_u64``.
    * ``root_role``: v6.16 ``root_role.word`` (stays 0 under v5.17).
    * ``root_level``: v5.17 ``root_level``; v6.16 ``cpu_role.base.level``.
    * ``shadow_root_level``: v5.17 ``shadow_root_level``; v6.16 ``root_role.level``.
    """

    __slots__ = ("role", "root_role", "root_level", "shadow_root_level",
                 "guest_rsvd", "shadow_zero", "permissions", "pkru_mask")

    def __init__(self):
        self.role = 0
        self.root_role = 0
        self.root_level = 0
        self.shadow_root_level = 0
        self.guest_rsvd = RsvdTable()
        self.shadow_zero = RsvdTable()
        self.permissions = [0] * 16
        self.pkru_mask = 0

    def as_dict(self) -> dict:
        return {
            "role": self.role,
            "root_role": self.root_role,
            "root_level": self.root_level,
            "shadow_root_level": self.shadow_root_level,
            "guest_rsvd": [list(row) for row in self.guest_rsvd.rsvd_bits_mask],
            "guest_bad_mt_xwr": self.guest_rsvd.bad_mt_xwr,
            "shadow_zero": [list(row) for row in self.shadow_zero.rsvd_bits_mask],
            "shadow_bad_mt_xwr": self.shadow_zero.bad_mt_xwr,
            "permissions": list(self.permissions),
            "pkru_mask": self.pkru_mask,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Context":
        """Inverse of :meth:`as_dict` (convenience for building ``initial`` states)."""
        ctx = cls()
        ctx.role = int(d.get("role", 0)) & U64
        ctx.root_role = int(d.get("root_role", 0)) & U32
        ctx.root_level = int(d.get("root_level", 0))
        ctx.shadow_root_level = int(d.get("shadow_root_level", 0))
        ctx.guest_rsvd = RsvdTable(d.get("guest_rsvd"), d.get("guest_bad_mt_xwr", 0))
        ctx.shadow_zero = RsvdTable(d.get("shadow_zero"), d.get("shadow_bad_mt_xwr", 0))
        ctx.permissions = [int(v) & 0xFF for v in d.get("permissions", [0] * 16)]
        ctx.pkru_mask = int(d.get("pkru_mask", 0)) & U32
        return ctx

    def copy(self) -> "Context":
        new = Context()
        new.role = self.role
        new.root_role = self.root_role
        new.root_level = self.root_level
        new.shadow_root_level = self.shadow_root_level
        new.guest_rsvd = self.guest_rsvd.copy()
        new.shadow_zero = self.shadow_zero.copy()
        new.permissions = list(self.permissions)
        new.pkru_mask = self.pkru_mask
        return new

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Context):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return (f"Context(role={self.role:#018x}, root_role={self.root_role:#010x}, "
                f"root_level={self.root_level}, shadow_root_level={self.shadow_root_level})")


# =============================================================================
# Inputs
# =============================================================================

def _get(obj: Any, name: str, default: Any = ...) -> Any:
    """Read ``name`` from a mapping or an attribute-bearing object."""
    if isinstance(obj, Mapping):
        if name in obj:
            return obj[name]
    elif hasattr(obj, name):
        return getattr(obj, name)
    if default is ...:
        raise KeyError(f"missing input field {name!r}")
    return default


def _as_int(value: Any) -> int:
    if isinstance(value, str):
        return int(value, 0)
    return int(value)


class _Vcpu:
    """Per-vCPU inputs (doc 1.1), registers raw."""

    __slots__ = ("cr0", "cr4", "efer", "maxphyaddr", "guest_amd", "guest_gbpages",
                 "smm", "guest_mode")

    def __init__(self, guest: Any):
        self.cr0 = _as_int(_get(guest, "cr0")) & U64
        self.cr4 = _as_int(_get(guest, "cr4")) & U64
        self.efer = _as_int(_get(guest, "efer")) & U64
        self.maxphyaddr = _as_int(_get(guest, "maxphyaddr"))
        self.guest_amd = bool(_as_int(_get(guest, "guest_amd")))
        self.guest_gbpages = bool(_as_int(_get(guest, "guest_gbpages")))
        self.smm = 1 if _as_int(_get(guest, "smm")) else 0
        self.guest_mode = 1 if _as_int(_get(guest, "guest_mode")) else 0

    @property
    def reserved_gpa_bits(self) -> int:
        return reserved_gpa_bits(self.maxphyaddr)


class _Host:
    """Host / module configuration (doc 1.2)."""

    __slots__ = ("tdp_enabled", "shadow_phys_bits", "shadow_me_mask", "shadow_me_value",
                 "host_gbpages", "host_tdp_is_amd", "tdp_ad_disabled", "tdp_root_level",
                 "max_tdp_level", "max_huge_page_level")

    def __init__(self, host: Any):
        self.tdp_enabled = bool(_as_int(_get(host, "tdp_enabled")))
        self.shadow_phys_bits = _as_int(_get(host, "shadow_phys_bits"))
        self.shadow_me_mask = _as_int(_get(host, "shadow_me_mask")) & U64
        # shadow_me_value only exists in v6; default it to the mask (AMD behaviour).
        self.shadow_me_value = _as_int(_get(host, "shadow_me_value",
                                            self.shadow_me_mask)) & U64
        self.host_gbpages = bool(_as_int(_get(host, "host_gbpages")))
        self.host_tdp_is_amd = bool(_as_int(_get(host, "host_tdp_is_amd")))
        self.tdp_ad_disabled = bool(_as_int(_get(host, "tdp_ad_disabled")))
        self.tdp_root_level = _as_int(_get(host, "tdp_root_level"))
        self.max_tdp_level = _as_int(_get(host, "max_tdp_level"))
        self.max_huge_page_level = _as_int(_get(host, "max_huge_page_level"))

    @property
    def reserved_hpa_bits(self) -> int:
        return rsvd_bits(self.shadow_phys_bits, 63)


class _Ept:
    """Arguments of ``kvm_init_shadow_ept_mmu``."""

    __slots__ = ("execonly", "huge_page_level", "accessed_dirty", "eptp_level",
                 "root_mmu_smm")

    def __init__(self, ept: Any):
        self.execonly = bool(_as_int(_get(ept, "execonly")))
        self.huge_page_level = _as_int(_get(ept, "huge_page_level"))
        self.accessed_dirty = bool(_as_int(_get(ept, "accessed_dirty")))
        self.eptp_level = _as_int(_get(ept, "eptp_level"))
        smm = _get(ept, "root_mmu_smm", None)
        self.root_mmu_smm = None if smm is None else (1 if _as_int(smm) else 0)


# =============================================================================
# Derived levels (doc section 3)
# =============================================================================

def _guest_paging_level(cr0: int, cr4: int, efer: int) -> int:
    """``role_regs_to_root_level`` (v5.17) / ``cpu_role.base.level`` (v6).
    EFER.LMA wins over a clear CR4.PAE (raw registers)."""
    if not cr0 & CR0_PG:
        return 0
    if efer & EFER_LMA:
        return PT64_ROOT_5LEVEL if cr4 & CR4_LA57 else PT64_ROOT_4LEVEL
    if cr4 & CR4_PAE:
        return PT32E_ROOT_LEVEL
    return PT32_ROOT_LEVEL


def _tdp_level(host: _Host, vcpu: _Vcpu) -> int:
    """``kvm_mmu_get_tdp_level``: a forced level (SVM) wins; otherwise 5-level TDP
    is used only when the guest's MAXPHYADDR needs it."""
    if host.tdp_root_level:
        return host.tdp_root_level
    if host.max_tdp_level == PT64_ROOT_5LEVEL and vcpu.maxphyaddr <= 48:
        return PT64_ROOT_4LEVEL
    return host.max_tdp_level


# =============================================================================
# v5.17 role computation (doc section 4)
# =============================================================================

def _v517_common_role(vcpu: _Vcpu, cr0: int, cr4: int, efer: int):
    """``kvm_calc_mmu_role_common`` + ``kvm_calc_mmu_role_ext``; returns (base, ext)."""
    pg = bool(cr0 & CR0_PG)
    lma = bool(efer & EFER_LMA)
    base = {"access": ACC_ALL, "smm": vcpu.smm, "guest_mode": vcpu.guest_mode}
    ext = {"valid": 1}
    if pg:
        base["efer_nx"] = bool(efer & EFER_NX)
        base["cr0_wp"] = bool(cr0 & CR0_WP)
        ext.update(
            cr0_pg=1,
            cr4_pae=bool(cr4 & CR4_PAE),
            cr4_smep=bool(cr4 & CR4_SMEP),
            cr4_smap=bool(cr4 & CR4_SMAP),
            cr4_pse=bool(cr4 & CR4_PSE),
            # PKE and LA57 only exist in long mode.
            cr4_pke=lma and bool(cr4 & CR4_PKE),
            cr4_la57=lma and bool(cr4 & CR4_LA57),
            efer_lma=lma,
        )
    return base, ext


def _v517_shadow_common_role(vcpu: _Vcpu, cr0: int, cr4: int, efer: int):
    """``kvm_calc_shadow_root_page_role_common``: adds the SMEP/SMAP-without-WP
    bits (which change how KVM builds shadow PTEs) and the gPTE size."""
    base, ext = _v517_common_role(vcpu, cr0, cr4, efer)
    wp = bool(cr0 & CR0_WP)
    base["smep_andnot_wp"] = bool(ext.get("cr4_smep")) and not wp
    base["smap_andnot_wp"] = bool(ext.get("cr4_smap")) and not wp
    base["has_4_byte_gpte"] = bool(cr0 & CR0_PG) and not cr4 & CR4_PAE
    return base, ext


def _v517_role(vcpu: _Vcpu, flavor: str, host: _Host, ept: _Ept | None, cr4: int) -> int:
    cr0, efer = vcpu.cr0, vcpu.efer
    if flavor == "tdp":
        # kvm_calc_tdp_mmu_root_page_role
        base, ext = _v517_common_role(vcpu, cr0, cr4, efer)
        base.update(ad_disabled=host.tdp_ad_disabled, level=_tdp_level(host, vcpu),
                    direct=1, has_4_byte_gpte=0)
    elif flavor == "shadow":
        # kvm_calc_shadow_mmu_root_page_role: KVM shadows non-64-bit guests with
        # PAE tables; the level follows raw LMA/LA57 even with paging off.
        base, ext = _v517_shadow_common_role(vcpu, cr0, cr4, efer)
        if not efer & EFER_LMA:
            level = PT32E_ROOT_LEVEL
        elif cr4 & CR4_LA57:
            level = PT64_ROOT_5LEVEL
        else:
            level = PT64_ROOT_4LEVEL
        base.update(direct=not cr0 & CR0_PG, level=level)
    elif flavor == "shadow_npt":
        # kvm_calc_shadow_npt_root_page_role (cr4 already has PKE cleared)
        base, ext = _v517_shadow_common_role(vcpu, cr0, cr4, efer)
        base.update(direct=0, level=_tdp_level(host, vcpu))
    elif flavor == "nested":
        # kvm_calc_nested_mmu_role: nested_mmu never has shadow pages, so
        # "direct" is set only as a marker.
        base, ext = _v517_shadow_common_role(vcpu, cr0, cr4, efer)
        base.update(direct=1, level=_guest_paging_level(cr0, cr4, efer))
    elif flavor == "shadow_ept":
        # kvm_calc_shadow_ept_root_page_role: no CR/EFER input at all; smm is
        # copied from root_mmu's current role.
        smm = vcpu.smm if ept.root_mmu_smm is None else ept.root_mmu_smm
        base = {"smm": smm, "level": _ept_level(ept), "has_4_byte_gpte": 0,
                "direct": 0, "ad_disabled": not ept.accessed_dirty,
                "guest_mode": 1, "access": ACC_ALL}
        ext = {"valid": 1, "execonly": ept.execonly}
    else:  # pragma: no cover - validated by the caller
        raise ValueError(flavor)
    return _role_u64("v5.17", base, ext)


def _ept_level(ept: _Ept) -> int:
    # The EptConfig carries the walk level itself (4 or 5); vmx_eptp_page_walk_level
    # maps everything that is not 5-level to 4.
    return PT64_ROOT_5LEVEL if ept.eptp_level == PT64_ROOT_5LEVEL else PT64_ROOT_4LEVEL


# =============================================================================
# v6.16 role computation (doc section 5)
# =============================================================================

def _v616_cpu_role(vcpu: _Vcpu, cr0: int, cr4: int, efer: int) -> int:
    """``kvm_calc_cpu_role``: with paging off only access/smm/guest_mode/direct."""
    base = {"access": ACC_ALL, "smm": vcpu.smm, "guest_mode": vcpu.guest_mode}
    ext = {"valid": 1}
    if not cr0 & CR0_PG:
        base["direct"] = 1
        return _role_u64("v6.16", base, ext)
    wp = bool(cr0 & CR0_WP)
    lma = bool(efer & EFER_LMA)
    smep = bool(cr4 & CR4_SMEP)
    smap = bool(cr4 & CR4_SMAP)
    base.update(
        efer_nx=bool(efer & EFER_NX),
        cr0_wp=wp,
        smep_andnot_wp=smep and not wp,
        smap_andnot_wp=smap and not wp,
        has_4_byte_gpte=not cr4 & CR4_PAE,       # raw: even in long mode
        level=_guest_paging_level(cr0, cr4, efer),
        direct=0,
    )
    ext.update(
        cr4_smep=smep,
        cr4_smap=smap,
        cr4_pse=bool(cr4 & CR4_PSE),
        cr4_pke=lma and bool(cr4 & CR4_PKE),
        cr4_la57=lma and bool(cr4 & CR4_LA57),
        efer_lma=lma,
    )
    return _role_u64("v6.16", base, ext)


def _with_fields(version: str, word: int, **fields) -> int:
    """Return the 32-bit base role ``word`` with some fields replaced."""
    layout = BASE_LAYOUT[version]
    for name, value in fields.items():
        shift, width = layout[name]
        field_mask = ((1 << width) - 1) << shift
        word = (word & ~field_mask) | ((int(value) << shift) & field_mask)
    return word & U32


def _v616_roles(vcpu: _Vcpu, flavor: str, host: _Host, ept: _Ept | None, cr4: int):
    """Return ``(cpu_role, root_role or None)`` for one init."""
    V = "v6.16"
    if flavor == "shadow_ept":
        # kvm_calc_shadow_ept_root_page_role: KVM has no SMM transfer monitor
        # support, so smm is always 0; EPT consumes no CR0/CR4/EFER.
        base = {"level": _ept_level(ept), "has_4_byte_gpte": 0, "direct": 0,
                "ad_disabled": not ept.accessed_dirty, "guest_mode": 1,
                "access": ACC_ALL}
        ext = {"valid": 1, "execonly": ept.execonly}
        cpu_role = _role_u64(V, base, ext)
        return cpu_role, cpu_role & U32

    cpu_role = _v616_cpu_role(vcpu, vcpu.cr0, cr4, vcpu.efer)
    cpu_base = cpu_role & U32
    if flavor == "tdp":
        # kvm_calc_tdp_mmu_root_page_role: the TDP page format does not depend
        # on the guest's paging registers at all.
        root = _pack(BASE_LAYOUT[V], {
            "access": ACC_ALL, "cr0_wp": 1, "efer_nx": 1,
            "smm": _base_field(V, cpu_role, "smm"),
            "guest_mode": _base_field(V, cpu_role, "guest_mode"),
            "ad_disabled": host.tdp_ad_disabled, "level": _tdp_level(host, vcpu),
            "direct": 1, "has_4_byte_gpte": 0,
        })
    elif flavor == "shadow":
        # kvm_init_shadow_mmu: shadow tables are at least PAE, and KVM always
        # runs the hardware with EFER.NX=1 under shadow paging.
        level = max(_base_field(V, cpu_role, "level"), PT32E_ROOT_LEVEL)
        root = _with_fields(V, cpu_base, level=level, efer_nx=1)
    elif flavor == "shadow_npt":
        # kvm_init_shadow_npt_mmu: shadow NPT tables have L1's NPT level; a
        # 4-level L1 under 5-level NPT needs a pass-through top level.
        tdp_level = _tdp_level(host, vcpu)
        root = _with_fields(V, cpu_base, level=tdp_level)
        if tdp_level == PT64_ROOT_5LEVEL and _base_field(V, cpu_role, "level") == PT64_ROOT_4LEVEL:
            root = _with_fields(V, root, passthrough=1)
    elif flavor == "nested":
        root = None                      # init_kvm_nested_mmu: root_role untouched
    else:  # pragma: no cover
        raise ValueError(flavor)
    return cpu_role, root


# =============================================================================
# Guarded bodies
# =============================================================================

def _reset_guest_paging_metadata(ctx: Context, vcpu: _Vcpu, host: _Host, version: str) -> None:
    """``reset_guest_paging_metadata``: guest reserved bits, permissions, PKRU.

    Skipped entirely while the context's role says paging is off, so the
    previous contents stay (they are never consulted without paging).
    """
    role = ctx.role
    if version == "v5.17":
        if not _ext_field(version, role, "cr0_pg"):
            return
        level = ctx.root_level
        # guest_can_use_gbpages: with TDP the guest can map 1G pages whenever the
        # host can, regardless of its CPUID.
        gbpages = host.host_gbpages if host.tdp_enabled else vcpu.guest_gbpages
    else:
        level = _base_field(version, role, "level")
        if level == 0:                    # v6 is_cr0_pg(): cpu_role level > 0
            return
        gbpages = vcpu.guest_gbpages     # v6 always trusts guest CPUID
    efer_nx = _base_field(version, role, "efer_nx")
    cr0_wp = _base_field(version, role, "cr0_wp")
    # reset_rsvds_bits_mask (v5.17) / reset_guest_rsvds_bits_mask (v6)
    reset_rsvds_bits_mask(ctx.guest_rsvd, level, vcpu.reserved_gpa_bits, efer_nx,
                          gbpages, _ext_field(version, role, "cr4_pse"), vcpu.guest_amd)
    ctx.permissions = permission_bitmask(cr0_wp, efer_nx,
                                         _ext_field(version, role, "cr4_smep"),
                                         _ext_field(version, role, "cr4_smap"), False)
    ctx.pkru_mask = pkru_bitmask(_ext_field(version, role, "cr4_pke"), cr0_wp)


def _clear_me_mask(table: RsvdTable, level: int, me_mask: int) -> None:
    """SME/MKTME: the encryption bit(s) are legitimately set in SPTEs, so they
    are not reserved at any level KVM uses."""
    for i in range(min(level, 5)):
        table.rsvd_bits_mask[0][i] &= ~me_mask & U64
        table.rsvd_bits_mask[1][i] &= ~me_mask & U64


def _reset_tdp_shadow_zero(ctx: Context, host: _Host, version: str) -> None:
    """``reset_tdp_shadow_zero_bits_mask`` at the TDP root level."""
    level = ctx.shadow_root_level
    if host.host_tdp_is_amd:
        # NPT uses the legacy 64-bit format.  v5.17 passed nx=false (bit 63
        # reserved); v6 passes nx=true.
        reset_rsvds_bits_mask(ctx.shadow_zero, level, host.reserved_hpa_bits,
                              version == "v6.16", host.host_gbpages, False, True)
    else:
        reset_rsvds_bits_mask_ept(ctx.shadow_zero, host.reserved_hpa_bits, False,
                                  host.max_huge_page_level)
    if host.shadow_me_mask:
        _clear_me_mask(ctx.shadow_zero, level, host.shadow_me_mask)


def _reset_shadow_zero_v517(ctx: Context, vcpu: _Vcpu, host: _Host, uses_nx: bool) -> None:
    """v5.17 ``reset_shadow_zero_bits_mask`` (shadow / shadow NPT), with the NX
    assumption supplied by the caller (the point of the variants).

    SPTEs are always 64-bit and never 2-level, so pse=false and amd=true.
    """
    level = ctx.shadow_root_level
    gbpages = host.host_gbpages if host.tdp_enabled else vcpu.guest_gbpages
    reset_rsvds_bits_mask(ctx.shadow_zero, level, host.reserved_hpa_bits, uses_nx,
                          gbpages, False, True)
    if host.shadow_me_mask:
        _clear_me_mask(ctx.shadow_zero, level, host.shadow_me_mask)


def _reset_shadow_zero_v616(ctx: Context, vcpu: _Vcpu, host: _Host, uses_nx: bool) -> None:
    """v6.16 ``reset_shadow_zero_bits_mask``: keyed on root_role; memory
    encryption first reserves the whole mask, then frees the bits KVM sets."""
    level = _base_field("v6.16", ctx.root_role, "level")
    reset_rsvds_bits_mask(ctx.shadow_zero, level, host.reserved_hpa_bits, uses_nx,
                          vcpu.guest_gbpages, False, True)
    if host.shadow_me_mask:
        for i in range(min(level, 5)):
            for row in (0, 1):
                value = ctx.shadow_zero.rsvd_bits_mask[row][i] | host.shadow_me_mask
                ctx.shadow_zero.rsvd_bits_mask[row][i] = value & ~host.shadow_me_value & U64


def _init_shadow_ept_tables(ctx: Context, vcpu: _Vcpu, host: _Host, ept: _Ept) -> None:
    """Guarded body of ``kvm_init_shadow_ept_mmu`` after the role/level writes."""
    # EPT permissions ignore every role input (ept=true).
    ctx.permissions = permission_bitmask(False, False, False, False, True)
    ctx.pkru_mask = 0                          # no protection keys in EPT
    # reset_rsvds_bits_mask_ept: L1's EPT capabilities.
    reset_rsvds_bits_mask_ept(ctx.guest_rsvd, vcpu.reserved_gpa_bits, ept.execonly,
                              ept.huge_page_level)
    # reset_ept_shadow_zero_bits_mask: the host's huge-page level, not L1's.
    reset_rsvds_bits_mask_ept(ctx.shadow_zero, host.reserved_hpa_bits, ept.execonly,
                              host.max_huge_page_level)


# --- variants (doc section 9) -------------------------------------------------

def _variant_uses_nx(variant: str, flavor: str, ctx: Context, host: _Host) -> bool:
    """The NX assumption of the v5.17 shadow-zero table under each variant."""
    role_nx = bool(_base_field("v5.17", ctx.role, "efer_nx"))
    if variant == "v517":
        # Shadow paging without TDP always sets NX in SPTEs (iTLB multihit,
        # SMEP with CR0.WP=0), whatever the guest's EFER says.
        return role_nx or not host.tdp_enabled
    if variant in ("patch01", "final"):
        return True if flavor == "shadow" else role_nx
    if variant == "literal":
        return role_nx
    raise ValueError(f"unknown variant {variant!r}")


def _init_v517(ctx: Context, vcpu: _Vcpu, flavor: str, host: _Host, ept: _Ept | None,
               variant: str, force: bool, uses_nx: bool | None,
               inside_guard: bool | None) -> bool:
    V = "v5.17"
    cr4 = vcpu.cr4
    if flavor == "shadow_npt":
        cr4 &= ~CR4_PKE                       # kvm_init_shadow_npt_mmu drops PKE
    role = _v517_role(vcpu, flavor, host, ept, cr4)

    shadowing = flavor in ("shadow", "shadow_npt")
    if inside_guard is None:
        inside_guard = variant != "patch01"

    def shadow_zero() -> None:
        nx = uses_nx if uses_nx is not None else _variant_uses_nx(variant, flavor, ctx, host)
        _reset_shadow_zero_v517(ctx, vcpu, host, bool(nx))

    recompute = force or role != ctx.role
    if recompute:
        ctx.role = role
        if flavor == "shadow_ept":
            # kvm_init_shadow_ept_mmu
            level = _ept_level(ept)
            ctx.shadow_root_level = level
            ctx.root_level = level
            _init_shadow_ept_tables(ctx, vcpu, host, ept)
        else:
            ctx.root_level = _guest_paging_level(vcpu.cr0, cr4, vcpu.efer)
            if flavor == "tdp":
                # init_kvm_tdp_mmu
                ctx.shadow_root_level = _tdp_level(host, vcpu)
                _reset_guest_paging_metadata(ctx, vcpu, host, V)
                _reset_tdp_shadow_zero(ctx, host, V)
            elif shadowing:
                # shadow_mmu_init_context
                _reset_guest_paging_metadata(ctx, vcpu, host, V)
                ctx.shadow_root_level = _base_field(V, role, "level")
                if inside_guard:
                    shadow_zero()
            else:
                # init_kvm_nested_mmu: no shadow pages, so no shadow level/table
                _reset_guest_paging_metadata(ctx, vcpu, host, V)
    if shadowing and not inside_guard:
        # Patch 01 resets the shadow-zero table after shadow_mmu_init_context
        # returns, i.e. on every init even when the guard skipped the body.
        shadow_zero()
    return recompute


def _init_v616(ctx: Context, vcpu: _Vcpu, flavor: str, host: _Host, ept: _Ept | None,
               force: bool, uses_nx: bool | None, inside_guard: bool | None) -> bool:
    V = "v6.16"
    cr4 = vcpu.cr4
    if flavor == "shadow_npt":
        cr4 &= ~CR4_PKE                       # kvm_init_shadow_npt_mmu drops PKE
    cpu_role, root_role = _v616_roles(vcpu, flavor, host, ept, cr4)

    shadowing = flavor in ("shadow", "shadow_npt")
    if inside_guard is None:
        inside_guard = True

    def shadow_zero() -> None:
        nx = uses_nx if uses_nx is not None else _base_field(V, ctx.root_role, "efer_nx")
        _reset_shadow_zero_v616(ctx, vcpu, host, bool(nx))

    # The guard: shadow_ept and nested compare cpu_role only; the others also
    # compare root_role (init_kvm_tdp_mmu, shadow_mmu_init_context).
    same = cpu_role == ctx.role
    if root_role is not None and flavor != "shadow_ept":
        same = same and root_role == ctx.root_role
    recompute = force or not same
    if recompute:
        ctx.role = cpu_role
        ctx.root_level = _base_field(V, cpu_role, "level")
        if root_role is not None:
            ctx.root_role = root_role
            ctx.shadow_root_level = _base_field(V, root_role, "level")
        if flavor == "shadow_ept":
            _init_shadow_ept_tables(ctx, vcpu, host, ept)
        else:
            _reset_guest_paging_metadata(ctx, vcpu, host, V)
            if flavor == "tdp":
                _reset_tdp_shadow_zero(ctx, host, V)
            elif shadowing and inside_guard:
                shadow_zero()
    if shadowing and not inside_guard:
        shadow_zero()
    return recompute


# =============================================================================
# Public entry points
# =============================================================================

def init_context(ctx: Context, guest, flavor, host, ept=None, version="v5.17",
                 variant="v517", *, force=False, uses_nx=None,
                 inside_guard=None) -> bool:
    """One MMU context init on a persistent ``ctx``, with the role-equality guard.

    Returns True when the guarded body ran (state recomputed), False when the
    guard skipped it (then nothing is written, except the shadow-zero table
    under an outside-the-guard variant such as ``patch01``).

    ``variant`` selects the v5.17 shadow/shadow-NPT ``uses_nx`` rule and its
    placement (doc section 9); ``uses_nx`` / ``inside_guard`` override the rule
    / placement when not None.  They only affect flavors shadow and
    shadow_npt.  Under v6.16 only the default ``variant="v517"`` is accepted
    (there it means "the v6.16 kernel"), and the overrides are applied to
    v6.16's own rule (``root_role.efer_nx``, inside the guard).
    """
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; expected one of {FLAVORS}")
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; expected one of {VERSIONS}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if version == "v6.16" and variant != "v517":
        raise ValueError("variants other than 'v517' only exist for v5.17")
    vcpu = _Vcpu(guest)
    host_cfg = _Host(host)
    ept_cfg = None
    if flavor == "shadow_ept":
        if ept is None:
            raise ValueError("flavor 'shadow_ept' needs an ept configuration")
        ept_cfg = _Ept(ept)
    if version == "v5.17":
        return _init_v517(ctx, vcpu, flavor, host_cfg, ept_cfg, variant, bool(force),
                          uses_nx, inside_guard)
    return _init_v616(ctx, vcpu, flavor, host_cfg, ept_cfg, bool(force), uses_nx,
                      inside_guard)


def invalidate(ctx: Context, version) -> None:
    """``kvm_mmu_after_set_cpuid``: make the next init recompute.

    Clears ``ext.valid`` of the cached role; v6 also sets ``root_role.invalid``.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; expected one of {VERSIONS}")
    ctx.role &= ~EXT_VALID_BIT & U64
    if version == "v6.16":
        ctx.root_role = (ctx.root_role | INVALID_BIT) & U32


def init_mmu_one(guest, flavor, host, ept=None, version="v5.17", variant="v517",
                 **kw) -> dict:
    """``init_context`` on a fresh (all-zero) context; returns ``ctx.as_dict()``."""
    ctx = Context()
    init_context(ctx, guest, flavor, host, ept, version, variant, **kw)
    return ctx.as_dict()


def replay(guests, flavor, host, ept=None, version="v5.17", variant="v517",
           policy="skip_if_same_role", initial: Context | None = None,
           invalidate_steps=None, vcpu=None) -> tuple[list[dict], list[bool]]:
    """Replay a sequence of inits through persistent contexts.

    One context per distinct vCPU id (``vcpu`` None: all steps on vCPU 0), each
    starting as a copy of ``initial`` (or fresh).  ``invalidate_steps[i]``
    truthy invalidates that step's context before its init.  ``policy`` is
    ``"skip_if_same_role"`` (the kernel guard) or ``"force"`` (always recompute).
    Returns the context dict after each step and whether each step recomputed.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    guests = list(guests)
    n = len(guests)
    vcpu_ids = [0] * n if vcpu is None else [int(v) for v in vcpu]
    if len(vcpu_ids) != n:
        raise ValueError("vcpu must have one id per guest state")
    if invalidate_steps is not None:
        invalidate_steps = list(invalidate_steps)
        if len(invalidate_steps) != n:
            raise ValueError("invalidate_steps must have one entry per guest state")
    force = policy == "force"
    contexts: dict[int, Context] = {}
    states: list[dict] = []
    recomputed: list[bool] = []
    for i, guest in enumerate(guests):
        vid = vcpu_ids[i]
        ctx = contexts.get(vid)
        if ctx is None:
            ctx = initial.copy() if initial is not None else Context()
            contexts[vid] = ctx
        if invalidate_steps is not None and invalidate_steps[i]:
            invalidate(ctx, version)
        recomputed.append(init_context(ctx, guest, flavor, host, ept, version, variant,
                                       force=force))
        states.append(ctx.as_dict())
    return states, recomputed
