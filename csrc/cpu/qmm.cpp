// CPU implementations of bitpress::dense_qmm and bitpress::sparse_qmm: repacking, activation
// preparation, the portable scalar kernels, run-time ISA dispatch and the pybind11 bindings.
// Layouts are described in qmm.h; the SIMD kernels are in qmm_simd.inc, built per ISA by
// qmm_avx2.cpp, qmm_avx512.cpp and qmm_avx512_emu.cpp.
//
// Maths (both modes, per output row, per segment s of group g, u = c + off, off = 2^(b-1)):
//   y += scale_g * (sum_k u_k x_k - off * sum_k x_k) + zero_g * sum_k x_k
// exact mode: sum_k u_k x_k in fp32 FMA.
// int8 mode:  x_k ~ d_s * q_k with q_k = round(x_k / d_s), d_s = max|x| / 127 over the
//             segment; the integer dot product sum u_k q_k (u8 x s8) is scaled by d_s and the
//             offset term uses the same q (so the rounding error multiplies the signed codes):
//   y += scale_g * d_s * (sum_k u_k q_k - off * sum_k q_k) + zero_g * sum_k x_k
// The zero-point term always uses the exact fp32 sum of x.
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "qmm.h"

namespace py = pybind11;

namespace bitpress_cpu {
int64_t g_prefetch_bytes = 3072;
}  // namespace bitpress_cpu

namespace {

enum Isa : int { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3, ISA_AVX512_EMU = 4 };
int g_forced_isa = ISA_AUTO;
// minimum multiply-adds per thread before a call goes parallel (tests lower it to 1)
int64_t g_min_work = 65536;

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("avx");
  }();
  return has;
#else
  return false;
#endif
}

// AVX-512 F/BW/VL + VNNI (libgcc's check includes the OS saving the zmm state)
bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  return has;
#else
  return false;
#endif
}

// the emulated AVX-512 build runs on AVX2 and exists only where SIMDe was found at build time
bool have_avx512_emu() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(BITPRESS_HAVE_SIMDE)
  return cpu_has_avx2();
#else
  return false;
#endif
}

int resolved_isa() {
  if (g_forced_isa != ISA_AUTO) return g_forced_isa;
  return cpu_has_avx512() ? ISA_AVX512 : cpu_has_avx2() ? ISA_AVX2 : ISA_SCALAR;
}

const char* isa_name(int isa) {
  switch (isa) {
    case ISA_AVX2: return "avx2";
    case ISA_AVX512: return "avx512";
    case ISA_AVX512_EMU: return "avx512-emu";
    default: return "scalar";
  }
}

void set_isa(const std::string& name) {
  if (name == "auto") g_forced_isa = ISA_AUTO;
  else if (name == "scalar") g_forced_isa = ISA_SCALAR;
  else if (name == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("set_isa: 'avx2': this CPU has no AVX2+FMA");
    g_forced_isa = ISA_AVX2;
  } else if (name == "avx512") {
    if (!cpu_has_avx512())
      throw std::invalid_argument("set_isa: 'avx512': this CPU has no AVX-512 F/BW/VL + VNNI");
    g_forced_isa = ISA_AVX512;
  } else if (name == "avx512-emu") {
    if (!have_avx512_emu())
      throw std::invalid_argument("set_isa: 'avx512-emu' needs AVX2 and an extension built with "
                                  "the SIMDe headers (pip package simde-py)");
    g_forced_isa = ISA_AVX512_EMU;
  } else {
    throw std::invalid_argument("set_isa: expected 'auto', 'avx512', 'avx2', 'avx512-emu' or "
                                "'scalar', got '" + name + "'");
  }
}

std::string get_isa() { return isa_name(resolved_isa()); }

py::list available_isas() {
  py::list l;
  l.append("scalar");
  if (cpu_has_avx2()) l.append("avx2");
  if (cpu_has_avx512()) l.append("avx512");
  if (have_avx512_emu()) l.append("avx512-emu");
  return l;
}

// The SIMD kernels of one ISA (one build of qmm_simd.inc); nullptr for the scalar path.
struct SimdKernels {
  decltype(&bitpress_cpu::dense_tile_avx2) dense_tile;
  decltype(&bitpress_cpu::dense_tile_lut_avx2) dense_tile_lut;
  decltype(&bitpress_cpu::build_lut_avx2) build_lut;
  decltype(&bitpress_cpu::sparse_rows_avx2) sparse_rows;
  decltype(&bitpress_cpu::half_rows_avx2) half_rows;
  decltype(&bitpress_cpu::f32_rows_avx2) f32_rows;
  decltype(&bitpress_cpu::prep_row_avx2) prep_row;
};

const SimdKernels* simd_kernels(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
#define BITPRESS_KERNELS(SFX)                                                                 \
  SimdKernels{&bitpress_cpu::dense_tile_##SFX, &bitpress_cpu::dense_tile_lut_##SFX,           \
              &bitpress_cpu::build_lut_##SFX, &bitpress_cpu::sparse_rows_##SFX,               \
              &bitpress_cpu::half_rows_##SFX, &bitpress_cpu::f32_rows_##SFX,                  \
              &bitpress_cpu::prep_row_##SFX}
  static const SimdKernels avx2 = BITPRESS_KERNELS(avx2);
  static const SimdKernels avx512 = BITPRESS_KERNELS(avx512);
  if (isa == ISA_AVX2) return &avx2;
  if (isa == ISA_AVX512) return &avx512;
#if defined(BITPRESS_HAVE_SIMDE)
  static const SimdKernels emu = BITPRESS_KERNELS(avx512emu);
  if (isa == ISA_AVX512_EMU) return &emu;
#endif
#undef BITPRESS_KERNELS
#endif
  (void)isa;
  return nullptr;
}

int clamp_threads(int n) { return n < 1 ? 1 : n; }

void check_bits(int bits) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw std::invalid_argument("bitpress CPU kernels: bits must be 2, 3, 4 or 8");
}

// ---- repacking ---------------------------------------------------------------------------
inline uint32_t canon_code(const uint32_t* row, int bits, int64_t k) {
  const int pf = 32 / bits;
  return (row[k / pf] >> ((k % pf) * bits)) & ((1u << bits) - 1u);
}

// Place unsigned code u of tile-row r, segment-local column k into the segment's code bytes.
inline void put_dense_code(uint8_t* cp, int bits, int64_t seg, int r, int64_t k, uint32_t u) {
  if (bits != 3) {  // 2, 4, 8: code t of a 32-byte block in byte t % 4 at bit bits * (t / 4)
    const int cpd = 32 / bits;
    const int64_t blk = k / cpd;
    const int t = int(k % cpd);
    cp[blk * 32 + r * 4 + (t % 4)] |= uint8_t(u << (bits * (t / 4)));
  } else {
    const int64_t chunk = k / 32;
    const int kk = int(k % 32), h = kk / 16, t = kk % 16;
    const int nh = seg - chunk * 32 >= 32 ? 2 : 1;
    uint8_t* base = cp + chunk * 96;
    base[h * 32 + r * 4 + (t % 4)] |= uint8_t((u & 3u) << (2 * (t / 4)));
    base[nh * 32 + r * 4 + (t % 4)] |= uint8_t(((u >> 2) & 1u) << (4 * h + t / 4));
  }
}

// lut2 layout (qmm.h): the two bit planes of code u, row r, segment-local column k.
inline void put_lut2_code(uint8_t* cp, int r, int64_t k, uint32_t u) {
  const int64_t blk = k / 16;
  const int kk = int(k % 16), c = kk / 4, j = kk % 4, lane = c & 1, nibble = c >> 1;
  for (int p = 0; p < 2; ++p)
    cp[blk * 32 + 16 * lane + 2 * r + p] |= uint8_t(((u >> p) & 1u) << (4 * nibble + j));
}

inline uint32_t get_dense_code(const uint8_t* cp, int bits, int64_t seg, int r, int64_t k) {
  if (bits != 3) {
    const int cpd = 32 / bits;
    const int64_t blk = k / cpd;
    const int t = int(k % cpd);
    return (cp[blk * 32 + r * 4 + (t % 4)] >> (bits * (t / 4))) & ((1u << bits) - 1u);
  }
  const int64_t chunk = k / 32;
  const int kk = int(k % 32), h = kk / 16, t = kk % 16;
  const int nh = seg - chunk * 32 >= 32 ? 2 : 1;
  const uint8_t* base = cp + chunk * 96;
  const uint32_t lo = (base[h * 32 + r * 4 + (t % 4)] >> (2 * (t / 4))) & 3u;
  const uint32_t hi = (base[nh * 32 + r * 4 + (t % 4)] >> (4 * h + t / 4)) & 1u;
  return lo | hi << 2;
}

int64_t dense_packed_bytes(int64_t out, int64_t in, int bits, int64_t gs, int pkind) {
  check_bits(bits);
  return make_dense_geom(out, in, bits, gs, pkind).tiles *
         make_dense_geom(out, in, bits, gs, pkind).tile_bytes;
}

// layout 0: the 8-row interleaved layout; layout 1: lut2 (2-bit only, same size)
void repack_dense(uintptr_t qweight, int64_t out, int64_t words, int64_t in, int bits, int64_t gs,
                  uintptr_t scales, uintptr_t zeros, int pkind, uintptr_t dst, int nthreads,
                  int layout) {
  check_bits(bits);
  if (layout != 0 && (layout != 1 || bits != 2))
    throw std::invalid_argument("repack_dense: layout 1 (lut2) is for 2-bit weights only");
  if (words * (32 / bits) < in) throw std::invalid_argument("repack_dense: too few words");
  const DenseGeom g = make_dense_geom(out, in, bits, gs, pkind);
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight);
  const auto* sc = reinterpret_cast<const uint8_t*>(scales);
  const auto* zr = reinterpret_cast<const uint8_t*>(zeros);
  auto* d = reinterpret_cast<uint8_t*>(dst);
  const int ps = param_size(pkind);
  py::gil_scoped_release release;
  std::memset(d, 0, size_t(g.tiles * g.tile_bytes));
#if defined(_OPENMP)
#pragma omp parallel for num_threads(clamp_threads(nthreads)) schedule(static)
#endif
  for (int64_t t = 0; t < g.tiles; ++t) {
    uint8_t* tp = d + t * g.tile_bytes;
    for (int r = 0; r < 8; ++r) {
      const int64_t row = t * 8 + r;
      if (row >= out) break;
      const uint32_t* src = qw + row * words;
      for (int64_t s = 0; s < g.nseg; ++s) {
        uint8_t* cp = tp + dense_seg_offset(g, s);
        if (s == 0 || g.grouped) {
          uint8_t* pp = cp - g.param_bytes;
          const int64_t grp = g.grouped ? s : 0;
          std::memcpy(pp + r * ps, sc + (row * g.ng + grp) * ps, ps);
          std::memcpy(pp + (8 + r) * ps, zr + (row * g.ng + grp) * ps, ps);
        }
        const int64_t k0 = s * g.seg, k1 = std::min(in, k0 + g.seg);
        if (layout == 1)
          for (int64_t k = k0; k < k1; ++k) put_lut2_code(cp, r, k - k0, canon_code(src, bits, k));
        else
          for (int64_t k = k0; k < k1; ++k)
            put_dense_code(cp, bits, g.seg, r, k - k0, canon_code(src, bits, k));
      }
    }
  }
}

void check_sparse_layout(int layout, int bits) {
  if (layout != 0 && (layout != 1 || (bits != 2 && bits != 4)))
    throw std::invalid_argument("sparse layout must be 0 (row streams) or 1 (row tiles, 2- and "
                                "4-bit weights)");
}

int64_t sparse_packed_bytes(int64_t nnz, int64_t out, int64_t in, int bits, int64_t gs,
                            int pkind, int layout) {
  check_bits(bits);
  check_sparse_layout(layout, bits);
  if (nnz < 0 || out < 0 || in < 0 || gs < 16 || gs % 16)
    throw std::invalid_argument("sparse_packed_bytes: bad geometry");
  return layout == 1 ? make_sparse_tgeom(out, in, bits, gs, pkind, nnz).bytes
                     : make_sparse_geom(out, in, bits, gs, pkind, nnz).bytes;
}

// Bytes a repacked sparse weight's kernel reads (either layout, from its header): for row
// tiles the sections up to the end of the streams, less than sparse_packed_bytes allocates
// when the tiles are taller than 16 rows.
int64_t sparse_used_bytes(uintptr_t packed, int64_t nnz, int64_t out, int64_t in, int bits,
                          int64_t gs, int pkind) {
  const auto* hdr = reinterpret_cast<const int64_t*>(packed);
  if (hdr[0] != SPT_TAG) return make_sparse_geom(out, in, bits, gs, pkind, nnz).bytes;
  const SparseTGeom g = make_sparse_tgeom(out, in, bits, gs, pkind, nnz, hdr[1]);
  return g.off_data + reinterpret_cast<const int64_t*>(packed + g.off_toff)[g.tiles];
}

// Place unsigned code u of group column k into a group's sub-blocks (row-stream layout, qmm.h).
inline void put_sparse_code(uint8_t* gp, int bits, int64_t k, uint32_t u) {
  uint8_t* p = gp + (k / 16) * sparse_rec_bytes(bits);
  const int kk = int(k % 16);
  if (bits == 8) {
    p[kk] = uint8_t(u);
  } else if (bits == 4) {
    const int nib = kk / 2;  // dword kk % 2, bits 4 * nib
    p[(kk % 2) * 4 + nib / 2] |= uint8_t(u << (4 * (nib % 2)));
  } else {
    p[kk / 4] |= uint8_t((u & 3u) << (2 * (kk % 4)));
    if (bits == 3) p[4 + kk / 8] |= uint8_t((u >> 2) << (kk % 8));
  }
}

inline uint32_t get_sparse_code(const uint8_t* gp, int bits, int64_t k) {
  const uint8_t* p = gp + (k / 16) * sparse_rec_bytes(bits);
  const int kk = int(k % 16);
  if (bits == 8) return p[kk];
  if (bits == 4) {
    const int nib = kk / 2;
    return (p[(kk % 2) * 4 + nib / 2] >> (4 * (nib % 2))) & 15u;
  }
  uint32_t u = (p[kk / 4] >> (2 * (kk % 4))) & 3u;
  if (bits == 3) u |= ((p[4 + kk / 8] >> (kk % 8)) & 1u) << 2;
  return u;
}

// Block-sparse rows into the row-stream layout (qmm.h); dst holds sparse_packed_bytes bytes.
void repack_sparse_tiles(const int32_t* rp, const int32_t* ci, const uint32_t* qv, int64_t words,
                         const uint8_t* sc, const uint8_t* zr, int pkind, int64_t out, int64_t in,
                         int bits, int64_t gs, uint8_t* d, int64_t R);

// layout 0: row streams; layout 1: row tiles (2/4-bit) of tile_rows rows (0: the default)
void repack_sparse(uintptr_t row_ptr, uintptr_t col_idx, uintptr_t qvalues, int64_t words,
                   uintptr_t scales, uintptr_t zeros, int pkind, int64_t out, int64_t in,
                   int bits, int64_t gs, uintptr_t dst, int layout, int64_t tile_rows) {
  check_bits(bits);
  check_sparse_layout(layout, bits);
  if (tile_rows != 0 && tile_rows != 16 && tile_rows != 24 && tile_rows != 32)
    throw std::invalid_argument("repack_sparse: tile_rows must be 0 (default), 16, 24 or 32");
  if (words * (32 / bits) < gs) throw std::invalid_argument("repack_sparse: too few words");
  const auto* rp = reinterpret_cast<const int32_t*>(row_ptr);
  const auto* ci = reinterpret_cast<const int32_t*>(col_idx);
  const auto* qv = reinterpret_cast<const uint32_t*>(qvalues);
  const auto* sc = reinterpret_cast<const uint8_t*>(scales);
  const auto* zr = reinterpret_cast<const uint8_t*>(zeros);
  auto* d = reinterpret_cast<uint8_t*>(dst);
  const int64_t nnz = rp[out];
  if (layout == 1) {
    py::gil_scoped_release release;
    repack_sparse_tiles(rp, ci, qv, words, sc, zr, pkind, out, in, bits, gs, d, tile_rows);
    return;
  }
  const SparseGeom g = make_sparse_geom(out, in, bits, gs, pkind, nnz);
  const int ps = param_size(pkind);
  py::gil_scoped_release release;
  std::memset(d, 0, size_t(g.bytes));
  auto* rpo = reinterpret_cast<int64_t*>(d);
  auto* mk = reinterpret_cast<uint64_t*>(d + g.off_mask);
  for (int64_t r = 0; r <= out; ++r) rpo[r] = rp[r];
  const int64_t grp = g.sub * g.rec;
  for (int64_t r = 0; r < out; ++r) {
    const int64_t e0 = rp[r], n = rp[r + 1] - e0;
    if (n == 0) continue;  // (an all-pruned weight may pass null parameter pointers)
    uint8_t* base = d + g.off_data + e0 * g.per;  // [s n][z n][codes n]
    std::memcpy(base, sc + e0 * ps, size_t(n * ps));
    std::memcpy(base + n * ps, zr + e0 * ps, size_t(n * ps));
    for (int64_t e = e0; e < e0 + n; ++e) {
      const int64_t c = ci[e];
      mk[r * g.nw + c / 64] |= uint64_t(1) << (c % 64);
      const int64_t valid = std::min<int64_t>(gs, in - c * gs);
      uint8_t* cp = base + 2 * n * ps + (e - e0) * grp;
      for (int64_t k = 0; k < valid; ++k)
        put_sparse_code(cp, bits, k, canon_code(qv + e * words, bits, k));
    }
  }
}

// Fraction of a tiling's (tile, group) pairs with more than 16 kept rows (0 for R = 16).
double tiles_over16(const int32_t* rp, const int32_t* ci, int64_t out, int64_t ng, int64_t R) {
  std::vector<int32_t> cnt(static_cast<size_t>(ng));
  int64_t over = 0, all = 0;
  for (int64_t r0 = 0; r0 < out; r0 += R) {
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int64_t r = r0; r < std::min(out, r0 + R); ++r)
      for (int64_t e = rp[r]; e < rp[r + 1]; ++e) ++cnt[size_t(ci[e])];
    for (int32_t n : cnt) over += n > 16;
    all += ng;
  }
  return all ? double(over) / double(all) : 0.0;
}

// Block-sparse rows into the row-tile layout (layout 1, qmm.h); dst holds sparse_packed_bytes.
// R: rows per tile, 16, 24 or 32; 0 picks the tallest whose groups rarely (<= 5 %) hold more
// than 16 kept rows. Taller tiles fill the vectors better (a group's kept rows share one), but
// a group of more than 16 takes a second vector behind a branch that, when it goes either way
// often, mispredicts and stalls the weight stream. Measured with the AVX-512 kernel at
// 4096 columns, g16, random masks: in L2, R = 32 beats R = 16 by 14-34 % at 30-70 % density;
// streamed from DRAM at 50 % density (where R = 32 has 43 % of its groups over 16), R = 24
// reads at 66-79 % of the bandwidth, R = 16 at 61-75 %, R = 32 at 62-69 %.
void repack_sparse_tiles(const int32_t* rp, const int32_t* ci, const uint32_t* qv, int64_t words,
                         const uint8_t* sc, const uint8_t* zr, int pkind, int64_t out, int64_t in,
                         int bits, int64_t gs, uint8_t* d, int64_t R) {
  const int64_t nnz = rp[out];
  if (R == 0) {
    const int64_t ng = ceil_div(in, gs);
    R = tiles_over16(rp, ci, out, ng, 32) <= 0.05 ? 32
        : tiles_over16(rp, ci, out, ng, 24) <= 0.05 ? 24 : 16;
  }
  const SparseTGeom g = make_sparse_tgeom(out, in, bits, gs, pkind, nnz, R);
  const int ps = param_size(pkind);
  std::memset(d, 0, size_t(make_sparse_tgeom(out, in, bits, gs, pkind, nnz, 16).bytes));
  reinterpret_cast<int64_t*>(d)[0] = SPT_TAG;
  reinterpret_cast<int64_t*>(d)[1] = R;
  auto* toff = reinterpret_cast<int64_t*>(d + g.off_toff);
  auto* mk = reinterpret_cast<uint32_t*>(d + g.off_mask);
  uint8_t* data = d + g.off_data;
  std::vector<int64_t> ent(size_t(R * g.ng));
  int64_t pos = 0;
  for (int64_t t = 0; t < g.tiles; ++t) {
    toff[t] = pos;
    std::fill(ent.begin(), ent.end(), -1);
    for (int64_t i = 0; i < R && t * R + i < out; ++i)
      for (int64_t e = rp[t * R + i]; e < rp[t * R + i + 1]; ++e) ent[size_t(i * g.ng + ci[e])] = e;
    for (int64_t c = 0; c < g.ng; ++c) {
      int64_t kept[32];
      int n = 0;
      uint32_t m = 0;
      for (int64_t i = 0; i < R; ++i)
        if (ent[size_t(i * g.ng + c)] >= 0) {
          m |= 1u << i;
          kept[n++] = ent[size_t(i * g.ng + c)];
        }
      mk[t * g.ng + c] = m;
      uint8_t* p = data + pos;
      for (int j = 0; j < n; ++j) {
        std::memcpy(p + ps * j, sc + kept[j] * ps, size_t(ps));
        std::memcpy(p + ps * (n + j), zr + kept[j] * ps, size_t(ps));
      }
      p += n * g.pb;
      const int64_t valid = std::min<int64_t>(gs, in - c * gs);
      for (int64_t b = 0; b < g.sub; ++b)
        for (int j = 0; j < n; ++j) {
          uint32_t cw[2] = {0u, 0u};
          for (int kk = 0; kk < 16 && 16 * b + kk < valid; ++kk) {
            const uint32_t u = canon_code(qv + kept[j] * words, bits, 16 * b + kk);
            const int i = kk / 4, jj = kk % 4;
            if (bits == 4) cw[i / 2] |= u << (8 * jj + 4 * (i % 2));
            else cw[0] |= u << (8 * jj + 2 * i);
          }
          for (int64_t w = 0; w < g.W; ++w)
            std::memcpy(p + ((b * g.W + w) * n + j) * 4, &cw[w], 4);
        }
      pos += n * g.per;
    }
  }
  toff[g.tiles] = pos;
}

// ---- dequantisation (the GEMM path: dequantised row panels handed to BLAS) ------------------
// w = s * c + z (c = u - 2^(b-1)) as an fp32 product then an fp32 sum, the reference op's
// arithmetic: this translation unit is compiled without FMA, so nothing is contracted and the
// panel is bit-identical to bitpress.kernels.reference.dense_weight / sparse_weight.
template <int B>
inline void dequant_run(const uint32_t* src, int64_t k0, int64_t k1, float s, float z, float* d) {
  constexpr int pf = 32 / B;
  constexpr uint32_t mask = (1u << B) - 1u;
  constexpr int off = 1 << (B - 1);
  for (; k0 < k1 && k0 % pf != 0; ++k0)  // up to the first word boundary
    d[k0] = s * float(int((src[k0 / pf] >> ((k0 % pf) * B)) & mask) - off) + z;
  {  // whole words: a fixed-trip inner loop the compiler vectorises
    const int64_t w0 = k0 / pf, w1 = w0 + (k1 - k0) / pf;
    for (int64_t w = w0; w < w1; ++w) {
      const uint32_t v = src[w];
      float* dw = d + w * pf;
      for (int j = 0; j < pf; ++j) dw[j] = s * float(int((v >> (j * B)) & mask) - off) + z;
    }
    k0 = std::max(k0, w1 * pf);  // the head loop may have reached k1 inside a word
  }
  for (int64_t k = k0; k < k1; ++k) {
    const int c = int((src[k / pf] >> ((k % pf) * B)) & mask) - off;
    d[k] = s * float(c) + z;
  }
}

inline void dequant_run_bits(int bits, const uint32_t* src, int64_t k0, int64_t k1, float s,
                             float z, float* d) {
  if (bits == 2) dequant_run<2>(src, k0, k1, s, z, d);
  else if (bits == 3) dequant_run<3>(src, k0, k1, s, z, d);
  else if (bits == 8) dequant_run<8>(src, k0, k1, s, z, d);
  else dequant_run<4>(src, k0, k1, s, z, d);
}

// f(r) for every row of [r0, r1), split over threads when the rows hold enough columns.
template <class F>
void for_rows(int64_t r0, int64_t r1, int64_t in, int nthreads, F&& f) {
#if defined(_OPENMP)
#pragma omp parallel for num_threads(clamp_threads(nthreads)) schedule(static) \
    if ((r1 - r0) * in > 65536)
#endif
  for (int64_t r = r0; r < r1; ++r) f(r);
}

// Rows [r0, r1) of a canonical dense weight into dst [(r1 - r0), in] fp32. gs is the
// effective group size (in for per-channel); scales/zeros are [out, ceil(in/gs)].
void dequant_dense(uintptr_t qweight, int64_t words, int64_t in, int bits, int64_t gs,
                   uintptr_t scales, uintptr_t zeros, int pkind, int64_t r0, int64_t r1,
                   uintptr_t dst, int nthreads) {
  check_bits(bits);
  if (words * (32 / bits) < in) throw std::invalid_argument("dequant_dense: too few words");
  if (gs < 1) throw std::invalid_argument("dequant_dense: group size must be positive");
  const int64_t ng = ceil_div(in, gs);
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight);
  const auto* sc = reinterpret_cast<const uint8_t*>(scales);
  const auto* zr = reinterpret_cast<const uint8_t*>(zeros);
  auto* d = reinterpret_cast<float*>(dst);
  py::gil_scoped_release release;
  for_rows(r0, r1, in, nthreads, [&](int64_t r) {
    const uint32_t* src = qw + r * words;
    float* dr = d + (r - r0) * in;
    for (int64_t g = 0; g < ng; ++g) {
      const float s = load_param(sc, pkind, r * ng + g), z = load_param(zr, pkind, r * ng + g);
      dequant_run_bits(bits, src, g * gs, std::min(in, (g + 1) * gs), s, z, dr);
    }
  });
}

// Rows [r0, r1) of a block-sparse-row weight into dst [(r1 - r0), in] fp32 (pruned groups 0).
void dequant_sparse(uintptr_t row_ptr, uintptr_t col_idx, uintptr_t qvalues, int64_t words,
                    uintptr_t scales, uintptr_t zeros, int pkind, int64_t in, int bits,
                    int64_t gs, int64_t r0, int64_t r1, uintptr_t dst, int nthreads) {
  check_bits(bits);
  if (words * (32 / bits) < gs) throw std::invalid_argument("dequant_sparse: too few words");
  const auto* rp = reinterpret_cast<const int32_t*>(row_ptr);
  const auto* ci = reinterpret_cast<const int32_t*>(col_idx);
  const auto* qv = reinterpret_cast<const uint32_t*>(qvalues);
  const auto* sc = reinterpret_cast<const uint8_t*>(scales);
  const auto* zr = reinterpret_cast<const uint8_t*>(zeros);
  auto* d = reinterpret_cast<float*>(dst);
  py::gil_scoped_release release;
  for_rows(r0, r1, in, nthreads, [&](int64_t r) {
    float* dr = d + (r - r0) * in;
    std::memset(dr, 0, size_t(in) * sizeof(float));
    for (int64_t e = rp[r]; e < rp[r + 1]; ++e) {
      const int64_t k0 = int64_t(ci[e]) * gs, n = std::min<int64_t>(gs, in - k0);
      // codes of one group start at bit 0 of the entry's first word: dequantise into the
      // group's slice with local indices
      dequant_run_bits(bits, qv + e * words, 0, n, load_param(sc, pkind, e),
                       load_param(zr, pkind, e), dr + k0);
    }
  });
}

// ---- activations ----------------------------------------------------------------------------
struct ActBuf {
  Act a;
  std::vector<int8_t> q, lut;
  std::vector<float> xf, d, b, xs, dl;
};

// The activation buffer of a call: the calling thread's own, reused from call to call (a
// decode step makes hundreds of small calls; allocating and zeroing their buffers cost more
// than preparing them), or `local` for a large call, whose buffers should not outlive it.
ActBuf& act_buf(ActBuf& local, int64_t M, int64_t in) {
  static thread_local ActBuf reused;
  return M * in <= (int64_t(1) << 18) ? reused : local;
}

// sum and max |x| of x[0..n) in 8 independent lanes, which the compiler vectorises (a plain
// loop's sum is one serial chain); the lanes are added in a fixed order, so the bits do not
// depend on the ISA. amax ignores NaN as std::max(amax, |x|) does.
inline void sum_amax(const float* x, int64_t n, float& sum, float& amax) {
  float s8[8] = {}, a8[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) {
      const float v = std::fabs(x[k + j]);
      s8[j] += x[k + j];
      a8[j] = a8[j] < v ? v : a8[j];
    }
  for (int j = 0; k < n; ++k, ++j) {
    const float v = std::fabs(x[k]);
    s8[j] += x[k];
    a8[j] = a8[j] < v ? v : a8[j];
  }
  sum = ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7]));
  amax = 0.f;
  for (int j = 0; j < 8; ++j) amax = std::max(amax, a8[j]);
}

void prepare_act(ActBuf& ab, const float* x, int64_t M, int64_t in, int64_t seg, int64_t nseg,
                 int bits, int mode, int nthreads, int lut_max = LUT_MAX, bool planes = false) {
  Act& a = ab.a;
  a.mode = mode; a.M = M; a.seg = seg; a.nseg = nseg; a.lut_max = lut_max;
  a.stride = nseg * seg + 64;  // kernels may read (zero-code-weighted) bytes past a group
  // the int8 and planes forms are prepared by the ISA's prep_row (qmm_simd.inc); the loop
  // below is the scalar ISA's (int8, fp32 exact) and the lut mode's
  const SimdKernels* kern = simd_kernels(resolved_isa());
  a.planes = planes && mode == MODE_EXACT && kern != nullptr;
  const float off = float(1 << (bits - 1));
  // every entry below is written, except the padding columns [in, stride) of q / xf rows,
  // zeroed here: an ActBuf may be reused from call to call (act_buf)
  ab.xs.resize(size_t(M * nseg));
  ab.b.resize(size_t(M * nseg));
  if (mode == MODE_LUT) {
    a.lstride = nseg * seg * 4;
    ab.lut.resize(size_t(M * a.lstride));
    ab.dl.resize(size_t(M * nseg));
  } else if (mode == MODE_INT8 || a.planes) {
    const int64_t rows = (a.planes ? 3 : 1) * M;
    ab.q.resize(size_t(rows * a.stride));
    ab.d.resize(size_t(rows * nseg));
    for (int64_t r = 0; r < rows; ++r)
      std::memset(ab.q.data() + r * a.stride + in, 0, size_t(a.stride - in));
  } else {  // exact mode on the scalar path
    ab.xf.resize(size_t(M * a.stride));
    for (int64_t m = 0; m < M; ++m)
      std::fill(ab.xf.data() + m * a.stride + in, ab.xf.data() + (m + 1) * a.stride, 0.f);
  }
#if defined(_OPENMP)
#pragma omp parallel for num_threads(clamp_threads(nthreads)) schedule(static) if (M * in > 32768)
#endif
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * in;
    if (kern && (mode == MODE_INT8 || a.planes)) {
      const int64_t np = a.planes ? 3 : 1;
      kern->prep_row(xr, in, seg, nseg, off, a.planes, ab.q.data() + np * m * a.stride, a.stride,
                     ab.d.data() + np * m * nseg, ab.b.data() + m * nseg, ab.xs.data() + m * nseg);
      continue;
    }
    for (int64_t s = 0; s < nseg; ++s) {
      const int64_t k0 = s * seg, k1 = std::min(in, k0 + seg);
      float sum, amax;
      sum_amax(xr + k0, k1 - k0, sum, amax);
      const int64_t idx = m * nseg + s;
      ab.xs[idx] = sum;
      if (mode == MODE_INT8) {
        const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int8_t* qr = ab.q.data() + m * a.stride;
        int32_t qsum = 0;
        for (int64_t k = k0; k < k1; ++k) {  // round half away from zero; |x*id| <= 127
          const float v = xr[k] * id;
          const int8_t qv = int8_t(int(v + (v >= 0.f ? 0.5f : -0.5f)));
          qr[k] = qv;
          qsum += qv;
        }
        ab.d[idx] = dd;
        ab.b[idx] = dd * off * float(qsum);
      } else if (mode == MODE_LUT) {
        ab.b[idx] = off * sum;
      } else {
        std::memcpy(ab.xf.data() + m * a.stride + k0, xr + k0, size_t(k1 - k0) * 4);
        ab.b[idx] = off * sum;
      }
    }
  }
  a.q = ab.q.data(); a.xf = ab.xf.data(); a.d = ab.d.data();
  a.b = ab.b.data();
  a.xs = ab.xs.data();
  if (mode == MODE_LUT)  // the caller checked that an ISA with a lut kernel is in use
    simd_kernels(resolved_isa())->build_lut(x, M, in, seg, nseg, ab.lut.data(), a.lstride,
                                            ab.dl.data(), lut_max);
  a.lut = ab.lut.data(); a.dl = ab.dl.data();
}

// Sparse kernels' activations (SpAct in qmm.h): per group of gs columns, xs = sum(x) and the
// pre-scaled x (x * 2^-e(k % 16)); in the int8 mode the group is rounded to int8 as the dense
// int8 mode rounds a segment (same scale, same rounding) and xq, xhs are those of d * q.
struct SpActBuf {
  SpAct a;
  std::vector<float> xq, xs, xhs;
  float* xq64 = nullptr;  // xq's first 64-byte-aligned float: a group's 16 floats are one line
};

void prepare_sparse_act(SpActBuf& sb, const float* x, int64_t M, int64_t in, int64_t gs,
                        int64_t ng, int bits, int mode, int nthreads) {
  SpAct& a = sb.a;
  a.M = M; a.ng = ng; a.stride = ng * gs + 64;
  sb.xq.assign(size_t(M * a.stride + 16), 0.f);
  {
    const auto addr = reinterpret_cast<uintptr_t>(sb.xq.data());
    sb.xq64 = sb.xq.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
  sb.xs.assign(size_t(M * ng), 0.f);
  const bool i8 = mode == MODE_INT8;
  if (i8) sb.xhs.assign(size_t(M * ng), 0.f);
  float pre[16];
  for (int k = 0; k < 16; ++k) pre[k] = std::ldexp(1.f, -sparse_exp(bits, k));
#if defined(_OPENMP)
#pragma omp parallel for num_threads(clamp_threads(nthreads)) schedule(static) if (M * in > 32768)
#endif
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * in;
    float* xq = sb.xq64 + m * a.stride;
    for (int64_t c = 0; c < ng; ++c) {
      const int64_t k0 = c * gs, k1 = std::min(in, k0 + gs);
      float sum = 0.f, amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) sum += xr[k];
      if (i8)
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xr[k]));
      sb.xs[size_t(m * ng + c)] = sum;
      if (i8) {
        const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        float hs = 0.f;
        for (int64_t k = k0; k < k1; ++k) {  // round half away from zero, as prepare_act
          const float v = xr[k] * id;
          const float xh = float(int(v + (v >= 0.f ? 0.5f : -0.5f))) * dd;
          hs += xh;
          xq[k] = xh * pre[k % 16];
        }
        sb.xhs[size_t(m * ng + c)] = hs;
      } else {
        for (int64_t k = k0; k < k1; ++k) xq[k] = xr[k] * pre[k % 16];
      }
    }
  }
  a.xq = sb.xq64; a.xs = sb.xs.data(); a.xhs = i8 ? sb.xhs.data() : nullptr;
}

// ---- scalar kernels ---------------------------------------------------------------------------
void dense_tile_scalar(const DenseGeom& g, const Act& a, const uint8_t* tp, int64_t tile,
                       float* y, const float* bias) {
  for (int r = 0; r < 8; ++r) {
    const int64_t row = tile * 8 + r;
    if (row >= g.out) break;
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f, s = 0.f, z = 0.f;
      for (int64_t sg = 0; sg < g.nseg; ++sg) {
        const uint8_t* cp = tp + dense_seg_offset(g, sg);
        if (sg == 0 || g.grouped) {
          s = load_param(cp - g.param_bytes, g.pkind, r);
          z = load_param(cp - g.param_bytes, g.pkind, 8 + r);
        }
        const int64_t k0 = sg * g.seg, idx = m * a.nseg + sg;
        float t;
        if (a.mode == MODE_INT8) {
          const int8_t* q = a.q + m * a.stride + k0;
          int32_t isum = 0;
          for (int64_t k = 0; k < g.seg; ++k)
            isum += int32_t(get_dense_code(cp, g.bits, g.seg, r, k)) * q[k];
          t = float(isum) * a.d[idx] - a.b[idx];
        } else {
          const float* x = a.xf + m * a.stride + k0;
          float f = 0.f;
          for (int64_t k = 0; k < g.seg; ++k)
            f += float(get_dense_code(cp, g.bits, g.seg, r, k)) * x[k];
          t = f - a.b[idx];
        }
        acc += s * t + z * a.xs[idx];
      }
      y[m * g.out + row] = acc + (bias ? bias[row] : 0.f);
    }
  }
}

// rows r0..r1 of the row-stream layout, scalar (the SIMD kernels' arithmetic, one lane)
void sparse_rows_scalar(const SparseGeom& g, const SpAct& a, const uint8_t* buf, int64_t r0,
                        int64_t r1, float* y, const float* bias) {
  const auto* rp = reinterpret_cast<const int64_t*>(buf);
  const auto* mask = reinterpret_cast<const uint64_t*>(buf + g.off_mask);
  const int ps = param_size(g.pkind);
  const int64_t grp = g.sub * g.rec;
  const float off = float(1 << (g.bits - 1));
  float pw[16];
  for (int k = 0; k < 16; ++k) pw[k] = std::ldexp(1.f, sparse_exp(g.bits, k));
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f, zacc = 0.f;
      const int64_t n = rp[r + 1] - rp[r];
      const uint8_t* base = buf + g.off_data + rp[r] * g.per;
      const uint8_t* codes = base + 2 * n * ps;
      int64_t e = 0;  // kept group of the row
      for (int64_t w = 0; w < g.nw; ++w)
        for (uint64_t bits = mask[r * g.nw + w]; bits; bits &= bits - 1, ++e) {
          const int64_t c = w * 64 + __builtin_ctzll(bits);
          const float s = load_param(base, g.pkind, e);
          const float z = load_param(base + n * ps, g.pkind, e);
          const float* xq = a.xq + m * a.stride + c * g.gs;
          float t = 0.f;
          for (int64_t k = 0; k < g.gs; ++k)
            t += float(get_sparse_code(codes + e * grp, g.bits, k)) * pw[k % 16] * xq[k];
          acc += s * t;
          const int64_t idx = m * g.ng + c;
          zacc += a.xhs ? z * a.xs[idx] - s * off * a.xhs[idx] : (z - s * off) * a.xs[idx];
        }
      y[m * g.out + r] = acc + zacc + (bias ? bias[r] : 0.f);
    }
  }
}

// tiles t0..t1 of the row-tile layout (layout 1), scalar: the AVX-512 kernel's arithmetic per
// kept row, on fp32 activations (exact mode) or the int8 ones
void sparse_tiles_scalar(const SparseTGeom& g, const Act& a, const uint8_t* buf, int64_t t0,
                         int64_t t1, float* y, const float* bias) {
  const auto* toff = reinterpret_cast<const int64_t*>(buf + g.off_toff);
  const auto* mask = reinterpret_cast<const uint32_t*>(buf + g.off_mask);
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m = 0; m < a.M; ++m) {
      float acc[32] = {};
      const uint8_t* p = buf + g.off_data + toff[t];
      for (int64_t c = 0; c < g.ng; ++c) {
        const uint32_t k = mask[t * g.ng + c];
        const int64_t n = __builtin_popcount(k);
        const uint8_t* cp = p + n * g.pb;
        const int64_t idx = m * a.nseg + c;
        for (int i = 0, j = 0; i < 32; ++i) {
          if (!(k >> i & 1u)) continue;
          const float s = load_param(p, g.pkind, j);
          const float z = load_param(p + n * param_size(g.pkind), g.pkind, j);
          int32_t isum = 0;
          float f = 0.f;
          for (int64_t b = 0; b < g.sub; ++b)
            for (int kk = 0; kk < 16; ++kk) {
              const int q = kk / 4, jj = kk % 4;
              uint32_t w;
              std::memcpy(&w, cp + ((b * g.W + (g.bits == 4 ? q / 2 : 0)) * n + j) * 4, 4);
              const uint32_t u = g.bits == 4 ? (w >> (8 * jj + 4 * (q % 2))) & 15u
                                             : (w >> (8 * jj + 2 * q)) & 3u;
              const int64_t col = c * g.gs + 16 * b + kk;
              if (a.mode == MODE_INT8) isum += int32_t(u) * a.q[m * a.stride + col];
              else f += float(u) * a.xf[m * a.stride + col];
            }
          const float tv = a.mode == MODE_INT8 ? float(isum) * a.d[idx] - a.b[idx] : f - a.b[idx];
          acc[i] += s * tv + z * a.xs[idx];
          ++j;
        }
        p += n * g.per;
      }
      for (int64_t i = 0; i < g.R && t * g.R + i < g.out; ++i)
        y[m * g.out + t * g.R + i] = acc[i] + (bias ? bias[t * g.R + i] : 0.f);
    }
}

// ---- entry points -------------------------------------------------------------------------------
void dense_qmm_core(uintptr_t packed, int64_t out, int64_t in, int bits, int64_t gs, int pkind,
                    uintptr_t x, int64_t M, uintptr_t y, uintptr_t bias, int mode, int nthreads) {
  check_bits(bits);
  const DenseGeom g = make_dense_geom(out, in, bits, gs, pkind);
  const auto* pk = reinterpret_cast<const uint8_t*>(packed);
  auto* yp = reinterpret_cast<float*>(y);
  const auto* bp = reinterpret_cast<const float*>(bias);
  const SimdKernels* kern = simd_kernels(resolved_isa());
  const int lut_max = mode == MODE_LUT63 ? LUT_MAX_FOLD : LUT_MAX;
  if (mode == MODE_LUT63) mode = MODE_LUT;
  if (mode == MODE_LUT && (bits != 2 || kern == nullptr))
    throw std::invalid_argument("qmm_dense: modes 2/3 (lut/lut63) need 2-bit weights in the "
                                "lut2 layout and a SIMD ISA (avx2, avx512)");
  ActBuf local;
  ActBuf& ab = act_buf(local, M, in);
  prepare_act(ab, reinterpret_cast<const float*>(x), M, in, g.seg, g.nseg, bits, mode, nthreads,
              lut_max, /*planes=*/kern != nullptr);
  const Act& a = ab.a;
  // below ~64k MACs per thread a parallel region costs more than it saves
  int nt = int(std::min<int64_t>(clamp_threads(nthreads),
                                 std::max<int64_t>(1, std::min(g.tiles, M * out * in / g_min_work))));
  if (mode == MODE_LUT) {
    // batch 1: pairs of tiles (16 rows) share the table loads
    const int tt = M == 1 ? 2 : 1;
    const int64_t units = ceil_div(g.tiles, tt);
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t u = 0; u < units; ++u) {
      const int64_t t = u * tt;
      kern->dense_tile_lut(g, a, pk + t * g.tile_bytes, t,
                           int(std::min<int64_t>(tt, g.tiles - t)), yp, bp);
    }
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t t = 0; t < g.tiles; ++t) {
    const uint8_t* tp = pk + t * g.tile_bytes;
    if (kern) {
      kern->dense_tile(g, a, tp, t, yp, bp);
      continue;
    }
    dense_tile_scalar(g, a, tp, t, yp, bp);
  }
}

// y[M, out] = x[M, in] @ w[out, in]^T (+ bias) for a 16-bit float weight (fp16, or bf16 when
// bf16 != 0), fp32 accumulation: the GEMV of an unquantised 16-bit layer (e.g. an output head
// kept in half precision), half the bytes of fp32 at fp32 arithmetic.
void half_linear_core(uintptr_t w, int bf16, int64_t out, int64_t in, uintptr_t x, int64_t M,
                      uintptr_t y, uintptr_t bias, int nthreads) {
  if (out < 0 || in < 0 || M < 0) throw std::invalid_argument("half_linear: negative size");
  const auto* wp = reinterpret_cast<const uint16_t*>(w);
  const auto* xp = reinterpret_cast<const float*>(x);
  auto* yp = reinterpret_cast<float*>(y);
  const auto* bp = reinterpret_cast<const float*>(bias);
  const SimdKernels* kern = simd_kernels(resolved_isa());
  const int64_t units = ceil_div(out, 8);
  const int nt = int(std::min<int64_t>(clamp_threads(nthreads),
                                       std::max<int64_t>(1, std::min(units, M * out * in / g_min_work))));
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t u = 0; u < units; ++u) {
    const int64_t r0 = u * 8, r1 = std::min<int64_t>(out, r0 + 8);
    if (kern) {
      kern->half_rows(wp, bf16, out, in, xp, M, yp, bp, r0, r1);
      continue;
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = r0; r < r1; ++r) {
        const uint16_t* wr = wp + r * in;
        const float* xm = xp + m * in;
        float t = 0.f;
        for (int64_t k = 0; k < in; ++k) t += xm[k] * (bf16 ? bf16_to_float(wr[k]) : half_to_float(wr[k]));
        yp[m * out + r] = t + (bp ? bp[r] : 0.f);
      }
  }
}

// body(lo, hi) on nt threads over [0, n), cut where the non-decreasing prefix sums prefix[0..n]
// (prefix[n] the total work) cross equal shares: task-centric splitting, so a skewed
// distribution of kept groups over rows or tiles cannot idle a core
template <typename F>
void parallel_by_prefix(const int64_t* prefix, int64_t n, int nt, F body) {
  const int64_t total = prefix[n];
  auto at = [&](int t) -> int64_t {
    if (t <= 0) return 0;
    if (t >= nt) return n;
    return std::lower_bound(prefix, prefix + n + 1, total * t / nt) - prefix;
  };
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
#if defined(_OPENMP)
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    const int64_t lo = std::min(n, at(t)), hi = std::min(n, at(t + 1));
    if (lo < hi) body(lo, hi);
  }
}

// the row-tile layout: activations prepared as for a dense weight with segment = group (int8
// planes in the exact mode where the AVX-512 kernel runs), tiles split over threads by bytes
void sparse_tiles_core(uintptr_t packed, int64_t nnz, int64_t out, int64_t in, int bits,
                       int64_t gs, int pkind, uintptr_t x, int64_t M, uintptr_t y, uintptr_t bias,
                       int mode, int nthreads) {
  check_sparse_layout(1, bits);
  const auto* buf = reinterpret_cast<const uint8_t*>(packed);
  const int64_t R = reinterpret_cast<const int64_t*>(buf)[1];
  if (R != 16 && R != 24 && R != 32)
    throw std::invalid_argument("sparse_qmm: corrupt row-tile header");
  const SparseTGeom g = make_sparse_tgeom(out, in, bits, gs, pkind, nnz, R);
  const auto* toff = reinterpret_cast<const int64_t*>(buf + g.off_toff);
  if (toff[0] != 0 || toff[g.tiles] > nnz * g.per)
    throw std::invalid_argument("sparse_qmm: the packed weight does not hold nnz kept groups");
  if (mode == MODE_LUT || mode == MODE_LUT63) mode = MODE_INT8;
  auto* yp = reinterpret_cast<float*>(y);
  const auto* bp = reinterpret_cast<const float*>(bias);
#if defined(__x86_64__) || defined(_M_X64)
  const bool simd = resolved_isa() == ISA_AVX512;
#else
  const bool simd = false;
#endif
  ActBuf local;
  ActBuf& ab = act_buf(local, M, in);
  prepare_act(ab, reinterpret_cast<const float*>(x), M, in, gs, g.ng, bits, mode, nthreads,
              LUT_MAX, /*planes=*/simd);
  const Act& a = ab.a;
  const int nt = int(std::min<int64_t>(clamp_threads(nthreads),
                                       std::max<int64_t>(1, std::min(g.tiles, M * nnz * gs / g_min_work))));
  parallel_by_prefix(toff, g.tiles, nt, [&](int64_t t0, int64_t t1) {
#if defined(__x86_64__) || defined(_M_X64)
    if (simd) bitpress_cpu::sparse_tiles_avx512(g, a, buf, t0, t1, yp, bp);
    else
#endif
      sparse_tiles_scalar(g, a, buf, t0, t1, yp, bp);
  });
}

void sparse_qmm_core(uintptr_t packed, int64_t nnz, int64_t out, int64_t in, int bits,
                     int64_t gs, int pkind, uintptr_t x, int64_t M, uintptr_t y, uintptr_t bias,
                     int mode, int nthreads) {
  check_bits(bits);
  if (reinterpret_cast<const int64_t*>(packed)[0] == SPT_TAG) {
    sparse_tiles_core(packed, nnz, out, in, bits, gs, pkind, x, M, y, bias, mode, nthreads);
    return;
  }
  const SparseGeom g = make_sparse_geom(out, in, bits, gs, pkind, nnz);
  const auto* buf = reinterpret_cast<const uint8_t*>(packed);
  const auto* rp = reinterpret_cast<const int64_t*>(buf);
  if (rp[0] != 0 || rp[out] != nnz)
    throw std::invalid_argument("sparse_qmm: the packed weight does not hold nnz kept groups");
  if (mode == MODE_LUT || mode == MODE_LUT63) mode = MODE_INT8;  // no lut kernel for sparse rows
  auto* yp = reinterpret_cast<float*>(y);
  const auto* bp = reinterpret_cast<const float*>(bias);
  const SimdKernels* kern = simd_kernels(resolved_isa());
  SpActBuf sab;
  prepare_sparse_act(sab, reinterpret_cast<const float*>(x), M, in, gs, g.ng, bits, mode,
                     nthreads);
  const SpAct& a = sab.a;
  // Task-centric split: row ranges holding equal numbers of kept groups, whatever their rows
  const int nt = int(std::min<int64_t>(clamp_threads(nthreads),
                                       std::max<int64_t>(1, std::min(out, M * nnz * gs / g_min_work))));
  parallel_by_prefix(rp, out, nt, [&](int64_t r0, int64_t r1) {
    if (kern) kern->sparse_rows(g, a, buf, r0, r1, yp, bp);
    else sparse_rows_scalar(g, a, buf, r0, r1, yp, bp);
  });
}

// y[M, out] = x[M, in] @ w[out, in]^T (+ bias) for an fp32 weight (an unquantised layer in the
// decode engine): 8 rows per unit, 8 fp32 accumulators per activation row.
void f32_linear_core(uintptr_t w, int64_t out, int64_t in, uintptr_t x, int64_t M, uintptr_t y,
                     uintptr_t bias, int nthreads) {
  if (out < 0 || in < 0 || M < 0) throw std::invalid_argument("f32_linear: negative size");
  const auto* wp = reinterpret_cast<const float*>(w);
  const auto* xp = reinterpret_cast<const float*>(x);
  auto* yp = reinterpret_cast<float*>(y);
  const auto* bp = reinterpret_cast<const float*>(bias);
  const SimdKernels* kern = simd_kernels(resolved_isa());
  const int64_t units = ceil_div(out, 8);
  const int nt = int(std::min<int64_t>(clamp_threads(nthreads),
                                       std::max<int64_t>(1, std::min(units, M * out * in / g_min_work))));
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t u = 0; u < units; ++u) {
    const int64_t r0 = u * 8, r1 = std::min<int64_t>(out, r0 + 8);
    if (kern) {
      kern->f32_rows(wp, out, in, xp, M, yp, bp, r0, r1);
      continue;
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = r0; r < r1; ++r) {
        const float* wr = wp + r * in;
        const float* xm = xp + m * in;
        float t = 0.f;
        for (int64_t k = 0; k < in; ++k) t += xm[k] * wr[k];
        yp[m * out + r] = t + (bp ? bp[r] : 0.f);
      }
  }
}

// the Python entry points release the GIL around the kernels (the engine calls the cores)
template <typename F, typename... A>
void released(F f, A... a) {
  py::gil_scoped_release release;
  f(a...);
}

void dense_qmm(uintptr_t packed, int64_t out, int64_t in, int bits, int64_t gs, int pkind,
               uintptr_t x, int64_t M, uintptr_t y, uintptr_t bias, int mode, int nthreads) {
  released(dense_qmm_core, packed, out, in, bits, gs, pkind, x, M, y, bias, mode, nthreads);
}
void sparse_qmm(uintptr_t packed, int64_t nnz, int64_t out, int64_t in, int bits, int64_t gs,
                int pkind, uintptr_t x, int64_t M, uintptr_t y, uintptr_t bias, int mode,
                int nthreads) {
  released(sparse_qmm_core, packed, nnz, out, in, bits, gs, pkind, x, M, y, bias, mode,
           nthreads);
}
void half_linear(uintptr_t w, int bf16, int64_t out, int64_t in, uintptr_t x, int64_t M,
                 uintptr_t y, uintptr_t bias, int nthreads) {
  released(half_linear_core, w, bf16, out, in, x, M, y, bias, nthreads);
}
void f32_linear(uintptr_t w, int64_t out, int64_t in, uintptr_t x, int64_t M, uintptr_t y,
                uintptr_t bias, int nthreads) {
  released(f32_linear_core, w, out, in, x, M, y, bias, nthreads);
}

py::dict dense_geometry(int64_t out, int64_t in, int bits, int64_t gs, int pkind) {
  check_bits(bits);
  const DenseGeom g = make_dense_geom(out, in, bits, gs, pkind);
  py::dict d;
  d["seg"] = g.seg; d["nseg"] = g.nseg; d["ng"] = g.ng; d["tiles"] = g.tiles;
  d["tile_bytes"] = g.tile_bytes; d["bytes"] = g.tiles * g.tile_bytes;
  return d;
}

}  // namespace

// raw entry points for other C++ (the decode engine, engine.cpp): no GIL, no Python objects
namespace bitpress_cpu {
void dense_qmm_raw(const uint8_t* packed, int64_t out, int64_t in, int bits, int64_t gs,
                   int pkind, const float* x, int64_t M, float* y, const float* bias, int mode,
                   int nthreads) {
  dense_qmm_core(uintptr_t(packed), out, in, bits, gs, pkind, uintptr_t(x), M, uintptr_t(y),
                 uintptr_t(bias), mode, nthreads);
}
void sparse_qmm_raw(const uint8_t* packed, int64_t nnz, int64_t out, int64_t in, int bits,
                    int64_t gs, int pkind, const float* x, int64_t M, float* y,
                    const float* bias, int mode, int nthreads) {
  sparse_qmm_core(uintptr_t(packed), nnz, out, in, bits, gs, pkind, uintptr_t(x), M,
                  uintptr_t(y), uintptr_t(bias), mode, nthreads);
}
void half_linear_raw(const uint16_t* w, int bf16, int64_t out, int64_t in, const float* x,
                     int64_t M, float* y, const float* bias, int nthreads) {
  half_linear_core(uintptr_t(w), bf16, out, in, uintptr_t(x), M, uintptr_t(y), uintptr_t(bias),
                   nthreads);
}
void f32_linear_raw(const float* w, int64_t out, int64_t in, const float* x, int64_t M,
                    float* y, const float* bias, int nthreads) {
  f32_linear_core(uintptr_t(w), out, in, uintptr_t(x), M, uintptr_t(y), uintptr_t(bias),
                  nthreads);
}
}  // namespace bitpress_cpu

void bitpress_register_qmm(py::module_& m) {
  m.def("qmm_set_isa", &set_isa, py::arg("name"),
        "Force the CPU kernel ISA: 'auto' (best the CPU has), 'avx2' or 'scalar'.");
  m.def("qmm_get_isa", &get_isa, "ISA the CPU kernels use now.");
  m.def("qmm_set_min_work", [](int64_t n) { g_min_work = n < 1 ? 1 : n; }, py::arg("macs"),
        "Multiply-adds per thread below which a call runs on fewer threads (default 65536).");
  m.def("qmm_set_prefetch", [](int64_t n) { bitpress_cpu::g_prefetch_bytes = n < 0 ? 0 : n; },
        py::arg("nbytes"), "Bytes ahead of the weight stream the AVX2 kernels prefetch (0 = off).");
  m.def("qmm_get_prefetch", [] { return bitpress_cpu::g_prefetch_bytes; });
  m.def("qmm_available_isas", &available_isas, "ISAs this CPU can run.");
  m.def("qmm_dense_packed_bytes", &dense_packed_bytes, py::arg("out"), py::arg("in_features"),
        py::arg("bits"), py::arg("group_size"), py::arg("pkind"));
  m.def("qmm_dense_geometry", &dense_geometry, py::arg("out"), py::arg("in_features"),
        py::arg("bits"), py::arg("group_size"), py::arg("pkind"));
  m.def("qmm_repack_dense", &repack_dense, py::arg("qweight_ptr"), py::arg("out"),
        py::arg("words"), py::arg("in_features"), py::arg("bits"), py::arg("group_size"),
        py::arg("scales_ptr"), py::arg("zeros_ptr"), py::arg("pkind"), py::arg("dst_ptr"),
        py::arg("nthreads") = 1, py::arg("layout") = 0);
  m.def("qmm_sparse_packed_bytes", &sparse_packed_bytes, py::arg("nnz"), py::arg("out"),
        py::arg("in_features"), py::arg("bits"), py::arg("group_size"), py::arg("pkind"),
        py::arg("layout") = 0,
        "Bytes of the sparse layout (qmm.h; 0 row streams, 1 row tiles) of a weight with nnz "
        "kept groups.");
  m.def("qmm_sparse_used_bytes", &sparse_used_bytes, py::arg("packed_ptr"), py::arg("nnz"),
        py::arg("out"), py::arg("in_features"), py::arg("bits"), py::arg("group_size"),
        py::arg("pkind"), "Bytes the kernel reads of a repacked sparse weight (either layout).");
  m.def("qmm_repack_sparse", &repack_sparse, py::arg("row_ptr_ptr"), py::arg("col_idx_ptr"),
        py::arg("qvalues_ptr"), py::arg("words"), py::arg("scales_ptr"), py::arg("zeros_ptr"),
        py::arg("pkind"), py::arg("out"), py::arg("in_features"), py::arg("bits"),
        py::arg("group_size"), py::arg("dst_ptr"), py::arg("layout") = 0,
        py::arg("tile_rows") = 0);
  m.def("half_linear", &half_linear, py::arg("w_ptr"), py::arg("bf16"), py::arg("out"),
        py::arg("in_features"), py::arg("x_ptr"), py::arg("M"), py::arg("y_ptr"),
        py::arg("bias_ptr"), py::arg("nthreads"),
        "y = x @ w^T (+ bias) for a 16-bit float weight (fp16 / bf16), fp32 x and y.");
  m.def("f32_linear", &f32_linear, py::arg("w_ptr"), py::arg("out"), py::arg("in_features"),
        py::arg("x_ptr"), py::arg("M"), py::arg("y_ptr"), py::arg("bias_ptr"), py::arg("nthreads"),
        "y = x @ w^T (+ bias) for an fp32 weight (8-row SIMD GEMV).");
  m.def("qmm_dense", &dense_qmm, py::arg("packed_ptr"), py::arg("out"), py::arg("in_features"),
        py::arg("bits"), py::arg("group_size"), py::arg("pkind"), py::arg("x_ptr"), py::arg("m"),
        py::arg("y_ptr"), py::arg("bias_ptr"), py::arg("mode"), py::arg("nthreads") = 1,
        "y[M,out] (fp32) = x[M,in] (fp32) @ W^T (+bias) from the repacked dense weight.");
  m.def("qmm_dequant_dense", &dequant_dense, py::arg("qweight_ptr"), py::arg("words"),
        py::arg("in_features"), py::arg("bits"), py::arg("group_size"), py::arg("scales_ptr"),
        py::arg("zeros_ptr"), py::arg("pkind"), py::arg("row0"), py::arg("row1"),
        py::arg("dst_ptr"), py::arg("nthreads") = 1,
        "fp32 rows [row0, row1) of a canonical dense weight (bit-identical to the reference).");
  m.def("qmm_dequant_sparse", &dequant_sparse, py::arg("row_ptr_ptr"), py::arg("col_idx_ptr"),
        py::arg("qvalues_ptr"), py::arg("words"), py::arg("scales_ptr"), py::arg("zeros_ptr"),
        py::arg("pkind"), py::arg("in_features"), py::arg("bits"), py::arg("group_size"),
        py::arg("row0"), py::arg("row1"), py::arg("dst_ptr"), py::arg("nthreads") = 1,
        "fp32 rows [row0, row1) of a block-sparse-row weight, pruned groups 0.");
  m.def("qmm_sparse", &sparse_qmm, py::arg("packed_ptr"), py::arg("nnz"), py::arg("out"),
        py::arg("in_features"), py::arg("bits"), py::arg("group_size"), py::arg("pkind"),
        py::arg("x_ptr"), py::arg("m"), py::arg("y_ptr"), py::arg("bias_ptr"), py::arg("mode"),
        py::arg("nthreads") = 1,
        "y[M,out] (fp32) from the repacked block-sparse weight (either layout), split by kept "
        "groups over threads.");
}
