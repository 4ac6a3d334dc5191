// The AVX-512 build's code path (qmm_avx512.cpp: vpdpbusd int8 dot products) compiled for
// AVX2, with vpdpbusd emulated by SIMDe (header-only, https://github.com/simd-everywhere/simde,
// pip package `simde-py`, a build requirement). Exposed as the ISA "avx512-emu", never picked
// automatically: it exists so the tests run the VNNI variant of every kernel on CPUs without
// AVX-512, against an independent implementation of the instruction's semantics. Built only
// when setup.py finds the SIMDe headers (it defines BITPRESS_HAVE_SIMDE).
#if (defined(__x86_64__) || defined(_M_X64)) && defined(BITPRESS_HAVE_SIMDE)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <cstring>

#include <simde/x86/avx512/dpbusd.h>

namespace {
// SIMDe's vector type is not __m256i when it does not see native AVX: convert by bytes.
inline __m256i emu_dpbusd(__m256i acc, __m256i u8, __m256i s8) {
  simde__m256i a, b, c;
  std::memcpy(&a, &acc, 32);
  std::memcpy(&b, &u8, 32);
  std::memcpy(&c, &s8, 32);
  const simde__m256i r = simde_mm256_dpbusd_epi32(a, b, c);
  __m256i out;
  std::memcpy(&out, &r, 32);
  return out;
}
}  // namespace

#define BP_FN(name) name##_avx512emu
#define BP_DPBUSD(acc, u8, s8) emu_dpbusd(acc, u8, s8)
#include "qmm_simd.inc"

#pragma GCC pop_options
#endif
