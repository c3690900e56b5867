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
