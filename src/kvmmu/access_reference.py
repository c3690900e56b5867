"""Plain-Python guest walk: the yardstick for :func:`kvmmu.access.access_verdicts`.

One access at a time, Python integers, no numpy. The reserved-bit table comes
from :mod:`kvmmu.reference` (the scalar model of KVM's context init, itself
independent of the compiled core); everything else is written here from the
architectural rules (Intel SDM vol. 3, 4.6 "Access rights" and 4.6.2
"Protection keys") plus the few places where KVM's walker has its own
convention, without KVM's permission or PKRU bitmaps:

* the PAE PDPTE is only tested for P (KVM checked its reserved bits when it
  loaded the PDPTRs) and gets no A bit;
* FETCH is reported in the error code only when EFER.NX or CR4.SMEP is in
  effect (paging on);
* A is set on every walked entry and D on a written leaf, on success only,
  and not at all when they are already set;
* ``shadow_npt`` contexts ignore CR4.PKE (``kvm_init_shadow_npt_mmu``).

>>> from kvmmu.access_reference import walk
>>> r = walk(dict(cr0=0x80010001, cr4=0x20, efer=0xd00, maxphyaddr=46, pfec=6,
...               gpte=[0x1005, 0x2007, 0x3007, 0x4007, 0]))
>>> r["fault"], hex(r["error_code"]), r["level"], r["kind"]
(True, '0x7', 1, 3)
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from . import reference as ref
from ._types import HostConfig

__all__ = ["walk"]

U64 = (1 << 64) - 1
P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
XD = 1 << 63
EC_P, EC_W, EC_U, EC_RSVD, EC_I, EC_PK = 1, 2, 4, 8, 16, 32


def _bit(v: int, b: int) -> bool:
    return bool((v >> b) & 1)


_DEFAULTS = dict(cr0=0, cr4=0, efer=0, maxphyaddr=36, guest_amd=False, guest_gbpages=False,
                 pkru=0, pfec=0, smap_override=False, gpte=(0, 0, 0, 0, 0))


def _fields(acc: Any) -> dict:
    """ACCESS_DTYPE's fields from a mapping or a numpy record; omitted ones default."""
    names = getattr(getattr(acc, "dtype", None), "names", None)
    if names:
        return dict(_DEFAULTS, **{n: acc[n] for n in names})
    return dict(_DEFAULTS, **dict(acc))


def walk(acc: Mapping[str, Any], version: str = "v5.17", flavor: str = "tdp",
         host: Optional[HostConfig] = None) -> dict:
    """Verdict on one access record (a mapping with ACCESS_DTYPE's field names)."""
    host = host if host is not None else HostConfig()
    acc = _fields(acc)
    cr0, cr4, efer = int(acc["cr0"]) & U64, int(acc["cr4"]) & U64, int(acc["efer"]) & U64
    pfec = int(acc["pfec"])
    gpte = [int(v) & U64 for v in acc["gpte"]]
    guest = dict(cr0=cr0, cr4=cr4, efer=efer, maxphyaddr=int(acc["maxphyaddr"]),
                 guest_amd=int(bool(acc["guest_amd"])),
                 guest_gbpages=int(bool(acc["guest_gbpages"])), smm=0, guest_mode=0)
    ctx = ref.init_mmu_one(guest, flavor, host, version=version)
    rsvd = ctx["guest_rsvd"]
    after = list(gpte)
    ok = dict(fault=False, error_code=0, level=0, kind=0, gpte_after=after)

    pg, wp = _bit(cr0, 31), _bit(cr0, 16)
    pse, pae, la57 = _bit(cr4, 4), _bit(cr4, 5), _bit(cr4, 12)
    smep, smap, pke = _bit(cr4, 20), _bit(cr4, 21), _bit(cr4, 22)
    lma, nxe = _bit(efer, 10), _bit(efer, 11)
    if not pg:
        return ok
    if lma:
        levels = 5 if la57 else 4
    else:
        levels = 3 if pae else 2
    wide = levels >= 3
    pke = pke and lma and flavor != "shadow_npt"
    write, user, fetch = bool(pfec & EC_W), bool(pfec & EC_U), bool(pfec & EC_I)

    def fail(code: int, kind: int, level: int) -> dict:
        code |= pfec & (EC_W | EC_U)
        if fetch and (nxe or smep):
            code |= EC_I
        return dict(fault=True, error_code=code, level=level, kind=kind, gpte_after=list(gpte))

    level = levels
    if levels == 3:
        if not gpte[2] & P:
            return fail(0, 1, 3)
        level = 2
    top = level
    writable = usable = True
    executable = True
    all_accessed = True
    while True:
        e = gpte[level - 1] if wide else gpte[level - 1] & 0xFFFFFFFF
        if not e & P:
            return fail(0, 1, level)
        if e & rsvd[(e >> 7) & 1][level - 1]:
            return fail(EC_RSVD | EC_P, 2, level)
        writable = writable and bool(e & W)
        usable = usable and bool(e & U)
        if wide and e & XD:
            executable = False
        all_accessed = all_accessed and bool(e & A)
        if level == 1:
            break
        if e & PS and (wide or pse):
            break
        level -= 1
    leaf = e

    # SDM 4.6: access rights
    denied = False
    if user:
        denied |= not usable
        denied |= write and not writable
    else:
        denied |= write and not writable and wp
        denied |= fetch and usable and smep
        denied |= (not fetch) and usable and smap and not bool(acc["smap_override"])
    denied |= fetch and nxe and not executable
    # SDM 4.6.2: protection keys, data accesses to user pages
    keyed = False
    if pke and usable and not fetch:
        key = (leaf >> 59) & 15 if wide else 0
        bits = (int(acc["pkru"]) >> (2 * key)) & 3
        keyed = bool(bits & 1) or (bool(bits & 2) and write and (user or wp))
    if denied or keyed:
        kind = 5 if denied and keyed else (3 if denied else 4)
        return fail(EC_P | (EC_PK if keyed else 0), kind, level)

    if not all_accessed or (write and not leaf & D):
        for lv in range(top, level - 1, -1):
            after[lv - 1] |= A
        if write:
            after[level - 1] |= D
    return dict(fault=False, error_code=0, level=level, kind=0, gpte_after=after)
