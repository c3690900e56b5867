"""kvmmu.traces: parsing kvm:kvm_cr / kvm:kvm_msr traces into vCPU states.

The three fixtures under tests/traces/ were written by hand from the
tracepoint formats of arch/x86/kvm/trace.h (identical in v5.17 and v6.16.1):

    kvm_cr:  "cr_%s %x = 0x%lx"        e.g. "cr_write 0 = 0x80050033"
    kvm_msr: "msr_%s %x = 0x%llx%s"    e.g. "msr_write c0000080 = 0xd01 (#GP)"

Every expected value below (register values, LMA, kvm_reset, and the replay
recompute/skip counts) was worked out by hand from the rules in the comments
and from docs/kvm-mmu-model.md section 4 (v5.17 roles), never taken from the
code's output.

Bit names used in the derivations:
  CR0:  PE 0, MP 1, TS 3, ET 4, NE 5, WP 16, AM 18, NW 29, CD 30, PG 31
  CR4:  PSE 4, PAE 5, MCE 6, PGE 7, OSFXSR 9, OSXMMEXCPT 10, LA57 12,
        OSXSAVE 18, SMEP 20, SMAP 21, PKE 22
  EFER: SCE 0, LME 8, LMA 10, NX 11, SVME 12

Role facts used (v5.17, docs §4.1/4.2), with the default host (4-level TDP):
  * tdp role: access=7, direct=1, level=4, ext.valid=1 always; only when
    CR0.PG=1 does it also hold efer_nx, cr0_wp, ext.cr0_pg, cr4_pae, cr4_pse,
    cr4_smep, cr4_smap, cr4_pke&&LMA, cr4_la57&&LMA, efer_lma.
    => with PG=0 the tdp role is one constant word.
  * shadow role: the same common part, plus smep/smap_andnot_wp (from the
    ext bits, so 0 when PG=0), has_4_byte_gpte = PG && !PAE, direct = !PG,
    level = 3 if !LMA else (5 if LA57 else 4) -- raw LMA, even when PG=0.
    => with PG=0 the shadow role depends only on LMA (and LA57 when LMA=1).
  * bits in no role: CR0.PE/MP/TS/ET/NE/AM/NW/CD, CR4.MCE/PGE/OSFXSR/
    OSXMMEXCPT/OSXSAVE, EFER.SCE/LME.
  * replay starts every vCPU from a zeroed context, and every role has
    ext.valid=1, so each vCPU's first step always recomputes.
"""
from __future__ import annotations

import doctest
import io
import pathlib
import re

import numpy as np
import pytest

import kvmmu
import kvmmu.traces as traces_mod
from kvmmu.traces import Trace, TraceParseError, mmu_reset_triggered, parse_trace

HERE = pathlib.Path(__file__).parent / "traces"
TRACE_CMD = HERE / "boot-trace-cmd.txt"
FTRACE = HERE / "reboot-ftrace.txt"
PERF = HERE / "longmode57-perf.txt"
SHADOW_HOST = kvmmu.HostConfig(tdp_enabled=False)


def regs(t: Trace):
    return [(int(g["cr0"]), int(g["cr4"]), int(g["efer"])) for g in t.guests]


def counts(t: Trace, flavor: str, version: str = "v5.17"):
    host = SHADOW_HOST if flavor == "shadow" else None
    r = kvmmu.replay(t.guests, flavor, host, version=version, vcpu=t.vcpu)
    return {v: (c["recomputes"], c["skips"]) for v, c in r.per_vcpu().items()}


# ============================================================================
# trace-cmd report: boot of vCPU 0 from RESET, steady state of vCPU 1
# ============================================================================
#
# line  thread     event                                  effect
#  1    -          cpus=4                                 header
#  2    qemu-4240  kvm_set_irq                            skipped (1)
#  3    4242       kvm_exit                               skipped (2)
#  4    4242       cr_write 0 = 0x60000011                v0 step 1
#  5    4242       kvm_entry                              skipped (3)
#  6    4242       cr_write 0 = 0x11                      v0 step 2
#  7    4242       cr_write 4 = 0x20                      v0 step 3
#  8    4242       cr_write 3 = 0x1000                    skipped (4)
#  9    4242       msr_read c0000080 = 0x0                read (1)
# 10    4242       msr_write c0000080 = 0x100             v0 step 4
# 11    4242       cr_write 0 = 0x80000011                v0 step 5
# 12-14 4243       cr_read 0, cr_read 4, msr_read EFER    reads (2,3,4)
# 15    4242       msr_write c0000080 = 0x901             v0 step 6
# 16    4243       cr_write 4 = 0x340670                  v1 step a
# 17    4242       cr_write 0 = 0x80050033                v0 step 7
# 18    4243       cr_write 4 = 0x3406f0                  v1 step b
# 19    4242       cr_write 4 = 0x6a0                     v0 step 8
# 20    4243       cr_write 0 = 0x8005003b                v1 step c
# 21    4243       msr_write 6e0 (TSC_DEADLINE)           skipped (5)
# 22    4242       cr_write 4 = 0x3006a0                  v0 step 9
# 23    4243       cr_write 0 = 0x80050033                v1 step d
# 24    4243       msr_write c0000080 = 0x1d01 (#GP)      failed (1)
# 25    4243       msr_write c0000080 = 0xd01             v1 step e
# 26    4243       cr_write 8 = 0x0                       skipped (6)
# 27    4243       cr_write 4 = 0x340670                  v1 step f
# 28    4243       cr_write 4 = 0x3406f0                  v1 step g
#
# vCPU 0 from RESET (CR0 0x60000010 = CD|NW|ET, CR4 0, EFER 0):
#  1 CR0 0x60000011: +PE.                 kvm_reset: PE only        -> False
#  2 CR0 0x00000011: -CD -NW.                        CD|NW          -> False
#  3 CR4 0x20: +PAE.                                 PAE in mask    -> True
#  4 EFER 0x100: +LME (LMA stays 0).                 v5.17 NX only  -> False
#  5 CR0 0x80000011: +PG with LME -> LMA: EFER 0x500.  PG           -> True
#  6 EFER write 0x901 (SCE|LME|NX, no LMA bit): LMA kept -> 0xd01.  NX -> True
#  7 CR0 0x80050033: +MP +NE +WP +AM.                WP             -> True
#  8 CR4 0x6a0: +PGE +OSFXSR +OSXMMEXCPT.            none in mask   -> False
#  9 CR4 0x3006a0: +SMEP +SMAP.                      SMEP|SMAP      -> True
# vCPU 1 from its reads: CR0 0x80050033, CR4 0x3406f0, EFER 0xd01:
#  a CR4 0x340670 (-PGE)  b CR4 0x3406f0 (+PGE)  c CR0 0x8005003b (+TS)
#  d CR0 0x80050033 (-TS)  e EFER 0xd01 (same; LMA kept at 1)
#  f CR4 0x340670  g CR4 0x3406f0                     all kvm_reset False
TC_V0 = [(0x60000011, 0x0, 0x0), (0x11, 0x0, 0x0), (0x11, 0x20, 0x0), (0x11, 0x20, 0x100),
         (0x80000011, 0x20, 0x500), (0x80000011, 0x20, 0xD01), (0x80050033, 0x20, 0xD01),
         (0x80050033, 0x6A0, 0xD01), (0x80050033, 0x3006A0, 0xD01)]
TC_V1 = [(0x80050033, 0x340670, 0xD01), (0x80050033, 0x3406F0, 0xD01),
         (0x8005003B, 0x3406F0, 0xD01), (0x80050033, 0x3406F0, 0xD01),
         (0x80050033, 0x3406F0, 0xD01), (0x80050033, 0x340670, 0xD01),
         (0x80050033, 0x3406F0, 0xD01)]


def test_trace_cmd_fixture():
    t = parse_trace(TRACE_CMD)
    assert t.format == "trace-cmd"
    assert t.threads == ["CPU 0/KVM-4242", "CPU 1/KVM-4243"]  # qemu-4240 has no kvm_cr/msr
    assert t.line.tolist() == [4, 6, 7, 10, 11, 15, 16, 17, 18, 19, 20, 22, 23, 25, 27, 28]
    assert t.vcpu.tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1]
    assert (t.skipped, t.reads_adopted, t.failed_writes) == (6, 4, 1)
    assert t.guests.dtype == kvmmu.GUEST_DTYPE and t.vcpu.dtype == np.int64
    assert t.line.dtype == np.int64 and t.kvm_reset.dtype == bool
    r = regs(t)
    assert [r[i] for i in np.flatnonzero(t.vcpu == 0)] == TC_V0
    assert [r[i] for i in np.flatnonzero(t.vcpu == 1)] == TC_V1
    assert t.kvm_reset[t.vcpu == 0].tolist() == [False, False, True, False, True, True, True,
                                                 False, True]
    assert not t.kvm_reset[t.vcpu == 1].any()
    # CPUID fields: the defaults, on every record.
    assert (t.guests["maxphyaddr"] == 36).all()
    assert not t.guests["guest_amd"].any() and not t.guests["guest_gbpages"].any()
    assert not t.guests["smm"].any() and not t.guests["guest_mode"].any()


# Replay, tdp (v5.17):
#  vCPU 0: steps 1-4 have PG=0 -> one constant tdp role: 1 recompute (fresh
#          context) + 3 skips (step 3 is a kvm_reset whose role is unchanged).
#          5 PG on: recompute. 6 NX (efer_nx): recompute. 7 WP (cr0_wp):
#          recompute. 8 PGE/OSFXSR/OSXMMEXCPT: skip. 9 SMEP/SMAP (ext): recompute.
#          => 5 recomputes, 4 skips.
#  vCPU 1: a is its first step: recompute; b-g only touch PGE, TS or rewrite
#          EFER unchanged: 6 skips. => 1, 6.
# Replay, shadow (tdp_enabled=False):
#  vCPU 0: steps 1-4: PG=0 and LMA=0 -> level 3, direct 1, nothing else: the
#          same single role -> 1 + 3 skips. Steps 5, 6, 7, 9 change direct/
#          level/has_4_byte_gpte/ext, efer_nx, cr0_wp, ext smep/smap
#          (smep/smap_andnot_wp stay 0 since WP=1); step 8 skips. => 5, 4.
#  vCPU 1: as for tdp => 1, 6.
# v6.16 gives the same counts: cpu_role with PG=0 is the constant
# {direct=1, level=0, access=7, valid}, the tdp root_role is constant, the
# shadow root_role follows cpu_role, and with PG=1 cpu_role holds the same
# CR/EFER bits as the v5.17 role (docs §5.1).
@pytest.mark.parametrize("version", ["v5.17", "v6.16"])
@pytest.mark.parametrize("flavor", ["tdp", "shadow"])
def test_trace_cmd_replay(flavor, version):
    t = parse_trace(TRACE_CMD)
    assert counts(t, flavor, version) == {0: (5, 4), 1: (1, 6)}


# ============================================================================
# ftrace (tracefs "trace" file): vCPU 0 from a running 64-bit guest back to
# real mode; vCPU 1 booting a 32-bit non-PAE guest.
# ============================================================================
#
# lines 1-12: "#" header.
# 13 <...>-5120 cr_read 0 = 0x80050033     read (1); name not yet known
# 14 5120 cr_read 4 = 0x3406f0              read (2); thread named "CPU 0/KVM"
# 15 5120 msr_read c0000080 = 0xd01         read (3)
# 16 5120 kvm_exit                          skipped (1)
# 17 5120 cr_write 0 = 0x80040033           A1: -WP                 reset True
# 18 5120 cr_write 0 = 0x80050033           A2: +WP                 reset True
# 19 5121 cr_write 0 = 0x60000011           B1: +PE                 reset False
# 20 5120 cr_write 4 = 0x340670             A3: -PGE                reset False
# 21 5121 cr_write 4 = 0x10                 B2: +PSE                reset True
# 22 5120 cr_write 4 = 0x3406f0             A4: +PGE                reset False
# 23 <idle>-0 sched_switch                  skipped (2)
# 24 5121 cr_write 0 = 0x80000011           B3: +PG, LME=0 -> LMA stays 0; reset True
# 25 5121 cr_write 0 = 0x80010011           B4: +WP                 reset True
# 26 5120 cr_read 3                         skipped (3)
# 27 5121 cr_write 0 = 0x80010019           B5: +TS                 reset False
# 28 5121 cr_write 0 = 0x80010011           B6: -TS                 reset False
# 29 5121 msr_write c0000080 = 0x100 (#GP)  failed (1): LME while paging
# 30 5121 msr_write c0000080 = 0x1          B7: +SCE (EFER 0 -> 1)  reset False
# 31 5120 msr_read 10 (TSC)                 skipped (4)
# 32 5120 cr_write 0 = 0x50033              A5: -PG with LME: LMA cleared,
#                                           EFER 0xd01 -> 0x901     reset True
# 33 5120 msr_write c0000080 = 0x0          A6: EFER 0 (LMA was 0)  reset True (NX)
# 34 5120 cr_write 4 = 0x0                  A7: -PSE -PAE -SMEP -SMAP ... reset True
# 35 5120 cr_write 0 = 0x40033              A8: only WP cleared, PG=0:
#                                           v5.17 mask has WP       reset True
# 36 5120 kvm_entry                         skipped (5)
# 37 5120 cr_write 0 = 0x60000010           A9: 0x40033 ^ 0x60000010 = 0x60040023:
#                                           +CD +NW -AM -NE -MP -PE; no WP/PG -> False
FT_A = [(0x80040033, 0x3406F0, 0xD01), (0x80050033, 0x3406F0, 0xD01),
        (0x80050033, 0x340670, 0xD01), (0x80050033, 0x3406F0, 0xD01),
        (0x50033, 0x3406F0, 0x901), (0x50033, 0x3406F0, 0x0), (0x50033, 0x0, 0x0),
        (0x40033, 0x0, 0x0), (0x60000010, 0x0, 0x0)]
FT_B = [(0x60000011, 0x0, 0x0), (0x60000011, 0x10, 0x0), (0x80000011, 0x10, 0x0),
        (0x80010011, 0x10, 0x0), (0x80010019, 0x10, 0x0), (0x80010011, 0x10, 0x0),
        (0x80010011, 0x10, 0x1)]


def test_ftrace_fixture():
    t = parse_trace(FTRACE)
    assert t.format == "ftrace"
    # "<...>" (comm not in saved_cmdlines) is replaced by the real name later.
    assert t.threads == ["CPU 0/KVM-5120", "CPU 1/KVM-5121"]
    assert t.line.tolist() == [17, 18, 19, 20, 21, 22, 24, 25, 27, 28, 30, 32, 33, 34, 35, 37]
    assert t.vcpu.tolist() == [0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert (t.skipped, t.reads_adopted, t.failed_writes) == (5, 3, 1)
    r = regs(t)
    assert [r[i] for i in np.flatnonzero(t.vcpu == 0)] == FT_A
    assert [r[i] for i in np.flatnonzero(t.vcpu == 1)] == FT_B
    assert t.kvm_reset[t.vcpu == 0].tolist() == [True, True, False, False, True, True, True,
                                                 True, False]
    assert t.kvm_reset[t.vcpu == 1].tolist() == [False, True, True, True, False, False, False]


# Replay (same for tdp and shadow):
#  vCPU 0: A1 first step: recompute. A2 WP (cr0_wp; shadow also
#          smep/smap_andnot_wp 1 -> 0): recompute. A3, A4 PGE: skip.
#          A5 PG off: tdp -> the constant PG=0 role, shadow -> direct 1, level 3
#          (LMA now 0): recompute. A6 (NX), A7 (CR4), A8 (WP), A9: PG=0 and LMA=0,
#          so neither role sees them: 4 skips. => 3 recomputes, 6 skips
#          (A6, A7, A8 are kvm_resets whose role is unchanged).
#  vCPU 1: B1 first: recompute. B2 PSE with PG=0: skip. B3 PG on (shadow:
#          direct 0, has_4_byte_gpte 1, level 3): recompute. B4 WP: recompute.
#          B5, B6 TS, B7 SCE: skip. => 3, 4.
@pytest.mark.parametrize("flavor", ["tdp", "shadow"])
def test_ftrace_replay(flavor):
    t = parse_trace(FTRACE)
    assert counts(t, flavor) == {0: (3, 6), 1: (3, 4)}


# ============================================================================
# perf script: vCPU 0 boots into 5-level long mode; vCPU 1 steady state
# ============================================================================
#
#  1 6001 kvm:kvm_exit                        skipped (1)
#  2 6001 cr_write 0 = 0x60000011             P0-1 +PE               reset False
#  3 6001 cr_write 4 = 0x1020                 P0-2 +PAE +LA57         reset True
#  4 6001 msr_write c0000080 = 0x100          P0-3 +LME               reset False
#  5 6001 cr_write 3                          skipped (2)
#  6 6001 cr_write 0 = 0x80000011             P0-4 +PG -> LMA, EFER 0x500; reset True
#  7 6002 cr_read 4 = 0x7416f0                read (1)
#  8 6002 msr_read c0000080 = 0xd01           read (2)
#  9 6001 msr_write c0000080 = 0xd01          P0-5 +SCE +NX (LMA bit written,
#                                             already 1) -> 0xd01    reset True
# 10 6002 cr_write 0 = 0x80050033             P1-1: CR0 was RESET 0x60000010
#                                             (never read); +PG with LME ->
#                                             LMA stays 1; PG and WP -> True
# 11 swapper 0 sched:sched_switch             skipped (3)
# 12 6001 cr_write 0 = 0x80050033             P0-6 +WP etc.           reset True
# 13 6002 cr_write 4 = 0x741670               P1-2 -PGE               reset False
# 14 6001 cr_write 4 = 0x3416f0               P0-7 +PSE +SMEP +SMAP ... True
# 15 6002 cr_write 4 = 0x7416f0               P1-3 +PGE               reset False
# 16 6001 cr_write 4 = 0x7416f0               P0-8 +PKE               reset True
# 17 6001 msr_write EFER 0x1d01 (#GP)         failed (1)
# 18 6002 msr_write 830 (x2APIC ICR)          skipped (4)
# 19 6002 cr_write 0 = 0x8005003b             P1-4 +TS                reset False
# 20 6002 msr_read c0000103 (#GP)             skipped (5): another MSR
# 21 6002 cr_write 0 = 0x80050033             P1-5 -TS                reset False
# 22 6002 msr_write c0000080 = 0xd01          P1-6 unchanged          reset False
# 23 6002 kvm:kvm_entry                       skipped (6)
PF_0 = [(0x60000011, 0x0, 0x0), (0x60000011, 0x1020, 0x0), (0x60000011, 0x1020, 0x100),
        (0x80000011, 0x1020, 0x500), (0x80000011, 0x1020, 0xD01),
        (0x80050033, 0x1020, 0xD01), (0x80050033, 0x3416F0, 0xD01),
        (0x80050033, 0x7416F0, 0xD01)]
PF_1 = [(0x80050033, 0x7416F0, 0xD01), (0x80050033, 0x741670, 0xD01),
        (0x80050033, 0x7416F0, 0xD01), (0x8005003B, 0x7416F0, 0xD01),
        (0x80050033, 0x7416F0, 0xD01), (0x80050033, 0x7416F0, 0xD01)]


def test_perf_fixture():
    t = parse_trace(PERF)
    assert t.format == "perf"
    assert t.threads == ["CPU 0/KVM-6001", "CPU 1/KVM-6002"]  # swapper-0: no kvm_cr/msr
    assert t.line.tolist() == [2, 3, 4, 6, 9, 10, 12, 13, 14, 15, 16, 19, 21, 22]
    assert t.vcpu.tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1]
    assert (t.skipped, t.reads_adopted, t.failed_writes) == (6, 2, 1)
    r = regs(t)
    assert [r[i] for i in np.flatnonzero(t.vcpu == 0)] == PF_0
    assert [r[i] for i in np.flatnonzero(t.vcpu == 1)] == PF_1
    assert t.kvm_reset[t.vcpu == 0].tolist() == [False, True, False, True, True, True, True, True]
    assert t.kvm_reset[t.vcpu == 1].tolist() == [True, False, False, False, False, False]


# Replay (same for tdp and shadow):
#  vCPU 0: P0-1 first: recompute. P0-2 (PAE, LA57) and P0-3 (LME) with PG=0 and
#          LMA=0: tdp role constant; shadow level 3 (LA57 only counts with
#          LMA): 2 skips. P0-4 PG on: recompute. P0-5 NX: recompute. P0-6 WP:
#          recompute. P0-7 PSE/SMEP/SMAP: recompute. P0-8 PKE with LMA=1
#          (ext.cr4_pke): recompute. => 6 recomputes, 2 skips.
#  vCPU 1: P1-1 first: recompute; PGE, TS and the unchanged EFER: 5 skips.
@pytest.mark.parametrize("flavor", ["tdp", "shadow"])
def test_perf_replay(flavor):
    t = parse_trace(PERF)
    assert counts(t, flavor) == {0: (6, 2), 1: (1, 5)}


def test_perf_with_initial_cr0():
    # initial={"cr0": 0x80050033}: every vCPU starts with that CR0 (CR4, EFER
    # keep their RESET values, 0).
    #  P0-1: 0x80050033 -> 0x60000011: PG and WP change -> kvm_reset True; LME=0
    #        so no LMA change (EFER stays 0).
    #  P1-1: 0x80050033 -> 0x80050033: nothing changes -> kvm_reset False; LMA
    #        keeps the read value (1): EFER 0xd01.
    t = parse_trace(PERF, initial={"cr0": 0x80050033})
    v0, v1 = np.flatnonzero(t.vcpu == 0), np.flatnonzero(t.vcpu == 1)
    assert bool(t.kvm_reset[v0[0]]) is True and regs(t)[v0[0]] == (0x60000011, 0, 0)
    assert bool(t.kvm_reset[v1[0]]) is False and regs(t)[v1[0]] == (0x80050033, 0x7416F0, 0xD01)
    # The rest of both sequences is unchanged.
    assert [regs(t)[i] for i in v0] == PF_0 and [regs(t)[i] for i in v1] == PF_1


# ============================================================================
# Rules on small inline traces
# ============================================================================

def tc(*events, tid=100, comm="CPU 0/KVM"):
    """trace-cmd lines for one thread: events are 'kvm_cr: ...' strings."""
    out = ["cpus=1"]
    for i, e in enumerate(events):
        out.append(f"  {comm}-{tid}  [000]  10.{i:06d}: {e}")
    return out


def test_lma_follows_pg_with_lme():
    t = parse_trace(tc(
        "kvm_cr: cr_write 0 = 0x80000011",      # PG on, LME=0 -> LMA stays 0
        "kvm_cr: cr_write 0 = 0x11",            # PG off
        "kvm_msr: msr_write c0000080 = 0x100",  # LME
        "kvm_cr: cr_write 0 = 0x80000011",      # PG on with LME -> LMA
        "kvm_cr: cr_write 0 = 0x80010011",      # PG stays on: LMA unchanged
        "kvm_cr: cr_write 0 = 0x10011",         # PG off with LME -> LMA cleared
    ))
    assert [hex(e) for _, _, e in regs(t)] == ["0x0", "0x0", "0x100", "0x500", "0x500", "0x100"]


def test_efer_write_keeps_lma():
    # LMA=0: writing 0xd01 (with the LMA bit) keeps LMA 0 -> 0x901.
    # Then LMA=1 (PG on with LME): writing 0x901 (no LMA bit) keeps LMA 1 -> 0xd01.
    t = parse_trace(tc(
        "kvm_msr: msr_write c0000080 = 0xd01",
        "kvm_cr: cr_write 0 = 0x80000011",
        "kvm_msr: msr_write c0000080 = 0x901",
    ))
    assert [hex(e) for _, _, e in regs(t)] == ["0x901", "0xd01", "0xd01"]
    # kvm_reset: NX 0 -> 1 (True); PG (True); 0xd01 -> 0xd01 (False).
    assert t.kvm_reset.tolist() == [True, True, False]


def test_reads_are_adopted_not_steps():
    # A read sets the register; the next write is compared against it.
    t = parse_trace(tc(
        "kvm_cr: cr_read 4 = 0x3406f0",
        "kvm_msr: msr_read c0000080 = 0xd01",
        "kvm_cr: cr_read 0 = 0x80050033",
        "kvm_cr: cr_write 4 = 0x340670",        # -PGE only -> kvm_reset False
    ))
    assert len(t) == 1 and t.reads_adopted == 3
    assert regs(t) == [(0x80050033, 0x340670, 0xD01)]
    assert t.kvm_reset.tolist() == [False]


def test_gp_writes_change_nothing():
    t = parse_trace(tc(
        "kvm_msr: msr_write c0000080 = 0x800 (#GP)",   # NX not set
        "kvm_msr: msr_write c0000080 = 0x1",           # step: EFER 0x1
        "kvm_msr: msr_write c0000080 = 0x801 (#GP)",   # not taken
        "kvm_cr: cr_write 4 = 0x20",                   # step: EFER still 0x1
        "kvm_msr: msr_read c0000080 = 0x0 (#GP)",      # failed read: nothing learnt
        "kvm_cr: cr_write 4 = 0x20",
    ))
    assert t.failed_writes == 2 and t.skipped == 1 and t.reads_adopted == 0
    assert regs(t) == [(0x60000010, 0, 0x1), (0x60000010, 0x20, 0x1), (0x60000010, 0x20, 0x1)]
    assert t.kvm_reset.tolist() == [False, True, False]
    assert t.line.tolist() == [3, 5, 7]


def test_other_registers_and_events_skipped():
    t = parse_trace(tc(
        "kvm_cr: cr_write 3 = 0x1000",
        "kvm_cr: cr_read 3 = 0x1000",
        "kvm_cr: cr_write 8 = 0xf",
        "kvm_cr: cr_read 2 = 0x7f001000",
        "kvm_msr: msr_write 1b = 0xfee00900",
        "kvm_msr: msr_write c0000081 = 0x23001000000000",   # STAR, not EFER
        "kvm_exit: vcpu 0 reason HLT rip 0xffffffff81c9a4ee info1 0x0000000000000000 "
        "info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000",
        "kvm_cr: cr_write 0 = 0x80050033",
    ))
    assert t.skipped == 7 and len(t) == 1 and t.reads_adopted == 0


def test_vcpu_order_and_names():
    # Indices by first kvm_cr/kvm_msr appearance; a thread seen only in other
    # events gets none; a thread with only reads gets one but no steps.
    lines = [
        "cpus=2",
        "  CPU 1/KVM-201  [001]  1.000001: kvm_exit: vcpu 1 reason HLT rip 0x1 info1 0x0 "
        "info2 0x0 intr_info 0x00000000 error_code 0x00000000",
        "  CPU 2/KVM-202  [000]  1.000002: kvm_cr: cr_read 0 = 0x80050033",
        "  CPU 0/KVM-200  [000]  1.000003: kvm_cr: cr_write 4 = 0x20",
        "  CPU 1/KVM-201  [001]  1.000004: kvm_cr: cr_write 4 = 0x20",
        "  CPU 0/KVM-200  [000]  1.000005: kvm_cr: cr_write 4 = 0x0",
    ]
    t = parse_trace(lines)
    assert t.threads == ["CPU 2/KVM-202", "CPU 0/KVM-200", "CPU 1/KVM-201"]
    assert t.vcpu.tolist() == [1, 2, 1]


def test_shadow_sees_lma_with_paging_off():
    # The one place the v5.17 tdp and shadow roles differ for the same
    # registers: shadow level = 5 if LA57 else 4 whenever LMA=1, even with PG=0
    # (docs §4.2, §12). Start (raw, architecturally unreachable) at CR0
    # 0x60000011 (PG=0) with EFER 0x500 (LME|LMA):
    #  step 1 CR4 0x20 (PAE): first step -> recompute in both.
    #  step 2 CR4 0x1020 (+LA57): tdp role, PG=0 -> unchanged -> skip;
    #         shadow level 4 -> 5 -> recompute.
    t = parse_trace(tc("kvm_cr: cr_write 4 = 0x20", "kvm_cr: cr_write 4 = 0x1020"),
                    initial={"cr0": 0x60000011, "efer": 0x500})
    assert regs(t) == [(0x60000011, 0x20, 0x500), (0x60000011, 0x1020, 0x500)]
    assert counts(t, "tdp") == {0: (1, 1)}
    assert counts(t, "shadow") == {0: (2, 0)}


def test_cpuid_fields_filled():
    t = parse_trace(tc("kvm_cr: cr_write 0 = 0x80050033"), maxphyaddr=46, guest_amd=True,
                    guest_gbpages=True)
    g = t.guests[0]
    assert int(g["maxphyaddr"]) == 46 and bool(g["guest_amd"]) and bool(g["guest_gbpages"])


def test_empty_trace():
    t = parse_trace(["cpus=4", "CPU 3 is empty"])
    assert len(t) == 0 and t.guests.dtype == kvmmu.GUEST_DTYPE and t.threads == []
    assert t.format == "trace-cmd"
    assert t.vcpu.shape == t.line.shape == t.kvm_reset.shape == (0,)


# ---- line shapes -------------------------------------------------------------

def test_ftrace_variants():
    # 4-character flags (older kernels), a (TGID) column, a dash in the comm,
    # no header: the flags column says ftrace.
    lines = [
        "  qemu-kvm-vcpu-3100  [002] d...  7.000001: kvm_cr: cr_write 0 = 0x80050033",
        " CPU 0/KVM-3101 (   3099) [003] d.... 7.000002: kvm_cr: cr_write 0 = 0x80050033",
        " CPU 0/KVM-3101 (-------) [003] d.... 7.000003: kvm_cr: cr_write 4 = 0x20",
    ]
    t = parse_trace(lines)
    assert t.format == "ftrace"
    assert t.threads == ["qemu-kvm-vcpu-3100", "CPU 0/KVM-3101"]
    assert t.vcpu.tolist() == [0, 1, 1]


def test_trace_cmd_without_header():
    # No "cpus=" line and no flags column: trace-cmd's shape.
    t = parse_trace(["  CPU 0/KVM-9  [000]  1.5: kvm_cr:   cr_write 4 = 0x20"])
    assert t.format == "trace-cmd" and len(t) == 1


def test_perf_pid_tid_and_period():
    lines = [
        "       CPU 0/KVM 7000/7001 [001]  9.000001: kvm:kvm_cr: cr_write 4 = 0x20",
        "       CPU 0/KVM 7000/7001 [001]  9.000002:          1 kvm:kvm_cr: cr_write 4 = 0x0",
        "            perf  7100 [002]  9.000003: sched:sched_switch: prev_comm=perf prev_pid=7100",
    ]
    t = parse_trace(lines)
    assert t.format == "perf" and t.threads == ["CPU 0/KVM-7001"] and len(t) == 2
    assert t.skipped == 1


def test_uppercase_hex_and_crlf():
    t = parse_trace(["cpus=1\r\n", "  CPU 0/KVM-5  [000]  1.0: kvm_msr: msr_write C0000080 = 0xD01\r\n"])
    assert regs(t) == [(0x60000010, 0, 0x901)]   # LMA (0) kept


# ---- sources and names ---------------------------------------------------------

def test_sources(tmp_path):
    ref = parse_trace(TRACE_CMD)
    text = TRACE_CMD.read_text()
    variants = [
        str(TRACE_CMD),
        TRACE_CMD,
        text.splitlines(),
        text.splitlines(keepends=True),
        io.StringIO(text),
        (ln for ln in text.splitlines()),
        [ln.encode() for ln in text.splitlines()],
    ]
    for src in variants:
        t = parse_trace(src)
        assert regs(t) == regs(ref) and t.line.tolist() == ref.line.tolist()
        assert (t.skipped, t.reads_adopted, t.failed_writes, t.format) == (6, 4, 1, "trace-cmd")
    with open(TRACE_CMD) as f:
        assert len(parse_trace(f)) == 16


def test_multiline_str_rejected():
    with pytest.raises(TypeError, match="splitlines"):
        parse_trace(TRACE_CMD.read_text())


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        parse_trace(HERE / "no-such-trace.txt")


# ---- bad input -----------------------------------------------------------------

BAD_BODIES = [
    ("kvm_cr: cr_write 0 = 0xzz", "kvm_cr: expected 'cr_read|cr_write"),
    ("kvm_cr: cr_write 0 = 80050033", "kvm_cr: expected"),          # no 0x
    ("kvm_cr: cr_write 0 =", "kvm_cr: expected"),
    ("kvm_cr: cr_poke 0 = 0x1", "kvm_cr: expected"),
    ("kvm_cr:", "kvm_cr: expected"),
    ("kvm_msr: msr_write c0000080 = 0xd01 (#UD)", "kvm_msr: expected 'msr_read|msr_write"),
    ("kvm_msr: msr_write c0000080 0xd01", "kvm_msr: expected"),
    ("kvm_msr: msr_write EFER = 0xd01", "kvm_msr: expected"),
    ("kvm_msr: msr_write c0000080 = 0x10000000000000000", "64-bit value"),
]


@pytest.mark.parametrize("event,what", BAD_BODIES)
def test_malformed_lines(event, what):
    lines = tc("kvm_cr: cr_write 4 = 0x20", event)   # the bad line is line 3
    with pytest.raises(TraceParseError) as ei:
        parse_trace(lines)
    msg = str(ei.value)
    assert msg.startswith("<trace>:3: ") and what in msg
    assert isinstance(ei.value, ValueError)


def test_malformed_line_in_file_names_path(tmp_path):
    p = tmp_path / "bad.trace"
    good = TRACE_CMD.read_text().splitlines()
    good[16] = good[16].replace("0x80050033", "0x8005003g")    # line 17
    p.write_text("\n".join(good) + "\n")
    with pytest.raises(TraceParseError, match="^" + re.escape(f"{p}:17: kvm_cr: expected")):
        parse_trace(p)
    with pytest.raises(TraceParseError, match=r"^vm1\.trace:17: "):
        parse_trace(str(p), name="vm1.trace")
    with pytest.raises(TraceParseError, match=r"^<trace>:17: "):
        parse_trace(good)


def test_malformed_prefix_of_our_event():
    # Our event, but the COMM-PID [CPU] TIMESTAMP part is broken.
    with pytest.raises(TraceParseError, match=r"^<trace>:2: kvm_cr/kvm_msr line not in"):
        parse_trace(["cpus=1", "CPU 0/KVM [000] 1.0: kvm_cr: cr_write 0 = 0x11"])
    # A perf file then a dash-style kvm_cr line: the style is fixed per file.
    with pytest.raises(TraceParseError, match=r"^<trace>:2: .*'COMM TID \[CPU\]"):
        parse_trace(["  CPU 0/KVM  5 [000]  1.0: kvm:kvm_cr: cr_write 4 = 0x20",
                     "  CPU 0/KVM-5  [000]  1.1: kvm_cr: cr_write 4 = 0x0"])


def test_other_junk_lines_ignored():
    # Lines that are not events (and do not mention kvm_cr/kvm_msr) are not counted.
    t = parse_trace(["cpus=2", "CPU 1 is empty", "", "version = 7",
                     "  CPU 0/KVM-5  [000]  1.0: kvm_cr: cr_write 4 = 0x20"])
    assert len(t) == 1 and t.skipped == 0


@pytest.mark.parametrize("initial,exc", [
    ({"cr3": 0}, ValueError),
    ({"cr0": -1}, ValueError),
    ({"cr0": 1 << 64}, ValueError),
    ({"cr0": "0x11"}, TypeError),
    ({"efer": True}, TypeError),
    ([("cr0", 1)], TypeError),
])
def test_bad_initial(initial, exc):
    with pytest.raises(exc):
        parse_trace(tc("kvm_cr: cr_write 4 = 0x20"), initial=initial)


def test_bad_source_type():
    with pytest.raises(TypeError):
        parse_trace(42)
    with pytest.raises(TypeError):
        parse_trace(b"cpus=1\n")


# ---- kvm_mmu_reset_context triggers per version ---------------------------------

@pytest.mark.parametrize("reg,old,new,v517,v616_tdp,v616_shadow", [
    # CR0: KVM_MMU_CR0_ROLE_BITS = PG|WP in both.
    ("cr0", 0x80050033, 0x8005003B, False, False, False),   # TS
    ("cr0", 0x11, 0x80000011, True, True, True),             # PG
    # WP alone with PG=1: v6.16 resets only without TDP (with TDP: kvm_init_mmu).
    ("cr0", 0x80050033, 0x80040033, True, False, True),
    # WP alone with the new PG=0: v6.16 returns early.
    ("cr0", 0x50033, 0x40033, True, False, False),
    # WP together with another bit: the v6.16 shortcut does not apply.
    ("cr0", 0x80050033, 0x80040032, True, True, True),
    # CR4: PSE|PAE|LA57|SMEP|SMAP|PKE in both; PGE and PCIDE (bit 17) never.
    ("cr4", 0x3406F0, 0x340670, False, False, False),
    ("cr4", 0x3606F0, 0x3406F0, False, False, False),
    ("cr4", 0x3406F0, 0x7406F0, True, True, True),
    # EFER: v5.17 NX only; v6.16 LME|NX.
    ("efer", 0x1, 0x101, False, True, True),
    ("efer", 0x501, 0xD01, True, True, True),
    ("efer", 0x0, 0x1, False, False, False),
])
def test_mmu_reset_triggered(reg, old, new, v517, v616_tdp, v616_shadow):
    assert mmu_reset_triggered(reg, old, new) is v517
    assert mmu_reset_triggered(reg, old, new, "v5.17", tdp_enabled=False) is v517
    assert mmu_reset_triggered(reg, old, new, "v6.16", tdp_enabled=True) is v616_tdp
    assert mmu_reset_triggered(reg, old, new, "v6.16", tdp_enabled=False) is v616_shadow


def test_mmu_reset_triggered_bad_args():
    with pytest.raises(ValueError):
        mmu_reset_triggered("cr3", 0, 1)
    with pytest.raises(ValueError):
        mmu_reset_triggered("cr0", 0, 1, version="v6.1")


def test_module_doctests():
    res = doctest.testmod(traces_mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
