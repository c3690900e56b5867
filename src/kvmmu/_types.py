"""Record dtypes and configuration objects shared by the whole package."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

FLAVORS = ("tdp", "shadow", "shadow_npt", "shadow_ept", "nested")
VERSIONS = ("v5.17", "v6.16")
VARIANTS = ("v517", "patch01", "final", "literal")

#: One vCPU state per record. Registers are raw 64-bit values; KVM itself
#: picks out the bits it consults. ``maxphyaddr`` is guest CPUID
#: 0x80000008 EAX[7:0], any byte.
GUEST_DTYPE = np.dtype(
    [
        ("cr0", np.uint64),
        ("cr4", np.uint64),
        ("efer", np.uint64),
        ("maxphyaddr", np.uint8),
        ("guest_amd", np.bool_),
        ("guest_gbpages", np.bool_),
        ("smm", np.bool_),
        ("guest_mode", np.bool_),
    ],
    align=True,
)

#: What a context holds after an init: the role word(s), the two levels, the
#: guest and shadow-zero reserved-bit tables ([row][level-1], row = bit 7 of
#: the entry), their bad_mt_xwr lookups, permissions[16] and pkru_mask.
CONTEXT_DTYPE = np.dtype(
    [
        ("role", np.uint64),
        ("root_role", np.uint32),
        ("root_level", np.uint8),
        ("shadow_root_level", np.uint8),
        ("guest_rsvd", np.uint64, (2, 5)),
        ("guest_bad_mt_xwr", np.uint64),
        ("shadow_zero", np.uint64, (2, 5)),
        ("shadow_bad_mt_xwr", np.uint64),
        ("permissions", np.uint8, (16,)),
        ("pkru_mask", np.uint32),
    ],
    align=True,
)

GUEST_DEFAULTS = {
    "cr0": 0,
    "cr4": 0,
    "efer": 0,
    "maxphyaddr": 36,  # cpuid_query_maxphyaddr() when leaf 0x80000008 is absent
    "guest_amd": False,
    "guest_gbpages": False,
    "smm": False,
    "guest_mode": False,
}

_U64 = (1 << 64) - 1


def _check_int(obj: str, name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise TypeError(f"{obj}.{name} must be an int in [{lo}, {hi}], got {type(value).__name__}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{obj}.{name} must be in [{lo}, {hi}], got {value}")
    return value


def _check_bool(obj: str, name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    raise TypeError(f"{obj}.{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class HostConfig:
    """Host and module configuration, constant for the life of KVM.

    >>> HostConfig(tdp_enabled=False).reserved_hpa_bits == ((1 << 64) - 1) ^ ((1 << 46) - 1)
    True
    """

    tdp_enabled: bool = True
    shadow_phys_bits: int = 46  # host CPUID 0x80000008 EAX[7:0]
    shadow_me_mask: int = 0
    shadow_me_value: int = 0
    host_gbpages: bool = True
    host_tdp_is_amd: bool = False
    tdp_ad_disabled: bool = False
    tdp_root_level: int = 0  # 0: not forced (VMX); SVM forces its NPT level
    max_tdp_level: int = 4
    max_huge_page_level: int = 3  # 1 = 4K, 2 = 2M, 3 = 1G (enum pg_level)

    def __post_init__(self) -> None:
        o = "HostConfig"
        for name in ("tdp_enabled", "host_gbpages", "host_tdp_is_amd", "tdp_ad_disabled"):
            object.__setattr__(self, name, _check_bool(o, name, getattr(self, name)))
        object.__setattr__(self, "shadow_phys_bits",
                           _check_int(o, "shadow_phys_bits", self.shadow_phys_bits, 0, 255))
        for name in ("shadow_me_mask", "shadow_me_value"):
            object.__setattr__(self, name, _check_int(o, name, getattr(self, name), 0, _U64))
        object.__setattr__(self, "tdp_root_level",
                           _check_int(o, "tdp_root_level", self.tdp_root_level, 0, 5))
        object.__setattr__(self, "max_tdp_level",
                           _check_int(o, "max_tdp_level", self.max_tdp_level, 1, 5))
        object.__setattr__(self, "max_huge_page_level",
                           _check_int(o, "max_huge_page_level", self.max_huge_page_level, 1, 3))

    @property
    def reserved_hpa_bits(self) -> int:
        """rsvd_bits(shadow_phys_bits, 63): host physical address bits above MAXPHYADDR."""
        return rsvd_bits_int(self.shadow_phys_bits, 63)

    def replace(self, **changes: Any) -> "HostConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EptConfig:
    """Arguments of kvm_init_shadow_ept_mmu() for flavor ``shadow_ept``.

    ``eptp_level`` is the walk length L1 chose (4 or 5); ``root_mmu_smm`` is
    the smm bit of root_mmu's current role that v5.17 copies into the role
    (None: use each state's own ``smm``).
    """

    execonly: bool = False
    huge_page_level: int = 3
    accessed_dirty: bool = True
    eptp_level: int = 4
    root_mmu_smm: Optional[bool] = None

    def __post_init__(self) -> None:
        o = "EptConfig"
        object.__setattr__(self, "execonly", _check_bool(o, "execonly", self.execonly))
        object.__setattr__(self, "accessed_dirty", _check_bool(o, "accessed_dirty", self.accessed_dirty))
        object.__setattr__(self, "huge_page_level",
                           _check_int(o, "huge_page_level", self.huge_page_level, 1, 3))
        lvl = self.eptp_level
        if isinstance(lvl, (bool, np.bool_)) or not isinstance(lvl, (int, np.integer)):
            raise TypeError(f"EptConfig.eptp_level must be 4 or 5, got {lvl!r}")
        if int(lvl) not in (4, 5):
            raise ValueError(f"EptConfig.eptp_level must be 4 or 5, got {int(lvl)}")
        object.__setattr__(self, "eptp_level", int(lvl))
        if self.root_mmu_smm is not None:
            object.__setattr__(self, "root_mmu_smm", _check_bool(o, "root_mmu_smm", self.root_mmu_smm))

    def replace(self, **changes: Any) -> "EptConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def rsvd_bits_int(s: int, e: int) -> int:
    """Scalar rsvd_bits(): bits s..e, the end taken mod 64, empty when e < s."""
    e &= 63
    if e < s:
        return 0
    return (((2 << (e - s)) - 1) << s) & _U64


def guests(**fields: Any) -> np.ndarray:
    """Build a GUEST_DTYPE array from scalars and arrays, broadcast together.

    Omitted fields take their defaults (maxphyaddr 36, everything else 0);
    all-scalar arguments give a batch of one.
    Values are range-checked against the field's width before conversion, so
    ``maxphyaddr=256`` is an error rather than a silent wrap.

    >>> import kvmmu
    >>> g = kvmmu.guests(cr0=0x80050033, cr4=[0x20, 0x3006f0], efer=0xd01)
    >>> g.shape, hex(int(g["cr4"][1])), int(g["maxphyaddr"][0])
    ((2,), '0x3006f0', 36)
    """
    unknown = set(fields) - set(GUEST_DTYPE.names)
    if unknown:
        raise ValueError(f"guests(): unknown field(s) {sorted(unknown)}; "
                         f"fields are {list(GUEST_DTYPE.names)}")
    arrays = {}
    for name in GUEST_DTYPE.names:
        value = fields.get(name, GUEST_DEFAULTS[name])
        arrays[name] = _field_array(name, value)
    shapes = [a.shape for a in arrays.values()]
    try:
        shape = np.broadcast_shapes(*shapes)
    except ValueError as exc:
        raise ValueError(f"guests(): fields do not broadcast together: {exc}") from None
    # A batch of one when every field is a scalar.
    out = np.zeros(shape if shape else (1,), dtype=GUEST_DTYPE)
    for name, a in arrays.items():
        out[name] = a
    return out


def _field_array(name: str, value: Any) -> np.ndarray:
    target = GUEST_DTYPE.fields[name][0]
    if target == np.bool_:
        lo, hi = 0, 1
    else:
        lo, hi = 0, int(np.iinfo(target).max)
    if isinstance(value, np.ndarray) and value.dtype == target:
        return value
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise TypeError(f"guests(): field '{name}' is not array-like: {exc}") from None
    if arr.dtype == object:
        # Python ints beyond int64 (u64 registers) arrive as objects.
        flat = arr.ravel()
        for i, v in enumerate(flat):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"guests(): field '{name}' must hold integers, got "
                                f"{type(v).__name__} at index {i}")
            if not lo <= int(v) <= hi:
                raise ValueError(f"guests(): field '{name}' must be in [{lo}, {hi}], "
                                 f"got {int(v)} at index {i}")
        return np.array([int(v) for v in flat], dtype=target).reshape(arr.shape)
    if arr.dtype.kind == "b":
        return arr.astype(target)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"guests(): field '{name}' must be integers in [{lo}, {hi}], "
                        f"got dtype {arr.dtype}")
    if arr.size:
        flat = arr.ravel()
        bad = np.flatnonzero((flat < lo) | (flat > hi))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"guests(): field '{name}' must be in [{lo}, {hi}], "
                             f"got {int(flat[i])} at index {i}")
    return arr.astype(target)
