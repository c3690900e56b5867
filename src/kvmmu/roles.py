"""Role word layouts (union kvm_mmu_page_role / kvm_mmu_extended_role).

A role as_u64 is the 32-bit base (page) role in bits 0-31 and the 32-bit
extended role in bits 32-63. Bitfields are allocated from bit 0 upward, as
GCC does on x86. v6.16's ``root_role`` is a base word alone.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from ._types import VERSIONS

_BASE_COMMON: List[Tuple[str, int, int]] = [
    ("level", 0, 4),
    ("has_4_byte_gpte", 4, 1),
    ("quadrant", 5, 2),
    ("direct", 7, 1),
    ("access", 8, 3),
    ("invalid", 11, 1),
    ("efer_nx", 12, 1),
    ("cr0_wp", 13, 1),
    ("smep_andnot_wp", 14, 1),
    ("smap_andnot_wp", 15, 1),
    ("ad_disabled", 16, 1),
    ("guest_mode", 17, 1),
]

#: ``ROLE_LAYOUTS[version]["base" | "ext"]`` lists ``(name, lsb, width)``;
#: ``lsb`` of ext fields counts within the extended word (add 32 for as_u64).
ROLE_LAYOUTS: Dict[str, Dict[str, Tuple[Tuple[str, int, int], ...]]] = {
    "v5.17": {
        "base": tuple(_BASE_COMMON + [("smm", 24, 8)]),
        "ext": (
            ("valid", 0, 1),
            ("execonly", 1, 1),
            ("cr0_pg", 2, 1),
            ("cr4_pae", 3, 1),
            ("cr4_pse", 4, 1),
            ("cr4_pke", 5, 1),
            ("cr4_smap", 6, 1),
            ("cr4_smep", 7, 1),
            ("cr4_la57", 8, 1),
            ("efer_lma", 9, 1),
        ),
    },
    "v6.16": {
        # passthrough and is_mirror were added to the page role after v5.17;
        # cr0_pg/cr4_pae left the extended role (derivable from level and
        # has_4_byte_gpte), moving the rest down by two.
        "base": tuple(_BASE_COMMON + [("passthrough", 18, 1), ("is_mirror", 19, 1), ("smm", 24, 8)]),
        "ext": (
            ("valid", 0, 1),
            ("execonly", 1, 1),
            ("cr4_pse", 2, 1),
            ("cr4_pke", 3, 1),
            ("cr4_smap", 4, 1),
            ("cr4_smep", 5, 1),
            ("cr4_la57", 6, 1),
            ("efer_lma", 7, 1),
        ),
    },
}


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")


def role_fields(version: str, base_only: bool = False) -> List[Tuple[str, int, int]]:
    """All fields of a role as ``(name, bit position in the u64, width)``."""
    _check_version(version)
    lay = ROLE_LAYOUTS[version]
    out = list(lay["base"])
    if not base_only:
        out += [(n, lsb + 32, w) for n, lsb, w in lay["ext"]]
    return out


def pack_role(fields: Mapping[str, Any], version: str = "v5.17") -> np.ndarray:
    """Pack named role fields (scalars or arrays, broadcast) into uint64 words.

    Missing fields are 0; a value wider than its field is a ValueError.

    >>> import kvmmu
    >>> hex(int(kvmmu.pack_role({"level": 4, "direct": 1, "access": 7, "valid": 1})))
    '0x100000784'
    """
    names = {n: (lsb, w) for n, lsb, w in role_fields(version)}
    unknown = set(fields) - set(names)
    if unknown:
        raise ValueError(f"pack_role: unknown field(s) {sorted(unknown)} for {version}")
    arrays = {k: np.asarray(v) for k, v in fields.items()}
    shape = np.broadcast_shapes(*(a.shape for a in arrays.values())) if arrays else ()
    out = np.zeros(shape, dtype=np.uint64)
    for name, a in arrays.items():
        lsb, w = names[name]
        if a.dtype.kind not in "biu":
            raise TypeError(f"pack_role: field '{name}' must be integers, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= (1 << w)):
            raise ValueError(f"pack_role: field '{name}' must be in [0, {(1 << w) - 1}]")
        out |= a.astype(np.uint64) << np.uint64(lsb)
    return out


def unpack_role(values: Any, version: str = "v5.17", base_only: bool = False) -> Dict[str, np.ndarray]:
    """Split role words into a dict of field arrays (uint8, same shape)."""
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise TypeError(f"unpack_role: values must be integers, got dtype {v.dtype}")
    v = v.astype(np.uint64)
    out = {}
    for name, pos, w in role_fields(version, base_only):
        out[name] = ((v >> np.uint64(pos)) & np.uint64((1 << w) - 1)).astype(np.uint8)
    return out


def decode_role(value: int, version: str = "v5.17", base_only: bool = False) -> Dict[str, int]:
    """Decode one role word into ``{field: int}`` (``base_only`` for a page role).

    >>> import kvmmu
    >>> r = kvmmu.decode_role(0x100000784, "v5.17")
    >>> r["level"], r["direct"], r["valid"], r["cr0_pg"]
    (4, 1, 1, 0)
    """
    value = int(value)
    if not 0 <= value < (1 << 64):
        raise ValueError(f"decode_role: value must be a u64, got {value}")
    return {name: (value >> pos) & ((1 << w) - 1) for name, pos, w in role_fields(version, base_only)}
