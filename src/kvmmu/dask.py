"""Dask-backed compute and sweeps: kvmmu past one machine.

Needs the ``dask`` extra (``pip install 'kvmmu[dask]'``: ``dask[array]`` and
``distributed``). Import it as a submodule::

    from kvmmu import dask as kd

* :func:`init_mmu` is :func:`kvmmu.init_mmu` over a ``dask.array`` of
  ``GUEST_DTYPE`` records (or a numpy array plus ``chunks=``): one kernel call
  per block, lazily, giving a ``dask.array`` of ``CONTEXT_DTYPE``.
* :func:`sweep` is :func:`kvmmu.sweep` with one Dask task per (version,
  flavor, state chunk), each returning a mergeable partial (per-host variant
  counts and distinct role rows, per-variant :class:`kvmmu.StaleReport`), merged
  in order by a tree reduction into the same :class:`kvmmu.SweepResult`. Every
  number equals the single-process sweep's for the same ``chunk_size``, and so
  do the example stale groups.
* :func:`compare` and :func:`find_stale_roles` are the Dask forms of
  :func:`kvmmu.compare` and :func:`kvmmu.find_stale_roles`.

``scheduler`` (for the eager functions) is ``None`` (Dask's default: the
current ``distributed.Client`` if there is one, else threads), ``"threads"``,
``"processes"``, ``"synchronous"``, a scheduler address such as
``"tcp://10.0.0.5:8786"``, a ``distributed.Client`` or a cluster object (e.g.
``distributed.LocalCluster``). Workers need the same kvmmu version installed.

>>> import kvmmu
>>> from kvmmu import dask as kd
>>> g = kvmmu.guests(cr0=[0, 0x80000011, 0x80010011], cr4=0x20, efer=0x500, maxphyaddr=46)
>>> ctx = kd.init_mmu(g, "tdp", chunks=2)
>>> ctx.dtype == kvmmu.CONTEXT_DTYPE, ctx.numblocks
(True, (2,))
>>> bool((ctx.compute(scheduler="synchronous") == kvmmu.init_mmu(g, "tdp")).all())
True
"""
from __future__ import annotations

import copy
import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

# This module is kvmmu.dask; these absolute imports are the dask package.
import dask
import dask.array as da
from dask.delayed import Delayed, delayed

from ._types import CONTEXT_DTYPE, FLAVORS, GUEST_DTYPE, VERSIONS, EptConfig, HostConfig
from .analysis import (
    CONSULTED,
    DEFAULT_MAXPHYADDRS,
    CompareResult,
    StaleReport,
    SweepResult,
    enumerate_states,
)
from .analysis import (  # the sweep pieces kvmmu.sweep itself runs, as tasks here
    SweepPartial,
    _SweepJob,
    _add_counts,
    _sweep_chunk,
    _sweep_plan,
    _variant_ref,
    finish_sweep,
    merge_stale_reports,
    merge_sweep_partials,
)
from .analysis import compare as _np_compare
from .analysis import find_stale_roles as _np_find_stale_roles
from .engine import _check_choice, _threads, as_guest_records, make_params
from .engine import init_mmu as _np_init_mmu
from .variants import Variant

__all__ = ["init_mmu", "sweep", "compare", "find_stale_roles", "local_cluster", "sweep_partials",
           "SweepPartial", "merge_sweep_partials", "merge_stale_reports", "merge_compare_results"]

Scheduler = Any  # None | str | distributed.Client | cluster with .scheduler_address

_LOCAL_SCHEDULERS = ("threads", "threading", "processes", "multiprocessing",
                     "synchronous", "sync", "single-threaded")


# ---------------------------------------------------------------------------
# inputs

def _check_guest_dtype(dt: np.dtype, name: str = "guests") -> None:
    # as_guest_records validates names/types and raises the package's messages
    as_guest_records(np.empty(0, dtype=dt), name)


def _as_dask_guests(guests: Any, chunks: Any, name: str = "guests") -> da.Array:
    if isinstance(guests, da.Array):
        _check_guest_dtype(guests.dtype, name)
        return guests if chunks is None else guests.rechunk(chunks)
    if isinstance(guests, np.ndarray):
        recs = as_guest_records(guests, name)
        return da.from_array(recs, chunks="auto" if chunks is None else chunks)
    raise TypeError(f"{name} must be a dask.array or numpy array of kvmmu.GUEST_DTYPE "
                    f"(build one with kvmmu.guests()), got {type(guests).__name__}")


def _spec_refs(spec: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if not isinstance(spec, dict) or "variant" not in spec:
        return spec
    out = dict(spec)
    try:
        out["variant"] = _variant_ref(out["variant"])
    except ValueError:
        pass  # left for compare's own check to report
    return out


def _flat_blocks(g: da.Array) -> Tuple[List[Delayed], List[int]]:
    """The 1-D blocks of ``g`` in row-major record order, and their offsets."""
    if g.ndim != 1:
        g = g.reshape(-1)
    sizes = list(g.chunks[0])
    offsets = [0] + list(itertools.accumulate(sizes))[:-1]
    return list(g.to_delayed().reshape(-1)), offsets


# ---------------------------------------------------------------------------
# init_mmu

def _init_block(block: np.ndarray, flavor: str, host: HostConfig, ept: EptConfig, version: str,
                variant: Union[str, Variant], strict: bool, threads: Optional[int]) -> np.ndarray:
    return _np_init_mmu(block, flavor, host, ept, version=version, variant=variant,
                        strict=strict, threads=threads)


def init_mmu(guests: Any, flavor: str, host: Optional[HostConfig] = None,
             ept: Optional[EptConfig] = None, version: str = "v5.17",
             variant: Union[str, Variant] = "v517", *, chunks: Any = None,
             strict: bool = False, threads: Optional[int] = None) -> da.Array:
    """:func:`kvmmu.init_mmu` over a ``dask.array`` of GUEST_DTYPE: lazy, one kernel call per block.

    ``guests`` is a dask array (rechunked when ``chunks`` is given) or a numpy
    array (split by ``chunks``, default ``"auto"``). Arguments are checked
    here, before anything runs; the result is a dask array of CONTEXT_DTYPE
    with the chunks of ``guests``, equal record for record to
    ``kvmmu.init_mmu`` of the whole. ``threads`` is per block (the kernel's
    OpenMP threads); with several Dask workers per machine pass ``threads=1``.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    if threads is not None:
        _threads(threads)  # the engine's check, now rather than in every task
    _, h, e, var = make_params(flavor, host, ept, version, variant)
    var = _variant_ref(var)
    g = _as_dask_guests(guests, chunks)
    return da.map_blocks(_init_block, g, flavor, h, e, version, var, strict, threads,
                         dtype=CONTEXT_DTYPE, meta=np.empty((0,) * g.ndim, dtype=CONTEXT_DTYPE),
                         name="kvmmu-init-mmu-" + dask.base.tokenize(g, flavor, h, e, version,
                                                                     var, strict, threads))


# ---------------------------------------------------------------------------
# merging partial results

def merge_compare_results(*results: CompareResult, max_examples: int) -> CompareResult:
    """The results (example indices already global) in order: sums, first examples."""
    if not results:
        raise ValueError("merge_compare_results: nothing to merge")
    out = copy.copy(results[0])
    out.n = sum(r.n for r in results)
    out.differing = sum(r.differing for r in results)
    out.counts = {}
    for r in results:
        out.counts = _add_counts(out.counts, r.counts)
    out.examples = [ex for r in results for ex in r.examples][:max(0, max_examples)]
    return out


def _tree_reduce(parts: List[Any], merge: Callable, split_every: int, name: str) -> Any:
    """Ordered tree reduction of delayed partials: ``merge(*group)`` of neighbours,
    ``split_every`` at a time, so the result is that of one ordered merge of all."""
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2, got {split_every!r}")
    if not parts:
        raise ValueError("nothing to reduce")
    level = 0
    while len(parts) > 1:
        nxt = []
        for i in range(0, len(parts), split_every):
            group = parts[i:i + split_every]
            nxt.append(group[0] if len(group) == 1 else
                       delayed(merge)(*group, dask_key_name=(
                           f"{name}-merge-{dask.base.tokenize(*group)}", level, i // split_every)))
        parts = nxt
        level += 1
    return parts[0]


# ---------------------------------------------------------------------------
# running a graph

#: distributed's nannies export this (65536) to every worker process they start. It
#: fixes glibc's mmap threshold at 128 KiB, so each large numpy temporary is a fresh
#: mmap and its pages fault in again: kvmmu's sweep tasks run about 2x slower (docs/DASK.md).
MALLOC_ENV = "MALLOC_TRIM_THRESHOLD_"


def local_cluster(n_workers: Optional[int] = None, threads_per_worker: int = 1,
                  processes: bool = True, **kwargs: Any):
    """A ``distributed.LocalCluster`` whose worker processes keep glibc's default
    malloc tuning (see :data:`MALLOC_ENV`); other arguments as LocalCluster's.

    Workers a nanny restarts later get the default environment again. For
    ``dask worker`` on other machines set
    ``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None``.
    """
    import distributed

    kwargs.setdefault("dashboard_address", None)
    saved = os.environ.pop(MALLOC_ENV, None)  # a nanny started earlier may have leaked it here
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{MALLOC_ENV}": None}):
            return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                            processes=processes, **kwargs)
    finally:
        if saved is not None:
            os.environ[MALLOC_ENV] = saved


def _default_client() -> Any:
    """The default distributed.Client, if distributed is in use at all (never imports it)."""
    default_client = getattr(sys.modules.get("distributed"), "default_client", None)
    if default_client is None:
        return None
    try:
        return default_client()
    except ValueError:
        return None


def _compute(objs: List[Delayed], scheduler: Scheduler,
             progress: Optional[Callable[[int, int], None]] = None) -> List[Any]:
    """Compute ``objs`` on ``scheduler``; ``progress(done, len(objs))`` as each finishes."""
    total = len(objs)
    client, own = None, False
    Client = getattr(sys.modules.get("distributed"), "Client", None)  # never imports it
    if scheduler is None:
        client = _default_client()
    elif Client is not None and isinstance(scheduler, Client):
        client = scheduler
    elif isinstance(scheduler, str) and scheduler in _LOCAL_SCHEDULERS:
        pass
    elif (isinstance(scheduler, str) and ":" in scheduler) or hasattr(scheduler, "scheduler_address"):
        import distributed

        client = distributed.Client(scheduler if isinstance(scheduler, str) else scheduler.scheduler_address,
                                    set_as_default=False)
        own = True
    else:
        raise (ValueError if isinstance(scheduler, str) else TypeError)(
            f"scheduler must be None, one of {_LOCAL_SCHEDULERS}, a scheduler address "
            f"('tcp://host:8786'), a distributed.Client or a cluster, got {scheduler!r}")
    if client is None:
        if progress is None:
            return list(dask.compute(*objs, scheduler=scheduler))
        from dask.callbacks import Callback

        keys = {o.key for o in objs}
        done = [0]

        def posttask(key, result, dsk, state, worker_id):
            if key in keys:
                done[0] += 1
                progress(done[0], total)

        with Callback(posttask=posttask):
            return list(dask.compute(*objs, scheduler=scheduler))
    try:
        import distributed

        futures = client.compute(objs)
        if progress is not None:
            with client.as_current():  # as_completed looks the client up
                for i, _ in enumerate(distributed.as_completed(futures)):
                    progress(i + 1, total)
        out = client.gather(futures)
        del futures
        return out
    finally:
        if own:
            client.close()


# ---------------------------------------------------------------------------
# sweep

def sweep_partials(flavors: Sequence[str] = FLAVORS, versions: Sequence[str] = ("v5.17",),
                   variants: Optional[Sequence[Union[str, Variant]]] = None,
                   hosts: Optional[Dict[str, HostConfig]] = None,
                   maxphyaddrs: Sequence[int] = DEFAULT_MAXPHYADDRS, reachable_only: bool = True,
                   epts: Optional[Sequence[EptConfig]] = None, compare_variants: bool = True,
                   check_guard: bool = True, chunk_size: int = 1 << 16,
                   threads: Optional[int] = 1, split_every: int = 8):
    """The lazy graph behind :func:`sweep`: ``(plan, spec, parts)`` where ``parts`` holds
    one delayed, tree-reduced :class:`SweepPartial` per (version, flavor) of ``plan``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    plan, spec = _sweep_plan(flavors, versions, variants, hosts, maxphyaddrs, reachable_only, epts,
                             compare_variants, check_guard, threads)
    # The state space is small (at most 1,024 control words x 16 x len(maxphyaddrs)
    # records of 32 bytes); its chunks are made once here and shared by every task.
    chunks = [delayed(c, pure=True, name=f"kvmmu-states-{dask.base.tokenize(c)}")
              for c in enumerate_states(reachable_only, maxphyaddrs, chunk_size)]
    stok = dask.base.tokenize(spec, chunk_size, [c.key for c in chunks])
    parts = []
    for version, flavor, vs in plan:
        tok = dask.base.tokenize(version, flavor, vs, stok)
        job = delayed(_SweepJob(version, flavor, vs, spec), pure=True, name=f"kvmmu-sweep-job-{tok}")
        leaves = [delayed(_sweep_chunk)(c, job, dask_key_name=(f"kvmmu-sweep-chunk-{tok}", i))
                  for i, c in enumerate(chunks)]
        parts.append(_tree_reduce(leaves, merge_sweep_partials, split_every, f"kvmmu-sweep-{tok}"))
    return plan, spec, parts


def sweep(flavors: Sequence[str] = FLAVORS, versions: Sequence[str] = ("v5.17",),
          variants: Optional[Sequence[Union[str, Variant]]] = None,
          hosts: Optional[Dict[str, HostConfig]] = None,
          maxphyaddrs: Sequence[int] = DEFAULT_MAXPHYADDRS, reachable_only: bool = True,
          epts: Optional[Sequence[EptConfig]] = None, compare_variants: bool = True,
          check_guard: bool = True, chunk_size: int = 1 << 16,
          progress: Optional[Callable[[int, int], None]] = None, *,
          scheduler: Scheduler = None, threads: Optional[int] = 1,
          split_every: int = 8) -> SweepResult:
    """:func:`kvmmu.sweep` as Dask tasks: one per (version, flavor, state chunk).

    Same arguments and the same :class:`kvmmu.SweepResult` (cells, stale
    reports, example groups) as ``kvmmu.sweep`` with the same ``chunk_size``;
    ``seconds`` is the wall time of the whole computation. ``scheduler``: see
    the module docstring. ``threads`` is the kernel's OpenMP threads per task
    (default 1: Dask supplies the parallelism). Partials are merged in order,
    ``split_every`` at a time. ``progress(done, total)`` is called as each
    (version, flavor) finishes, in completion order.

    >>> import kvmmu
    >>> from kvmmu import dask as kd
    >>> r = kd.sweep(flavors=["shadow"], maxphyaddrs=[46], check_guard=False, chunk_size=2048,
    ...              scheduler="synchronous")
    >>> r.states, [c.variant_mismatch["patch01"] for c in r.cells if c.kernel_builds]
    (10240, [0])
    """
    plan, spec, parts = sweep_partials(flavors, versions, variants, hosts, maxphyaddrs,
                                       reachable_only, epts, compare_variants, check_guard,
                                       chunk_size, threads, split_every)
    t0 = time.perf_counter()
    results = _compute(parts, scheduler, progress)
    return finish_sweep(plan, spec, results, time.perf_counter() - t0, reachable_only, maxphyaddrs)


# ---------------------------------------------------------------------------
# compare

def _compare_block(block: np.ndarray, offset: int, flavor: str, a: Any, b: Any, host: Any,
                   ept: Any, max_examples: int) -> CompareResult:
    res = _np_compare(block, flavor, a, b, host, ept, max_examples, chunk_size=max(1, block.size))
    for ex in res.examples:
        ex["index"] += offset
    return res


def compare(guests: Any, flavor: str = "shadow", a: Optional[Dict[str, Any]] = None,
            b: Optional[Dict[str, Any]] = None, host: Optional[HostConfig] = None,
            ept: Optional[EptConfig] = None, max_examples: int = 5, *, chunks: Any = None,
            scheduler: Scheduler = None, split_every: int = 8) -> CompareResult:
    """:func:`kvmmu.compare` with one Dask task per block of ``guests`` (a dask array,
    or numpy plus ``chunks``). The result equals ``kvmmu.compare``'s, examples
    included (the first ``max_examples`` differing states, by flat index)."""
    # check the formulations once, here, with the single-process code
    _np_compare(np.zeros(0, GUEST_DTYPE), flavor, a, b, host, ept, max_examples)
    a, b = _spec_refs(a), _spec_refs(b)
    g = _as_dask_guests(guests, chunks)
    blocks, offsets = _flat_blocks(g)
    tok = dask.base.tokenize(g, flavor, a, b, host, ept, max_examples)
    leaves = [delayed(_compare_block, pure=True)(blk, off, flavor, a, b, host, ept, max_examples,
                                                 dask_key_name=(f"kvmmu-compare-{tok}", i))
              for i, (blk, off) in enumerate(zip(blocks, offsets))]
    return _compute([_tree_reduce(leaves, _MergeCompare(max_examples), split_every,
                                  f"kvmmu-compare-{tok}")], scheduler)[0]


@dataclass(frozen=True)
class _MergeCompare:
    max_examples: int

    def __call__(self, *results: CompareResult) -> CompareResult:
        return merge_compare_results(*results, max_examples=self.max_examples)


# ---------------------------------------------------------------------------
# find_stale_roles

def _visible_code(recs: np.ndarray) -> np.ndarray:
    """Per state, the inputs find_stale_roles never varies alone: the consulted
    control bits, smm and guest_mode (everything but the guest hidden inputs)."""
    code = np.zeros(recs.shape[0], dtype=np.int64)
    shift = 0
    for reg, bits in CONSULTED.items():
        for b in bits.values():
            code |= ((recs[reg] >> np.uint64(b)) & np.uint64(1)).astype(np.int64) << shift
            shift += 1
    for f in ("smm", "guest_mode"):
        code |= recs[f].astype(np.int64) << shift
        shift += 1
    return code


def _stale_block(block: np.ndarray, flavor: str, host: Any, ept: Any, version: str,
                 variant: Union[str, Variant], hosts: Any, epts: Any, max_examples: int):
    recs = as_guest_records(block).reshape(-1)
    rep = _np_find_stale_roles(recs, flavor, host, ept, version, variant, hosts, epts, max_examples)
    return rep, np.unique(_visible_code(recs)), False


def _merge_stale_blocks(*parts):
    """Merged reports, the union of visible-input codes, and whether two chunks shared one."""
    codes = np.concatenate([c for _, c, _ in parts])
    union = np.unique(codes)
    split = any(s for _, _, s in parts) or union.size != codes.size
    return merge_stale_reports(*[r for r, _, _ in parts]), union, split


def _grouped_chunks(recs: np.ndarray, chunk_size: int) -> List[np.ndarray]:
    """``recs`` ordered by visible inputs and cut into chunks of about ``chunk_size``
    that never split a visible group (so every hidden-input pair shares a chunk)."""
    code = _visible_code(recs)
    order = np.argsort(code, kind="stable")
    srt, scode = recs[order], code[order]
    n = srt.shape[0]
    starts = np.flatnonzero(np.concatenate(([True], scode[1:] != scode[:-1]))) if n else np.zeros(0, int)
    out, s = [], 0
    while s < n:
        k = np.searchsorted(starts, s + chunk_size)
        e = int(starts[k]) if k < starts.size else n
        out.append(srt[s:e])
        s = e
    return out


def find_stale_roles(guests: Any, flavor: str, host: Optional[HostConfig] = None,
                     ept: Optional[EptConfig] = None, version: str = "v5.17",
                     variant: Union[str, Variant] = "v517",
                     hosts: Optional[Sequence[HostConfig]] = None,
                     epts: Optional[Sequence[EptConfig]] = None,
                     max_examples: int = 3, *, chunks: Any = None,
                     scheduler: Scheduler = None, split_every: int = 8) -> StaleReport:
    """:func:`kvmmu.find_stale_roles` with one Dask task per chunk of states.

    A stale pair (two states differing in one hidden input only) is found only
    inside one chunk. A numpy ``guests`` is therefore grouped first: ordered by
    the inputs that are never varied alone (consulted control bits, smm,
    guest_mode) and cut, near every ``chunks`` states (an int, default 65536),
    only between such groups. A dask array is used as chunked, and a
    ValueError is raised when one of those groups spans two chunks (sort it by
    those inputs first, or pass numpy). Counts (``stale_groups``,
    ``counts_by_input``, ``distinct_roles``, ``stale_groups_any_inputs``,
    ``rows``) equal ``kvmmu.find_stale_roles``'s; with more than one chunk the
    example groups are valid but may be other ones than its.
    """
    _check_choice("flavor", flavor, FLAVORS)
    _check_choice("version", version, VERSIONS)
    var = _variant_ref(variant)
    if isinstance(guests, np.ndarray):
        if chunks is None:
            chunks = 1 << 16
        if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
            raise ValueError(f"chunks must be a positive int for a numpy guests, got {chunks!r}")
        recs = as_guest_records(guests).reshape(-1)
        blocks = [delayed(c, pure=True, name=f"kvmmu-states-{dask.base.tokenize(c)}")
                  for c in _grouped_chunks(recs, int(chunks))] or [recs]
    else:
        blocks, _ = _flat_blocks(_as_dask_guests(guests, chunks))
    tok = dask.base.tokenize(blocks, flavor, host, ept, version, var, hosts, epts, max_examples)
    leaves = [delayed(_stale_block, pure=True)(blk, flavor, host, ept, version, var, hosts, epts,
                                               max_examples,
                                               dask_key_name=(f"kvmmu-stale-{tok}", i))
              for i, blk in enumerate(blocks)]
    rep, _, split = _compute([_tree_reduce(leaves, _merge_stale_blocks, split_every,
                                           f"kvmmu-stale-{tok}")], scheduler)[0]
    if split:
        raise ValueError("find_stale_roles: states that differ only in hidden inputs "
                         "(maxphyaddr, guest_gbpages, guest_amd) lie in different chunks, so "
                         "stale pairs between them would be missed; sort guests by cr0/cr4/efer/"
                         "smm/guest_mode before chunking, or pass a numpy array")
    return rep
