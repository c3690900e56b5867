"""Stateful replay: a sequence of inits on persistent MMU contexts, guard included."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import numpy as np

from . import _core
from ._types import CONTEXT_DTYPE, EptConfig, HostConfig
from .engine import _guest_bytes, _prepare_out, as_guest_records, make_params, user_uses_nx
from .variants import Variant

POLICIES = ("skip_if_same_role", "force")


def _step_array(name: str, value: Any, n: int, kind: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array with one entry per step ({n}), got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=bool if kind == "b" else np.int64)   # [] is float64 to numpy
    if arr.dtype.kind not in kind:
        raise TypeError(f"{name} must be {'bool' if kind == 'b' else 'integer'}s, got dtype {arr.dtype}")
    return arr


class ReplayResult:
    """What a replay did: the context after each step and whether the guard let the body run."""

    def __init__(self, contexts: Optional[np.ndarray], recomputed: np.ndarray, vcpu: np.ndarray,
                 vcpu_ids: np.ndarray, final: np.ndarray, policy: str, flavor: str,
                 version: str, variant: str):
        self.contexts = contexts
        self.recomputed = recomputed
        self.vcpu = vcpu
        self.vcpu_ids = vcpu_ids
        self.final = final
        self.policy = policy
        self.flavor = flavor
        self.version = version
        self.variant = variant

    @property
    def inits(self) -> int:
        return int(self.recomputed.size)

    @property
    def recomputes(self) -> int:
        return int(np.count_nonzero(self.recomputed))

    @property
    def skips(self) -> int:
        return self.inits - self.recomputes

    @property
    def skip_fraction(self) -> float:
        return self.skips / self.inits if self.inits else 0.0

    def per_vcpu(self) -> Dict[int, Dict[str, int]]:
        """``{vcpu id: {"inits", "recomputes", "skips"}}``."""
        out = {}
        for vid in self.vcpu_ids:
            sel = self.vcpu == vid
            n = int(np.count_nonzero(sel))
            r = int(np.count_nonzero(self.recomputed[sel]))
            out[int(vid)] = {"inits": n, "recomputes": r, "skips": n - r}
        return out

    def summary(self) -> str:
        lines = [f"replay {self.flavor} {self.version}/{self.variant} policy={self.policy}: "
                 f"{self.inits} inits, {self.recomputes} recomputed, {self.skips} skipped "
                 f"({100 * self.skip_fraction:.1f}%)"]
        if len(self.vcpu_ids) > 1:
            lines.append(f"{'vcpu':>6} {'inits':>8} {'recomputes':>10} {'skips':>8}")
            for vid, c in self.per_vcpu().items():
                lines.append(f"{vid:>6} {c['inits']:>8} {c['recomputes']:>10} {c['skips']:>8}")
        return "\n".join(lines)

    def to_frame(self):
        """One row per step (pandas is an optional dependency)."""
        import pandas as pd

        cols = {"vcpu": self.vcpu, "recomputed": self.recomputed}
        if self.contexts is not None:
            for f in ("role", "root_role", "root_level", "shadow_root_level"):
                cols[f] = self.contexts[f]
        return pd.DataFrame(cols)

    def __repr__(self) -> str:
        return (f"ReplayResult(inits={self.inits}, recomputes={self.recomputes}, "
                f"skips={self.skips}, vcpus={len(self.vcpu_ids)})")


def replay(guests: np.ndarray, flavor: str, host: Optional[HostConfig] = None,
           ept: Optional[EptConfig] = None, version: str = "v5.17",
           variant: Union[str, Variant] = "v517", policy: str = "skip_if_same_role",
           initial: Optional[np.ndarray] = None, invalidate: Any = None, vcpu: Any = None,
           out: Optional[np.ndarray] = None, contexts: bool = True) -> ReplayResult:
    """Replay states, in order, through persistent contexts with KVM's role guard.

    Each record is one context init as a vCPU lives through time. Under the
    guard nothing is written, and table slots a paging mode does not write
    keep what an earlier step left there, so a step's context can differ from
    a fresh :func:`kvmmu.init_mmu`. ``policy="force"`` runs the body every
    step. ``invalidate[i]`` marks a CPUID update before step i
    (kvm_mmu_after_set_cpuid); ``vcpu[i]`` picks which vCPU's context step i
    uses; ``initial`` is the context every vCPU starts from (default: zero).
    ``contexts=False`` skips recording the context after every step (the
    result then has ``contexts=None``; ``final`` and ``recomputed`` remain),
    which is what a measurement of the guard's skip path wants.

    >>> import kvmmu
    >>> g = kvmmu.guests(cr0=[0x80050033, 0x80050033, 0x80040033], cr4=0x20, efer=0xd01)
    >>> r = kvmmu.replay(g, "tdp")
    >>> r.recomputed.tolist(), r.skips
    ([True, False, True], 1)
    """
    recs = as_guest_records(guests)
    if recs.ndim != 1:
        raise ValueError(f"guests must be 1-D (a sequence of states), got shape {recs.shape}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    params, h, _, var = make_params(flavor, host, ept, version, variant)
    n = recs.shape[0]
    if vcpu is None:
        vcpu_arr = np.zeros(n, dtype=np.int64)
    else:
        vcpu_arr = _step_array("vcpu", vcpu, n, "iu")
        if vcpu_arr.size and vcpu_arr.dtype.kind == "u" and int(vcpu_arr.max()) > np.iinfo(np.int64).max:
            raise ValueError("vcpu ids must fit in int64")
        vcpu_arr = vcpu_arr.astype(np.int64)
    vcpu_ids, slot = np.unique(vcpu_arr, return_inverse=True)
    slot = np.ascontiguousarray(slot, dtype=np.int64)
    nslots = max(len(vcpu_ids), 1)
    inv = (np.zeros(0, dtype=np.uint8) if invalidate is None
           else np.ascontiguousarray(_step_array("invalidate", invalidate, n, "b"), dtype=np.uint8))
    states = np.zeros(nslots, dtype=CONTEXT_DTYPE)
    if initial is not None:
        init = np.asarray(initial)
        if init.dtype != CONTEXT_DTYPE:
            raise TypeError(f"initial must be a CONTEXT_DTYPE record or array, got dtype {init.dtype}")
        if init.size not in (1, nslots):
            raise ValueError(f"initial must hold 1 context or one per vCPU ({nslots}), got {init.size}")
        states[:] = init.reshape(-1)
    if not isinstance(contexts, bool):
        raise TypeError(f"contexts must be a bool, got {contexts!r}")
    if not contexts and out is not None:
        raise ValueError("out= needs contexts=True")
    res = _prepare_out(out, (n,)) if contexts else np.zeros(0, dtype=CONTEXT_DTYPE)
    recomputed = np.zeros(n, dtype=np.uint8)
    uses_nx = user_uses_nx(var, recs, params, h, flavor, version)
    _core.replay(_guest_bytes(recs), res.view(np.uint8).reshape(-1), n, params, uses_nx,
                 int(policy == "force"), inv, slot, states.view(np.uint8).reshape(-1), nslots,
                 recomputed)
    return ReplayResult(res if contexts else None, recomputed.view(bool), vcpu_arr, vcpu_ids,
                        states, policy, flavor, version, var.name)
