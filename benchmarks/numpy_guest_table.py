"""The guest reserved-bit table in plain NumPy: what a user would write instead of kvmmu.

Only the *guest* table (``guest_rsvd``, ``rsvd_bits_mask[2][5]``) of a fresh
context, for flavor ``tdp`` under ``v5.17``, following the facts sheet
(/work/shared/docs/kvm-mmu-model.md):

* section 3 -- guest paging level: 0 without CR0.PG; with EFER.LMA 5 (CR4.LA57) or 4;
  else 3 with CR4.PAE, else 2;
* section 8.1 (v5.17) -- ``reset_rsvds_bits_mask`` with level = guest paging level,
  ``pa_bits_rsvd = rsvd_bits(maxphyaddr, 63)``, ``nx = role.efer_nx``,
  ``gbpages = guest_can_use_gbpages`` (host gbpages with TDP enabled, else the guest's
  CPUID bit), ``pse = ext.cr4_pse``, ``amd = guest AMD``;
* section 7.1 -- the legacy/PAE/long-mode masks per level.

With CR0.PG = 0, ``reset_guest_paging_metadata`` does nothing, and slots a
level does not write stay 0 -- in a fresh context that means 0.

Vectorised with ``np.where`` over whole columns, the way one writes it in
NumPy; no Python loop over states. ``benchmarks/test_numpy_baseline.py``
checks it bit for bit against ``kvmmu.init_mmu(...)["guest_rsvd"]``.
"""
from __future__ import annotations

import numpy as np

U64 = np.uint64
ALL = U64(0xFFFF_FFFF_FFFF_FFFF)
ZERO = U64(0)
BIT7 = U64(1 << 7)
BIT8 = U64(1 << 8)
BIT63 = U64(1 << 63)


def _bits(s: int, e: int) -> np.uint64:
    """rsvd_bits(s, e) for constant s <= e < 64."""
    return U64(((2 << (e - s)) - 1) << s)


B0_51, B0_62 = _bits(0, 51), _bits(0, 62)
B1_2, B5_8 = _bits(1, 2), _bits(5, 8)
B13_20, B13_29, B17_21 = _bits(13, 20), _bits(13, 29), _bits(17, 21)


def guest_rsvd_tdp_v517(guests: np.ndarray, tdp_enabled: bool = True,
                        host_gbpages: bool = True) -> np.ndarray:
    """``guest_rsvd`` (shape ``guests.shape + (2, 5)``, uint64) of a fresh ``tdp``/v5.17 init."""
    cr0 = guests["cr0"]
    cr4 = guests["cr4"]
    efer = guests["efer"]
    one = U64(1)
    pg = ((cr0 >> U64(31)) & one) != 0
    pse = ((cr4 >> U64(4)) & one) != 0
    pae = ((cr4 >> U64(5)) & one) != 0
    la57 = ((cr4 >> U64(12)) & one) != 0
    lma = ((efer >> U64(10)) & one) != 0
    nx = ((efer >> U64(11)) & one) != 0

    # section 3: guest paging level (0 = paging off: nothing written)
    level = np.where(~pg, 0, np.where(lma, np.where(la57, 5, 4), np.where(pae, 3, 2)))
    is2 = level == 2
    is3 = level == 3
    is45 = level >= 4
    is5 = level == 5
    paging = level >= 3          # levels that write the HI-based slots

    # rsvd_bits(maxphyaddr, 63): the end wraps mod 64, so maxphyaddr >= 64 gives 0
    mpa = guests["maxphyaddr"].astype(np.uint64)
    pa = np.where(mpa < U64(64), ALL << np.minimum(mpa, U64(63)), ZERO)

    # section 7.1 parameters
    hi = pa & np.where(is3, B0_62, B0_51)
    hi = hi | np.where(nx, ZERO, BIT63)          # role.efer_nx = NX when paging is on
    b8 = np.where(guests["guest_amd"], BIT8, ZERO)
    gbpages = host_gbpages if tdp_enabled else guests["guest_gbpages"]
    gb7 = np.where(gbpages, ZERO, BIT7)
    upper = hi | b8 | BIT7

    out = np.empty(cr0.shape + (2, 5), dtype=np.uint64)
    out[..., 0, 0] = np.where(paging, hi, ZERO)
    out[..., 0, 1] = np.where(paging, hi, ZERO)
    out[..., 0, 2] = np.where(is3, BIT63 | hi | B5_8 | B1_2, np.where(is45, hi | gb7, ZERO))
    out[..., 0, 3] = np.where(is45, upper, ZERO)
    out[..., 0, 4] = np.where(is5, upper, ZERO)
    out[..., 1, 0] = np.where(paging, hi, ZERO)
    out[..., 1, 1] = np.where(is2, np.where(pse, B17_21, ZERO),
                              np.where(paging, hi | B13_20, ZERO))
    out[..., 1, 2] = np.where(is45, hi | gb7 | B13_29, ZERO)
    out[..., 1, 3] = out[..., 0, 3]
    out[..., 1, 4] = out[..., 0, 4]
    return out
