"""Sequences of vCPU states for :func:`kvmmu.replay`, modelled on what guests do.

Each generator returns a :class:`Workload`: GUEST_DTYPE states in order, plus
``invalidate`` (CPUID updates) and ``vcpu`` columns for replay.
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional

import numpy as np

from ._types import guests

# Architectural values (Intel SDM vol. 3, 9.1.1 and 2.5).
CR0_RESET = 0x60000010          # CD | NW | ET after RESET/INIT
CR0_PE, CR0_TS, CR0_ET, CR0_WP, CR0_PG = 1 << 0, 1 << 3, 1 << 4, 1 << 16, 1 << 31
CR0_MP, CR0_NE, CR0_AM = 1 << 1, 1 << 5, 1 << 18
CR4_PAE, CR4_PGE, CR4_OSFXSR = 1 << 5, 1 << 7, 1 << 9
CR4_SMEP, CR4_SMAP = 1 << 20, 1 << 21
EFER_SCE, EFER_LME, EFER_LMA, EFER_NX = 1 << 0, 1 << 8, 1 << 10, 1 << 11

LINUX_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG   # 0x80050033
LINUX_CR4 = CR4_PAE | CR4_PGE | CR4_OSFXSR | (1 << 10) | CR4_SMEP | CR4_SMAP
LINUX_EFER = EFER_SCE | EFER_LME | EFER_LMA | EFER_NX             # 0xd01

WORKLOADS = ("boot", "cr0wp_toggle", "context_switch", "cpuid_update", "random")


class Workload(NamedTuple):
    name: str
    guests: np.ndarray
    invalidate: np.ndarray
    vcpu: np.ndarray


def _make(name: str, g: np.ndarray, invalidate: Optional[np.ndarray] = None,
          vcpu: Optional[np.ndarray] = None) -> Workload:
    n = g.shape[0]
    return Workload(name, g,
                    np.zeros(n, bool) if invalidate is None else invalidate,
                    np.zeros(n, np.int64) if vcpu is None else vcpu)


def boot(steady_steps: int = 64, maxphyaddr: int = 46) -> Workload:
    """RESET -> protected mode -> PAE -> long mode -> NX, WP -> SMEP/SMAP, then
    ``steady_steps`` CR writes that leave the role alone (CR4.PGE flips for
    global TLB flushes, CR0.TS for lazy FPU): the case the guard exists for."""
    seq: List[tuple] = [
        (CR0_RESET, 0, 0),                                   # RESET
        (CR0_RESET | CR0_PE, 0, 0),                          # protected mode
        (CR0_PE | CR0_NE, 0, 0),                             # caches on
        (CR0_PE | CR0_NE, CR4_PAE, 0),                       # PAE
        (CR0_PE | CR0_NE, CR4_PAE, EFER_LME | EFER_SCE),     # LME
        (CR0_PE | CR0_NE | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA | EFER_SCE),  # long mode
        (CR0_PE | CR0_NE | CR0_PG, CR4_PAE, LINUX_EFER),     # NX
        (LINUX_CR0, CR4_PAE | CR4_PGE | CR4_OSFXSR, LINUX_EFER),   # WP, PGE, FXSR
        (LINUX_CR0, LINUX_CR4, LINUX_EFER),                  # SMEP/SMAP
    ]
    for i in range(steady_steps):
        cr4 = LINUX_CR4 & ~CR4_PGE if i % 2 == 0 else LINUX_CR4
        cr0 = LINUX_CR0 | CR0_TS if i % 4 == 1 else LINUX_CR0
        seq.append((cr0, cr4, LINUX_EFER))
    a = np.array(seq, dtype=np.uint64)
    return _make("boot", guests(cr0=a[:, 0], cr4=a[:, 1], efer=a[:, 2], maxphyaddr=maxphyaddr,
                                guest_gbpages=True))


def cr0wp_toggle(n: int = 1024, maxphyaddr: int = 46) -> Workload:
    """Steady long mode toggling CR0.WP every step (the W^X text-poke pattern)."""
    cr0 = np.where(np.arange(n) % 2 == 0, LINUX_CR0, LINUX_CR0 & ~CR0_WP).astype(np.uint64)
    return _make("cr0wp_toggle", guests(cr0=cr0, cr4=LINUX_CR4, efer=LINUX_EFER,
                                        maxphyaddr=maxphyaddr, guest_gbpages=True))


def context_switch(n: int = 1024, vcpus: int = 1, maxphyaddr: int = 46) -> Workload:
    """CR3-only changes: every init sees the same paging registers."""
    g = guests(cr0=np.full(n, LINUX_CR0, np.uint64), cr4=LINUX_CR4, efer=LINUX_EFER,
               maxphyaddr=maxphyaddr, guest_gbpages=True)
    return _make("context_switch", g, vcpu=np.arange(n, dtype=np.int64) % max(vcpus, 1))


def cpuid_update(n: int = 1024, every: int = 256, invalidate: bool = True,
                 maxphyaddrs=(46, 39, 52, 36), field: str = "maxphyaddr") -> Workload:
    """Steady state with a CPUID change every ``every`` steps: MAXPHYADDR (or,
    with ``field="guest_gbpages"``, 1 GiB page support) changes under an
    unchanged role, with or without kvm_mmu_after_set_cpuid's invalidation."""
    if field not in ("maxphyaddr", "guest_gbpages"):
        raise ValueError(f"field must be 'maxphyaddr' or 'guest_gbpages', got {field!r}")
    epoch = np.arange(n) // max(every, 1)
    mpa = np.asarray(maxphyaddrs, dtype=np.int64)[epoch % len(maxphyaddrs)] if field == "maxphyaddr" else 46
    gb = (epoch % 2 == 0) if field == "guest_gbpages" else True
    g = guests(cr0=np.full(n, LINUX_CR0, np.uint64), cr4=LINUX_CR4, efer=LINUX_EFER,
               maxphyaddr=mpa, guest_gbpages=gb)
    inv = np.zeros(n, bool)
    if invalidate:
        inv[1:] = epoch[1:] != epoch[:-1]
    return _make("cpuid_update", g, invalidate=inv)


def random(n: int = 1024, seed: int = 0, vcpus: int = 1, full_width: bool = False,
           vary_cpuid: bool = False) -> Workload:
    """Random states over the bits KVM consults (or full-width registers).

    Guest CPUID (MAXPHYADDR, vendor, 1 GiB pages) is drawn once per vCPU, as
    KVM refuses CPUID changes after the first KVM_RUN; ``vary_cpuid=True``
    draws it per step instead (with no invalidation: the guard then serves
    stale tables, which is the point of asking for it)."""
    rng = np.random.default_rng(seed)
    nv = max(vcpus, 1)
    vcpu = rng.integers(0, nv, n).astype(np.int64)
    if full_width:
        cr0, cr4, efer = (rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False) for _ in range(3))
    else:
        def pick(bits):
            return sum((rng.integers(0, 2, n).astype(np.uint64) << np.uint64(b)) for b in bits)
        cr0 = pick((0, 16, 31)).astype(np.uint64)
        cr4 = pick((4, 5, 12, 20, 21, 22)).astype(np.uint64)
        efer = pick((8, 10, 11)).astype(np.uint64)
    k = n if vary_cpuid else nv
    mpa = rng.choice([36, 39, 46, 52], k)
    amd = rng.integers(0, 2, k).astype(bool)
    gb = rng.integers(0, 2, k).astype(bool)
    sel = np.arange(n) if vary_cpuid else vcpu
    g = guests(cr0=cr0, cr4=cr4, efer=efer, maxphyaddr=mpa[sel], guest_amd=amd[sel],
               guest_gbpages=gb[sel], smm=rng.random(n) < 0.05, guest_mode=rng.random(n) < 0.1)
    return _make("random", g, vcpu=vcpu)


def workload(name: str, **kwargs: Any) -> Workload:
    """A built-in workload by name (``boot``, ``cr0wp_toggle``, ``context_switch``,
    ``cpuid_update``, ``random``) with its keyword arguments.

    >>> import kvmmu
    >>> w = kvmmu.workload("boot", steady_steps=4)
    >>> r = kvmmu.replay(w.guests, "tdp", invalidate=w.invalidate, vcpu=w.vcpu)
    >>> r.inits, r.recomputes
    (13, 5)
    """
    fns = {"boot": boot, "cr0wp_toggle": cr0wp_toggle, "context_switch": context_switch,
           "cpuid_update": cpuid_update, "random": random}
    if name not in fns:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    return fns[name](**kwargs)
