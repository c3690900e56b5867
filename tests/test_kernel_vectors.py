"""The core against contexts computed by the kernel's own functions (tests/vectors/)."""
import pytest

import kvmmu
from kernel_vectors import context_as_dict, ept_config, expected, guest_fields, host_config, load

CASES = [(v, rec) for v in kvmmu.VERSIONS for rec in load(v)]


@pytest.mark.parametrize("version,rec", CASES, ids=[f"{v}-{r['id']}-{r['flavor']}" for v, r in CASES])
def test_kernel_vector(version, rec):
    assert rec["version"] == version
    g = kvmmu.guests(**guest_fields(rec))
    want, variants = expected(rec)
    ctx = kvmmu.init_mmu(g, rec["flavor"], host_config(rec), ept_config(rec), version=version)
    assert context_as_dict(ctx[0]) == want
    for name, table in variants.items():
        ctx = kvmmu.init_mmu(g, rec["flavor"], host_config(rec), ept_config(rec),
                             version=version, variant=name)
        assert context_as_dict(ctx[0])["shadow_zero"] == table, name


def test_every_flavor_and_variant_is_covered():
    seen = {(v, r["flavor"]) for v, r in CASES}
    assert seen == {(v, f) for v in kvmmu.VERSIONS for f in kvmmu.FLAVORS}
    names = {k for v, r in CASES for k in r["expect"].get("shadow_zero_variants", {})}
    assert names == set(kvmmu.VARIANTS)
