"""File formats of the command line: GUEST_DTYPE states in, CONTEXT_DTYPE contexts out.

Formats, chosen by extension (or explicitly):

* ``jsonl``: one JSON object per line. Register values (``cr0``, ``cr4``,
  ``efer``) are ints, hex or decimal strings, or named flags (``"PG|WP|PE"``);
  booleans are ``true``/``false`` or 0/1. Missing fields take their defaults
  (``maxphyaddr`` 36, everything else 0); unknown fields are an error.
  Contexts are written with every bit-mask field (roles, tables,
  ``bad_mt_xwr``, ``pkru_mask``) as a fixed-width hex string and the tables
  as nested lists ``[bit 7][level - 1]``.
* ``csv``: a header row of field names, then one record per row. Array
  fields take one column per slot: ``guest_rsvd_0_4`` is row (bit 7) 0,
  level 5; ``permissions_3`` is byte 3.
* ``npy``: a structured numpy array (GUEST_DTYPE in, CONTEXT_DTYPE out).
* ``parquet``: the csv columns with native integer types (needs pyarrow).

Every reader reports a malformed record as ``file:line: field 'name':
expected ..., got ...`` (:class:`InputError`, a ValueError). Every writer
goes through :func:`atomic_output`: a temporary file in the target's
directory, renamed over the target only once it is complete.
"""
from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import os
import re
import sys
import tempfile
from typing import Any, Dict, IO, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from ._types import CONTEXT_DTYPE, GUEST_DEFAULTS, GUEST_DTYPE

FORMATS = ("jsonl", "csv", "npy", "parquet")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".npy": "npy",
              ".parquet": "parquet", ".pq": "parquet"}

#: Architectural bits of each register, by name (Intel SDM vol. 3 2.5, AMD APM vol. 2 3.1).
REGISTER_FLAGS: Dict[str, Dict[str, int]] = {
    "cr0": {"PE": 0, "MP": 1, "EM": 2, "TS": 3, "ET": 4, "NE": 5, "WP": 16, "AM": 18,
            "NW": 29, "CD": 30, "PG": 31},
    "cr4": {"VME": 0, "PVI": 1, "TSD": 2, "DE": 3, "PSE": 4, "PAE": 5, "MCE": 6, "PGE": 7,
            "PCE": 8, "OSFXSR": 9, "OSXMMEXCPT": 10, "UMIP": 11, "LA57": 12, "VMXE": 13,
            "SMXE": 14, "FSGSBASE": 16, "PCIDE": 17, "OSXSAVE": 18, "KL": 19, "SMEP": 20,
            "SMAP": 21, "PKE": 22, "CET": 23, "PKS": 24, "UINTR": 25, "LAM_SUP": 28},
    "efer": {"SCE": 0, "LME": 8, "LMA": 10, "NX": 11, "SVME": 12, "LMSLE": 13, "FFXSR": 14,
             "TCE": 15, "MCOMMIT": 17, "INTWB": 18, "AUTOIBRS": 21},
}
#: Other spellings accepted on input (kernel and manual names).
FLAG_ALIASES: Dict[str, Dict[str, str]] = {
    "cr0": {},
    "cr4": {"OSXMMEXCEPT": "OSXMMEXCPT", "PCID": "PCIDE", "LAM": "LAM_SUP"},
    "efer": {"NXE": "NX", "SVM": "SVME", "FFXSE": "FFXSR"},
}
_PREFIXES = {"cr0": ("X86_CR0_", "CR0_", "CR0."), "cr4": ("X86_CR4_", "CR4_", "CR4."),
             "efer": ("EFER_", "EFER.", "_EFER_")}

U64_MAX = (1 << 64) - 1
REGISTERS = ("cr0", "cr4", "efer")
BOOL_FIELDS = ("guest_amd", "guest_gbpages", "smm", "guest_mode")
#: Fields written as hex strings in jsonl/csv.
HEX_FIELDS = frozenset(("cr0", "cr4", "efer", "role", "root_role", "guest_rsvd",
                        "guest_bad_mt_xwr", "shadow_zero", "shadow_bad_mt_xwr", "pkru_mask"))
#: Optional per-step columns a replay input may carry besides GUEST_DTYPE's.
REPLAY_COLUMNS = {"vcpu": np.dtype(np.int64), "invalidate": np.dtype(np.bool_)}


class InputError(ValueError):
    """Malformed input; the message starts with ``file:line:`` (or ``file:``)."""


class FieldError(ValueError):
    """A single value that does not parse (the caller adds file, line and field)."""


# ---------------------------------------------------------------------------
# values

def _flag_table(reg: str) -> Dict[str, int]:
    return REGISTER_FLAGS[reg]


def _a(reg: str) -> str:
    return ("an " if reg == "efer" else "a ") + reg.upper()


def parse_register(value: Any, reg: str) -> int:
    """A register value: an int, a hex/decimal string or flag names joined by ``,`` ``|`` or ``+``.

    >>> hex(parse_register("PG,WP,PE", "cr0")), hex(parse_register("0x3706f0", "cr4"))
    ('0x80010001', '0x3706f0')
    >>> hex(parse_register("LME|LMA|NXE", "efer")), parse_register(2048, "efer")
    ('0xd00', 2048)
    """
    reg = reg.lower()
    table = _flag_table(reg)
    if isinstance(value, (bool, np.bool_)):
        raise FieldError(f"{_a(reg)} value (int, hex string or flag names), got {value!r}")
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if not 0 <= v <= U64_MAX:
            raise FieldError(f"a 64-bit {reg.upper()} value, got {v} (out of range)")
        return v
    if not isinstance(value, str):
        raise FieldError(f"{_a(reg)} value (int, hex string or flag names), "
                         f"got {type(value).__name__} {value!r}")
    s = value.strip()
    if not s:
        raise FieldError(f"{_a(reg)} value (int, hex string or flag names), got an empty string")
    total = 0
    for tok in re.split(r"[,|+]", s):
        tok = tok.strip()
        if not tok:
            raise FieldError(f"{reg.upper()} flag names separated by ',' or '|', got {value!r}")
        if tok[0].isdigit() or tok[0] == "-":
            v = _parse_int_token(tok)
            if v is None or not 0 <= v <= U64_MAX:
                raise FieldError(f"a 64-bit {reg.upper()} value (hex like 0x80050033 or decimal), "
                                 f"got {tok!r}")
            total |= v
            continue
        name = tok.upper()
        for p in _PREFIXES[reg]:
            if name.startswith(p):
                name = name[len(p):]
                break
        name = FLAG_ALIASES[reg].get(name, name)
        if name not in table:
            raise FieldError(f"{_a(reg)} flag name (one of {', '.join(table)}), got {tok!r}")
        total |= 1 << table[name]
    return total


def _parse_int_token(tok: str) -> Optional[int]:
    try:
        return int(tok, 0)
    except ValueError:
        pass
    try:
        return int(tok, 10)   # decimal with leading zeros
    except ValueError:
        return None


def parse_int(value: Any, lo: int, hi: int, what: str = "an integer") -> int:
    """An int from an int or a hex/decimal string, range-checked."""
    if isinstance(value, (bool, np.bool_)):
        raise FieldError(f"{what} in [{lo}, {hi}], got {value!r}")
    if isinstance(value, (int, np.integer)):
        v = int(value)
    elif isinstance(value, float) and value.is_integer():
        v = int(value)
    elif isinstance(value, str) and value.strip():
        v = _parse_int_token(value.strip())
        if v is None:
            raise FieldError(f"{what} in [{lo}, {hi}], got {value!r}")
    else:
        raise FieldError(f"{what} in [{lo}, {hi}], got {value!r}")
    if not lo <= v <= hi:
        raise FieldError(f"{what} in [{lo}, {hi}], got {v}")
    return v


_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f"}


def parse_bool(value: Any) -> bool:
    """A boolean from true/false, 0/1 (ints or strings), yes/no."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise FieldError(f"a boolean (true/false or 0/1), got {value!r}")


def format_flags(value: int, reg: str) -> str:
    """Names of the architectural bits set in ``value`` (unnamed bits as hex).

    >>> format_flags(0x80050033, "cr0")
    'PE|MP|ET|NE|WP|AM|PG'
    """
    table = _flag_table(reg)
    names = [n for n, b in sorted(table.items(), key=lambda kv: kv[1]) if value >> b & 1]
    rest = value & ~sum(1 << b for b in table.values()) & U64_MAX
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) if names else "0"


def hex_width(dtype: np.dtype) -> int:
    return 2 * np.dtype(dtype).itemsize


def fmt_hex(value: int, digits: int = 16) -> str:
    return f"0x{int(value):0{digits}x}"


# ---------------------------------------------------------------------------
# field-wise conversion of structured records

def _field_parser(name: str, dtype: np.dtype):
    """value -> python scalar for one scalar slot of field ``name``."""
    base = dtype.base if dtype.shape else dtype
    if name in REGISTERS:
        return lambda v: parse_register(v, name)
    if base.kind == "b":
        return parse_bool
    if base.kind in "iu":
        info = np.iinfo(base)
        lo, hi = int(info.min), int(info.max)
        what = "a hex string or integer" if name in HEX_FIELDS else "an integer"
        return lambda v: parse_int(v, lo, hi, what)
    raise TypeError(f"unsupported field type {dtype}")


def _flat_columns(dtype: np.dtype) -> List[Tuple[str, str, Tuple[int, ...]]]:
    """(column name, field name, index within the field) for every scalar slot."""
    cols = []
    for name in dtype.names:
        ft = dtype.fields[name][0]
        if ft.shape:
            for idx in np.ndindex(ft.shape):
                cols.append((name + "_" + "_".join(str(i) for i in idx), name, idx))
        else:
            cols.append((name, name, ()))
    return cols


def _scalar_out(name: str, base: np.dtype, v: Any) -> Any:
    if base.kind == "b":
        return bool(v)
    if name in HEX_FIELDS:
        return fmt_hex(int(v), hex_width(base))
    return int(v)


def record_to_json(rec: np.void) -> Dict[str, Any]:
    """One structured record as a JSON-ready dict (hex strings for bit masks)."""
    out: Dict[str, Any] = {}
    dt = rec.dtype
    for name in dt.names:
        ft = dt.fields[name][0]
        base = ft.base if ft.shape else ft
        v = rec[name]
        if ft.shape:
            out[name] = _nested(np.asarray(v).tolist(), lambda x: _scalar_out(name, base, x))
        else:
            out[name] = _scalar_out(name, base, v)
    return out


def _nested(x: Any, f) -> Any:
    if isinstance(x, list):
        return [_nested(y, f) for y in x]
    return f(x)


def _csv_row(rec: np.void, cols) -> List[str]:
    row = []
    for col, name, idx in cols:
        ft = rec.dtype.fields[name][0]
        base = ft.base if ft.shape else ft
        v = rec[name][idx] if idx else rec[name]
        s = _scalar_out(name, base, v)
        row.append(("1" if s else "0") if isinstance(s, bool) else str(s))
    return row


# ---------------------------------------------------------------------------
# format detection

def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else str(path)


def format_for(path: str, explicit: Optional[str] = None, default: Optional[str] = "jsonl") -> str:
    """The format of ``path``: ``explicit`` if given, else by extension, else ``default``."""
    if explicit:
        if explicit not in FORMATS:
            raise InputError(f"unknown format {explicit!r}; formats are {', '.join(FORMATS)}")
        return explicit
    if path == "-":
        if default is None:
            raise InputError("reading stdin needs --format")
        return default
    ext = os.path.splitext(str(path))[1].lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    if default is None:
        raise InputError(f"{path}: cannot tell the format from the extension {ext or '(none)'}; "
                         f"use .jsonl, .csv, .npy or .parquet, or --format")
    return default


def sniff(data: bytes) -> str:
    """Guess a format from the first bytes: npy, jsonl, csv, or 'trace' for anything else."""
    if data.startswith(b"\x93NUMPY"):
        return "npy"
    if data.startswith(b"PAR1"):
        return "parquet"
    text = data.decode("utf-8", "replace")
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith("{"):
            return "jsonl"
        cells = [c.strip().lower() for c in s.split(",")]
        if len(cells) > 1 and set(cells) & set(GUEST_DTYPE.names):
            return "csv"
        return "trace"
    return "jsonl"


def read_bytes(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("the parquet format needs pyarrow, which is not installed "
                         "(pip install pyarrow); use .jsonl, .csv or .npy instead") from None
    return pyarrow, pq


# ---------------------------------------------------------------------------
# readers

class Records(NamedTuple):
    """What a reader returns: the records, extra per-record columns, and where each came from."""

    records: np.ndarray
    extras: Dict[str, np.ndarray]
    lines: Optional[np.ndarray]     # source line of each record (text formats), else None
    source: str
    format: str

    def where(self, i: int) -> str:
        """``file:line`` (or ``file: index i``) of record ``i``."""
        if self.lines is not None:
            return f"{self.source}:{int(self.lines[i])}"
        return f"{self.source}: index {i}"


def _schema(dtype: np.dtype, extra: Mapping[str, np.dtype]) -> Dict[str, np.dtype]:
    sch = {n: dtype.fields[n][0] for n in dtype.names}
    for k, v in extra.items():
        sch[k] = np.dtype(v)
    return sch


def _defaults(dtype: np.dtype) -> Dict[str, Any]:
    if dtype == GUEST_DTYPE:
        return dict(GUEST_DEFAULTS)
    return {}


def _finish(dtype: np.dtype, extra: Mapping[str, np.dtype], values: Dict[str, list],
            present_extra: set, n: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    out = np.zeros(n, dtype=dtype)
    for name in dtype.names:
        ft = dtype.fields[name][0]
        col = values[name]
        if ft.base.kind == "u" and ft.base.itemsize == 8:
            out[name] = np.array(col, dtype=object).astype(np.uint64).reshape((n,) + ft.shape) \
                if n else 0
        else:
            out[name] = np.array(col, dtype=ft.base).reshape((n,) + ft.shape) if n else 0
    extras = {k: np.array(values[k], dtype=extra[k]) for k in extra if k in present_extra}
    return out, extras


def _reader_state(dtype, extra):
    schema = _schema(dtype, extra)
    parsers = {}
    for name, ft in schema.items():
        parsers[name] = _field_parser(name, ft)
    return schema, parsers


def _convert_value(name: str, ft: np.dtype, parser, raw: Any) -> Any:
    if ft.shape:
        arr = raw
        if not isinstance(arr, list):
            raise FieldError(f"a nested list of shape {list(ft.shape)}, got {raw!r}")
        try:
            a = np.array(arr, dtype=object)
        except ValueError:
            a = None
        if a is None or a.shape != ft.shape:
            raise FieldError(f"a nested list of shape {list(ft.shape)}, got {raw!r}")
        return [parser(v) for v in a.ravel()]
    return parser(raw)


def read_jsonl(text: str, source: str, dtype: np.dtype = GUEST_DTYPE,
               extra: Mapping[str, np.dtype] = {}) -> Records:
    """Records from JSON lines (blank lines are skipped)."""
    schema, parsers = _reader_state(dtype, extra)
    defaults = _defaults(dtype)
    values: Dict[str, list] = {k: [] for k in schema}
    present_extra: set = set()
    lines: List[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{source}:{lineno}: expected a JSON object with fields "
                             f"{', '.join(schema)}, got {type(obj).__name__}")
        unknown = [k for k in obj if k not in schema]
        if unknown:
            raise InputError(f"{source}:{lineno}: unknown field {unknown[0]!r}; "
                             f"fields are {', '.join(schema)}")
        for name, ft in schema.items():
            if name in obj:
                raw = obj[name]
                if name in extra:
                    present_extra.add(name)
            elif name in defaults:
                raw = defaults[name]
            elif name in extra:
                raw = 0
            else:
                raise InputError(f"{source}:{lineno}: field {name!r} is missing")
            try:
                v = _convert_value(name, ft, parsers[name], raw)
            except FieldError as exc:
                raise InputError(f"{source}:{lineno}: field {name!r}: expected {exc}") from None
            values[name].append(v)
        lines.append(lineno)
    recs, extras = _finish(dtype, extra, values, present_extra, len(lines))
    return Records(recs, extras, np.array(lines, dtype=np.int64), source, "jsonl")


def read_csv(text: str, source: str, dtype: np.dtype = GUEST_DTYPE,
             extra: Mapping[str, np.dtype] = {}) -> Records:
    """Records from csv with a header row; array fields as one column per slot."""
    schema, parsers = _reader_state(dtype, extra)
    defaults = _defaults(dtype)
    cols = _flat_columns(dtype) + [(k, k, ()) for k in extra]
    by_col = {c: (name, idx) for c, name, idx in cols}
    reader = csv.reader(_io.StringIO(text))
    header: Optional[List[str]] = None
    hline = 0
    for row in reader:
        if row and any(c.strip() for c in row):
            header = [c.strip() for c in row]
            hline = reader.line_num
            break
    if header is None:
        return Records(np.zeros(0, dtype=dtype), {}, np.zeros(0, np.int64), source, "csv")
    for i, c in enumerate(header):
        if c not in by_col:
            raise InputError(f"{source}:{hline}: unknown column {c!r} (column {i + 1}); "
                             f"columns are {', '.join(c for c, _, _ in cols)}")
        if header.index(c) != i:
            raise InputError(f"{source}:{hline}: column {c!r} appears twice")
    have = set(header)
    for c, name, idx in cols:
        if c not in have and name not in defaults and name not in extra:
            raise InputError(f"{source}:{hline}: column {c!r} is missing")
    present_extra = {k for k in extra if k in have}
    values: Dict[str, list] = {k: [] for k in schema}
    lines: List[int] = []
    for row in reader:
        lineno = reader.line_num
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise InputError(f"{source}:{lineno}: expected {len(header)} columns "
                             f"({', '.join(header)}), got {len(row)}")
        cells = dict(zip(header, row))
        for name, ft in schema.items():
            parser = parsers[name]
            try:
                if ft.shape:
                    vals = []
                    for idx in np.ndindex(ft.shape):
                        c = name + "_" + "_".join(str(i) for i in idx)
                        cur = c
                        vals.append(parser(cells[c]) if c in cells else 0)
                    values[name].append(vals)
                else:
                    cur = name
                    if name in cells:
                        values[name].append(parser(cells[name]))
                    elif name in defaults:
                        values[name].append(parser(defaults[name]))
                    else:
                        values[name].append(0)
            except FieldError as exc:
                raise InputError(f"{source}:{lineno}: field {cur!r}: expected {exc}") from None
        lines.append(lineno)
    recs, extras = _finish(dtype, extra, values, present_extra, len(lines))
    return Records(recs, extras, np.array(lines, dtype=np.int64), source, "csv")


def _from_structured(arr: np.ndarray, source: str, fmt: str, dtype: np.dtype,
                     extra: Mapping[str, np.dtype]) -> Records:
    if arr.dtype.names is None:
        raise InputError(f"{source}: expected a structured array with fields "
                         f"{', '.join(dtype.names)}, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    schema = _schema(dtype, extra)
    for name in arr.dtype.names:
        if name not in schema:
            raise InputError(f"{source}: unknown field {name!r}; fields are {', '.join(schema)}")
    defaults = _defaults(dtype)
    n = arr.shape[0]
    out = np.zeros(n, dtype=dtype)
    for name in dtype.names:
        ft = dtype.fields[name][0]
        if name not in arr.dtype.names:
            if name in defaults:
                out[name] = defaults[name]
                continue
            raise InputError(f"{source}: field {name!r} is missing")
        out[name] = _checked_column(arr[name], name, ft, source)
    extras = {}
    for k, t in extra.items():
        if k in arr.dtype.names:
            extras[k] = _checked_column(arr[k], k, t, source)
    return Records(out, extras, None, source, fmt)


def _checked_column(col: np.ndarray, name: str, ft: np.dtype, source: str) -> np.ndarray:
    base = ft.base
    if col.shape[1:] != ft.shape:
        raise InputError(f"{source}: field {name!r}: expected shape {ft.shape} per record, "
                         f"got {col.shape[1:]}")
    if col.dtype.kind == "b" and base.kind == "b":
        return col
    if col.dtype.kind not in "biu":
        # strings or objects: parse value by value
        parser = _field_parser(name, ft)
        flat = col.reshape(col.shape[0], -1)
        res = np.zeros(flat.shape, dtype=object)
        for i in range(flat.shape[0]):
            for j in range(flat.shape[1]):
                v = flat[i, j]
                v = v.decode() if isinstance(v, bytes) else v
                v = v.item() if isinstance(v, np.generic) else v
                try:
                    res[i, j] = parser(v)
                except FieldError as exc:
                    raise InputError(f"{source}: index {i}: field {name!r}: expected {exc}") from None
        return res.astype(base).reshape(col.shape) if base.kind != "u" or base.itemsize < 8 else \
            res.astype(np.uint64).reshape(col.shape)
    if base.kind == "b":
        lo, hi = 0, 1
    else:
        info = np.iinfo(base)
        lo, hi = int(info.min), int(info.max)
    flat = col.reshape(col.shape[0], -1)
    if flat.size:
        bad = (flat < lo) | (flat > hi) if col.dtype.kind != "b" else np.zeros(flat.shape, bool)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise InputError(f"{source}: index {int(i)}: field {name!r}: expected a value in "
                             f"[{lo}, {hi}], got {int(flat[i, j])}")
    return col.astype(base)


def read_npy(data: bytes, source: str, dtype: np.dtype = GUEST_DTYPE,
             extra: Mapping[str, np.dtype] = {}) -> Records:
    try:
        arr = np.load(_io.BytesIO(data), allow_pickle=False)
    except Exception as exc:   # numpy raises ValueError/OSError/EOFError/UnpicklingError
        raise InputError(f"{source}: not a readable .npy file: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{source}: expected a single array (.npy), got an archive")
    return _from_structured(arr, source, "npy", dtype, extra)


def read_parquet(data: bytes, source: str, dtype: np.dtype = GUEST_DTYPE,
                 extra: Mapping[str, np.dtype] = {}) -> Records:
    pa, pq = _pyarrow()
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:
        raise InputError(f"{source}: not a readable parquet file: {exc}") from None
    cols = _flat_columns(dtype) + [(k, k, ()) for k in extra]
    by_col = {c: (name, idx) for c, name, idx in cols}
    for c in table.column_names:
        if c not in by_col:
            raise InputError(f"{source}: unknown column {c!r}; columns are "
                             f"{', '.join(c for c, _, _ in cols)}")
    n = table.num_rows
    arrays: Dict[str, np.ndarray] = {}
    for name, ft in _schema(dtype, extra).items():
        if ft.shape:
            parts = []
            for idx in np.ndindex(ft.shape):
                c = name + "_" + "_".join(str(i) for i in idx)
                if c not in table.column_names:
                    raise InputError(f"{source}: column {c!r} is missing")
                parts.append(_arrow_column(table.column(c), c, source))
            arrays[name] = np.stack(parts, axis=1).reshape((n,) + ft.shape)
        elif name in table.column_names:
            arrays[name] = _arrow_column(table.column(name), name, source)
    arr = np.zeros(n, dtype=[(f, a.dtype, a.shape[1:]) for f, a in arrays.items()])
    for f, a in arrays.items():
        arr[f] = a
    return _from_structured(arr, source, "parquet", dtype, extra)


def _arrow_column(col, name: str, source: str) -> np.ndarray:
    if col.null_count:
        raise InputError(f"{source}: column {name!r} has missing values")
    try:
        a = col.to_numpy()
    except Exception:
        a = np.array(col.to_pylist(), dtype=object)
    if a.dtype.kind not in "biu":
        a = np.array(a.tolist(), dtype=object)
    return a


def read_records(path: str, fmt: Optional[str] = None, dtype: np.dtype = GUEST_DTYPE,
                 extra: Mapping[str, np.dtype] = {}, data: Optional[bytes] = None) -> Records:
    """Read ``path`` (``-`` = stdin) in format ``fmt`` (default: by extension, jsonl for stdin)."""
    fmt = format_for(path, fmt)
    source = display_name(path)
    if fmt == "parquet":
        _pyarrow()
    if data is None:
        data = read_bytes(path)
    if fmt == "npy":
        return read_npy(data, source, dtype, extra)
    if fmt == "parquet":
        return read_parquet(data, source, dtype, extra)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"{source}:{line}: not UTF-8 text (is this a {fmt} file?)") from None
    if fmt == "jsonl":
        return read_jsonl(text, source, dtype, extra)
    return read_csv(text, source, dtype, extra)


def read_guests(path: str, fmt: Optional[str] = None, extra: Mapping[str, np.dtype] = {},
                data: Optional[bytes] = None) -> Records:
    """GUEST_DTYPE records (plus ``extra`` columns, e.g. :data:`REPLAY_COLUMNS`) from a file."""
    return read_records(path, fmt, GUEST_DTYPE, extra, data)


def read_contexts(path: str, fmt: Optional[str] = None) -> np.ndarray:
    """CONTEXT_DTYPE records from a file written by :func:`write_records`."""
    return read_records(path, fmt, CONTEXT_DTYPE).records


# ---------------------------------------------------------------------------
# writers

def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_output(path: str, binary: bool = False) -> Iterator[IO]:
    """A file object for ``path`` that only replaces it when the block completes.

    The data goes to a temporary file in the same directory, which is flushed,
    synced and renamed over ``path`` at the end; on any exception (including
    KeyboardInterrupt) the temporary file is removed and ``path`` is untouched.
    ``-`` is stdout.
    """
    if path == "-":
        stream = sys.stdout.buffer if binary else sys.stdout
        yield stream
        stream.flush()
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        if binary:
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding="utf-8", newline="")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _is_text(fmt: str) -> bool:
    return fmt in ("jsonl", "csv")


def write_jsonl(f: IO, records: np.ndarray) -> None:
    for rec in records.reshape(-1):
        f.write(json.dumps(record_to_json(rec), separators=(",", ":")))
        f.write("\n")


def write_csv(f: IO, records: np.ndarray) -> None:
    cols = _flat_columns(records.dtype)
    w = csv.writer(f, lineterminator="\n")
    w.writerow([c for c, _, _ in cols])
    for rec in records.reshape(-1):
        w.writerow(_csv_row(rec, cols))


def _parquet_bytes(records: np.ndarray) -> bytes:
    pa, pq = _pyarrow()
    recs = records.reshape(-1)
    data = {}
    for c, name, idx in _flat_columns(recs.dtype):
        col = recs[name]
        data[c] = np.ascontiguousarray(col[(slice(None),) + idx] if idx else col)
    table = pa.table({k: pa.array(v) for k, v in data.items()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_records(path: str, records: np.ndarray, fmt: Optional[str] = None) -> None:
    """Write structured records to ``path`` (``-`` = stdout) atomically."""
    fmt = format_for(path, fmt)
    if fmt == "parquet":
        payload = _parquet_bytes(records)
        with atomic_output(path, binary=True) as f:
            f.write(payload)
        return
    if fmt == "npy":
        buf = _io.BytesIO()
        np.save(buf, np.ascontiguousarray(records), allow_pickle=False)
        with atomic_output(path, binary=True) as f:
            f.write(buf.getvalue())
        return
    if path == "-":
        # render fully first, so an error never leaves half a result on stdout
        buf = _io.StringIO()
        (write_jsonl if fmt == "jsonl" else write_csv)(buf, records)
        with atomic_output(path) as f:
            f.write(buf.getvalue())
        return
    with atomic_output(path) as f:
        (write_jsonl if fmt == "jsonl" else write_csv)(f, records)


def write_bytes(path: str, payload: bytes) -> None:
    with atomic_output(path, binary=True) as f:
        f.write(payload)
