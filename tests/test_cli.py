"""The ``kvmmu`` command line, driven through ``kvmmu.cli.main(argv)`` and as a real process.

Values are checked against the pure-Python reference model
(``kvmmu.reference``) or against numbers derived by hand in the comments,
never against the command line's own earlier output.
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import kvmmu
from kvmmu import cli, reference
from kvmmu import io as kio

HERE = Path(__file__).parent
TRACE = HERE / "cli" / "two-vcpus-trace-cmd.txt"
LINUX = dict(cr0=0x80050033, cr4=0x3706F0, efer=0xD01)
CTX_FIELDS = kvmmu.CONTEXT_DTYPE.names


class Run(NamedTuple):
    rc: int
    stdout: bytes
    err: str

    @property
    def out(self) -> str:
        return self.stdout.decode()

    def json(self):
        return json.loads(self.stdout)


def run(*argv, stdin: bytes = b"") -> Run:
    """cli.main(argv) with stdin/stdout/stderr captured (stdout as bytes: npy goes there)."""
    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", newline="", write_through=True)
    err = io.TextIOWrapper(err_b, encoding="utf-8", newline="", write_through=True)
    inp = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = inp, out, err
    try:
        rc = cli.main([str(a) for a in argv])
    finally:
        out.flush()
        err.flush()
        sys.stdin, sys.stdout, sys.stderr = saved
    return Run(rc, out_b.getvalue(), err_b.getvalue().decode())


def py_kvmmu(*argv, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("KVMMU_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "kvmmu", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=120, **kw)


def ref_context(rec, flavor, host, ept=None, version="v5.17", variant="v517") -> dict:
    """reference.init_mmu_one on a GUEST_DTYPE record (it wants a mapping, not np.void)."""
    guest = {n: rec[n].item() for n in kvmmu.GUEST_DTYPE.names}
    return reference.init_mmu_one(guest, flavor, host, ept or kvmmu.EptConfig(), version, variant)


def ctx_as_ints(rec) -> dict:
    """A CONTEXT_DTYPE record as the reference's dict of ints and nested lists."""
    return {n: (rec[n].tolist() if rec[n].shape else int(rec[n])) for n in CTX_FIELDS}


def json_ctx_as_ints(d: dict) -> dict:
    def conv(v):
        if isinstance(v, list):
            return [conv(x) for x in v]
        return int(v, 16) if isinstance(v, str) else int(v)
    return {k: conv(d[k]) for k in CTX_FIELDS}


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------
# top level


def test_version_and_help():
    r = run("--version")
    assert r.rc == 0 and r.out.strip() == f"kvmmu {kvmmu.__version__}"
    for cmd in ("inspect", "compute", "sweep", "compare", "replay", "bench"):
        r = run(cmd, "--help")
        assert r.rc == 0, cmd
        assert "examples:" in r.out and f"kvmmu {cmd}" in r.out, cmd
    r = run()
    assert r.rc == 2 and "inspect" in r.err


def test_docstring_examples_of_cli_and_io():
    import doctest

    for mod in (cli, kio):
        assert doctest.testmod(mod).failed == 0


def test_argparse_errors_exit_2():
    r = run("compute")                                   # missing INPUT
    assert r.rc == 2 and "INPUT" in r.err
    r = run("inspect", "--flavor", "bogus")
    assert r.rc == 2 and "invalid choice: 'bogus'" in r.err
    r = run("sweep", "--flavor", "shadowy")
    assert r.rc == 2 and "invalid choice" in r.err
    r = run("inspect", "--maxphyaddr", "300")
    assert r.rc == 2 and "[0, 255]" in r.err


def _examples(epilog: str):
    """(shell line, expected exit status, slow) for each example of an epilog."""
    out = []
    in_examples = False
    for line in epilog.splitlines():
        if line.strip() == "examples:":
            in_examples = True
            continue
        if in_examples and not line.strip():
            break
        if in_examples:
            cmd, _, comment = line.strip().partition("  #")
            m = re.search(r"exit (\d)", comment)
            out.append((cmd.strip(), int(m.group(1)) if m else 0, "minute" in comment))
    return out


EPILOGS = {"main": cli.MAIN_EPILOG, "inspect": cli.INSPECT_EPILOG, "compute": cli.COMPUTE_EPILOG,
           "compare": cli.COMPARE_EPILOG, "sweep": cli.SWEEP_EPILOG, "replay": cli.REPLAY_EPILOG,
           "bench": cli.BENCH_EPILOG}


@pytest.mark.parametrize("command", list(EPILOGS))
def test_help_examples_work_when_pasted(command, tmp_path, monkeypatch):
    """Every example of every --help runs (in order, in an empty directory) with the
    exit status its comment states. Lines with shell syntax run in a real bash."""
    monkeypatch.chdir(tmp_path)
    examples = _examples(EPILOGS[command])
    assert examples, command
    kvmmu_cmd = f"{shlex.quote(sys.executable)} -m kvmmu"
    try:
        import matplotlib  # noqa: F401
        have_mpl = True
    except ImportError:
        have_mpl = False
    for line, want, slow in examples:
        if slow or ("--plot" in line and not have_mpl):   # --plot needs the plot extra
            continue
        if any(c in line for c in "|>") or not line.startswith("kvmmu "):
            shell = re.sub(r"(^|\| )kvmmu ", lambda m: m.group(1) + kvmmu_cmd + " ", line)
            p = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
            assert p.returncode == want, (line, p.stderr)
        else:
            r = run(*shlex.split(line)[1:])
            assert r.rc == want, (line, r.err)


def test_python_dash_m_and_console_script():
    p = py_kvmmu("inspect", "--cr0", "PG,WP,PE", "--cr4", "PAE", "--efer", "LME,LMA,NX",
                 "--maxphyaddr", "46", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    g = kvmmu.guests(cr0=0x80010001, cr4=0x20, efer=0xD00, maxphyaddr=46)
    want = ref_context(g[0], "tdp", kvmmu.HostConfig())
    assert int(d["role"], 16) == want["role"]
    exe = shutil.which("kvmmu")
    if exe:
        p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and kvmmu.__version__ in p.stdout


# ---------------------------------------------------------------------------
# inspect

INSPECT_CASES = [
    # (flavor, version, extra options, host)
    ("tdp", "v5.17", [], kvmmu.HostConfig()),
    ("tdp", "v6.16", ["--amd-host", "--tdp-root-level", "4"],
     kvmmu.HostConfig(host_tdp_is_amd=True, tdp_root_level=4)),
    ("shadow", "v5.17", ["--no-tdp", "--variant", "literal"], kvmmu.HostConfig(tdp_enabled=False)),
    ("shadow", "v6.16", ["--no-tdp", "--shadow-me-mask", "0x800000000000",
                         "--shadow-me-value", "0x800000000000"],
     kvmmu.HostConfig(tdp_enabled=False, shadow_me_mask=1 << 47, shadow_me_value=1 << 47)),
    ("shadow_npt", "v5.17", ["--amd-host", "--host-maxphyaddr", "48"],
     kvmmu.HostConfig(host_tdp_is_amd=True, shadow_phys_bits=48)),
    ("shadow_ept", "v5.17", ["--ept-execonly", "--ept-huge-page-level", "2M", "--eptp-level", "5"],
     kvmmu.HostConfig()),
    ("nested", "v6.16", ["--max-huge-page-level", "2"], kvmmu.HostConfig(max_huge_page_level=2)),
]
STATES = [
    dict(LINUX, maxphyaddr=46, guest_gbpages=True),
    dict(cr0=0x80000011, cr4=0x10, efer=0, maxphyaddr=36),                 # 2-level paging + PSE
    dict(cr0=0x11, cr4=0x20, efer=0x100, maxphyaddr=39, smm=True),         # paging off
    dict(cr0=0x80010001, cr4=0x701020, efer=0x500, maxphyaddr=52, guest_amd=True, guest_mode=True),
]


def _state_args(s):
    a = ["--cr0", hex(s["cr0"]), "--cr4", hex(s["cr4"]), "--efer", hex(s["efer"]),
         "--maxphyaddr", str(s["maxphyaddr"])]
    for f in ("guest_amd", "guest_gbpages", "smm", "guest_mode"):
        if s.get(f):
            a.append("--" + f.replace("_", "-"))
    return a


@pytest.mark.parametrize("flavor,version,opts,host", INSPECT_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in INSPECT_CASES])
def test_inspect_json_matches_reference(flavor, version, opts, host):
    ept = kvmmu.EptConfig()
    if flavor == "shadow_ept":
        ept = kvmmu.EptConfig(execonly=True, huge_page_level=2, eptp_level=5)
    variant = opts[opts.index("--variant") + 1] if "--variant" in opts else "v517"
    for s in STATES:
        r = run("inspect", "--flavor", flavor, "--version", version, *opts, *_state_args(s), "--json")
        assert r.rc == 0, r.err
        d = r.json()
        want = ref_context(kvmmu.guests(**s)[0], flavor, host, ept, version, variant)
        got = {"role": int(d["role"], 16), "root_level": d["root_level"],
               "shadow_root_level": d["shadow_root_level"],
               "root_role": int(d.get("root_role", "0x0"), 16),
               "guest_rsvd": [[int(x, 16) for x in row] for row in d["guest_rsvd"]],
               "shadow_zero": [[int(x, 16) for x in row] for row in d["shadow_zero"]],
               "guest_bad_mt_xwr": int(d["guest_bad_mt_xwr"], 16),
               "shadow_bad_mt_xwr": int(d["shadow_bad_mt_xwr"], 16),
               "permissions": d["permissions"], "pkru_mask": int(d["pkru_mask"], 16)}
        assert got == want, (s, flavor, version)
        assert d["role_fields"] == kvmmu.decode_role(want["role"], version)
        # the decoded permission rows agree with the bytes
        for row in d["permissions_decoded"]:
            byte = want["permissions"][row["index"]]
            assert row["faulting_acc"] == [cli.acc_label(a) for a in range(8) if byte >> a & 1]
            assert row["pkru_ad"] == bool(want["pkru_mask"] >> (2 * row["index"]) & 1)


def test_inspect_human_tables_hand_derived():
    """Shadow paging (TDP off), long mode with NX and WP, CR4.PAE|PSE, MAXPHYADDR 46,
    guest 1 GiB pages. Role (doc 4.1/4.2): level 4, access 7 (0x700), efer_nx (0x1000),
    cr0_wp (0x2000) -> base 0x3704; ext valid|cr0_pg|cr4_pae|cr4_pse|efer_lma =
    bits 0, 2, 3, 4, 9 = 0x21d. Guest table (doc 7.1): HI = bits 46..51; PML4E =
    HI | bit 7 (Intel guest: bit 8 free); 1 GiB PDPTE = HI | bits 13..29; 2 MiB PDE =
    HI | bits 13..20. A supervisor write (pfec 0x02) with WP=1 faults on the four
    ACC values without w."""
    r = run("inspect", "--cr0", "PE,PG,WP", "--cr4", "PAE,PSE", "--efer", "LME,LMA,NX",
            "--maxphyaddr", "46", "--guest-gbpages", "--flavor", "shadow", "--no-tdp")
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    assert "mmu_role = 0x0000021d00003704   (base | ext << 32)" in lines
    guest = {}                      # the first grid printed is the guest table
    for ln in lines:
        m = re.match(r"\s+([1-5])\s+(PML5E|PML4E|PDPTE|PDE|PTE)\s+(0x\w+)\s+(0x\w+)$", ln)
        if m and m.group(2) not in guest:
            guest[m.group(2)] = (int(m.group(3), 16), int(m.group(4), 16))
    hi = ((1 << 52) - 1) ^ ((1 << 46) - 1)
    assert guest["PML4E"] == (hi | 1 << 7, hi | 1 << 7)
    assert guest["PDPTE"] == (hi, hi | (((1 << 30) - 1) ^ ((1 << 13) - 1)))
    assert guest["PDE"] == (hi, hi | (((1 << 21) - 1) ^ ((1 << 13) - 1)))
    assert guest["PTE"] == (hi, hi)
    assert "46-51, 13-29" in r.out
    prow = next(ln for ln in lines if re.match(r"\s+1 0x02 ", ln))
    assert prow.split()[6:15] == ["0x33", "F", "F", ".", ".", "F", "F", ".", "."]


def test_inspect_named_flags_equal_hex():
    a = run("inspect", "--cr0", "PG,WP,PE", "--cr4", "PAE|PSE|SMEP", "--efer", "LME,LMA,NXE", "--json")
    b = run("inspect", "--cr0", "0x80010001", "--cr4", "0x100030", "--efer", str(0xD00), "--json")
    assert a.rc == b.rc == 0
    assert a.json() == b.json()
    assert a.json()["state"]["cr4"]["flags"] == "PSE|PAE|SMEP"
    # every architectural bit has a name, and names round-trip
    for reg, table in kio.REGISTER_FLAGS.items():
        for name, bit in table.items():
            assert kio.parse_register(name.lower(), reg) == 1 << bit
        allbits = sum(1 << b for b in table.values())
        assert kio.parse_register(kio.format_flags(allbits, reg).replace("|", ","), reg) == allbits


def test_inspect_bad_flag_name_and_strict():
    r = run("inspect", "--cr0", "PG,WPX")
    assert r.rc == 2
    assert "--cr0" in r.err and "'WPX'" in r.err and "PE, MP" in r.err
    assert "Traceback" not in r.err
    r = run("inspect", "--efer", "LMA")                      # LMA without paging: computes
    assert r.rc == 0 and "not architectural" in r.out
    r = run("inspect", "--efer", "LMA", "--strict")
    assert r.rc == 2 and "EFER.LMA set without CR0.PG and CR4.PAE" in r.err
    r = run("inspect", "--version", "v6.16", "--variant", "patch01")
    assert r.rc == 2 and "v5.17 only" in r.err
    r = run("inspect", "--flavor", "shadow")                 # tdp on: not a kernel configuration
    assert r.rc == 0 and "--no-tdp" in r.err


# ---------------------------------------------------------------------------
# compute

def _random_states(n=24, seed=1):
    w = kvmmu.workload("random", n=n, seed=seed)
    g = w.guests.copy()
    g["cr0"][:3] = [0x80050033, 0xFFFFFFFFFFFFFFFF, 0]         # full-width values too
    return g


def _jsonl_text(g) -> str:
    lines = []
    for rec in g:
        d = {"cr0": hex(int(rec["cr0"])), "cr4": int(rec["cr4"]), "efer": hex(int(rec["efer"])),
             "maxphyaddr": int(rec["maxphyaddr"]), "guest_amd": bool(rec["guest_amd"]),
             "guest_gbpages": int(rec["guest_gbpages"]), "smm": bool(rec["smm"]),
             "guest_mode": bool(rec["guest_mode"])}
        lines.append(json.dumps(d))
    return "\n".join(lines) + "\n"


def _csv_text(g) -> str:
    rows = ["cr0,cr4,efer,maxphyaddr,guest_amd,guest_gbpages,smm,guest_mode"]
    for rec in g:
        rows.append(",".join([hex(int(rec["cr0"])), hex(int(rec["cr4"])), str(int(rec["efer"])),
                              str(int(rec["maxphyaddr"]))] +
                             ["true" if rec[f] else "0" for f in kio.BOOL_FIELDS]))
    return "\n".join(rows) + "\n"


FORMATS = ["jsonl", "csv", "npy", "parquet"]


def _write_input(path: Path, fmt: str, g) -> None:
    if fmt == "jsonl":
        path.write_text(_jsonl_text(g))
    elif fmt == "csv":
        path.write_text(_csv_text(g))
    elif fmt == "npy":
        np.save(path, g)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({n: g[n] for n in g.dtype.names}), str(path))


@pytest.mark.parametrize("fmt", FORMATS)
def test_compute_round_trip_matches_reference(fmt, tmp_path):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    g = _random_states()
    src = tmp_path / f"states.{fmt}"
    _write_input(src, fmt, g)
    host = kvmmu.HostConfig(tdp_enabled=False)
    dst = tmp_path / f"contexts.{fmt}"
    r = run("compute", src, "-o", dst, "--flavor", "shadow", "--no-tdp", "--version", "v6.16")
    assert r.rc == 0, r.err
    got = kio.read_contexts(str(dst))
    assert got.dtype == kvmmu.CONTEXT_DTYPE and got.shape == g.shape
    for i, rec in enumerate(g):
        assert ctx_as_ints(got[i]) == ref_context(rec, "shadow", host, version="v6.16"), i
    # the states themselves survive the reader
    back = kio.read_guests(str(src)).records
    assert back.tobytes() == kvmmu.guests(**{n: g[n] for n in g.dtype.names}).tobytes()
    assert no_temp_files(tmp_path)


def test_compute_output_layout(tmp_path):
    """jsonl: hex strings, tables nested [bit 7][level-1]; csv: guest_rsvd_0_4 per slot."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"cr0": "PG|PE|WP", "cr4": "PAE", "efer": "LME|LMA|NX", "maxphyaddr": 46}\n')
    r = run("compute", src, "-o", "-", "--flavor", "shadow", "--no-tdp")
    assert r.rc == 0
    d = json.loads(r.out.splitlines()[0])
    assert list(d) == list(CTX_FIELDS)
    assert re.fullmatch(r"0x[0-9a-f]{16}", d["role"])
    assert len(d["guest_rsvd"]) == 2 and len(d["guest_rsvd"][0]) == 5
    # 4-level guest, MAXPHYADDR 46, NX, no guest gbpages -> 1 GiB PDPTE also has bit 7
    hi = ((1 << 52) - 1) ^ ((1 << 46) - 1)
    assert int(d["guest_rsvd"][0][2], 16) == hi | 1 << 7
    r = run("compute", src, "-o", "-", "--format", "csv")
    header, row = r.out.splitlines()
    cols = header.split(",")
    assert "guest_rsvd_0_4" in cols and "permissions_15" in cols and len(cols) == len(row.split(","))


def test_compute_stdin_stdout_formats():
    g = _random_states(6)
    host = kvmmu.HostConfig()
    r = run("compute", "-", "-o", "-", stdin=_jsonl_text(g).encode())
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) == 6
    for rec, line in zip(g, lines):
        assert json_ctx_as_ints(json.loads(line)) == ref_context(rec, "tdp", host)
    r = run("compute", "-", "-o", "-", "--input-format", "csv", "--output-format", "npy",
            stdin=_csv_text(g).encode())
    assert r.rc == 0, r.err
    arr = np.load(io.BytesIO(r.stdout))
    assert arr.dtype == kvmmu.CONTEXT_DTYPE
    assert [ctx_as_ints(c) for c in arr] == [ref_context(rec, "tdp", host) for rec in g]


BAD_INPUTS = [
    ("bad.csv", "cr0,cr4,efer\n0x80050033,0x20,0xd01\n0x11,0x20,0xzz\n", "bad.csv:3", "'efer'",
     "EFER"),
    ("bad.csv", "cr0,cr4\n1,2\n3\n", "bad.csv:3", "expected 2 columns", "columns"),
    ("bad.csv", "cr0,cr5\n1,2\n", "bad.csv:1", "'cr5'", "columns are"),
    ("bad.csv", "cr0,maxphyaddr\n1,46\n1,300\n", "bad.csv:3", "'maxphyaddr'", "[0, 255]"),
    ("bad.jsonl", '{"cr0": 1}\n\n{"cr0": 1, "smm": 3}\n', "bad.jsonl:3", "'smm'", "boolean"),
    ("bad.jsonl", '{"cr0": 1}\n{"cr0": 1,\n', "bad.jsonl:2", "invalid JSON", "column"),
    ("bad.jsonl", '{"cr0": "PG,XX"}\n', "bad.jsonl:1", "'cr0'", "CR0 flag name"),
    ("bad.jsonl", '{"cr0": 1, "CR4": 2}\n', "bad.jsonl:1", "unknown field 'CR4'", "fields are"),
    ("bad.jsonl", '[1, 2]\n', "bad.jsonl:1", "JSON object", "list"),
    ("bad.jsonl", '{"cr0": -1}\n', "bad.jsonl:1", "'cr0'", "64-bit"),
]


@pytest.mark.parametrize("name,text,where,field,expected", BAD_INPUTS)
def test_compute_bad_input_names_file_line_field(name, text, where, field, expected, tmp_path,
                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(text)
    r = run("compute", name, "-o", "out.jsonl")
    assert r.rc == 2
    assert where in r.err and field in r.err and expected in r.err, r.err
    assert "Traceback" not in r.err
    assert not Path("out.jsonl").exists()
    assert no_temp_files(tmp_path)


def test_compute_other_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("s.csv").write_text("cr0\n0x80000011\n")
    assert run("compute", "missing.csv", "-o", "o.jsonl").rc == 2
    r = run("compute", "s.csv", "-o", "o.txt")
    assert r.rc == 2 and "cannot tell the format" in r.err
    np.save("notguests.npy", np.arange(3))
    r = run("compute", "notguests.npy", "-o", "o.jsonl")
    assert r.rc == 2 and "structured" in r.err
    Path("s.npy").write_bytes(b"not numpy")
    r = run("compute", "s.npy", "-o", "o.jsonl")
    assert r.rc == 2 and "s.npy" in r.err
    r = run("compute", "s.csv", "-o", "o.jsonl", "--version", "v6.16", "--variant", "final")
    assert r.rc == 2 and "v5.17" in r.err
    Path("lma.csv").write_text("cr0,efer\n0x80000011,0\n0x11,0x500\n")
    r = run("compute", "lma.csv", "-o", "o.jsonl", "--strict")
    assert r.rc == 2 and "lma.csv:3" in r.err and "not architectural" in r.err
    assert not Path("o.jsonl").exists() and not Path("o.txt").exists()


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    Path("s.csv").write_text("cr0\n0x80000011\n")
    r = run("compute", "s.csv", "-o", "out.parquet")
    assert r.rc == 2 and "pyarrow" in r.err and "Traceback" not in r.err
    assert not Path("out.parquet").exists()


def test_atomic_output_keeps_old_file_on_interrupt(tmp_path, monkeypatch):
    """Ctrl-C while the result is being written: exit 130, old file intact, no temp file."""
    monkeypatch.chdir(tmp_path)
    Path("s.csv").write_text("cr0\n" + "0x80000011\n" * 50)
    Path("out.jsonl").write_text("previous result\n")
    real = kio.write_jsonl

    def interrupted(f, records):
        real(f, records[:10])
        raise KeyboardInterrupt
    monkeypatch.setattr(kio, "write_jsonl", interrupted)
    r = run("compute", "s.csv", "-o", "out.jsonl")
    assert r.rc == 130 and "interrupted" in r.err
    assert Path("out.jsonl").read_text() == "previous result\n"
    assert no_temp_files(tmp_path)
    monkeypatch.setattr(kio, "write_jsonl", real)
    os.chmod("out.jsonl", 0o640)
    assert run("compute", "s.csv", "-o", "out.jsonl").rc == 0
    assert len(Path("out.jsonl").read_text().splitlines()) == 50
    assert os.stat("out.jsonl").st_mode & 0o777 == 0o640      # mode of the replaced file kept


def test_sigint_in_a_real_process_leaves_no_file(tmp_path):
    g = kvmmu.workload("random", n=1_000_000).guests
    np.save(tmp_path / "big.npy", g)
    p = subprocess.Popen([sys.executable, "-m", "kvmmu", "compute", "big.npy", "-o", "out.jsonl"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(x.name.endswith(".tmp") for x in tmp_path.iterdir()):
        time.sleep(0.05)                 # wait until it is writing the result
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert not (tmp_path / "out.jsonl").exists()
    assert no_temp_files(tmp_path)


# ---------------------------------------------------------------------------
# compare

def test_compare_agree_and_differ():
    r = run("compare", "v5.17:v517", "v5.17:patch01", "--flavor", "shadow", "--no-tdp")
    assert r.rc == 0, r.err
    assert "agree on all 51,200 states" in r.out
    # literal reserves bit 63 whenever the role has efer_nx = 0, i.e. unless CR0.PG and EFER.NX:
    # reachable control words: 256 with PG=0, 384 with PG=1 (LMA only with PAE); 192 of those
    # have NX -> 640 - 192 = 448 words x 16 (smm, guest_mode, vendor, gbpages) x 5 MAXPHYADDRs
    r = run("compare", "v5.17:v517", "v5.17:literal", "--flavor", "shadow", "--no-tdp")
    assert r.rc == 1
    assert "differ on 35,840 of 51,200 states" in r.out
    assert re.search(r"shadow_zero\[0\]\[0\] PTE\s+bit7=0: a=0x7fffc00000000000 "
                     r"b=0xffffc00000000000\s+\(only b: 63\)", r.out)
    r = run("compare", "v5.17:v517", "patch01", "--flavor", "shadow", "--maxphyaddr", "46", "--json")
    assert r.rc == 1          # TDP on: v517 follows guest NX, patch01 forces it
    d = r.json()
    assert d["states"] == 10240 and d["differing"] == 448 * 16 and not d["kernel_builds"]


def test_compare_input_file_and_bad_specs(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"cr0": "PE", "cr4": 0, "efer": 0}\n{"cr0": "PE,PG", "cr4": "PAE", "efer": "NX"}\n')
    r = run("compare", "v5.17", "v5.17:literal", "--flavor", "shadow", "--no-tdp", "--input", f, "--json")
    assert r.rc == 1
    d = r.json()
    assert d["states"] == 2 and d["differing"] == 1 and d["examples"][0]["index"] == 0
    assert run("compare", "v5.17", "v5.17:final", "--flavor", "shadow", "--no-tdp",
               "--input", f).rc == 0
    for bad in ("v5.18", "v5.17:patch02", "v6.16:patch01"):
        r = run("compare", bad, "v5.17")
        assert r.rc == 2 and "formulation" in r.err


# ---------------------------------------------------------------------------
# sweep

def test_sweep_small():
    r = run("sweep", "--flavor", "shadow", "--maxphyaddr", "46", "--json")
    assert r.rc == 0, r.err
    d = r.json()
    assert d["states_per_cell"] == 640 * 16      # reachable control words x 16 hidden combos
    built = [c for c in d["cells"] if c["kernel_builds"]]
    assert [c["host"] for c in built] == ["shadow"]
    assert built[0]["variant_mismatch"] == {"patch01": 0, "final": 0, "literal": 448 * 16}
    v = d["verdict"]
    assert v["variant_mismatches_in_kernel_builds"] == {"final": 0, "literal": 7168, "patch01": 0}
    assert v["stale_groups"] > 0
    r = run("sweep", "--flavor", "shadow", "--maxphyaddr", "46")
    assert r.rc == 0
    assert "Verdict:" in r.out and "literal: DIFFERS" in r.out
    assert "patch01: the same contexts as v517 in every configuration the kernel builds" in r.out


def test_sweep_fail_on_diff():
    base = ["sweep", "--flavor", "shadow", "--flavor", "shadow_npt", "--maxphyaddr", "46,52"]
    r = run(*base, "--variant", "patch01", "--variant", "final", "--no-guard", "--fail-on-diff")
    assert r.rc == 0, r.out
    r = run(*base, "--variant", "literal", "--no-guard", "--fail-on-diff")
    assert r.rc == 1
    r = run(*base, "--variant", "patch01", "--no-compare", "--fail-on-diff", "--host", "shadow")
    assert r.rc == 1 and "guard:" in r.out          # stale groups count as differences
    r = run("sweep", "--version", "v6.16", "--variant", "patch01")
    assert r.rc == 2 and "v5.17" in r.err


# ---------------------------------------------------------------------------
# replay

def test_replay_trace_counts_hand_derived():
    """tests/cli/two-vcpus-trace-cmd.txt, by hand (tdp, v5.17):
    vCPU0 (CPU 0/KVM-100) from RESET: CR0=0x11 [1: paging off, first role: recompute],
    CR4=PAE [2: still paging off, same role: skip; KVM reset (PAE)], EFER=LME [3: skip],
    CR3 (skipped line), CR0=PG [4: LMA set: recompute; reset], EFER #GP (failed write),
    EFER=0x901 [5: NX, LMA kept: recompute; reset], CR0 WP on [6: recompute; reset],
    CR4 PGE on/off [7, 8: skip].  -> 8 inits, 4 recomputes.
    vCPU1 (CPU 1/KVM-101): three reads adopted, CR4 rewritten [fresh: recompute],
    WP off [recompute; reset], WP on [recompute; reset] -> 3 inits, 3 recomputes.
    Lines skipped: kvm_exit, kvm_entry, CR3 = 3. Resets: 4 + 2 = 6."""
    r = run("replay", TRACE, "--policy", "both", "--json")
    assert r.rc == 0, r.err
    d = r.json()
    assert d["trace"] == {"format": "trace-cmd", "steps": 11, "kvm_resets": 6, "skipped_lines": 3,
                          "reads_adopted": 3, "failed_writes": 1, "replayed": 11,
                          "kvm_resets_only": False}
    skip = {c["thread"]: (c["inits"], c["recomputes"], c["skips"]) for c in d["policies"]["skip"]["per_vcpu"]}
    assert skip == {"CPU 0/KVM-100": (8, 4, 4), "CPU 1/KVM-101": (3, 3, 0)}
    assert d["policies"]["force"]["recomputes"] == 11
    assert d["stale"]["steps"] == 0
    r = run("replay", TRACE, "--kvm-resets-only", "--json")
    d = r.json()
    per = {c["thread"]: (c["inits"], c["recomputes"]) for c in d["policies"]["skip"]["per_vcpu"]}
    assert per == {"CPU 0/KVM-100": (4, 4), "CPU 1/KVM-101": (2, 2)}
    r = run("replay", TRACE)
    assert r.rc == 0
    assert "11 steps, 6 KVM MMU resets, 3 skipped lines, 3 adopted reads, 1 failed writes" in r.out
    assert re.search(r"0 CPU 0/KVM-100\s+8\s+4\s+4", r.out)


def test_replay_trace_initial_and_errors(tmp_path):
    # --initial: vCPU0 starts in long mode (CR0 PE|PG|WP, CR4 PAE, EFER 0xd01). Its first
    # write, CR0=0x11, turns paging off (LMA cleared: EFER 0x901) and WP off: a reset;
    # CR4=PAE rewrites the same value: none; EFER=LME drops NX: a reset; then CR0=PG,
    # EFER NX, WP on reset as before -> 5 resets on vCPU0, 2 on vCPU1 (its reads win).
    r = run("replay", TRACE, "--initial", "cr0=PE,PG,WP,cr4=PAE,efer=0xd01", "--json")
    assert r.rc == 0, r.err
    assert r.json()["trace"]["kvm_resets"] == 7
    r = run("replay", TRACE, "--initial", "cr5=1")
    assert r.rc == 2 and "cr5" in r.err
    bad = tmp_path / "bad.txt"
    bad.write_text("cpus=1\n  CPU 0/KVM-7 [000] 1.000001: kvm_cr: cr_write 0 = 80000011\n")
    r = run("replay", bad)
    assert r.rc == 2 and f"{bad}:2:" in r.err and "Traceback" not in r.err
    r = run("replay", TRACE, "--workload", "boot")
    assert r.rc == 2 and "either" in r.err
    r = run("replay", "--workload", "boot", "--kvm-resets-only")
    assert r.rc == 2


def test_replay_workloads_match_reference():
    host = kvmmu.HostConfig()
    w = kvmmu.workload("boot", steady_steps=16)
    _, rec = reference.replay([{n: x[n].item() for n in x.dtype.names} for x in w.guests], "tdp", host)
    r = run("replay", "--workload", "boot", "--steps", str(9 + 16), "--policy", "both", "--json")
    assert r.rc == 0, r.err
    d = r.json()
    assert d["policies"]["skip"]["recomputes"] == sum(rec) == 5
    assert d["policies"]["skip"]["inits"] == 25 and d["stale"]["steps"] == 0
    r = run("replay", "--workload", "context_switch", "--steps", "64", "--vcpus", "4")
    assert r.rc == 0
    assert len(re.findall(r"^\s+\d\s+16\s+1\s+15$", r.out, re.M)) == 4


def test_replay_state_file_vcpu_invalidate_and_stale(tmp_path):
    """MAXPHYADDR changes under an unchanged role: without the invalidate column the
    guard keeps the old guest table (stale, exit 1 with --policy both); with it, not."""
    rows = ['{"cr0": "0x80050033", "cr4": "0x3706f0", "efer": "0xd01", "maxphyaddr": %d, '
            '"vcpu": %d%s}' % (m, v, extra)
            for m, v, extra in [(46, 0, ""), (46, 1, ""), (39, 0, ""), (39, 1, ', "invalidate": true')]]
    f = tmp_path / "steps.jsonl"
    f.write_text("\n".join(rows) + "\n")
    r = run("replay", f, "--policy", "both", "--json")
    assert r.rc == 1
    d = r.json()
    assert d["stale"] == {"steps": 1, "fields": {"guest_rsvd": 1}, "first_steps": [2]}
    per = {c["vcpu"]: c["recomputes"] for c in d["policies"]["skip"]["per_vcpu"]}
    assert per == {0: 1, 1: 2}
    csvf = tmp_path / "steps.csv"
    csvf.write_text("cr0,cr4,efer,maxphyaddr,vcpu,invalidate\n"
                    "0x80050033,0x3706f0,0xd01,46,0,0\n0x80050033,0x3706f0,0xd01,39,0,1\n")
    r = run("replay", csvf, "--policy", "both")
    assert r.rc == 0 and "no stale step" in r.out
    csvf.write_text("cr0,vcpu\n0x11,zero\n")
    r = run("replay", csvf)
    assert r.rc == 2 and "steps.csv:2" in r.err and "'vcpu'" in r.err


# ---------------------------------------------------------------------------
# bench and progress

def test_bench_quick_with_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    r = run("bench", "--quick", "--plot", png, "--json")
    assert r.rc == 0, r.err
    d = r.json()
    assert [x["workload"] for x in d["replay"]] == ["boot", "context_switch"]
    assert [x["batch"] for x in d["batch"]] == [1, 100, 10_000, 100_000]
    assert all(x["kvmmu_ns_per_state"] > 0 and x["speedup"] > 0 for x in d["batch"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert no_temp_files(tmp_path)


def test_bench_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run("bench", "--quick", "--plot", tmp_path / "x.png")
    assert r.rc == 2 and "matplotlib" in r.err
    assert not (tmp_path / "x.png").exists()


def test_progress_only_on_a_terminal():
    import pty

    argv = [sys.executable, "-m", "kvmmu", "sweep", "--flavor", "shadow", "--flavor", "nested",
            "--maxphyaddr", "46", "--no-guard"]
    env = dict(os.environ, KVMMU_PROGRESS_DELAY="0")
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stderr == ""           # not a TTY: no progress
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        out, _ = proc.communicate(timeout=120)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    assert proc.returncode == 0
    tty = b"".join(chunks).decode(errors="replace")
    assert "sweep [" in tty and "/2" in tty
    assert b"sweep [" not in out
