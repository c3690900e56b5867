"""Hand-checked cases from the Intel SDM (vol. 3, ch. 4 "Paging" and ch. 29/30
"EPT") and the AMD APM (vol. 2, 5.3 "Long-mode page translation").

Every expected value below was worked out by hand from the architectural
rules and the layouts in docs/kvm-mmu-model.md (sections 2, 7 and 10); the
derivation is written next to it as bit positions and the resulting hex.
None of them was obtained by running kvmmu.

Notation: ``bits a..b`` = the contiguous run of bits a to b inclusive;
``[row][level-1]`` indexes rsvd_bits_mask (row = bit 7 of the entry).
"""
from __future__ import annotations

import pytest

import kvmmu

U64 = (1 << 64) - 1

# --- frequently used runs of bits, each derived once --------------------------
# bits 36..63: 28 ones from bit 36 = hex digit 9 upwards -> 7 'F' then 9 '0'
BITS_36_63 = 0xFFFF_FFF0_0000_0000
# bits 36..62: as above without bit 63 -> top digit 0x7
BITS_36_62 = 0x7FFF_FFF0_0000_0000
# bits 36..51: 16 ones from bit 36 -> 0xFFFF << 36
BITS_36_51 = 0x000F_FFF0_0000_0000
# bits 46..51: 6 ones from bit 46 (= bit 2 of hex digit 11) -> 0x3F << 46
BITS_46_51 = 0x000F_C000_0000_0000
# bits 46..62 -> 0x1FFFF << 46
BITS_46_62 = 0x7FFF_C000_0000_0000
# bits 52..62: 11 ones from bit 52 -> 0x7FF << 52
BITS_52_62 = 0x7FF0_0000_0000_0000
# bits 52..63 -> 0xFFF << 52
BITS_52_63 = 0xFFF0_0000_0000_0000
BIT63 = 0x8000_0000_0000_0000
BIT7 = 0x80
BIT8 = 0x100
BITS_1_2 = 0x6            # 0b110
BITS_5_8 = 0x1E0          # 0b1_1110_0000
BITS_3_6 = 0x78           # 0b111_1000
BITS_3_7 = 0xF8           # 0b1111_1000
BITS_13_20 = 0x1F_E000    # 0xFF << 13
BITS_13_29 = 0x3FFF_E000  # 0x1FFFF << 13
BITS_12_20 = 0x1F_F000    # 0x1FF << 12
BITS_12_29 = 0x3FFF_F000  # 0x3FFFF << 12
BITS_17_21 = 0x3E_0000    # 0x1F << 17

# --- register values ---------------------------------------------------------
CR0_PE, CR0_WP, CR0_PG = 1 << 0, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 20, 1 << 21, 1 << 22
EFER_LME, EFER_LMA, EFER_NX = 1 << 8, 1 << 10, 1 << 11

# A Linux x86-64 guest:
#   CR0  0x80050033 = PG(31) AM(18) WP(16) NE(5) ET(4) MP(1) PE(0)
#   CR4  0x003406f0 = SMAP(21) SMEP(20) OSXSAVE(18) OSXMMEXCPT(10) OSFXSR(9)
#                     PGE(7) MCE(6) PAE(5) PSE(4)          -> no LA57, no PKE
#   EFER 0x00000d01 = NX(11) LMA(10) LME(8) SCE(0)
LINUX_CR0, LINUX_CR4, LINUX_EFER = 0x80050033, 0x3406F0, 0xD01
PROT32 = CR0_PG | CR0_PE          # 0x80000001: paging, no WP


def table(level, maxphyaddr, nx=True, gbpages=True, pse=False, amd=False):
    t = kvmmu.reset_rsvds_bits_mask(level, kvmmu.rsvd_bits(maxphyaddr, 63), nx=nx,
                                    gbpages=gbpages, pse=pse, amd=amd)
    return [[int(x) for x in row] for row in t.rsvd_bits_mask], int(t.bad_mt_xwr)


def ctx1(flavor="tdp", host=None, ept=None, version="v5.17", variant="v517", **guest):
    return kvmmu.init_mmu(kvmmu.guests(**guest), flavor, host, ept, version=version,
                          variant=variant)[0]


def gpte_rsvd(ctx, pte, level):
    return bool(kvmmu.is_rsvd_gpte(ctx, pte, level))


def spte_rsvd(ctx, spte, level):
    return bool(kvmmu.is_rsvd_spte(ctx, spte, level))


# =============================================================================
# rsvd_bits itself (kernel mmu.h: bits s..e, end mod 64, empty if e < s)
# =============================================================================

@pytest.mark.parametrize("s,e,want", [
    (36, 63, BITS_36_63),
    (52, 63, BITS_52_63),
    (46, 63, 0xFFFF_C000_0000_0000),   # 18 ones from bit 46
    (0, 63, U64),                      # MAXPHYADDR 0: all 64 bits
    (63, 63, BIT63),
    (64, 63, 0),                       # start beyond the end: empty
    (255, 63, 0),
    (1, 2, BITS_1_2),
    (5, 8, BITS_5_8),
    (13, 20, BITS_13_20),
    (17, 21, BITS_17_21),
    (0, 64, 0x1),                      # end 64 -> 0 (mod 64): just bit 0
    (5, 66, 0),                        # end 66 -> 2 < 5: empty
])
def test_rsvd_bits(s, e, want):
    assert int(kvmmu.rsvd_bits(s, e)) == want


# =============================================================================
# PAE PDPTEs (SDM 4.4.1, table 4-8): bits 1-2, 5-8 and 63 reserved, plus
# bits MAXPHYADDR..62.
# =============================================================================

def test_pae_pdpte_maxphyaddr_36_building_block():
    m, bad = table(3, 36, nx=True)
    # [0][2] = bit 63 | bits 36..62 | bits 5..8 | bits 1..2
    #        = 0x8000000000000000 | 0x7FFFFFF000000000 | 0x1E0 | 0x6
    assert m[0][2] == 0xFFFF_FFF0_0000_01E6
    # PDE, PTE and the 4 KiB-with-PAT slot: bits 36..62 (NX exists, 63 free)
    assert m[0][1] == m[0][0] == m[1][0] == BITS_36_62 == 0x7FFF_FFF0_0000_0000
    # 2 MiB PDE: also bits 13..20 (between PAT at 12 and the 2 MiB frame at 21)
    assert m[1][1] == 0x7FFF_FFF0_001F_E000
    # never written for PAE: row 1 of the PDPTE, levels 4 and 5
    assert m[1][2] == m[0][3] == m[1][3] == m[0][4] == m[1][4] == 0
    assert bad == 0


def test_pae_pdpte_bit63_reserved_with_and_without_nx():
    with_nx, _ = table(3, 36, nx=True)
    no_nx, _ = table(3, 36, nx=False)
    # PDPTEs have no XD bit: 63 is reserved either way -> same PDPTE mask
    assert with_nx[0][2] == no_nx[0][2] == 0xFFFF_FFF0_0000_01E6
    # without EFER.NX the XD bit of PDEs/PTEs is reserved too: 0x7FF.. -> 0xFFF..
    assert no_nx[0][0] == no_nx[0][1] == BITS_36_63 == 0xFFFF_FFF0_0000_0000


def test_pae_pdpte_maxphyaddr_52():
    m, _ = table(3, 52)
    # bit 63 | bits 52..62 | 5..8 | 1..2 = 0x8000.. | 0x7FF0.. | 0x1E6
    assert m[0][2] == 0xFFF0_0000_0000_01E6
    assert m[0][0] == BITS_52_62


def test_pae_pdpte_concrete_entries_in_a_pae_guest():
    # 32-bit PAE guest without NX, MAXPHYADDR 36
    c = ctx1(cr0=PROT32, cr4=CR4_PAE, efer=0, maxphyaddr=36)
    assert int(c["root_level"]) == 3
    assert int(c["guest_rsvd"][0, 2]) == 0xFFFF_FFF0_0000_01E6
    ok = 0x0000_0000_1234_5001          # P, address 0x12345000: nothing reserved
    assert not gpte_rsvd(c, ok, 3)
    assert not gpte_rsvd(c, ok | 1 << 9, 3)    # bits 9..11 are ignored (AVL)
    assert not gpte_rsvd(c, ok | 1 << 35, 3)   # address bit 35 < MAXPHYADDR
    for b in (1, 2, 5, 6, 8, 36, 50, 62, 63):
        assert gpte_rsvd(c, ok | 1 << b, 3), f"PDPTE bit {b}"
    # a PTE of the same guest: bit 63 (XD) is reserved because EFER.NX = 0,
    # bit 1 (R/W) of course is not
    assert gpte_rsvd(c, 0x1001 | BIT63, 1)
    assert not gpte_rsvd(c, 0x1003, 1)


# =============================================================================
# AMD: bit 8 reserved in non-leaf PML4Es and PML5Es only (APM vol. 2, 5.3.3,
# "Reserved bits ... bit 8 of PML4E/PML5E must be zero" on AMD; Intel ignores it)
# =============================================================================

@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize("amd", [False, True])
def test_amd_bit8_building_block(level, amd):
    m, _ = table(level, 52, nx=True, gbpages=True, amd=amd)
    # MAXPHYADDR 52: bits 52..63 & bits 0..51 = 0, so only the format bits show.
    # PML4E (and PML5E): PS (bit 7) reserved = 0x80, plus bit 8 on AMD -> 0x180
    want_top = BIT7 | (BIT8 if amd else 0)
    assert m[0][3] == m[1][3] == want_top == (0x180 if amd else 0x80)
    if level == 5:
        assert m[0][4] == m[1][4] == want_top
    else:
        assert m[0][4] == m[1][4] == 0          # level 4 does not write PML5E slots
    # PDPTE/PDE/PTE: no bit 8 on either vendor (bit 8 is G in leaves)
    assert m[0][2] == m[0][1] == m[0][0] == m[1][0] == 0
    assert m[1][1] == BITS_13_20 and m[1][2] == BITS_13_29


@pytest.mark.parametrize("la57,level", [(False, 4), (True, 5)])
@pytest.mark.parametrize("amd", [False, True])
def test_amd_bit8_full_context(la57, level, amd):
    c = ctx1(cr0=LINUX_CR0, cr4=LINUX_CR4 | (CR4_LA57 if la57 else 0), efer=LINUX_EFER,
             maxphyaddr=52, guest_amd=amd)
    assert int(c["root_level"]) == level
    e = 0x0000_0000_0000_1163           # address 0x1000 | bit 8 | 0x63 = D(6) A(5) RW(1) P(0)
    assert e & BIT8
    # the top-level (non-leaf) entry: reserved iff AMD
    assert gpte_rsvd(c, e, level) == amd
    assert gpte_rsvd(c, e, 4) == amd            # PML4E under 5-level too
    # the same bits at PDPTE/PDE/PTE level are fine on both vendors
    for lv in (1, 2, 3):
        assert not gpte_rsvd(c, e, lv)


# =============================================================================
# 32-bit paging with CR4.PSE (SDM 4.3, table 4-4): 4 MiB PDE with PSE-36,
# bits 13..(13+36-32-1)=16 hold PA 32..35, bits 17..21 reserved.
# =============================================================================

def test_pse36_building_block():
    m, _ = table(2, 36, pse=True)
    # [1][1] = bits 17..21 = 0x1F << 17 = 0x3E0000; everything else 0
    assert m[1][1] == BITS_17_21 == 0x3E_0000
    assert m[0][0] == m[0][1] == m[1][0] == 0
    m, _ = table(2, 36, pse=False)
    assert m == [[0] * 5, [0] * 5]
    # MAXPHYADDR does not matter for 32-bit paging (no HI term is used)
    assert table(2, 0, pse=True)[0][1][1] == BITS_17_21


def test_pse36_full_context():
    pse = ctx1(cr0=PROT32, cr4=CR4_PSE, efer=0, maxphyaddr=36)
    nopse = ctx1(cr0=PROT32, cr4=0, efer=0, maxphyaddr=36)
    assert int(pse["root_level"]) == int(nopse["root_level"]) == 2
    assert int(pse["guest_rsvd"][1, 1]) == 0x3E_0000
    assert int(nopse["guest_rsvd"][1, 1]) == 0
    big = 0x0040_0083          # 4 MiB page at 4 MiB: PS(7) RW(1) P(0)
    assert not gpte_rsvd(pse, big, 2)
    assert not gpte_rsvd(pse, big | 1 << 13 | 1 << 16, 2)   # PA bits 32 and 35
    for b in (17, 18, 19, 20, 21):
        assert gpte_rsvd(pse, big | 1 << b, 2), f"PDE bit {b}"
        assert not gpte_rsvd(nopse, big | 1 << b, 2)
    assert not gpte_rsvd(pse, big | 1 << 31, 2)              # frame bit 31


# =============================================================================
# 4-level paging: MAXPHYADDR 36 vs 52 (SDM 4.5, tables 4-14 .. 4-20)
# =============================================================================

def test_four_level_maxphyaddr_36_vs_52():
    m36, _ = table(4, 36, nx=True, gbpages=True)
    # HI = bits 36..63 & bits 0..51 = bits 36..51 = 0x000FFFF000000000
    assert m36[0][0] == m36[1][0] == m36[0][1] == m36[0][2] == BITS_36_51
    assert m36[1][1] == 0x000F_FFF0_001F_E000            # | bits 13..20
    assert m36[1][2] == 0x000F_FFF0_3FFF_E000            # | bits 13..29 (1 GiB)
    assert m36[0][3] == m36[1][3] == 0x000F_FFF0_0000_0080  # | PS
    m52, _ = table(4, 52, nx=True, gbpages=True)
    # bits 52..63 & bits 0..51 = nothing
    assert m52[0][0] == m52[0][1] == m52[0][2] == 0
    assert m52[0][3] == 0x80


def test_four_level_bit63_without_nx():
    m, _ = table(4, 36, nx=False)
    # bit 63 | bits 36..51 = 0x8000000000000000 | 0x000FFFF000000000
    assert m[0][0] == m[1][0] == 0x800F_FFF0_0000_0000
    m, _ = table(4, 52, nx=False)
    assert m[0][0] == BIT63
    m, _ = table(4, 52, nx=True)
    assert m[0][0] == 0


def test_four_level_full_context_entries():
    nx = ctx1(cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=36)
    nonx = ctx1(cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER & ~EFER_NX, maxphyaddr=36)
    wide = ctx1(cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=52)
    assert int(nx["guest_rsvd"][0, 0]) == BITS_36_51
    assert int(nonx["guest_rsvd"][0, 0]) == 0x800F_FFF0_0000_0000
    pte = 0x0000_000F_FFFF_F063       # frame at 0xFFFFFF000 (bits 12..35), P RW A D
    assert not gpte_rsvd(nx, pte, 1)
    assert gpte_rsvd(nx, pte | 1 << 36, 1)              # first address bit above 36
    assert not gpte_rsvd(wide, pte | 1 << 36 | 1 << 51, 1)
    assert gpte_rsvd(nonx, pte | BIT63, 1) and not gpte_rsvd(nx, pte | BIT63, 1)
    assert not gpte_rsvd(wide, pte | 0x7FF << 52, 1)    # bits 52..62 are ignored (PK, AVL)


# =============================================================================
# 1 GiB and 2 MiB pages (SDM tables 4-16, 4-18)
# =============================================================================

def test_1g_pdpte_bit7_with_and_without_gbpages():
    gb, _ = table(4, 52, gbpages=True)
    nogb, _ = table(4, 52, gbpages=False)
    # 1 GiB PDPTE: bits 13..29 between PAT(12) and the frame(30) = 0x3FFFE000
    assert gb[1][2] == 0x3FFF_E000
    assert gb[0][2] == 0
    # without 1 GiB pages PS itself (bit 7) is reserved in both rows
    assert nogb[1][2] == 0x3FFF_E080
    assert nogb[0][2] == 0x80


def test_1g_pdpte_full_context_follows_guest_cpuid_under_shadow():
    # shadow paging (TDP off): guest_can_use_gbpages = guest CPUID GBPAGES
    host = kvmmu.HostConfig(tdp_enabled=False)
    yes = ctx1("shadow", host, cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=52,
               guest_gbpages=True)
    no = ctx1("shadow", host, cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=52,
              guest_gbpages=False)
    page = 0x4000_0083                  # 1 GiB page at 1 GiB: PS RW P
    assert not gpte_rsvd(yes, page, 3)
    assert gpte_rsvd(no, page, 3)
    assert gpte_rsvd(yes, page | 1 << 13, 3)           # bit 13: first reserved bit
    assert not gpte_rsvd(yes, page | 1 << 12, 3)       # bit 12 is PAT
    # with TDP (v5.17) the host's capability decides instead
    tdp = ctx1("tdp", kvmmu.HostConfig(host_gbpages=True), cr0=LINUX_CR0, cr4=LINUX_CR4,
               efer=LINUX_EFER, maxphyaddr=52, guest_gbpages=False)
    assert not gpte_rsvd(tdp, page, 3)
    # ... but v6.16 always trusts guest CPUID
    v6 = ctx1("tdp", kvmmu.HostConfig(host_gbpages=True), version="v6.16", cr0=LINUX_CR0,
              cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=52, guest_gbpages=False)
    assert gpte_rsvd(v6, page, 3)


def test_2m_pde_bits_13_to_20():
    m, _ = table(4, 52)
    assert m[1][1] == 0x1F_E000                       # 0xFF << 13
    c = ctx1(cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=52)
    page = 0x0020_00E3                 # 2 MiB page at 2 MiB: PS D A RW P
    assert not gpte_rsvd(c, page, 2)
    assert not gpte_rsvd(c, page | 1 << 12, 2)        # PAT
    for b in range(13, 21):
        assert gpte_rsvd(c, page | 1 << b, 2), f"2M PDE bit {b}"
    assert not gpte_rsvd(c, page | 1 << 22, 2)        # frame bit 22
    # the same bits in a 4 KiB PTE are address bits, and bit 7 there is PAT
    assert not gpte_rsvd(c, 0x1FE063 | 0x80, 1)


# =============================================================================
# EPT (SDM 29.3.2 / 30.3.3.1): misconfigurations and reserved bits
# =============================================================================

# bad_mt_xwr: index = memtype << 3 | XWR (X = bit 2, W = bit 1, R = bit 0).
# Memory types 2, 3, 7 reserved -> bytes 2, 3, 7 = 0xFF.
# XWR 010 (write-only) -> bit 2 of every byte; XWR 110 (write+exec, no read)
# -> bit 6; XWR 100 (execute-only) -> bit 4 unless the CPU supports it.
# no execonly: byte = 0x04 | 0x40 | 0x10 = 0x54 -> 0xFF54_5454_FFFF_5454
# execonly:    byte = 0x04 | 0x40        = 0x44 -> 0xFF44_4444_FFFF_4444
BAD_NO_EXECONLY = 0xFF54_5454_FFFF_5454
BAD_EXECONLY = 0xFF44_4444_FFFF_4444


@pytest.mark.parametrize("execonly,want", [(False, BAD_NO_EXECONLY), (True, BAD_EXECONLY)])
def test_ept_bad_mt_xwr_building_block(execonly, want):
    t = kvmmu.reset_rsvds_bits_mask_ept(kvmmu.rsvd_bits(46, 63), execonly=execonly,
                                        huge_page_level=3)
    assert int(t.bad_mt_xwr) == want


@pytest.mark.parametrize("execonly", [False, True])
def test_ept_misconfigured_leaves(execonly):
    ept = kvmmu.EptConfig(execonly=execonly)
    c = ctx1("shadow_ept", kvmmu.HostConfig(), ept, maxphyaddr=46)
    frame = 0x1234_5000

    def leaf(memtype, xwr):
        return frame | memtype << 3 | xwr
    # valid memory types 0 (UC), 1 (WC), 4 (WT), 5 (WP), 6 (WB) with RWX
    for mt in (0, 1, 4, 5, 6):
        assert not gpte_rsvd(c, leaf(mt, 0b111), 1), f"memtype {mt}"
    for mt in (2, 3, 7):
        assert gpte_rsvd(c, leaf(mt, 0b111), 1), f"memtype {mt}"
    # XWR patterns with WB
    assert gpte_rsvd(c, leaf(6, 0b010), 1)          # write-only
    assert gpte_rsvd(c, leaf(6, 0b110), 1)          # write+exec without read
    assert gpte_rsvd(c, leaf(6, 0b100), 1) == (not execonly)   # execute-only
    for xwr in (0b000, 0b001, 0b011, 0b101, 0b111):
        assert not gpte_rsvd(c, leaf(6, xwr), 1), f"xwr {xwr:03b}"
    # the shadow-zero table uses the same execonly
    assert int(c["shadow_bad_mt_xwr"]) == (BAD_EXECONLY if execonly else BAD_NO_EXECONLY)
    assert spte_rsvd(c, leaf(6, 0b100), 1) == (not execonly)


def test_ept_tdp_shadow_zero_concrete_sptes():
    # Intel host with TDP: the shadow-zero table is EPT format, execonly=false
    c = ctx1("tdp", kvmmu.HostConfig(shadow_phys_bits=46), cr0=LINUX_CR0, cr4=LINUX_CR4,
             efer=LINUX_EFER, maxphyaddr=46)
    assert int(c["shadow_bad_mt_xwr"]) == BAD_NO_EXECONLY
    assert not spte_rsvd(c, 0x1000 | 6 << 3 | 0b111, 1)
    assert spte_rsvd(c, 0x1000 | 3 << 3 | 0b111, 1)
    assert spte_rsvd(c, 0x1000 | 6 << 3 | 0b100, 1)
    assert spte_rsvd(c, 1 << 46 | 0x37, 1)          # host bit 46 >= shadow_phys_bits


@pytest.mark.parametrize("hpl", [1, 2, 3])
def test_ept_large_page_bits(hpl):
    t = kvmmu.reset_rsvds_bits_mask_ept(kvmmu.rsvd_bits(46, 63), execonly=False,
                                        huge_page_level=hpl)
    m = [[int(x) for x in row] for row in t.rsvd_bits_mask]
    hi = BITS_46_51                               # 0x000FC00000000000
    n1 = BIT7 if hpl < 3 else 0                  # no 1 GiB pages: PS at level 3
    n2 = BIT7 if hpl < 2 else 0                  # no 2 MiB pages: PS at level 2
    # non-leaf PML5E/PML4E: bits 3..7 (memtype, IPAT, PS) = 0xF8
    assert m[0][4] == m[1][4] == m[0][3] == m[1][3] == hi | 0xF8
    # non-leaf PDPTE / PDE: bits 3..6 = 0x78, plus PS where unsupported
    assert m[0][2] == hi | 0x78 | n1
    assert m[0][1] == hi | 0x78 | n2
    # 1 GiB leaf: bits 12..29 = 0x3FFFF000; 2 MiB leaf: bits 12..20 = 0x1FF000
    assert m[1][2] == hi | 0x3FFF_F000 | n1
    assert m[1][1] == hi | 0x1F_F000 | n2
    assert m[0][0] == m[1][0] == hi
    # the literal values, for the record
    want_12 = {3: 0x000F_C000_001F_F000, 2: 0x000F_C000_001F_F000, 1: 0x000F_C000_001F_F080}
    want_13 = {3: 0x000F_C000_3FFF_F000, 2: 0x000F_C000_3FFF_F080, 1: 0x000F_C000_3FFF_F080}
    assert m[1][1] == want_12[hpl] and m[1][2] == want_13[hpl]


@pytest.mark.parametrize("hpl", [1, 2, 3])
def test_ept_large_page_entries_shadow_ept(hpl):
    c = ctx1("shadow_ept", kvmmu.HostConfig(), kvmmu.EptConfig(huge_page_level=hpl),
             maxphyaddr=46)
    p2m = 0x0020_0000 | BIT7 | 6 << 3 | 0b111        # 2 MiB WB RWX leaf = 0x2000B7
    p1g = 0x4000_0000 | BIT7 | 6 << 3 | 0b111        # 1 GiB WB RWX leaf = 0x400000B7
    assert p2m == 0x2000B7 and p1g == 0x400000B7
    assert gpte_rsvd(c, p2m, 2) == (hpl < 2)
    assert gpte_rsvd(c, p1g, 3) == (hpl < 3)
    assert gpte_rsvd(c, p2m | 1 << 12, 2)             # bit 12 inside 12..20
    assert gpte_rsvd(c, p1g | 1 << 29, 3)             # bit 29 inside 12..29
    # non-leaf PML4E with bit 7 set is always reserved (bits 3..7)
    assert gpte_rsvd(c, 0x1007 | BIT7, 4)
    assert not gpte_rsvd(c, 0x1007, 4)


# =============================================================================
# MAXPHYADDR 0 (all 64 bits), 64 and 255 (no address bits)
# =============================================================================

def test_maxphyaddr_0_reserves_everything():
    m4, _ = table(4, 0, nx=True)
    # HI = all ones & bits 0..51 = 0x000FFFFFFFFFFFFF
    assert m4[0][0] == 0x000F_FFFF_FFFF_FFFF
    assert m4[0][3] == 0x000F_FFFF_FFFF_FFFF           # already contains bit 7
    m4, _ = table(4, 0, nx=False)
    assert m4[0][0] == 0x800F_FFFF_FFFF_FFFF
    m3, _ = table(3, 0)
    # PAE: bits 0..62 | bit 63 -> every bit
    assert m3[0][2] == U64 and m3[0][0] == 0x7FFF_FFFF_FFFF_FFFF
    t = kvmmu.reset_rsvds_bits_mask_ept(kvmmu.rsvd_bits(0, 63), execonly=False,
                                        huge_page_level=3)
    assert int(t.rsvd_bits_mask[0, 0]) == 0x000F_FFFF_FFFF_FFFF
    c = ctx1(cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=0)
    assert gpte_rsvd(c, 0x1, 1)                         # even a bare present bit


@pytest.mark.parametrize("mpa", [64, 255])
def test_maxphyaddr_64_and_255_reserve_no_address_bits(mpa):
    m, _ = table(4, mpa, nx=True, gbpages=True)
    assert m[0][0] == m[0][1] == m[0][2] == 0
    assert m[1][1] == BITS_13_20 and m[1][2] == BITS_13_29 and m[0][3] == BIT7
    m, _ = table(3, mpa)
    assert m[0][2] == BIT63 | BITS_5_8 | BITS_1_2 == 0x8000_0000_0000_01E6
    c = ctx1(cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=mpa)
    assert not gpte_rsvd(c, 0x000F_FFFF_FFFF_F063, 1)   # every address bit 12..51


# =============================================================================
# Role words by hand (doc section 2)
# =============================================================================

# tdp, v5.17, default host (Intel EPT, max_tdp_level 4, A/D enabled), Linux guest:
# base: level 4 (bits 0-3)            = 0x0004
#       direct 1 (bit 7)              = 0x0080
#       access 7 (bits 8-10)          = 0x0700
#       efer_nx 1 (bit 12)            = 0x1000
#       cr0_wp 1 (bit 13)             = 0x2000
#       (smep/smap_andnot_wp: 0 for TDP; smm 0; guest_mode 0)
#       -> 0x3784
# ext:  valid(0)=0x1 cr0_pg(2)=0x4 cr4_pae(3)=0x8 cr4_pse(4)=0x10 cr4_pke(5)=0
#       cr4_smap(6)=0x40 cr4_smep(7)=0x80 cr4_la57(8)=0 efer_lma(9)=0x200
#       -> 0x2DD
# role = 0x2DD << 32 | 0x3784
TDP_V517_LINUX = 0x0000_02DD_0000_3784

# v6.16 cpu_role for the same guest:
# base: level 4 = 0x4, has_4_byte_gpte = !PAE = 0, direct 0, access 7 = 0x700,
#       efer_nx = 0x1000, cr0_wp = 0x2000, smep_andnot_wp = SMEP & !WP = 0 -> 0x3704
# ext:  valid(0)=0x1 cr4_pse(2)=0x4 cr4_pke(3)=0 cr4_smap(4)=0x10
#       cr4_smep(5)=0x20 cr4_la57(6)=0 efer_lma(7)=0x80 -> 0xB5
TDP_V616_LINUX_CPU = 0x0000_00B5_0000_3704
# v6.16 tdp root_role: access 7 (0x700) | cr0_wp (0x2000) | efer_nx (0x1000)
#       | direct (0x80) | level 4 -> 0x3784, whatever the guest's registers
TDP_V616_ROOT = 0x3784


def test_role_tdp_v517_linux_guest():
    c = ctx1("tdp", cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=46)
    assert int(c["role"]) == TDP_V517_LINUX
    assert int(c["root_role"]) == 0
    assert int(c["root_level"]) == 4 and int(c["shadow_root_level"]) == 4
    r = kvmmu.decode_role(TDP_V517_LINUX, "v5.17")
    assert (r["level"], r["direct"], r["access"], r["efer_nx"], r["cr0_wp"]) == (4, 1, 7, 1, 1)
    assert (r["valid"], r["cr0_pg"], r["cr4_pae"], r["cr4_pse"], r["cr4_smap"],
            r["cr4_smep"], r["efer_lma"]) == (1, 1, 1, 1, 1, 1, 1)
    assert (r["cr4_pke"], r["cr4_la57"], r["smm"], r["guest_mode"], r["has_4_byte_gpte"],
            r["smep_andnot_wp"], r["smap_andnot_wp"], r["execonly"]) == (0,) * 8
    assert int(kvmmu.pack_role(r, "v5.17")) == TDP_V517_LINUX


def test_role_tdp_v616_linux_guest():
    c = ctx1("tdp", version="v6.16", cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER,
             maxphyaddr=46)
    assert int(c["role"]) == TDP_V616_LINUX_CPU
    assert int(c["root_role"]) == TDP_V616_ROOT
    assert int(c["root_level"]) == 4 and int(c["shadow_root_level"]) == 4
    r = kvmmu.decode_role(TDP_V616_LINUX_CPU, "v6.16")
    assert (r["level"], r["direct"], r["cr4_pse"], r["cr4_smap"], r["cr4_smep"],
            r["efer_lma"], r["passthrough"], r["is_mirror"]) == (4, 0, 1, 1, 1, 1, 0, 0)
    assert "cr0_pg" not in r and "cr4_pae" not in r
    # a 32-bit guest without paging has the same TDP root role in v6.16
    c2 = ctx1("tdp", version="v6.16", cr0=0x11, maxphyaddr=46)
    assert int(c2["root_role"]) == TDP_V616_ROOT
    # cpu_role with paging off: access 7 | direct (0x80) and ext.valid -> 0x1_0000_0780
    assert int(c2["role"]) == 0x1_0000_0780


def test_role_tdp_smm_and_guest_mode():
    # smm = 1 in bits 24..31 -> 0x0100_0000; guest_mode bit 17 -> 0x2_0000
    c = ctx1("tdp", cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=46, smm=True,
             guest_mode=True)
    assert int(c["role"]) == TDP_V517_LINUX | 0x0100_0000 | 0x2_0000 == 0x2DD_0102_3784


def test_role_shadow_paging_off():
    # v5.17 shadow, CR0 = PE|ET only (no paging), EFER = 0:
    #   access 7 (0x700) | direct = !PG (0x80) | level 3 (no LMA)  -> 0x783
    #   ext: valid only -> role 0x1_0000_0783
    c = ctx1("shadow", kvmmu.HostConfig(tdp_enabled=False), cr0=0x11, maxphyaddr=36)
    assert int(c["role"]) == 0x1_0000_0783
    assert int(c["root_level"]) == 0 and int(c["shadow_root_level"]) == 3
    # v6.16: cpu_role 0x1_0000_0780 (level 0, direct); root_role = its base with
    # level max(0, 3) = 3 and efer_nx forced (0x1000): 0x780 | 0x3 | 0x1000 = 0x1783
    c = ctx1("shadow", kvmmu.HostConfig(tdp_enabled=False), version="v6.16", cr0=0x11,
             maxphyaddr=36)
    assert int(c["role"]) == 0x1_0000_0780
    assert int(c["root_role"]) == 0x1783
    assert int(c["root_level"]) == 0 and int(c["shadow_root_level"]) == 3


def test_role_shadow_smep_without_wp():
    # v5.17 shadow, 64-bit guest with CR0.WP = 0, SMEP and SMAP on, NX on:
    # base: level 4 | access 0x700 | efer_nx 0x1000 | cr0_wp 0
    #       | smep_andnot_wp (bit 14) 0x4000 | smap_andnot_wp (bit 15) 0x8000 -> 0xD704
    # ext:  0x2DD (as for the TDP case: same CR4/EFER bits)
    cr0 = LINUX_CR0 & ~CR0_WP
    assert cr0 == 0x80040033
    c = ctx1("shadow", kvmmu.HostConfig(tdp_enabled=False), cr0=cr0, cr4=LINUX_CR4,
             efer=LINUX_EFER, maxphyaddr=46)
    assert int(c["role"]) == 0x2DD_0000_D704


def test_role_shadow_ept_v517_vs_v616():
    # kvm_calc_shadow_ept_root_page_role, eptp level 4, A/D on, execonly:
    #   level 4 | access 0x700 | guest_mode 0x2_0000 -> 0x2_0704
    #   ext = valid | execonly << 1 = 0x3
    ept = kvmmu.EptConfig(execonly=True, accessed_dirty=True, eptp_level=4, root_mmu_smm=True)
    c = ctx1("shadow_ept", kvmmu.HostConfig(), ept, maxphyaddr=46)
    # v5.17 copies root_mmu's smm (1 -> 0x0100_0000)
    assert int(c["role"]) == 0x3_0102_0704
    c = ctx1("shadow_ept", kvmmu.HostConfig(), ept, version="v6.16", maxphyaddr=46)
    assert int(c["role"]) == 0x3_0002_0704            # smm always 0
    assert int(c["root_role"]) == 0x2_0704
    # A/D disabled: ad_disabled (bit 16) 0x1_0000
    ept = kvmmu.EptConfig(accessed_dirty=False, eptp_level=5)
    c = ctx1("shadow_ept", kvmmu.HostConfig(), ept, version="v6.16", maxphyaddr=46)
    assert int(c["role"]) == 0x1_0003_0705


# =============================================================================
# permissions[16] and pkru_mask by hand (SDM 4.6, doc section 10)
# =============================================================================
# Byte i is for pfec = i << 1: W = i&1, U = i&2, RSVD(SMAP override) = i&4,
# F = i&8. Bit a of the byte: a&1 exec, a&2 write, a&4 user page.
#   not executable: a in {0,2,4,6} -> 0x55
#   not writable:   a in {0,1,4,5} -> 0x33
#   not user:       a in {0,1,2,3} -> 0x0F
#   user page:      a in {4,5,6,7} -> 0xF0

I_READ, I_WRITE, I_USER_READ, I_USER_WRITE = 0, 1, 2, 3
I_READ_AC, I_WRITE_AC = 4, 5          # supervisor with SMAP override (AC = 1)
I_FETCH, I_USER_FETCH = 8, 10


def perms(**kw):
    return [int(x) for x in kvmmu.update_permission_bitmask(**kw)]


def test_smep_supervisor_fetch_from_user_page():
    p = perms(cr0_wp=1, efer_nx=1, cr4_smep=1, cr4_smap=0)
    # not executable (0x55) | SMEP: supervisor fetch of any user page (0xF0) = 0xF5
    assert p[I_FETCH] == 0xF5
    # a user-mode fetch: not executable 0x55 | not user 0x0F = 0x5F (no SMEP term)
    assert p[I_USER_FETCH] == 0x5F
    assert perms(cr0_wp=1, efer_nx=1, cr4_smep=0, cr4_smap=0)[I_FETCH] == 0x55
    # without NX nothing is non-executable, but SMEP still applies: 0xF0
    assert perms(cr0_wp=1, efer_nx=0, cr4_smep=1, cr4_smap=0)[I_FETCH] == 0xF0
    assert perms(cr0_wp=1, efer_nx=0, cr4_smep=0, cr4_smap=0)[I_FETCH] == 0x00


def test_smap_and_its_override():
    p = perms(cr0_wp=1, efer_nx=1, cr4_smep=0, cr4_smap=1)
    assert p[I_READ] == 0xF0                  # supervisor read of a user page
    assert p[I_READ_AC] == 0x00               # ... allowed with EFLAGS.AC
    assert p[I_WRITE] == 0x33 | 0xF0 == 0xF3  # not writable | user page
    assert p[I_WRITE_AC] == 0x33
    assert p[I_FETCH] == 0x55                 # SMAP does not cover fetches
    assert p[I_USER_READ] == 0x0F             # user accesses: only the U check


def test_cr0_wp0_supervisor_write():
    p = perms(cr0_wp=0, efer_nx=1, cr4_smep=0, cr4_smap=0)
    assert p[I_WRITE] == 0x00                 # supervisor may write read-only pages
    assert p[I_USER_WRITE] == 0x33 | 0x0F == 0x3F
    assert perms(cr0_wp=1, efer_nx=1, cr4_smep=0, cr4_smap=0)[I_WRITE] == 0x33


def test_ept_permissions_ignore_role_bits():
    want = [(0x33 if i & 1 else 0) | (0x0F if i & 2 else 0) | (0x55 if i & 8 else 0)
            for i in range(16)]
    assert want[I_FETCH] == 0x55 and want[I_WRITE] == 0x33 and want[I_USER_WRITE] == 0x3F
    for wp in (0, 1):
        for nx in (0, 1):
            assert perms(cr0_wp=wp, efer_nx=nx, cr4_smep=1, cr4_smap=1, ept=True) == want
    c = ctx1("shadow_ept", kvmmu.HostConfig(), kvmmu.EptConfig(), maxphyaddr=46)
    assert [int(x) for x in c["permissions"]] == want
    assert int(c["pkru_mask"]) == 0


def test_permissions_in_a_full_context():
    # Linux guest: NX, WP, SMEP, SMAP
    c = ctx1("tdp", cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=46)
    p = [int(x) for x in c["permissions"]]
    assert p[I_FETCH] == 0xF5 and p[I_READ] == 0xF0 and p[I_READ_AC] == 0x00
    assert p[I_WRITE] == 0xF3
    # same guest with WP cleared: the supervisor write loses its 0x33
    c = ctx1("tdp", cr0=LINUX_CR0 & ~CR0_WP, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=46)
    assert int(c["permissions"][I_WRITE]) == 0xF0


def test_pkru_mask_by_hand():
    # AD at bit 2i iff not fetch and leaf user (RSVD position): i in {4,5,6,7}
    #   -> bits 8, 10, 12, 14
    # WD at bit 2i+1 iff AD, write, and (user or WP):
    #   WP=1: i in {5, 7} -> bits 11, 15 ; WP=0: only i=7 (user write) -> bit 15
    # WP=1: 0x100|0x400|0x800|0x1000|0x4000|0x8000 = 0xDD00
    # WP=0: 0x100|0x400|0x1000|0x4000|0x8000       = 0xD500
    assert int(kvmmu.update_pkru_bitmask(cr4_pke=1, cr0_wp=1)) == 0xDD00
    assert int(kvmmu.update_pkru_bitmask(cr4_pke=1, cr0_wp=0)) == 0xD500
    assert int(kvmmu.update_pkru_bitmask(cr4_pke=0, cr0_wp=1)) == 0
    pke = LINUX_CR4 | CR4_PKE
    assert pke == 0x7406F0
    c = ctx1("tdp", cr0=LINUX_CR0, cr4=pke, efer=LINUX_EFER, maxphyaddr=46)
    assert int(c["pkru_mask"]) == 0xDD00
    # PKE only counts in long mode: a PAE guest gets 0
    c = ctx1("tdp", cr0=PROT32 | CR0_WP, cr4=CR4_PAE | CR4_PKE, efer=EFER_NX, maxphyaddr=46)
    assert int(c["pkru_mask"]) == 0
    # shadow NPT drops CR4.PKE
    c = ctx1("shadow_npt", cr0=LINUX_CR0, cr4=pke, efer=LINUX_EFER, maxphyaddr=46)
    assert int(c["pkru_mask"]) == 0


# =============================================================================
# Shadow-zero tables by hand (doc section 8.2)
# =============================================================================

def test_tdp_amd_npt_bit63_v517_vs_v616():
    # AMD NPT host, host MAXPHYADDR 46, TDP level 4: legacy format with
    # HI = bits 46..51 = 0x000FC00000000000; v5.17 passes nx=false (bit 63 too)
    host = kvmmu.HostConfig(host_tdp_is_amd=True, shadow_phys_bits=46)
    c5 = ctx1("tdp", host, cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER, maxphyaddr=46)
    c6 = ctx1("tdp", host, version="v6.16", cr0=LINUX_CR0, cr4=LINUX_CR4, efer=LINUX_EFER,
              maxphyaddr=46)
    assert int(c5["shadow_zero"][0, 0]) == 0x800F_C000_0000_0000
    assert int(c6["shadow_zero"][0, 0]) == 0x000F_C000_0000_0000
    # PML4E: HI | bit 8 (amd = true for SPTEs) | bit 7 -> 0x000FC00000000180 (v6)
    assert int(c6["shadow_zero"][0, 3]) == 0x000F_C000_0000_0180
    assert int(c5["shadow_bad_mt_xwr"]) == 0


def test_shadow_pae_nx_variants():
    # v5.17 shadow paging (TDP off) of a 32-bit PAE guest without NX, host
    # MAXPHYADDR 46 -> shadow root level 3, HI = bits 46..62 = 0x7FFFC00000000000
    host = kvmmu.HostConfig(tdp_enabled=False, shadow_phys_bits=46)
    g = dict(cr0=PROT32, cr4=CR4_PAE, efer=0, maxphyaddr=36)
    # v517: uses_nx = efer_nx || !tdp_enabled = 1 -> PTE slot = HI only
    assert int(ctx1("shadow", host, **g)["shadow_zero"][0, 0]) == 0x7FFF_C000_0000_0000
    # literal: uses_nx = efer_nx = 0 -> bit 63 added
    assert int(ctx1("shadow", host, variant="literal", **g)["shadow_zero"][0, 0]) \
        == 0xFFFF_C000_0000_0000
    # PDPTE slot: bit 63 | HI | 5..8 | 1..2 = 0xFFFFC000000001E6, either way
    assert int(ctx1("shadow", host, **g)["shadow_zero"][0, 2]) == 0xFFFF_C000_0000_01E6
