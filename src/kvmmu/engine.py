"""Batch entry points: validation, dispatch into kvmmu._core, building blocks."""
from __future__ import annotations

import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._types import (
    CONTEXT_DTYPE,
    FLAVORS,
    GUEST_DTYPE,
    VERSIONS,
    EptConfig,
    HostConfig,
)
from .roles import unpack_role
from .variants import BUILTIN_VARIANTS, Variant, resolve_variant
from .arch import require_architectural

_BOOL_FIELDS = ("guest_amd", "guest_gbpages", "smm", "guest_mode")
#: Batches at least this long are split across OpenMP threads: below it the
#: fork/join and the barrier cost more than they save, badly so on a busy machine.
PARALLEL_MIN = 1 << 17


def check_record_layout(layout: Dict[str, Tuple[int, Dict[str, int]]],
                        dtypes: Dict[str, np.dtype]) -> None:
    """The C records and the numpy dtypes must agree byte for byte (checked at import)."""
    for key, dt in dtypes.items():
        size, offs = layout[key]
        got = {n: dt.fields[n][1] for n in dt.names}
        if dt.itemsize != size or got != offs:
            raise ImportError(f"kvmmu._core {key} record layout {size} {offs} does not match "
                              f"the dtype {dt.itemsize} {got}: rebuild the extension")


check_record_layout(_core.layout(), {"guest": GUEST_DTYPE, "context": CONTEXT_DTYPE})


def openmp_enabled() -> bool:
    """True when the compiled core uses OpenMP threads for large batches."""
    return _core.openmp_enabled()


# ---------------------------------------------------------------------------
# validation helpers

def _check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def as_records(arr: Any, dtype: np.dtype, name: str, label: str, builder: str) -> np.ndarray:
    """Validate a structured array against ``dtype`` (TypeError naming the field) and
    return it C-contiguous with exactly that dtype.

    Field order or padding may differ (it is repacked); names, field types and
    shapes must match, in native byte order. The input is never modified.
    """
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of {label} "
                        f"(build one with {builder}), got {type(arr).__name__}")
    dt = arr.dtype
    if dt.names is None:
        raise TypeError(f"{name} must have the structured dtype {label} "
                        f"(build one with {builder}), got dtype {dt}")
    missing = [n for n in dtype.names if n not in dt.names]
    extra = [n for n in dt.names if n not in dtype.names]
    if missing:
        raise TypeError(f"{name} dtype is missing field(s) {missing}; expected {label}")
    if extra:
        raise TypeError(f"{name} dtype has unexpected field(s) {extra}; expected {label}")
    for n in dtype.names:
        want = dtype.fields[n][0]
        got = dt.fields[n][0]
        if got != want or not got.base.isnative:
            shown = got.str if got.shape == () else str(got)
            raise TypeError(f"{name} field '{n}' must be {want} in native byte order, got {shown}")
    if dt == dtype and arr.flags.c_contiguous:
        return arr
    out = np.empty(arr.shape, dtype=dtype)
    for n in dtype.names:
        out[n] = arr[n]
    return out


def as_guest_records(guests: Any, name: str = "guests") -> np.ndarray:
    """Validate a GUEST_DTYPE array and return it C-contiguous with the exact dtype."""
    if type(guests) is np.ndarray and guests.dtype == GUEST_DTYPE and guests.flags.c_contiguous:
        return guests
    return as_records(guests, GUEST_DTYPE, name, "kvmmu.GUEST_DTYPE", "kvmmu.guests()")


def _guest_bytes(recs: np.ndarray) -> np.ndarray:
    return recs.reshape(-1).view(np.uint8)


def _prepare_out(out: Optional[np.ndarray], shape: Tuple[int, ...], dtype: np.dtype = CONTEXT_DTYPE,
                 label: str = "kvmmu.CONTEXT_DTYPE", unit: str = "state",
                 dtype_error: type = ValueError) -> np.ndarray:
    """A fresh result array, or ``out`` checked: right dtype, shape, C order, writeable."""
    shape = tuple(shape)
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array of {label}, got {type(out).__name__}")
    if out.dtype != dtype:
        raise dtype_error(f"out must have dtype {label}, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape} (one record per {unit}), got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    return out


_DEFAULT_HOST = HostConfig()
_DEFAULT_EPT = EptConfig()


def _as_host(host: Any) -> HostConfig:
    if host is None:
        return _DEFAULT_HOST
    if isinstance(host, HostConfig):
        return host
    if isinstance(host, dict):
        return HostConfig(**host)
    raise TypeError(f"host must be a kvmmu.HostConfig, got {type(host).__name__}")


def _as_ept(ept: Any) -> EptConfig:
    if ept is None:
        return _DEFAULT_EPT
    if isinstance(ept, EptConfig):
        return ept
    if isinstance(ept, dict):
        return EptConfig(**ept)
    raise TypeError(f"ept must be a kvmmu.EptConfig or None, got {type(ept).__name__}")


_FORKED_CHILD = False


def _after_fork_in_child() -> None:
    # libgomp's thread pool does not survive fork(): a child that enters a
    # parallel region hangs. Children of a process that used OpenMP run serial.
    global _FORKED_CHILD
    _FORKED_CHILD = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _threads(threads: Optional[int]) -> int:
    if _FORKED_CHILD:
        if threads is not None:
            _threads_checked(threads)
        return 1
    if threads is None:
        return _core.max_threads()
    return _threads_checked(threads)


def _threads_checked(threads: Any) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise TypeError(f"threads must be a positive int or None, got {threads!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


def make_params(flavor: str, host: Any, ept: Any, version: str,
                variant: Union[str, Variant]) -> Tuple[Dict[str, int], HostConfig, EptConfig, Variant]:
    """Check the batch-constant arguments and build the core's parameter block."""
    _check_choice("flavor", flavor, FLAVORS)
    _check_choice("version", version, VERSIONS)
    var = resolve_variant(variant)
    if version != "v5.17" and var is not BUILTIN_VARIANTS["v517"]:
        # v6.16 takes the NX assumption from root_role.efer_nx; there is nothing to vary
        raise ValueError(f"variant {var.name!r} applies to version 'v5.17' only; "
                         f"under {version} leave variant at its default 'v517'")
    h = _as_host(host)
    e = _as_ept(ept)
    params = {
        "version": VERSIONS.index(version),
        "flavor": FLAVORS.index(flavor),
        "nx_rule": var.native_rule if var.native_rule is not None else 3,
        "nx_outside_guard": int(not var.inside_guard),
        "tdp_enabled": int(h.tdp_enabled),
        "reserved_hpa_bits": h.reserved_hpa_bits,
        "shadow_me_mask": h.shadow_me_mask,
        "shadow_me_value": h.shadow_me_value,
        "host_gbpages": int(h.host_gbpages),
        "host_tdp_is_amd": int(h.host_tdp_is_amd),
        "tdp_ad_disabled": int(h.tdp_ad_disabled),
        "tdp_root_level": h.tdp_root_level,
        "max_tdp_level": h.max_tdp_level,
        "max_huge_page_level": h.max_huge_page_level,
        "ept_execonly": int(e.execonly),
        "ept_huge_page_level": e.huge_page_level,
        "ept_accessed_dirty": int(e.accessed_dirty),
        "eptp_level": e.eptp_level,
        "root_mmu_smm": -1 if e.root_mmu_smm is None else int(e.root_mmu_smm),
    }
    return params, h, e, var


_EMPTY_U8 = np.zeros(0, dtype=np.uint8)

# Packed core parameters per (flavor, version, variant, host, ept). Keyed on the
# objects' identities (the configs are frozen); entries hold the objects, so an
# id cannot be reused while its entry lives.
_PARAM_CACHE: Dict[tuple, tuple] = {}


def _cached_params(flavor: str, host: Any, ept: Any, version: str, variant: Any):
    key = (flavor, version, variant if isinstance(variant, str) else id(variant), id(host), id(ept))
    hit = _PARAM_CACHE.get(key)
    if hit is not None and hit[0] is host and hit[1] is ept and (
            isinstance(variant, str) or hit[2] is variant):
        return hit[3]
    params, h, e, var = make_params(flavor, host, ept, version, variant)
    entry = (params, _core.Params(params), h, var)
    if not (isinstance(host, (HostConfig, type(None))) and isinstance(ept, (EptConfig, type(None)))):
        return entry    # a dict could change under the cache
    if len(_PARAM_CACHE) > 512:
        _PARAM_CACHE.clear()
    _PARAM_CACHE[key] = (host, ept, variant, entry)
    return entry


def compute_roles(recs: np.ndarray, params: Dict[str, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Role words of a fresh init for contiguous GUEST_DTYPE records."""
    n = recs.size
    role = np.empty(n, dtype=np.uint64)
    root = np.empty(n, dtype=np.uint32)
    _core.roles(_guest_bytes(recs), role, root, n, params)
    return role, root


def user_uses_nx(var: Variant, recs: np.ndarray, params: Dict[str, int], host: HostConfig,
                 flavor: str, version: str) -> np.ndarray:
    """Call a user variant's uses_nx function once for the batch."""
    if var.native_rule is not None or flavor not in ("shadow", "shadow_npt") or recs.size == 0:
        return _EMPTY_U8
    role, _ = compute_roles(recs, params)
    fields = unpack_role(role, version)
    flat = recs.reshape(-1)
    got = var.uses_nx(fields, flat, host, flavor)
    arr = np.asarray(got)
    if arr.shape == ():
        arr = np.broadcast_to(arr, (flat.size,))
    if arr.shape != (flat.size,) or arr.dtype.kind not in "biu":
        raise ValueError(f"variant {var.name!r}: uses_nx must return a bool array of shape "
                         f"({flat.size},), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr != 0, dtype=np.uint8)


def init_mmu(guests: np.ndarray, flavor: str, host: Optional[HostConfig] = None,
             ept: Optional[EptConfig] = None, version: str = "v5.17",
             variant: Union[str, Variant] = "v517", out: Optional[np.ndarray] = None,
             *, strict: bool = False, threads: Optional[int] = None) -> np.ndarray:
    """What a freshly zeroed MMU context holds after one init, for every state.

    ``flavor`` picks the kernel entry point: ``tdp`` (init_kvm_tdp_mmu),
    ``shadow`` (kvm_init_shadow_mmu), ``shadow_npt`` (kvm_init_shadow_npt_mmu),
    ``shadow_ept`` (kvm_init_shadow_ept_mmu, configured by ``ept``) or
    ``nested`` (init_kvm_nested_mmu). ``version`` is ``"v5.17"`` or
    ``"v6.16"``; ``variant`` (v5.17 only) selects the NX assumption of the
    shadow-zero table: ``v517``, ``patch01``, ``final``, ``literal`` or a
    :class:`kvmmu.Variant`. Returns a CONTEXT_DTYPE array shaped like
    ``guests``; ``out=`` reuses a preallocated one. ``strict=True`` rejects
    states no real CPU produces (see :func:`check_architectural`).
    ``threads`` defaults to OpenMP's (OMP_NUM_THREADS); results do not
    depend on it.

    >>> import kvmmu
    >>> g = kvmmu.guests(cr0=0x80050033, cr4=0x3006f0, efer=0xd01, maxphyaddr=46,
    ...                  guest_gbpages=True)
    >>> ctx = kvmmu.init_mmu(g, "shadow", kvmmu.HostConfig(tdp_enabled=False))
    >>> hex(int(ctx["role"][0])), int(ctx["root_level"][0])
    ('0x2dd00003704', 4)
    >>> hex(int(ctx["guest_rsvd"][0][1, 2]))   # 1 GiB PDPTE: bits 13..29 and 46..51
    '0xfc0003fffe000'
    """
    recs = as_guest_records(guests)
    params, packed, h, var = _cached_params(flavor, host, ept, version, variant)
    if strict is not False:
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {strict!r}")
        require_architectural(recs, h)
    nthreads = _threads(threads)
    res = _prepare_out(out, recs.shape)
    uses_nx = user_uses_nx(var, recs, params, h, flavor, version)
    _core.init_mmu(recs, res, recs.size, packed, uses_nx if uses_nx.size else None,
                   nthreads, PARALLEL_MIN)
    return res


# ---------------------------------------------------------------------------
# building blocks

def _int_array(name: str, value: Any, lo: int, hi: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object:
        try:
            vals = [int(v) for v in arr.ravel()]
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be integers") from None
        if any(not lo <= v <= hi for v in vals):
            raise ValueError(f"{name} must be in [{lo}, {hi}]")
        return np.array(vals, dtype=np.uint64 if hi > 2**63 else np.int64).reshape(arr.shape)
    if arr.dtype.kind not in "biu":
        raise TypeError(f"{name} must be integers in [{lo}, {hi}], got dtype {arr.dtype}")
    if arr.size:
        flat = arr.ravel()
        bad = np.flatnonzero((flat < lo) | (flat > hi))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name} must be in [{lo}, {hi}], got {int(flat[i])} at index {i}")
    return arr


def _bool_array(name: str, value: Any) -> np.ndarray:
    return _int_array(name, value, 0, 1).astype(np.uint8)


def _flat(*arrays: np.ndarray, names: Sequence[str] = ()) -> Tuple[Tuple[int, ...], List[np.ndarray]]:
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        desc = ", ".join(f"{n} {a.shape}" for n, a in zip(names, arrays)) or \
            ", ".join(str(a.shape) for a in arrays)
        raise ValueError(f"arguments do not broadcast together: {desc}") from None
    return shape, [np.ascontiguousarray(np.broadcast_to(a, shape).reshape(-1)) for a in arrays]


def rsvd_bits(s: Any, e: Any) -> np.ndarray:
    """Kernel rsvd_bits(s, e), elementwise: bits s..e, e taken mod 64, empty if e < s.

    >>> import kvmmu
    >>> hex(int(kvmmu.rsvd_bits(46, 63))), int(kvmmu.rsvd_bits(64, 63)), hex(int(kvmmu.rsvd_bits(0, 63)))
    ('0xffffc00000000000', 0, '0xffffffffffffffff')
    """
    sa = _int_array("s", s, 0, 255)
    ea = _int_array("e", e, 0, 2**63 - 1)
    shape, (sf, ef) = _flat(sa.astype(np.int64), ea.astype(np.int64), names=("s", "e"))
    out = np.empty(sf.size, dtype=np.uint64)
    _core.rsvd_bits_array(sf, ef, out)
    return out.reshape(shape)


class RsvdBitsValidate(NamedTuple):
    """struct rsvd_bits_validate: ``rsvd_bits_mask[..., row, level-1]`` and ``bad_mt_xwr``."""

    rsvd_bits_mask: np.ndarray
    bad_mt_xwr: np.ndarray


def reset_rsvds_bits_mask(level: Any, pa_bits_rsvd: Any, nx: Any, gbpages: Any, pse: Any,
                          amd: Any) -> RsvdBitsValidate:
    """__reset_rsvds_bits_mask for legacy/PAE/long-mode tables, on a zeroed table.

    Slots a level does not write stay 0 here.

    >>> import kvmmu
    >>> t = kvmmu.reset_rsvds_bits_mask(3, kvmmu.rsvd_bits(36, 63), nx=True, gbpages=False, pse=False, amd=False)
    >>> hex(int(t.rsvd_bits_mask[0, 2]))   # PAE PDPTE: 63, 36..62, 5..8, 1..2
    '0xfffffff0000001e6'
    """
    lv = _int_array("level", level, 1, 5)
    pa = _int_array("pa_bits_rsvd", pa_bits_rsvd, 0, 2**64 - 1)
    arrs = [lv.astype(np.int64), pa.astype(np.uint64)] + [
        _bool_array(n, v) for n, v in (("nx", nx), ("gbpages", gbpages), ("pse", pse), ("amd", amd))]
    shape, flat = _flat(*arrs, names=("level", "pa_bits_rsvd", "nx", "gbpages", "pse", "amd"))
    masks = np.zeros((flat[0].size, 10), dtype=np.uint64)
    bad = np.zeros(flat[0].size, dtype=np.uint64)
    _core.reset_rsvds_bits_mask(*flat, masks, bad)
    return RsvdBitsValidate(masks.reshape(shape + (2, 5)), bad.reshape(shape))


def reset_rsvds_bits_mask_ept(pa_bits_rsvd: Any, execonly: Any, huge_page_level: Any) -> RsvdBitsValidate:
    """__reset_rsvds_bits_mask_ept: EPT-format table and its bad_mt_xwr lookup.

    >>> import kvmmu
    >>> t = kvmmu.reset_rsvds_bits_mask_ept(kvmmu.rsvd_bits(46, 63), execonly=False, huge_page_level=3)
    >>> hex(int(t.bad_mt_xwr))   # memtypes 2, 3, 7; XWR 010, 110 and (no execonly) 100
    '0xff545454ffff5454'
    """
    pa = _int_array("pa_bits_rsvd", pa_bits_rsvd, 0, 2**64 - 1)
    ex = _bool_array("execonly", execonly)
    hp = _int_array("huge_page_level", huge_page_level, 1, 3)
    shape, flat = _flat(pa.astype(np.uint64), ex, hp.astype(np.int64),
                        names=("pa_bits_rsvd", "execonly", "huge_page_level"))
    masks = np.zeros((flat[0].size, 10), dtype=np.uint64)
    bad = np.zeros(flat[0].size, dtype=np.uint64)
    _core.reset_rsvds_bits_mask_ept(*flat, masks, bad)
    return RsvdBitsValidate(masks.reshape(shape + (2, 5)), bad.reshape(shape))


def update_permission_bitmask(cr0_wp: Any, efer_nx: Any, cr4_smep: Any, cr4_smap: Any,
                              ept: Any = False) -> np.ndarray:
    """permissions[16] of update_permission_bitmask(), shape ``broadcast + (16,)``.

    Byte i is for error code ``i << 1``; bit a is set when an access faults on
    a leaf whose ACC bits are a (1 = exec, 2 = write, 4 = user).

    >>> import kvmmu
    >>> p = kvmmu.update_permission_bitmask(cr0_wp=1, efer_nx=1, cr4_smep=0, cr4_smap=0)
    >>> hex(int(p[1]))   # a supervisor write faults on the 4 non-writable ACC values
    '0x33'
    """
    wp, nx, smep, smap, e = (_bool_array(n, v) for n, v in (
        ("cr0_wp", cr0_wp), ("efer_nx", efer_nx), ("cr4_smep", cr4_smep), ("cr4_smap", cr4_smap),
        ("ept", ept)))
    shape, (wp, nx, smep, smap, e) = _flat(wp, nx, smep, smap, e,
                                           names=("cr0_wp", "efer_nx", "cr4_smep", "cr4_smap", "ept"))
    key = np.ascontiguousarray(nx | (wp << 1) | (smep << 2) | (smap << 3), dtype=np.uint8)
    out = np.empty((key.size, 16), dtype=np.uint8)
    _core.permission_bitmask(key, e, out)
    return out.reshape(shape + (16,))


def update_pkru_bitmask(cr4_pke: Any, cr0_wp: Any) -> np.ndarray:
    """pkru_mask of update_pkru_bitmask() (0 unless CR4.PKE is in effect).

    >>> import kvmmu
    >>> hex(int(kvmmu.update_pkru_bitmask(cr4_pke=1, cr0_wp=1)))   # pfec 8..14: AD, WD on writes
    '0xdd00'
    """
    pke, wp = _bool_array("cr4_pke", cr4_pke), _bool_array("cr0_wp", cr0_wp)
    shape, (pke, wp) = _flat(pke, wp, names=("cr4_pke", "cr0_wp"))
    key = np.ascontiguousarray(pke | (wp << 1), dtype=np.uint8)
    out = np.empty(key.size, dtype=np.uint32)
    _core.pkru_bitmask(key, out)
    return out.reshape(shape)


def _as_contexts(ctx: Any) -> np.ndarray:
    if isinstance(ctx, np.void) and ctx.dtype == CONTEXT_DTYPE:
        return np.asarray(ctx)
    if not isinstance(ctx, np.ndarray) or ctx.dtype != CONTEXT_DTYPE:
        raise TypeError("ctx must be a CONTEXT_DTYPE array or record (from kvmmu.init_mmu)")
    return ctx


def _rsvd_check(table: np.ndarray, bad_mt_xwr: np.ndarray, pte: Any, level: Any) -> np.ndarray:
    p = _int_array("pte", pte, 0, 2**64 - 1).astype(np.uint64)
    lv = _int_array("level", level, 1, 5).astype(np.intp)
    try:
        shape = np.broadcast_shapes(table.shape[:-2], p.shape, lv.shape)
    except ValueError:
        raise ValueError(f"ctx {table.shape[:-2]}, pte {p.shape} and level {lv.shape} "
                         "do not broadcast together") from None
    table = np.broadcast_to(table, shape + (2, 5))
    p = np.broadcast_to(p, shape)
    lv = np.broadcast_to(lv, shape)
    row = ((p >> np.uint64(7)) & np.uint64(1)).astype(np.intp)
    mask = np.take_along_axis(
        table.reshape(shape + (10,)), (row * 5 + lv - 1)[..., None], axis=-1)[..., 0]
    bad = (np.broadcast_to(bad_mt_xwr, shape) >> (p & np.uint64(0x3F))) & np.uint64(1)
    return ((p & mask) != 0) | (bad != 0)


def is_rsvd_gpte(ctx: Any, pte: Any, level: Any) -> np.ndarray:
    """Guest walker's reserved-bit test (FNAME(is_rsvd_bits_set)) with a context's guest tables.

    The bad_mt_xwr lookup is 0 for non-EPT tables, so applying it always is exact.
    Broadcasts ``ctx``, ``pte`` and ``level`` (1 = PTE ... 5 = PML5E).
    """
    c = _as_contexts(ctx)
    return _rsvd_check(c["guest_rsvd"], c["guest_bad_mt_xwr"], pte, level)


def is_rsvd_spte(ctx: Any, spte: Any, level: Any) -> np.ndarray:
    """is_rsvd_spte() (spte.h): a context's shadow-zero table and bad_mt_xwr applied to SPTEs."""
    c = _as_contexts(ctx)
    return _rsvd_check(c["shadow_zero"], c["shadow_bad_mt_xwr"], spte, level)
