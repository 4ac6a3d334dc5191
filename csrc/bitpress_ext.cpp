// bitpress._C: native helpers for the CPU. Built by setup.py with pybind11.
//
// Tensors cross the boundary as raw pointers (Python passes tensor.data_ptr() of a
// contiguous tensor after checking shape and dtype), which keeps the extension independent
// of the torch C++ ABI: one build works with any torch version.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

// CPU dense/sparse quantised matmul kernels (csrc/cpu/qmm.cpp).
void bitpress_register_qmm(py::module_& m);
// The C++ decode engine (csrc/cpu/engine.cpp).
void bitpress_register_engine(py::module_& m);

namespace {

// Unpack canonical int32 words (element i of a word at bits i*b, offset 2^(b-1)) into
// signed int8 codes. packed: [rows, words], out: [rows, n].
template <int B>
void unpack_rows(const uint32_t* packed, int8_t* out, int64_t rows, int64_t words, int64_t n,
                 int nthreads) {
  constexpr int PF = 32 / B;
  constexpr uint32_t MASK = (1u << B) - 1u;
  constexpr int OFF = 1 << (B - 1);
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nthreads) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* src = packed + r * words;
    int8_t* dst = out + r * n;
    const int64_t full = n / PF;
    for (int64_t w = 0; w < full; ++w) {
      uint32_t v = src[w];
      int8_t* d = dst + w * PF;
      for (int i = 0; i < PF; ++i) d[i] = static_cast<int8_t>(int((v >> (i * B)) & MASK) - OFF);
    }
    const int64_t rest = n - full * PF;
    if (rest) {
      uint32_t v = src[full];
      for (int64_t i = 0; i < rest; ++i)
        dst[full * PF + i] = static_cast<int8_t>(int((v >> (i * B)) & MASK) - OFF);
    }
  }
}

void unpack_codes(uintptr_t packed, uintptr_t out, int64_t rows, int64_t words, int64_t n,
                  int bits, int nthreads) {
  auto* p = reinterpret_cast<const uint32_t*>(packed);
  auto* o = reinterpret_cast<int8_t*>(out);
  if (n > words * (32 / bits)) throw std::invalid_argument("unpack_codes: n exceeds packed words");
  py::gil_scoped_release release;
  switch (bits) {
    case 2: unpack_rows<2>(p, o, rows, words, n, nthreads); break;
    case 3: unpack_rows<3>(p, o, rows, words, n, nthreads); break;
    case 4: unpack_rows<4>(p, o, rows, words, n, nthreads); break;
    case 8: unpack_rows<8>(p, o, rows, words, n, nthreads); break;
    default: throw std::invalid_argument("unpack_codes: bits must be 2, 3, 4 or 8");
  }
}

py::dict cpu_features() {
  py::dict d;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  d["avx2"] = bool(__builtin_cpu_supports("avx2"));
  d["fma"] = bool(__builtin_cpu_supports("fma"));
  d["avx512f"] = bool(__builtin_cpu_supports("avx512f"));
  d["avx512bw"] = bool(__builtin_cpu_supports("avx512bw"));
  d["avx512vnni"] = bool(__builtin_cpu_supports("avx512vnni"));
  d["avx512bf16"] = bool(__builtin_cpu_supports("avx512bf16"));
#endif
#if defined(_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bitpress native CPU helpers";
  m.def("unpack_codes", &unpack_codes, py::arg("packed_ptr"), py::arg("out_ptr"), py::arg("rows"),
        py::arg("words"), py::arg("n"), py::arg("bits"), py::arg("nthreads") = 1,
        "Unpack canonical int32 words into signed int8 codes (raw contiguous pointers).");
  m.def("cpu_features", &cpu_features, "CPU SIMD features seen at run time.");
  bitpress_register_qmm(m);
  bitpress_register_engine(m);
}
