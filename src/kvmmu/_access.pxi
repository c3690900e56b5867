# Access verdicts (guest walk + permission_fault); included by _core.pyx.
#
# One guest page walk per access, judged the way KVM's guest walker judges it
# (FNAME(walk_addr_generic) in arch/x86/kvm/mmu/paging_tmpl.h, with
# permission_fault() from arch/x86/kvm/mmu.h), on the tables of a context that
# init_one() computed for the access's own (cr0, cr4, efer, CPUID) state. The
# code is our own formulation of those rules; no kernel code is copied.
#
# Python-side validation (kvmmu.access / kvmmu.accessc) guarantees: pfec only
# has W/U/FETCH bits, flavor is not shadow_ept, and no record has
# CR0.PG=1, EFER.LMA=1, CR4.PAE=0.

from libc.stdint cimport uint16_t

# Error-code bits not named in _core.pyx.
cdef enum:
    PF_PRESENT = 1
    PF_PK = 32

# Verdict kinds (ACCESS_RESULT_DTYPE.kind).
cdef enum:
    K_OK = 0
    K_NOT_PRESENT = 1
    K_RSVD = 2
    K_PERM = 3
    K_PKEY = 4
    K_PERM_PKEY = 5

# Guest entry bits.
cdef enum:
    GP_P = 1
    GP_W = 2
    GP_U = 4
    GP_A = 0x20
    GP_D = 0x40
    GP_PS = 0x80

# Record layouts (must match kvmmu.access.ACCESS_DTYPE / ACCESS_RESULT_DTYPE;
# access_layout() lets Python verify).
ctypedef struct access_t:
    uint64_t cr0
    uint64_t cr4
    uint64_t efer
    uint8_t maxphyaddr
    uint8_t guest_amd
    uint8_t guest_gbpages
    uint32_t pkru
    uint8_t pfec
    uint8_t smap_override
    uint64_t gpte[5]

ctypedef struct access_result_t:
    uint8_t fault
    uint16_t error_code
    uint8_t level
    uint8_t kind
    uint64_t gpte_after[5]

# What the walker reads from a context, flattened for the inner loop.
ctypedef struct walk_ctx_t:
    uint64_t rsvd[2][5]       # guest_rsvd_check.rsvd_bits_mask
    uint32_t pkru_mask
    uint8_t perms[16]         # permissions[]
    uint8_t root_level        # 0: paging off
    uint8_t pte64             # paging64 walker (PAE / long mode) vs paging32
    uint8_t pse               # role ext.cr4_pse (paging32's leaf rule)
    uint8_t fetch_ec          # role efer_nx || ext.cr4_smep: FETCH reported


cdef inline void walk_ctx_from(walk_ctx_t *w, const context_t *c, int version) noexcept nogil:
    cdef uint64_t role = c.role
    memcpy(w.rsvd, c.guest_rsvd, sizeof(w.rsvd))
    memcpy(w.perms, c.permissions, 16)
    w.pkru_mask = c.pkru_mask
    w.root_level = c.root_level
    # The paging64 walker runs whenever CR4.PAE is set (the caller excludes
    # long mode without PAE), i.e. for guest levels 3, 4 and 5.
    w.pte64 = c.root_level >= 3
    if version == 0:
        # v5.17 ext: cr4_pse bit 4, cr4_smep bit 7
        w.pse = (role >> (EXT + 4)) & 1
        w.fetch_ec = ((role >> B_EFER_NX) | (role >> (EXT + 7))) & 1
    else:
        # v6.16 ext: cr4_pse bit 2, cr4_smep bit 5
        w.pse = (role >> (EXT + 2)) & 1
        w.fetch_ec = ((role >> B_EFER_NX) | (role >> (EXT + 5))) & 1


# What the table walk leaves for the judgement of an access: it does not
# depend on the access type, nor on the entries' A/D bits (never reserved in
# the x86 formats walked here), so one walk can serve several accesses.
ctypedef struct walk_state_t:
    uint64_t pte_access       # AND over the walked entries, NX inverted
    uint64_t leaf             # the last entry read
    int level                 # leaf level, or the level that faulted
    int max_level             # first level walked (A/D update range)
    int errcode               # 0, or the walk's fault: 0 (not present) / RSVD|P
    int kind                  # K_OK, K_NOT_PRESENT or K_RSVD


cdef inline void walk_tables(const walk_ctx_t *w, const uint64_t *gin, walk_state_t *st,
                             int pte64) noexcept nogil:
    # FNAME(walk_addr_generic) up to the leaf: gin[level-1] is the entry met
    # at each level. pte64 selects paging64 (1) or paging32 (0).
    cdef int level = w.root_level
    cdef uint64_t nx_mask = (<uint64_t>1 << 63) if pte64 else 0
    cdef uint64_t pte = 0, pte_access = ~(<uint64_t>0)
    st.errcode = 0
    st.kind = K_OK
    if level == 3:
        # PAE: the PDPTE comes from the PDPTR registers that load_pdptrs()
        # validated; the walk only tests P and starts one level down.
        if not (gin[2] & GP_P):
            st.kind = K_NOT_PRESENT
            st.level = 3
            return
        level = 2
    st.max_level = level
    while True:
        pte = gin[level - 1]
        if not pte64:
            pte &= <uint64_t>0xFFFFFFFF           # 32-bit entries
        # inverting NX lets it be ANDed like the other permission bits
        pte_access &= pte ^ nx_mask
        if not (pte & GP_P):
            st.kind = K_NOT_PRESENT
            break
        if pte & w.rsvd[(pte >> 7) & 1][level - 1]:
            st.errcode = PF_RSVD | PF_PRESENT
            st.kind = K_RSVD
            break
        # FNAME(is_last_gpte): level 1 always ends the walk; bit 7 ends it
        # above, except that 32-bit paging honours it only at level 2 with
        # CR4.PSE.
        if level == 1:
            break
        if pte & GP_PS:
            if pte64 or (level == 2 and w.pse):
                break
        level -= 1
    st.level = level
    st.leaf = pte
    st.pte_access = pte_access


cdef inline void judge(const walk_ctx_t *w, const walk_state_t *st, const uint64_t *gin,
                       int pfec, int smap_override, uint32_t pkru, access_result_t *r,
                       int pte64) noexcept nogil:
    # permission_fault() on the walk's leaf, the walker's error exit, and
    # FNAME(update_accessed_dirty_bits) on success. r.gpte_after starts as gin.
    cdef uint64_t nx_mask = (<uint64_t>1 << 63) if pte64 else 0
    cdef uint64_t v
    cdef uint32_t acc, pkey, pkru_bits, offset
    cdef int perm, pk = 0, errcode, kind, i
    memcpy(r.gpte_after, gin, 5 * sizeof(uint64_t))
    if st.kind == K_OK:
        # FNAME(gpte_access): W and U as ANDed, X = no NX anywhere (P is 1)
        v = st.pte_access ^ nx_mask
        acc = <uint32_t>((v & 7) ^ (v >> 63))
        # the SMAP override takes the PFERR_RSVD position of the index
        perm = (w.perms[(pfec | (smap_override << 3)) >> 1] >> acc) & 1
        if w.pkru_mask:
            pkey = <uint32_t>((st.leaf >> 59) & 15) if pte64 else 0
            pkru_bits = (pkru >> (pkey * 2)) & 3
            # the PFERR_RSVD position of the offset stands for the leaf's U bit
            offset = <uint32_t>(pfec & ~1) | ((acc & GP_U) << 1)
            pkru_bits &= w.pkru_mask >> offset
            pk = pkru_bits != 0
        if not (perm or pk):
            # A on every walked entry and D on a written leaf, unless they
            # are all set already
            v = st.pte_access & GP_A
            if pfec & PF_WRITE:
                v &= st.leaf >> 1
            if not v:
                i = st.max_level
                while i >= st.level:
                    r.gpte_after[i - 1] |= GP_A
                    i -= 1
                if pfec & PF_WRITE:
                    r.gpte_after[st.level - 1] |= GP_D
            r.fault = 0
            r.error_code = 0
            r.level = <uint8_t>st.level
            r.kind = K_OK
            return
        errcode = PF_PRESENT | (PF_PK if pk else 0)
        kind = K_PERM_PKEY if (perm and pk) else (K_PERM if perm else K_PKEY)
    else:
        errcode = st.errcode
        kind = st.kind
    # the walker's error exit: the access's W/U bits always, FETCH only when
    # the role has EFER.NX or CR4.SMEP
    errcode |= pfec & (PF_WRITE | PF_USER)
    if (pfec & PF_FETCH) and w.fetch_ec:
        errcode |= PF_FETCH
    r.fault = 1
    r.error_code = <uint16_t>errcode
    r.level = <uint8_t>st.level
    r.kind = <uint8_t>kind


cdef inline void walk_one(const walk_ctx_t *w, const uint64_t *gin, int pfec, int smap_override,
                          uint32_t pkru, access_result_t *r) noexcept nogil:
    # One access: the walk, then its judgement. Paging off: no walk, no fault
    # (nonpaging_gva_to_gpa).
    cdef walk_state_t st
    if w.root_level == 0:
        memcpy(r.gpte_after, gin, 5 * sizeof(uint64_t))
        r.fault = 0
        r.error_code = 0
        r.level = 0
        r.kind = K_OK
        return
    if w.pte64:
        walk_tables(w, gin, &st, 1)
        judge(w, &st, gin, pfec, smap_override, pkru, r, 1)
    else:
        walk_tables(w, gin, &st, 0)
        judge(w, &st, gin, pfec, smap_override, pkru, r, 0)


cdef inline int same_state(const access_t *a, const access_t *b) noexcept nogil:
    return (a.cr0 == b.cr0 and a.cr4 == b.cr4 and a.efer == b.efer
            and a.maxphyaddr == b.maxphyaddr and a.guest_amd == b.guest_amd
            and a.guest_gbpages == b.guest_gbpages)


cdef void verdict_block(const access_t *a, access_result_t *r, Py_ssize_t start, Py_ssize_t end,
                        const params_t *p) noexcept nogil:
    # One context per distinct state: consecutive accesses with the same
    # (cr0, cr4, efer, CPUID) reuse the last init.
    cdef guest_t g
    cdef context_t c
    cdef walk_ctx_t w
    cdef Py_ssize_t i, last = -1
    memset(&g, 0, sizeof(guest_t))
    for i in range(start, end):
        if last < 0 or not same_state(&a[i], &a[last]):
            g.cr0 = a[i].cr0
            g.cr4 = a[i].cr4
            g.efer = a[i].efer
            g.maxphyaddr = a[i].maxphyaddr
            g.guest_amd = a[i].guest_amd
            g.guest_gbpages = a[i].guest_gbpages
            memset(&c, 0, sizeof(context_t))
            init_one(&c, &g, p, 1, 0)
            walk_ctx_from(&w, &c, p.version)
            last = i
        walk_one(&w, a[i].gpte, a[i].pfec, a[i].smap_override, a[i].pkru, &r[i])


def access_layout():
    """Sizes and field offsets of the access records, for checking against the dtypes."""
    cdef access_t a
    cdef access_result_t r
    cdef size_t ab = <size_t>&a, rb = <size_t>&r
    return {
        "access": (sizeof(access_t), {
            "cr0": <size_t>&a.cr0 - ab, "cr4": <size_t>&a.cr4 - ab, "efer": <size_t>&a.efer - ab,
            "maxphyaddr": <size_t>&a.maxphyaddr - ab, "guest_amd": <size_t>&a.guest_amd - ab,
            "guest_gbpages": <size_t>&a.guest_gbpages - ab, "pkru": <size_t>&a.pkru - ab,
            "pfec": <size_t>&a.pfec - ab, "smap_override": <size_t>&a.smap_override - ab,
            "gpte": <size_t>&a.gpte - ab}),
        "result": (sizeof(access_result_t), {
            "fault": <size_t>&r.fault - rb, "error_code": <size_t>&r.error_code - rb,
            "level": <size_t>&r.level - rb, "kind": <size_t>&r.kind - rb,
            "gpte_after": <size_t>&r.gpte_after - rb}),
    }


def access_verdicts(const uint8_t[::1] acc, uint8_t[::1] out, Py_ssize_t n, dict params,
                    int threads, Py_ssize_t parallel_min):
    """Verdict of each of n access records into n result records."""
    cdef params_t p
    cdef const access_t *a
    cdef access_result_t *r
    cdef Py_ssize_t b, nblocks, bs = 4096, hi
    if n == 0:
        return
    _fill_params(&p, params)
    a = <const access_t *>&acc[0]
    r = <access_result_t *>&out[0]
    nblocks = (n + bs - 1) // bs
    if threads > 1 and n >= parallel_min and KVMMU_OPENMP:
        for b in prange(nblocks, nogil=True, num_threads=threads, schedule="dynamic"):
            hi = (b + 1) * bs
            if hi > n:
                hi = n
            verdict_block(a, r, b * bs, hi, &p)
    else:
        with nogil:
            verdict_block(a, r, 0, n, &p)


# ---------------------------------------------------------------------------
# kvm-unit-tests x86/access.c flag words, built into walks on the fly.
# Bit positions are access.c's (see docs/access-c-model.md).

cdef enum:
    AC_PTE_W = 0
    AC_PTE_U = 1
    AC_PTE_A = 2
    AC_PTE_D = 3
    AC_PTE_NX = 4
    AC_PTE_P = 5
    AC_PTE_51 = 6
    AC_PTE_36 = 7
    AC_PDE_W = 8
    AC_PDE_U = 9
    AC_PDE_A = 10
    AC_PDE_D = 11
    AC_PDE_PSE = 12
    AC_PDE_NX = 13
    AC_PDE_P = 14
    AC_PDE_51 = 15
    AC_PDE_36 = 16
    AC_PDE_13 = 17
    AC_PDPTE_RO = 18
    AC_PKU_AD = 19
    AC_PKU_WD = 20
    AC_PKEY = 21
    AC_USER = 22
    AC_WRITE = 23
    AC_FETCH = 24
    AC_TWICE = 25
    AC_EFER_NX = 26
    AC_CR0_WP = 27
    AC_CR4_SMEP = 28
    AC_CR4_PKE = 29
    AC_FEP = 30

# Where access.c puts things: code/data page at 32 MiB, page tables from 33 MiB.
cdef enum:
    AC_DATA = 0x2000000
    AC_TABLES = 0x2100000


ctypedef struct ac_space_t:
    walk_ctx_t ws[16]         # the 16 CPU states: efer.nx | cr0.wp<<1 | cr4.smep<<2 | cr4.pke<<3
    uint64_t pte[256]         # PTE from flag bits 0..7 (no key)
    uint64_t pde[1024]        # PDE from flag bits 8..17 (no key)
    uint64_t top[5]           # PML5E, PML4E, PDPTE (W added unless pdpte.ro)
    uint8_t pfec[8]           # error code of user | write<<1 | fetch<<2
    int levels


cdef void ac_space_init(ac_space_t *s, int maxphyaddr, int levels, const params_t *p) noexcept nogil:
    # The walks ac_test_setup_ptes() builds, tabulated per half of the flag
    # word, and one init_one() context per CPU state of the space.
    cdef guest_t g
    cdef context_t c
    cdef int k
    cdef uint32_t f
    cdef uint64_t e, table
    memset(&g, 0, sizeof(guest_t))
    g.maxphyaddr = <uint8_t>maxphyaddr
    g.guest_gbpages = 1
    for k in range(16):
        g.cr0 = (<uint64_t>1 << CR0_PG) | 0x11 | (<uint64_t>((k >> 1) & 1) << CR0_WP)
        g.cr4 = ((<uint64_t>1 << CR4_PAE) | (<uint64_t>(levels == 5) << CR4_LA57)
                 | (<uint64_t>((k >> 2) & 1) << CR4_SMEP) | (<uint64_t>((k >> 3) & 1) << CR4_PKE))
        g.efer = 0x500 | (<uint64_t>(k & 1) << EFER_NX)
        memset(&c, 0, sizeof(context_t))
        init_one(&c, &g, p, 1, 0)
        walk_ctx_from(&s.ws[k], &c, p.version)
    s.levels = levels
    for k in range(8):
        s.pfec[k] = <uint8_t>(((k & 1) * PF_USER) | (((k >> 1) & 1) * PF_WRITE)
                              | (((k >> 2) & 1) * PF_FETCH))
    memset(s.top, 0, sizeof(s.top))
    if levels == 5:
        s.top[4] = AC_TABLES | 7
        s.top[3] = (AC_TABLES + 0x1000) | 7
        s.top[2] = (AC_TABLES + 0x2000) | 5
        table = AC_TABLES + 0x3000
    else:
        s.top[3] = AC_TABLES | 7
        s.top[2] = (AC_TABLES + 0x1000) | 5
        table = AC_TABLES + 0x2000
    for f in range(256):
        e = AC_DATA
        e |= <uint64_t>((f >> AC_PTE_P) & 1)
        e |= <uint64_t>((f >> AC_PTE_W) & 1) << 1
        e |= <uint64_t>((f >> AC_PTE_U) & 1) << 2
        e |= <uint64_t>((f >> AC_PTE_A) & 1) << 5
        e |= <uint64_t>((f >> AC_PTE_D) & 1) << 6
        e |= <uint64_t>((f >> AC_PTE_NX) & 1) << 63
        e |= <uint64_t>((f >> AC_PTE_51) & 1) << 51
        e |= <uint64_t>((f >> AC_PTE_36) & 1) << 36
        s.pte[f] = e
    for f in range(1024):
        # f holds flag bits 8..17
        e = (AC_DATA | GP_PS) if (f >> (AC_PDE_PSE - 8)) & 1 else table
        e |= <uint64_t>((f >> (AC_PDE_P - 8)) & 1)
        e |= <uint64_t>((f >> (AC_PDE_W - 8)) & 1) << 1
        e |= <uint64_t>((f >> (AC_PDE_U - 8)) & 1) << 2
        e |= <uint64_t>((f >> (AC_PDE_A - 8)) & 1) << 5
        e |= <uint64_t>((f >> (AC_PDE_D - 8)) & 1) << 6
        e |= <uint64_t>((f >> (AC_PDE_NX - 8)) & 1) << 63
        e |= <uint64_t>((f >> (AC_PDE_51 - 8)) & 1) << 51
        e |= <uint64_t>((f >> (AC_PDE_36 - 8)) & 1) << 36
        e |= <uint64_t>((f >> (AC_PDE_13 - 8)) & 1) << 13
        s.pde[f] = e


cdef inline void ac_one(uint32_t f, const ac_space_t *s, access_result_t *r) noexcept nogil:
    # Build the walk of flag word f (ac_test_setup_ptes) and judge the access;
    # with twice, a supervisor read goes first and its A/D updates carry over.
    # access.c always runs in long mode (4 or 5 levels), so the paging64
    # walker applies and paging is on.
    cdef uint64_t g[5]
    cdef walk_state_t st
    cdef uint64_t key = (<uint64_t>(f >> AC_PKEY) & 1) << 59
    cdef int pse = (f >> AC_PDE_PSE) & 1
    cdef const walk_ctx_t *w = &s.ws[(f >> AC_EFER_NX) & 15]
    # user/write/fetch (flag bits 22..24) as an error code
    cdef int pfec = s.pfec[(f >> AC_USER) & 7]
    cdef uint32_t pkru
    # With CR4.PKE: key 0 open, key 1 AD/WD from the flags (bits 19/20 to
    # PKRU bits 2/3), key 2 AD=WD=1. Without: what set_cr4_pke(0) leaves
    # (0xfffffffc); unused then.
    if (f >> AC_CR4_PKE) & 1:
        pkru = 0x30 | ((f >> (AC_PKU_AD - 2)) & 0xC)
    else:
        pkru = 0xFFFFFFFC
    g[4] = s.top[4]
    g[3] = s.top[3]
    g[2] = s.top[2] | ((<uint64_t>(~f >> AC_PDPTE_RO) & 1) << 1)
    # leaf key 1; key 2 on a non-leaf PDE (which the walk must ignore)
    g[1] = s.pde[(f >> 8) & 1023] | (key << (1 - pse))
    g[0] = 0 if pse else (s.pte[f & 255] | key)
    walk_tables(w, g, &st, 1)
    if (f >> AC_TWICE) & 1:
        # The supervisor read first. Its only effect on the access under
        # test is the A bits it sets on success: on the same walk (A/D bits
        # change neither presence, reserved bits nor the leaf), every walked
        # entry then has A.
        judge(w, &st, g, 0, 0, pkru, r, 1)
        if not r.fault:
            memcpy(g, r.gpte_after, sizeof(g))
            st.pte_access |= GP_A
            st.leaf |= GP_A
    judge(w, &st, g, pfec, 0, pkru, r, 1)


def accessc_verdicts(const uint32_t[::1] flags, uint8_t[::1] out, Py_ssize_t n, int maxphyaddr,
                     int levels, dict params, int threads, Py_ssize_t parallel_min):
    """Verdict of each access.c flag word (twice handled) into n result records."""
    cdef params_t p
    cdef ac_space_t s
    cdef access_result_t *r
    cdef const uint32_t *fl
    cdef Py_ssize_t i
    if n == 0:
        return
    _fill_params(&p, params)
    ac_space_init(&s, maxphyaddr, levels, &p)
    r = <access_result_t *>&out[0]
    fl = &flags[0]
    if threads > 1 and n >= parallel_min and KVMMU_OPENMP:
        # dynamic: on a shared machine one thread may get less CPU than the other
        for i in prange(n, nogil=True, num_threads=threads, schedule="dynamic",
                        chunksize=16384):
            ac_one(fl[i], &s, &r[i])
    else:
        with nogil:
            for i in range(n):
                ac_one(fl[i], &s, &r[i])
