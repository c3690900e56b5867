"""Read a real KVM trace into a sequence of vCPU states for :func:`kvmmu.replay`.

The inputs are two tracepoints of ``arch/x86/kvm/trace.h``. Their printed form
is the same in Linux v5.17 and v6.16.1 (``TP_printk`` unchanged)::

    kvm_cr:  "cr_%s %x = 0x%lx"      rw ? "write" : "read", cr, val
    kvm_msr: "msr_%s %x = 0x%llx%s"  write ? "write" : "read", ecx, data,
                                     exception ? " (#GP)" : ""

so a CR0 write reads ``cr_write 0 = 0x80050033`` and an EFER write reads
``msr_write c0000080 = 0xd01`` (the register number and MSR index are hex
without ``0x``). Where the kernel emits them (both versions):

* ``kvm_cr`` writes are traced *before* the write is attempted (VMX
  ``handle_cr``, SVM ``cr_interception``), so a CR write that KVM then refuses
  with #GP is indistinguishable in the trace; it is taken as done. LMSW is
  traced as a CR0 write of the resulting value.
* ``kvm_msr`` writes are traced after the write, with ``(#GP)`` appended when
  it failed; a failed read prints ``= 0x0 (#GP)``.

Three text renderings of those events are understood (one per file; the
format is recognised from the lines themselves):

* ``trace-cmd report``: a ``cpus=N`` header, then
  ``COMM-PID [CPU] TIMESTAMP: EVENT: BODY`` with the event name padded;
* the tracefs ``trace`` / ``trace_pipe`` file (``"ftrace"``): ``#`` header
  comments, ``COMM-PID [CPU] FLAGS TIMESTAMP: EVENT: BODY``, optionally a
  ``(TGID)`` column after ``COMM-PID``;
* ``perf script``: ``COMM TID [CPU] TIMESTAMP: kvm:EVENT: BODY`` (or
  ``PID/TID``).

Task names may contain spaces and dashes (QEMU's ``CPU 0/KVM``); the pid is
the number after the last ``-``.

State rules (KVM's ``arch/x86/kvm/x86.c`` and ``vmx/vmx.c``, both versions):

* each task thread is a vCPU; it starts from the architectural RESET values
  (CR0 0x60000010, CR4 0, EFER 0) or from ``initial``;
* reads (``cr_read 0/4``, ``msr_read c0000080``) reveal the current value and
  are adopted without making a step (a trace usually starts mid-run);
* a CR0 write sets CR0 to the written value; with EFER.LME set, turning CR0.PG
  on sets EFER.LMA (``enter_lmode``) and turning it off clears LMA
  (``exit_lmode``), as ``vmx_set_cr0`` / ``svm_set_cr0`` do;
* an EFER write sets EFER to the written value except LMA, which keeps its
  current value (``set_efer``: ``efer &= ~EFER_LMA; efer |= old & EFER_LMA``);
* every successful CR0/CR4/EFER write is one step: the state after it.

``Trace.kvm_reset`` says whether the write changed a bit for which KVM calls
``kvm_mmu_reset_context``. It uses the **v5.17** rules (the default version
of :func:`kvmmu.replay`); v6.16 differs, see :func:`mmu_reset_triggered`:

========  ==============================================  =====================================
register  v5.17                                           v6.16.1
========  ==============================================  =====================================
CR0       PG | WP changed (``KVM_MMU_CR0_ROLE_BITS``)     same mask, but a change of WP *alone*
                                                          does not reset: nothing when the new
                                                          CR0.PG is 0, only ``kvm_init_mmu``
                                                          when TDP is enabled
CR4       PSE | PAE | LA57 | SMEP | SMAP | PKE changed    same mask
          (``KVM_MMU_CR4_ROLE_BITS``)
EFER      NX changed (``set_efer``)                       LME | NX changed
                                                          (``KVM_MMU_EFER_ROLE_BITS``)
========  ==============================================  =====================================

CR4.PCIDE never triggers ``kvm_mmu_reset_context`` in either version (v5.17:
a PCIDE change requests ``KVM_REQ_MMU_RELOAD``; v6.16: 0 -> 1 without TDP
unloads the MMU, 1 -> 0 flushes the guest TLB). Kernels up to v5.16 also
reset the context when PCIDE went 1 -> 0; neither version read here does.

>>> from kvmmu.traces import parse_trace
>>> t = parse_trace([
...     "cpus=1",
...     " CPU 0/KVM-77  [000]  5.000001: kvm_msr: msr_read c0000080 = 0x100",
...     " CPU 0/KVM-77  [000]  5.000002: kvm_cr:  cr_write 0 = 0x80000011",
...     " CPU 0/KVM-77  [000]  5.000003: kvm_msr: msr_write c0000080 = 0x900",
... ])
>>> t.format, t.threads, t.reads_adopted, len(t)
('trace-cmd', ['CPU 0/KVM-77'], 1, 2)
>>> [hex(int(e)) for e in t.guests["efer"]], t.kvm_reset.tolist()
(['0x500', '0xd00'], [True, True])
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from ._types import guests

__all__ = [
    "TraceParseError",
    "Trace",
    "parse_trace",
    "mmu_reset_triggered",
    "FORMATS",
    "RESET_CR0",
    "RESET_CR4",
    "RESET_EFER",
    "MSR_EFER",
    "CR0_ROLE_BITS",
    "CR4_ROLE_BITS",
    "EFER_ROLE_BITS",
]

FORMATS = ("trace-cmd", "ftrace", "perf")

#: Architectural values after RESET (Intel SDM vol. 3, 10.1.1).
RESET_CR0, RESET_CR4, RESET_EFER = 0x60000010, 0, 0
MSR_EFER = 0xC0000080

_CR0_WP, _CR0_PG = 1 << 16, 1 << 31
_CR4_PSE, _CR4_PAE, _CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
_CR4_SMEP, _CR4_SMAP, _CR4_PKE = 1 << 20, 1 << 21, 1 << 22
_EFER_LME, _EFER_LMA, _EFER_NX = 1 << 8, 1 << 10, 1 << 11
_U64 = (1 << 64) - 1

#: The bits whose change makes KVM call kvm_mmu_reset_context, per version
#: (arch/x86/kvm/mmu.h and set_efer() in arch/x86/kvm/x86.c).
CR0_ROLE_BITS = {"v5.17": _CR0_PG | _CR0_WP, "v6.16": _CR0_PG | _CR0_WP}
CR4_ROLE_BITS = {
    "v5.17": _CR4_PSE | _CR4_PAE | _CR4_LA57 | _CR4_SMEP | _CR4_SMAP | _CR4_PKE,
    "v6.16": _CR4_PSE | _CR4_PAE | _CR4_LA57 | _CR4_SMEP | _CR4_SMAP | _CR4_PKE,
}
EFER_ROLE_BITS = {"v5.17": _EFER_NX, "v6.16": _EFER_LME | _EFER_NX}


def mmu_reset_triggered(register: str, old: int, new: int, version: str = "v5.17",
                        tdp_enabled: bool = True) -> bool:
    """Whether KVM calls kvm_mmu_reset_context for a successful write of
    ``register`` ("cr0", "cr4" or "efer") from ``old`` to ``new`` (the value
    KVM stores, i.e. for EFER with LMA already carried over).

    v5.17: kvm_post_set_cr0 / kvm_post_set_cr4 test the KVM_MMU_CR0/CR4_ROLE_BITS
    masks; set_efer resets on a change of EFER.NX only.
    v6.16: same CR4 mask; set_efer tests KVM_MMU_EFER_ROLE_BITS (LME | NX);
    kvm_post_set_cr0 returns early when WP is the only changed bit and the new
    CR0.PG is 0, and with TDP enabled only re-inits the MMU (no reset).

    >>> mmu_reset_triggered("cr0", 0x80050033, 0x80040033)
    True
    >>> mmu_reset_triggered("cr0", 0x80050033, 0x80040033, "v6.16")
    False
    >>> mmu_reset_triggered("efer", 0x1, 0x101), mmu_reset_triggered("efer", 0x1, 0x101, "v6.16")
    (False, True)
    """
    if version not in CR0_ROLE_BITS:
        raise ValueError(f"version must be one of {tuple(CR0_ROLE_BITS)}, got {version!r}")
    old, new = int(old), int(new)
    changed = old ^ new
    if register == "cr0":
        if version == "v6.16" and changed == _CR0_WP and (not new & _CR0_PG or tdp_enabled):
            return False
        return bool(changed & CR0_ROLE_BITS[version])
    if register == "cr4":
        return bool(changed & CR4_ROLE_BITS[version])
    if register == "efer":
        return bool(changed & EFER_ROLE_BITS[version])
    raise ValueError(f"register must be 'cr0', 'cr4' or 'efer', got {register!r}")


class TraceParseError(ValueError):
    """A kvm_cr / kvm_msr line that does not have the tracepoint's format.
    The message starts with ``"{file}:{line}: "``."""


@dataclass
class Trace:
    """What :func:`parse_trace` read: one GUEST_DTYPE record per successful
    CR0/CR4/EFER write, in trace order, and per-step columns."""

    guests: np.ndarray      # kvmmu.GUEST_DTYPE, one record per step
    vcpu: np.ndarray        # int64 vCPU index per step
    threads: List[str]      # thread name (with tid) per vCPU index
    kvm_reset: np.ndarray   # bool per step (v5.17 kvm_mmu_reset_context rules)
    line: np.ndarray        # int64 source line number per step (1-based)
    skipped: int            # lines of other events / other registers
    reads_adopted: int
    failed_writes: int
    format: str             # "trace-cmd", "ftrace" or "perf"

    def __len__(self) -> int:
        return int(self.guests.shape[0])


# ---------------------------------------------------------------------------
# Line shapes.
#
# trace-cmd and ftrace: "COMM-PID [CPU] (FLAGS) TIMESTAMP: EVENT: BODY".
# The greedy COMM makes the pid the number after the last '-' that is
# followed by the CPU column. ftrace may add a "(TGID)" column ("(-------)"
# when unknown) and prints 4- or 5-character latency flags (d..., d....).
_DASH_LINE = re.compile(
    r"^\s*(?P<comm>.*)-(?P<pid>\d+)\s+"
    r"(?:\(\s*(?:\d+|-+)\s*\)\s+)?"
    r"\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>[^\s:]{3,8})\s+)?"
    r"(?P<ts>\d+\.\d+):\s+"
    r"(?P<event>[A-Za-z_][\w]*):(?:\s+(?P<body>.*?))?\s*$"
)
# perf script: "COMM TID [CPU] TIMESTAMP: SUBSYS:EVENT: BODY" (TID may be
# "PID/TID"; a sample period may precede the event name).
_PERF_LINE = re.compile(
    r"^\s*(?P<comm>.*?)\s+(?:(?P<pid>\d+)/)?(?P<tid>\d+)\s+"
    r"\[(?P<cpu>\d+)\]\s+"
    r"(?P<ts>\d+\.\d+):\s+"
    r"(?:\d+\s+)?"
    r"(?P<event>[A-Za-z_]\w*:[A-Za-z_]\w*):(?:\s+(?P<body>.*?))?\s*$"
)
# A line that names one of our events, whatever else is wrong with it.
_MENTIONS_OURS = re.compile(r"(?:^|[\s:])kvm_(?:cr|msr):")
_CPUS_HEADER = re.compile(r"^\s*cpus=\d+\s*$")

_CR_BODY = re.compile(r"^cr_(?P<rw>read|write) (?P<reg>[0-9a-fA-F]+) = 0x(?P<val>[0-9a-fA-F]+)"
                      r"(?P<gp> \(#GP\))?$")
_MSR_BODY = re.compile(r"^msr_(?P<rw>read|write) (?P<reg>[0-9a-fA-F]+) = 0x(?P<val>[0-9a-fA-F]+)"
                       r"(?P<gp> \(#GP\))?$")
_CR_EXPECTED = "'cr_read|cr_write <cr, hex> = 0x<value, hex>' (TP_printk \"cr_%s %x = 0x%lx\")"
_MSR_EXPECTED = ("'msr_read|msr_write <index, hex> = 0x<value, hex>[ (#GP)]' "
                 "(TP_printk \"msr_%s %x = 0x%llx%s\")")


def _iter_lines(source: Any) -> Tuple[Iterator[str], str, Optional[Any]]:
    """(lines, default name, file to close)."""
    if isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and "\n" in source:
            raise TypeError("parse_trace(): source is a str holding several lines; pass a path, "
                            "an open file, or an iterable of lines (e.g. text.splitlines())")
        path = os.fspath(source)
        f = open(path, "r", encoding="utf-8", errors="replace")
        return iter(f), os.fsdecode(path), f
    if isinstance(source, (bytes, bytearray)):
        raise TypeError("parse_trace(): source is bytes; pass a path, an open file, or an "
                        "iterable of lines")
    try:
        it = iter(source)
    except TypeError:
        raise TypeError(f"parse_trace(): source must be a path, an open text file or an "
                        f"iterable of lines, got {type(source).__name__}") from None
    name = getattr(source, "name", None)
    return it, (name if isinstance(name, str) else "<trace>"), None


def _check_initial(initial: Optional[Mapping[str, Any]]) -> Dict[str, int]:
    regs = {"cr0": RESET_CR0, "cr4": RESET_CR4, "efer": RESET_EFER}
    if initial is None:
        return regs
    if not isinstance(initial, Mapping):
        raise TypeError(f"initial must be a dict with keys among 'cr0', 'cr4', 'efer', "
                        f"got {type(initial).__name__}")
    unknown = set(initial) - set(regs)
    if unknown:
        raise ValueError(f"initial: unknown register(s) {sorted(map(str, unknown))}; "
                         f"registers are ['cr0', 'cr4', 'efer']")
    for k, v in initial.items():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"initial[{k!r}] must be an int, got {type(v).__name__}")
        if not 0 <= int(v) <= _U64:
            raise ValueError(f"initial[{k!r}] must be in [0, 2**64 - 1], got {int(v)}")
        regs[k] = int(v)
    return regs


def parse_trace(source: Union[str, "os.PathLike[str]", Iterable[str]], *,
                initial: Optional[Mapping[str, int]] = None, maxphyaddr: int = 36,
                guest_amd: bool = False, guest_gbpages: bool = False,
                name: Optional[str] = None) -> Trace:
    """Parse a ``trace-cmd report``, tracefs ``trace`` or ``perf script`` text
    of ``kvm:kvm_cr`` / ``kvm:kvm_msr`` events into vCPU states.

    ``source`` is a path, an open text file or an iterable of lines; ``name``
    replaces the path (default: the path, the file's name or ``"<trace>"``)
    in error messages. ``initial`` ({"cr0", "cr4", "efer"}, any subset)
    replaces the RESET values every vCPU starts from. ``maxphyaddr``,
    ``guest_amd`` and ``guest_gbpages`` fill the CPUID fields of every record
    (``smm`` and ``guest_mode`` are 0). See the module docstring for the rules.

    Counted, not stepped: ``reads_adopted`` (CR0/CR4/EFER reads, adopted as
    the current value), ``failed_writes`` (lines ending in ``(#GP)``),
    ``skipped`` (other events, other CRs and MSRs, and failed reads).
    A malformed kvm_cr / kvm_msr line raises :class:`TraceParseError`.
    """
    init = _check_initial(initial)
    lines, default_name, to_close = _iter_lines(source)
    fname = default_name if name is None else str(name)

    tids: Dict[int, int] = {}           # tid -> vCPU index
    threads: List[str] = []
    state: List[List[int]] = []         # per vCPU: [cr0, cr4, efer]
    st_cr0: List[int] = []
    st_cr4: List[int] = []
    st_efer: List[int] = []
    st_vcpu: List[int] = []
    st_reset: List[bool] = []
    st_line: List[int] = []
    skipped = reads = failed = 0
    style: Optional[str] = None         # "dash" or "perf", fixed by the first event line
    saw_cpus_header = saw_ftrace_header = saw_flags = False

    def fail(lineno: int, msg: str) -> TraceParseError:
        return TraceParseError(f"{fname}:{lineno}: {msg}")

    try:
        for lineno, raw in enumerate(lines, 1):
            if isinstance(raw, (bytes, bytearray)):
                raw = raw.decode("utf-8", "replace")
            elif not isinstance(raw, str):
                raise TypeError(f"{fname}:{lineno}: lines must be str, got {type(raw).__name__}")
            text = raw.rstrip("\r\n")
            stripped = text.strip()
            if not stripped:
                continue
            if stripped.startswith("#"):
                if re.match(r"#\s*(tracer:|entries-in-buffer|TASK-PID)", stripped):
                    saw_ftrace_header = True
                continue
            if _CPUS_HEADER.match(stripped):
                saw_cpus_header = True
                continue

            m = None
            if style in (None, "dash"):
                m = _DASH_LINE.match(text)
                if m is not None:
                    style = "dash"
            if m is None and style in (None, "perf"):
                m = _PERF_LINE.match(text)
                if m is not None:
                    style = "perf"
            if m is None:
                if _MENTIONS_OURS.search(text):
                    shape = {"dash": "'COMM-PID [CPU] [FLAGS] TIMESTAMP: EVENT: BODY'",
                             "perf": "'COMM TID [CPU] TIMESTAMP: kvm:EVENT: BODY'"}.get(
                        style, "a trace-cmd, ftrace or perf script event line")
                    raise fail(lineno, f"kvm_cr/kvm_msr line not in the expected shape "
                                       f"{shape}: {stripped!r}")
                continue  # not an event line ("CPU 3 is empty", perf banners, ...)

            event = m.group("event")
            if style == "perf":
                if not event.startswith("kvm:"):
                    skipped += 1
                    continue
                event = event[4:]
                tid = int(m.group("tid"))
            else:
                tid = int(m.group("pid"))
                if m.group("flags"):
                    saw_flags = True
            if event not in ("kvm_cr", "kvm_msr"):
                skipped += 1
                continue

            body = m.group("body") or ""
            bm = (_CR_BODY if event == "kvm_cr" else _MSR_BODY).match(body)
            if bm is None:
                expected = _CR_EXPECTED if event == "kvm_cr" else _MSR_EXPECTED
                raise fail(lineno, f"{event}: expected {expected}, got {body!r}")
            reg = int(bm.group("reg"), 16)
            val = int(bm.group("val"), 16)
            if val > _U64:
                raise fail(lineno, f"{event}: expected a 64-bit value, got 0x{bm.group('val')}")
            write = bm.group("rw") == "write"
            gp = bm.group("gp") is not None

            comm = m.group("comm").strip()
            vi = tids.get(tid)
            if vi is None:
                vi = tids[tid] = len(threads)
                threads.append(f"{comm}-{tid}")
                state.append([init["cr0"], init["cr4"], init["efer"]])
            elif threads[vi].startswith("<...>-") and comm and comm != "<...>":
                threads[vi] = f"{comm}-{tid}"  # ftrace lost the comm on an earlier line

            if event == "kvm_cr":
                slot = {0: 0, 4: 1}.get(reg)
            else:
                slot = 2 if reg == MSR_EFER else None
            if slot is None:
                skipped += 1          # CR2/CR3/CR8, other MSRs
                continue
            if gp:
                if write:
                    failed += 1
                else:
                    skipped += 1      # a failed read reveals nothing
                continue
            regs = state[vi]
            if not write:
                regs[slot] = val
                reads += 1
                continue

            cr0, cr4, efer = regs
            if slot == 0:
                reset = mmu_reset_triggered("cr0", cr0, val)
                # vmx_set_cr0 / svm_set_cr0: only while EFER.LME is set
                # (LMA=1 with LME=0 is unreachable: set_efer keeps LME fixed
                # while paging, and LMA is only set here).
                if efer & _EFER_LME:
                    if not cr0 & _CR0_PG and val & _CR0_PG:
                        efer |= _EFER_LMA       # enter_lmode
                    elif cr0 & _CR0_PG and not val & _CR0_PG:
                        efer &= ~_EFER_LMA      # exit_lmode
                cr0 = val
            elif slot == 1:
                reset = mmu_reset_triggered("cr4", cr4, val)
                cr4 = val
            else:
                new = (val & ~_EFER_LMA) | (efer & _EFER_LMA)
                reset = mmu_reset_triggered("efer", efer, new)
                efer = new
            regs[:] = [cr0, cr4, efer]
            st_cr0.append(cr0)
            st_cr4.append(cr4)
            st_efer.append(efer)
            st_vcpu.append(vi)
            st_reset.append(reset)
            st_line.append(lineno)
    finally:
        if to_close is not None:
            to_close.close()

    if style == "perf":
        fmt = "perf"
    elif saw_cpus_header:
        fmt = "trace-cmd"
    elif saw_ftrace_header or saw_flags or style is None:
        fmt = "ftrace"
    else:
        fmt = "trace-cmd"

    g = guests(cr0=np.array(st_cr0, dtype=np.uint64), cr4=np.array(st_cr4, dtype=np.uint64),
               efer=np.array(st_efer, dtype=np.uint64), maxphyaddr=maxphyaddr,
               guest_amd=guest_amd, guest_gbpages=guest_gbpages)
    return Trace(guests=g, vcpu=np.array(st_vcpu, dtype=np.int64), threads=threads,
                 kvm_reset=np.array(st_reset, dtype=bool), line=np.array(st_line, dtype=np.int64),
                 skipped=skipped, reads_adopted=reads, failed_writes=failed, format=fmt)
