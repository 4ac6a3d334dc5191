// Hand-written W2 / W4 GEMV on bitpress's canonical dense layout (format_version 1).
//
//   qweight int32 [out, words], words = ceil(in / PF), PF = 32 / BITS; element i of a word at
//   bits i*BITS, unsigned with offset 2^(BITS-1).   scales / zeros [out, n_groups].
//   y[m, r] = sum_k x[m, k] * (s[r, g(k)] * code[r, k] + z[r, g(k)]) (+ bias[r])
//
// One warp per output row; each lane reads 16-byte vectors of 4 words when the row length
// allows (words % 4 == 0), else single words, so a warp reads 512 (or 128) contiguous bytes
// per step. Requires group_size % PF == 0 or a single group per row (so a word never straddles
// two groups); the last word of a ragged row is masked. blockIdx.y indexes the rows of x
// (small batches). Activations, parameters and output may each be fp16 / bf16 / fp32: the
// conversions are inline PTX, so the file needs no CUDA headers and compiles with NVRTC
// (CuPy RawModule) as well as nvcc. Accumulation is fp32.
//
// Entry points (extern "C"): bitpress_qgemv_w{2,4}_x{XT}_s{ST}, XT / ST in
// {0: fp16, 1: bf16, 2: fp32} for the activation/output and the scale/zero dtypes.

typedef unsigned short u16;

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float b2f(u16 b) { return __int_as_float(((int)b) << 16); }
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ u16 f2b(float f) {
    // round to nearest even (NaN kept quiet); avoids cvt.rn.bf16.f32, which needs sm_80
    unsigned u = (unsigned)__float_as_int(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

template <int T> struct Elt;
template <> struct Elt<0> {
    typedef u16 type;
    static __device__ __forceinline__ float load(const u16* p) { return h2f(__ldg(p)); }
    static __device__ __forceinline__ void store(u16* p, float v) { *p = f2h(v); }
};
template <> struct Elt<1> {
    typedef u16 type;
    static __device__ __forceinline__ float load(const u16* p) { return b2f(__ldg(p)); }
    static __device__ __forceinline__ void store(u16* p, float v) { *p = f2b(v); }
};
template <> struct Elt<2> {
    typedef float type;
    static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
    static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};

template <int BITS, int XT, int ST>
__device__ __forceinline__ float word_dot(unsigned w, int k0, int in_features,
                                          const typename Elt<XT>::type* __restrict__ x,
                                          const typename Elt<ST>::type* __restrict__ s_row,
                                          const typename Elt<ST>::type* __restrict__ z_row,
                                          int group_size) {
    constexpr int PF = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    constexpr float OFF = (float)(1 << (BITS - 1));
    const int g = k0 / group_size;
    float dot = 0.f, sx = 0.f;
    if (k0 + PF <= in_features) {
#pragma unroll
        for (int i = 0; i < PF; ++i) {
            float xv = Elt<XT>::load(x + k0 + i);
            dot += xv * (float)((w >> (i * BITS)) & MASK);
            sx += xv;
        }
    } else {
        for (int i = 0; i < PF && k0 + i < in_features; ++i) {
            float xv = Elt<XT>::load(x + k0 + i);
            dot += xv * (float)((w >> (i * BITS)) & MASK);
            sx += xv;
        }
    }
    // codes are unsigned here: sum x (s (u - OFF) + z) = s * sum x u + (z - s OFF) * sum x
    const float s = Elt<ST>::load(s_row + g);
    const float z = Elt<ST>::load(z_row + g);
    return s * dot + (z - s * OFF) * sx;
}

template <int BITS, int XT, int ST>
__device__ __forceinline__ void qgemv(const int* __restrict__ qweight,
                                      const typename Elt<ST>::type* __restrict__ scales,
                                      const typename Elt<ST>::type* __restrict__ zeros,
                                      const typename Elt<XT>::type* __restrict__ x,
                                      const typename Elt<XT>::type* __restrict__ bias,
                                      typename Elt<XT>::type* __restrict__ y, int out,
                                      int in_features, int words, int group_size,
                                      int n_groups) {
    constexpr int PF = 32 / BITS;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= out) return;
    const int m = blockIdx.y;
    x += (long long)m * in_features;
    const int* wrow = qweight + (long long)row * words;
    const typename Elt<ST>::type* s_row = scales + (long long)row * n_groups;
    const typename Elt<ST>::type* z_row = zeros + (long long)row * n_groups;
    float acc = 0.f;
    if ((words & 3) == 0) {
        const int4* w4 = reinterpret_cast<const int4*>(wrow);
        for (int v = lane; v < (words >> 2); v += 32) {
            int4 q = __ldg(w4 + v);
            int k0 = v * 4 * PF;
            acc += word_dot<BITS, XT, ST>((unsigned)q.x, k0, in_features, x, s_row, z_row, group_size);
            acc += word_dot<BITS, XT, ST>((unsigned)q.y, k0 + PF, in_features, x, s_row, z_row, group_size);
            acc += word_dot<BITS, XT, ST>((unsigned)q.z, k0 + 2 * PF, in_features, x, s_row, z_row, group_size);
            acc += word_dot<BITS, XT, ST>((unsigned)q.w, k0 + 3 * PF, in_features, x, s_row, z_row, group_size);
        }
    } else {
        for (int v = lane; v < words; v += 32) {
            acc += word_dot<BITS, XT, ST>((unsigned)__ldg(wrow + v), v * PF, in_features, x,
                                          s_row, z_row, group_size);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) {
        if (bias != 0) acc += Elt<XT>::load(bias + row);
        Elt<XT>::store(y + (long long)m * out + row, acc);
    }
}

#define BITPRESS_QGEMV(B, XT, ST)                                                              \
    extern "C" __global__ void __launch_bounds__(256) bitpress_qgemv_w##B##_x##XT##_s##ST(    \
        const int* __restrict__ qweight, const Elt<ST>::type* __restrict__ scales,             \
        const Elt<ST>::type* __restrict__ zeros, const Elt<XT>::type* __restrict__ x,          \
        const Elt<XT>::type* __restrict__ bias, Elt<XT>::type* __restrict__ y, int out,        \
        int in_features, int words, int group_size, int n_groups) {                           \
        qgemv<B, XT, ST>(qweight, scales, zeros, x, bias, y, out, in_features, words,          \
                         group_size, n_groups);                                                \
    }

#define BITPRESS_QGEMV_X(B, XT) \
    BITPRESS_QGEMV(B, XT, 0)    \
    BITPRESS_QGEMV(B, XT, 1)    \
    BITPRESS_QGEMV(B, XT, 2)

BITPRESS_QGEMV_X(2, 0)
BITPRESS_QGEMV_X(2, 1)
BITPRESS_QGEMV_X(2, 2)
BITPRESS_QGEMV_X(4, 0)
BITPRESS_QGEMV_X(4, 1)
BITPRESS_QGEMV_X(4, 2)
