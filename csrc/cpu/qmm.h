// CPU kernels for bitpress::dense_qmm / bitpress::sparse_qmm: shared layout definitions.
//
// Plain structs live in namespace bitpress_cpu; every function lives in an anonymous
// namespace on purpose: this header is included by
// translation units compiled for different instruction sets (qmm.cpp portable, qmm_avx2.cpp
// under `#pragma GCC target("avx2,fma,f16c")`), and per-TU copies keep the linker from
// merging an AVX2-compiled helper into the portable path.
//
// ---- Dense repacked layout ("8-row interleaved") ------------------------------------------
// Rows are taken in tiles of 8 (the last tile padded with zero rows). The input dim is cut
// into segments of `seg` columns: seg = group size for grouped weights, and for per-channel
// weights (one group per row) seg = min(256, round16(in)). Every segment lies in one group
// and carries one activation scale in the int8 mode. Per tile, in order, for each segment:
//   [params: scale[8] then zero[8], in the source dtype (fp16/bf16 as 16-bit, or fp32)]
//     -- only where the segment starts a group (every segment for grouped weights, the
//        first one for per-channel)
//   [codes of the segment for the 8 rows]
// Codes are unsigned (u = c + 2^(b-1)). For b in {2, 4} a 32-byte block holds 32/b codes of
// each of the 8 rows: the row r owns the dword at byte 4r, and code t (0 <= t < 32/b) of the
// block sits in byte j = t % 4 at bit b*(t / 4). So plane m = (v >> b*m) & mask puts codes
// 4m..4m+3 of every row in the bytes of that row's dword, ready for a u8 x s8 dot product
// with a broadcast dword of four activations. For b = 3 a 32-code chunk is stored as two
// 2-bit blocks (low bits, 16 codes each) and one block of high bits (byte j of row r's
// dword, bit m = high bit of code 4m + j of the chunk); a short last chunk (16 codes) has
// one low block and one high block. Columns past in_features hold code 0 and meet a zero
// activation.
//
// ---- Sparse repacked layout ("row streams") ------------------------------------------------
// Rows in order, each listing its kept column groups by a bitmask, so a kernel walks a row's
// kept groups, multiplies each by its activation segment and writes the row once: no row
// indices and no scatter. Sections, each starting at a multiple of 64 bytes:
//   rp     int64 [out + 1]      first kept group of each row (the BSR row_ptr), rp[out] = nnz
//   mask   uint64 [out][nw]     bit c of row r set: column group c kept (nw = ceil(ng / 64))
//   data   per row, at data + rp[r] * (2 ps + grp) (ps: parameter bytes, grp: code bytes of a
//          group): the row's n scales, its n zeros (source dtype, BSR order: ascending
//          columns), then its n groups' codes, so the kernel reads one sequential stream
//          a group's codes: gs / 16 sub-blocks of 16 columns, `rec` bytes each:
//            2-bit: 4 bytes, column k at bits 2k of the dword
//            3-bit: 6 bytes, the low two bits as 2-bit, then a uint16 of the high bits (bit k)
//            4-bit: 8 bytes, column k in dword k % 2 at bits 4 (k / 2)
//            8-bit: 16 bytes, column k in byte k
// Codes are unsigned (u = c + 2^(b-1)); columns past in_features hold 0. A kernel takes the
// code of column k of a sub-block as u * 2^e(k) by masking alone (e(k) = 2k for 2/3-bit,
// 4 (k / 2) for 4-bit, 0 for 8-bit) and multiplies it by x_k * 2^-e(k): the activations are
// pre-scaled once per call, and the product is exact. Threads take row ranges of equal
// kept-group counts (task-centric splitting: a skewed row distribution cannot idle a core).
//
// ---- Sparse repacked layout 1 ("row tiles", AVX-512) -----------------------------------------
// Rows in tiles of R = 16, 24 or 32 (the last tile padded with rows that keep nothing; R is
// picked per weight, repack_sparse_tiles), one 32-bit mask per tile and column group:
// bit i set, row R t + i keeps the group. Per tile, a kernel walks the column groups in
// order; a group's n kept rows are stored consecutively (compressed), so a kernel computes
// them in the first n lanes of a vector (two vectors when n > 16), every lane of a sub-block
// meeting the same 16 activations, broadcast: u8 x s8 vpdpbusd against the int8 activations
// (int8 mode) or three int8 planes of them (exact mode), prepared as for a dense weight with
// segment = group; the results are then expanded onto the mask's lanes (the tile's rows).
// A 16-row tile leaves half the lanes empty at 50 % density, a 24-row one a quarter. Sections,
// each starting at a multiple of 64 bytes:
//   header int64 [8]            SPT_TAG, R, then zeros (a row-stream buffer starts with 0)
//   toff   int64 [tiles + 1]    byte offset of each tile's stream within data
//   mask   uint32 [tiles][ng]   the tile's mask of each column group
//   data   per tile, per column group with n kept rows (n = popcount of its mask):
//            params: n scales then n zeros (source dtype)
//            codes:  per 16-column sub-block, W dwords of each kept row, dword-major (dword w
//                    of the n rows, then dword w + 1): 4-bit W = 2, column 4i + j of the
//                    sub-block in byte j of dword i / 2 at bit 4 (i % 2); 2-bit W = 1, column
//                    4i + j in byte j at bit 2i. Plane i of a row's code dwords (shift, mask)
//                    holds columns 4i..4i+3 in its bytes, as a dense row's dword does.
// Codes are unsigned as above. 2- and 4-bit weights only (3-bit ones keep the row streams).
// sparse_packed_bytes allocates for R = 16 (the most tiles); a larger R uses less of it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace bitpress_cpu {
// bytes ahead of the weight stream the AVX2 kernels prefetch (0 = off; qmm_set_prefetch)
extern int64_t g_prefetch_bytes;
enum ParamKind : int { P_F16 = 0, P_BF16 = 1, P_F32 = 2 };
// MODE_LUT63: the lut kernel with tables within +-63, so the two lookups of a block are added
// in int8 before one vpmaddubsw (faster, twice the table error; opt-in)
enum ActMode : int { MODE_EXACT = 0, MODE_INT8 = 1, MODE_LUT = 2, MODE_LUT63 = 3 };
constexpr int LUT_MAX = 127, LUT_MAX_FOLD = 63;  // largest |table entry| of lut / lut63

struct DenseGeom {
  int64_t out = 0, in = 0;
  int bits = 0, pkind = 0;
  int64_t gs = 0;      // effective group size
  bool grouped = true; // false: per-channel (one group per row)
  int64_t seg = 0, nseg = 0, ng = 0, tiles = 0;
  int64_t code_bytes = 0;   // per tile per segment
  int64_t param_bytes = 0;  // per tile per group (16 values)
  int64_t tile_bytes = 0;
};

struct SparseGeom {
  int64_t out = 0, in = 0;
  int bits = 0, pkind = 0;
  int64_t gs = 0, ng = 0, nnz = 0;
  int64_t nw = 0;    // mask words per row
  int64_t sub = 0;   // 16-column sub-blocks per group
  int64_t rec = 0;   // code bytes per sub-block
  int64_t per = 0;  // data bytes per kept group: 2 parameters + codes
  int64_t off_mask = 0, off_data = 0, bytes = 0;
};

constexpr int64_t SPT_TAG = 0x31454c4954505342;  // "BSPTILE1": a row-tile (layout 1) buffer

struct SparseTGeom {
  int64_t out = 0, in = 0;
  int bits = 0, pkind = 0;
  int64_t gs = 0, ng = 0, nnz = 0, tiles = 0;
  int64_t R = 16;   // rows per tile
  int64_t sub = 0;  // 16-column sub-blocks per group
  int64_t W = 0;    // code dwords per kept row per sub-block
  int64_t pb = 0;   // parameter bytes per kept row and group (scale + zero)
  int64_t per = 0;  // data bytes per kept row and group
  int64_t off_toff = 0, off_mask = 0, off_data = 0, bytes = 0;
};

// Activations of the sparse kernels: xq [M][stride] (the pre-scaled x, or in the int8 mode
// the pre-scaled int8-rounded x), xs [M][ng] = sum of x per group, and in the int8 mode
// xhs [M][ng] = sum of the rounded x per group (nullptr in the exact mode, where it is xs)
struct SpAct {
  int64_t M = 0, stride = 0, ng = 0;
  const float* xq = nullptr;
  const float* xs = nullptr;
  const float* xhs = nullptr;
};

// Prepared activations, [M] rows of `stride` padded columns (segments of `seg`).
//  int8 mode:  q (int8), d[m*nseg+s] = scale of segment s, b = d*off*sum(q), xs = sum(x)
//  exact mode, SIMD ISAs (planes): q rows 3m+p (p = 0, 1, 2) and d[(3m+p)*nseg+s] such that
//              x = sum_p d_p q_p to within 6.1e-8 of the segment's max |x| (plus x's own fp32
//              rounding); b = off*sum(x), xs = sum(x). The kernels' integer sums are exact, so
//              the result is the weight-only product at fp32 accuracy (bitpress/kernels/cpu
//              docstring; bench/RESULTS.md, "CPU kernels at batch 1").
//  exact mode, scalar: xf (fp32), b = off*sum(x), xs = sum(x)
struct Act {
  int mode = MODE_INT8;
  // exact mode on the SIMD ISAs: x as three int8 planes (see prepare_act), rows 3m..3m+2 of q
  // and d; the kernels take integer dot products of the codes with each plane
  bool planes = false;
  int64_t M = 0, stride = 0, nseg = 0, seg = 0;
  const int8_t* q = nullptr;
  const float* xf = nullptr;
  const float* d = nullptr;
  const float* b = nullptr;
  const float* xs = nullptr;
  // lut mode (2-bit, AVX2): per row m, lstride bytes of int8 tables, 16 per 4 columns
  // (entry i = sum of the columns j with bit j of i set, / dl); dl[m*nseg+s] = table step
  const int8_t* lut = nullptr;
  int64_t lstride = 0;
  int lut_max = LUT_MAX;  // LUT_MAX_FOLD: the folded kernel (mode lut63)
  const float* dl = nullptr;
};
}  // namespace bitpress_cpu

namespace {
using namespace bitpress_cpu;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400u));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FFu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | man << 13;
  } else {
    bits = sign | (exp + 112u) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline int param_size(int kind) { return kind == P_F32 ? 4 : 2; }

inline float load_param(const uint8_t* p, int kind, int64_t i) {
  if (kind == P_F32) {
    float f;
    std::memcpy(&f, p + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p + 2 * i, 2);
#if defined(__F16C__)  // set inside the AVX2 translation unit (pragma target)
  return kind == P_F16 ? _cvtsh_ss(h) : bf16_to_float(h);
#else
  return kind == P_F16 ? half_to_float(h) : bf16_to_float(h);
#endif
}


inline int64_t seg_code_bytes(int bits, int64_t seg) {
  if (bits == 2) return seg / 16 * 32;
  if (bits == 4) return seg / 8 * 32;
  if (bits == 8) return seg / 4 * 32;
  return seg / 16 * 32 + ceil_div(seg, 32) * 32;  // 3-bit
}

inline DenseGeom make_dense_geom(int64_t out, int64_t in, int bits, int64_t gs, int pkind) {
  DenseGeom g;
  g.out = out; g.in = in; g.bits = bits; g.gs = gs; g.pkind = pkind;
  g.grouped = gs < in;
  g.seg = g.grouped ? gs : std::min<int64_t>(256, round_up(in, 16));
  g.nseg = ceil_div(in, g.seg);
  g.ng = g.grouped ? ceil_div(in, gs) : 1;
  g.tiles = ceil_div(out, 8);
  g.code_bytes = seg_code_bytes(bits, g.seg);
  g.param_bytes = 16 * param_size(pkind);
  g.tile_bytes = g.ng * g.param_bytes + g.nseg * g.code_bytes;
  return g;
}

// Byte offset of the code bytes of segment s within a tile.
inline int64_t dense_seg_offset(const DenseGeom& g, int64_t s) {
  const int64_t params_before = g.grouped ? (s + 1) : 1;
  return params_before * g.param_bytes + s * g.code_bytes;
}


constexpr int64_t sparse_rec_bytes(int bits) { return bits == 8 ? 16 : bits == 4 ? 8 : bits == 3 ? 6 : 4; }

// e(k) of the row-stream layout: column k of a 16-column sub-block is decoded as u * 2^e(k)
inline int sparse_exp(int bits, int k) { return bits == 8 ? 0 : bits == 4 ? 4 * (k / 2) : 2 * k; }

inline SparseGeom make_sparse_geom(int64_t out, int64_t in, int bits, int64_t gs, int pkind,
                                   int64_t nnz) {
  SparseGeom g;
  g.out = out; g.in = in; g.bits = bits; g.gs = gs; g.pkind = pkind; g.nnz = nnz;
  g.ng = ceil_div(in, gs);
  g.nw = ceil_div(g.ng, 64);
  g.sub = gs / 16;
  g.rec = sparse_rec_bytes(bits);
  g.per = 2 * param_size(pkind) + g.sub * g.rec;
  g.off_mask = round_up(8 * (out + 1), 64);
  g.off_data = g.off_mask + round_up(8 * out * g.nw, 64);
  g.bytes = g.off_data + round_up(nnz * g.per + 64, 64);  // 64: vector loads past the end
  return g;
}

inline SparseTGeom make_sparse_tgeom(int64_t out, int64_t in, int bits, int64_t gs, int pkind,
                                     int64_t nnz, int64_t R = 16) {
  SparseTGeom g;
  g.out = out; g.in = in; g.bits = bits; g.gs = gs; g.pkind = pkind; g.nnz = nnz; g.R = R;
  g.ng = ceil_div(in, gs);
  g.tiles = ceil_div(out, R);
  g.sub = gs / 16;
  g.W = bits == 4 ? 2 : 1;
  g.pb = pkind == P_F32 ? 8 : 4;
  g.per = g.pb + 4 * g.W * g.sub;
  g.off_toff = 64;
  g.off_mask = g.off_toff + round_up(8 * (g.tiles + 1), 64);
  g.off_data = g.off_mask + round_up(4 * g.tiles * g.ng, 64);
  g.bytes = g.off_data + round_up(nnz * g.per + 128, 64);  // 128: vector loads past the end
  return g;
}

}  // namespace

// ---- 2-bit lookup-table layout ("lut2", AVX2 only) -----------------------------------------
// Same tiles, params and sizes as the 2-bit dense layout; only the code bytes of a segment
// differ. A 32-byte block covers 16 columns (4-column groups c = 0..3) of the 8 rows. Byte
// 16*L + 2*r + p (lane L = 0/1, row r, bit plane p) holds in its low nibble the plane-p
// bits of row r's codes in column group c = L (bit j = column 4c + j) and in its high nibble
// those of column group c = 2 + L. One vpshufb of the low nibbles against the two 16-entry
// tables of groups 0|1 (and of the high nibbles against 2|3) gathers partial sums of the
// activations; vpmaddubsw with (1, 2) byte weights adds the two planes of a row.

// Per-ISA entry points, one set per build of qmm_simd.inc (suffixes avx2, avx512, avx512emu;
// defined only where that file is compiled: x86, and for avx512emu only with SIMDe).
#define BITPRESS_DECLARE_SIMD(SFX)                                                                 \
  void half_rows_##SFX(const uint16_t* w, int bf16, int64_t out, int64_t in, const float* x,       \
                       int64_t M, float* y, const float* bias, int64_t r0, int64_t r1);            \
  void f32_rows_##SFX(const float* w, int64_t out, int64_t in, const float* x, int64_t M,          \
                      float* y, const float* bias, int64_t r0, int64_t r1);                        \
  void dense_tile_##SFX(const DenseGeom& g, const Act& a, const uint8_t* tile_ptr, int64_t tile,  \
                        float* y, const float* bias);                                              \
  /* 2-bit dense tiles tile .. tile + ntile - 1 (ntile 1 or 2) from the lut2 layout */             \
  void dense_tile_lut_##SFX(const DenseGeom& g, const Act& a, const uint8_t* tile_ptr,            \
                            int64_t tile, int ntile, float* y, const float* bias);                 \
  /* tables for the lut mode: x [M, in] fp32 -> lut [M][lstride] int8, dl [M * nseg] */          \
  void build_lut_##SFX(const float* x, int64_t M, int64_t in, int64_t seg, int64_t nseg,          \
                       int8_t* lut, int64_t lstride, float* dl, int lut_max);                      \
  /* rows r0..r1 of the row-stream sparse layout into y[M][out] (+ bias) */                      \
  void sparse_rows_##SFX(const SparseGeom& g, const SpAct& a, const uint8_t* buf, int64_t r0,     \
                         int64_t r1, float* y, const float* bias);                                 \
  /* one activation row into the int8 form (int8 mode, or the exact mode's three planes) */      \
  void prep_row_##SFX(const float* xr, int64_t in, int64_t seg, int64_t nseg, float off,          \
                      bool planes, int8_t* q, int64_t qstride, float* d, float* b, float* xs);

namespace bitpress_cpu {
BITPRESS_DECLARE_SIMD(avx2)
BITPRESS_DECLARE_SIMD(avx512)
BITPRESS_DECLARE_SIMD(avx512emu)
// tiles t0..t1 of the row-tile sparse layout (layout 1) into y[M][out] (+ bias); AVX-512 build
// only (qmm_avx512.cpp), other ISAs run the portable sparse_tiles_scalar (qmm.cpp)
void sparse_tiles_avx512(const SparseTGeom& g, const Act& a, const uint8_t* buf, int64_t t0,
                         int64_t t1, float* y, const float* bias);
}  // namespace bitpress_cpu
