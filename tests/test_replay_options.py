"""replay(contexts=False) keeps the guard decisions and final contexts, records nothing per step."""
import numpy as np
import pytest

import kvmmu


@pytest.mark.parametrize("version", kvmmu.VERSIONS)
@pytest.mark.parametrize("flavor", kvmmu.FLAVORS)
def test_contexts_false_same_decisions(flavor, version):
    w = kvmmu.workload("random", n=3000, vcpus=3, seed=11)
    inv = np.zeros(len(w.guests), bool)
    inv[::97] = True
    full = kvmmu.replay(w.guests, flavor, version=version, vcpu=w.vcpu, invalidate=inv)
    lean = kvmmu.replay(w.guests, flavor, version=version, vcpu=w.vcpu, invalidate=inv, contexts=False)
    assert lean.contexts is None
    assert np.array_equal(full.recomputed, lean.recomputed)
    for f in kvmmu.CONTEXT_DTYPE.names:
        assert np.array_equal(full.final[f], lean.final[f])
    # the final context of each vCPU is the context after its last step
    for k, vid in enumerate(full.vcpu_ids):
        last = np.flatnonzero(w.vcpu == vid)[-1]
        for f in kvmmu.CONTEXT_DTYPE.names:
            assert np.array_equal(full.final[k][f], full.contexts[last][f])


def test_contexts_false_rejects_out():
    g = kvmmu.guests(cr0=[0, 0])
    with pytest.raises(ValueError, match="contexts=True"):
        kvmmu.replay(g, "tdp", contexts=False, out=np.empty(2, kvmmu.CONTEXT_DTYPE))
    with pytest.raises(TypeError, match="contexts must be a bool"):
        kvmmu.replay(g, "tdp", contexts=1)


def test_builtin_variants_survive_pickling():
    import pickle

    from kvmmu.variants import BUILTIN_VARIANTS

    for name, v in BUILTIN_VARIANTS.items():
        assert pickle.loads(pickle.dumps(v)) is v
    g = kvmmu.guests(cr0=0x80050033, cr4=0x20, efer=0xd01)
    same = pickle.loads(pickle.dumps(BUILTIN_VARIANTS["v517"]))
    assert np.array_equal(kvmmu.init_mmu(g, "shadow", version="v6.16", variant=same)["role"],
                          kvmmu.init_mmu(g, "shadow", version="v6.16")["role"])
