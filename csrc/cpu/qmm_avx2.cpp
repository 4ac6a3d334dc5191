// AVX2 (+FMA, F16C) build of the SIMD kernels (qmm_simd.inc). Only called after a run-time
// check of the CPU features (see qmm.cpp); this file is compiled for that target through the
// pragma below, the rest of the extension stays portable.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#define BP_FN(name) name##_avx2
#include "qmm_simd.inc"

#pragma GCC pop_options
#endif
