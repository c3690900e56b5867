"""Concurrent calls on shared read-only inputs give exactly the serial results."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import kvmmu

N_THREADS = 8


def _shared_states():
    w = kvmmu.workload("random", n=40_000, seed=7, vcpus=3, full_width=True)
    g = w.guests.copy()
    g.setflags(write=False)
    return g, w.vcpu


def _jobs(g, vcpu):
    host = kvmmu.HostConfig(tdp_enabled=False)
    return [
        lambda: kvmmu.init_mmu(g, "shadow", host, variant="literal"),
        lambda: kvmmu.init_mmu(g, "tdp", version="v6.16", threads=2),
        lambda: kvmmu.init_mmu(g, "shadow_ept", ept=kvmmu.EptConfig(execonly=True)),
        lambda: kvmmu.replay(g, "shadow", host, vcpu=vcpu).contexts,
        lambda: kvmmu.replay(g, "shadow_npt", version="v6.16", policy="force").contexts,
        lambda: kvmmu.sweep(flavors=["nested"], maxphyaddrs=[46], check_guard=True).to_dict()["guard"][0]["by_hidden_input"],
        lambda: kvmmu.reset_rsvds_bits_mask(4, kvmmu.rsvd_bits(g["maxphyaddr"], 63), 1, 0, 0, 1).rsvd_bits_mask,
        lambda: kvmmu.init_mmu(g[::3], "nested", version="v5.17"),
    ]


def _same(a, b):
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
    return a == b


def test_threads_match_serial_and_inputs_untouched():
    g, vcpu = _shared_states()
    before = g.tobytes()
    jobs = _jobs(g, vcpu)
    serial = [job() for job in jobs]
    # every job several times, interleaved across 8 threads
    order = [i % len(jobs) for i in range(3 * len(jobs))]
    with ThreadPoolExecutor(N_THREADS) as pool:
        results = list(pool.map(lambda i: (i, jobs[i]()), order))
    for i, res in results:
        assert _same(res, serial[i]), f"job {i} differs under concurrency"
    assert g.tobytes() == before


def test_thread_count_does_not_change_results():
    g, _ = _shared_states()
    for flavor in kvmmu.FLAVORS:
        one = kvmmu.init_mmu(g, flavor, threads=1)
        two = kvmmu.init_mmu(g, flavor, threads=2)
        assert np.array_equal(one.view(np.uint8), two.view(np.uint8))
