"""The ``kvmmu`` command line: inspect, compute, sweep, compare, replay, bench.

Conventions shared by every command:

* ``--json`` prints a machine-readable result on stdout; human output goes to
  stdout too, diagnostics and progress to stderr (a progress bar only when
  stderr is a terminal and the work takes more than about a second).
* Exit status: 0 success, 1 differences found (``compare``, ``sweep
  --fail-on-diff``, ``replay --policy both``), 2 usage or input error, 130
  interrupted.
* Output files are written to a temporary name and renamed when complete.

:func:`main` takes an argv list and returns the exit status (it never calls
``sys.exit``), so it can be driven from tests.
"""
from __future__ import annotations

import argparse
import functools
import io as _stdio
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import io as kio
from ._types import (CONTEXT_DTYPE, FLAVORS, GUEST_DTYPE, VARIANTS, VERSIONS, EptConfig,
                     HostConfig, guests as make_guests)
from ._version import __version__

PROG = "kvmmu"
LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
CLI_POLICIES = {"skip": "skip_if_same_role", "force": "force"}


class UsageError(Exception):
    """A command-line mistake found after parsing (exit 2, with the command's usage)."""


# ---------------------------------------------------------------------------
# progress

def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress bar on stderr, shown only on a terminal and only after ``delay`` seconds.

    Use as a context manager; call :meth:`update` (``progress(done, total)``
    signature). A background ticker keeps the elapsed time moving while a
    long call runs without reporting. tqdm draws it when importable.
    """

    def __init__(self, desc: str, total: Optional[int] = None, stream=None,
                 delay: Optional[float] = None):
        self.desc = desc
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream)
        if delay is None:
            try:
                delay = float(os.environ.get("KVMMU_PROGRESS_DELAY", "1.0"))
            except ValueError:
                delay = 1.0
        self.delay = delay
        self.t0 = time.monotonic()
        self.shown = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._tqdm = None
        self._tqdm_mod = None
        self._width = 0

    def __enter__(self) -> "Progress":
        if self.enabled:
            try:
                import tqdm  # noqa: F401
                self._tqdm_mod = tqdm
            except ImportError:
                self._tqdm_mod = None
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        self.update(done, total)

    def update(self, done: int, total: Optional[int] = None) -> None:
        if total is not None:
            self.total = total
        self.done = done
        if self.enabled:
            self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            if self._stop.is_set() and self.shown is False:
                return
            elapsed = time.monotonic() - self.t0
            if not self.shown and elapsed < self.delay:
                return
            self.shown = True
            if self._tqdm_mod is not None:
                if self._tqdm is None:
                    self._tqdm = self._tqdm_mod.tqdm(total=self.total, desc=self.desc,
                                                     file=self.stream, leave=False)
                self._tqdm.n = self.done
                self._tqdm.refresh()
                return
            if self.total:
                frac = min(max(self.done / self.total, 0.0), 1.0)
                n = 24
                fill = int(frac * n)
                bar = "#" * fill + "." * (n - fill)
                text = f"{self.desc} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s"
            else:
                spin = "|/-\\"[int(elapsed * 5) % 4]
                text = f"{self.desc} {spin} {elapsed:5.1f}s"
            pad = max(0, self._width - len(text))
            self._width = len(text)
            try:
                self.stream.write("\r" + text + " " * pad)
                self.stream.flush()
            except (OSError, ValueError):
                self.enabled = False

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.shown:
                if self._tqdm is not None:
                    self._tqdm.close()
                else:
                    try:
                        self.stream.write("\r" + " " * self._width + "\r")
                        self.stream.flush()
                    except (OSError, ValueError):
                        pass


# ---------------------------------------------------------------------------
# argument types

def _register_type(reg: str) -> Callable[[str], int]:
    def conv(text: str) -> int:
        try:
            return kio.parse_register(text, reg)
        except kio.FieldError as exc:
            raise argparse.ArgumentTypeError(f"expected {exc}") from None
    conv.__name__ = reg.upper()
    return conv


def _int_range(lo: int, hi: int, name: str = "integer") -> Callable[[str], int]:
    def conv(text: str) -> int:
        try:
            return kio.parse_int(text, lo, hi, f"an {name}" if name[0] in "aeiou" else f"a {name}")
        except kio.FieldError as exc:
            raise argparse.ArgumentTypeError(f"expected {exc}") from None
    conv.__name__ = name
    return conv


def _u64(text: str) -> int:
    try:
        return kio.parse_int(text, 0, kio.U64_MAX, "a 64-bit value (hex or decimal)")
    except kio.FieldError as exc:
        raise argparse.ArgumentTypeError(f"expected {exc}") from None


_u64.__name__ = "u64"


def _page_level(text: str) -> int:
    t = text.strip().upper()
    names = {"4K": 1, "2M": 2, "1G": 3}
    if t in names:
        return names[t]
    try:
        return kio.parse_int(text, 1, 3, "a page level (1 = 4K, 2 = 2M, 3 = 1G)")
    except kio.FieldError as exc:
        raise argparse.ArgumentTypeError(f"expected {exc}") from None


_page_level.__name__ = "page level"


def _int_list(lo: int, hi: int) -> Callable[[str], List[int]]:
    def conv(text: str) -> List[int]:
        out = []
        for tok in text.split(","):
            try:
                out.append(kio.parse_int(tok.strip(), lo, hi, "an integer"))
            except kio.FieldError as exc:
                raise argparse.ArgumentTypeError(f"expected a comma-separated list of {exc}") from None
        return out
    conv.__name__ = "list"
    return conv


def _count(low: int, what: str):
    def conv(text: str) -> int:
        try:
            return kio.parse_int(text, low, 1 << 40, what)
        except kio.FieldError as exc:
            raise argparse.ArgumentTypeError(f"expected {exc}") from None
    conv.__name__ = "count"
    return conv


_nonneg = _count(0, "a non-negative integer")
_positive = _count(1, "a positive integer")


# ---------------------------------------------------------------------------
# shared option groups

class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def _host_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("host configuration (kvmmu.HostConfig; defaults: an Intel EPT host)")
    g.add_argument("--tdp", action=argparse.BooleanOptionalAction, default=None,
                   help="tdp_enabled: EPT/NPT in use for L1 (default: on; the kernel builds "
                        "flavor shadow only with --no-tdp)")
    g.add_argument("--host-maxphyaddr", type=_int_range(0, 255, "integer"), metavar="N",
                   help="host MAXPHYADDR, shadow_phys_bits (default 46)")
    g.add_argument("--amd-host", action="store_true",
                   help="host_tdp_is_amd: NPT-format TDP tables (default: Intel EPT)")
    g.add_argument("--no-host-gbpages", action="store_true",
                   help="the host has no 1 GiB pages (host_gbpages=False)")
    g.add_argument("--tdp-ad-disabled", action="store_true",
                   help="TDP accessed/dirty bits disabled")
    g.add_argument("--tdp-root-level", type=_int_range(0, 5, "integer"), metavar="N",
                   help="forced TDP root level (SVM: 4 or 5; default 0 = not forced)")
    g.add_argument("--max-tdp-level", type=_int_range(1, 5, "integer"), metavar="N",
                   help="max_tdp_level (default 4)")
    g.add_argument("--max-huge-page-level", type=_page_level, metavar="L",
                   help="host huge page level: 1/4K, 2/2M, 3/1G (default 3)")
    g.add_argument("--shadow-me-mask", type=_u64, metavar="MASK",
                   help="SME/MKTME bits, shadow_me_mask (default 0)")
    g.add_argument("--shadow-me-value", type=_u64, metavar="MASK",
                   help="bits of the mask KVM sets in SPTEs (v6.16; default 0)")
    return p


def _ept_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("nested EPT (kvm_init_shadow_ept_mmu arguments; flavor shadow_ept)")
    g.add_argument("--ept-execonly", action="store_true",
                   help="L1 may use execute-only EPT entries")
    g.add_argument("--ept-huge-page-level", type=_page_level, metavar="L",
                   help="L1's EPT huge page level: 1/4K, 2/2M, 3/1G (default 3)")
    g.add_argument("--ept-no-ad", action="store_true",
                   help="EPTP bit 6 clear (accessed/dirty flags off)")
    g.add_argument("--eptp-level", type=int, choices=(4, 5), metavar="{4,5}",
                   help="EPT walk length L1 chose (default 4)")
    g.add_argument("--root-mmu-smm", action=argparse.BooleanOptionalAction, default=None,
                   help="smm bit of root_mmu's role that v5.17 copies (default: each state's smm)")
    return p


def _engine_parent(default_flavor: str = "tdp", variant: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("what to compute")
    g.add_argument("--flavor", choices=FLAVORS, default=default_flavor,
                   help=f"which context init (default {default_flavor})")
    g.add_argument("--version", choices=VERSIONS, default="v5.17",
                   help="kernel version (default v5.17)")
    if variant:
        g.add_argument("--variant", choices=VARIANTS, default="v517",
                       help="v5.17 shadow-zero NX formulation (default v517)")
    return p


def _json_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    return p


def build_host(args: argparse.Namespace) -> HostConfig:
    kw: Dict[str, Any] = {}
    if getattr(args, "tdp", None) is not None:
        kw["tdp_enabled"] = args.tdp
    pairs = (("host_maxphyaddr", "shadow_phys_bits"), ("tdp_root_level", "tdp_root_level"),
             ("max_tdp_level", "max_tdp_level"), ("max_huge_page_level", "max_huge_page_level"),
             ("shadow_me_mask", "shadow_me_mask"), ("shadow_me_value", "shadow_me_value"))
    for a, f in pairs:
        v = getattr(args, a, None)
        if v is not None:
            kw[f] = v
    if getattr(args, "amd_host", False):
        kw["host_tdp_is_amd"] = True
    if getattr(args, "no_host_gbpages", False):
        kw["host_gbpages"] = False
    if getattr(args, "tdp_ad_disabled", False):
        kw["tdp_ad_disabled"] = True
    try:
        return HostConfig(**kw)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def build_ept(args: argparse.Namespace) -> EptConfig:
    kw: Dict[str, Any] = {}
    if getattr(args, "ept_execonly", False):
        kw["execonly"] = True
    if getattr(args, "ept_huge_page_level", None) is not None:
        kw["huge_page_level"] = args.ept_huge_page_level
    if getattr(args, "ept_no_ad", False):
        kw["accessed_dirty"] = False
    if getattr(args, "eptp_level", None) is not None:
        kw["eptp_level"] = args.eptp_level
    if getattr(args, "root_mmu_smm", None) is not None:
        kw["root_mmu_smm"] = args.root_mmu_smm
    try:
        return EptConfig(**kw)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _check_variant(version: str, variant: str) -> None:
    if version != "v5.17" and variant != "v517":
        raise UsageError(f"--variant {variant} applies to v5.17 only (under {version} the kernel "
                         "has one formulation; leave --variant at v517)")


def _kernel_note(flavor: str, host: HostConfig) -> Optional[str]:
    from .analysis import KERNEL_BUILDS

    if KERNEL_BUILDS[flavor](host):
        return None
    hint = {"shadow": "add --no-tdp", "tdp": "drop --no-tdp", "nested": "drop --no-tdp",
            "shadow_npt": "use --amd-host with TDP on", "shadow_ept": "use an Intel host with TDP on"}
    return (f"note: the kernel never builds flavor {flavor} on this host (tdp_enabled="
            f"{int(host.tdp_enabled)}, host_tdp_is_amd={int(host.host_tdp_is_amd)}); "
            f"{hint[flavor]} for the configuration KVM runs")


# ---------------------------------------------------------------------------
# output helpers

def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _h16(v: Any) -> str:
    return f"0x{int(v):016x}"


def bit_ranges(mask: int) -> str:
    """Bits set in ``mask`` as ranges, high first: ``'63, 46-51, 7'``.

    >>> bit_ranges(0xfc0003fffe080)
    '46-51, 13-29, 7'
    """
    mask = int(mask)
    if not mask:
        return "none"
    runs = []
    b = 0
    while b < 64:
        if mask >> b & 1:
            s = b
            while b < 64 and mask >> b & 1:
                b += 1
            runs.append((s, b - 1))
        else:
            b += 1
    return ", ".join(f"{s}-{e}" if e > s else f"{s}" for s, e in reversed(runs))


def decode_bad_mt_xwr(value: int) -> str:
    """bad_mt_xwr (index = memtype << 3 | XWR) as the memtypes and XWR combinations it rejects."""
    value = int(value)
    if not value:
        return "none"
    bytes_ = [(value >> (8 * m)) & 0xFF for m in range(8)]
    mts = [m for m in range(8) if bytes_[m] == 0xFF]
    common = 0xFF
    for m in range(8):
        if m not in mts:
            common &= bytes_[m]
    rebuilt = 0
    for m in range(8):
        rebuilt |= (0xFF if m in mts else common) << (8 * m)
    parts = []
    if mts:
        parts.append("memtype " + ", ".join(str(m) for m in mts))
    if common and len(mts) < 8:
        parts.append("XWR " + ", ".join(f"{x:03b}" for x in range(8) if common >> x & 1))
    if rebuilt != value:
        idx = [i for i in range(64) if value >> i & 1]
        return "indexes " + ", ".join(str(i) for i in idx)
    return "; ".join(parts)


def acc_label(a: int) -> str:
    return ("u" if a & 4 else "-") + ("w" if a & 2 else "-") + ("x" if a & 1 else "-")


def permissions_rows(perms: Sequence[int], pkru: int) -> List[Dict[str, Any]]:
    rows = []
    for i in range(16):
        byte = int(perms[i])
        rows.append({
            "index": i, "pfec": i << 1,
            "W": bool(i & 1), "U": bool(i & 2), "RSVD": bool(i & 4), "F": bool(i & 8),
            "byte": byte,
            "faulting_acc": [acc_label(a) for a in range(8) if byte >> a & 1],
            "pkru_ad": bool(pkru >> (2 * i) & 1), "pkru_wd": bool(pkru >> (2 * i + 1) & 1),
        })
    return rows


def _table_grid(title: str, table: np.ndarray, bad: int, note: Optional[str]) -> List[str]:
    lines = [title + (f"   [{note}]" if note else "")]
    lines.append(f"  {'level':<5} {'entry':<6} {'bit 7 clear':<18}  bit 7 set")
    masks = []
    for level in (5, 4, 3, 2, 1):
        a, b = int(table[0, level - 1]), int(table[1, level - 1])
        lines.append(f"  {level:<5} {LEVEL_NAMES[level]:<6} {_h16(a)}  {_h16(b)}")
        for m in (a, b):
            if m and m not in masks:
                masks.append(m)
    lines.append(f"  bad_mt_xwr {_h16(bad)}   ({decode_bad_mt_xwr(bad)})")
    if masks:
        lines.append("  bits:")
        for m in masks:
            lines.append(f"    {_h16(m)} = {bit_ranges(m)}")
    return lines


def _role_table(version: str, words: List[Tuple[str, int, bool]]) -> List[str]:
    """Field table for one or more role words: (label, value, base_only)."""
    from .roles import role_fields

    fields = role_fields(version)
    lines = ["  " + f"{'bits':<6} {'field':<16} " + " ".join(f"{lbl:>10}" for lbl, _, _ in words)]
    for name, pos, w in fields:
        bits = f"{pos}" if w == 1 else f"{pos}-{pos + w - 1}"
        cells = []
        for _, val, base_only in words:
            if base_only and pos >= 32:
                cells.append(f"{'':>10}")
            else:
                cells.append(f"{(int(val) >> pos) & ((1 << w) - 1):>10}")
        lines.append(("  " + f"{bits:<6} {name:<16} " + " ".join(cells)).rstrip())
    return lines


def describe_guest(rec: np.void) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for reg in kio.REGISTERS:
        v = int(rec[reg])
        out[reg] = {"value": _h16(v), "flags": kio.format_flags(v, reg)}
    out["maxphyaddr"] = int(rec["maxphyaddr"])
    for f in kio.BOOL_FIELDS:
        out[f] = bool(rec[f])
    return out


# ---------------------------------------------------------------------------
# inspect

INSPECT_EPILOG = """\
examples:
  kvmmu inspect --cr0 0x80050033 --cr4 0x3706f0 --efer 0xd01 --maxphyaddr 46
  kvmmu inspect --cr0 PG,WP,PE --cr4 PAE,PSE,SMEP --efer LME,LMA,NX --flavor shadow --no-tdp --version v6.16
  kvmmu inspect --cr0 PE,PG --cr4 PAE --efer LME,LMA --flavor shadow_ept --ept-execonly --json

Registers take hex or decimal values or flag names joined by ',' or '|'
(CR0: PE MP EM TS ET NE WP AM NW CD PG; CR4: VME PVI TSD DE PSE PAE MCE PGE PCE
OSFXSR OSXMMEXCPT UMIP LA57 VMXE SMXE FSGSBASE PCIDE OSXSAVE KL SMEP SMAP PKE CET
PKS UINTR LAM_SUP; EFER: SCE LME LMA NX SVME LMSLE FFXSR TCE MCOMMIT INTWB AUTOIBRS).
Tables are rsvd_bits_mask[bit 7 of the entry][level - 1]; permissions[i] is for
page-fault error code i << 1, bit a set = an access faults on a leaf with ACC a."""


def cmd_inspect(args: argparse.Namespace) -> int:
    from .arch import check_architectural
    from .engine import init_mmu

    _check_variant(args.version, args.variant)
    host = build_host(args)
    ept = build_ept(args)
    g = make_guests(cr0=args.cr0, cr4=args.cr4, efer=args.efer, maxphyaddr=args.maxphyaddr,
                    guest_amd=args.guest_amd, guest_gbpages=args.guest_gbpages, smm=args.smm,
                    guest_mode=args.guest_mode)
    chk = check_architectural(g, host)
    reasons = chk.explain(0)
    if args.strict and reasons:
        raise UsageError("--strict: the state is not architectural: " + "; ".join(reasons))
    note = _kernel_note(args.flavor, host)
    if note:
        _err(note)
    ctx = init_mmu(g, args.flavor, host, ept, version=args.version, variant=args.variant)[0]
    rec = g[0]
    pg = bool(int(rec["cr0"]) >> 31 & 1)
    guest_note = None
    if args.flavor != "shadow_ept" and not pg:
        guest_note = "not written while CR0.PG=0: a fresh context holds zeros"
    shadow_note = "not computed for nested_mmu" if args.flavor == "nested" else None
    perms = [int(x) for x in ctx["permissions"]]
    pkru = int(ctx["pkru_mask"])
    role = int(ctx["role"])
    root_role = int(ctx["root_role"])
    from .roles import decode_role

    if args.json:
        d: Dict[str, Any] = {
            "state": describe_guest(rec),
            "architectural": {"ok": not reasons, "reasons": reasons},
            "flavor": args.flavor, "version": args.version, "variant": args.variant,
            "kernel_builds": note is None,
            "host": host.as_dict(), "ept": ept.as_dict(),
            "role": _h16(role),
            "role_fields": decode_role(role, args.version),
        }
        if args.version == "v6.16":
            d["root_role"] = f"0x{root_role:08x}"
            d["root_role_fields"] = decode_role(root_role, args.version, base_only=True)
        d["root_level"] = int(ctx["root_level"])
        d["shadow_root_level"] = int(ctx["shadow_root_level"])
        for name in ("guest_rsvd", "shadow_zero"):
            d[name] = [[_h16(v) for v in row] for row in ctx[name]]
        d["guest_bad_mt_xwr"] = _h16(ctx["guest_bad_mt_xwr"])
        d["shadow_bad_mt_xwr"] = _h16(ctx["shadow_bad_mt_xwr"])
        d["permissions"] = perms
        d["permissions_decoded"] = permissions_rows(perms, pkru)
        d["pkru_mask"] = f"0x{pkru:08x}"
        _print_json(d)
        return 0

    L: List[str] = []
    L.append(f"state   cr0  {_h16(rec['cr0'])}  {kio.format_flags(int(rec['cr0']), 'cr0')}")
    L.append(f"        cr4  {_h16(rec['cr4'])}  {kio.format_flags(int(rec['cr4']), 'cr4')}")
    L.append(f"        efer {_h16(rec['efer'])}  {kio.format_flags(int(rec['efer']), 'efer')}")
    L.append(f"        maxphyaddr {int(rec['maxphyaddr'])}  guest_amd {int(rec['guest_amd'])}  "
             f"guest_gbpages {int(rec['guest_gbpages'])}  smm {int(rec['smm'])}  "
             f"guest_mode {int(rec['guest_mode'])}")
    if reasons:
        L.append("        (not architectural: " + "; ".join(reasons) + ")")
    hd = host.as_dict()
    L.append(f"flavor  {args.flavor}, {args.version}" +
             (f", variant {args.variant}" if args.version == "v5.17" else ""))
    L.append("host    " + " ".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                                   for k, v in hd.items()
                                   if k not in ("shadow_me_mask", "shadow_me_value") or v))
    if args.flavor == "shadow_ept":
        L.append("ept     " + " ".join(f"{k}={v}" for k, v in ept.as_dict().items()))
    L.append("")
    if args.version == "v5.17":
        L.append(f"mmu_role = {_h16(role)}   (base | ext << 32)")
        L.extend(_role_table("v5.17", [("mmu_role", role, False)]))
        L.append("")
        L.append(f"root_level {int(ctx['root_level'])}   shadow_root_level {int(ctx['shadow_root_level'])}")
    else:
        L.append(f"cpu_role  = {_h16(role)}   (base | ext << 32)")
        rr_note = "   (not written by init_kvm_nested_mmu)" if args.flavor == "nested" else ""
        L.append(f"root_role =         0x{root_role:08x}   (page role word){rr_note}")
        L.extend(_role_table("v6.16", [("cpu_role", role, False), ("root_role", root_role, True)]))
        L.append("")
        L.append(f"root_level {int(ctx['root_level'])} (cpu_role.base.level)   "
                 f"shadow_root_level {int(ctx['shadow_root_level'])} (root_role.level)")
    L.append("")
    L.extend(_table_grid("guest reserved bits (guest_rsvd_check)", ctx["guest_rsvd"],
                         int(ctx["guest_bad_mt_xwr"]), guest_note))
    L.append("")
    L.extend(_table_grid("shadow-zero reserved bits (shadow_zero_check)", ctx["shadow_zero"],
                         int(ctx["shadow_bad_mt_xwr"]), shadow_note))
    L.append("")
    L.append("permissions[i], pfec = i << 1 (F = faults on a leaf with that ACC: u=user w=write x=exec)"
             + (f"   [{guest_note}]" if guest_note else ""))
    L.append("  R = the RSVD position: SMAP override (CPL<3, EFLAGS.AC=1); for pkru: the leaf is user")
    accs = " ".join(f"{acc_label(a):>3}" for a in range(8))
    L.append(f"  {'i':>2} {'pfec':>4}  W U R F  byte  {accs}   pkru AD WD")
    for r in permissions_rows(perms, pkru):
        flags = " ".join("1" if r[k] else "." for k in ("W", "U", "RSVD", "F"))
        cells = " ".join(f"{'F' if r['byte'] >> a & 1 else '.':>3}" for a in range(8))
        L.append(f"  {r['index']:>2} 0x{r['pfec']:02x}  {flags}  0x{r['byte']:02x}  {cells}"
                 f"        {'1' if r['pkru_ad'] else '.'}  {'1' if r['pkru_wd'] else '.'}")
    L.append(f"pkru_mask 0x{pkru:08x}" + ("  (CR4.PKE not in effect)" if not pkru else ""))
    _out("\n".join(L))
    return 0


# ---------------------------------------------------------------------------
# compute

COMPUTE_EPILOG = """\
examples:
  echo '{"cr0": "0x80050033", "cr4": "0x3706f0", "efer": "0xd01", "maxphyaddr": 46}' | kvmmu compute - -o -
  printf 'cr0,cr4,efer,maxphyaddr\\n0x80050033,0x3706f0,0xd01,46\\nPE,0,0,36\\n' > states.csv
  kvmmu compute states.csv -o contexts.csv --flavor shadow --no-tdp
  kvmmu compute states.csv -o contexts.npy --version v6.16

Input fields are GUEST_DTYPE's: cr0 cr4 efer (int, hex string or flag names),
maxphyaddr, guest_amd, guest_gbpages, smm, guest_mode (missing: defaults).
Formats by extension: .jsonl .csv .npy .parquet (pyarrow); '-' is stdin/stdout
(jsonl unless --format). Output: CONTEXT_DTYPE, bit masks as hex strings, tables
as nested lists [bit 7][level - 1] (csv: one column per slot, guest_rsvd_0_4)."""


def _strict_check(recs: kio.Records, host: HostConfig) -> None:
    from .arch import check_architectural

    chk = check_architectural(recs.records, host)
    bad = np.flatnonzero(chk.reasons.reshape(-1))
    if bad.size:
        i = int(bad[0])
        raise kio.InputError(f"{recs.where(i)}: --strict: the state is not architectural: "
                             + "; ".join(chk.explain(i)))


def cmd_compute(args: argparse.Namespace) -> int:
    from .engine import init_mmu

    _check_variant(args.version, args.variant)
    host = build_host(args)
    ept = build_ept(args)
    in_ext = kio.EXTENSIONS.get(os.path.splitext(args.input)[1].lower()) if args.input != "-" else None
    in_fmt = args.input_format or in_ext or args.format
    if in_fmt is None and args.input != "-":
        data = kio.read_bytes(args.input)
        guess = kio.sniff(data)
        if guess == "trace":
            raise kio.InputError(f"{args.input}: cannot tell the format (not jsonl, csv or npy); "
                                 "use --input-format")
        recs = kio.read_guests(args.input, guess, data=data)
    else:
        recs = kio.read_guests(args.input, in_fmt or "jsonl")
    out_ext = kio.EXTENSIONS.get(os.path.splitext(args.output)[1].lower()) if args.output != "-" else None
    out_fmt = args.output_format or out_ext or args.format
    if out_fmt is None:
        if args.output != "-":
            raise kio.InputError(f"{args.output}: cannot tell the format from the extension; use "
                                 ".jsonl, .csv, .npy or .parquet, or --output-format")
        out_fmt = "jsonl"
    if out_fmt == "parquet":
        kio._pyarrow()
    if args.strict:
        _strict_check(recs, host)
    note = _kernel_note(args.flavor, host)
    if note:
        _err(note)
    with Progress("compute", None):
        ctx = init_mmu(recs.records, args.flavor, host, ept, version=args.version,
                       variant=args.variant)
        kio.write_records(args.output, ctx, out_fmt)
    n = int(recs.records.shape[0])
    if args.output != "-":
        if args.json:
            _print_json({"input": recs.source, "input_format": recs.format, "output": args.output,
                         "output_format": out_fmt, "states": n, "flavor": args.flavor,
                         "version": args.version, "variant": args.variant})
        else:
            _err(f"kvmmu compute: {n} state{'s' if n != 1 else ''} from {recs.source} -> "
                 f"{args.output} ({out_fmt})")
    return 0


# ---------------------------------------------------------------------------
# compare

COMPARE_EPILOG = """\
examples:
  kvmmu compare v5.17:v517 v5.17:patch01 --flavor shadow --no-tdp     # agree: exit 0
  kvmmu compare v5.17:v517 v5.17:literal --flavor shadow --no-tdp     # differ: exit 1
  kvmmu compare v5.17 v6.16 --flavor tdp --maxphyaddr 46 --json       # differ: exit 1

A formulation is VERSION[:VARIANT] (versions v5.17 v6.16; variants v517 patch01
final literal, v5.17 only). States: the exhaustive reachable space of
kvmmu.enumerate_states (--raw: every control-bit combination), or --input FILE.
Exit 0 when A and B agree on every state, 1 when they differ (like diff)."""


def parse_spec(text: str) -> Dict[str, str]:
    """``VERSION[:VARIANT]`` (a bare variant name means v5.17)."""
    t = text.strip()
    version, _, variant = t.partition(":")
    if not _ and version in VARIANTS:
        version, variant = "v5.17", version
    if version and not version.startswith("v"):
        version = "v" + version
    variant = variant or "v517"
    if version not in VERSIONS:
        raise UsageError(f"formulation {text!r}: version must be one of {', '.join(VERSIONS)}")
    if variant not in VARIANTS:
        raise UsageError(f"formulation {text!r}: variant must be one of {', '.join(VARIANTS)}")
    if version != "v5.17" and variant != "v517":
        raise UsageError(f"formulation {text!r}: variants exist for v5.17 only")
    return {"version": version, "variant": variant}


def _space_states(args: argparse.Namespace) -> Tuple[np.ndarray, str]:
    from .analysis import DEFAULT_MAXPHYADDRS, enumerate_states

    mpa = _flatten(args.maxphyaddr) or list(DEFAULT_MAXPHYADDRS)
    chunks = list(enumerate_states(reachable_only=not args.raw, maxphyaddrs=mpa))
    recs = np.concatenate(chunks) if chunks else np.zeros(0, GUEST_DTYPE)
    return recs, f"{'raw' if args.raw else 'reachable'} space, MAXPHYADDR {mpa}"


def _flatten(lists: Optional[List[List[int]]]) -> List[int]:
    out: List[int] = []
    for x in lists or []:
        for v in (x if isinstance(x, list) else [x]):
            if v not in out:
                out.append(v)
    return out


def _parse_u(v: Any) -> int:
    return int(v, 0) if isinstance(v, str) else int(v)


def describe_difference(ex: Dict[str, Any]) -> List[str]:
    """A compare() example's differing fields, slot by slot, with the bits that differ."""
    out: List[str] = []
    for f in ex["fields"]:
        a, b = ex["a"][f], ex["b"][f]
        if f in ("role", "root_role"):
            ra, rb = ex.get("role_a", {}), ex.get("role_b", {})
            diff = [k for k in ra if k in rb and ra[k] != rb[k]] if f == "role" else []
            out.append(f"{f}: a={a} b={b}" + (
                "  (" + ", ".join(f"{k} {ra[k]}->{rb[k]}" for k in diff) + ")" if diff else ""))
        elif f in ("guest_rsvd", "shadow_zero"):
            for row in range(2):
                for col in range(5):
                    x, y = _parse_u(a[row][col]), _parse_u(b[row][col])
                    if x == y:
                        continue
                    parts = []
                    if x & ~y:
                        parts.append(f"only a: {bit_ranges(x & ~y)}")
                    if y & ~x:
                        parts.append(f"only b: {bit_ranges(y & ~x)}")
                    out.append(f"{f}[{row}][{col}] {LEVEL_NAMES[col + 1]:<5} bit7={row}: "
                               f"a={_h16(x)} b={_h16(y)}  ({'; '.join(parts)})")
        elif f == "permissions":
            for i, (x, y) in enumerate(zip(a, b)):
                x, y = _parse_u(x), _parse_u(y)
                if x != y:
                    fa = " ".join(acc_label(k) for k in range(8) if x >> k & 1) or "none"
                    fb = " ".join(acc_label(k) for k in range(8) if y >> k & 1) or "none"
                    out.append(f"permissions[{i}] pfec 0x{i << 1:02x}: a faults on {fa}; b on {fb}")
        else:
            out.append(f"{f}: a={a} b={b}")
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from .analysis import compare

    a, b = parse_spec(args.a), parse_spec(args.b)
    host = build_host(args)
    ept = build_ept(args)
    if args.input:
        if args.raw or args.maxphyaddr:
            raise UsageError("--raw and --maxphyaddr choose the enumerated space; not with --input")
        recs_in = kio.read_guests(args.input, args.format)
        recs, where = recs_in.records, recs_in.source
    else:
        recs, where = _space_states(args)
    note = _kernel_note(args.flavor, host)
    if note:
        _err(note)
    with Progress("compare", None):
        res = compare(recs, args.flavor, a, b, host=host, ept=ept, max_examples=args.examples)
    if args.json:
        d = res.to_dict()
        d.update({"flavor": args.flavor, "states_from": where, "host": host.as_dict(),
                  "kernel_builds": note is None})
        _print_json(d)
        return 0 if res.agree else 1
    _out(f"states: {res.n:,} ({where})")
    _out(f"compare {res.label_a} (a) vs {res.label_b} (b): {res.n:,} states, {res.differing:,} differ")
    for f, c in res.counts.items():
        if c:
            _out(f"  {f:<18} {c:>10,} states differ")
    for ex in res.examples:
        _out("")
        _out(f"  state #{ex['index']}: " + ", ".join(f"{k}={v}" for k, v in ex["state"].items()))
        for line in describe_difference(ex):
            _out("    " + line)
    if res.examples:
        _out("")
    if res.agree:
        _out(f"{res.label_a} and {res.label_b} agree on all {res.n:,} states.")
    else:
        _out(f"{res.label_a} and {res.label_b} differ on {res.differing:,} of {res.n:,} states.")
    return 0 if res.agree else 1


# ---------------------------------------------------------------------------
# sweep

SWEEP_EPILOG = """\
examples:
  kvmmu sweep --flavor shadow --maxphyaddr 46
  kvmmu sweep --variant patch01 --variant final --no-guard --fail-on-diff
  kvmmu sweep --flavor shadow_npt --version v5.17 --version v6.16 --json
  kvmmu sweep                       # everything under v5.17 (about half a minute)
  kvmmu sweep --scheduler threads --chunk-size 16384   # Dask tasks (about half a minute)

Without options: kvmmu.sweep() - every flavor under v5.17, the four variants
compared with v517 on three hosts (intel_ept, amd_npt, shadow), and the role
guard checked for stale groups with each hidden input (guest CPUID, host and EPT
settings) varied. --fail-on-diff exits 1 on any variant mismatch in a
configuration the kernel builds, or any stale role group (the guard check finds
some whenever it varies inputs the kernel holds constant, as it does by default:
combine with --no-guard to gate on the variants only)."""

_HIDDEN_WHY = {
    "maxphyaddr": "guest CPUID",
    "guest_gbpages": "guest CPUID",
    "guest_amd": "guest CPUID",
}


def sweep_verdict(res) -> Dict[str, Any]:
    """Plain-language findings of a SweepResult (and the --fail-on-diff decision)."""
    variants = sorted({v for c in res.cells for v in c.variant_mismatch})
    lines: List[str] = []
    built_diff: Dict[str, int] = {}
    for v in variants:
        built = [(c, c.variant_mismatch.get(v, 0)) for c in res.cells if c.kernel_builds]
        unbuilt = [(c, c.variant_mismatch.get(v, 0)) for c in res.cells if not c.kernel_builds]
        nb = sum(n for _, n in built)
        built_diff[v] = nb
        where_u = sorted({f"{c.flavor}/{c.host}" for c, n in unbuilt if n})
        if nb == 0:
            s = f"{v}: the same contexts as v517 in every configuration the kernel builds"
            s += (f"; it differs only where the kernel never builds: {', '.join(where_u)}" if where_u
                  else " (and everywhere else swept)")
        else:
            where_b = sorted({f"{c.version} {c.flavor}/{c.host}" for c, n in built if n})
            s = (f"{v}: DIFFERS from v517 in {nb:,} states of configurations the kernel builds "
                 f"({', '.join(where_b)}) - not a pure refactoring")
        lines.append(s)
    # StaleReport.stale_groups counts role groups where one hidden input alone changes a
    # cached output; with every input fixed the outputs are a function of the state, so
    # a stale group always names the hidden input(s) behind it.
    stale_total = 0
    inputs: Dict[str, int] = {}
    for r in res.guard:
        stale_total += r.stale_groups
        for h, c in r.counts_by_input.items():
            if c:
                inputs[h] = inputs.get(h, 0) + c
    if res.guard:
        if stale_total == 0:
            lines.append("guard: no stale role group - the cached context is right for every "
                         "state sharing its role, even with the hidden inputs varied")
        else:
            named = []
            for h in inputs:
                why = _HIDDEN_WHY.get(h) or ("host/module configuration" if h.startswith("host.")
                                             else "L1's EPT capabilities")
                named.append(f"{h} ({why})")
            lines.append(
                "guard: stale role groups appear only when an input the role does not encode "
                f"changes under a cached role: {', '.join(named)}. KVM holds host settings "
                "constant and recomputes after a guest CPUID change (kvm_mmu_after_set_cpuid); "
                "a cache keyed on the role alone is not sound")
            if any(h.startswith("ept.") for h in inputs):
                lines.append(
                    "guard: L1's EPT capabilities (ept.*) are arguments of kvm_init_shadow_ept_mmu "
                    "that no role encodes and nothing invalidates guest_mmu for: only a VMX "
                    "capability MSR write outside VMX operation can change them")
    fail = any(built_diff.values()) or stale_total > 0
    return {"lines": lines, "variant_mismatches_in_kernel_builds": built_diff,
            "stale_groups": stale_total,
            "stale_inputs": inputs, "differs": fail}


def cmd_sweep(args: argparse.Namespace) -> int:
    from .analysis import DEFAULT_HOSTS, DEFAULT_MAXPHYADDRS, sweep

    flavors = _flatten(args.flavor) or list(FLAVORS)
    versions = _flatten(args.version) or ["v5.17"]
    variants = _flatten(args.variant) or None
    if variants and "v5.17" not in versions:
        raise UsageError("--variant applies to v5.17 only; add --version v5.17")
    mpa = _flatten(args.maxphyaddr) or list(DEFAULT_MAXPHYADDRS)
    host_names = _flatten(args.host)
    hosts = {k: DEFAULT_HOSTS[k] for k in host_names} if host_names else None
    if args.chunk_size < 1:
        raise UsageError("--chunk-size must be positive")
    if args.scheduler:
        try:
            from . import dask as kdask
        except ImportError as exc:
            raise UsageError(f"--scheduler needs the dask extra (pip install 'kvmmu[dask]'): {exc}")
        run_sweep = functools.partial(kdask.sweep, scheduler=args.scheduler)
    else:
        run_sweep = sweep
    with Progress("sweep", len(flavors) * len(versions)) as prog:
        res = run_sweep(flavors=flavors, versions=versions, variants=variants, hosts=hosts,
                    maxphyaddrs=mpa, reachable_only=not args.raw, compare_variants=not args.no_compare,
                    check_guard=not args.no_guard, progress=prog, chunk_size=args.chunk_size)
    verdict = sweep_verdict(res)
    status = 1 if (args.fail_on_diff and verdict["differs"]) else 0
    if args.json:
        d = res.to_dict()
        d["verdict"] = verdict
        d["exit_status"] = status
        _print_json(d)
        return status
    _out(res.summary())
    _out("")
    _out("Verdict:")
    for line in verdict["lines"] or ["nothing compared (--no-compare --no-guard)"]:
        _out("  - " + line)
    return status


# ---------------------------------------------------------------------------
# replay

REPLAY_EPILOG = """\
examples:
  kvmmu replay --workload boot --policy both
  kvmmu replay --workload context_switch --steps 4096 --vcpus 4 --flavor shadow --no-tdp
  kvmmu replay --workload cpuid_update --policy both --json
  printf '{"cr0":"0x80050033","cr4":"0x3706f0","efer":"0xd01","vcpu":0}\\n{"cr0":"0x80040033","cr4":"0x3706f0","efer":"0xd01","vcpu":1}\\n' > steps.jsonl
  kvmmu replay steps.jsonl --policy force

Inputs: a built-in --workload, a state file (.jsonl/.csv/.npy/.parquet, optional
columns vcpu and invalidate), or a KVM trace (trace-cmd report / ftrace / perf
script text, recognised by content) with --initial for the registers before the
first write and --kvm-resets-only to replay only the writes that made KVM reset
the MMU context. --policy both replays under the guard and forced, and exits 1
if any step's cached context differs from a forced recompute."""


def _parse_initial(text: str) -> Dict[str, int]:
    out: Dict[str, str] = {}
    last = None
    for piece in text.split(","):
        if "=" in piece:
            k, _, v = piece.partition("=")
            k = k.strip().lower()
            if k not in kio.REGISTERS:
                raise UsageError(f"--initial: unknown register {k!r} (use cr0=..,cr4=..,efer=..)")
            out[k] = v
            last = k
        elif last is not None:
            out[last] += "," + piece
        else:
            raise UsageError(f"--initial: expected REG=VALUE pairs, got {text!r}")
    res = {}
    for k, v in out.items():
        try:
            res[k] = kio.parse_register(v, k)
        except kio.FieldError as exc:
            raise UsageError(f"--initial {k}: expected {exc}") from None
    return res


def _workload_steps(args: argparse.Namespace):
    from .workloads import workload

    name = args.workload
    kw: Dict[str, Any] = {}
    if name == "boot":
        if args.steps is not None:
            kw["steady_steps"] = max(0, args.steps - 9)
    elif args.steps is not None:
        kw["n"] = args.steps
    if args.vcpus is not None:
        if name not in ("context_switch", "random"):
            raise UsageError(f"--vcpus applies to workloads context_switch and random, not {name}")
        kw["vcpus"] = args.vcpus
    if args.seed is not None:
        if name != "random":
            raise UsageError("--seed applies to --workload random only")
        kw["seed"] = args.seed
    if args.maxphyaddr is not None:
        if name not in ("boot", "cr0wp_toggle", "context_switch"):
            raise UsageError(f"--maxphyaddr applies to a trace and to the workloads boot, "
                             f"cr0wp_toggle and context_switch, not {name}")
        kw["maxphyaddr"] = args.maxphyaddr
    if args.guest_amd or args.guest_gbpages:
        raise UsageError("--guest-amd and --guest-gbpages apply to a KVM trace")
    return workload(name, **kw)


def _load_trace(path: str, data: bytes, args: argparse.Namespace):
    try:
        from .traces import TraceParseError, parse_trace
    except ImportError as exc:
        raise kio.InputError(f"{kio.display_name(path)}: looks like a KVM trace, but trace parsing "
                             f"(kvmmu.traces) is not available: {exc}") from None
    initial = _parse_initial(args.initial) if args.initial else None
    name = kio.display_name(path)
    try:
        text = data.decode("utf-8", "replace")
        return parse_trace(text.splitlines(), initial=initial,
                           maxphyaddr=args.maxphyaddr if args.maxphyaddr is not None else 36,
                           guest_amd=args.guest_amd, guest_gbpages=args.guest_gbpages, name=name)
    except TraceParseError as exc:
        raise kio.InputError(str(exc)) from None


def _count(x: Any) -> int:
    if x is None:
        return 0
    if isinstance(x, (int, np.integer)):
        return int(x)
    try:
        return len(x)
    except TypeError:
        return int(x)


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay

    if (args.trace is None) == (args.workload is None):
        raise UsageError("give either a TRACE file or --workload")
    _check_variant(args.version, args.variant)
    host = build_host(args)
    ept = build_ept(args)
    threads: Optional[List[str]] = None
    parse_info: Optional[Dict[str, Any]] = None
    source: str
    if args.workload is not None:
        for opt, val in (("--initial", args.initial), ("--kvm-resets-only", args.kvm_resets_only),
                         ("--format", args.format)):
            if val:
                raise UsageError(f"{opt} applies to a TRACE file, not --workload")
        w = _workload_steps(args)
        g, vcpu, inv = w.guests, w.vcpu, w.invalidate
        source = f"workload {w.name}"
    else:
        if args.steps is not None or args.vcpus is not None or args.seed is not None:
            raise UsageError("--steps, --vcpus and --seed apply to --workload")
        path = args.trace
        fmt = args.format
        data = None
        if fmt is None:
            ext = os.path.splitext(path)[1].lower() if path != "-" else ""
            fmt = kio.EXTENSIONS.get(ext)
            if fmt is None:
                data = kio.read_bytes(path)
                fmt = kio.sniff(data)
        if fmt == "trace":
            if data is None:
                data = kio.read_bytes(path)
            tr = _load_trace(path, data, args)
            g = tr.guests
            vcpu = np.asarray(tr.vcpu, dtype=np.int64)
            inv = None
            threads = list(tr.threads) if getattr(tr, "threads", None) is not None else None
            resets = np.asarray(tr.kvm_reset, dtype=bool)
            parse_info = {"format": getattr(tr, "format", None), "steps": int(len(g)),
                          "kvm_resets": int(np.count_nonzero(resets)),
                          "skipped_lines": _count(getattr(tr, "skipped", 0)),
                          "reads_adopted": _count(getattr(tr, "reads_adopted", 0)),
                          "failed_writes": _count(getattr(tr, "failed_writes", 0))}
            if args.kvm_resets_only:
                if args.version != "v5.17":
                    _err("note: the trace parser marks KVM MMU resets by the v5.17 rules; "
                         f"--kvm-resets-only under {args.version} uses those")
                g, vcpu = g[resets], vcpu[resets]
            source = kio.display_name(path)
        else:
            if args.initial or args.kvm_resets_only:
                raise UsageError("--initial and --kvm-resets-only apply to a KVM trace, "
                                 f"not a {fmt} state file")
            recs = kio.read_guests(path, fmt, extra=kio.REPLAY_COLUMNS, data=data)
            g = recs.records
            vcpu = recs.extras.get("vcpu")
            inv = recs.extras.get("invalidate")
            source = recs.source
    if g.shape[0] == 0:
        raise kio.InputError(f"{source}: no steps to replay")
    note = _kernel_note(args.flavor, host)
    if note:
        _err(note)
    policies = ["skip", "force"] if args.policy == "both" else [args.policy]
    results = {}
    with Progress("replay", len(policies)) as prog:
        for i, p in enumerate(policies):
            results[p] = replay(g, args.flavor, host, ept, version=args.version,
                                variant=args.variant, policy=CLI_POLICIES[p],
                                invalidate=inv, vcpu=vcpu)
            prog.update(i + 1)
    stale = None
    if args.policy == "both":
        a, b = results["skip"].contexts, results["force"].contexts
        n = a.shape[0]
        diff = np.zeros(n, dtype=bool)
        fields = {}
        for f in CONTEXT_DTYPE.names:
            m = (a[f].reshape(n, -1) != b[f].reshape(n, -1)).any(axis=1)
            if m.any():
                fields[f] = int(np.count_nonzero(m))
            diff |= m
        stale = {"steps": int(np.count_nonzero(diff)), "fields": fields,
                 "first_steps": [int(i) for i in np.flatnonzero(diff)[:5]]}
    status = 1 if stale and stale["steps"] else 0

    def name_of(vid: int) -> Optional[str]:
        if threads is not None and 0 <= vid < len(threads):
            return threads[vid]
        return None

    if args.json:
        d: Dict[str, Any] = {"source": source, "flavor": args.flavor, "version": args.version,
                             "variant": args.variant, "host": host.as_dict()}
        if parse_info is not None:
            d["trace"] = dict(parse_info, replayed=int(g.shape[0]),
                              kvm_resets_only=bool(args.kvm_resets_only))
        d["policies"] = {}
        for p, r in results.items():
            per = []
            for vid, c in r.per_vcpu().items():
                per.append(dict(c, vcpu=vid, thread=name_of(vid)))
            d["policies"][p] = {"policy": r.policy, "inits": r.inits, "recomputes": r.recomputes,
                                "skips": r.skips, "skip_fraction": r.skip_fraction, "per_vcpu": per}
        if stale is not None:
            d["stale"] = stale
        d["exit_status"] = status
        _print_json(d)
        return status
    if parse_info is not None:
        _out(f"trace {source} ({parse_info['format'] or 'unknown format'}): "
             f"{parse_info['steps']:,} steps, {parse_info['kvm_resets']:,} KVM MMU resets, "
             f"{parse_info['skipped_lines']:,} skipped lines, {parse_info['reads_adopted']:,} "
             f"adopted reads, {parse_info['failed_writes']:,} failed writes"
             + (f"; replaying the {int(g.shape[0]):,} reset steps" if args.kvm_resets_only else ""))
    else:
        _out(f"input {source}: {int(g.shape[0]):,} steps")
    for p, r in results.items():
        _out(f"policy {p}: {r.inits:,} inits, {r.recomputes:,} recomputed, {r.skips:,} skipped "
             f"({100 * r.skip_fraction:.1f}%)")
    both = len(policies) > 1
    cols = ["inits"] + [f"recomputed({p})" if both else "recomputed" for p in policies] + \
        ([("skipped(skip)" if both else "skipped")] if "skip" in policies else [])
    per = {p: r.per_vcpu() for p, r in results.items()}
    has_names = threads is not None
    rows = []
    for vid, c in per[policies[0]].items():
        vals = [c["inits"]] + [per[p][vid]["recomputes"] for p in policies] + \
            ([per["skip"][vid]["skips"]] if "skip" in policies else [])
        rows.append((vid, name_of(vid) or "", [f"{v:,}" for v in vals]))
    widths = [max([len(c)] + [len(r[2][i]) for r in rows]) for i, c in enumerate(cols)]
    tw = max([len("thread")] + [len(r[1]) for r in rows]) if has_names else 0
    _out(f"  {'vcpu':>4} " + (f"{'thread':<{tw}} " if has_names else "") +
         " ".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for vid, label, vals in rows:
        _out(f"  {vid:>4} " + (f"{label:<{tw}} " if has_names else "") +
             " ".join(f"{v:>{w}}" for v, w in zip(vals, widths)))
    if stale is not None:
        if stale["steps"]:
            _out(f"stale: {stale['steps']:,} step(s) where the guard kept a context that differs "
                 f"from a forced recompute (fields: {', '.join(stale['fields'])}; first at step "
                 f"{stale['first_steps'][0]})")
        else:
            _out("no stale step: every context the guard kept equals a forced recompute")
    return status


# ---------------------------------------------------------------------------
# bench

BENCH_EPILOG = """\
examples:
  kvmmu bench --quick
  kvmmu bench --quick --plot bench.png --json

Measures (1) replay through the cached context, guard honoured (skip) vs forced
(force), in ns per init on the boot and context_switch workloads, and (2) batch
throughput of kvmmu.init_mmu against the pure-Python kvmmu.reference.init_mmu_one
(the reference is timed on up to a few hundred states and scaled)."""


def _best(fn: Callable[[], Any], budget: float, min_runs: int = 2) -> float:
    """Best wall time of repeated calls within ``budget`` seconds."""
    best = float("inf")
    t_end = time.perf_counter() + budget
    runs = 0
    while runs < min_runs or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        runs += 1
    return best


def cmd_bench(args: argparse.Namespace) -> int:
    from . import reference
    from .engine import init_mmu
    from .replay import replay
    from .workloads import workload

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed "
                             "(pip install matplotlib)") from None
        if not args.plot.lower().endswith((".png", ".svg", ".pdf")):
            raise UsageError("--plot FILE must end in .png, .svg or .pdf")
    host = build_host(args)
    flavor = args.flavor
    quick = args.quick
    budget = 0.05 if quick else 0.3
    sizes = [1, 100, 10_000, 100_000] if quick else [1, 100, 10_000, 1_000_000]
    ref_n = 60 if quick else 300
    steps = [("replay", w) for w in ("boot", "context_switch")] + [("batch", n) for n in sizes]
    replay_rows = []
    batch_rows = []
    with Progress("bench", len(steps)) as prog:
        done = 0
        for wname in ("boot", "context_switch"):
            w = workload(wname, steady_steps=1024 if quick else 8192) if wname == "boot" else \
                workload(wname, n=1024 if quick else 8192)
            row: Dict[str, Any] = {"workload": wname, "steps": int(w.guests.shape[0])}
            for p in ("skip", "force"):
                r = replay(w.guests, flavor, host, version=args.version, policy=CLI_POLICIES[p],
                           invalidate=w.invalidate, vcpu=w.vcpu)
                t = _best(lambda: replay(w.guests, flavor, host, version=args.version,
                                         policy=CLI_POLICIES[p], invalidate=w.invalidate,
                                         vcpu=w.vcpu), budget)
                row[f"{p}_ns_per_init"] = t / r.inits * 1e9
                if p == "skip":
                    row["skipped"] = r.skips
            replay_rows.append(row)
            done += 1
            prog.update(done)
        big = workload("random", n=max(sizes)).guests
        names = GUEST_DTYPE.names
        ref_states = [{n: big[i][n].item() for n in names} for i in range(ref_n)]
        ept = EptConfig()
        t = _best(lambda: [reference.init_mmu_one(s, flavor, host, ept, args.version)
                           for s in ref_states], budget, min_runs=1)
        ref_ns = t / ref_n * 1e9
        for n in sizes:
            g = np.ascontiguousarray(big[:n])
            out = np.empty(n, dtype=CONTEXT_DTYPE)
            t = _best(lambda: init_mmu(g, flavor, host, ept, version=args.version, out=out),
                      budget)
            ns = t / n * 1e9
            batch_rows.append({"batch": n, "kvmmu_ns_per_state": ns,
                               "kvmmu_states_per_s": n / t,
                               "reference_ns_per_state": ref_ns,
                               "speedup": ref_ns / ns})
            done += 1
            prog.update(done)
    result = {"flavor": flavor, "version": args.version, "quick": quick,
              "threads": os.environ.get("OMP_NUM_THREADS"),
              "replay": replay_rows, "batch": batch_rows,
              "reference_states_timed": ref_n}
    if args.plot:
        _bench_plot(result, args.plot)
        result["plot"] = args.plot
    if args.json:
        _print_json(result)
        return 0
    _out(f"replay through the cached context ({flavor}, {args.version}): ns per init")
    _out(f"  {'workload':<16} {'steps':>7} {'skipped':>8} {'skip':>9} {'force':>9}")
    for r in replay_rows:
        _out(f"  {r['workload']:<16} {r['steps']:>7,} {r['skipped']:>8,} "
             f"{r['skip_ns_per_init']:>9.1f} {r['force_ns_per_init']:>9.1f}")
    _out("")
    _out(f"batch init_mmu vs reference.init_mmu_one ({flavor}, {args.version}; reference timed on "
         f"{ref_n} states)")
    _out(f"  {'batch':>9} {'kvmmu ns/state':>15} {'states/s':>12} {'reference ns':>13} {'speedup':>9}")
    for r in batch_rows:
        _out(f"  {r['batch']:>9,} {r['kvmmu_ns_per_state']:>15.1f} {r['kvmmu_states_per_s']:>12.3g} "
             f"{r['reference_ns_per_state']:>13.0f} {r['speedup']:>8.0f}x")
    if args.plot:
        _err(f"kvmmu bench: plot written to {args.plot}")
    return 0


def _bench_plot(result: Dict[str, Any], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    rows = result["replay"]
    x = np.arange(len(rows))
    ax1.bar(x - 0.2, [r["skip_ns_per_init"] for r in rows], 0.4, label="skip (guard)")
    ax1.bar(x + 0.2, [r["force_ns_per_init"] for r in rows], 0.4, label="force")
    ax1.set_xticks(x)
    ax1.set_xticklabels([r["workload"] for r in rows])
    ax1.set_ylabel("ns per init")
    ax1.set_title(f"replay ({result['flavor']}, {result['version']})")
    ax1.legend()
    b = result["batch"]
    ax2.loglog([r["batch"] for r in b], [r["kvmmu_ns_per_state"] for r in b], "o-", label="kvmmu.init_mmu")
    ax2.loglog([r["batch"] for r in b], [r["reference_ns_per_state"] for r in b], "s--",
               label="reference.init_mmu_one")
    ax2.set_xlabel("batch size (states)")
    ax2.set_ylabel("ns per state")
    ax2.set_title("batch throughput")
    ax2.legend()
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    buf = _stdio.BytesIO()
    fig.savefig(buf, format=ext)
    kio.write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------
# parser

MAIN_EPILOG = """\
examples:
  kvmmu inspect --cr0 PG,WP,PE --cr4 PAE --efer LME,LMA,NX --maxphyaddr 46
  kvmmu compare v5.17:v517 v5.17:patch01 --flavor shadow --no-tdp
  kvmmu sweep --flavor shadow --maxphyaddr 46

Exit status: 0 success, 1 differences found, 2 usage or input error, 130 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Linux KVM's x86 MMU roles and reserved-bit masks, bit for bit.",
        epilog=MAIN_EPILOG)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    host, ept, js = _host_parent(), _ept_parent(), _json_parent()

    # inspect
    p = sub.add_parser("inspect", parents=[_engine_parent("tdp"), host, ept, js],
                       formatter_class=_Formatter, epilog=INSPECT_EPILOG,
                       help="decode one state's context",
                       description="Initialise one MMU context and print what it holds.")
    g = p.add_argument_group("the vCPU state")
    g.add_argument("--cr0", type=_register_type("cr0"), default=0, metavar="VALUE",
                   help="guest CR0 (hex, decimal or flags such as PG,WP,PE; default 0)")
    g.add_argument("--cr4", type=_register_type("cr4"), default=0, metavar="VALUE",
                   help="guest CR4 (e.g. PAE,PSE,SMEP; default 0)")
    g.add_argument("--efer", type=_register_type("efer"), default=0, metavar="VALUE",
                   help="guest EFER (e.g. LME,LMA,NX; default 0)")
    g.add_argument("--maxphyaddr", type=_int_range(0, 255, "integer"), default=36, metavar="N",
                   help="guest CPUID 0x80000008 EAX[7:0] (default 36)")
    g.add_argument("--guest-amd", action="store_true", help="guest CPUID vendor is AMD/Hygon")
    g.add_argument("--guest-gbpages", action="store_true", help="guest CPUID has 1 GiB pages")
    g.add_argument("--smm", action="store_true", help="the vCPU is in SMM")
    g.add_argument("--guest-mode", action="store_true", help="the vCPU is running L2")
    g.add_argument("--strict", action="store_true",
                   help="reject states no real CPU produces (kvmmu.check_architectural)")
    p.set_defaults(func=cmd_inspect, _parser=p)

    # compute
    p = sub.add_parser("compute", parents=[_engine_parent("tdp"), host, ept, js],
                       formatter_class=_Formatter, epilog=COMPUTE_EPILOG,
                       help="batch compute contexts from a file",
                       description="Compute a context per input state (kvmmu.init_mmu).")
    p.add_argument("input", metavar="INPUT", help="states file (.jsonl, .csv, .npy, .parquet; - = stdin)")
    p.add_argument("-o", "--output", default="-", metavar="OUTPUT",
                   help="contexts file (format by extension; - = stdout, the default)")
    p.add_argument("--format", choices=kio.FORMATS,
                   help="format of stdin/stdout (default jsonl) and of files whose extension "
                        "is not one of .jsonl .csv .npy .parquet")
    p.add_argument("--input-format", choices=kio.FORMATS, help="input format (overrides --format)")
    p.add_argument("--output-format", choices=kio.FORMATS, help="output format (overrides --format)")
    p.add_argument("--strict", action="store_true",
                   help="reject states no real CPU produces, naming the first")
    p.set_defaults(func=cmd_compute, _parser=p)

    # sweep
    p = sub.add_parser("sweep", parents=[js], formatter_class=_Formatter, epilog=SWEEP_EPILOG,
                       help="exhaustive sweep (variants, guard)",
                       description="Exhaustive sweep of the reachable state space (kvmmu.sweep).")
    p.add_argument("--flavor", action="append", choices=FLAVORS, help="flavor (repeatable; default all)")
    p.add_argument("--version", action="append", choices=VERSIONS,
                   help="kernel version (repeatable; default v5.17)")
    p.add_argument("--variant", action="append", choices=VARIANTS,
                   help="v5.17 variant (repeatable; default all four)")
    from .analysis import DEFAULT_HOSTS
    p.add_argument("--host", action="append", choices=tuple(DEFAULT_HOSTS),
                   help="host configuration (repeatable; default all three)")
    p.add_argument("--maxphyaddr", action="append", type=_int_list(0, 255), metavar="N[,N...]",
                   help="guest MAXPHYADDR values (repeatable or comma-separated; default 36,39,46,48,52)")
    p.add_argument("--raw", action="store_true",
                   help="every control-bit combination, not only reachable ones")
    p.add_argument("--no-guard", action="store_true", help="skip the role-guard soundness check")
    p.add_argument("--no-compare", action="store_true", help="skip the variant comparison")
    p.add_argument("--fail-on-diff", action="store_true",
                   help="exit 1 on a variant mismatch in a configuration the kernel builds, "
                        "or any stale role group")
    p.add_argument("--scheduler", metavar="threads|processes|ADDRESS",
                   help="run the sweep's chunks as Dask tasks (needs the dask extra): a local "
                        "scheduler name or a distributed scheduler address (tcp://host:8786)")
    p.add_argument("--chunk-size", type=int, default=1 << 16, metavar="N",
                   help="states per chunk (default 65536)")
    p.set_defaults(func=cmd_sweep, _parser=p)

    # compare
    p = sub.add_parser("compare", parents=[host, ept, js], formatter_class=_Formatter,
                       epilog=COMPARE_EPILOG, help="compare two formulations (exit 1 if they differ)",
                       description="Compare two formulations (VERSION[:VARIANT]) state by state.")
    p.add_argument("a", metavar="A", help="first formulation, e.g. v5.17:v517")
    p.add_argument("b", metavar="B", help="second formulation, e.g. v5.17:patch01")
    p.add_argument("--flavor", choices=FLAVORS, default="shadow", help="flavor (default shadow)")
    p.add_argument("--input", metavar="FILE", help="compare on the states of FILE instead")
    p.add_argument("--format", choices=kio.FORMATS, help="format of FILE (default: by extension)")
    p.add_argument("--maxphyaddr", action="append", type=_int_list(0, 255), metavar="N[,N...]",
                   help="guest MAXPHYADDR values of the enumerated space")
    p.add_argument("--raw", action="store_true", help="enumerate unreachable control-bit states too")
    p.add_argument("--examples", type=_nonneg, default=5, metavar="N",
                   help="counterexamples to show (default 5)")
    p.set_defaults(func=cmd_compare, _parser=p)

    # replay
    p = sub.add_parser("replay", parents=[_engine_parent("tdp"), host, ept, js],
                       formatter_class=_Formatter, epilog=REPLAY_EPILOG,
                       help="replay a sequence through the cached context",
                       description="Replay states in order through persistent contexts (kvmmu.replay).")
    p.add_argument("trace", nargs="?", metavar="TRACE",
                   help="state file or KVM trace text (- = stdin)")
    p.add_argument("--format", choices=kio.FORMATS + ("trace",),
                   help="input format (default: by extension, else by content)")
    p.add_argument("--workload", choices=("boot", "cr0wp_toggle", "context_switch",
                                          "cpuid_update", "random"),
                   help="a built-in workload instead of a file")
    p.add_argument("--steps", type=_positive, metavar="N", help="workload length")
    p.add_argument("--vcpus", type=_positive, metavar="N",
                   help="vCPUs (workloads context_switch and random)")
    p.add_argument("--seed", type=_nonneg, metavar="N", help="seed (workload random)")
    p.add_argument("--policy", choices=("skip", "force", "both"), default="skip",
                   help="skip: KVM's role guard (default); force: recompute every step; both")
    tg = p.add_argument_group("KVM traces")
    tg.add_argument("--initial", metavar="cr0=..,cr4=..,efer=..",
                    help="register values before the trace's first write")
    tg.add_argument("--kvm-resets-only", action="store_true",
                    help="replay only the writes that made KVM call kvm_mmu_reset_context")
    tg.add_argument("--maxphyaddr", type=_int_range(0, 255, "integer"), metavar="N",
                    help="guest MAXPHYADDR for trace steps (default 36; also the "
                         "boot/cr0wp_toggle/context_switch workloads)")
    tg.add_argument("--guest-amd", action="store_true", help="the traced guest is AMD/Hygon")
    tg.add_argument("--guest-gbpages", action="store_true", help="the traced guest has 1 GiB pages")
    p.set_defaults(func=cmd_replay, _parser=p)

    # bench
    p = sub.add_parser("bench", parents=[host, js], formatter_class=_Formatter, epilog=BENCH_EPILOG,
                       help="a quick performance measurement",
                       description="Measure replay (skip vs force) and batch throughput.")
    p.add_argument("--quick", action="store_true", help="smaller sizes, a few seconds")
    p.add_argument("--plot", metavar="FILE.png", help="draw the results (needs matplotlib)")
    p.add_argument("--flavor", choices=FLAVORS, default="tdp", help="flavor (default tdp)")
    p.add_argument("--version", choices=VERSIONS, default="v5.17", help="version (default v5.17)")
    p.set_defaults(func=cmd_bench, _parser=p)

    # access, accessc: KVM's guest walk and permission_fault (kvmmu.access_cli)
    from .access_cli import add_parsers as add_access_parsers
    add_access_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    sub = getattr(args, "_parser", None) or parser
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err(f"{PROG}: interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except UsageError as exc:
        sub.print_usage(sys.stderr)
        _err(f"{sub.prog}: error: {exc}")
        return 2
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, _stdio.UnsupportedOperation):
            pass
        return 141
    except (kio.InputError, ValueError, TypeError, OSError) as exc:
        if os.environ.get("KVMMU_DEBUG"):
            raise
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, OSError) and exc.filename:
            msg = f"{exc.filename}: {msg}"
        _err(f"{sub.prog}: error: {msg}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
