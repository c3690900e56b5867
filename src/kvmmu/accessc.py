"""kvm-unit-tests ``x86/access.c``'s flag space, judged by KVM's walker and by access.c.

access.c (kvm-unit-tests, GPL-2.0; see ``docs/access-c-model.md``) runs every
legal 31-bit flag word inside a VM and compares what happens with its own
prediction. This module reproduces that space without a VM:

* :func:`enumerate` lists the words of its main loop (in its counting order),
  :func:`count` counts them without listing;
* :func:`inputs` turns words into :data:`kvmmu.access.ACCESS_DTYPE` records
  (the walk ``ac_test_setup_ptes()`` builds, the CPU state, PKRU, the access);
* :func:`verdicts` gives KVM's verdict (``kvmmu.access`` rules, ``twice``
  included) straight from the words — the compiled core builds each walk on
  the fly, so no input records are materialised;
* :func:`predict` is access.c's own expectation (error code and the A/D bits
  it checks), written from the doc's prediction rules, independently of KVM's
  tables; :func:`agreement` compares the two the way access.c does.

Bit *i* of a word is ``NAMES[i]``.

>>> from kvmmu import accessc
>>> accessc.count(46, pku=False)
1916928
>>> w = accessc.word("pte.p", "pde.p", "pde.rw", "pde.user", "user", "write")
>>> r = accessc.verdicts([w], 46)            # a user write to a read-only PTE
>>> bool(r["fault"][0]), hex(int(r["error_code"][0]))
(True, '0x7')
>>> p = accessc.predict([w], 46)
>>> bool(accessc.agreement(r, p, [w])[0])
True
"""
from __future__ import annotations

import builtins
from typing import Any, Iterable, Optional, Tuple

import numpy as np

from . import _core, engine
from .access import ACCESS_DTYPE, PFEC_FETCH, PFEC_PRESENT, PFEC_PK, \
    PFEC_RSVD, PFEC_USER, PFEC_WRITE, _prepare_out, access_params
from .engine import _threads

__all__ = [
    "NAMES",
    "NR_FLAGS",
    "PREDICT_DTYPE",
    "word",
    "describe",
    "env_mask",
    "enumerate",
    "count",
    "inputs",
    "verdicts",
    "predict",
    "agreement",
    "chunks",
    "MAIN_COUNTS",
    "LEGACY_SMEP_EXTRA",
]

#: access.c's flag names, by bit.
NAMES = (
    "pte.rw", "pte.user", "pte.a", "pte.d", "pte.nx", "pte.p", "pte.51", "pte.36",
    "pde.rw", "pde.user", "pde.a", "pde.d", "pde.pse", "pde.nx", "pde.p", "pde.51", "pde.36",
    "pde.13",
    "pdpte.ro",
    "pkru.ad", "pkru.wd", "pkey=1",
    "user", "write", "fetch", "twice",
    "efer.nx", "cr0.wp", "cr4.smep", "cr4.pke",
    "fep",
)
NR_FLAGS = len(NAMES)
_BIT = {n: i for i, n in builtins.enumerate(NAMES)}

(PTE_RW, PTE_USER, PTE_A, PTE_D, PTE_NX, PTE_P, PTE_51, PTE_36,
 PDE_RW, PDE_USER, PDE_A, PDE_D, PDE_PSE, PDE_NX, PDE_P, PDE_51, PDE_36, PDE_13,
 PDPTE_RO, PKU_AD, PKU_WD, PKEY, USER, WRITE, FETCH, TWICE,
 EFER_NX, CR0_WP, CR4_SMEP, CR4_PKE, FEP) = range(NR_FLAGS)

#: Main-loop sizes from the doc, by (MAXPHYADDR, PKU): (words, of which fault).
MAIN_COUNTS = {
    (36, True): (28_999_680, 26_885_664),
    (36, False): (2_899_968, 2_667_072),
    (46, True): (19_169_280, 17_637_664),
    (46, False): (1_916_928, 1_748_544),
}
#: Words the pre-2021 SMEP rule adds (CR4.SMEP=1 without a user access).
LEGACY_SMEP_EXTRA = {(36, True): 14_499_840, (36, False): 1_449_984,
                     (46, True): 9_584_640, (46, False): 958_464}

#: access.c's expectation for one word: whether it faults, the error code (0
#: without a fault), the PTE and PDE it expects afterwards (``pte`` is 0 with a
#: 2 MiB page: there is no PTE) and the PDE bits it does not check.
PREDICT_DTYPE = np.dtype(
    [
        ("fault", np.bool_),
        ("error_code", np.uint16),
        ("pte", np.uint64),
        ("pde", np.uint64),
        ("pde_ignore", np.uint64),
    ],
    align=True,
)

_LOW_BITS = 18                 # PTE and PDE flags: bits 0..17
_RESERVED_FLAGS = ((1 << PTE_51) | (1 << PTE_36) | (1 << PDE_51) | (1 << PDE_36) | (1 << PDE_13))
_NX_FLAGS = (1 << PTE_NX) | (1 << PDE_NX)

# Where access.c puts things (the kernel side uses the same values).
AC_DATA = 0x2000000            # code/data page, 32 MiB
AC_TABLES = 0x2100000          # paging structures, from 33 MiB
_U64 = np.uint64


def word(*names: str) -> int:
    """The flag word with the named flags set.

    >>> hex(word("pte.p", "write"))
    '0x800020'
    """
    w = 0
    for n in names:
        if n not in _BIT:
            raise ValueError(f"unknown access.c flag {n!r}; flags are {list(NAMES)}")
        w |= 1 << _BIT[n]
    return w


def describe(w: int) -> str:
    """access.c's way of showing a word: the names of its set flags.

    >>> describe(0x800020)
    'pte.p write'
    """
    return " ".join(NAMES[i] for i in range(NR_FLAGS) if (int(w) >> i) & 1)


def env_mask(maxphyaddr: int, pku: bool, smep: bool = False, fep: bool = False) -> int:
    """access.c's ``invalid_mask``: flags never set in this environment."""
    m = 0
    if maxphyaddr >= 52:
        m |= (1 << PDE_51) | (1 << PTE_51)
    if maxphyaddr >= 37:
        m |= (1 << PDE_36) | (1 << PTE_36)
    if not fep:
        m |= 1 << FEP
    if not pku:
        m |= (1 << PKU_AD) | (1 << PKU_WD) | (1 << PKEY) | (1 << CR4_PKE)
    if not smep:
        m |= 1 << CR4_SMEP
    return m


def _check_env(maxphyaddr: Any, pku: Any, smep: Any, fep: Any, legacy_smep: Any) -> int:
    if isinstance(maxphyaddr, bool) or not isinstance(maxphyaddr, (int, np.integer)):
        raise TypeError(f"maxphyaddr must be an int, got {maxphyaddr!r}")
    if not 1 <= int(maxphyaddr) <= 64:
        raise ValueError(f"maxphyaddr must be in [1, 64], got {int(maxphyaddr)}")
    for name, v in (("pku", pku), ("smep", smep), ("fep", fep), ("legacy_smep", legacy_smep)):
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    return int(maxphyaddr)


def _bit(w: np.ndarray, i: int) -> np.ndarray:
    return ((w >> np.uint32(i)) & np.uint32(1)).astype(bool)


def _parts(maxphyaddr: int, pku: bool, smep: bool, fep: bool, legacy_smep: bool):
    """Legal low halves (PTE/PDE flags, per EFER.NX) and legal high halves."""
    inv = env_mask(maxphyaddr, pku, smep, fep)
    low = np.arange(1 << _LOW_BITS, dtype=np.uint32)
    low = low[(low & np.uint32(inv)) == 0]
    low = low[~(_bit(low, PDE_13) & ~_bit(low, PDE_PSE))]      # pde.13 needs pde.pse
    lows = []
    for nx in (0, 1):
        rmask = _RESERVED_FLAGS | (0 if nx else _NX_FLAGS)
        r = low & np.uint32(rmask)
        lows.append(low[(r & (r - np.uint32(1))) == 0])         # at most one reserved flag
    high = np.arange(1 << (NR_FLAGS - _LOW_BITS), dtype=np.uint32) << np.uint32(_LOW_BITS)
    high = high[(high & np.uint32(inv)) == 0]
    ok = ~(_bit(high, FETCH) & _bit(high, WRITE))
    ok &= ~((_bit(high, PKU_AD) | _bit(high, PKU_WD)) & ~_bit(high, CR4_PKE))
    if legacy_smep:
        ok &= ~(_bit(high, USER) & _bit(high, CR4_SMEP))          # pre-2021 rule
    else:
        ok &= ~_bit(high, CR4_SMEP)                               # since 2021: never
    return lows, high[ok]


def count(maxphyaddr: int, pku: bool, smep: bool = False, fep: bool = False,
          legacy_smep: bool = False) -> int:
    """How many words :func:`enumerate` returns, without listing them.

    >>> [count(m, p) for m in (36, 46) for p in (True, False)]
    [28999680, 2899968, 19169280, 1916928]
    """
    mp = _check_env(maxphyaddr, pku, smep, fep, legacy_smep)
    lows, high = _parts(mp, bool(pku), bool(smep), bool(fep), bool(legacy_smep))
    nx = _bit(high, EFER_NX)
    return int(np.count_nonzero(~nx)) * lows[0].size + int(np.count_nonzero(nx)) * lows[1].size


def enumerate(maxphyaddr: int, pku: bool, smep: bool = False, fep: bool = False,
              legacy_smep: bool = False) -> np.ndarray:
    """The flag words access.c's main loop runs, in its (increasing) order, as uint32.

    ``maxphyaddr`` and ``pku`` describe the CPU; ``smep``: the CPU has SMEP
    (``cr4.smep`` may be set); ``fep``: forced emulation requested (doubles
    the space); ``legacy_smep``: the pre-2021 legality rule, which runs
    CR4.SMEP=1 words except with a user access (needs ``smep=True`` to add
    anything).

    >>> w = enumerate(46, pku=False)
    >>> w.size, describe(w[1]), bool((np.diff(w) > 0).all())
    (1916928, 'pte.rw', True)
    >>> describe(w[-1])
    'pte.rw pte.user pte.a pte.d pte.nx pte.p pde.rw pde.user pde.a pde.d pde.pse pde.nx pde.p pde.13 pdpte.ro user fetch twice efer.nx cr0.wp'
    """
    mp = _check_env(maxphyaddr, pku, smep, fep, legacy_smep)
    lows, high = _parts(mp, bool(pku), bool(smep), bool(fep), bool(legacy_smep))
    nx = _bit(high, EFER_NX).astype(np.int8)
    # high is sorted; within a run of equal EFER.NX the words are the outer
    # product of the run and that NX's low halves, already in order.
    cuts = np.flatnonzero(np.diff(nx)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [high.size]))
    total = int(sum((e - s) * lows[int(nx[s])].size for s, e in zip(starts, ends)))
    out = np.empty(total, dtype=np.uint32)
    pos = 0
    for s, e in zip(starts, ends):
        lo = lows[int(nx[s])]
        k = (e - s) * lo.size
        np.bitwise_or(high[s:e, None], lo[None, :], out=out[pos:pos + k].reshape(e - s, lo.size))
        pos += k
    return out


def _as_flags(flags: Any, name: str = "flags") -> np.ndarray:
    arr = np.asarray(flags)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of access.c flag words, "
                        f"got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size and arr.dtype == np.uint32:
        # the common case, one pass: only the top bit can be wrong
        if int(flat.max()) >= (1 << NR_FLAGS):
            i = int(np.flatnonzero(flat >= np.uint32(1 << NR_FLAGS))[0])
            raise ValueError(f"{name}[{i}] = {int(flat[i])} is not a {NR_FLAGS}-bit access.c "
                             f"flag word")
    elif flat.size:
        bad = np.flatnonzero((flat < 0) | (flat >= (1 << NR_FLAGS)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}[{i}] = {int(flat[i])} is not a {NR_FLAGS}-bit access.c "
                             f"flag word")
    return np.ascontiguousarray(flat, dtype=np.uint32)


def _check_levels(levels: Any) -> int:
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) \
            or int(levels) not in (4, 5):
        raise ValueError(f"levels must be 4 or 5 (access.c's two paging modes), got {levels!r}")
    return int(levels)


def _check_maxphyaddr(maxphyaddr: Any) -> int:
    return _check_env(maxphyaddr, False, False, False, False)


def _entries(f: np.ndarray, levels: int) -> np.ndarray:
    """The walk of each word, shape (n, 5): gpte[level-1] as ac_test_setup_ptes() builds it."""
    def b(i):
        return ((f >> np.uint32(i)) & np.uint32(1)).astype(np.uint64)

    n = f.size
    g = np.zeros((n, 5), dtype=np.uint64)
    if levels == 5:
        g[:, 4] = AC_TABLES | 7
        g[:, 3] = (AC_TABLES + 0x1000) | 7
        pdpte = (AC_TABLES + 0x2000) | 5
        table = AC_TABLES + 0x3000
    else:
        g[:, 3] = AC_TABLES | 7
        pdpte = (AC_TABLES + 0x1000) | 5
        table = AC_TABLES + 0x2000
    g[:, 2] = _U64(pdpte) | ((b(PDPTE_RO) ^ _U64(1)) << _U64(1))
    pse = b(PDE_PSE)
    key = b(PKEY)
    pde = np.where(pse == 1, _U64(AC_DATA | 0x80) | (key << _U64(59)),
                   _U64(table) | ((key * _U64(2)) << _U64(59)))
    pde |= (b(PDE_P) | (b(PDE_RW) << _U64(1)) | (b(PDE_USER) << _U64(2))
            | (b(PDE_A) << _U64(5)) | (b(PDE_D) << _U64(6)) | (b(PDE_NX) << _U64(63))
            | (b(PDE_51) << _U64(51)) | (b(PDE_36) << _U64(36)) | (b(PDE_13) << _U64(13)))
    g[:, 1] = pde
    pte = (_U64(AC_DATA) | (key << _U64(59)) | b(PTE_P) | (b(PTE_RW) << _U64(1))
           | (b(PTE_USER) << _U64(2)) | (b(PTE_A) << _U64(5)) | (b(PTE_D) << _U64(6))
           | (b(PTE_NX) << _U64(63)) | (b(PTE_51) << _U64(51)) | (b(PTE_36) << _U64(36)))
    g[:, 0] = np.where(pse == 1, _U64(0), pte)
    return g


def inputs(flags: Any, maxphyaddr: int, levels: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """The access each word tests, as ACCESS_DTYPE records, and its ``twice`` flag.

    Records: CR0 = PG|ET|PE plus WP; CR4 = PAE (+LA57 for 5 levels) plus
    SMEP/PKE; EFER = LME|LMA plus NX; guest CPUID: ``maxphyaddr``, Intel,
    1 GiB pages. PKRU with CR4.PKE: key 1 AD/WD from the flags, key 2
    AD=WD=1 (0x30); without: 0xfffffffc (what access.c leaves). ``pfec`` is
    the access (user/write/fetch), ``smap_override`` False (CR4.SMAP is never
    set). Entries: PML5E/PML4E P|W|U, PDPTE P|U (+W unless ``pdpte.ro``),
    the PDE and PTE from the flags (``gpte[0]`` is 0 under a 2 MiB page);
    leaf key 1 with ``pkey=1``, non-leaf PDE key 2.

    Where ``twice`` is set access.c first does a supervisor read of the same
    address and carries the A bits it set into the access under test:
    :func:`verdicts` does that; with these records alone, run the read first
    (``pfec`` 0) and feed its ``gpte_after`` back.

    >>> a, twice = inputs([word("pde.p", "pde.pse", "write", "twice")], 46)
    >>> hex(int(a["gpte"][0, 1])), int(a["pfec"][0]), bool(twice[0])
    ('0x2000081', 2, True)
    """
    f = _as_flags(flags)
    mp = _check_maxphyaddr(maxphyaddr)
    lv = _check_levels(levels)
    n = f.size
    a = np.zeros(n, dtype=ACCESS_DTYPE)

    def b(i):
        return ((f >> np.uint32(i)) & np.uint32(1)).astype(np.uint64)

    a["cr0"] = _U64(0x80000011) | (b(CR0_WP) << _U64(16))
    a["cr4"] = (_U64(0x20 | (0x1000 if lv == 5 else 0)) | (b(CR4_SMEP) << _U64(20))
                | (b(CR4_PKE) << _U64(22)))
    a["efer"] = _U64(0x500) | (b(EFER_NX) << _U64(11))
    a["maxphyaddr"] = mp
    a["guest_amd"] = False
    a["guest_gbpages"] = True
    pke = b(CR4_PKE).astype(bool)
    a["pkru"] = np.where(pke, (0x30 | (b(PKU_WD) << _U64(3)) | (b(PKU_AD) << _U64(2))).astype(np.uint32),
                         np.uint32(0xFFFFFFFC))
    a["pfec"] = ((b(WRITE) << _U64(1)) | (b(USER) << _U64(2)) | (b(FETCH) << _U64(4))).astype(np.uint8)
    a["smap_override"] = False
    a["gpte"] = _entries(f, lv)
    return a, b(TWICE).astype(bool)


def verdicts(flags: Any, maxphyaddr: int, levels: int = 4, *, version: str = "v5.17",
             flavor: str = "tdp", host: Any = None, out: Optional[np.ndarray] = None,
             threads: Optional[int] = None) -> np.ndarray:
    """KVM's verdict on each word's access (``twice`` handled), ACCESS_RESULT_DTYPE, 1-D.

    Same records and rules as ``access_verdicts(inputs(flags, ...))``, but
    each walk is built inside the compiled core from the word (the 16 CPU
    states of the space each get one ``init_one`` context), so the only
    memory is ``flags`` and the result. For the whole space pass chunks and a
    reused ``out=`` (a prefix slice of a larger buffer is fine).

    >>> r = verdicts([word("pde.p", "pde.36")], 36)   # bit 36 above MAXPHYADDR
    >>> int(r["error_code"][0]), int(r["level"][0]), int(r["kind"][0])
    (9, 2, 2)
    """
    f = _as_flags(flags)
    mp = _check_maxphyaddr(maxphyaddr)
    lv = _check_levels(levels)
    params = access_params(version, flavor, host)
    nthreads = _threads(threads)
    res = _prepare_out(out, f.shape)
    _core.accessc_verdicts(f, res.view(np.uint8), f.size, mp, lv, params, nthreads,
                           engine.PARALLEL_MIN)
    return res


def predict(flags: Any, maxphyaddr: int, levels: int = 4) -> np.ndarray:
    """access.c's own expectation for each word (PREDICT_DTYPE), from its rules alone.

    Error code: P plus the access's U/W/FETCH; a not-present PDE or PTE
    (PDE first) clears P, a reserved flag on a present one (bit 51, bit 36,
    bit 13 of a 2 MiB PDE, NX without EFER.NX) adds RSVD; otherwise the
    rights AND over PDPTE (W), PDE and PTE: a user access to a supervisor
    page, a write to a read-only page unless a supervisor write with
    CR0.WP=0, a fetch from a non-executable page, a supervisor fetch from a
    user page with SMEP fault; protection keys (CR4.PKE, user page, not a
    fetch, leaf key 1) add PK on AD, or on WD for a write unless a supervisor
    write with CR0.WP=0. FETCH is dropped without EFER.NX and CR4.SMEP.
    Expected entries: on success the leaf gets A (and D on a write), a
    non-leaf PDE that was reached gets A, and with a fault a PDE whose
    ``pde.a`` flag is clear has its A bit unchecked. ``twice`` first applies
    a supervisor read's expectations.

    ``levels`` (4 or 5) only places the page tables, hence the PDE's address.
    Bits 36 and 51 are always "reserved" to access.c, so words that set them
    where this MAXPHYADDR makes them address bits (outside the space
    :func:`enumerate` lists) are refused.

    >>> p = predict([word("pte.p", "pde.p", "pde.rw", "pte.rw", "write")], 46)
    >>> bool(p["fault"][0]), hex(int(p["pte"][0]))      # supervisor pages, CPL 0: fine
    (False, '0x2000063')
    """
    f = _as_flags(flags)
    mp = _check_maxphyaddr(maxphyaddr)
    lv = _check_levels(levels)
    inv = env_mask(mp, True, True, True) & _RESERVED_FLAGS
    if f.size and inv:
        bad = np.flatnonzero(f & np.uint32(inv))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"flags[{i}] = {describe(int(f[i]))!r} sets an address bit that is "
                             f"not reserved with MAXPHYADDR {mp}; access.c never runs it")
    n = f.size
    g = _entries(f, lv)
    cache = {}

    def F(i):
        v = cache.get(i)
        if v is None:
            v = cache[i] = ((f >> np.uint32(i)) & np.uint32(1)).astype(bool)
        return v

    def u16(b, bit):
        return b.astype(np.uint16) << np.uint16(bit.bit_length() - 1)

    pse = F(PDE_PSE)
    nxe = F(EFER_NX)
    # ac_emulate_access(): the parts that do not depend on the access type
    pde_rsvd = F(PDE_51) | F(PDE_36) | F(PDE_13) | (F(PDE_NX) & ~nxe)
    pde_valid = F(PDE_P) & ~pde_rsvd
    reach_pt = pde_valid & ~pse                      # a non-leaf PDE was used: A expected
    pte_rsvd = F(PTE_51) | F(PTE_36) | (F(PTE_NX) & ~nxe)
    pte_valid = F(PTE_P) & ~pte_rsvd
    not_present = ~F(PDE_P) | (reach_pt & ~F(PTE_P))
    reserved = (F(PDE_P) & pde_rsvd) | (reach_pt & F(PTE_P) & pte_rsvd)
    leaf = (pde_valid & pse) | (reach_pt & pte_valid)
    writable = ~F(PDPTE_RO) & F(PDE_RW) & (pse | F(PTE_RW))
    userpage = F(PDE_USER) & (pse | F(PTE_USER))
    executable = ~F(PDE_NX) & (pse | ~F(PTE_NX))
    keyed = userpage & F(PKEY) & F(CR4_PKE)

    def emulate(user, write, fetch):
        # ac_test_permissions() at the leaf; returns (fault, error code, leaf ok)
        kwritable = ~F(CR0_WP) & ~user
        pk = keyed & ~fetch & (F(PKU_AD) | (write & F(PKU_WD) & ~kwritable))
        pf = (user & ~userpage) | (write & ~writable & ~kwritable) | (fetch & ~executable) \
            | (fetch & userpage & F(CR4_SMEP)) | pk
        ok = leaf & ~pf
        err = (u16(~not_present, PFEC_PRESENT) | u16(reserved, PFEC_RSVD)
               | u16(user, PFEC_USER) | u16(write, PFEC_WRITE)
               | u16(fetch & (nxe | F(CR4_SMEP)), PFEC_FETCH) | u16(leaf & pk, PFEC_PK))
        return ~ok, err, ok

    A, AD = _U64(0x20), _U64(0x60)
    pte_exp = g[:, 0].copy()
    pde_exp = g[:, 1] | np.where(reach_pt, A, _U64(0))
    twice = F(TWICE)
    if twice.any():
        # the supervisor read first: only its expected A bits carry over
        zero = np.zeros(n, dtype=bool)
        _, _, ok0 = emulate(zero, zero, zero)
        ok0 &= twice
        pte_exp |= np.where(ok0 & ~pse, A, _U64(0))
        pde_exp |= np.where(ok0 & pse, A, _U64(0))
    user, write = F(USER), F(WRITE)
    fault, err, ok = emulate(user, write, F(FETCH))
    adbits = np.where(write, AD, A)
    pte_exp |= np.where(ok & ~pse, adbits, _U64(0))
    pde_exp |= np.where(ok & pse, adbits, _U64(0))
    out = np.empty(n, dtype=PREDICT_DTYPE)
    out["fault"] = fault
    out["error_code"] = np.where(fault, err, np.uint16(0))
    out["pte"] = np.where(pse, _U64(0), pte_exp)
    out["pde"] = pde_exp
    # with a fault, a PDE whose pde.a flag is clear has its A bit unchecked
    out["pde_ignore"] = np.where(fault & ~F(PDE_A), A, _U64(0))
    return out


def agreement(results: np.ndarray, prediction: np.ndarray, flags: Any) -> np.ndarray:
    """Per word: does KVM's verdict pass access.c's checks (``ac_test_do_access``)?

    Fault vs no fault, the error code when both fault, the PTE exactly (when
    there is one) and the PDE except ``pde_ignore``.
    """
    f = _as_flags(flags)
    if results.shape != f.shape or prediction.shape != f.shape:
        raise ValueError("results, prediction and flags must have the same length")
    pse = ((f >> np.uint32(PDE_PSE)) & np.uint32(1)).astype(bool)
    ok = results["fault"] == prediction["fault"]
    ok &= ~results["fault"] | (results["error_code"] == prediction["error_code"])
    after = results["gpte_after"]
    ok &= pse | (after[:, 0] == prediction["pte"])
    keep = ~prediction["pde_ignore"]
    ok &= (after[:, 1] & keep) == (prediction["pde"] & keep)
    return ok


def chunks(words: np.ndarray, size: int = 1 << 20) -> Iterable[np.ndarray]:
    """Consecutive slices of ``words`` of at most ``size`` (for bounded-memory runs)."""
    for s in range(0, words.size, size):
        yield words[s:s + size]
