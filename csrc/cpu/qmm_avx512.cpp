// AVX-512 build of the SIMD kernels (qmm_simd.inc): the same kernels and layout as the AVX2
// build, compiled for AVX-512 F/BW/VL + VNNI (the compiler may use EVEX encodings and 32
// vector registers), with the int8 activation dot products done by vpdpbusd — one
// instruction for what AVX2 does in three (vpmaddubsw, vpmaddwd, vpaddd) — in 256-bit form,
// which also avoids the frequency drop some CPUs take on 512-bit instructions.
// Chosen at run time when the CPU has these features (see qmm.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* operands of masked intrinsics)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define BP_FN(name) name##_avx512
#define BP_DPBUSD(acc, u8, s8) _mm256_dpbusd_epi32(acc, u8, s8)
// the sparse row kernels use 512-bit vectors: 16 columns of a group per instruction
#define BP_SPARSE512 1
#include "qmm_simd.inc"

#pragma GCC pop_options
#endif
