"""Reproduce every number in docs/FINDINGS.md:  python docs/findings.py"""
import time

import kvmmu

t0 = time.perf_counter()
res = kvmmu.sweep(versions=["v5.17", "v6.16"])
print(res.summary())
print(f"\n(sweep wall time {time.perf_counter() - t0:.1f} s)\n")

# Q4: guard skips per workload (policy skip_if_same_role), tdp and shadow flavors.
hosts = {"tdp": kvmmu.HostConfig(), "shadow": kvmmu.HostConfig(tdp_enabled=False)}
print(f"{'workload':<26} {'flavor':<7} {'version':<6} {'inits':>6} {'recomputed':>10} {'skipped':>8}")
for name, kw in [("boot", {}), ("cr0wp_toggle", {}), ("context_switch", {"vcpus": 4}),
                 ("cpuid_update", {"invalidate": True}), ("cpuid_update", {"invalidate": False}),
                 ("random", {"vcpus": 2})]:
    w = kvmmu.workload(name, **kw)
    label = name + ("" if name != "cpuid_update" else (" (invalidate)" if kw["invalidate"] else " (no inval.)"))
    for flavor, host in hosts.items():
        for version in kvmmu.VERSIONS:
            r = kvmmu.replay(w.guests, flavor, host, version=version, invalidate=w.invalidate, vcpu=w.vcpu)
            print(f"{label:<26} {flavor:<7} {version:<6} {r.inits:>6} {r.recomputes:>10} {r.skips:>8}")

# Q3 (stale served in a replay): cpuid_update without invalidation vs fresh init.
w = kvmmu.workload("cpuid_update", invalidate=False)
for version in kvmmu.VERSIONS:
    r = kvmmu.replay(w.guests, "tdp", version=version, invalidate=w.invalidate)
    fresh = kvmmu.init_mmu(w.guests, "tdp", version=version)
    stale = (r.contexts["guest_rsvd"] != fresh["guest_rsvd"]).reshape(len(w.guests), -1).any(1)
    print(f"cpuid_update without invalidation, tdp {version}: {int(stale.sum())} of {len(stale)} "
          f"steps run on a stale guest_rsvd table")

# Q2: what 'literal' does to an NX-bearing SPTE KVM itself builds (shadow MMU, TDP off,
# guest with paging off): a present, writable 4 KiB SPTE at 0x1000 with XD (bit 63) set.
g = kvmmu.guests(cr0=0x60000010, maxphyaddr=46)          # RESET state, paging off
host = kvmmu.HostConfig(tdp_enabled=False)
spte = (1 << 63) | 0x1000 | 0x3
for variant in ("v517", "literal"):
    ctx = kvmmu.init_mmu(g, "shadow", host, variant=variant)
    print(f"{variant:<8} shadow_zero[0][0]={int(ctx['shadow_zero'][0][0, 0]):#018x} "
          f"is_rsvd_spte(NX SPTE, level 1) = {bool(kvmmu.is_rsvd_spte(ctx[0], spte, 1))}")
import json
for c in res.cells:
    if any(c.variant_mismatch.values()):
        print(c.version, c.flavor, c.host, "kernel builds" if c.kernel_builds else "not built",
              json.dumps(c.variant_fields))

# Q1 in time: replay every workload through v517 and patch01 on the configurations the
# kernel builds; contexts after every step must match, patch01 only recomputes more.
import numpy as np
for flavor, host in (("shadow", kvmmu.HostConfig(tdp_enabled=False)),
                     ("shadow_npt", kvmmu.DEFAULT_HOSTS["amd_npt"])):
    for name in kvmmu.WORKLOADS:
        w = kvmmu.workload(name)
        a = kvmmu.replay(w.guests, flavor, host, variant="v517", invalidate=w.invalidate, vcpu=w.vcpu)
        b = kvmmu.replay(w.guests, flavor, host, variant="patch01", invalidate=w.invalidate, vcpu=w.vcpu)
        same = all(np.array_equal(a.contexts[f], b.contexts[f]) for f in kvmmu.CONTEXT_DTYPE.names)
        print(f"replay {flavor:<10} {name:<15} v517 vs patch01 contexts identical: {same}; "
              f"shadow-zero tables built: v517 {a.recomputes}, patch01 {b.inits}")

# ... and where they part: CPUID changing under an unchanged role with no invalidation.
w = kvmmu.workload("random", vary_cpuid=True)
host = kvmmu.HostConfig(tdp_enabled=False)
a = kvmmu.replay(w.guests, "shadow", host, variant="v517")
b = kvmmu.replay(w.guests, "shadow", host, variant="patch01")
diff = (a.contexts["shadow_zero"] != b.contexts["shadow_zero"]).reshape(len(w.guests), -1).any(1)
print(f"random with CPUID varying per step, no invalidation (shadow, TDP off): "
      f"{int(diff.sum())} of {len(diff)} steps have a different shadow_zero under v517 and patch01")
