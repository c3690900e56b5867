"""kvmmu: Linux KVM's x86 MMU roles and reserved-bit masks, bit for bit, for numpy batches.

>>> import kvmmu
>>> g = kvmmu.guests(cr0=0x80050033, cr4=0x3006f0, efer=0xd01, maxphyaddr=46)
>>> ctx = kvmmu.init_mmu(g, "tdp", version="v6.16")
>>> kvmmu.decode_role(int(ctx["role"][0]), "v6.16")["level"]
4
"""
from ._version import __version__
from ._types import (
    CONTEXT_DTYPE,
    FLAVORS,
    GUEST_DTYPE,
    VARIANTS,
    VERSIONS,
    EptConfig,
    HostConfig,
    guests,
)
from .roles import ROLE_LAYOUTS, decode_role, pack_role, unpack_role
from .variants import Variant
from .engine import (
    RsvdBitsValidate,
    init_mmu,
    is_rsvd_gpte,
    is_rsvd_spte,
    openmp_enabled,
    reset_rsvds_bits_mask,
    reset_rsvds_bits_mask_ept,
    rsvd_bits,
    update_permission_bitmask,
    update_pkru_bitmask,
)
from .arch import ArchitecturalCheck, check_architectural

__all__ = [
    "__version__",
    "CONTEXT_DTYPE",
    "FLAVORS",
    "GUEST_DTYPE",
    "VARIANTS",
    "VERSIONS",
    "EptConfig",
    "HostConfig",
    "guests",
    "ROLE_LAYOUTS",
    "decode_role",
    "pack_role",
    "unpack_role",
    "Variant",
    "RsvdBitsValidate",
    "init_mmu",
    "is_rsvd_gpte",
    "is_rsvd_spte",
    "openmp_enabled",
    "reset_rsvds_bits_mask",
    "reset_rsvds_bits_mask_ept",
    "rsvd_bits",
    "update_permission_bitmask",
    "update_pkru_bitmask",
    "ArchitecturalCheck",
    "check_architectural",
]

from .replay import POLICIES, ReplayResult, replay
from .workloads import WORKLOADS, Workload, workload

__all__ += ["POLICIES", "ReplayResult", "replay", "WORKLOADS", "Workload", "workload"]

from .analysis import (
    DEFAULT_HOSTS,
    CompareResult,
    StaleGroup,
    StaleReport,
    SweepResult,
    compare,
    enumerate_states,
    find_stale_roles,
    guard_key,
    state_space_size,
    sweep,
)

__all__ += ["DEFAULT_HOSTS", "CompareResult", "StaleGroup", "StaleReport", "SweepResult", "compare",
            "enumerate_states", "find_stale_roles", "guard_key", "state_space_size", "sweep"]

from .access import ACCESS_DTYPE, ACCESS_RESULT_DTYPE, access_verdicts
from . import accessc

__all__ += ["ACCESS_DTYPE", "ACCESS_RESULT_DTYPE", "access_verdicts", "accessc"]
