"""atheris harness over kvmmu's public API: random dtypes, shapes, values and options.

Every call must either return or raise TypeError/ValueError; anything else
(another exception, a crash, an AddressSanitizer report) is a finding.
See fuzz/README.md for running it against an ASan build of the extension.
"""
import sys

import atheris

with atheris.instrument_imports():
    import numpy as np
    import kvmmu
    from kvmmu import reference

EXPECTED = (TypeError, ValueError)
FIELD_TYPES = [np.uint64, np.uint8, np.bool_, np.int64, np.int8, np.float64, ">u8", object]


def _guest_array(fdp):
    """A GUEST_DTYPE-ish array: mostly valid, sometimes with a wrong field, shape or layout."""
    n = fdp.ConsumeIntInRange(0, 9)
    mode = fdp.ConsumeIntInRange(0, 9)
    if mode == 0:  # a random structured dtype built from GUEST field names
        names = [nm for nm in kvmmu.GUEST_DTYPE.names if fdp.ConsumeBool()]
        if fdp.ConsumeBool():
            names.append("extra")
        if not names:
            names = ["cr0"]
        dt = np.dtype([(nm, FIELD_TYPES[fdp.ConsumeIntInRange(0, len(FIELD_TYPES) - 1)]) for nm in names])
        return np.zeros(n, dtype=dt)
    if mode == 1:
        return np.zeros(n, dtype=[np.uint64, np.float64, np.int32][fdp.ConsumeIntInRange(0, 2)])
    if mode == 2:
        return [fdp.ConsumeInt(8) for _ in range(n)]
    raw = fdp.ConsumeBytes(n * kvmmu.GUEST_DTYPE.itemsize)
    raw = raw + b"\0" * (n * kvmmu.GUEST_DTYPE.itemsize - len(raw))
    g = np.frombuffer(raw, dtype=kvmmu.GUEST_DTYPE).copy()   # arbitrary bool bytes included
    if mode == 3 and n > 1:
        g = g[::2]                                           # non-contiguous
    if mode == 4:
        g.setflags(write=False)
    if mode == 5 and n:
        g = g.reshape(1, -1)                                 # rank 2
    return g


def _host(fdp):
    try:
        return kvmmu.HostConfig(
            tdp_enabled=fdp.ConsumeBool(), shadow_phys_bits=fdp.ConsumeIntInRange(-2, 260),
            shadow_me_mask=fdp.ConsumeInt(9) if fdp.ConsumeBool() else 0,
            shadow_me_value=fdp.ConsumeInt(9) if fdp.ConsumeBool() else 0,
            host_gbpages=fdp.ConsumeBool(), host_tdp_is_amd=fdp.ConsumeBool(),
            tdp_ad_disabled=fdp.ConsumeBool(), tdp_root_level=fdp.ConsumeIntInRange(-1, 7),
            max_tdp_level=fdp.ConsumeIntInRange(-1, 7), max_huge_page_level=fdp.ConsumeIntInRange(-1, 5))
    except EXPECTED:
        return kvmmu.HostConfig()


def _ept(fdp):
    try:
        return kvmmu.EptConfig(execonly=fdp.ConsumeBool(), huge_page_level=fdp.ConsumeIntInRange(-1, 5),
                               accessed_dirty=fdp.ConsumeBool(), eptp_level=fdp.ConsumeIntInRange(2, 6),
                               root_mmu_smm=[None, False, True][fdp.ConsumeIntInRange(0, 2)])
    except EXPECTED:
        return None


def _pick(fdp, options, junk="bogus"):
    i = fdp.ConsumeIntInRange(0, len(options))
    return options[i] if i < len(options) else junk


def one_input(data):
    fdp = atheris.FuzzedDataProvider(data)
    op = fdp.ConsumeIntInRange(0, 7)
    try:
        if op <= 2:
            g = _guest_array(fdp)
            flavor = _pick(fdp, kvmmu.FLAVORS)
            version = _pick(fdp, kvmmu.VERSIONS)
            variant = _pick(fdp, kvmmu.VARIANTS)
            host, ept = _host(fdp), _ept(fdp)
            threads = fdp.ConsumeIntInRange(0, 3) or None
            ctx = kvmmu.init_mmu(g, flavor, host, ept, version=version, variant=variant,
                                 strict=fdp.ConsumeBool(), threads=threads)
            # a valid call: spot-check one record against the reference model
            if ctx.size and op == 2:
                i = fdp.ConsumeIntInRange(0, ctx.size - 1)
                rec = np.ascontiguousarray(g).reshape(-1)[i]
                want = reference.init_mmu_one({k: int(rec[k]) for k in kvmmu.GUEST_DTYPE.names},
                                              flavor, host, ept or kvmmu.EptConfig(), version, variant)
                got = ctx.reshape(-1)[i]
                assert int(got["role"]) == want["role"], "role differs from the reference"
                assert [[int(x) for x in r] for r in got["shadow_zero"]] == want["shadow_zero"]
        elif op == 3:
            g = _guest_array(fdp)
            n = len(g) if hasattr(g, "__len__") else 0
            m = max(n + fdp.ConsumeIntInRange(-1, 1), 0)
            inv = np.array([fdp.ConsumeBool() for _ in range(m)], dtype=bool) if fdp.ConsumeBool() else None
            vcpu = np.array([fdp.ConsumeIntInRange(-3, 3) for _ in range(m)]) if fdp.ConsumeBool() else None
            kvmmu.replay(g, _pick(fdp, kvmmu.FLAVORS), _host(fdp), _ept(fdp),
                         version=_pick(fdp, kvmmu.VERSIONS), variant=_pick(fdp, kvmmu.VARIANTS),
                         policy=_pick(fdp, kvmmu.POLICIES), invalidate=inv, vcpu=vcpu)
        elif op == 4:
            n = fdp.ConsumeIntInRange(0, 6)
            kvmmu.reset_rsvds_bits_mask(
                np.array([fdp.ConsumeIntInRange(-1, 7) for _ in range(n)]),
                np.array([fdp.ConsumeIntInRange(0, 2**64 - 1) for _ in range(n)], dtype=np.uint64),
                fdp.ConsumeIntInRange(-1, 2), fdp.ConsumeBool(), fdp.ConsumeBool(), fdp.ConsumeBool())
            kvmmu.reset_rsvds_bits_mask_ept(fdp.ConsumeIntInRange(-1, 2**64), fdp.ConsumeIntInRange(-1, 2),
                                            fdp.ConsumeIntInRange(-1, 5))
            kvmmu.rsvd_bits(fdp.ConsumeIntInRange(-1, 300), fdp.ConsumeIntInRange(-1, 300))
        elif op == 5:
            g = _guest_array(fdp)
            ctx = kvmmu.init_mmu(g, "tdp") if isinstance(g, np.ndarray) else g
            n = fdp.ConsumeIntInRange(0, 5)
            pte = np.array([fdp.ConsumeIntInRange(0, 2**64 - 1) for _ in range(n)], dtype=np.uint64)
            kvmmu.is_rsvd_gpte(ctx, pte, fdp.ConsumeIntInRange(-1, 7))
            kvmmu.is_rsvd_spte(ctx, pte, fdp.ConsumeIntInRange(-1, 7))
        elif op == 6:
            kvmmu.guests(cr0=fdp.ConsumeInt(9), cr4=[fdp.ConsumeInt(9), fdp.ConsumeInt(3)],
                         maxphyaddr=fdp.ConsumeIntInRange(-2, 300), smm=fdp.ConsumeIntInRange(-1, 2))
        else:
            kvmmu.check_architectural(_guest_array(fdp), _host(fdp))
    except EXPECTED:
        pass


def main():
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
