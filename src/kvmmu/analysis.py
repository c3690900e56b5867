"""The review's questions, computed: equivalence of formulations, guard soundness, sweeps.

* :func:`compare` counts, field by field, where two formulations (version,
  variant, host, flavor) give different contexts, with decoded counterexamples.
* :func:`find_stale_roles` groups states by the role the guard compares and
  reports every group whose cached outputs would differ, attributing each to
  the hidden input (one not encoded in the role) whose change alone does it.
* :func:`sweep` enumerates the state space in bounded chunks and feeds both.
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._types import CONTEXT_DTYPE, FLAVORS, GUEST_DTYPE, VARIANTS, VERSIONS, EptConfig, HostConfig
from . import _core
from .engine import _as_ept, _as_host, _check_choice, as_guest_records, init_mmu
from .roles import decode_role
from .variants import BUILTIN_VARIANTS, Variant, resolve_variant

OUTPUT_FIELDS = ("root_level", "shadow_root_level", "guest_rsvd", "guest_bad_mt_xwr",
                 "shadow_zero", "shadow_bad_mt_xwr", "permissions", "pkru_mask")
CONTEXT_FIELDS = ("role", "root_role") + OUTPUT_FIELDS
GUEST_HIDDEN = ("maxphyaddr", "guest_gbpages", "guest_amd")
HOST_FIELDS = tuple(HostConfig.__dataclass_fields__)
EPT_FIELDS = tuple(EptConfig.__dataclass_fields__)

# Bits KVM consults; the rest of each register never changes a result.
CONSULTED = {
    "cr0": {"PG": 31, "WP": 16},
    "cr4": {"PSE": 4, "PAE": 5, "LA57": 12, "SMEP": 20, "SMAP": 21, "PKE": 22},
    "efer": {"LMA": 10, "NX": 11},
}
_MASKS = {reg: np.uint64(sum(1 << b for b in bits.values())) for reg, bits in CONSULTED.items()}


def describe_state(rec: np.void) -> Dict[str, Any]:
    """One GUEST_DTYPE record as a readable dict (registers in hex, consulted bits named)."""
    out: Dict[str, Any] = {}
    for reg, bits in CONSULTED.items():
        v = int(rec[reg])
        on = [name for name, b in bits.items() if v >> b & 1]
        out[reg] = f"{v:#x}" + (f" ({'|'.join(on)})" if on else "")
    for name in ("maxphyaddr", "guest_amd", "guest_gbpages", "smm", "guest_mode"):
        out[name] = int(rec[name])
    return out


def _fmt(value: Any) -> Any:
    a = np.asarray(value)
    if a.ndim == 0:
        return f"{int(a):#x}"
    return [_fmt(x) for x in a]


def rows_differ(a: np.ndarray, b: np.ndarray, fields: Sequence[str] = None) -> np.ndarray:
    """Per record: does any of ``fields`` (default: all) differ? One pass over the raw words."""
    n = a.shape[0]
    wm = _word_mask(fields if fields is not None else CONTEXT_FIELDS)
    x = np.ascontiguousarray(a).view(np.uint64).reshape(n, -1)
    y = np.ascontiguousarray(b).view(np.uint64).reshape(n, -1)
    return (((x ^ y) & wm) != 0).any(axis=1)


def field_mismatch(a: np.ndarray, b: np.ndarray, name: str) -> np.ndarray:
    """Per record: does field ``name`` differ between two CONTEXT_DTYPE arrays?"""
    x, y = a[name], b[name]
    n = a.shape[0]
    return (x.reshape(n, -1) != y.reshape(n, -1)).any(axis=1)


# ---------------------------------------------------------------------------
# compare

def _spec(spec: Optional[Dict[str, Any]], flavor: str, host: Any, ept: Any) -> Dict[str, Any]:
    spec = dict(spec or {})
    unknown = set(spec) - {"version", "variant", "host", "ept", "flavor"}
    if unknown:
        raise ValueError(f"compare: unknown key(s) {sorted(unknown)} in a formulation; "
                         "use version, variant, host, ept, flavor")
    out = {"version": spec.get("version", "v5.17"), "variant": spec.get("variant", "v517"),
           "host": _as_host(spec.get("host", host)), "ept": _as_ept(spec.get("ept", ept)),
           "flavor": spec.get("flavor", flavor)}
    _check_choice("version", out["version"], VERSIONS)
    _check_choice("flavor", out["flavor"], FLAVORS)
    out["variant"] = resolve_variant(out["variant"])
    return out


def _label(spec: Dict[str, Any]) -> str:
    return f"{spec['flavor']}@{spec['version']}:{spec['variant'].name}"


class CompareResult:
    """Per-field mismatch counts between formulations ``a`` and ``b``."""

    def __init__(self, label_a: str, label_b: str, version_a: str, version_b: str):
        self.label_a, self.label_b = label_a, label_b
        self.version_a, self.version_b = version_a, version_b
        self.n = 0
        self.counts: Dict[str, int] = {f: 0 for f in CONTEXT_FIELDS}
        self.differing = 0
        self.examples: List[Dict[str, Any]] = []

    @property
    def agree(self) -> bool:
        return self.differing == 0

    def add(self, recs: np.ndarray, ca: np.ndarray, cb: np.ndarray, offset: int,
            max_examples: int, fields: Sequence[str] = CONTEXT_FIELDS) -> None:
        n = recs.shape[0]
        any_diff = rows_differ(ca, cb, fields)
        per = {f: np.zeros(n, dtype=bool) for f in fields}
        sel = np.flatnonzero(any_diff)
        if sel.size:
            for f in fields:
                m = field_mismatch(ca[sel], cb[sel], f)
                per[f][sel] = m
                self.counts[f] += int(np.count_nonzero(m))
        self.n += n
        self.differing += int(np.count_nonzero(any_diff))
        for i in np.flatnonzero(any_diff)[: max(0, max_examples - len(self.examples))]:
            diff = [f for f in fields if per[f][i]]
            self.examples.append({
                "index": offset + int(i),
                "state": describe_state(recs[i]),
                "fields": diff,
                "a": {f: _fmt(ca[f][i]) for f in diff},
                "b": {f: _fmt(cb[f][i]) for f in diff},
                "role_a": decode_role(int(ca["role"][i]), self.version_a),
                "role_b": decode_role(int(cb["role"][i]), self.version_b),
            })

    def summary(self) -> str:
        lines = [f"compare {self.label_a} vs {self.label_b}: {self.n} states, "
                 f"{self.differing} differ" + (" (agree everywhere)" if self.agree else "")]
        for f, c in self.counts.items():
            if c:
                lines.append(f"  {f:<18} {c:>10} mismatches")
        for ex in self.examples:
            lines.append(f"  e.g. state #{ex['index']}: {ex['state']}")
            for f in ex["fields"]:
                lines.append(f"       {f}: a={ex['a'][f]} b={ex['b'][f]}")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"a": self.label_a, "b": self.label_b, "states": self.n, "differing": self.differing,
                "agree": self.agree, "mismatches": dict(self.counts), "examples": self.examples}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"field": f, "mismatches": c} for f, c in self.counts.items()])

    def __repr__(self) -> str:
        return f"CompareResult({self.label_a} vs {self.label_b}: {self.differing}/{self.n} differ)"


def compare(guests: np.ndarray, flavor: str = "shadow", a: Optional[Dict[str, Any]] = None,
            b: Optional[Dict[str, Any]] = None, host: Optional[HostConfig] = None,
            ept: Optional[EptConfig] = None, max_examples: int = 5,
            chunk_size: int = 1 << 18) -> CompareResult:
    """Where do two formulations give different contexts?

    ``a`` and ``b`` are dicts with any of ``version``, ``variant``, ``host``,
    ``ept``, ``flavor`` (defaults: v5.17, v517, and the ``host``/``ept``/
    ``flavor`` arguments). Compared over fresh inits of every state.

    >>> import kvmmu
    >>> g = kvmmu.guests(cr0=[0, 0x80000011], cr4=0x20, efer=0)
    >>> r = kvmmu.compare(g, "shadow", {"variant": "v517"}, {"variant": "patch01"},
    ...                   host=kvmmu.HostConfig(tdp_enabled=False))
    >>> r.agree
    True
    """
    recs = as_guest_records(guests).reshape(-1)
    sa, sb = _spec(a, flavor, host, ept), _spec(b, flavor, host, ept)
    res = CompareResult(_label(sa), _label(sb), sa["version"], sb["version"])
    for start in range(0, recs.shape[0], chunk_size):
        chunk = recs[start:start + chunk_size]
        ca = init_mmu(chunk, **sa)
        cb = init_mmu(chunk, **sb)
        res.add(chunk, ca, cb, start, max_examples)
    return res


# ---------------------------------------------------------------------------
# guard soundness

def guard_key(contexts: np.ndarray, flavor: str, version: str) -> Tuple[np.ndarray, np.ndarray]:
    """What the role-equality guard compares: v5.17 mmu_role; v6.16 cpu_role, plus
    root_role for tdp/shadow/shadow_npt (init_kvm_tdp_mmu, shadow_mmu_init_context)."""
    k1 = contexts["role"].reshape(-1)
    if version == "v6.16" and flavor in ("tdp", "shadow", "shadow_npt"):
        k2 = contexts["root_role"].reshape(-1).astype(np.uint64)
    else:
        k2 = np.zeros_like(k1)
    return k1, k2


def _word_mask(fields: Sequence[str]) -> np.ndarray:
    """Per 8-byte word of a CONTEXT_DTYPE record, the bits belonging to ``fields``."""
    mask = np.zeros(CONTEXT_DTYPE.itemsize, dtype=np.uint8)
    for f in fields:
        dt, off = CONTEXT_DTYPE.fields[f][:2]
        mask[off:off + dt.itemsize] = 0xFF
    return mask.view(np.uint64).copy()


def _context_ids(ctx: np.ndarray, fields: Sequence[str]) -> np.ndarray:
    """Exact dense ids of distinct contexts, compared on ``fields`` (hash in the core,
    then every record checked against its group's first; exact fallback on collision)."""
    n = ctx.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    raw = np.ascontiguousarray(ctx).view(np.uint8).reshape(-1)
    wm = _word_mask(fields)
    h = np.empty(n, dtype=np.uint64)
    _core.hash_records(raw, n, CONTEXT_DTYPE.itemsize, wm, h)
    _, first, ids = np.unique(h, return_index=True, return_inverse=True)
    ids = ids.reshape(-1).astype(np.int64)
    if _core.records_equal_to(raw, n, CONTEXT_DTYPE.itemsize, wm, np.ascontiguousarray(first[ids])):
        return ids
    return _ids(_output_matrix(ctx, fields))


def _output_matrix(ctx: np.ndarray, fields: Sequence[str]) -> np.ndarray:
    n = ctx.shape[0]
    cols = [ctx[f].reshape(n, -1).astype(np.uint64) for f in fields]
    return np.ascontiguousarray(np.concatenate(cols, axis=1))


def _sorted_unique(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct values of a 1-D array and their counts, by one sort (numpy's hash
    path for plain np.unique is several times slower on int64 here)."""
    x = np.sort(x, kind="stable")
    if x.size == 0:
        return x, np.zeros(0, dtype=np.int64)
    edge = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1])))
    return x[edge], np.diff(np.append(edge, x.size))


def _rank(col: np.ndarray) -> Tuple[np.ndarray, int]:
    u, inv = np.unique(col, return_inverse=True)
    return inv.reshape(-1).astype(np.int64), int(u.size)


def _ids(mat: np.ndarray) -> np.ndarray:
    """Exact dense ids of the distinct rows of a 2-D integer matrix.

    Rows are hashed to 64 bits for one fast sort; every row is then checked
    against its group's first row, and on a (vanishingly unlikely) collision
    the exact column-by-column construction is used instead.
    """
    n = mat.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    m = np.ascontiguousarray(mat).view(np.uint64) if mat.dtype.itemsize == 8 else \
        np.ascontiguousarray(mat.astype(np.uint64))
    h = np.full(n, 0x9E3779B97F4A7C15, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(m.shape[1]):
            x = (h ^ m[:, j]) * np.uint64(0xBF58476D1CE4E5B9)
            h = (x ^ (x >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(29)
    _, first, ids = np.unique(h, return_index=True, return_inverse=True)
    ids = ids.reshape(-1)
    if np.array_equal(m, m[first[ids]]):
        return ids.astype(np.int64)
    ids = np.zeros(n, dtype=np.int64)
    for j in range(m.shape[1]):
        r, c = _rank(m[:, j])
        ids = _rank(ids * c + r)[0]
    return ids


@dataclass
class StaleGroup:
    """Role words under which the guard would serve a cached context to a state needing another."""

    role: int
    root_role: int
    hidden_input: str
    fields: List[str]
    example: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        return {"role": f"{self.role:#x}", "root_role": f"{self.root_role:#x}",
                "hidden_input": self.hidden_input, "fields": self.fields, "example": self.example}


def _varies_alone(configs: Sequence[Any], name: str) -> bool:
    seen = set()
    for c in configs:
        d = c.as_dict()
        rest = tuple((k, v) for k, v in d.items() if k != name)
        seen.add((rest, d[name]))
    rests = [r for r, _ in seen]
    return len(rests) != len(set(rests))


class StaleReport:
    """Stale role groups, overall and per hidden input (accumulates over chunks)."""

    def __init__(self, flavor: str, version: str, variant: str, hosts: Sequence[HostConfig],
                 epts: Sequence[EptConfig], max_examples: int = 3):
        self.flavor, self.version, self.variant = flavor, version, variant
        self.hosts, self.epts = list(hosts), list(epts)
        self.max_examples = max_examples
        self.rows = 0
        self._stale_by_input: Dict[str, set] = {}
        self.examples: Dict[str, List[StaleGroup]] = {}
        self._pairs: Optional[np.ndarray] = None  # unique (k1, k2, outputs...) rows
        self._roles: Optional[np.ndarray] = None
        # A config field is a testable hidden input only when two configs differ in it alone.
        self.hidden_inputs = list(GUEST_HIDDEN) + \
            [f"host.{f}" for f in HOST_FIELDS if _varies_alone(self.hosts, f)] + \
            ([f"ept.{f}" for f in EPT_FIELDS if _varies_alone(self.epts, f)]
             if flavor == "shadow_ept" else [])

    # -- accumulation ------------------------------------------------------
    def add(self, recs: np.ndarray, contexts: Sequence[np.ndarray], host_idx: Sequence[int],
            ept_idx: Sequence[int], fields: Sequence[str]) -> None:
        """One chunk: the same states under each (host, ept) pair, outputs compared on ``fields``.

        Every value of a guest hidden input that should be compared must be in
        the same chunk (sweep() arranges that)."""
        n = recs.shape[0]
        allctx = np.concatenate(contexts)
        rep = len(contexts)
        m = allctx.shape[0]
        self.rows += m
        k1, k2 = guard_key(allctx, self.flavor, self.version)
        out_id = _context_ids(allctx, fields)
        n_out = int(out_id.max(initial=0)) + 1
        key_mat = np.stack([k1, k2], axis=1)
        key_id = _ids(key_mat)
        # Inputs as (value, radix) columns: values need not be dense, only below
        # the radix, so mixed-radix codes identify input combinations exactly.
        cols: Dict[str, Tuple[np.ndarray, int]] = {}
        for reg, bits in CONSULTED.items():
            code = np.zeros(n, dtype=np.int64)
            for i, b in enumerate(bits.values()):
                code |= ((recs[reg] >> np.uint64(b)) & np.uint64(1)).astype(np.int64) << i
            cols[reg] = (np.tile(code, rep), 1 << len(bits))
        cols["maxphyaddr"] = (np.tile(recs["maxphyaddr"].astype(np.int64), rep), 256)
        for f in ("guest_amd", "guest_gbpages", "smm", "guest_mode"):
            cols[f] = (np.tile(recs[f].astype(np.int64), rep), 2)
        hidx = np.repeat(np.asarray(host_idx, dtype=np.int64), n)
        eidx = np.repeat(np.asarray(ept_idx, dtype=np.int64), n)
        nh, ne = len(self.hosts), len(self.epts)

        def config_col(drop: str) -> Tuple[np.ndarray, int]:
            # host and ept identity, with one field's value forgotten
            def ident(objs, prefix):
                seen: Dict[tuple, int] = {}
                out = []
                for o in objs:
                    t = tuple(v for k, v in o.as_dict().items() if f"{prefix}.{k}" != drop)
                    out.append(seen.setdefault(t, len(seen)))
                return np.asarray(out, dtype=np.int64)
            return ident(self.hosts, "host")[hidx] * ne + ident(self.epts, "ept")[eidx], nh * ne

        key_col = (key_id, int(key_id.max(initial=0)) + 1)
        for h in self.hidden_inputs:
            parts = [key_col, config_col(h)] + [c for name, c in cols.items() if name != h]
            code = np.zeros(m, dtype=np.int64)
            radix = 1
            for v, r in parts:
                if radix * r >= 1 << 62:
                    code, radix = _rank(code)
                code = code * r + v
                radix *= r
            if radix * n_out >= 1 << 62:
                code, radix = _rank(code)
            # states that differ in nothing but h, under one guard key, needing different outputs
            pair, _ = _sorted_unique(code * n_out + out_id)
            subs, cnt = _sorted_unique(pair // n_out)
            stale_subs = subs[cnt > 1]
            if stale_subs.size == 0:
                continue
            stale_rows = np.isin(code, stale_subs)
            uk = np.unique(key_id[stale_rows], return_index=True)[1]
            rows_k = np.flatnonzero(stale_rows)[uk]
            keys = {(int(k1[r]), int(k2[r])) for r in rows_k}
            bucket = self._stale_by_input.setdefault(h, set())
            new_keys = keys - bucket
            bucket |= keys
            ex = self.examples.setdefault(h, [])
            if len(ex) < self.max_examples and new_keys:
                # the first stale subgroup (in code order) of each not-yet-exemplified key
                rs = np.flatnonzero(stale_rows)
                rs = rs[np.argsort(code[rs], kind="stable")]
                first = np.unique(key_id[rs], return_index=True)[1]
                for pos in np.sort(first):
                    if len(ex) >= self.max_examples:
                        break
                    r = rs[pos]
                    key = (int(k1[r]), int(k2[r]))
                    if key not in new_keys or any((g.role, g.root_role) == key for g in ex):
                        continue
                    rows = np.flatnonzero(code == code[r])
                    r0 = rows[0]
                    r1 = rows[np.flatnonzero(out_id[rows] != out_id[r0])[0]]
                    ex.append(self._group(key, h, allctx, recs, n, r0, r1, hidx, eidx, fields))
        # overall: distinct (key, outputs) rows, merged across chunks
        kp = np.unique(key_id * n_out + out_id, return_index=True)[1]
        pairs = np.concatenate([key_mat[kp], _output_matrix(allctx[kp], fields)], axis=1)
        self._pairs = pairs if self._pairs is None else self._distinct(np.concatenate([self._pairs, pairs]))
        roles = key_mat[np.unique(key_id, return_index=True)[1]]
        self._roles = roles if self._roles is None else self._distinct(np.concatenate([self._roles, roles]))

    @staticmethod
    def _distinct(mat: np.ndarray) -> np.ndarray:
        return mat[np.unique(_ids(mat), return_index=True)[1]]

    def _group(self, key, h, allctx, recs, n, r0, r1, hidx, eidx, fields) -> StaleGroup:
        diff = [f for f in fields if not np.array_equal(allctx[f][r0], allctx[f][r1])]

        def side(r):
            d = {"state": describe_state(recs[r % n])}
            if len(self.hosts) > 1:
                d["host"] = self.hosts[hidx[r]].as_dict()
            if self.flavor == "shadow_ept" and len(self.epts) > 1:
                d["ept"] = self.epts[eidx[r]].as_dict()
            d.update({f: _fmt(allctx[f][r]) for f in diff})
            return d

        return StaleGroup(key[0], key[1], h, diff, {"a": side(r0), "b": side(r1)})

    # -- results -----------------------------------------------------------
    @property
    def distinct_roles(self) -> int:
        return 0 if self._roles is None else int(self._roles.shape[0])

    @property
    def stale_groups(self) -> int:
        """Role keys under which changing one hidden input alone changes a cached output."""
        keys: set = set()
        for h in self.hidden_inputs:
            keys |= self._stale_by_input.get(h, set())
        return len(keys)

    @property
    def stale_groups_any_inputs(self) -> int:
        """Role keys with more than one distinct cached output over all rows, whatever
        differs between them (several hidden inputs at once, or whole host configs)."""
        if self._pairs is None:
            return 0
        counts = np.bincount(_ids(self._pairs[:, :2]))
        return int(np.count_nonzero(counts > 1))

    @property
    def counts_by_input(self) -> Dict[str, int]:
        """Per hidden input: role groups where changing that input alone changes outputs."""
        return {h: len(self._stale_by_input.get(h, ())) for h in self.hidden_inputs}

    @property
    def sound(self) -> bool:
        return self.stale_groups == 0

    def groups(self) -> List[StaleGroup]:
        return [g for h in self.hidden_inputs for g in self.examples.get(h, [])]

    def summary(self) -> str:
        lines = [f"guard check {self.flavor} {self.version}/{self.variant}: {self.rows} inits, "
                 f"{self.distinct_roles} distinct roles, {self.stale_groups} stale role groups"]
        for h, c in self.counts_by_input.items():
            lines.append(f"  {h:<26} {c:>6} stale groups")
        for g in self.groups():
            lines.append(f"  e.g. role {g.role:#x}{f'/{g.root_role:#x}' if g.root_role else ''} "
                         f"via {g.hidden_input}: {', '.join(g.fields)} differ")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"flavor": self.flavor, "version": self.version, "variant": self.variant,
                "inits": self.rows, "distinct_roles": self.distinct_roles,
                "stale_groups": self.stale_groups,
                "stale_groups_any_inputs": self.stale_groups_any_inputs,
                "by_hidden_input": self.counts_by_input,
                "examples": [g.to_dict() for g in self.groups()]}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"hidden_input": h, "stale_groups": c}
                             for h, c in self.counts_by_input.items()])

    def __repr__(self) -> str:
        return (f"StaleReport({self.flavor} {self.version}/{self.variant}: "
                f"{self.stale_groups} stale of {self.distinct_roles} roles)")


def cached_fields(variant: Variant) -> Tuple[str, ...]:
    """Outputs the guard serves from cache (patch01-style variants recompute shadow_zero)."""
    if variant.inside_guard:
        return OUTPUT_FIELDS
    return tuple(f for f in OUTPUT_FIELDS if f not in ("shadow_zero", "shadow_bad_mt_xwr"))


def find_stale_roles(guests: np.ndarray, flavor: str, host: Optional[HostConfig] = None,
                     ept: Optional[EptConfig] = None, version: str = "v5.17",
                     variant: Union[str, Variant] = "v517",
                     hosts: Optional[Sequence[HostConfig]] = None,
                     epts: Optional[Sequence[EptConfig]] = None,
                     max_examples: int = 3) -> StaleReport:
    """Group states by the role the guard compares; report groups whose outputs differ.

    Each state is initialised under every host in ``hosts`` (default: just
    ``host``) and, for shadow_ept, every config in ``epts``. A group is stale
    for hidden input H when two of its states that differ only in H need
    different cached outputs: with the context cached for one, the guard
    would skip recomputation for the other.

    >>> import kvmmu
    >>> g = kvmmu.guests(cr0=0x80010001, cr4=0x20, efer=0x500, maxphyaddr=[36, 46])
    >>> rep = kvmmu.find_stale_roles(g, "shadow", kvmmu.HostConfig(tdp_enabled=False))
    >>> rep.stale_groups, rep.counts_by_input["maxphyaddr"]
    (1, 1)
    """
    recs = as_guest_records(guests).reshape(-1)
    _check_choice("flavor", flavor, FLAVORS)
    _check_choice("version", version, VERSIONS)
    var = resolve_variant(variant)
    hs = [_as_host(h) for h in (hosts if hosts is not None else [host])]
    es = [_as_ept(e) for e in (epts if epts is not None else [ept])] if flavor == "shadow_ept" else [_as_ept(ept)]
    rep = StaleReport(flavor, version, var.name, hs, es, max_examples)
    ctxs, hidx, eidx = [], [], []
    for (i, h), (j, e) in itertools.product(enumerate(hs), enumerate(es)):
        ctxs.append(init_mmu(recs, flavor, h, e, version=version, variant=var))
        hidx.append(i)
        eidx.append(j)
    rep.add(recs, ctxs, hidx, eidx, cached_fields(var))
    return rep


# ---------------------------------------------------------------------------
# enumeration and sweep

#: Host configurations a sweep covers by default: the three ways KVM runs.
DEFAULT_HOSTS: Dict[str, HostConfig] = {
    "intel_ept": HostConfig(tdp_enabled=True, shadow_phys_bits=46, host_tdp_is_amd=False,
                            max_tdp_level=4, max_huge_page_level=3),
    "amd_npt": HostConfig(tdp_enabled=True, shadow_phys_bits=48, host_tdp_is_amd=True,
                          tdp_root_level=4, max_tdp_level=4, max_huge_page_level=3),
    "shadow": HostConfig(tdp_enabled=False, shadow_phys_bits=46),
}

#: Which (flavor, host) pairs the kernel actually builds.
KERNEL_BUILDS = {
    "tdp": lambda h: h.tdp_enabled,
    "shadow": lambda h: not h.tdp_enabled,
    "shadow_npt": lambda h: h.tdp_enabled and h.host_tdp_is_amd,
    "shadow_ept": lambda h: h.tdp_enabled and not h.host_tdp_is_amd,
    "nested": lambda h: h.tdp_enabled,
}

DEFAULT_MAXPHYADDRS = (36, 39, 46, 48, 52)

#: The bits enumerated, outermost first: (register, bit, name).
SWEEP_BITS = (("cr0", 31, "PG"), ("cr0", 16, "WP"), ("cr4", 4, "PSE"), ("cr4", 5, "PAE"),
              ("cr4", 12, "LA57"), ("cr4", 20, "SMEP"), ("cr4", 21, "SMAP"), ("cr4", 22, "PKE"),
              ("efer", 10, "LMA"), ("efer", 11, "NX"))

REACHABILITY_RULES = (
    "EFER.LMA=1 requires CR0.PG=1 and CR4.PAE=1 (the CPU sets LMA only when paging is "
    "enabled with EFER.LME and CR4.PAE; CR0.PG cannot be cleared nor CR4.PAE cleared in long mode)",
    "MAXPHYADDR is at most 52 (enumerated set given by maxphyaddrs)",
    "CR0.PE, EFER.LME and other bits KVM does not consult are set consistently "
    "(PE=1 with PG; LME=1 with LMA) and never change a result",
)


def state_space_size(reachable_only: bool = True, maxphyaddrs: Sequence[int] = DEFAULT_MAXPHYADDRS) -> int:
    """Number of states :func:`enumerate_states` yields."""
    ctrl = sum(1 for _ in _control_words(reachable_only))
    return ctrl * 4 * 4 * len(maxphyaddrs)


def _control_words(reachable_only: bool) -> Iterator[Tuple[int, int, int]]:
    for bits in itertools.product((0, 1), repeat=len(SWEEP_BITS)):
        regs = {"cr0": 0, "cr4": 0, "efer": 0}
        on = {}
        for (reg, b, name), v in zip(SWEEP_BITS, bits):
            regs[reg] |= v << b
            on[name] = v
        if reachable_only:
            if on["LMA"] and not (on["PG"] and on["PAE"]):
                continue
            if on["PG"]:
                regs["cr0"] |= 1          # PE
            if on["LMA"]:
                regs["efer"] |= 1 << 8    # LME
        yield regs["cr0"], regs["cr4"], regs["efer"]


def enumerate_states(reachable_only: bool = True, maxphyaddrs: Sequence[int] = DEFAULT_MAXPHYADDRS,
                     chunk_size: int = 1 << 16) -> Iterator[np.ndarray]:
    """Every combination of the consulted control bits, smm, guest_mode, guest vendor,
    guest gbpages and each MAXPHYADDR, in GUEST_DTYPE chunks of at most about
    ``chunk_size`` states. The hidden guest inputs vary innermost and a chunk always
    holds every value of them for the control states it covers."""
    mpa = np.asarray(list(maxphyaddrs), dtype=np.int64)
    if mpa.size == 0 or mpa.min() < 0 or mpa.max() > 255:
        raise ValueError("maxphyaddrs must be a non-empty set of values in [0, 255]")
    inner = []
    for smm, gm, amd, gb, m in itertools.product((0, 1), (0, 1), (0, 1), (0, 1), mpa):
        inner.append((smm, gm, amd, gb, m))
    inner_arr = np.array(inner, dtype=np.int64)
    per_ctrl = inner_arr.shape[0]
    ctrl_per_chunk = max(1, chunk_size // per_ctrl)
    ctrl = list(_control_words(reachable_only))
    for start in range(0, len(ctrl), ctrl_per_chunk):
        block = np.array(ctrl[start:start + ctrl_per_chunk], dtype=np.uint64)
        k = block.shape[0]
        out = np.zeros(k * per_ctrl, dtype=GUEST_DTYPE)
        out["cr0"] = np.repeat(block[:, 0], per_ctrl)
        out["cr4"] = np.repeat(block[:, 1], per_ctrl)
        out["efer"] = np.repeat(block[:, 2], per_ctrl)
        tiled = np.tile(inner_arr, (k, 1))
        out["smm"] = tiled[:, 0] != 0
        out["guest_mode"] = tiled[:, 1] != 0
        out["guest_amd"] = tiled[:, 2] != 0
        out["guest_gbpages"] = tiled[:, 3] != 0
        out["maxphyaddr"] = tiled[:, 4]
        yield out


@dataclass
class SweepCell:
    """Results for one (version, flavor, host) of a sweep."""

    version: str
    flavor: str
    host: str
    kernel_builds: bool
    states: int = 0
    distinct_roles: int = 0
    variant_mismatch: Dict[str, int] = field(default_factory=dict)   # states differing from v517
    variant_fields: Dict[str, Dict[str, int]] = field(default_factory=dict)


class SweepResult:
    """Everything a sweep found: per-cell variant comparisons and per-variant guard reports."""

    def __init__(self, cells: List[SweepCell], guard: List[StaleReport], states: int,
                 inits: int, seconds: float, reachable_only: bool, maxphyaddrs: Sequence[int],
                 hosts: Dict[str, HostConfig]):
        self.cells = cells
        self.guard = guard
        self.states = states
        self.inits = inits
        self.seconds = seconds
        self.reachable_only = reachable_only
        self.maxphyaddrs = list(maxphyaddrs)
        self.hosts = hosts

    @property
    def differs(self) -> bool:
        """Any variant mismatch or stale guard group."""
        return any(any(c.variant_mismatch.values()) for c in self.cells) or \
            any(r.stale_groups for r in self.guard)

    def summary(self) -> str:
        space = "reachable" if self.reachable_only else "raw"
        lines = [f"kvmmu sweep: {self.states:,} {space} states per flavor and host "
                 f"(MAXPHYADDR {self.maxphyaddrs}); {self.inits:,} inits in {self.seconds:.2f} s "
                 f"({self.inits / max(self.seconds, 1e-9) / 1e6:.1f} M inits/s)"]
        variants = sorted({v for c in self.cells for v in c.variant_mismatch})
        if variants:
            lines.append("")
            lines.append("Variant mismatches against v517 (states whose context differs; * = a "
                         "configuration the kernel builds):")
            head = f"  {'version':<7} {'flavor':<11} {'host':<10} {'roles':>6} " + \
                " ".join(f"{v:>9}" for v in variants)
            lines.append(head)
            for c in self.cells:
                if not c.variant_mismatch:
                    continue
                mark = "*" if c.kernel_builds else " "
                lines.append(f"  {c.version:<7} {c.flavor:<11} {c.host:<9}{mark} {c.distinct_roles:>6} " +
                             " ".join(f"{c.variant_mismatch.get(v, 0):>9,}" for v in variants))
        if self.guard:
            lines.append("")
            lines.append("Guard soundness: stale role groups per hidden input (hosts: "
                         f"{', '.join(self.hosts)}; each also with tdp_enabled flipped):")
            inputs = []
            for r in self.guard:
                for h in r.hidden_inputs:
                    if h not in inputs:
                        inputs.append(h)
            lines.append(f"  {'version':<7} {'flavor':<11} {'variant':<8} {'roles':>6} {'stale':>6} " +
                         " ".join(f"{h.split('.')[-1][:12]:>12}" for h in inputs))
            for r in self.guard:
                cb = r.counts_by_input
                lines.append(f"  {r.version:<7} {r.flavor:<11} {r.variant:<8} {r.distinct_roles:>6} "
                             f"{r.stale_groups:>6} " +
                             " ".join(f"{cb[h] if h in cb else '-':>12}" for h in inputs))
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "states_per_cell": self.states, "inits": self.inits, "seconds": self.seconds,
            "reachable_only": self.reachable_only, "maxphyaddrs": self.maxphyaddrs,
            "hosts": {k: h.as_dict() for k, h in self.hosts.items()},
            "cells": [c.__dict__ for c in self.cells],
            "guard": [r.to_dict() for r in self.guard],
        }

    def to_frame(self):
        import pandas as pd

        rows = []
        for c in self.cells:
            for v, n in c.variant_mismatch.items():
                rows.append({"version": c.version, "flavor": c.flavor, "host": c.host,
                             "kernel_builds": c.kernel_builds, "variant": v, "mismatches": n})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"SweepResult({len(self.cells)} cells, {self.inits} inits, {self.seconds:.2f} s)"


# ---------------------------------------------------------------------------
# sweep pieces: one chunk of one (version, flavor) gives a mergeable partial;
# kvmmu.sweep merges them in order, kvmmu.dask runs them as tasks.

def _variant_ref(variant: Union[str, Variant]) -> Union[str, Variant]:
    """What a task carries for a variant: a built-in by name, so the worker uses its
    own object (the engine tells the built-in v517 apart by identity, which
    pickling would lose), a user Variant as is (cloudpickle carries its function)."""
    var = resolve_variant(variant)
    return var.name if BUILTIN_VARIANTS.get(var.name) is var else var


def _add_counts(x: Dict[str, int], y: Dict[str, int]) -> Dict[str, int]:
    out = dict(x)
    for k, v in y.items():
        out[k] = out.get(k, 0) + v
    return out


def merge_stale_reports(*reports: StaleReport) -> StaleReport:
    """One :class:`kvmmu.StaleReport` for the reports' chunks, in the order given.

    Equal to feeding the same chunks, in the same order, to one report's
    ``add``: row counts add up, stale key sets and distinct (key, output) rows
    are unions, and the example groups are the first ``max_examples`` stale
    keys in chunk order, each with the group that first showed it. No input is
    modified.

    Why the examples are exact: a report's list is a prefix of its chunks'
    first-occurrence sequence of stale keys, and is complete when it names
    every stale key it has. While the list so far is complete, the next
    report's entries for keys not yet stale follow it; once it is not, it
    already holds ``max_examples`` entries, which are final.
    """
    if not reports:
        raise ValueError("merge_stale_reports: nothing to merge")
    first = reports[0]
    for r in reports[1:]:
        for attr in ("flavor", "version", "variant", "hidden_inputs", "max_examples"):
            if getattr(first, attr) != getattr(r, attr):
                raise ValueError(f"merge_stale_reports: reports differ in {attr}: "
                                 f"{getattr(first, attr)!r} vs {getattr(r, attr)!r}")
    if len(reports) == 1:
        return first
    out = copy.copy(first)
    out.rows = sum(r.rows for r in reports)
    stale: Dict[str, set] = {}
    examples: Dict[str, list] = {}
    for r in reports:
        for h in r.examples:
            examples.setdefault(h, [])
        for h, ex in examples.items():
            seen = stale.get(h, set())
            if len(ex) == len(seen):  # the list so far names every key stale so far
                ex.extend(g for g in r.examples.get(h, ()) if (g.role, g.root_role) not in seen)
                del ex[first.max_examples:]
        for h, keys in r._stale_by_input.items():
            stale.setdefault(h, set()).update(keys)
    out._stale_by_input = stale
    out.examples = examples
    out._pairs = _distinct_rows([r._pairs for r in reports])
    out._roles = _distinct_rows([r._roles for r in reports])
    return out


def _distinct_rows(mats: Sequence[Optional[np.ndarray]]) -> Optional[np.ndarray]:
    """Distinct rows of the stacked matrices (their order is of no consequence)."""
    mats = [m for m in mats if m is not None]
    if not mats:
        return None
    if len(mats) == 1:
        return mats[0]
    stacked = np.concatenate(mats)
    distinct = getattr(StaleReport, "_distinct", None)  # the sequential sweep's own (hashing)
    return distinct(stacked) if distinct is not None else np.unique(stacked, axis=0)


@dataclass
class _CellPart:
    states: int = 0
    roles: Optional[np.ndarray] = None  # distinct (guard key word 1, word 2) rows
    variant_mismatch: Dict[str, int] = field(default_factory=dict)
    variant_fields: Dict[str, Dict[str, int]] = field(default_factory=dict)


@dataclass
class SweepPartial:
    """What one or more consecutive state chunks of one (version, flavor) give.

    ``cells`` (per host name: states, distinct guard-key rows, per-variant
    mismatch counts) and ``reports`` (per variant name: a StaleReport over
    those chunks) merge with :func:`merge_sweep_partials`.
    """

    version: str
    flavor: str
    cells: Dict[str, _CellPart]
    reports: Dict[str, StaleReport]
    inits: int = 0
    chunks: int = 0


def merge_sweep_partials(*parts: SweepPartial) -> SweepPartial:
    """The partials' chunks, in the order given (one version and flavor). No input is modified."""
    if not parts:
        raise ValueError("merge_sweep_partials: nothing to merge")
    first = parts[0]
    for p in parts[1:]:
        if (p.version, p.flavor) != (first.version, first.flavor):
            raise ValueError(f"merge_sweep_partials: {first.version}/{first.flavor} "
                             f"vs {p.version}/{p.flavor}")
    if len(parts) == 1:
        return first
    cells = {}
    for name in dict.fromkeys(n for p in parts for n in p.cells):
        cs = [p.cells[name] for p in parts if name in p.cells]
        mismatch: Dict[str, int] = {}
        fields: Dict[str, Dict[str, int]] = {}
        for c in cs:
            mismatch = _add_counts(mismatch, c.variant_mismatch)
            for v, d in c.variant_fields.items():
                fields[v] = _add_counts(fields.get(v, {}), d)
        cells[name] = _CellPart(sum(c.states for c in cs), _distinct_rows([c.roles for c in cs]),
                                mismatch, fields)
    reports = {v: merge_stale_reports(*[p.reports[v] for p in parts if v in p.reports])
               for v in dict.fromkeys(v for p in parts for v in p.reports)}
    return SweepPartial(first.version, first.flavor, cells, reports,
                        sum(p.inits for p in parts), sum(p.chunks for p in parts))


@dataclass(frozen=True)
class _SweepSpec:
    hosts: Dict[str, HostConfig]
    guard_hosts: Tuple[HostConfig, ...]
    epts: Tuple[EptConfig, ...]
    compare_variants: bool
    check_guard: bool
    threads: Optional[int]


class _SweepJob:
    """Everything a chunk task of one (version, flavor) needs but the chunk itself;
    one literal in the graph per (version, flavor), shared by its chunk tasks.
    (A plain class, so Dask passes it as an opaque value.)"""

    __slots__ = ("version", "flavor", "vs", "spec", "templates")

    def __init__(self, version: str, flavor: str, vs: Sequence[Variant], spec: _SweepSpec):
        self.version, self.flavor, self.spec = version, flavor, spec
        self.vs = [_variant_ref(v) for v in vs]
        es = list(spec.epts) if flavor == "shadow_ept" else [spec.epts[0]]
        # Building a StaleReport works out its hidden inputs (a few ms): once per
        # (version, flavor, variant) as kvmmu.sweep does, not once per chunk.
        self.templates = {v.name: StaleReport(flavor, version, v.name, list(spec.guard_hosts), es)
                          for v in vs} if spec.check_guard else {}

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)


def _fresh_report(template: StaleReport) -> StaleReport:
    """An empty report configured like ``template`` (which is left untouched)."""
    rep = copy.copy(template)
    rep.rows = 0
    rep._stale_by_input = {}
    rep.examples = {}
    rep._pairs = None
    rep._roles = None
    return rep


def _sweep_chunk(chunk: np.ndarray, job: _SweepJob) -> SweepPartial:
    """The body of kvmmu.sweep's chunk loop for one chunk, into a fresh partial."""
    version, flavor, spec = job.version, job.flavor, job.spec
    vs = [resolve_variant(v) for v in job.vs]
    n = chunk.shape[0]
    base = resolve_variant("v517")
    ept_list = list(spec.epts)
    ept_for_cmp = ept_list[0]
    th = spec.threads
    inits = 0
    cells = {name: _CellPart() for name in spec.hosts}
    if spec.compare_variants:
        for name, h in spec.hosts.items():
            cell = cells[name]
            cb = init_mmu(chunk, flavor, h, ept_for_cmp, version=version, variant=base, threads=th)
            inits += n
            cell.states += n
            k1, k2 = guard_key(cb, flavor, version)
            cell.roles = np.unique(np.stack([k1, k2.astype(np.uint64)], axis=1), axis=0)
            for v in vs:
                if v.name == "v517":
                    continue
                cv = init_mmu(chunk, flavor, h, ept_for_cmp, version=version, variant=v, threads=th)
                inits += n
                per = cell.variant_fields.setdefault(v.name, {})
                anyd = rows_differ(cb, cv)
                if anyd.any():
                    sel = np.flatnonzero(anyd)
                    for f in CONTEXT_FIELDS:
                        m = field_mismatch(cb[sel], cv[sel], f)
                        if m.any():
                            per[f] = per.get(f, 0) + int(np.count_nonzero(m))
                cell.variant_mismatch[v.name] = cell.variant_mismatch.get(v.name, 0) + \
                    int(np.count_nonzero(anyd))
    reports = {}
    if spec.check_guard:
        es = ept_list if flavor == "shadow_ept" else [ept_list[0]]
        for v in vs:
            rep = _fresh_report(job.templates[v.name])
            ctxs, hidx, eidx = [], [], []
            for (i, h), (j, e) in itertools.product(enumerate(spec.guard_hosts), enumerate(es)):
                ctxs.append(init_mmu(chunk, flavor, h, e, version=version, variant=v, threads=th))
                hidx.append(i)
                eidx.append(j)
                inits += n
            rep.add(chunk, ctxs, hidx, eidx, cached_fields(v))
            reports[v.name] = rep
    return SweepPartial(version, flavor, cells, reports, inits, 1)


def _sweep_plan(flavors, versions, variants, hosts, maxphyaddrs, reachable_only, epts,
                compare_variants, check_guard, threads):
    """Argument checks and the (version, flavor, variants) plan of a sweep."""
    for f in flavors:
        _check_choice("flavor", f, FLAVORS)
    for v in versions:
        _check_choice("version", v, VERSIONS)
    hosts = dict(DEFAULT_HOSTS if hosts is None else hosts)
    for k, h in hosts.items():
        hosts[k] = _as_host(h)
    ept_list = [_as_ept(e) for e in (epts if epts is not None else
                                     [EptConfig(), EptConfig(huge_page_level=2)])]
    guard_hosts: List[HostConfig] = []
    for h in hosts.values():
        for hh in (h, h.replace(tdp_enabled=not h.tdp_enabled)):
            if hh not in guard_hosts:
                guard_hosts.append(hh)
    plan = []
    for version in versions:
        vs = [resolve_variant(v) for v in (variants if variants is not None else
                                           (VARIANTS if version == "v5.17" else ("v517",)))]
        if version != "v5.17":
            vs = [v for v in vs if v.name == "v517"] or [resolve_variant("v517")]
        for flavor in flavors:
            plan.append((version, flavor, vs))
    spec = _SweepSpec(hosts, tuple(guard_hosts), tuple(ept_list), bool(compare_variants),
                      bool(check_guard), threads)
    return plan, spec


def finish_sweep(plan, spec: "_SweepSpec", parts: Sequence["SweepPartial"], seconds: float,
                 reachable_only: bool, maxphyaddrs: Sequence[int]) -> SweepResult:
    """A SweepResult from one merged partial per (version, flavor) of ``plan``."""
    cells: List[SweepCell] = []
    reports: List[StaleReport] = []
    inits = 0
    for (version, flavor, vs), part in zip(plan, parts):
        inits += part.inits
        for name, h in spec.hosts.items():
            cp = part.cells[name]
            cell = SweepCell(version, flavor, name, KERNEL_BUILDS[flavor](h))
            cell.states = cp.states
            cell.distinct_roles = 0 if cp.roles is None else int(cp.roles.shape[0])
            cell.variant_mismatch = dict(cp.variant_mismatch)
            cell.variant_fields = {v: dict(x) for v, x in cp.variant_fields.items()}
            if version == "v5.17" and len(vs) > 1:
                for v in vs:
                    if v.name != "v517":
                        cell.variant_mismatch.setdefault(v.name, 0)
            cells.append(cell)
        reports.extend(part.reports[v.name] for v in vs if v.name in part.reports)
    return SweepResult(cells, reports, state_space_size(reachable_only, maxphyaddrs), inits,
                       seconds, reachable_only, maxphyaddrs, spec.hosts)


def sweep(flavors: Sequence[str] = FLAVORS, versions: Sequence[str] = ("v5.17",),
          variants: Optional[Sequence[Union[str, Variant]]] = None,
          hosts: Optional[Dict[str, HostConfig]] = None,
          maxphyaddrs: Sequence[int] = DEFAULT_MAXPHYADDRS, reachable_only: bool = True,
          epts: Optional[Sequence[EptConfig]] = None, compare_variants: bool = True,
          check_guard: bool = True, chunk_size: int = 1 << 16,
          progress: Optional[Callable[[int, int], None]] = None) -> SweepResult:
    """Exhaustive sweep of the state space for flavors x versions x variants x hosts.

    For each cell, every variant is compared with ``v517`` (v5.17 only) and,
    with ``check_guard``, the guard is checked per variant with every host
    and its tdp_enabled-flipped twin as hidden inputs (and, for shadow_ept,
    every EptConfig in ``epts``: default huge_page_level 3 and 2). States
    are generated in chunks, so memory stays bounded whatever the size.
    ``progress(done, total)`` is called after each chunk (``total`` counts chunks of
    all (version, flavor) cells).

    >>> import kvmmu
    >>> r = kvmmu.sweep(flavors=["shadow"], maxphyaddrs=[46], check_guard=False)
    >>> r.states, [c.variant_mismatch["patch01"] for c in r.cells if c.kernel_builds]
    (10240, [0])
    """
    plan, spec = _sweep_plan(flavors, versions, variants, hosts, maxphyaddrs, reachable_only,
                             epts, compare_variants, check_guard, None)
    per_ctrl = 16 * len(list(maxphyaddrs))
    n_chunks = -(-sum(1 for _ in _control_words(reachable_only)) // max(1, chunk_size // per_ctrl))
    total = len(plan) * n_chunks
    done = 0
    t0 = time.perf_counter()
    merged = []
    for version, flavor, vs in plan:
        job = _SweepJob(version, flavor, vs, spec)
        part = None
        for chunk in enumerate_states(reachable_only, maxphyaddrs, chunk_size):
            nxt = _sweep_chunk(chunk, job)
            part = nxt if part is None else merge_sweep_partials(part, nxt)
            done += 1
            if progress is not None:
                progress(done, total)
        merged.append(part)
    return finish_sweep(plan, spec, merged, time.perf_counter() - t0, reachable_only, maxphyaddrs)
