"""``kvmmu access`` and ``kvmmu accessc``: access verdicts from the command line.

:func:`add_parsers` registers both subcommands on an ``argparse`` subparsers
object; each sets ``func`` to a handler taking the parsed arguments and
returning the exit status (0 fine, 1 differences found, 2 bad input).

* ``kvmmu access --cr0 0x80010001 --cr4 0x20 --efer 0xd00 --pml4e 0x1007
  --pdpte 0x2007 --pde 0x3007 --pte 0x4005 --user --write`` prints KVM's
  verdict on one access and the walk, entry by entry.
* ``kvmmu accessc --maxphyaddr 46 --pku`` runs access.c's whole main loop
  through KVM's walker, prints the count per error code, the wall time and
  the agreement with access.c's own prediction.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any, Dict, List

import numpy as np

LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}


def _u64(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= v < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text} does not fit in 64 bits")
    return v


def _ranged(lo: int, hi: int):
    def conv(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {v}")
        return v
    return conv


def _host(args) -> Any:
    from ._types import HostConfig
    return HostConfig(tdp_enabled=not args.no_tdp)


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("context")
    g.add_argument("--version", dest="kversion", choices=("v5.17", "v6.16"), default="v5.17",
                   help="kernel version (default v5.17)")
    g.add_argument("--flavor", choices=("tdp", "shadow", "shadow_npt", "nested"), default="tdp",
                   help="which MMU context judges the walk (default tdp)")
    g.add_argument("--no-tdp", action="store_true",
                   help="host without TDP (the configuration flavor shadow runs under)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_parsers(subparsers) -> None:
    """Register ``access`` and ``accessc`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "access", help="KVM's verdict on one guest access, and the walk",
        description="Walk one guest access the way KVM's guest walker does and print the "
                    "verdict: fault or not, error code, where the walk stopped, and the "
                    "entries after the accessed/dirty update.")
    g = p.add_argument_group("state")
    g.add_argument("--cr0", type=_u64, default=0x80010001, metavar="VALUE",
                   help="guest CR0 (default 0x80010001: PG|WP|PE)")
    g.add_argument("--cr4", type=_u64, default=0x20, metavar="VALUE",
                   help="guest CR4 (default 0x20: PAE)")
    g.add_argument("--efer", type=_u64, default=0xD00, metavar="VALUE",
                   help="guest EFER (default 0xd00: NX|LMA|LME)")
    g.add_argument("--maxphyaddr", type=_ranged(0, 255), default=46, metavar="N",
                   help="guest MAXPHYADDR (default 46)")
    g.add_argument("--pkru", type=_ranged(0, 2**32 - 1), default=0, metavar="VALUE",
                   help="PKRU (default 0)")
    g.add_argument("--amd", action="store_true", help="guest CPUID vendor AMD")
    g.add_argument("--no-gbpages", action="store_true", help="guest CPUID without 1 GiB pages")
    e = p.add_argument_group("entries (the one met at each level; default 0)")
    for lvl in (5, 4, 3, 2, 1):
        e.add_argument(f"--{LEVEL_NAMES[lvl].lower()}", type=_u64, default=0, metavar="VALUE")
    a = p.add_argument_group("access (a supervisor read without flags)")
    a.add_argument("--write", action="store_true")
    a.add_argument("--user", action="store_true")
    a.add_argument("--fetch", action="store_true")
    a.add_argument("--smap-override", action="store_true",
                   help="SMAP checks overridden (v5.17: CPL<3 and EFLAGS.AC; v6.16: EFLAGS.AC "
                        "on an explicit access)")
    _common(p)
    p.set_defaults(func=cmd_access)

    p = subparsers.add_parser(
        "accessc", help="kvm-unit-tests access.c's whole flag space through KVM's walker",
        description="Enumerate access.c's main-loop flag words for a CPU, judge each with "
                    "KVM's walker and compare with access.c's own prediction. Exit status 1 "
                    "when some word disagrees.")
    p.add_argument("--maxphyaddr", type=_ranged(1, 64), default=46, metavar="N",
                   help="CPU MAXPHYADDR (default 46; 36 adds the bit-36 flags)")
    p.add_argument("--pku", action="store_true", help="the CPU has protection keys")
    p.add_argument("--smep", action="store_true", help="the CPU has SMEP")
    p.add_argument("--legacy-smep", action="store_true",
                   help="pre-2021 rule: run CR4.SMEP=1 words except user ones (with --smep)")
    p.add_argument("--fep", action="store_true", help="forced emulation words too")
    p.add_argument("--levels", type=int, choices=(4, 5), default=4)
    p.add_argument("--threads", type=_ranged(1, 1024), default=None, metavar="N")
    p.add_argument("--chunk", type=_ranged(1, 1 << 26), default=1 << 20, metavar="N",
                   help="words per call (bounds memory; default 1048576)")
    p.add_argument("--no-predict", action="store_true", help="skip the comparison with access.c")
    p.add_argument("--examples", type=_ranged(0, 1000), default=5, metavar="N",
                   help="disagreeing words to show (default 5)")
    _common(p)
    p.set_defaults(func=cmd_accessc)


def _bits(e: int, wide: bool) -> str:
    names = [n for b, n in ((0, "P"), (1, "W"), (2, "U"), (5, "A"), (6, "D"), (7, "PS"))
             if (e >> b) & 1]
    if wide and (e >> 63) & 1:
        names.append("XD")
    if wide and (e >> 59) & 15:
        names.append(f"key={(e >> 59) & 15}")
    return "|".join(names) or "-"


def cmd_access(args) -> int:
    from . import access as acc_mod
    from .engine import init_mmu
    from ._types import guests

    pfec = (2 if args.write else 0) | (4 if args.user else 0) | (16 if args.fetch else 0)
    gpte = [args.pte, args.pde, args.pdpte, args.pml4e, args.pml5e]
    host = _host(args)
    try:
        a = acc_mod.accesses(cr0=args.cr0, cr4=args.cr4, efer=args.efer,
                             maxphyaddr=args.maxphyaddr, guest_amd=args.amd,
                             guest_gbpages=not args.no_gbpages, pkru=args.pkru, pfec=pfec,
                             smap_override=args.smap_override, gpte=gpte)
        r = acc_mod.access_verdicts(a, version=args.kversion, flavor=args.flavor, host=host)[0]
    except (TypeError, ValueError) as exc:
        print(f"kvmmu access: error: {exc}", file=sys.stderr)
        return 2
    g = guests(cr0=args.cr0, cr4=args.cr4, efer=args.efer, maxphyaddr=args.maxphyaddr,
               guest_amd=args.amd, guest_gbpages=not args.no_gbpages)
    ctx = init_mmu(g, args.flavor, host, version=args.kversion)[0]
    root = int(ctx["root_level"])
    wide = root >= 3
    stop = int(r["level"])
    walk: List[Dict[str, Any]] = []
    if root:
        for lvl in range(root, max(stop, 1) - 1, -1):
            e = gpte[lvl - 1] if wide else gpte[lvl - 1] & 0xFFFFFFFF
            row = 1 if (e >> 7) & 1 else 0
            mask = 0 if (root == 3 and lvl == 3) else int(ctx["guest_rsvd"][row, lvl - 1])
            walk.append({"level": lvl, "name": LEVEL_NAMES[lvl], "entry": e,
                         "after": int(r["gpte_after"][lvl - 1]),
                         "rsvd_mask": mask, "rsvd_hit": e & mask})
            if lvl == stop:
                break
    verdict = {
        "fault": bool(r["fault"]), "error_code": int(r["error_code"]),
        "error_bits": acc_mod.decode_error_code(int(r["error_code"])) if r["fault"] else "",
        "level": stop, "kind": acc_mod.KINDS[int(r["kind"])],
        "paging_levels": root, "version": args.kversion, "flavor": args.flavor,
        "walk": walk,
    }
    if args.json:
        print(json.dumps(verdict, indent=2))
        return 0
    access = ("user " if args.user else "supervisor ") + \
        ("write" if args.write else "fetch" if args.fetch else "read")
    print(f"{access}, {root}-level paging" if root else f"{access}, paging off")
    for w in walk:
        note = ""
        if w["rsvd_hit"]:
            note = f"  reserved bits {w['rsvd_hit']:#x}"
        elif root == 3 and w["level"] == 3:
            note = "  (PDPTR: only P tested)"
        changed = "" if w["after"] == w["entry"] else f" -> {w['after']:#018x}"
        print(f"  {w['name']:<6} {w['entry']:#018x} {_bits(w['entry'], wide):<18}{changed}{note}")
    if verdict["fault"]:
        print(f"#PF error code {verdict['error_code']:#x} ({verdict['error_bits']}): "
              f"{verdict['kind']} at {LEVEL_NAMES.get(stop, stop)}")
    else:
        where = f"leaf {LEVEL_NAMES[stop]}" if stop else "no walk"
        print(f"no fault ({where})")
    return 0


def cmd_accessc(args) -> int:
    from . import accessc
    from .access import ACCESS_RESULT_DTYPE, decode_error_code

    if args.legacy_smep and not args.smep:
        print("kvmmu accessc: --legacy-smep only adds words with --smep", file=sys.stderr)
    host = _host(args)
    t0 = time.perf_counter()
    words = accessc.enumerate(args.maxphyaddr, args.pku, smep=args.smep, fep=args.fep,
                              legacy_smep=args.legacy_smep)
    t_enum = time.perf_counter() - t0
    buf = np.empty(min(args.chunk, max(words.size, 1)), dtype=ACCESS_RESULT_DTYPE)
    hist: Counter = Counter()
    pred_hist: Counter = Counter()
    t_verdicts = t_predict = 0.0
    disagree = 0
    examples: List[Dict[str, Any]] = []
    try:
        for c in accessc.chunks(words, args.chunk):
            t = time.perf_counter()
            r = accessc.verdicts(c, args.maxphyaddr, args.levels, version=args.kversion,
                                 flavor=args.flavor, host=host, out=buf[:c.size],
                                 threads=args.threads)
            t_verdicts += time.perf_counter() - t
            code = np.where(r["fault"], r["error_code"].astype(np.int32), -1)
            vals, cnt = np.unique(code, return_counts=True)
            hist.update(dict(zip(vals.tolist(), cnt.tolist())))
            if args.no_predict:
                continue
            t = time.perf_counter()
            p = accessc.predict(c, args.maxphyaddr, args.levels)
            t_predict += time.perf_counter() - t
            pcode = np.where(p["fault"], p["error_code"].astype(np.int32), -1)
            vals, cnt = np.unique(pcode, return_counts=True)
            pred_hist.update(dict(zip(vals.tolist(), cnt.tolist())))
            ok = accessc.agreement(r, p, c)
            bad = np.flatnonzero(~ok)
            disagree += bad.size
            for i in bad[:max(0, args.examples - len(examples))]:
                examples.append({
                    "word": int(c[i]), "flags": accessc.describe(int(c[i])),
                    "kvm": {"fault": bool(r["fault"][i]), "error_code": int(r["error_code"][i]),
                            "pte": int(r["gpte_after"][i][0]), "pde": int(r["gpte_after"][i][1])},
                    "access_c": {"fault": bool(p["fault"][i]),
                                 "error_code": int(p["error_code"][i]),
                                 "pte": int(p["pte"][i]), "pde": int(p["pde"][i])}})
    except (TypeError, ValueError) as exc:
        print(f"kvmmu accessc: error: {exc}", file=sys.stderr)
        return 2
    n = int(words.size)
    faults = n - hist.get(-1, 0)
    out = {
        "maxphyaddr": args.maxphyaddr, "pku": args.pku, "smep": args.smep,
        "legacy_smep": args.legacy_smep, "fep": args.fep, "levels": args.levels,
        "version": args.kversion, "flavor": args.flavor,
        "words": n, "faults": faults,
        "by_error_code": {("none" if k == -1 else f"{k:#x}"): v for k, v in sorted(hist.items())},
        "enumerate_s": t_enum, "verdicts_s": t_verdicts,
        "ns_per_verdict": t_verdicts / n * 1e9 if n else 0.0,
    }
    if not args.no_predict:
        out.update({"predict_s": t_predict, "agree": n - disagree, "disagree": disagree,
                    "examples": examples})
    expected = accessc.MAIN_COUNTS.get((args.maxphyaddr, args.pku))
    if expected and not (args.smep or args.fep):
        out["doc_counts"] = {"words": expected[0], "faults": expected[1]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"access.c main loop: MAXPHYADDR {args.maxphyaddr}, PKU {'yes' if args.pku else 'no'}"
              f"{', SMEP' if args.smep else ''}{' (legacy rule)' if args.legacy_smep else ''}"
              f"{', FEP' if args.fep else ''}, {args.levels}-level paging; "
              f"KVM {args.kversion} {args.flavor}")
        line = f"{n:,} words, {faults:,} fault"
        if "doc_counts" in out:
            dc = out["doc_counts"]
            same = dc["words"] == n and dc["faults"] == faults
            line += f" (doc: {dc['words']:,} / {dc['faults']:,}{', same' if same else ', DIFFERENT'})"
        print(line)
        print("  error code          KVM" + ("     access.c" if not args.no_predict else ""))
        for k in sorted(set(hist) | set(pred_hist)):
            name = "no fault" if k == -1 else f"{k:#04x} {decode_error_code(k)}"
            row = f"  {name:<16}{hist.get(k, 0):>11,}"
            if not args.no_predict:
                row += f" {pred_hist.get(k, 0):>12,}"
            print(row)
        print(f"verdicts: {t_verdicts:.3f} s ({out['ns_per_verdict']:.1f} ns/verdict); "
              f"enumerate {t_enum:.3f} s" +
              ("" if args.no_predict else f"; predict {t_predict:.3f} s"))
        if not args.no_predict:
            print(f"agreement with access.c's prediction: {n - disagree:,} of {n:,}"
                  + ("" if not disagree else f"; {disagree:,} differ"))
            for ex in examples:
                k, a = ex["kvm"], ex["access_c"]
                print(f"  {ex['flags']}: KVM {'#PF ' + hex(k['error_code']) if k['fault'] else 'ok'}"
                      f", access.c {'#PF ' + hex(a['error_code']) if a['fault'] else 'ok'}"
                      f" (pte {k['pte']:#x}/{a['pte']:#x}, pde {k['pde']:#x}/{a['pde']:#x})")
    return 1 if (not args.no_predict and disagree) else 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m kvmmu.access_cli access ...``)."""
    parser = argparse.ArgumentParser(prog="kvmmu")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
