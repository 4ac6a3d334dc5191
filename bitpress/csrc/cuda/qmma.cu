// bitpress tensor-core W2 / W3 / W4 GEMV-GEMM for batch 1..64 (sm_80+, tuned for sm_90).
//
// Weights: the fragment-ordered layout of bitpress/kernels/gpu_layout.py (read its docstring):
//   qw  u32 [tiles][chunks][32 lanes][4]  one 16-byte A-operand vector per lane per chunk
//   q1  u32 [tiles][chunks][32 lanes][2]  W3 only: the high-bit plane
//   sz  [tiles][groups][16][2]            (scale, zero) per row and group, fp16 (ST 0) / fp32 (ST 1)
// Activations x [M][K] fp16 (XT 0) / bf16 (XT 1), row-major, K % 4 == 0, 8-byte aligned;
// bias fp32 [N] or null;
// y [M][N] in x's dtype.
//
// Swap-AB mma.m16n8k16: the 16 weight rows of a tile are the A operand (row-major 16x16),
// x^T is the B operand (16 k x 8 batch rows), batch tile j covers x rows 8j..8j+7 (NT tiles).
// Dequant: lop3(w >> shift, mask, magic) gives (magic + u) as an fp16/bf16 pair (exact), and
// fma(v, 1, -(magic + 2^(b-1))) the signed code, exact. The mma multiplies codes by x exactly
// into fp32 (D); a second mma against an all-ones A gives X = sum of x. At each group end the
// lane applies acc += s * D + z * X for its two rows.
//
// Work split (stream-K): units = tiles * chunks; CTA b takes the contiguous unit range
// [u0, u1) (q = units / G, the first units % G CTAs one more). Inside a CTA the chunks of each
// tile go round-robin to the 8 warps; each warp streams its chunks through a private cp.async
// ring (L2 evict_first) that runs ahead across tiles. Warp sums are added into shared memory
// in warp order. A tile held whole by one CTA is written directly (bias added, cast fused). A
// tile split across CTAs: every contributor writes its fp32 partial into its own workspace
// slot (slot 0: the tile holds the CTA's first unit, else 1), fences, and bumps the tile's
// counter; the last to arrive sums the slots in CTA order (deterministic), writes y and
// re-zeroes the counter: no memset per call (the counters are zeroed once, at plan time).
//
// Group-sparse: tiles of up to 16 kept rows of one 128-row block sharing one group column;
// CTAs take equal tile counts (whatever the mask's skew); a warp takes whole tiles, 8 tiles a
// round; the round's results are added into a shared [128 rows][batch] block sum in warp order
// (deterministic), flushed like a dense tile (block split across CTAs: workspace slots +
// counters per block). Blocks with no tile are written (bias or 0) by CTA b % G.
//
// No CUDA headers: every conversion is inline PTX, so NVRTC (CuPy RawModule) and nvcc both
// compile it. Entry points: bitpress_qmma_w{2,3,4}_x{0,1}_s{0,1}_n{1,2,4,8} (dense) and
// bitpress_qmma_sparse_w{2,3,4}_x{0,1}_s{0,1}_n{1,2,4,8}.

typedef unsigned int u32;
typedef unsigned short u16;

#define BP_WARPS 8
#define BP_THREADS 256
#define BP_ROW_BLOCK 128

namespace bp {

template <int V> struct IC { static constexpr int value = V; };

template <int XT> struct Magic;
template <> struct Magic<0> {  // fp16: 0x6400 = 1024.0
    static constexpr u32 MAGIC = 0x64006400u, ONE = 0x3c003c00u;
    static constexpr u32 NEG2 = 0xE402E402u, NEG3 = 0xE404E404u, NEG4 = 0xE408E408u;
};
template <> struct Magic<1> {  // bf16: 0x4300 = 128.0
    static constexpr u32 MAGIC = 0x43004300u, ONE = 0x3f803f80u;
    static constexpr u32 NEG2 = 0xC302C302u, NEG3 = 0xC304C304u, NEG4 = 0xC308C308u;
};

__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 b, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

template <int XT> __device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
    if constexpr (XT == 0)
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    else
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

template <int XT> __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0,
                                                      u32 b1) {
    if constexpr (XT == 0)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// one k16 step of a lane's vector -> its 4 A registers (signed codes in x's dtype)
template <int BITS, int XT, int S>
__device__ __forceinline__ void dequant(const u32 (&v)[4], const u32 (&p)[2], u32 (&a)[4]) {
    using M = Magic<XT>;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        if constexpr (BITS == 4) {
            a[r] = fma2<XT>(lop3_and_or(v[S] >> (4 * r), 0x000f000fu, M::MAGIC), M::ONE, M::NEG4);
        } else if constexpr (BITS == 2) {
            const int j = 4 * (S & 1) + r;
            a[r] = fma2<XT>(lop3_and_or(v[S >> 1] >> (2 * j), 0x00030003u, M::MAGIC), M::ONE,
                            M::NEG2);
        } else {
            const int j = 4 * (S & 1) + r, j1 = 4 * (S & 3) + r;
            u32 t = lop3_and_or(v[S >> 1] >> (2 * j), 0x00030003u, M::MAGIC);
            t |= ((p[S >> 2] >> j1) << 2) & 0x00040004u;
            a[r] = fma2<XT>(t, M::ONE, M::NEG3);
        }
    }
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ u16 f2bf(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
template <int XT> __device__ __forceinline__ u16 f2x(float f) {
    if constexpr (XT == 0) return f2h(f); else return f2bf(f);
}
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// (scale, zero) of one row and group
template <int ST> __device__ __forceinline__ void load_sz(const void* sz, long idx, float& s,
                                                         float& z) {
    if constexpr (ST == 0) {
        u32 w = __ldg(reinterpret_cast<const u32*>(sz) + idx);
        s = h2f((u16)(w & 0xffffu));
        z = h2f((u16)(w >> 16));
    } else {
        float2 w = __ldg(reinterpret_cast<const float2*>(sz) + idx);
        s = w.x;
        z = w.y;
    }
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, unsigned long long pol) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "l"(pol));
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
__device__ __forceinline__ unsigned long long evict_first_policy() {
    unsigned long long pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    return pol;
}

// x^T B fragment of one k16 step. The layout permutes k inside the step (mma-k 2t, 2t+1, 2t+8,
// 2t+9 = input 4t .. 4t+3), so a lane's four B values are one 8-byte load:
// b0 = x[n][k+4t, k+4t+1], b1 = x[n][k+4t+2, k+4t+3]. K and klim are multiples of 4.
// ORDERED (the 32- and 64-row variants): an asm volatile load stays in program order with the
// (volatile) mma, so the compiler cannot hoist every x load of a chunk ahead of the mmas
// (which needs ~250 registers at 8 batch tiles and spills).
template <bool ORDERED = false>
__device__ __forceinline__ void load_b(const u16* __restrict__ x, int n, int M, int K, int k,
                                       int klim, int t, u32& b0, u32& b1) {
    b0 = 0u;
    b1 = 0u;
    const int k0 = k + 4 * t;
    if (n < M && k0 < klim) {
        const u16* p = x + (long)n * K + k0;
        if constexpr (ORDERED) {
            asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(b0), "=r"(b1) : "l"(p));
        } else {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
            b0 = v.x;
            b1 = v.y;
        }
    }
}

struct Split {  // the stream-K partition of `units` over gridDim.x CTAs
    int q, r;
    __device__ __forceinline__ Split(int units, int ctas) : q(units / ctas), r(units % ctas) {}
    __device__ __forceinline__ int lo(int b) const { return b * q + min(b, r); }
    __device__ __forceinline__ int hi(int b) const { return lo(b) + q + (b < r ? 1 : 0); }
    __device__ __forceinline__ int cta_of(int u) const {
        const int big = r * (q + 1);
        return u < big ? u / (q + 1) : r + (u - big) / q;
    }
};

// A warp's private ring of STAGES weight chunks in shared memory, filled by cp.async (L2
// evict_first): a slot holds each lane's 16-byte A vector (`v`; W3: and its 8-byte high-bit
// plane, `p`). The kernel's producer `issue(slot)` fetches its next chunk (if any) into the
// slot and commits; the consumer takes the chunks in that order, item 0, 1, ...
template <int BITS, int STAGES> struct WarpRing {
    u32 (&v)[STAGES][32][4];
    u32 (&p)[STAGES][32][2];
    int lane;
    unsigned long long pol;
    int item;  // the consumer's next chunk

    // the prologue: the first STAGES - 1 chunks in flight
    template <class Issue> __device__ __forceinline__ void prime(Issue&& issue) const {
#pragma unroll
        for (int i = 0; i < STAGES - 1; ++i) issue(i);
    }
    // start copying chunk `unit` (qw / q1 in the layout's unit order) into `slot`
    __device__ __forceinline__ void fetch(int slot, const u32* __restrict__ qw,
                                          const u32* __restrict__ q1, long unit) const {
        cp_async16(&v[slot][lane][0], qw + (unit * 32 + lane) * 4, pol);
        if constexpr (BITS == 3) cp_async8(&p[slot][lane][0], q1 + (unit * 32 + lane) * 2);
    }
    // the consumer's next chunk: refill the slot STAGES - 1 items ahead, wait for the chunk's
    // copy and read the lane's words (then `release` it once its words are used)
    template <class Issue>
    __device__ __forceinline__ void take(Issue&& issue, u32 (&w)[4], u32 (&hp)[2]) {
        issue((item + STAGES - 1) % STAGES);
        cp_wait<STAGES - 1>();
        const int slot = item % STAGES;
        const uint4 a = *reinterpret_cast<const uint4*>(&v[slot][lane][0]);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
        hp[0] = hp[1] = 0u;
        if constexpr (BITS == 3) {
            const uint2 b = *reinterpret_cast<const uint2*>(&p[slot][lane][0]);
            hp[0] = b.x; hp[1] = b.y;
        }
    }
    // the consumer is done with the chunk it took (at the end of the chunk's work)
    __device__ __forceinline__ void release() { ++item; }
};
// warp `warp`'s ring in the kernel's shared ring storage (`p`: one dummy warp unless W3)
template <int BITS, int STAGES, int PW>
__device__ __forceinline__ WarpRing<BITS, STAGES> warp_ring(
    u32 (&v)[BP_WARPS][STAGES][32][4], u32 (&p)[PW][STAGES][32][2], int warp, int lane) {
    return {v[warp], p[BITS == 3 ? warp : 0], lane, evict_first_policy(), 0};
}

// the D (codes times x) and X (sum of x) fragments of NT batch tiles, zeroed
template <int NT> __device__ __forceinline__ void zero_frags(float (&d)[NT][4],
                                                             float (&xs)[NT][4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) d[j][e] = xs[j][e] = 0.f;
}

// one k16 step at input k of the lane's (dequantised) A fragment against every batch tile j:
// D[j] += A x^T and X[j] += ones x^T (inputs at or past klim read as 0)
template <int XT, int NT>
__device__ __forceinline__ void mma_step(const u32 (&a)[4], const u16* __restrict__ x, int M,
                                         int K, int k, int klim, int g, int tq,
                                         float (&d)[NT][4], float (&xs)[NT][4]) {
    using Mg = Magic<XT>;
    const u32 ones[4] = {Mg::ONE, Mg::ONE, Mg::ONE, Mg::ONE};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        u32 b0, b1;
        load_b<(NT >= 4)>(x, 8 * j + g, M, K, k, klim, tq, b0, b1);
        mma<XT>(d[j], a, b0, b1);
        mma<XT>(xs[j], ones, b0, b1);
    }
}

// f(IC<0>{}) .. f(IC<STEPS - 1>{}): the k16 steps of a chunk, unrolled with S a constant
template <int STEPS, class F> __device__ __forceinline__ void each_step(F&& f) {
    f(IC<0>{}); f(IC<1>{}); f(IC<2>{}); f(IC<3>{});
    if constexpr (STEPS == 8) {
        f(IC<4>{}); f(IC<5>{}); f(IC<6>{}); f(IC<7>{});
    }
}

// write rows [row0, row0 + nrows) of y from an fp32 [rows][MP] tile in shared memory
template <int XT, int MP>
__device__ __forceinline__ void store_rows(const float* tsum, int row0, int nrows,
                                           const float* __restrict__ bias, u16* __restrict__ y,
                                           int N, int M) {
    for (int i = threadIdx.x; i < nrows * M; i += BP_THREADS) {
        const int rr = i % nrows, n = i / nrows, row = row0 + rr;
        if (row < N) {
            float v = tsum[rr * MP + n];
            if (bias) v += __ldg(bias + row);
            y[(long)n * N + row] = f2x<XT>(v);
        }
    }
}

// the deterministic cross-CTA fix-up of a split tile / block `t` (units [first, last])
template <int XT, int MP>
__device__ __forceinline__ void split_fixup(const float* tsum, int rows, float* __restrict__ ws,
                                            int* __restrict__ counters, int t, int first_unit,
                                            int last_unit, const Split& sp, int row0,
                                            const float* __restrict__ bias,
                                            u16* __restrict__ y, int N, int M, int* s_last) {
    const int b = blockIdx.x;
    const int slot = sp.lo(b) >= first_unit ? 0 : 1;
    float* dst = ws + (long)(2 * b + slot) * rows * MP;
    for (int i = threadIdx.x; i < rows * MP; i += BP_THREADS) dst[i] = tsum[i];
    __threadfence();
    __syncthreads();
    const int bf = sp.cta_of(first_unit), bl = sp.cta_of(last_unit);
    if (threadIdx.x == 0) {
        const int old = atomicAdd(counters + t, 1);
        *s_last = (old == bl - bf);
    }
    __syncthreads();
    if (*s_last) {
        __threadfence();
        for (int i = threadIdx.x; i < rows * M; i += BP_THREADS) {
            const int rr = i % rows, n = i / rows, row = row0 + rr;
            float v = 0.f;
            for (int bb = bf; bb <= bl; ++bb) {
                const int sl = sp.lo(bb) >= first_unit ? 0 : 1;
                v += __ldcg(ws + (long)(2 * bb + sl) * rows * MP + rr * MP + n);
            }
            if (row < N) {
                if (bias) v += __ldg(bias + row);
                y[(long)n * N + row] = f2x<XT>(v);
            }
        }
        if (threadIdx.x == 0) counters[t] = 0;
    }
}

// ---------------------------------------------------------------------------------------------
template <int BITS, int XT, int ST, int NT>
__device__ __forceinline__ void dense_kernel(const u32* __restrict__ qw,
                                             const u32* __restrict__ q1, const void* sz,
                                             const u16* __restrict__ x,
                                             const float* __restrict__ bias, u16* __restrict__ y,
                                             float* __restrict__ ws, int* __restrict__ counters,
                                             int N, int K, int M, int gsteps, int n_groups,
                                             int n_chunks) {
    constexpr int STEPS = BITS == 4 ? 4 : 8;
    constexpr int STAGES = NT == 8 ? 3 : 4;
    constexpr int MP = 8 * NT;
    __shared__ __align__(16) u32 ring_v[BP_WARPS][STAGES][32][4];
    __shared__ __align__(16) u32 ring_p[BITS == 3 ? BP_WARPS : 1][STAGES][32][2];
    __shared__ float tsum[16 * MP];
    __shared__ int s_last;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int tiles = (N + 15) >> 4, units = tiles * n_chunks, nc = n_chunks;
    const Split sp(units, gridDim.x);
    const int u0 = sp.lo(blockIdx.x), u1 = sp.hi(blockIdx.x);
    if (u1 <= u0) return;
    const int t_first = u0 / nc, t_last = (u1 - 1) / nc;
    auto ring = warp_ring<BITS>(ring_v, ring_p, warp, lane);
    auto lo = [&](int t) { return max(u0, t * nc) - t * nc; };
    auto hi = [&](int t) { return min(u1, (t + 1) * nc) - t * nc; };

    // producer cursor: this warp's (tile, chunk) sequence, running ahead across tiles
    int pt = t_first, pc = lo(t_first) + warp;
    auto norm = [&]() {
        while (pt <= t_last && pc >= hi(pt)) {
            ++pt;
            pc = lo(pt) + warp;
        }
    };
    norm();
    auto issue = [&](int slot) {
        if (pt <= t_last) {
            ring.fetch(slot, qw, q1, (long)pt * nc + pc);
            pc += BP_WARPS;
            norm();
        }
        cp_commit();
    };
    ring.prime(issue);

    for (int t = t_first; t <= t_last; ++t) {
        float acc[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
        const int c0 = lo(t), c1 = hi(t);
        for (int c = c0 + warp; c < c1; c += BP_WARPS, ring.release()) {
            u32 v[4], p[2];
            ring.take(issue, v, p);
            float d[NT][4], xs[NT][4];
            zero_frags(d, xs);
            const int kstep0 = c * STEPS;
            each_step<STEPS>([&](auto S_) {
                constexpr int S = decltype(S_)::value;
                u32 a[4];
                dequant<BITS, XT, S>(v, p, a);
                const int kstep = kstep0 + S;
                mma_step<XT>(a, x, M, K, kstep * 16, K, g, tq, d, xs);
                const int grp = kstep / gsteps;
                if (S == STEPS - 1 || (kstep + 1) / gsteps != grp) {
                    const int gg = min(grp, n_groups - 1);
                    float s0, z0, s1, z1;
                    const long base = ((long)t * n_groups + gg) * 16;
                    load_sz<ST>(sz, base + g, s0, z0);
                    load_sz<ST>(sz, base + g + 8, s1, z1);
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        acc[j][0] += s0 * d[j][0] + z0 * xs[j][0];
                        acc[j][1] += s0 * d[j][1] + z0 * xs[j][1];
                        acc[j][2] += s1 * d[j][2] + z1 * xs[j][2];
                        acc[j][3] += s1 * d[j][3] + z1 * xs[j][3];
#pragma unroll
                        for (int e = 0; e < 4; ++e) d[j][e] = xs[j][e] = 0.f;
                    }
                }
            });
        }
        // warp sums into shared memory, in warp order (deterministic)
        for (int i = threadIdx.x; i < 16 * MP; i += BP_THREADS) tsum[i] = 0.f;
        __syncthreads();
        for (int w = 0; w < BP_WARPS; ++w) {
            if (warp == w) {
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const int n = 8 * j + 2 * tq;
                    tsum[g * MP + n] += acc[j][0];
                    tsum[g * MP + n + 1] += acc[j][1];
                    tsum[(g + 8) * MP + n] += acc[j][2];
                    tsum[(g + 8) * MP + n + 1] += acc[j][3];
                }
            }
            __syncthreads();
        }
        if (c0 == 0 && c1 == nc)
            store_rows<XT, MP>(tsum, t * 16, 16, bias, y, N, M);
        else
            split_fixup<XT, MP>(tsum, 16, ws, counters, t, t * nc, (t + 1) * nc - 1, sp, t * 16,
                                bias, y, N, M, &s_last);
        __syncthreads();
    }
    cp_wait<0>();
}

// ---------------------------------------------------------------------------------------------
template <int BITS, int XT, int ST, int NT>
__device__ __forceinline__ void sparse_kernel(const u32* __restrict__ qw,
                                              const u32* __restrict__ q1, const void* sz,
                                              const int* __restrict__ rows,
                                              const int* __restrict__ cols,
                                              const int* __restrict__ block_ptr,
                                              const u16* __restrict__ x,
                                              const float* __restrict__ bias,
                                              u16* __restrict__ y, float* __restrict__ ws,
                                              int* __restrict__ counters, int N, int K, int M,
                                              int gs, int n_chunks, int n_tiles, int n_blocks) {
    constexpr int STEPS = BITS == 4 ? 4 : 8;
    constexpr int CH = STEPS * 16;
    constexpr int STAGES = NT == 8 ? 2 : 4;
    constexpr int MP = 8 * NT;
    __shared__ __align__(16) u32 ring_v[BP_WARPS][STAGES][32][4];
    __shared__ __align__(16) u32 ring_p[BITS == 3 ? BP_WARPS : 1][STAGES][32][2];
    __shared__ float bsum[BP_ROW_BLOCK * MP];
    __shared__ int s_last;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    // blocks without any kept group: bias (or 0)
    for (int b = blockIdx.x; b < n_blocks; b += gridDim.x) {
        if (__ldg(block_ptr + b) == __ldg(block_ptr + b + 1)) {
            for (int i = threadIdx.x; i < BP_ROW_BLOCK * M; i += BP_THREADS) {
                const int row = b * BP_ROW_BLOCK + i % BP_ROW_BLOCK, n = i / BP_ROW_BLOCK;
                if (row < N) y[(long)n * N + row] = f2x<XT>(bias ? __ldg(bias + row) : 0.f);
            }
        }
    }
    if (n_tiles == 0) return;
    const Split sp(n_tiles, gridDim.x);
    const int t0 = sp.lo(blockIdx.x), t1 = sp.hi(blockIdx.x);
    if (t1 <= t0) return;
    auto block_of = [&](int tile) {  // the block whose tile range holds `tile`
        int l = 0, h = n_blocks - 1;
        while (l < h) {
            const int mid = (l + h + 1) >> 1;
            if (__ldg(block_ptr + mid) <= tile) l = mid; else h = mid - 1;
        }
        return l;
    };
    const int b_first = block_of(t0), b_last = block_of(t1 - 1);
    auto blo = [&](int b) { return max(t0, __ldg(block_ptr + b)); };
    auto bhi = [&](int b) { return min(t1, __ldg(block_ptr + b + 1)); };
    auto ring = warp_ring<BITS>(ring_v, ring_p, warp, lane);

    // producer cursor over (block, tile, chunk): this warp's tiles are lo + warp + 8i
    int pb = b_first, ptile = blo(b_first) + warp, pc = 0;
    auto norm = [&]() {
        while (pb <= b_last && ptile >= bhi(pb)) {
            ++pb;
            if (pb <= b_last) ptile = blo(pb) + warp;
        }
    };
    norm();
    auto issue = [&](int slot) {
        if (pb <= b_last) {
            ring.fetch(slot, qw, q1, (long)ptile * n_chunks + pc);
            if (++pc == n_chunks) {
                pc = 0;
                ptile += BP_WARPS;
                norm();
            }
        }
        cp_commit();
    };
    ring.prime(issue);

    for (int b = b_first; b <= b_last; ++b) {
        const int lo_t = blo(b), hi_t = bhi(b);
        if (lo_t >= hi_t) continue;  // uniform across the CTA
        for (int i = threadIdx.x; i < BP_ROW_BLOCK * MP; i += BP_THREADS) bsum[i] = 0.f;
        __syncthreads();
        // rounds of 8 tiles, one per warp; results are added into the block sum in warp
        // order (8 barriers a round), so the fp32 sums do not depend on timing
        for (int round0 = lo_t; round0 < hi_t; round0 += BP_WARPS) {
            const int tile = round0 + warp;
            float d[NT][4], xs[NT][4];
            zero_frags(d, xs);
            int r0 = -1, r1 = -1;
            if (tile < hi_t) {
                const int base = __ldg(cols + tile) * gs, klim = min(base + gs, K);
                for (int c = 0; c < n_chunks; ++c, ring.release()) {
                    u32 v[4], p[2];
                    ring.take(issue, v, p);
                    const int kc = base + c * CH;
                    each_step<STEPS>([&](auto S_) {
                        constexpr int S = decltype(S_)::value;
                        u32 a[4];
                        dequant<BITS, XT, S>(v, p, a);
                        mma_step<XT>(a, x, M, K, kc + 16 * S, klim, g, tq, d, xs);
                    });
                }
                float s0, z0, s1, z1;
                load_sz<ST>(sz, (long)tile * 16 + g, s0, z0);
                load_sz<ST>(sz, (long)tile * 16 + g + 8, s1, z1);
                r0 = __ldg(rows + tile * 16 + g);
                r1 = __ldg(rows + tile * 16 + g + 8);
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    d[j][0] = s0 * d[j][0] + z0 * xs[j][0];
                    d[j][1] = s0 * d[j][1] + z0 * xs[j][1];
                    d[j][2] = s1 * d[j][2] + z1 * xs[j][2];
                    d[j][3] = s1 * d[j][3] + z1 * xs[j][3];
                }
            }
            const int rb = b * BP_ROW_BLOCK;
            for (int w = 0; w < BP_WARPS; ++w) {
                if (warp == w) {  // a tile's 16 rows are distinct: no two lanes share an entry
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        const int n = 8 * j + 2 * tq;
                        if (r0 >= 0) {
                            bsum[(r0 - rb) * MP + n] += d[j][0];
                            bsum[(r0 - rb) * MP + n + 1] += d[j][1];
                        }
                        if (r1 >= 0) {
                            bsum[(r1 - rb) * MP + n] += d[j][2];
                            bsum[(r1 - rb) * MP + n + 1] += d[j][3];
                        }
                    }
                }
                __syncthreads();
            }
        }
        __syncthreads();
        const int bp0 = __ldg(block_ptr + b), bp1 = __ldg(block_ptr + b + 1);
        if (lo_t == bp0 && hi_t == bp1)
            store_rows<XT, MP>(bsum, b * BP_ROW_BLOCK, BP_ROW_BLOCK, bias, y, N, M);
        else
            split_fixup<XT, MP>(bsum, BP_ROW_BLOCK, ws, counters, b, bp0, bp1 - 1, sp,
                                b * BP_ROW_BLOCK, bias, y, N, M, &s_last);
        __syncthreads();
    }
    cp_wait<0>();
}

}  // namespace bp

// ---- entry points ------------------------------------------------------------------------
// two CTAs per SM (<= 128 registers) where the accumulators fit without spilling; one for 64
// batch rows and for W2 / W3 at 32 rows (8 k16 steps a chunk)
#define BP_MIN_BLOCKS(B, NT) (((NT) == 8 || ((NT) == 4 && (B) != 4)) ? 1 : 2)
#define BP_DENSE(B, X, S, NT)                                                                  \
    extern "C" __global__ void __launch_bounds__(BP_THREADS, BP_MIN_BLOCKS(B, NT))                \
        bitpress_qmma_w##B##_x##X##_s##S##_n##NT(                                              \
            const u32* qw, const u32* q1, const void* sz, const u16* x, const float* bias,     \
            u16* y, float* ws, int* counters, int N, int K, int M, int gsteps, int n_groups,   \
            int n_chunks) {                                                                    \
        bp::dense_kernel<B, X, S, NT>(qw, q1, sz, x, bias, y, ws, counters, N, K, M, gsteps,  \
                                      n_groups, n_chunks);                                     \
    }
#define BP_SPARSE(B, X, S, NT)                                                                 \
    extern "C" __global__ void __launch_bounds__(BP_THREADS, BP_MIN_BLOCKS(B, NT))                \
        bitpress_qmma_sparse_w##B##_x##X##_s##S##_n##NT(                                       \
            const u32* qw, const u32* q1, const void* sz, const int* rows, const int* cols,    \
            const int* block_ptr, const u16* x, const float* bias, u16* y, float* ws,          \
            int* counters, int N, int K, int M, int gs, int n_chunks, int n_tiles,             \
            int n_blocks) {                                                                    \
        bp::sparse_kernel<B, X, S, NT>(qw, q1, sz, rows, cols, block_ptr, x, bias, y, ws,      \
                                       counters, N, K, M, gs, n_chunks, n_tiles, n_blocks);    \
    }
#define BP_ALL_NT(M_, B, X, S) M_(B, X, S, 1) M_(B, X, S, 2) M_(B, X, S, 4) M_(B, X, S, 8)
#define BP_ALL(M_, B) \
    BP_ALL_NT(M_, B, 0, 0) BP_ALL_NT(M_, B, 0, 1) BP_ALL_NT(M_, B, 1, 0) BP_ALL_NT(M_, B, 1, 1)

// BITPRESS_QMMA_ONLY: instantiate nothing here (the loader appends the one entry point it
// needs, e.g. "BP_DENSE(4, 0, 0, 1)", so NVRTC compiles only the kernels a process uses)
#ifndef BITPRESS_QMMA_ONLY
BP_ALL(BP_DENSE, 2)
BP_ALL(BP_DENSE, 3)
BP_ALL(BP_DENSE, 4)
BP_ALL(BP_SPARSE, 2)
BP_ALL(BP_SPARSE, 3)
BP_ALL(BP_SPARSE, 4)
#endif
