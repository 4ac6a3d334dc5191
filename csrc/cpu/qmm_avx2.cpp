// AVX2 (+FMA, F16C) kernels for bitpress::dense_qmm / sparse_qmm. Only called after a
// run-time check of the CPU features (see qmm.cpp); the whole file is compiled for that
// target through the pragma below, the rest of the extension stays portable.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "qmm.h"

namespace {

// Software prefetch `g_prefetch_bytes` ahead of the weight stream (0 = off). The hardware
// prefetchers stop at 4 KiB page boundaries; a GEMV streams each tile once, so at batch 1
// the page-crossing stalls are a large share of the time (bench/RESULTS.md, CPU kernels).
inline void prefetch_lines(const uint8_t* p, int64_t nbytes) {
  for (int64_t o = 0; o < nbytes; o += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}
inline void prefetch_ahead(const uint8_t* p, int64_t nbytes) {
  const int64_t d = bitpress_cpu::g_prefetch_bytes;
  if (d > 0) prefetch_lines(p + d, nbytes);
}

inline __m256i bcast4(const int8_t* p) {
  int32_t t;
  std::memcpy(&t, p, 4);
  return _mm256_set1_epi32(t);
}

template <int PK>
inline __m256 load8p(const uint8_t* p) {
  if constexpr (PK == P_F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (PK == P_BF16) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

inline __m256i ld(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// ---- dense, int8 activations: iacc[m] (8 rows) += sum over the segment of u * q_m -------
template <int BITS, int MB>
inline void seg_i8(const uint8_t* cp, int64_t seg, const int8_t* const* q, __m256i* iacc) {
  const __m256i ones = _mm256_set1_epi16(1);
  // int16 partial sums stay below 2^15: a 32-byte block adds at most NP * 2*(2^b-1)*127,
  // so up to LIM blocks are summed in int16 before widening (2-bit: 10, 4-bit: 4).
  if constexpr (BITS == 2 || BITS == 4) {
    constexpr int CPD = 32 / BITS, NP = 8 / BITS;
    constexpr int LIM = 32767 / (NP * 2 * ((1 << BITS) - 1) * 127);
    const __m256i mask = _mm256_set1_epi8(char((1 << BITS) - 1));
    for (int64_t k = 0; k < seg;) {
      __m256i s16[MB];
      for (int i = 0; i < MB; ++i) s16[i] = _mm256_setzero_si256();
      for (int bi = 0; bi < LIM && k < seg; ++bi, k += CPD, cp += 32) {
        const __m256i v = ld(cp);
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p) {
          const __m256i c = _mm256_and_si256(_mm256_srli_epi16(v, BITS * p), mask);
          for (int i = 0; i < MB; ++i)
            s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(c, bcast4(q[i] + k + 4 * p)));
        }
      }
      for (int i = 0; i < MB; ++i) iacc[i] = _mm256_add_epi32(iacc[i], _mm256_madd_epi16(s16[i], ones));
    }
  } else {  // 3-bit: two low 2-bit blocks + one high-bit block per 32 codes; a chunk adds at
            // most 8 * 2*7*127 = 14224, so two chunks are summed in int16
    const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
    for (int64_t k = 0; k < seg;) {
      __m256i s16[MB];
      for (int i = 0; i < MB; ++i) s16[i] = _mm256_setzero_si256();
      for (int ci = 0; ci < 2 && k < seg; ++ci) {
        const int nh = seg - k >= 32 ? 2 : 1;
        const __m256i hi = ld(cp + 32 * nh);
        for (int h = 0; h < nh; ++h) {
          const __m256i lo = ld(cp + 32 * h);
#pragma GCC unroll 4
          for (int p = 0; p < 4; ++p) {
            const int mm = 4 * h + p;
            const __m256i hb = mm >= 2 ? _mm256_srli_epi16(hi, mm - 2) : _mm256_slli_epi16(hi, 2 - mm);
            const __m256i c = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 2 * p), m3),
                                              _mm256_and_si256(hb, m4));
            for (int i = 0; i < MB; ++i)
              s16[i] = _mm256_add_epi16(s16[i],
                                        _mm256_maddubs_epi16(c, bcast4(q[i] + k + 16 * h + 4 * p)));
          }
        }
        cp += 32 * (nh + 1);
        k += 32;
      }
      for (int i = 0; i < MB; ++i) iacc[i] = _mm256_add_epi32(iacc[i], _mm256_madd_epi16(s16[i], ones));
    }
  }
}

// ---- dense, exact fp32: facc[m] (8 rows) += sum over the segment of u * x_m ---------------
template <int BITS, int MB>
inline void seg_f32(const uint8_t* cp, int64_t seg, const float* const* x, __m256* facc) {
  if constexpr (BITS == 2 || BITS == 4) {
    constexpr int CPD = 32 / BITS;
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    for (int64_t k = 0; k < seg; k += CPD, cp += 32) {
      const __m256i v = ld(cp);
#pragma GCC unroll 16
      for (int t = 0; t < CPD; ++t) {
        const int sh = 8 * (t % 4) + BITS * (t / 4);
        const __m256 c = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, sh), mask));
        for (int i = 0; i < MB; ++i)
          facc[i] = _mm256_fmadd_ps(c, _mm256_set1_ps(x[i][k + t]), facc[i]);
      }
    }
  } else {
    const __m256i m3 = _mm256_set1_epi32(3), m4 = _mm256_set1_epi32(4);
    for (int64_t k = 0; k < seg; k += 32) {
      const int nh = seg - k >= 32 ? 2 : 1;
      const __m256i hi = ld(cp + 32 * nh);
      for (int h = 0; h < nh; ++h) {
        const __m256i lo = ld(cp + 32 * h);
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) {
          const int j = t % 4, m = t / 4;
          const __m256i l = _mm256_and_si256(_mm256_srli_epi32(lo, 8 * j + 2 * m), m3);
          const int hs = 8 * j + 4 * h + m;  // bit of the high plane; move it to bit 2
          const __m256i hb = hs >= 2 ? _mm256_srli_epi32(hi, hs - 2) : _mm256_slli_epi32(hi, 2 - hs);
          const __m256 c = _mm256_cvtepi32_ps(_mm256_or_si256(l, _mm256_and_si256(hb, m4)));
          for (int i = 0; i < MB; ++i)
            facc[i] = _mm256_fmadd_ps(c, _mm256_set1_ps(x[i][k + 16 * h + t]), facc[i]);
        }
      }
      cp += 32 * (nh + 1);
    }
  }
}

template <int BITS, int PK, int MB, bool I8>
void tile_mb(const DenseGeom& g, const Act& a, const uint8_t* tp, int64_t tile, int64_t m0,
             float* y, const float* bias) {
  constexpr int PS = PK == P_F32 ? 4 : 2;
  __m256 yacc[MB];
  for (int i = 0; i < MB; ++i) yacc[i] = _mm256_setzero_ps();
  __m256 s8 = _mm256_setzero_ps(), z8 = _mm256_setzero_ps();
  const uint8_t* p = tp;
  const int8_t* qp[MB];
  const float* xp[MB];
  for (int64_t s = 0; s < g.nseg; ++s) {
    prefetch_ahead(p, g.code_bytes + 16 * PS);
    if (s == 0 || g.grouped) {
      s8 = load8p<PK>(p);
      z8 = load8p<PK>(p + 8 * PS);
      p += 16 * PS;
    }
    const int64_t k0 = s * g.seg;
    __m256 t[MB];
    if constexpr (I8) {
      __m256i iacc[MB];
      for (int i = 0; i < MB; ++i) {
        iacc[i] = _mm256_setzero_si256();
        qp[i] = a.q + (m0 + i) * a.stride + k0;
      }
      seg_i8<BITS, MB>(p, g.seg, qp, iacc);
      for (int i = 0; i < MB; ++i) {
        const int64_t idx = (m0 + i) * a.nseg + s;
        t[i] = _mm256_fmsub_ps(_mm256_cvtepi32_ps(iacc[i]), _mm256_set1_ps(a.d[idx]),
                               _mm256_set1_ps(a.b[idx]));
      }
    } else {
      __m256 facc[MB];
      for (int i = 0; i < MB; ++i) {
        facc[i] = _mm256_setzero_ps();
        xp[i] = a.xf + (m0 + i) * a.stride + k0;
      }
      seg_f32<BITS, MB>(p, g.seg, xp, facc);
      for (int i = 0; i < MB; ++i)
        t[i] = _mm256_sub_ps(facc[i], _mm256_set1_ps(a.b[(m0 + i) * a.nseg + s]));
    }
    for (int i = 0; i < MB; ++i) {
      yacc[i] = _mm256_fmadd_ps(s8, t[i], yacc[i]);
      yacc[i] = _mm256_fmadd_ps(z8, _mm256_set1_ps(a.xs[(m0 + i) * a.nseg + s]), yacc[i]);
    }
    p += g.code_bytes;
  }
  const int64_t r0 = tile * 8, nr = std::min<int64_t>(8, g.out - r0);
  for (int i = 0; i < MB; ++i) {
    float* yr = y + (m0 + i) * g.out + r0;
    if (nr == 8) {
      __m256 v = yacc[i];
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + r0));
      _mm256_storeu_ps(yr, v);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, yacc[i]);
      for (int64_t r = 0; r < nr; ++r) yr[r] = tmp[r] + (bias ? bias[r0 + r] : 0.f);
    }
  }
}

template <int BITS, int PK, bool I8>
void tile_all(const DenseGeom& g, const Act& a, const uint8_t* tp, int64_t tile, float* y,
              const float* bias) {
  int64_t m0 = 0;
  for (; m0 + 4 <= a.M; m0 += 4) tile_mb<BITS, PK, 4, I8>(g, a, tp, tile, m0, y, bias);
  switch (a.M - m0) {
    case 3: tile_mb<BITS, PK, 3, I8>(g, a, tp, tile, m0, y, bias); break;
    case 2: tile_mb<BITS, PK, 2, I8>(g, a, tp, tile, m0, y, bias); break;
    case 1: tile_mb<BITS, PK, 1, I8>(g, a, tp, tile, m0, y, bias); break;
    default: break;
  }
}

template <int BITS, int PK>
void tile_mode(const DenseGeom& g, const Act& a, const uint8_t* tp, int64_t tile, float* y,
               const float* bias) {
  if (a.mode == MODE_INT8) tile_all<BITS, PK, true>(g, a, tp, tile, y, bias);
  else tile_all<BITS, PK, false>(g, a, tp, tile, y, bias);
}

template <int BITS>
void tile_pk(const DenseGeom& g, const Act& a, const uint8_t* tp, int64_t tile, float* y,
             const float* bias) {
  switch (g.pkind) {
    case P_F16: tile_mode<BITS, P_F16>(g, a, tp, tile, y, bias); break;
    case P_BF16: tile_mode<BITS, P_BF16>(g, a, tp, tile, y, bias); break;
    default: tile_mode<BITS, P_F32>(g, a, tp, tile, y, bias); break;
  }
}

// ---- sparse column tiles: 8 kept groups of one column group, rows scattered ----------------
template <int BITS, int PK, int MB, bool I8>
void sparse_tile_mb(const SparseGeom& g, const Act& a, const uint8_t* tp, int64_t m0,
                    float* ylocal) {
  constexpr int PS = PK == P_F32 ? 4 : 2;
  int32_t col, rows[8];
  std::memcpy(&col, tp, 4);
  std::memcpy(rows, tp + 4, 32);
  const uint8_t* p = tp + 36;
  const __m256 s8 = load8p<PK>(p), z8 = load8p<PK>(p + 8 * PS);
  p += 16 * PS;
  const int64_t k0 = int64_t(col) * g.gs;
  __m256 t[MB];
  if constexpr (I8) {
    __m256i iacc[MB];
    const int8_t* qp[MB];
    for (int i = 0; i < MB; ++i) {
      iacc[i] = _mm256_setzero_si256();
      qp[i] = a.q + (m0 + i) * a.stride + k0;
    }
    seg_i8<BITS, MB>(p, g.gs, qp, iacc);
    for (int i = 0; i < MB; ++i) {
      const int64_t idx = (m0 + i) * a.nseg + col;
      t[i] = _mm256_fmsub_ps(_mm256_cvtepi32_ps(iacc[i]), _mm256_set1_ps(a.d[idx]),
                             _mm256_set1_ps(a.b[idx]));
    }
  } else {
    __m256 facc[MB];
    const float* xp[MB];
    for (int i = 0; i < MB; ++i) {
      facc[i] = _mm256_setzero_ps();
      xp[i] = a.xf + (m0 + i) * a.stride + k0;
    }
    seg_f32<BITS, MB>(p, g.gs, xp, facc);
    for (int i = 0; i < MB; ++i)
      t[i] = _mm256_sub_ps(facc[i], _mm256_set1_ps(a.b[(m0 + i) * a.nseg + col]));
  }
  __m256 yv[MB];
  for (int i = 0; i < MB; ++i) {
    const int64_t idx = (m0 + i) * a.nseg + col;
    yv[i] = _mm256_fmadd_ps(z8, _mm256_set1_ps(a.xs[idx]), _mm256_mul_ps(s8, t[i]));
  }
  // ylocal is [out][M]: lane l adds its MB values to row rows[l], activation rows m0..
  if constexpr (MB == 4) {
    __m128 lo[4], hi[4];
    for (int i = 0; i < 4; ++i) {
      lo[i] = _mm256_castps256_ps128(yv[i]);
      hi[i] = _mm256_extractf128_ps(yv[i], 1);
    }
    _MM_TRANSPOSE4_PS(lo[0], lo[1], lo[2], lo[3]);
    _MM_TRANSPOSE4_PS(hi[0], hi[1], hi[2], hi[3]);
    for (int l = 0; l < 8; ++l) {
      if (rows[l] < 0) continue;
      float* yr = ylocal + int64_t(rows[l]) * a.M + m0;
      _mm_storeu_ps(yr, _mm_add_ps(_mm_loadu_ps(yr), l < 4 ? lo[l] : hi[l - 4]));
    }
  } else {
    alignas(32) float tmp[MB][8];
    for (int i = 0; i < MB; ++i) _mm256_store_ps(tmp[i], yv[i]);
    for (int l = 0; l < 8; ++l) {
      if (rows[l] < 0) continue;
      float* yr = ylocal + int64_t(rows[l]) * a.M + m0;
      for (int i = 0; i < MB; ++i) yr[i] += tmp[i][l];
    }
  }
}

template <int BITS, int PK, bool I8>
void sparse_tiles(const SparseGeom& g, const Act& a, const uint8_t* tiles, int64_t t0, int64_t t1,
                  float* ylocal) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tp = tiles + t * g.tile_bytes;
    prefetch_ahead(tp, g.tile_bytes);
    int64_t m0 = 0;
    for (; m0 + 4 <= a.M; m0 += 4) sparse_tile_mb<BITS, PK, 4, I8>(g, a, tp, m0, ylocal);
    switch (a.M - m0) {
      case 3: sparse_tile_mb<BITS, PK, 3, I8>(g, a, tp, m0, ylocal); break;
      case 2: sparse_tile_mb<BITS, PK, 2, I8>(g, a, tp, m0, ylocal); break;
      case 1: sparse_tile_mb<BITS, PK, 1, I8>(g, a, tp, m0, ylocal); break;
      default: break;
    }
  }
}

template <int BITS, int PK>
void sparse_mode(const SparseGeom& g, const Act& a, const uint8_t* tiles, int64_t t0, int64_t t1,
                 float* ylocal) {
  if (a.mode == MODE_INT8) sparse_tiles<BITS, PK, true>(g, a, tiles, t0, t1, ylocal);
  else sparse_tiles<BITS, PK, false>(g, a, tiles, t0, t1, ylocal);
}

template <int BITS>
void sparse_pk(const SparseGeom& g, const Act& a, const uint8_t* tiles, int64_t t0, int64_t t1,
               float* ylocal) {
  switch (g.pkind) {
    case P_F16: sparse_mode<BITS, P_F16>(g, a, tiles, t0, t1, ylocal); break;
    case P_BF16: sparse_mode<BITS, P_BF16>(g, a, tiles, t0, t1, ylocal); break;
    default: sparse_mode<BITS, P_F32>(g, a, tiles, t0, t1, ylocal); break;
  }
}

// ---- 2-bit lookup-table kernel (lut2 layout, see qmm.h) -----------------------------------
// Per 32-byte block (16 columns x 8 rows x 2 bits): 2 masks + 1 shift for the indices, per
// activation row 2 table loads (L1) and 2 vpshufb (column groups {0,1} from the low nibbles,
// {2,3} from the high ones), then vpmaddubsw with (1, 2) byte weights adds the two bit planes
// of each row:
//  * FOLD = false (mode lut, entries |e| <= 127): 2 vpmaddubsw + 2 int16 adds; a block adds
//    at most 2 * 3 * 127 = 762 per int16 lane;
//  * FOLD = true (mode lut63, entries |e| <= 63): the two lookups are added as int8 first
//    (|sum| <= 126), then 1 vpmaddubsw + 1 int16 add; at most 3 * 126 = 378 per lane.
// A segment of up to 256 columns (16 blocks) and the sum of the two 128-bit lanes
// (<= 2 * 16 * 762 = 24384) stay below 2^15 before they are widened.
// TT tiles (8 rows each, consecutive) share the table loads and the per-segment activation
// terms; MB activation rows share the code loads and index extraction.
template <int PK, int MB, int TT, bool FOLD>
void lut_tile_mb(const DenseGeom& g, const Act& a, const uint8_t* tp, int64_t tile, int64_t m0,
                 float* y, const float* bias) {
  constexpr int PS = PK == P_F32 ? 4 : 2;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i w12 = _mm256_set1_epi16(0x0201);  // bytes 1, 2: plane 0 and plane 1
  __m256 yacc[TT][MB];
  for (int u = 0; u < TT; ++u)
    for (int i = 0; i < MB; ++i) yacc[u][i] = _mm256_setzero_ps();
  __m256 s8[TT], z8[TT];
  for (int u = 0; u < TT; ++u) s8[u] = z8[u] = _mm256_setzero_ps();
  const uint8_t* p = tp;
  const int64_t nblk = g.seg / 16, tb_bytes = g.tile_bytes;
  const int8_t* T[MB];
  for (int i = 0; i < MB; ++i) T[i] = a.lut + (m0 + i) * a.lstride;  // 64 bytes per block
  for (int64_t s = 0; s < g.nseg; ++s) {
    if (TT == 1) {
      prefetch_ahead(p, g.code_bytes + 16 * PS);
    } else if (bitpress_cpu::g_prefetch_bytes > 0) {
      // two interleaved streams (tiles t, t + 1): past the end of its tile each one runs on
      // into the next pair's tile (t + 2 or t + 3), not into the other stream's bytes
      const int64_t off = (p - tp) + bitpress_cpu::g_prefetch_bytes;
      for (int u = 0; u < TT; ++u)
        prefetch_lines(off < tb_bytes ? tp + u * tb_bytes + off
                                      : tp + (TT + u) * tb_bytes + (off - tb_bytes),
                       g.code_bytes + 16 * PS);
    }
    if (s == 0 || g.grouped) {
      for (int u = 0; u < TT; ++u) {
        s8[u] = load8p<PK>(p + u * tb_bytes);
        z8[u] = load8p<PK>(p + u * tb_bytes + 8 * PS);
      }
      p += 16 * PS;
    }
    __m256i acc[TT][MB];
    for (int u = 0; u < TT; ++u)
      for (int i = 0; i < MB; ++i) acc[u][i] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int64_t b = 0; b < nblk; ++b) {
      __m256i ia[TT], ib[TT];
      for (int u = 0; u < TT; ++u) {
        const __m256i v = ld(p + u * tb_bytes + 32 * b);
        ia[u] = _mm256_and_si256(v, nib);
        ib[u] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
      }
      for (int i = 0; i < MB; ++i) {
        const uint8_t* tb = reinterpret_cast<const uint8_t*>(T[i]) + 64 * b;
        const __m256i ta = ld(tb), tbb = ld(tb + 32);
        for (int u = 0; u < TT; ++u) {
          const __m256i la = _mm256_shuffle_epi8(ta, ia[u]), lb = _mm256_shuffle_epi8(tbb, ib[u]);
          if constexpr (FOLD) {
            acc[u][i] = _mm256_add_epi16(acc[u][i],
                                         _mm256_maddubs_epi16(w12, _mm256_add_epi8(la, lb)));
          } else {
            acc[u][i] = _mm256_add_epi16(acc[u][i], _mm256_add_epi16(_mm256_maddubs_epi16(w12, la),
                                                                     _mm256_maddubs_epi16(w12, lb)));
          }
        }
      }
    }
    for (int i = 0; i < MB; ++i) {
      const int64_t idx = (m0 + i) * a.nseg + s;
      const __m256 dl = _mm256_set1_ps(a.dl[idx]), bb = _mm256_set1_ps(a.b[idx]),
                   xs = _mm256_set1_ps(a.xs[idx]);
      for (int u = 0; u < TT; ++u) {
        // lanes hold column groups {0,2} and {1,3} of the same 8 rows: add them, then widen
        const __m256i a32 = _mm256_cvtepi16_epi32(_mm_add_epi16(
            _mm256_castsi256_si128(acc[u][i]), _mm256_extracti128_si256(acc[u][i], 1)));
        const __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(a32), dl, bb);
        yacc[u][i] = _mm256_fmadd_ps(s8[u], t, yacc[u][i]);
        yacc[u][i] = _mm256_fmadd_ps(z8[u], xs, yacc[u][i]);
      }
      T[i] += 64 * nblk;
    }
    p += g.code_bytes;
  }
  for (int u = 0; u < TT; ++u) {
    const int64_t r0 = (tile + u) * 8, nr = std::min<int64_t>(8, g.out - r0);
    for (int i = 0; i < MB; ++i) {
      float* yr = y + (m0 + i) * g.out + r0;
      if (nr == 8) {
        __m256 v = yacc[u][i];
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + r0));
        _mm256_storeu_ps(yr, v);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, yacc[u][i]);
        for (int64_t r = 0; r < nr; ++r) yr[r] = tmp[r] + (bias ? bias[r0 + r] : 0.f);
      }
    }
  }
}

// ntile = 1 or 2 consecutive tiles (2: the table loads are shared by 16 rows)
template <int PK, bool FOLD>
void lut_tile_all(const DenseGeom& g, const Act& a, const uint8_t* tp, int64_t tile, int ntile,
                  float* y, const float* bias) {
  int64_t m0 = 0;
  if (ntile == 2) {
    for (; m0 + 2 <= a.M; m0 += 2) lut_tile_mb<PK, 2, 2, FOLD>(g, a, tp, tile, m0, y, bias);
    if (a.M - m0 == 1) lut_tile_mb<PK, 1, 2, FOLD>(g, a, tp, tile, m0, y, bias);
    return;
  }
  for (; m0 + 4 <= a.M; m0 += 4) lut_tile_mb<PK, 4, 1, FOLD>(g, a, tp, tile, m0, y, bias);
  switch (a.M - m0) {
    case 3: lut_tile_mb<PK, 3, 1, FOLD>(g, a, tp, tile, m0, y, bias); break;
    case 2: lut_tile_mb<PK, 2, 1, FOLD>(g, a, tp, tile, m0, y, bias); break;
    case 1: lut_tile_mb<PK, 1, 1, FOLD>(g, a, tp, tile, m0, y, bias); break;
    default: break;
  }
}

template <int PK>
void lut_tile_fold(const DenseGeom& g, const Act& a, const uint8_t* tp, int64_t tile, int ntile,
                   float* y, const float* bias) {
  if (a.lut_max == LUT_MAX_FOLD) lut_tile_all<PK, true>(g, a, tp, tile, ntile, y, bias);
  else lut_tile_all<PK, false>(g, a, tp, tile, ntile, y, bias);
}

}  // namespace

namespace bitpress_cpu {

void dense_tile_lut_avx2(const DenseGeom& g, const Act& a, const uint8_t* tile_ptr, int64_t tile,
                         int ntile, float* y, const float* bias) {
  switch (g.pkind) {
    case P_F16: lut_tile_fold<P_F16>(g, a, tile_ptr, tile, ntile, y, bias); break;
    case P_BF16: lut_tile_fold<P_BF16>(g, a, tile_ptr, tile, ntile, y, bias); break;
    default: lut_tile_fold<P_F32>(g, a, tile_ptr, tile, ntile, y, bias); break;
  }
}

// Tables: for every 4 columns, entry i = sum of x_{4c+j} over the bits j of i, in fp32, then
// rounded (nearest) to an integer in [-lut_max, lut_max] with one step per segment,
// dl = max |entry| / lut_max (x is read as zero past `in`). Two passes per segment over an
// L1-resident fp32 scratch.
void build_lut_avx2(const float* x, int64_t M, int64_t in, int64_t seg, int64_t nseg,
                    int8_t* lut, int64_t lstride, float* dl, int lut_max) {
  const __m256 b0 = _mm256_setr_ps(0, 1, 0, 1, 0, 1, 0, 1);
  const __m256 b1 = _mm256_setr_ps(0, 0, 1, 1, 0, 0, 1, 1);
  const __m256 b2 = _mm256_setr_ps(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256 sign = _mm256_set1_ps(-0.f);
  alignas(32) float tmp[256 * 4];
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * in;
    int8_t* lr = lut + m * lstride;
    for (int64_t s = 0; s < nseg; ++s) {
      const int64_t k0 = s * seg;
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t c = 0; c < seg / 4; ++c) {
        float xv[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t k = k0 + 4 * c + j;
          xv[j] = k < in ? xr[k] : 0.f;
        }
        const __m256 lo = _mm256_fmadd_ps(_mm256_set1_ps(xv[2]), b2,
                          _mm256_fmadd_ps(_mm256_set1_ps(xv[1]), b1,
                                          _mm256_mul_ps(_mm256_set1_ps(xv[0]), b0)));
        const __m256 hi = _mm256_add_ps(lo, _mm256_set1_ps(xv[3]));
        _mm256_store_ps(tmp + 16 * c, lo);
        _mm256_store_ps(tmp + 16 * c + 8, hi);
        vmax = _mm256_max_ps(vmax, _mm256_max_ps(_mm256_andnot_ps(sign, lo),
                                                 _mm256_andnot_ps(sign, hi)));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      dl[m * nseg + s] = amax / float(lut_max);
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? float(lut_max) / amax : 0.f);
      int8_t* dst = lr + k0 * 4;
      for (int64_t c = 0; c < seg / 4; ++c) {
        const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(tmp + 16 * c), inv));
        const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(tmp + 16 * c + 8), inv));
        // packs works per 128-bit lane: [lo0-3 hi0-3 | lo4-7 hi4-7] -> reorder to 0..15
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
        const __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * c), b8);
      }
    }
  }
}


void dense_tile_avx2(const DenseGeom& g, const Act& a, const uint8_t* tile_ptr, int64_t tile,
                     float* y, const float* bias) {
  switch (g.bits) {
    case 2: tile_pk<2>(g, a, tile_ptr, tile, y, bias); break;
    case 3: tile_pk<3>(g, a, tile_ptr, tile, y, bias); break;
    default: tile_pk<4>(g, a, tile_ptr, tile, y, bias); break;
  }
}

void sparse_tiles_avx2(const SparseGeom& g, const Act& a, const uint8_t* tiles, int64_t t0,
                       int64_t t1, float* ylocal) {
  switch (g.bits) {
    case 2: sparse_pk<2>(g, a, tiles, t0, t1, ylocal); break;
    case 3: sparse_pk<3>(g, a, tiles, t0, t1, ylocal); break;
    default: sparse_pk<4>(g, a, tiles, t0, t1, ylocal); break;
  }
}

// 16-bit float weights [out, in] (fp16 via F16C, or bf16 by a shift), rows r0..r1 (r1 - r0 a
// multiple of 8 except at the end): y[m, r] = sum_k x[m, k] w[r, k] (+ bias), fp32 FMA.
// Eight rows at a time give eight independent accumulators per activation row.
void half_rows_avx2(const uint16_t* w, int bf16, int64_t out, int64_t in, const float* x,
                    int64_t M, float* y, const float* bias, int64_t r0, int64_t r1) {
  const int64_t in8 = in / 8 * 8;
  auto cvt = [bf16](const uint16_t* q) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                : _mm256_cvtph_ps(h);
  };
  auto tail = [bf16](uint16_t h) {
    return bf16 ? bf16_to_float(h) : half_to_float(h);
  };
  for (int64_t r = r0; r < r1; r += 8) {
    const int nr = int(std::min<int64_t>(8, r1 - r));
    const uint16_t* wr[8];
    for (int i = 0; i < 8; ++i) wr[i] = w + (r + std::min(i, nr - 1)) * in;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      // the 8 rows are one contiguous block read as 8 streams; while it is consumed,
      // prefetch the next block at the same relative position (it is 16 bytes per column)
      const char* nxt = reinterpret_cast<const char*>(w + (r + 8) * in);
      // (a prefetch past the end of the weight is harmless: it never faults)
      const bool pf = m == 0 && bitpress_cpu::g_prefetch_bytes > 0;
      for (int64_t k = 0; k < in8; k += 8) {
        if (pf && (k & 31) == 0)
          for (int j = 0; j < 8; ++j) _mm_prefetch(nxt + 16 * k + 64 * j, _MM_HINT_T0);
        const __m256 xv = _mm256_loadu_ps(xm + k);
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(cvt(wr[i] + k), xv, acc[i]);
      }
      for (int i = 0; i < nr; ++i) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        float t = _mm_cvtss_f32(v);
        for (int64_t k = in8; k < in; ++k) t += xm[k] * tail(wr[i][k]);
        y[m * out + r + i] = t + (bias ? bias[r + i] : 0.f);
      }
    }
  }
}

}  // namespace bitpress_cpu

#pragma GCC pop_options
#endif
