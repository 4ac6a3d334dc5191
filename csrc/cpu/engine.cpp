// The CPU decode engine: one token of a decoder-only transformer per call, entirely in C++
// over the packed-weight kernels (qmm.cpp), so that a decode step pays no Python per layer.
//
// Python (bitpress/runtime/engine.py) walks a Hugging Face model once, binds every weight by
// pointer (repacked packed weights from the kernels' cache, fp32 / fp16 / bf16 float weights,
// norms, rotary tables taken from the model's own rotary module) and owns every buffer; the
// engine keeps raw pointers only. One step, for the families the pipeline knows (Llama /
// SmolLM, Qwen2, Gemma-3, GPT-2 and their variants expressed by the flags below):
//
//   x = embed[token] * embed_scale (+ wpe[pos])
//   per layer:  h = norm1(x); q, k, v = linears(h) (or one fused qkv); [q/k per-head norms];
//               rotary (HF rotate_half convention, tables cos/sin [pos][head_dim]);
//               K/V appended to the cache; attention over [max(0, pos - window + 1), pos];
//               a = o(attn) [post-attention norm]; x += a
//               h = norm2(x); m = down(act(gate(h)) * up(h)) or down(act(fc(h)));
//               [post-feed-forward norm]; x += m
//   x = final_norm(x); logits = head(x) [tanh soft-cap]
//
// All arithmetic is fp32. Linears run through the same kernels (and modes) as the
// torch.library ops, so an engine step equals the Hugging Face forward over the same packed
// modules up to fp32 summation order.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace bitpress_cpu {
// raw entry points of the kernels (qmm.cpp); no GIL handling, no Python objects
void dense_qmm_raw(const uint8_t* packed, int64_t out, int64_t in, int bits, int64_t gs,
                   int pkind, const float* x, int64_t M, float* y, const float* bias, int mode,
                   int nthreads);
void sparse_qmm_raw(const uint8_t* packed, int64_t nnz, int64_t out, int64_t in, int bits,
                    int64_t gs, int pkind, const float* x, int64_t M, float* y,
                    const float* bias, int mode, int nthreads);
void half_linear_raw(const uint16_t* w, int bf16, int64_t out, int64_t in, const float* x,
                     int64_t M, float* y, const float* bias, int nthreads);
void f32_linear_raw(const float* w, int64_t out, int64_t in, const float* x, int64_t M,
                    float* y, const float* bias, int nthreads);
}  // namespace bitpress_cpu

namespace {

enum LinKind : int { L_NONE = 0, L_DENSE = 1, L_SPARSE = 2, L_F32 = 3, L_HALF = 4 };
enum NormKind : int { N_RMS = 0, N_RMS1P = 1, N_LAYER = 2 };
enum ActKind : int { A_SILU = 0, A_GELU_TANH = 1 };

struct Linear {
  int kind = L_NONE;
  const void* w = nullptr;
  int64_t nnz = 0, out = 0, in = 0, gs = 0;  // nnz: kept groups of a sparse weight
  int bits = 0, pkind = 0, mode = 0, bf16 = 0;
  const float* bias = nullptr;

  void run(const float* x, float* y, int nthreads) const {
    switch (kind) {
      case L_DENSE:
        bitpress_cpu::dense_qmm_raw(static_cast<const uint8_t*>(w), out, in, bits, gs, pkind, x,
                                    1, y, bias, mode, nthreads);
        break;
      case L_SPARSE:
        bitpress_cpu::sparse_qmm_raw(static_cast<const uint8_t*>(w), nnz, out, in, bits, gs,
                                     pkind, x, 1, y, bias, mode, nthreads);
        break;
      case L_F32:
        bitpress_cpu::f32_linear_raw(static_cast<const float*>(w), out, in, x, 1, y, bias,
                                     nthreads);
        break;
      case L_HALF:
        bitpress_cpu::half_linear_raw(static_cast<const uint16_t*>(w), bf16, out, in, x, 1, y,
                                      bias, nthreads);
        break;
      default:
        throw std::logic_error("engine: linear not bound");
    }
  }
};

struct Norm {
  const float* w = nullptr;
  const float* b = nullptr;
  bool on() const { return w != nullptr; }
};

struct Layer {
  Norm attn_norm, mlp_norm, q_norm, k_norm, post_attn_norm, post_mlp_norm;
  Linear q, k, v, qkv, o, gate, up, gate_up, down;
  const float* cos = nullptr;  // [max_len][head_dim]
  const float* sin = nullptr;
  int64_t window = 0;          // 0: full causal attention
  float* kc = nullptr;         // [n_kv][max_len][head_dim]
  float* vc = nullptr;
};

template <typename T>
T get(const py::dict& d, const char* key, T dflt) {
  return d.contains(key) ? d[key].cast<T>() : dflt;
}

const float* fptr(const py::dict& d, const char* key) {
  return d.contains(key) ? reinterpret_cast<const float*>(d[key].cast<uintptr_t>()) : nullptr;
}

Linear make_linear(const py::dict& d, const char* key) {
  Linear l;
  if (!d.contains(key) || d[key].is_none()) return l;
  const py::dict s = d[key].cast<py::dict>();
  l.kind = get<int>(s, "kind", L_NONE);
  l.w = reinterpret_cast<const void*>(get<uintptr_t>(s, "w", 0));
  l.nnz = get<int64_t>(s, "nnz", 0);
  l.out = get<int64_t>(s, "out", 0);
  l.in = get<int64_t>(s, "in", 0);
  l.gs = get<int64_t>(s, "gs", 0);
  l.bits = get<int>(s, "bits", 0);
  l.pkind = get<int>(s, "pkind", 0);
  l.mode = get<int>(s, "mode", 0);
  l.bf16 = get<int>(s, "bf16", 0);
  l.bias = reinterpret_cast<const float*>(get<uintptr_t>(s, "bias", 0));
  if (l.kind < L_DENSE || l.kind > L_HALF || l.w == nullptr || l.out <= 0 || l.in <= 0)
    throw std::invalid_argument(std::string("engine: bad linear '") + key + "'");
  return l;
}

Norm make_norm(const py::dict& d, const char* wkey, const char* bkey) {
  Norm n;
  n.w = fptr(d, wkey);
  n.b = fptr(d, bkey);
  return n;
}

// ---- small vector helpers (auto-vectorised per ISA through target_clones) -------------------
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BP_CLONES
#endif

BP_CLONES float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0.f};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[k + j] * b[k + j];
  float t = 0.f;
  for (; k < n; ++k) t += a[k] * b[k];
  for (int j = 0; j < 16; ++j) t += acc[j];
  return t;
}

BP_CLONES void axpy(float* y, const float* x, float a, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

BP_CLONES float sumsq(const float* x, int64_t n) {
  float acc[16] = {0.f};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[k + j] * x[k + j];
  float t = 0.f;
  for (; k < n; ++k) t += x[k] * x[k];
  for (int j = 0; j < 16; ++j) t += acc[j];
  return t;
}

void norm_apply(int kind, float eps, const Norm& n, const float* x, float* y, int64_t d) {
  if (kind == N_LAYER) {
    float mean = 0.f;
    for (int64_t i = 0; i < d; ++i) mean += x[i];
    mean /= float(d);
    float var = 0.f;
    for (int64_t i = 0; i < d; ++i) var += (x[i] - mean) * (x[i] - mean);
    var /= float(d);
    const float r = 1.f / std::sqrt(var + eps);
    for (int64_t i = 0; i < d; ++i)
      y[i] = (x[i] - mean) * r * n.w[i] + (n.b ? n.b[i] : 0.f);
    return;
  }
  const float r = 1.f / std::sqrt(sumsq(x, d) / float(d) + eps);
  if (kind == N_RMS1P)
    for (int64_t i = 0; i < d; ++i) y[i] = (x[i] * r) * (1.f + n.w[i]);
  else
    for (int64_t i = 0; i < d; ++i) y[i] = n.w[i] * (x[i] * r);
}

// HF rotate_half: out[i] = x[i] cos[i] - x[i + h] sin[i], out[i + h] = x[i + h] cos[i + h] +
// x[i] sin[i + h] (cos/sin rows hold the half-size frequencies twice)
void rope(float* x, const float* c, const float* s, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * c[i] - b * s[i];
    x[i + h] = b * c[i + h] + a * s[i + h];
  }
}

inline float act(int kind, float v) {
  if (kind == A_SILU) return v / (1.f + std::exp(-v));
  const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * v * (1.f + std::tanh(k0 * (v + 0.044715f * v * v * v)));
}

class Engine {
 public:
  Engine(const py::dict& cfg, const py::list& layers, const py::dict& top) {
    n_layers_ = get<int64_t>(cfg, "n_layers", 0);
    hidden_ = get<int64_t>(cfg, "hidden", 0);
    n_heads_ = get<int64_t>(cfg, "n_heads", 0);
    n_kv_ = get<int64_t>(cfg, "n_kv", 0);
    hd_ = get<int64_t>(cfg, "head_dim", 0);
    inter_ = get<int64_t>(cfg, "intermediate", 0);
    vocab_ = get<int64_t>(cfg, "vocab", 0);
    max_len_ = get<int64_t>(cfg, "max_len", 0);
    norm_kind_ = get<int>(cfg, "norm", N_RMS);
    eps_ = get<float>(cfg, "eps", 1e-6f);
    act_ = get<int>(cfg, "act", A_SILU);
    gated_ = get<bool>(cfg, "gated", true);
    attn_scale_ = get<float>(cfg, "attn_scale", 1.f / std::sqrt(float(hd_)));
    embed_scale_ = get<float>(cfg, "embed_scale", 1.f);
    softcap_ = get<float>(cfg, "final_softcap", 0.f);
    embed_kind_ = get<int>(cfg, "embed_kind", 0);  // 0 fp32, 1 fp16, 2 bf16
    threads_ = std::max(1, get<int>(cfg, "threads", 1));
    if (n_layers_ <= 0 || hidden_ <= 0 || n_heads_ <= 0 || n_kv_ <= 0 || hd_ <= 0 ||
        vocab_ <= 0 || max_len_ <= 0 || n_heads_ % n_kv_ != 0 || hd_ % 2 != 0)
      throw std::invalid_argument("engine: bad model geometry");
    if (int64_t(layers.size()) != n_layers_)
      throw std::invalid_argument("engine: one layer description per layer expected");
    for (const auto& item : layers) {
      const py::dict d = item.cast<py::dict>();
      Layer L;
      L.attn_norm = make_norm(d, "attn_norm", "attn_norm_b");
      L.mlp_norm = make_norm(d, "mlp_norm", "mlp_norm_b");
      L.q_norm = make_norm(d, "q_norm", "q_norm_b");
      L.k_norm = make_norm(d, "k_norm", "k_norm_b");
      L.post_attn_norm = make_norm(d, "post_attn_norm", "post_attn_norm_b");
      L.post_mlp_norm = make_norm(d, "post_mlp_norm", "post_mlp_norm_b");
      L.q = make_linear(d, "q");
      L.k = make_linear(d, "k");
      L.v = make_linear(d, "v");
      L.qkv = make_linear(d, "qkv");
      L.o = make_linear(d, "o");
      L.gate = make_linear(d, "gate");
      L.up = make_linear(d, "up");
      L.gate_up = make_linear(d, "gate_up");
      L.down = make_linear(d, "down");
      L.cos = fptr(d, "cos");
      L.sin = fptr(d, "sin");
      L.window = get<int64_t>(d, "window", 0);
      L.kc = const_cast<float*>(fptr(d, "k_cache"));
      L.vc = const_cast<float*>(fptr(d, "v_cache"));
      if (!L.attn_norm.on() || !L.mlp_norm.on() || L.o.kind == L_NONE || L.down.kind == L_NONE ||
          L.kc == nullptr || L.vc == nullptr)
        throw std::invalid_argument("engine: a layer lacks a norm, o, down or its KV cache");
      if (L.qkv.kind == L_NONE && (L.q.kind == L_NONE || L.k.kind == L_NONE || L.v.kind == L_NONE))
        throw std::invalid_argument("engine: a layer needs q, k and v (or a fused qkv)");
      if (gated_ && L.gate_up.kind == L_NONE && (L.gate.kind == L_NONE || L.up.kind == L_NONE))
        throw std::invalid_argument("engine: a gated MLP needs gate and up (or gate_up)");
      if (!gated_ && L.up.kind == L_NONE)
        throw std::invalid_argument("engine: a plain MLP needs its input projection as 'up'");
      layers_.push_back(L);
    }
    embed_ = reinterpret_cast<const void*>(get<uintptr_t>(top, "embed", 0));
    wpe_ = fptr(top, "wpe");
    final_norm_ = make_norm(top, "final_norm", "final_norm_b");
    head_ = make_linear(top, "head");
    if (embed_ == nullptr || !final_norm_.on() || head_.kind == L_NONE || head_.out != vocab_)
      throw std::invalid_argument("engine: embedding, final norm and head are required");
    const int64_t qd = n_heads_ * hd_, kvd = n_kv_ * hd_;
    x_.assign(hidden_, 0.f);
    h_.assign(hidden_, 0.f);
    a_.assign(std::max(qd, hidden_), 0.f);
    qkv_.assign(qd + 2 * kvd, 0.f);
    att_.assign(qd, 0.f);
    ff_.assign(2 * std::max<int64_t>(inter_, 1), 0.f);
    sc_.assign(size_t(n_heads_) * size_t(max_len_), 0.f);
  }

  int64_t vocab() const { return vocab_; }

  // one token at position pos; logits (vocab floats) written to `logits`
  void step(int64_t token, int64_t pos, uintptr_t logits) {
    if (token < 0 || token >= vocab_) throw std::invalid_argument("engine: token id out of range");
    if (pos < 0 || pos >= max_len_)
      throw std::invalid_argument("engine: position beyond the engine's max_len");
    py::gil_scoped_release release;
    forward(token, pos, reinterpret_cast<float*>(logits));
  }

  // greedy decoding in C++: feeds `token` at `pos`, then n - 1 argmax tokens; ids written to
  // out_ids (n int64: the argmax after each step); logits of the last step to `logits`
  void greedy(int64_t token, int64_t pos, int64_t n, uintptr_t out_ids, uintptr_t logits) {
    if (n <= 0) return;
    if (pos + n > max_len_) throw std::invalid_argument("engine: generation beyond max_len");
    if (token < 0 || token >= vocab_) throw std::invalid_argument("engine: token id out of range");
    py::gil_scoped_release release;
    auto* ids = reinterpret_cast<int64_t*>(out_ids);
    auto* lg = reinterpret_cast<float*>(logits);
    for (int64_t i = 0; i < n; ++i) {
      forward(token, pos + i, lg);
      int64_t best = 0;
      float bv = lg[0];
      for (int64_t j = 1; j < vocab_; ++j)
        if (lg[j] > bv) { bv = lg[j]; best = j; }  // first maximum, as torch.argmax
      ids[i] = best;
      token = best;
    }
  }

 private:
  void embed_row(int64_t token, float* x) const {
    const int64_t off = token * hidden_;
    if (embed_kind_ == 0) {
      const float* e = static_cast<const float*>(embed_) + off;
      for (int64_t i = 0; i < hidden_; ++i) x[i] = e[i];
    } else {
      const uint16_t* e = static_cast<const uint16_t*>(embed_) + off;
      for (int64_t i = 0; i < hidden_; ++i) {
        uint32_t bits;
        if (embed_kind_ == 2) {
          bits = uint32_t(e[i]) << 16;
        } else {  // fp16 -> fp32
          const uint32_t h = e[i], sign = (h & 0x8000u) << 16;
          uint32_t ex = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
          if (ex == 0) {
            if (man == 0) {
              bits = sign;
            } else {
              int s = -1;
              do { ++s; man <<= 1; } while (!(man & 0x400u));
              bits = sign | uint32_t(127 - 15 - s) << 23 | (man & 0x3FFu) << 13;
            }
          } else if (ex == 31) {
            bits = sign | 0x7F800000u | man << 13;
          } else {
            bits = sign | (ex + 112u) << 23 | man << 13;
          }
        }
        float f;
        std::memcpy(&f, &bits, 4);
        x[i] = f;
      }
    }
    if (embed_scale_ != 1.f)
      for (int64_t i = 0; i < hidden_; ++i) x[i] *= embed_scale_;
  }

  void attention(const Layer& L, int64_t pos, const float* q, float* out) {
    const int64_t t0 = L.window > 0 ? std::max<int64_t>(0, pos - L.window + 1) : 0;
    const int64_t n = pos - t0 + 1, group = n_heads_ / n_kv_;
    const int nt = int(std::min<int64_t>(threads_, n_heads_));
    const bool par = nt > 1 && n * n_heads_ * hd_ >= 32768;
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (par)
#endif
    for (int64_t h = 0; h < n_heads_; ++h) {
      const int64_t kvh = h / group;
      const float* qh = q + h * hd_;
      const float* kb = L.kc + (kvh * max_len_ + t0) * hd_;
      const float* vb = L.vc + (kvh * max_len_ + t0) * hd_;
      float* s = sc_.data() + h * max_len_;
      float mx = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        s[t] = dot(qh, kb + t * hd_, hd_) * attn_scale_;
        mx = std::max(mx, s[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - mx);
        sum += s[t];
      }
      const float inv = 1.f / sum;
      float* o = out + h * hd_;
      for (int64_t d = 0; d < hd_; ++d) o[d] = 0.f;
      for (int64_t t = 0; t < n; ++t) axpy(o, vb + t * hd_, s[t] * inv, hd_);
    }
    (void)par;
  }

  void forward(int64_t token, int64_t pos, float* logits) {
    float* x = x_.data();
    float* h = h_.data();
    embed_row(token, x);
    if (wpe_)
      for (int64_t i = 0; i < hidden_; ++i) x[i] += wpe_[pos * hidden_ + i];
    const int64_t qd = n_heads_ * hd_, kvd = n_kv_ * hd_;
    for (const Layer& L : layers_) {
      norm_apply(norm_kind_, eps_, L.attn_norm, x, h, hidden_);
      float* q = qkv_.data();
      float* k = q + qd;
      float* v = k + kvd;
      if (L.qkv.kind != L_NONE) {
        L.qkv.run(h, q, threads_);
      } else {
        L.q.run(h, q, threads_);
        L.k.run(h, k, threads_);
        L.v.run(h, v, threads_);
      }
      if (L.q_norm.on())
        for (int64_t i = 0; i < n_heads_; ++i) norm_apply(N_RMS1P == norm_kind_ ? N_RMS1P : N_RMS,
                                                          eps_, L.q_norm, q + i * hd_, q + i * hd_, hd_);
      if (L.k_norm.on())
        for (int64_t i = 0; i < n_kv_; ++i) norm_apply(N_RMS1P == norm_kind_ ? N_RMS1P : N_RMS,
                                                       eps_, L.k_norm, k + i * hd_, k + i * hd_, hd_);
      if (L.cos) {
        const float* c = L.cos + pos * hd_;
        const float* s = L.sin + pos * hd_;
        for (int64_t i = 0; i < n_heads_; ++i) rope(q + i * hd_, c, s, hd_);
        for (int64_t i = 0; i < n_kv_; ++i) rope(k + i * hd_, c, s, hd_);
      }
      for (int64_t i = 0; i < n_kv_; ++i) {
        std::memcpy(L.kc + (i * max_len_ + pos) * hd_, k + i * hd_, size_t(hd_) * 4);
        std::memcpy(L.vc + (i * max_len_ + pos) * hd_, v + i * hd_, size_t(hd_) * 4);
      }
      attention(L, pos, q, att_.data());
      float* a = a_.data();
      L.o.run(att_.data(), a, threads_);
      if (L.post_attn_norm.on()) norm_apply(norm_kind_, eps_, L.post_attn_norm, a, a, hidden_);
      for (int64_t i = 0; i < hidden_; ++i) x[i] += a[i];

      norm_apply(norm_kind_, eps_, L.mlp_norm, x, h, hidden_);
      float* f = ff_.data();
      int64_t fi;
      if (gated_) {
        float* g = f;
        float* u;
        if (L.gate_up.kind != L_NONE) {
          fi = L.gate_up.out / 2;
          L.gate_up.run(h, g, threads_);
          u = g + fi;
        } else {
          fi = L.gate.out;
          u = g + fi;
          L.gate.run(h, g, threads_);
          L.up.run(h, u, threads_);
        }
        for (int64_t i = 0; i < fi; ++i) g[i] = act(act_, g[i]) * u[i];
      } else {
        fi = L.up.out;
        L.up.run(h, f, threads_);
        for (int64_t i = 0; i < fi; ++i) f[i] = act(act_, f[i]);
      }
      L.down.run(f, a, threads_);
      if (L.post_mlp_norm.on()) norm_apply(norm_kind_, eps_, L.post_mlp_norm, a, a, hidden_);
      for (int64_t i = 0; i < hidden_; ++i) x[i] += a[i];
    }
    norm_apply(norm_kind_, eps_, final_norm_, x, h, hidden_);
    head_.run(h, logits, threads_);
    if (softcap_ > 0.f)
      for (int64_t i = 0; i < vocab_; ++i) logits[i] = softcap_ * std::tanh(logits[i] / softcap_);
  }

  int64_t n_layers_ = 0, hidden_ = 0, n_heads_ = 0, n_kv_ = 0, hd_ = 0, inter_ = 0, vocab_ = 0,
          max_len_ = 0;
  int norm_kind_ = N_RMS, act_ = A_SILU, embed_kind_ = 0, threads_ = 1;
  bool gated_ = true;
  float eps_ = 1e-6f, attn_scale_ = 1.f, embed_scale_ = 1.f, softcap_ = 0.f;
  std::vector<Layer> layers_;
  const void* embed_ = nullptr;
  const float* wpe_ = nullptr;
  Norm final_norm_;
  Linear head_;
  std::vector<float> x_, h_, a_, qkv_, att_, ff_, sc_;
};

}  // namespace

void bitpress_register_engine(py::module_& m) {
  py::class_<Engine>(m, "DecodeEngine",
                     "One-token decode steps of a decoder-only transformer over bound weights "
                     "(built by bitpress.runtime.engine; holds raw pointers only).")
      .def(py::init<const py::dict&, const py::list&, const py::dict&>(), py::arg("config"),
           py::arg("layers"), py::arg("top"))
      .def("step", &Engine::step, py::arg("token"), py::arg("pos"), py::arg("logits_ptr"))
      .def("greedy", &Engine::greedy, py::arg("token"), py::arg("pos"), py::arg("n"),
           py::arg("ids_ptr"), py::arg("logits_ptr"))
      .def_property_readonly("vocab", &Engine::vocab);
}
