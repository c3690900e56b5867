# cython: language_level=3
"""kvmmu._core: the per-state kernels of kvmmu.

Everything here runs without the GIL over raw record buffers whose layout is
fixed by ``kvmmu._types`` (GUEST_DTYPE / CONTEXT_DTYPE, checked at import by
``layout()``). The Python layer validates every input before calling in; these
functions trust their arguments.

Each rule cites the kernel function it reproduces (arch/x86/kvm/mmu/mmu.c
unless said otherwise). The code is our own formulation of those rules.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memset, memcpy
from cython.parallel cimport prange
cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define KVMMU_OPENMP 1
    static int kvmmu_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define KVMMU_OPENMP 0
    static int kvmmu_max_threads(void) { return 1; }
    #endif
    """
    int KVMMU_OPENMP
    int KVMMU_DEBUG_BUILD
    int kvmmu_max_threads() nogil

cdef extern from *:
    """
    #include <string.h>
    #if defined(__x86_64__) && defined(__SSE2__)
    #include <emmintrin.h>
    /* Non-temporal 8-byte stores: a large output is written once and not read
       back soon, so skipping the read-for-ownership halves its memory traffic. */
    static inline void kvmmu_stream_copy(void *dst, const void *src, size_t n) {
        /* dst is 8-byte aligned and n a multiple of 8: one 8-byte store to
           reach 16-byte alignment if needed, then 16-byte stores. */
        char *d = (char *)dst; const char *s = (const char *)src;
        long long v;
        /* 8-byte loads through memcpy: reading the context's u64 fields as
           long long directly would break strict aliasing and let the compiler
           hoist the load above the stores that fill them. */
        if (((size_t)d & 15) && n >= 8) {
            memcpy(&v, s, 8);
            _mm_stream_si64((long long *)d, v);
            d += 8; s += 8; n -= 8;
        }
        while (n >= 16) {
            _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
            d += 16; s += 16; n -= 16;
        }
        if (n >= 8) {
            memcpy(&v, s, 8);
            _mm_stream_si64((long long *)d, v);
        }
    }
    static inline void kvmmu_sfence(void) { _mm_sfence(); }
    #else
    static inline void kvmmu_stream_copy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
    static inline void kvmmu_sfence(void) { }
    #endif
    """
    void kvmmu_stream_copy(void *dst, const void *src, size_t n) nogil
    void kvmmu_sfence() nogil


# ---------------------------------------------------------------------------
# Record layouts (must match kvmmu._types; layout() lets Python verify)

ctypedef struct guest_t:
    uint64_t cr0
    uint64_t cr4
    uint64_t efer
    uint8_t maxphyaddr
    uint8_t guest_amd
    uint8_t guest_gbpages
    uint8_t smm
    uint8_t guest_mode

ctypedef struct context_t:
    uint64_t role
    uint32_t root_role
    uint8_t root_level
    uint8_t shadow_root_level
    uint64_t guest_rsvd[2][5]
    uint64_t guest_bad_mt_xwr
    uint64_t shadow_zero[2][5]
    uint64_t shadow_bad_mt_xwr
    uint8_t permissions[16]
    uint32_t pkru_mask

# Batch-constant parameters: host configuration, EPT config, flavor, version.
ctypedef struct params_t:
    int version             # 0: v5.17, 1: v6.16
    int flavor              # FL_*
    int nx_rule             # NX_* (v5.17 shadow / shadow_npt shadow-zero table)
    int nx_outside_guard    # patch01: shadow-zero recomputed even when the guard skips
    int tdp_enabled
    uint64_t reserved_hpa_bits
    uint64_t shadow_me_mask
    uint64_t shadow_me_value
    int host_gbpages
    int host_tdp_is_amd
    int tdp_ad_disabled
    int tdp_root_level
    int max_tdp_level
    int max_huge_page_level
    int ept_execonly
    int ept_huge_page_level
    int ept_accessed_dirty
    int eptp_level
    int root_mmu_smm        # -1: take the state's own smm
    # Host-only shadow-zero tables, built once per batch (they do not depend on
    # the guest): TDP per level, with the slots each level writes; nested EPT.
    uint64_t sz_tdp[6][10]
    uint64_t sz_tdp_keep[6][10]
    uint64_t sz_tdp_bad
    uint64_t sz_ept[10]
    uint64_t sz_ept_bad

cdef enum:
    FL_TDP = 0
    FL_SHADOW = 1
    FL_SHADOW_NPT = 2
    FL_SHADOW_EPT = 3
    FL_NESTED = 4

cdef enum:
    NX_V517 = 0      # role.efer_nx || !tdp_enabled
    NX_FINAL = 1     # shadow: always; shadow_npt: role.efer_nx
    NX_LITERAL = 2   # role.efer_nx
    NX_ARRAY = 3     # per-state value supplied by the caller (user variants)

# Role bit positions (union kvm_mmu_page_role / kvm_mmu_extended_role).
cdef enum:
    B_HAS_4_BYTE_GPTE = 4
    B_DIRECT = 7
    B_ACCESS = 8
    B_INVALID = 11
    B_EFER_NX = 12
    B_CR0_WP = 13
    B_SMEP_ANDNOT_WP = 14
    B_SMAP_ANDNOT_WP = 15
    B_AD_DISABLED = 16
    B_GUEST_MODE = 17
    B_PASSTHROUGH = 18
    B_SMM = 24
    EXT = 32          # extended role lives in bits 32..63 of the u64

# Architectural register bits consulted by KVM.
cdef enum:
    CR0_PG = 31
    CR0_WP = 16
    CR4_PSE = 4
    CR4_PAE = 5
    CR4_LA57 = 12
    CR4_SMEP = 20
    CR4_SMAP = 21
    CR4_PKE = 22
    EFER_LMA = 10
    EFER_NX = 11

# Page-fault error code bits.
cdef enum:
    PF_WRITE = 2
    PF_USER = 4
    PF_RSVD = 8
    PF_FETCH = 16


cdef inline uint64_t rsvd_bits(int s, int e) noexcept nogil:
    # rsvd_bits() (mmu.h): the end index wraps mod 64 and s > e gives no
    # bits, which is what lets any MAXPHYADDR byte through.
    e &= 63
    if e < s:
        return 0
    return ((<uint64_t>2 << (e - s)) - 1) << s


# Permission tables depend on 4 role bits (+ the EPT flag): precompute all.
cdef uint8_t PERM_LUT[16][16]      # index: nx | wp<<1 | smep<<2 | smap<<3
cdef uint8_t PERM_EPT[16]
cdef uint32_t PKRU_LUT[4]          # index: pke | wp<<1


cdef void permission_bytes(uint8_t *out, int ept, int efer_nx, int cr0_wp,
                           int smep, int smap) noexcept nogil:
    # update_permission_bitmask(): bit a of byte i says whether an access with
    # error code i<<1 faults on a leaf whose effective ACC bits are a
    # (ACC_EXEC=1, ACC_WRITE=2, ACC_USER=4).
    cdef uint8_t x = 0xAA, w = 0xCC, u = 0xF0
    cdef uint8_t wf, uf, ff, kf, smepf, smapf
    cdef int i, pfec
    for i in range(16):
        pfec = i << 1
        wf = <uint8_t>~w if pfec & PF_WRITE else 0
        uf = <uint8_t>~u if pfec & PF_USER else 0
        ff = <uint8_t>~x if pfec & PF_FETCH else 0
        smepf = 0
        smapf = 0
        if not ept:
            kf = 0 if pfec & PF_USER else u       # supervisor access to a user page
            if not efer_nx:
                ff = 0                            # no NX: nothing is non-executable
            if not cr0_wp and not (pfec & PF_USER):
                wf = 0                            # CR0.WP=0: supervisor writes allowed
            if smep and (pfec & PF_FETCH):
                smepf = kf
            # SMAP: PF_RSVD stands for the AC-override computed in permission_fault()
            if smap and not (pfec & (PF_RSVD | PF_FETCH)):
                smapf = kf
        out[i] = ff | uf | wf | smepf | smapf


cdef uint32_t pkru_value(int cr0_wp) noexcept nogil:
    # update_pkru_bitmask() with CR4.PKE in effect: two bits per error code,
    # where the PF_RSVD position stands for the leaf's U bit.
    cdef uint32_t m = 0
    cdef int i, pfec, ad, wd
    for i in range(16):
        pfec = i << 1
        ad = (not (pfec & PF_FETCH)) and (pfec & PF_RSVD) != 0
        wd = ad and (pfec & PF_WRITE) != 0 and ((pfec & PF_USER) != 0 or cr0_wp)
        m |= <uint32_t>((ad | (wd << 1)) << pfec)
    return m


cdef void _init_tables() noexcept:
    cdef int k
    for k in range(16):
        permission_bytes(PERM_LUT[k], 0, k & 1, (k >> 1) & 1, (k >> 2) & 1, (k >> 3) & 1)
    permission_bytes(PERM_EPT, 1, 0, 0, 0, 0)
    PKRU_LUT[0] = 0
    PKRU_LUT[2] = 0
    PKRU_LUT[1] = pkru_value(0)
    PKRU_LUT[3] = pkru_value(1)

_init_tables()


cdef inline void reset_rsvds_legacy(uint64_t *m, uint64_t *bad, int level,
                                    uint64_t pa_bits_rsvd, int nx, int gbpages,
                                    int pse, int amd) noexcept nogil:
    # __reset_rsvds_bits_mask(): m is rsvd_bits_mask[2][5] flattened
    # (row*5 + level-1). Slots a level does not own are left untouched.
    cdef uint64_t hi, b8, gb7, bit7 = <uint64_t>1 << 7, bit63 = <uint64_t>1 << 63
    bad[0] = 0
    if level == 3:
        hi = pa_bits_rsvd & rsvd_bits(0, 62)     # PAE entries hold 63-bit addresses
    else:
        hi = pa_bits_rsvd & rsvd_bits(0, 51)
    if not nx:
        hi |= bit63                              # XD is reserved without EFER.NX
    b8 = (<uint64_t>1 << 8) if amd else 0        # AMD: bit 8 of non-leaf PML4E/PML5E
    gb7 = 0 if gbpages else bit7                 # no 1 GiB pages: PS in a PDPTE
    if level == 2:
        m[0] = 0
        m[1] = 0
        m[5] = 0
        # 4 MiB pages with PSE-36 (KVM always reports PSE-36)
        m[6] = rsvd_bits(17, 21) if pse else 0
    elif level == 3:
        # PAE PDPTEs: bits 1-2 and 5-8 reserved, and 63 regardless of NX
        m[2] = bit63 | hi | rsvd_bits(5, 8) | rsvd_bits(1, 2)
        m[1] = hi
        m[0] = hi
        m[6] = hi | rsvd_bits(13, 20)
        m[5] = hi
    elif level == 4 or level == 5:
        if level == 5:
            m[4] = hi | b8 | bit7
            m[9] = m[4]
        m[3] = hi | b8 | bit7
        m[8] = m[3]
        m[2] = hi | gb7
        m[7] = hi | gb7 | rsvd_bits(13, 29)
        m[1] = hi
        m[6] = hi | rsvd_bits(13, 20)
        m[0] = hi
        m[5] = hi


cdef inline uint64_t ept_bad_mt_xwr(int execonly) noexcept nogil:
    # Memory types 2, 3 and 7 are reserved; XWR 010 and 110 are
    # misconfigurations; 100 (execute-only) only without the capability.
    cdef uint64_t b = (<uint64_t>0xFF << 16) | (<uint64_t>0xFF << 24) | (<uint64_t>0xFF << 56)
    b |= <uint64_t>0x0404040404040404
    b |= <uint64_t>0x4040404040404040
    if not execonly:
        b |= <uint64_t>0x1010101010101010
    return b


cdef inline void reset_rsvds_ept(uint64_t *m, uint64_t *bad, uint64_t pa_bits_rsvd,
                                 int execonly, int huge_page_level) noexcept nogil:
    # __reset_rsvds_bits_mask_ept(): every slot is written.
    cdef uint64_t hi = pa_bits_rsvd & rsvd_bits(0, 51)
    cdef uint64_t bit7 = <uint64_t>1 << 7
    cdef uint64_t n1 = bit7 if huge_page_level < 3 else 0   # no 1 GiB leaves
    cdef uint64_t n2 = bit7 if huge_page_level < 2 else 0   # no 2 MiB leaves
    m[4] = hi | rsvd_bits(3, 7)
    m[9] = m[4]
    m[3] = m[4]
    m[8] = m[4]
    m[2] = hi | rsvd_bits(3, 6) | n1
    m[7] = hi | rsvd_bits(12, 29) | n1
    m[1] = hi | rsvd_bits(3, 6) | n2
    m[6] = hi | rsvd_bits(12, 20) | n2
    m[0] = hi
    m[5] = hi
    bad[0] = ept_bad_mt_xwr(execonly)


cdef inline void clear_me_mask(uint64_t *m, int level, uint64_t mask) noexcept nogil:
    # SME/MKTME key bits are legal in SPTEs of the levels in use.
    cdef int i
    for i in range(level if level < 5 else 5):
        m[i] &= ~mask
        m[5 + i] &= ~mask


cdef inline int tdp_level(const params_t *p, int maxphyaddr) noexcept nogil:
    # kvm_mmu_get_tdp_level(): 4-level TDP suffices for a 48-bit guest.
    if p.tdp_root_level:
        return p.tdp_root_level
    if p.max_tdp_level == 5 and maxphyaddr <= 48:
        return 4
    return p.max_tdp_level


cdef inline void guest_metadata(context_t *c, const guest_t *g, const params_t *p,
                                int level, int nx, int wp, int smep, int smap,
                                int pke, int pse, int gbpages) noexcept nogil:
    # reset_guest_paging_metadata(): only with paging on; otherwise the
    # previous tables, permissions and pkru_mask stay as they were.
    reset_rsvds_legacy(&c.guest_rsvd[0][0], &c.guest_bad_mt_xwr, level,
                       rsvd_bits(g.maxphyaddr, 63), nx, gbpages, pse, g.guest_amd != 0)
    memcpy(c.permissions, PERM_LUT[nx | (wp << 1) | (smep << 2) | (smap << 3)], 16)
    c.pkru_mask = PKRU_LUT[pke | (wp << 1)]


cdef inline void shadow_zero_legacy(context_t *c, const params_t *p, int level,
                                    int uses_nx, int gbpages) noexcept nogil:
    # reset_shadow_zero_bits_mask(): SPTEs are 64-bit, so pse=false, amd=true.
    cdef uint64_t *m = &c.shadow_zero[0][0]
    cdef int i, n
    reset_rsvds_legacy(m, &c.shadow_bad_mt_xwr, level, p.reserved_hpa_bits,
                       uses_nx, gbpages, 0, 1)
    if p.shadow_me_mask:
        if p.version == 0:
            clear_me_mask(m, level, p.shadow_me_mask)
        else:
            # v6: mask bits KVM never sets in SPTEs become reserved
            n = level if level < 5 else 5
            for i in range(n):
                m[i] = (m[i] | p.shadow_me_mask) & ~p.shadow_me_value
                m[5 + i] = (m[5 + i] | p.shadow_me_mask) & ~p.shadow_me_value


cdef void shadow_zero_tdp_compute(uint64_t *m, uint64_t *bad, const params_t *p,
                                  int level) noexcept nogil:
    # reset_tdp_shadow_zero_bits_mask(): format of the host's own TDP tables.
    if p.host_tdp_is_amd:
        # NPT: v5.17 passes nx=false (bit 63 reserved), v6 nx=true
        reset_rsvds_legacy(m, bad, level, p.reserved_hpa_bits, p.version == 1,
                           p.host_gbpages, 0, 1)
    else:
        reset_rsvds_ept(m, bad, p.reserved_hpa_bits, 0, p.max_huge_page_level)
    if p.shadow_me_mask:
        clear_me_mask(m, level, p.shadow_me_mask)


cdef inline void shadow_zero_tdp(context_t *c, const params_t *p, int level) noexcept nogil:
    # the precomputed table for this level, applied to the slots as the builder would
    cdef uint64_t *m = &c.shadow_zero[0][0]
    cdef const uint64_t *t = p.sz_tdp[level]
    cdef const uint64_t *keep = p.sz_tdp_keep[level]
    cdef int j
    for j in range(10):
        m[j] = (m[j] & keep[j]) | t[j]
    c.shadow_bad_mt_xwr = p.sz_tdp_bad


cdef inline int v517_uses_nx(const params_t *p, uint64_t role, int uses_nx_arg) noexcept nogil:
    # The NX assumption behind the shadow-zero table, per variant (see
    # reset_shadow_zero_bits_mask in v5.17 and the reviewed patch).
    cdef int efer_nx = (role >> B_EFER_NX) & 1
    if p.nx_rule == NX_V517:
        return efer_nx or not p.tdp_enabled
    if p.nx_rule == NX_FINAL:
        return 1 if p.flavor == FL_SHADOW else efer_nx
    if p.nx_rule == NX_LITERAL:
        return efer_nx
    return uses_nx_arg


cdef int init_shadow_ept(context_t *c, const guest_t *g, const params_t *p, int force,
                         int smm, int write_root_role) noexcept nogil:
    # kvm_calc_shadow_ept_root_page_role() + kvm_init_shadow_ept_mmu(): no
    # CR/EFER input at all; the role is the EPT walk's shape.
    cdef uint64_t base = (<uint64_t>p.eptp_level
                          | (<uint64_t>(not p.ept_accessed_dirty) << B_AD_DISABLED)
                          | (<uint64_t>1 << B_GUEST_MODE) | (<uint64_t>7 << B_ACCESS)
                          | (<uint64_t>smm << B_SMM))
    cdef uint64_t role = base | ((<uint64_t>1 | (<uint64_t>(p.ept_execonly != 0) << 1)) << EXT)
    if not force and role == c.role:
        return 0
    c.role = role
    if write_root_role:
        c.root_role = <uint32_t>base        # v6: root_role.word = cpu_role.base.word
    c.root_level = p.eptp_level
    c.shadow_root_level = p.eptp_level
    memcpy(c.permissions, PERM_EPT, 16)
    c.pkru_mask = 0
    reset_rsvds_ept(&c.guest_rsvd[0][0], &c.guest_bad_mt_xwr, rsvd_bits(g.maxphyaddr, 63),
                    p.ept_execonly, p.ept_huge_page_level)
    # reset_ept_shadow_zero_bits_mask(): the host's huge page level
    memcpy(c.shadow_zero, p.sz_ept, sizeof(p.sz_ept))
    c.shadow_bad_mt_xwr = p.sz_ept_bad
    return 1


cdef int init_v517(context_t *c, const guest_t *g, const params_t *p,
                   int force, int uses_nx_arg) noexcept nogil:
    cdef uint64_t cr0 = g.cr0, cr4 = g.cr4, efer = g.efer
    cdef int pg = (cr0 >> CR0_PG) & 1, wp = (cr0 >> CR0_WP) & 1
    cdef int pse = (cr4 >> CR4_PSE) & 1, pae = (cr4 >> CR4_PAE) & 1
    cdef int la57 = (cr4 >> CR4_LA57) & 1, smep = (cr4 >> CR4_SMEP) & 1
    cdef int smap = (cr4 >> CR4_SMAP) & 1, pke = (cr4 >> CR4_PKE) & 1
    cdef int lma = (efer >> EFER_LMA) & 1, nx = (efer >> EFER_NX) & 1
    cdef int smm = g.smm != 0, gm = g.guest_mode != 0
    cdef int fl = p.flavor
    cdef int glevel, level, tlevel, e_smep, e_smap, gbpages, recompute
    cdef uint64_t base, ext, role

    # role_regs_to_root_level(): LMA wins over a clear PAE
    if not pg:
        glevel = 0
    elif lma:
        glevel = 5 if la57 else 4
    elif pae:
        glevel = 3
    else:
        glevel = 2

    if fl == FL_SHADOW_EPT:
        # v5.17 copies smm from root_mmu's current role
        if p.root_mmu_smm >= 0:
            smm = p.root_mmu_smm
        return init_shadow_ept(c, g, p, force, smm, 0)

    if fl == FL_SHADOW_NPT:
        pke = 0          # kvm_init_shadow_npt_mmu() drops CR4.PKE

    # kvm_calc_mmu_role_common() + kvm_calc_mmu_role_ext()
    base = (<uint64_t>7 << B_ACCESS) | (<uint64_t>smm << B_SMM) | (<uint64_t>gm << B_GUEST_MODE)
    ext = 1
    if pg:
        base |= (<uint64_t>nx << B_EFER_NX) | (<uint64_t>wp << B_CR0_WP)
        ext |= ((<uint64_t>1 << 2) | (<uint64_t>pae << 3) | (<uint64_t>pse << 4)
                | (<uint64_t>(lma & pke) << 5) | (<uint64_t>smap << 6) | (<uint64_t>smep << 7)
                | (<uint64_t>(lma & la57) << 8) | (<uint64_t>lma << 9))
    e_smep = pg & smep
    e_smap = pg & smap
    tlevel = tdp_level(p, g.maxphyaddr)
    if fl == FL_TDP:
        # kvm_calc_tdp_mmu_root_page_role()
        base |= ((<uint64_t>p.tdp_ad_disabled << B_AD_DISABLED) | <uint64_t>tlevel
                 | (<uint64_t>1 << B_DIRECT))
        level = tlevel
    else:
        # kvm_calc_shadow_root_page_role_common()
        base |= ((<uint64_t>(e_smep & (wp ^ 1)) << B_SMEP_ANDNOT_WP)
                 | (<uint64_t>(e_smap & (wp ^ 1)) << B_SMAP_ANDNOT_WP)
                 | (<uint64_t>(pg & (pae ^ 1)) << B_HAS_4_BYTE_GPTE))
        if fl == FL_SHADOW:
            # kvm_calc_shadow_mmu_root_page_role(): raw LMA/LA57, even with PG=0
            level = (5 if la57 else 4) if lma else 3
            base |= (<uint64_t>(pg ^ 1) << B_DIRECT) | <uint64_t>level
        elif fl == FL_SHADOW_NPT:
            level = tlevel
            base |= <uint64_t>level
        else:
            # kvm_calc_nested_mmu_role(): direct marks "no shadow pages"
            level = glevel
            base |= (<uint64_t>1 << B_DIRECT) | <uint64_t>level
    role = base | (ext << EXT)

    gbpages = p.host_gbpages if p.tdp_enabled else (g.guest_gbpages != 0)  # guest_can_use_gbpages()
    recompute = force or role != c.role
    if recompute:
        c.role = role
        c.root_level = glevel
        if pg:
            guest_metadata(c, g, p, glevel, nx, wp, e_smep, e_smap, lma & pke, pse, gbpages)
        if fl == FL_TDP:
            c.shadow_root_level = level
            shadow_zero_tdp(c, p, level)
        elif fl != FL_NESTED:
            c.shadow_root_level = level
            if not p.nx_outside_guard:
                shadow_zero_legacy(c, p, level, v517_uses_nx(p, role, uses_nx_arg), gbpages)
    if (fl == FL_SHADOW or fl == FL_SHADOW_NPT) and p.nx_outside_guard:
        # patch 01/23: the call moved after shadow_mmu_init_context(), out of the guard
        shadow_zero_legacy(c, p, c.shadow_root_level, v517_uses_nx(p, c.role, uses_nx_arg), gbpages)
    return recompute


cdef int init_v616(context_t *c, const guest_t *g, const params_t *p, int force) noexcept nogil:
    cdef uint64_t cr0 = g.cr0, cr4 = g.cr4, efer = g.efer
    cdef int pg = (cr0 >> CR0_PG) & 1, wp = (cr0 >> CR0_WP) & 1
    cdef int pse = (cr4 >> CR4_PSE) & 1, pae = (cr4 >> CR4_PAE) & 1
    cdef int la57 = (cr4 >> CR4_LA57) & 1, smep = (cr4 >> CR4_SMEP) & 1
    cdef int smap = (cr4 >> CR4_SMAP) & 1, pke = (cr4 >> CR4_PKE) & 1
    cdef int lma = (efer >> EFER_LMA) & 1, nx = (efer >> EFER_NX) & 1
    cdef int smm = g.smm != 0, gm = g.guest_mode != 0
    cdef int fl = p.flavor
    cdef int glevel = 0, rlevel, tlevel
    cdef uint64_t base, ext, cpu_role
    cdef uint32_t root_role = 0

    if fl == FL_SHADOW_EPT:
        return init_shadow_ept(c, g, p, force, 0, 1)   # v6: smm is always 0 here

    if fl == FL_SHADOW_NPT:
        pke = 0          # kvm_init_shadow_npt_mmu() drops CR4.PKE

    # kvm_calc_cpu_role()
    base = (<uint64_t>7 << B_ACCESS) | (<uint64_t>smm << B_SMM) | (<uint64_t>gm << B_GUEST_MODE)
    ext = 1
    if not pg:
        base |= <uint64_t>1 << B_DIRECT
    else:
        glevel = (5 if la57 else 4) if lma else (3 if pae else 2)
        base |= ((<uint64_t>nx << B_EFER_NX) | (<uint64_t>wp << B_CR0_WP)
                 | (<uint64_t>(smep & (wp ^ 1)) << B_SMEP_ANDNOT_WP)
                 | (<uint64_t>(smap & (wp ^ 1)) << B_SMAP_ANDNOT_WP)
                 | (<uint64_t>(pae ^ 1) << B_HAS_4_BYTE_GPTE) | <uint64_t>glevel)
        ext |= ((<uint64_t>pse << 2) | (<uint64_t>(lma & pke) << 3) | (<uint64_t>smap << 4)
                | (<uint64_t>smep << 5) | (<uint64_t>(lma & la57) << 6) | (<uint64_t>lma << 7))
    cpu_role = base | (ext << EXT)

    if fl == FL_NESTED:
        # init_kvm_nested_mmu(): cpu_role only; root_role is never touched
        if not force and cpu_role == c.role:
            return 0
        c.role = cpu_role
        c.root_level = glevel
        if pg:
            guest_metadata(c, g, p, glevel, nx, wp, smep & pg, smap & pg, lma & pke, pse,
                           g.guest_gbpages != 0)
        return 1

    tlevel = tdp_level(p, g.maxphyaddr)
    if fl == FL_TDP:
        # kvm_calc_tdp_mmu_root_page_role(): independent of guest CR/EFER
        root_role = <uint32_t>((<uint64_t>7 << B_ACCESS) | (<uint64_t>1 << B_CR0_WP)
                               | (<uint64_t>1 << B_EFER_NX) | (<uint64_t>smm << B_SMM)
                               | (<uint64_t>gm << B_GUEST_MODE)
                               | (<uint64_t>p.tdp_ad_disabled << B_AD_DISABLED)
                               | <uint64_t>tlevel | (<uint64_t>1 << B_DIRECT))
        rlevel = tlevel
    elif fl == FL_SHADOW:
        # kvm_init_shadow_mmu(): shadow pages are at least PAE and always use NX
        rlevel = glevel if glevel > 3 else 3
        root_role = <uint32_t>((base & ~<uint64_t>0xF) | <uint64_t>rlevel | (<uint64_t>1 << B_EFER_NX))
    else:
        # kvm_init_shadow_npt_mmu(): level of the host's NPT; a 4-level L1
        # under 5-level NPT gets a passthrough root
        rlevel = tlevel
        root_role = <uint32_t>((base & ~<uint64_t>0xF) | <uint64_t>rlevel)
        if rlevel == 5 and glevel == 4:
            root_role |= <uint32_t>1 << B_PASSTHROUGH

    # init_kvm_tdp_mmu() / shadow_mmu_init_context(): both words must match
    if not force and cpu_role == c.role and root_role == c.root_role:
        return 0
    c.role = cpu_role
    c.root_role = root_role
    c.root_level = glevel
    c.shadow_root_level = rlevel
    if pg:
        guest_metadata(c, g, p, glevel, nx, wp, smep & pg, smap & pg, lma & pke, pse,
                       g.guest_gbpages != 0)
    if fl == FL_TDP:
        shadow_zero_tdp(c, p, rlevel)
    else:
        shadow_zero_legacy(c, p, rlevel, (root_role >> B_EFER_NX) & 1, g.guest_gbpages != 0)
    return 1


cdef inline int init_one(context_t *c, const guest_t *g, const params_t *p, int force,
                         int uses_nx_arg) noexcept nogil:
    if p.version == 0:
        return init_v517(c, g, p, force, uses_nx_arg)
    return init_v616(c, g, p, force)


# ---------------------------------------------------------------------------
# Python-visible entry points. Arguments are validated by kvmmu.engine.

cdef int _fill_params(params_t *p, dict d) except -1:
    p.version = d["version"]
    p.flavor = d["flavor"]
    p.nx_rule = d["nx_rule"]
    p.nx_outside_guard = d["nx_outside_guard"]
    p.tdp_enabled = d["tdp_enabled"]
    p.reserved_hpa_bits = d["reserved_hpa_bits"]
    p.shadow_me_mask = d["shadow_me_mask"]
    p.shadow_me_value = d["shadow_me_value"]
    p.host_gbpages = d["host_gbpages"]
    p.host_tdp_is_amd = d["host_tdp_is_amd"]
    p.tdp_ad_disabled = d["tdp_ad_disabled"]
    p.tdp_root_level = d["tdp_root_level"]
    p.max_tdp_level = d["max_tdp_level"]
    p.max_huge_page_level = d["max_huge_page_level"]
    p.ept_execonly = d["ept_execonly"]
    p.ept_huge_page_level = d["ept_huge_page_level"]
    p.ept_accessed_dirty = d["ept_accessed_dirty"]
    p.eptp_level = d["eptp_level"]
    p.root_mmu_smm = d["root_mmu_smm"]
    _precompute(p)
    return 0


cdef void _precompute(params_t *p) noexcept nogil:
    # Each TDP table slot is a bitwise function of its old value (written,
    # kept, or with the SME mask cleared), so running the builder over an
    # all-zeros and an all-ones context gives it exactly as
    # new = (old & keep) | set, with set = result on zeros and
    # keep = result on ones and not on zeros.
    cdef int level, j
    cdef uint64_t ones[10]
    cdef uint64_t bad
    for level in range(6):
        memset(p.sz_tdp[level], 0, sizeof(p.sz_tdp[level]))
        shadow_zero_tdp_compute(p.sz_tdp[level], &p.sz_tdp_bad, p, level)
        for j in range(10):
            ones[j] = ~(<uint64_t>0)
        shadow_zero_tdp_compute(ones, &bad, p, level)
        for j in range(10):
            p.sz_tdp_keep[level][j] = ones[j] & ~p.sz_tdp[level][j]
    memset(p.sz_ept, 0, sizeof(p.sz_ept))
    reset_rsvds_ept(p.sz_ept, &p.sz_ept_bad, p.reserved_hpa_bits, p.ept_execonly,
                    p.max_huge_page_level)


cdef class Params:
    """Batch-constant parameters, packed once (host, EPT config, flavor, version, variant)."""
    cdef params_t p

    def __init__(self, dict d):
        _fill_params(&self.p, d)


def layout():
    """Sizes and field offsets of the C records, for checking against the dtypes."""
    cdef guest_t g
    cdef context_t c
    cdef size_t gb = <size_t>&g, cb = <size_t>&c
    return {
        "guest": (sizeof(guest_t), {
            "cr0": <size_t>&g.cr0 - gb, "cr4": <size_t>&g.cr4 - gb, "efer": <size_t>&g.efer - gb,
            "maxphyaddr": <size_t>&g.maxphyaddr - gb, "guest_amd": <size_t>&g.guest_amd - gb,
            "guest_gbpages": <size_t>&g.guest_gbpages - gb, "smm": <size_t>&g.smm - gb,
            "guest_mode": <size_t>&g.guest_mode - gb}),
        "context": (sizeof(context_t), {
            "role": <size_t>&c.role - cb, "root_role": <size_t>&c.root_role - cb,
            "root_level": <size_t>&c.root_level - cb,
            "shadow_root_level": <size_t>&c.shadow_root_level - cb,
            "guest_rsvd": <size_t>&c.guest_rsvd - cb,
            "guest_bad_mt_xwr": <size_t>&c.guest_bad_mt_xwr - cb,
            "shadow_zero": <size_t>&c.shadow_zero - cb,
            "shadow_bad_mt_xwr": <size_t>&c.shadow_bad_mt_xwr - cb,
            "permissions": <size_t>&c.permissions - cb, "pkru_mask": <size_t>&c.pkru_mask - cb}),
    }


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(KVMMU_OPENMP)


def debug_build():
    """True when built with KVMMU_DEBUG=1 (bounds checks on, no optimisation)."""
    return bool(KVMMU_DEBUG_BUILD)


def max_threads():
    """OpenMP's default thread count (OMP_NUM_THREADS), 1 without OpenMP."""
    return kvmmu_max_threads()


cdef inline void init_fresh(context_t *dst, const guest_t *g, const params_t *p,
                            int uses_nx_arg, int stream) noexcept nogil:
    # a fresh (zeroed) context, built on the stack and then written out once
    cdef context_t tmp
    memset(&tmp, 0, sizeof(context_t))
    init_one(&tmp, g, p, 1, uses_nx_arg)
    if stream:
        kvmmu_stream_copy(dst, &tmp, sizeof(context_t))
    else:
        memcpy(dst, &tmp, sizeof(context_t))


cdef const params_t *_params_ptr(object params, params_t *scratch) except NULL:
    if isinstance(params, Params):
        return &(<Params>params).p
    _fill_params(scratch, params)
    return scratch


cdef enum:
    BLOCK = 4096             # records per OpenMP work item
    STREAM_MIN_BYTES = 8 << 20   # larger outputs are written with non-temporal stores


def init_mmu(cnp.ndarray guests, cnp.ndarray out, Py_ssize_t n, object params,
             object uses_nx, int threads, Py_ssize_t parallel_min):
    """Fresh-context init for each of n guest records into n context records.

    guests and out must be C-contiguous GUEST_DTYPE / CONTEXT_DTYPE arrays of
    n records (checked by kvmmu.engine); uses_nx is None or n uint8 values.
    """
    cdef params_t scratch
    cdef const params_t *p
    cdef Py_ssize_t i
    cdef const guest_t *g
    cdef context_t *c
    cdef const uint8_t *nxa = NULL
    cdef int stream
    cdef Py_ssize_t b, nblocks
    if n == 0:
        return
    p = _params_ptr(params, &scratch)
    if uses_nx is not None:
        nxa = <const uint8_t *>cnp.PyArray_DATA(<cnp.ndarray>uses_nx)
    g = <const guest_t *>cnp.PyArray_DATA(guests)
    c = <context_t *>cnp.PyArray_DATA(out)
    stream = n * <Py_ssize_t>sizeof(context_t) >= STREAM_MIN_BYTES
    nblocks = (n + BLOCK - 1) // BLOCK
    if threads > 1 and n >= parallel_min and KVMMU_OPENMP:
        for b in prange(nblocks, nogil=True, num_threads=threads, schedule="dynamic"):
            init_block(c, g, p, nxa, b * BLOCK, min(n, (b + 1) * BLOCK), stream)
    else:
        with nogil:
            init_block(c, g, p, nxa, 0, n, stream)


cdef void init_block(context_t *c, const guest_t *g, const params_t *p, const uint8_t *nxa,
                     Py_ssize_t start, Py_ssize_t end, int stream) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(start, end):
        init_fresh(&c[i], &g[i], p, nxa[i] if nxa != NULL else 0, stream)
    if stream:
        kvmmu_sfence()   # order this thread's non-temporal stores before returning


def replay(const uint8_t[::1] guests, uint8_t[::1] out, Py_ssize_t n, dict params,
           const uint8_t[::1] uses_nx, int force, const uint8_t[::1] invalidate,
           const int64_t[::1] slot, uint8_t[::1] states, Py_ssize_t nslots,
           uint8_t[::1] recomputed):
    """Sequential inits on persistent contexts.

    ``states`` holds ``nslots`` context records (one per vCPU), updated in
    place; step i uses context ``slot[i]`` and its result is copied to
    ``out[i]``. Invalidation is kvm_mmu_after_set_cpuid(): clear ext.valid,
    and in v6 also mark root_role invalid.
    """
    cdef params_t p
    cdef Py_ssize_t i
    cdef const guest_t *g
    cdef context_t *c
    cdef context_t *st
    cdef context_t *cur
    cdef int has_nx = uses_nx.shape[0] > 0
    cdef int has_inv = invalidate.shape[0] > 0
    cdef int has_slot = slot.shape[0] > 0
    cdef int total = 0
    if n == 0:
        return 0
    _fill_params(&p, params)
    g = <const guest_t *>&guests[0]
    c = <context_t *>&out[0] if out.shape[0] > 0 else NULL   # no per-step copies wanted
    st = <context_t *>&states[0]
    with nogil:
        for i in range(n):
            cur = &st[slot[i] if has_slot else 0]
            if has_inv and invalidate[i]:
                cur.role &= ~(<uint64_t>1 << EXT)
                if p.version == 1:
                    cur.root_role |= <uint32_t>1 << B_INVALID
            recomputed[i] = <uint8_t>init_one(cur, &g[i], &p, force, uses_nx[i] if has_nx else 0)
            total += recomputed[i]
            if c != NULL:
                memcpy(&c[i], cur, sizeof(context_t))
    return total


def roles(const uint8_t[::1] guests, uint64_t[::1] role_out, uint32_t[::1] root_out,
          Py_ssize_t n, dict params):
    """Only the role words (fresh-context init), for user-defined variants."""
    cdef params_t p
    cdef Py_ssize_t i
    cdef const guest_t *g
    cdef context_t c
    if n == 0:
        return
    _fill_params(&p, params)
    g = <const guest_t *>&guests[0]
    with nogil:
        for i in range(n):
            c.role = 0
            c.root_role = 0
            init_one(&c, &g[i], &p, 1, 0)
            role_out[i] = c.role
            root_out[i] = c.root_role


def reset_rsvds_bits_mask(const int64_t[::1] level, const uint64_t[::1] pa_bits_rsvd,
                          const uint8_t[::1] nx, const uint8_t[::1] gbpages,
                          const uint8_t[::1] pse, const uint8_t[::1] amd,
                          uint64_t[:, ::1] masks, uint64_t[::1] bad):
    """__reset_rsvds_bits_mask over flat, equally long arrays (masks: n x 10)."""
    cdef Py_ssize_t i, n = level.shape[0]
    with nogil:
        for i in range(n):
            reset_rsvds_legacy(&masks[i, 0], &bad[i], <int>level[i], pa_bits_rsvd[i],
                               nx[i] != 0, gbpages[i] != 0, pse[i] != 0, amd[i] != 0)


def reset_rsvds_bits_mask_ept(const uint64_t[::1] pa_bits_rsvd, const uint8_t[::1] execonly,
                              const int64_t[::1] huge_page_level,
                              uint64_t[:, ::1] masks, uint64_t[::1] bad):
    """__reset_rsvds_bits_mask_ept over flat, equally long arrays (masks: n x 10)."""
    cdef Py_ssize_t i, n = pa_bits_rsvd.shape[0]
    with nogil:
        for i in range(n):
            reset_rsvds_ept(&masks[i, 0], &bad[i], pa_bits_rsvd[i], execonly[i] != 0,
                            <int>huge_page_level[i])


def rsvd_bits_array(const int64_t[::1] s, const int64_t[::1] e, uint64_t[::1] out):
    """rsvd_bits(s, e) elementwise (s in 0..255, e any int)."""
    cdef Py_ssize_t i, n = s.shape[0]
    with nogil:
        for i in range(n):
            out[i] = rsvd_bits(<int>s[i], <int>(e[i] & 63))


def permission_bitmask(const uint8_t[::1] key, const uint8_t[::1] ept, uint8_t[:, ::1] out):
    """update_permission_bitmask; key = nx | wp<<1 | smep<<2 | smap<<3."""
    cdef Py_ssize_t i, n = key.shape[0]
    with nogil:
        for i in range(n):
            if ept[i]:
                memcpy(&out[i, 0], PERM_EPT, 16)
            else:
                memcpy(&out[i, 0], PERM_LUT[key[i] & 15], 16)


def pkru_bitmask(const uint8_t[::1] key, uint32_t[::1] out):
    """update_pkru_bitmask; key = pke | wp<<1."""
    cdef Py_ssize_t i, n = key.shape[0]
    with nogil:
        for i in range(n):
            out[i] = PKRU_LUT[key[i] & 3]


def bare_compare_loop(const uint64_t[::1] roles):
    """Count steps whose role equals the previous one: the floor of a guard skip."""
    cdef Py_ssize_t i, n = roles.shape[0]
    cdef uint64_t cached = 0
    cdef Py_ssize_t same = 0
    with nogil:
        for i in range(n):
            if roles[i] == cached:
                same += 1
            else:
                cached = roles[i]
    return same


cdef inline uint64_t mix64(uint64_t h, uint64_t x) noexcept nogil:
    # splitmix64-style finaliser over h ^ x
    h ^= x
    h *= <uint64_t>0xBF58476D1CE4E5B9
    h ^= h >> 31
    h *= <uint64_t>0x94D049BB133111EB
    h ^= h >> 29
    return h


def hash_records(const uint8_t[::1] recs, Py_ssize_t n, Py_ssize_t itemsize,
                 const uint64_t[::1] word_mask, uint64_t[::1] out):
    """64-bit hash per record of the 8-byte words selected by word_mask (AND-ed in)."""
    cdef Py_ssize_t i, w, nw = word_mask.shape[0]
    cdef const uint64_t *p
    cdef uint64_t h
    if n == 0:
        return
    with nogil:
        for i in range(n):
            p = <const uint64_t *>&recs[i * itemsize]
            h = <uint64_t>0x9E3779B97F4A7C15
            for w in range(nw):
                if word_mask[w]:
                    h = mix64(h, p[w] & word_mask[w])
            out[i] = h


def records_equal_to(const uint8_t[::1] recs, Py_ssize_t n, Py_ssize_t itemsize,
                     const uint64_t[::1] word_mask, const int64_t[::1] rep):
    """True when every record equals record rep[i] on the words of word_mask."""
    cdef Py_ssize_t i, w, nw = word_mask.shape[0]
    cdef const uint64_t *p
    cdef const uint64_t *q
    cdef int ok = 1
    if n == 0:
        return True
    with nogil:
        for i in range(n):
            p = <const uint64_t *>&recs[i * itemsize]
            q = <const uint64_t *>&recs[rep[i] * itemsize]
            for w in range(nw):
                if (p[w] ^ q[w]) & word_mask[w]:
                    ok = 0
                    break
            if not ok:
                break
    return bool(ok)


include "_access.pxi"
