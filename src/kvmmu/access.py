"""Access verdicts: does a guest access fault, and with which error code, as KVM judges it.

One record per access: the paging registers and guest CPUID bits that select
an MMU context, PKRU, the access type (a page-fault error code with only W, U
and FETCH), the SMAP override and the guest entry met at each level of the
walk. :func:`access_verdicts` walks the entries the way KVM's guest walker
does (``FNAME(walk_addr_generic)`` in ``arch/x86/kvm/mmu/paging_tmpl.h``, with
``permission_fault()`` from ``arch/x86/kvm/mmu.h``) on the tables of the
context that :func:`kvmmu.init_mmu` computes for the same state, ``version``,
``flavor`` and ``host``: the guest reserved-bit table, ``permissions[16]``,
``pkru_mask`` and the role bits the walker reads.

Rules reproduced (both kernel versions share them):

* The walk starts at the guest paging level of (CR0, CR4, EFER): 2 (32-bit,
  4-byte entries: only bits 31:0 of each ``gpte`` are read; bits 63:32 are
  passed through unchanged), 3 (PAE), 4 or 5. Paging off never faults
  (``level`` 0, entries unchanged).
* PAE (3 levels): the walk reads the PDPTE for the address (``gpte[2]``) the
  way KVM reads its PDPTR registers: only the present bit is tested; a clear
  P ends the walk with a not-present fault at level 3. **Reserved bits of a
  PAE PDPTE are not tested here**: KVM validates them when the PDPTEs are
  loaded (``load_pdptrs()`` at MOV to CR3/CR0/CR4, which fails with #GP), so
  the walker never meets one; check ``guest_rsvd[0][2]`` of the context
  yourself if your PDPTE might not be loadable. The PDPTE carries no access
  rights and is never given the A bit.
* Top-down, per entry: not present (P = 0) beats a reserved bit
  (``entry & guest_rsvd[bit 7][level-1]``), which beats everything below.
  The walk ends at level 1, or at an entry with bit 7 set (32-bit paging:
  only at level 2 and only with CR4.PSE).
* Effective rights are the AND of W and U over the walked entries; the page
  is executable when no walked entry has bit 63 (XD) set — XD itself is a
  reserved bit without EFER.NX (the table says so). The leaf's protection key
  is bits 62:59 (64-bit entries only).
* ``permission_fault()``: ``permissions[(pfec | smap_override << 3) >> 1]``
  bit ``ACC`` (exec 1, write 2, user 4) says whether the rights fault; with a
  non-zero ``pkru_mask`` (CR4.PKE in long mode) PKRU's AD/WD bits for the key
  fault the access too and set PK — also when the rights alone fault.
* Error code: not present 0, reserved bit RSVD|P, rights P, key P|PK; the
  access's W and U are always added, FETCH only when the role has EFER.NX or
  CR4.SMEP.
* On success: if some walked entry lacks A (or, on a write, the leaf lacks D)
  every walked entry gets A and a written leaf gets D
  (``update_accessed_dirty_bits``, memslots assumed writable). On a fault no
  entry changes.

``smap_override`` is the walker's "SMAP checks overridden" input: v5.17
computes it as CPL < 3 and EFLAGS.AC = 1, v6.16 as EFLAGS.AC = 1 on an
explicit (not implicit) access; both are covered by passing the bool.

States no KVM walker can be in are refused: EFER.LMA = 1 with CR0.PG = 1 and
CR4.PAE = 0 (KVM_SET_SREGS rejects it; v5.17 would then run the 32-bit walker
from a 4-level root, v6.16 stops on KVM_BUG_ON), and flavor ``shadow_ept``
(its guest tables are EPT tables, not x86 page tables).

>>> import kvmmu
>>> from kvmmu.access import accesses, access_verdicts, PFEC_WRITE, PFEC_USER
>>> # 4-level paging, CR0.WP=1; PML4E/PDPTE/PDE/PTE present+writable+user,
>>> # except that the PTE is read-only: a user write must fault with P|W|U.
>>> a = accesses(cr0=0x80010001, cr4=0x20, efer=0xd00, maxphyaddr=46,
...              pfec=[PFEC_USER, PFEC_USER | PFEC_WRITE],
...              gpte=[0x1005, 0x2007, 0x3007, 0x4007, 0])
>>> r = access_verdicts(a)
>>> r["fault"].tolist(), r["error_code"].tolist(), r["kind"].tolist()
([False, True], [0, 7], [0, 3])
>>> hex(int(r["gpte_after"][0, 0]))       # the read set A on the PTE ...
'0x1025'
>>> int(r["gpte_after"][1, 0]) == 0x1005  # ... the faulting write changed nothing
True
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core, engine
from .engine import _threads, make_params

__all__ = [
    "ACCESS_DTYPE",
    "ACCESS_RESULT_DTYPE",
    "KINDS",
    "PFEC_PRESENT",
    "PFEC_WRITE",
    "PFEC_USER",
    "PFEC_RSVD",
    "PFEC_FETCH",
    "PFEC_PK",
    "accesses",
    "access_verdicts",
    "decode_error_code",
]

#: Page-fault error code bits.
PFEC_PRESENT = 1
PFEC_WRITE = 2
PFEC_USER = 4
PFEC_RSVD = 8
PFEC_FETCH = 16
PFEC_PK = 32
_PFEC_ALLOWED = PFEC_WRITE | PFEC_USER | PFEC_FETCH
_PFEC_NAMES = ((PFEC_PRESENT, "P"), (PFEC_WRITE, "W"), (PFEC_USER, "U"), (PFEC_RSVD, "RSVD"),
               (PFEC_FETCH, "FETCH"), (PFEC_PK, "PK"))

#: ``kind`` values of ACCESS_RESULT_DTYPE, by index.
KINDS = ("ok", "not present", "reserved bit", "permission", "protection key",
         "permission and key")

#: One access per record. ``pfec`` holds the access type (W = bit 1, U = bit 2,
#: FETCH = bit 4); ``gpte[level-1]`` is the entry met at that level.
ACCESS_DTYPE = np.dtype(
    [
        ("cr0", np.uint64),
        ("cr4", np.uint64),
        ("efer", np.uint64),
        ("maxphyaddr", np.uint8),
        ("guest_amd", np.bool_),
        ("guest_gbpages", np.bool_),
        ("pkru", np.uint32),
        ("pfec", np.uint8),
        ("smap_override", np.bool_),
        ("gpte", np.uint64, (5,)),
    ],
    align=True,
)

#: One verdict per access. ``level``: where the walk stopped (the leaf, or the
#: entry that faulted; 0 with paging off). ``kind`` indexes :data:`KINDS`.
ACCESS_RESULT_DTYPE = np.dtype(
    [
        ("fault", np.bool_),
        ("error_code", np.uint16),
        ("level", np.uint8),
        ("kind", np.uint8),
        ("gpte_after", np.uint64, (5,)),
    ],
    align=True,
)

ACCESS_DEFAULTS = {
    "cr0": 0,
    "cr4": 0,
    "efer": 0,
    "maxphyaddr": 36,
    "guest_amd": False,
    "guest_gbpages": False,
    "pkru": 0,
    "pfec": 0,
    "smap_override": False,
    "gpte": 0,
}

_CR0_PG = 1 << 31
_CR4_PAE = 1 << 5
_EFER_LMA = 1 << 10


engine.check_record_layout(_core.access_layout(),
                           {"access": ACCESS_DTYPE, "result": ACCESS_RESULT_DTYPE})


def decode_error_code(code: int) -> str:
    """``'P|W|U'``-style names of the bits of a page-fault error code ('0' for none).

    >>> decode_error_code(0x27)
    'P|W|U|PK'
    """
    names = [n for b, n in _PFEC_NAMES if code & b]
    return "|".join(names) if names else "0"


def _index(shape, flat_i: int):
    if len(shape) <= 1:
        return int(flat_i)
    return tuple(int(v) for v in np.unravel_index(flat_i, shape))


def as_access_records(acc: Any, name: str = "acc") -> np.ndarray:
    """Check an ACCESS_DTYPE array (TypeError naming the field) and return it packed.

    Field order and padding may differ (it is repacked); names, types and
    shapes must match, in native byte order. The input is never modified.
    """
    return engine.as_records(acc, ACCESS_DTYPE, name, "kvmmu.access.ACCESS_DTYPE",
                             "kvmmu.access.accesses()")


def check_access_values(recs: np.ndarray, name: str = "acc") -> None:
    """ValueError for a pfec with bits other than W/U/FETCH, or long mode without PAE."""
    flat = recs.reshape(-1)
    if flat.size == 0:
        return
    pfec = flat["pfec"]
    bad = np.flatnonzero(pfec & ~np.uint8(_PFEC_ALLOWED))
    if bad.size:
        i = int(bad[0])
        v = int(pfec[i])
        raise ValueError(f"{name}[{_index(recs.shape, i)}].pfec = {v:#x} has bit(s) "
                         f"{decode_error_code(v & ~_PFEC_ALLOWED)}: only W (0x2), U (0x4) and "
                         f"FETCH (0x10) describe an access; P, RSVD and PK are outcomes")
    impossible = ((flat["cr0"] & np.uint64(_CR0_PG)) != 0) & \
        ((flat["efer"] & np.uint64(_EFER_LMA)) != 0) & ((flat["cr4"] & np.uint64(_CR4_PAE)) == 0)
    bad = np.flatnonzero(impossible)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{_index(recs.shape, i)}]: EFER.LMA=1 with CR0.PG=1 and "
                         f"CR4.PAE=0 is a state no KVM guest walker runs in "
                         f"(KVM_SET_SREGS refuses it)")


def _prepare_out(out: Optional[np.ndarray], shape) -> np.ndarray:
    return engine._prepare_out(out, shape, ACCESS_RESULT_DTYPE, "ACCESS_RESULT_DTYPE", "access",
                               dtype_error=TypeError)


def access_params(version: str, flavor: str, host: Any) -> dict:
    """The core's parameter block for access verdicts (checks version/flavor/host)."""
    if flavor == "shadow_ept":
        raise ValueError("flavor 'shadow_ept' walks EPT tables, which access verdicts do not "
                         "model; use one of 'tdp', 'shadow', 'shadow_npt', 'nested'")
    params, _, _, _ = make_params(flavor, host, None, version, "v517")
    return params


def accesses(**fields: Any) -> np.ndarray:
    """Build an ACCESS_DTYPE array from scalars and arrays, broadcast together.

    ``gpte`` broadcasts with a trailing axis of 5 (``gpte[..., level-1]``).
    Omitted fields: ``maxphyaddr`` 36, everything else 0. All scalars give a
    batch of one.

    >>> a = accesses(cr0=0x80000001, pfec=[0, 2], gpte=[0x1003, 0x2003, 0, 0, 0])
    >>> a.shape, hex(int(a["gpte"][1, 1]))
    ((2,), '0x2003')
    """
    unknown = set(fields) - set(ACCESS_DTYPE.names)
    if unknown:
        raise ValueError(f"accesses(): unknown field(s) {sorted(unknown)}; "
                         f"fields are {list(ACCESS_DTYPE.names)}")
    arrays = {}
    for n in ACCESS_DTYPE.names:
        v = fields.get(n, ACCESS_DEFAULTS[n])
        target = ACCESS_DTYPE.fields[n][0].base
        hi = 1 if target == np.bool_ else int(np.iinfo(target).max)
        if isinstance(v, np.ndarray):
            arr = v
        elif isinstance(v, (list, tuple)):
            # Python ints up to 2**64-1 must not be routed through float64
            arr = np.empty(len(v), dtype=object) if not v else np.array(v, dtype=object)
        else:
            arr = np.asarray(v, dtype=object) if isinstance(v, int) else np.asarray(v)
        if arr.dtype == object:
            for x in arr.ravel():
                if not isinstance(x, (int, np.integer, bool, np.bool_)):
                    raise TypeError(f"accesses(): field '{n}' must hold integers, "
                                    f"got {type(x).__name__}")
            flat = [int(x) for x in arr.ravel()]
            if any(not 0 <= x <= hi for x in flat):
                raise ValueError(f"accesses(): field '{n}' must be in [0, {hi}]")
            arr = np.array(flat, dtype=target).reshape(arr.shape)
        elif arr.dtype.kind not in "biu":
            raise TypeError(f"accesses(): field '{n}' must be integers, got dtype {arr.dtype}")
        elif arr.size and arr.dtype.kind != "b" and (arr.min() < 0 or int(arr.max()) > hi):
            raise ValueError(f"accesses(): field '{n}' must be in [0, {hi}]")
        if n == "gpte":
            if arr.ndim == 0:
                arr = np.broadcast_to(arr, (5,))
            if arr.shape[-1] != 5:
                raise ValueError(f"accesses(): gpte needs a trailing axis of 5 entries, "
                                 f"got shape {arr.shape}")
        arrays[n] = arr.astype(target)
    shapes = [a.shape[:-1] if n == "gpte" else a.shape for n, a in arrays.items()]
    shape = np.broadcast_shapes(*shapes)
    out = np.zeros(shape if shape else (1,), dtype=ACCESS_DTYPE)
    for n, a in arrays.items():
        out[n] = a
    return out


def access_verdicts(acc: np.ndarray, *, version: str = "v5.17", flavor: str = "tdp",
                    host: Any = None, out: Optional[np.ndarray] = None,
                    threads: Optional[int] = None) -> np.ndarray:
    """KVM's verdict on each access: fault, error code, where the walk stopped, A/D after.

    ``acc`` is an ACCESS_DTYPE array (any shape); the result is an
    ACCESS_RESULT_DTYPE array of the same shape (``out=`` reuses one).
    ``version`` (``"v5.17"``/``"v6.16"``), ``flavor`` (``tdp``, ``shadow``,
    ``shadow_npt``, ``nested``) and ``host`` (:class:`kvmmu.HostConfig`)
    select the context exactly as for :func:`kvmmu.init_mmu`; consecutive
    records with the same state share one init. ``threads`` defaults to
    OpenMP's; results do not depend on it.

    Raises TypeError for a wrong dtype (naming the field) and ValueError for a
    ``pfec`` with P, RSVD, PK or unknown bits, or a long-mode state without
    PAE (naming the index). See the module docstring for the rules.

    >>> import kvmmu
    >>> from kvmmu.access import accesses, access_verdicts, decode_error_code
    >>> # CR0.WP=0: a supervisor write to a read-only 2 MiB page succeeds ...
    >>> a = accesses(cr0=0x80000001, cr4=0x20, efer=0xd00, maxphyaddr=46, pfec=2,
    ...              gpte=[0, 0x200085, 0x3007, 0x4007, 0])
    >>> r = access_verdicts(a)
    >>> bool(r["fault"][0]), int(r["level"][0]), hex(int(r["gpte_after"][0][1]))
    (False, 2, '0x2000e5')
    >>> # ... and bit 13 of that 2 MiB PDE is reserved (RSVD|P|W).
    >>> a["gpte"][0, 1] |= 1 << 13
    >>> r = access_verdicts(a)
    >>> decode_error_code(int(r["error_code"][0])), kvmmu.access.KINDS[r["kind"][0]]
    ('P|W|RSVD', 'reserved bit')
    """
    recs = as_access_records(acc)
    params = access_params(version, flavor, host)
    check_access_values(recs)
    nthreads = _threads(threads)
    res = _prepare_out(out, recs.shape)
    n = recs.size
    _core.access_verdicts(recs.reshape(-1).view(np.uint8), res.reshape(-1).view(np.uint8), n,
                          params, nthreads, engine.PARALLEL_MIN)
    return res
