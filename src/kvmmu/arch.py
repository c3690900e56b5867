"""Which register states a real x86 CPU can be in (for users who want only those).

KVM itself takes the raw values, and so does :func:`kvmmu.init_mmu`; this
check is opt-in (``strict=True`` or called directly). The rules are the
architectural ones from the Intel SDM vol. 3 (2.5, 4.1) and AMD APM vol. 2
(3.1): what MOV to CR0/CR4 and WRMSR to EFER refuse, and what the processor
sets by itself. CR4.LA57 or CR4.PKE outside long mode are *not* flagged:
they can be set before paging is enabled (that is how 5-level paging is
entered) and simply have no effect until EFER.LMA is 1.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from ._types import HostConfig

#: bit -> (short name, description)
ARCH_REASONS: Dict[int, tuple] = {
    0: ("maxphyaddr_above_52", "MAXPHYADDR above 52, the architectural maximum"),
    1: ("maxphyaddr_below_32", "MAXPHYADDR below 32"),
    2: ("maxphyaddr_above_host", "guest MAXPHYADDR above the host's (shadow_phys_bits)"),
    3: ("lma_without_paging", "EFER.LMA set without CR0.PG and CR4.PAE"),
    4: ("lma_without_lme", "EFER.LMA set without EFER.LME"),
    5: ("pg_without_pe", "CR0.PG set without CR0.PE"),
    6: ("nw_without_cd", "CR0.NW set without CR0.CD"),
    7: ("cr0_reserved", "CR0 bits 63:32 set"),
    8: ("cr4_reserved", "CR4 reserved bits set"),
    9: ("efer_reserved", "EFER reserved bits set"),
}

_CR4_DEFINED = (sum(1 << b for b in range(0, 15)) | sum(1 << b for b in range(16, 26)) | (1 << 28))
_EFER_DEFINED = sum(1 << b for b in (0, 8, 10, 11, 12, 13, 14, 15, 17, 18, 21))


class ArchitecturalCheck:
    """Per-state reasons (a bit set over :data:`ARCH_REASONS`) a state is not architectural."""

    def __init__(self, reasons: np.ndarray):
        self.reasons = reasons

    @property
    def ok(self) -> np.ndarray:
        """True where the state is one a real CPU can be in."""
        return self.reasons == 0

    def explain(self, index: Any) -> List[str]:
        """The reasons for one state, as sentences."""
        r = int(self.reasons[index])
        return [desc for bit, (_, desc) in ARCH_REASONS.items() if r >> bit & 1]

    def counts(self) -> Dict[str, int]:
        """How many states fail each rule."""
        return {name: int(np.count_nonzero(self.reasons >> np.uint32(bit) & np.uint32(1)))
                for bit, (name, _) in ARCH_REASONS.items()}

    def __repr__(self) -> str:
        return f"ArchitecturalCheck({int(self.ok.sum())} of {self.reasons.size} states architectural)"


def check_architectural(guests: np.ndarray, host: Optional[HostConfig] = None) -> ArchitecturalCheck:
    """Say, per state, why it is not one a real CPU produces (empty when it is).

    >>> import kvmmu
    >>> g = kvmmu.guests(cr0=[0x80000011, 0x11], cr4=0x20, efer=0x500, maxphyaddr=[46, 60])
    >>> chk = kvmmu.check_architectural(g)
    >>> chk.ok.tolist(), chk.explain(1)
    ([True, False], ['MAXPHYADDR above 52, the architectural maximum', 'EFER.LMA set without CR0.PG and CR4.PAE'])
    """
    from .engine import as_guest_records

    g = as_guest_records(guests)
    cr0, cr4, efer = g["cr0"], g["cr4"], g["efer"]
    mpa = g["maxphyaddr"].astype(np.int32)

    def bit(x: np.ndarray, b: int) -> np.ndarray:
        return (x >> np.uint64(b)) & np.uint64(1) != 0

    pg, pe, cd, nw = bit(cr0, 31), bit(cr0, 0), bit(cr0, 30), bit(cr0, 29)
    pae = bit(cr4, 5)
    lma, lme = bit(efer, 10), bit(efer, 8)
    conds = {
        0: mpa > 52,
        1: mpa < 32,
        2: (mpa > host.shadow_phys_bits) if host is not None else np.zeros(g.shape, bool),
        3: lma & ~(pg & pae),
        4: lma & ~lme,
        5: pg & ~pe,
        6: nw & ~cd,
        7: (cr0 >> np.uint64(32)) != 0,
        8: (cr4 & np.uint64(~_CR4_DEFINED & (2**64 - 1))) != 0,
        9: (efer & np.uint64(~_EFER_DEFINED & (2**64 - 1))) != 0,
    }
    reasons = np.zeros(g.shape, dtype=np.uint32)
    for b, c in conds.items():
        reasons |= c.astype(np.uint32) << np.uint32(b)
    return ArchitecturalCheck(reasons)


def require_architectural(guests: np.ndarray, host: Optional[HostConfig]) -> None:
    """Raise ValueError on the first state that check_architectural rejects."""
    chk = check_architectural(guests, host)
    bad = np.flatnonzero(chk.reasons.reshape(-1))
    if bad.size:
        i = int(bad[0])
        if chk.reasons.ndim <= 1:
            idx: Any = i
        else:
            idx = tuple(int(k) for k in np.unravel_index(i, chk.reasons.shape))
        flat = ArchitecturalCheck(chk.reasons.reshape(-1))
        raise ValueError(f"strict: state {idx} is not architectural: "
                         + "; ".join(flat.explain(i)))
