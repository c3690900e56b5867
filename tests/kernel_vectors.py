"""Load the kernel-computed vectors (tests/vectors/, copied from shared/vectors)."""
import json
from pathlib import Path

import kvmmu

VECTOR_DIR = Path(__file__).parent / "vectors"


def _int(v):
    return int(v, 16) if isinstance(v, str) else int(v)


def load(version):
    path = VECTOR_DIR / f"kernel-vectors-{version}.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def guest_fields(rec):
    g = rec["guest"]
    return {k: _int(g[k]) for k in kvmmu.GUEST_DTYPE.names}


def host_config(rec):
    h = rec["host"]
    return kvmmu.HostConfig(**{k: _int(h[k]) for k in kvmmu.HostConfig.__dataclass_fields__})


def ept_config(rec):
    e = rec.get("ept")
    if e is None:
        return None
    smm = e.get("root_mmu_smm")
    return kvmmu.EptConfig(execonly=bool(e["execonly"]), huge_page_level=int(e["huge_page_level"]),
                           accessed_dirty=bool(e["accessed_dirty"]), eptp_level=int(e["eptp_level"]),
                           root_mmu_smm=None if smm is None else bool(smm))


def expected(rec):
    """The expect block with ints; v5.17 vectors carry 'role' only (root_role 0)."""
    e = rec["expect"]
    out = {
        "role": _int(e["role"]),
        "root_role": _int(e.get("root_role", 0)),
        "root_level": int(e["root_level"]),
        "shadow_root_level": int(e["shadow_root_level"]),
        "guest_rsvd": [[_int(x) for x in row] for row in e["guest_rsvd"]],
        "guest_bad_mt_xwr": _int(e["guest_bad_mt_xwr"]),
        "shadow_zero": [[_int(x) for x in row] for row in e["shadow_zero"]],
        "shadow_bad_mt_xwr": _int(e["shadow_bad_mt_xwr"]),
        "permissions": [int(x) for x in e["permissions"]],
        "pkru_mask": _int(e["pkru_mask"]),
    }
    variants = {k: [[_int(x) for x in row] for row in tbl]
                for k, tbl in e.get("shadow_zero_variants", {}).items()}
    return out, variants


def context_as_dict(rec):
    """One CONTEXT_DTYPE record as plain ints, shaped like expected()."""
    return {
        "role": int(rec["role"]),
        "root_role": int(rec["root_role"]),
        "root_level": int(rec["root_level"]),
        "shadow_root_level": int(rec["shadow_root_level"]),
        "guest_rsvd": [[int(x) for x in row] for row in rec["guest_rsvd"]],
        "guest_bad_mt_xwr": int(rec["guest_bad_mt_xwr"]),
        "shadow_zero": [[int(x) for x in row] for row in rec["shadow_zero"]],
        "shadow_bad_mt_xwr": int(rec["shadow_bad_mt_xwr"]),
        "permissions": [int(x) for x in rec["permissions"]],
        "pkru_mask": int(rec["pkru_mask"]),
    }
