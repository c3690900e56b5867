"""Large batches take other code paths (non-temporal stores above 8 MiB of output,
OpenMP blocks above PARALLEL_MIN states): they must give the small-batch answers."""
import numpy as np
import pytest

import kvmmu
from kvmmu import engine


def _fields_equal(a, b):
    return all(np.array_equal(a[f], b[f]) for f in kvmmu.CONTEXT_DTYPE.names)


@pytest.fixture(scope="module")
def states():
    n = max(engine.PARALLEL_MIN, 8 * 2**20 // kvmmu.CONTEXT_DTYPE.itemsize) + 4097
    return kvmmu.workload("random", n=n, seed=3, full_width=True, vary_cpuid=True).guests


@pytest.mark.parametrize("version", kvmmu.VERSIONS)
@pytest.mark.parametrize("flavor", kvmmu.FLAVORS)
def test_large_batch_equals_small_batches(states, flavor, version):
    host = kvmmu.HostConfig(shadow_me_mask=1 << 47, host_tdp_is_amd=(flavor == "shadow_npt"))
    small = np.concatenate([kvmmu.init_mmu(states[i:i + 1000], flavor, host, version=version)
                            for i in range(0, len(states), 1000)])
    for threads in (1, 2):
        big = kvmmu.init_mmu(states, flavor, host, version=version, threads=threads)
        assert _fields_equal(big, small), f"threads={threads}"
