// Native batch-1 decode step for Llama-like models: one C++ call per generated token.
//
// Why: on a 135M model the Python step (abqllm/runtime/cpu_decode.py) issues ~25 torch ops per block,
// ~750 per token, and their dispatch and allocation cost more than the packed matmuls themselves (measured:
// ~17 ms of a 31 ms W4A8 step on 2 idle cores). Here the whole step runs in C++ without the GIL:
//
//   x = embed[token]
//   per block:  h = rmsnorm(x) ; q|k|v = linears(h) ; (q, k per-head rmsnorm) ; rope(q, k) from the table
//               k, v -> cache[pos] ; a = softmax(q k^T * scaling) v over cache[0..pos] (grouped-query heads)
//               x += o(a) ; h = rmsnorm(x) ; x += down(silu(gate(h)) * up(h))
//   logits = lm_head(rmsnorm(x))
//
// Linears are the same ones the Python step calls: packed layers through abqcpu_torch::linear_out (the
// `cpu` kernels), float layers through at::linear_out (torch's own GEMV). Everything else (norms, rotary,
// attention, SiLU) is plain C++ over small vectors; attention uses fp32 with the scores' maximum subtracted,
// like every softmax, but its summation order differs from torch's SDPA, so logits agree with the Python
// step to float rounding, not bit for bit (the Python step stays the bit-exact engine).
//
// The KV cache tensors [n_kv, max_len, head_dim] per block are the Python decoder's own, so a prefill done
// there (batched torch ops) is continued here.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "abq_cpu.h"
#include "abq_cpu_torch.h"

namespace abqcpu_torch {
namespace {

using at::Tensor;

// ---- small vector kernels (AVX2+FMA when the CPU has them; the step is latency-bound on these at long
// context: 30 blocks x 9 heads x pos x 64 multiply-adds twice) ----------------------------------------

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  s0 = _mm256_add_ps(s0, s1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float r = _mm_cvtss_f32(s);
  for (; i < n; i++) r += a[i] * b[i];
  return r;
}
__attribute__((target("avx2,fma"))) void axpy_avx2(float a, const float* x, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

float dot_plain(const float* a, const float* b, int64_t n) {
  float r = 0.f;
  for (int64_t i = 0; i < n; i++) r += a[i] * b[i];
  return r;
}
void axpy_plain(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

// ---- online Hadamard rotation (quant/hadamard.py) ----------------------------------------------------

// In place: every run of b values (b a power of two) of the rows of x becomes itself times the normalised
// Sylvester Hadamard matrix H_b. A fast Walsh-Hadamard transform: b log2(b) additions instead of the b^2
// multiply-adds of the dense product (down_proj of the default model: 14 K against 786 K per token).
void fwht_blocks(float* x, int64_t n, int64_t b) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(b));
  for (int64_t s = 0; s < n; s += b) {
    float* v = x + s;
    for (int64_t h = 1; h < b; h *= 2) {
      for (int64_t i = 0; i < b; i += 2 * h) {
        for (int64_t j = i; j < i + h; j++) {
          const float a = v[j], c = v[j + h];
          v[j] = a + c;
          v[j + h] = a - c;
        }
      }
    }
    for (int64_t j = 0; j < b; j++) v[j] *= norm;
  }
}

Tensor hadamard_transform(const Tensor& x, int64_t b) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "hadamard_transform: float32 CPU tensors only");
  TORCH_CHECK(b >= 2 && (b & (b - 1)) == 0 && x.dim() >= 1 && x.size(-1) % b == 0,
              "hadamard_transform: the block must be a power of two dividing the last dimension");
  Tensor y = x.contiguous().clone();
  fwht_blocks(y.data_ptr<float>(), y.numel(), b);
  return y;
}

// ---- the pieces of a block --------------------------------------------------------------------------

// One linear layer as the Python step would call it: packed (the cpu kernels) or float (torch).
struct Linear {
  bool packed = false;
  Tensor weight, bias;  // float
  Tensor qweight, scales, zeros, act_scale, act_zero, offsets;  // packed
  int64_t hadamard = 0;  // block of the online input rotation (QuantLinear.spec.hadamard), 0: none
  int64_t in_features = 0, out_features = 0, storage_bits = 0, group_size = 0, act_bits = 16, isa = 0;
  bool act_symmetric = false;

  void operator()(const Tensor& x, Tensor& y) const {  // x [1, K] -> y [1, N], both fp32 contiguous
    if (packed) {
      // The same transform as the Python step's (quant/hadamard.py calls hadamard_transform on CPU float32),
      // so the exact mode stays bit-identical to it.
      Tensor xr = hadamard ? hadamard_transform(x, hadamard) : x;
      linear_out(xr, qweight, scales, zeros, opt(bias), opt(act_scale), opt(act_zero), opt(offsets), in_features,
                 storage_bits, group_size, act_bits, act_symmetric, isa, 0, y);
    } else {
      at::linear_out(y, x, weight, opt(bias));
    }
  }
  static std::optional<Tensor> opt(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }
};

std::shared_ptr<Linear> float_linear(const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "native decoder: float linear weights must be contiguous float32 [N, K]");
  auto L = std::make_shared<Linear>();
  L->weight = weight;
  if (bias.has_value()) L->bias = *bias;
  L->in_features = weight.size(1);
  L->out_features = weight.size(0);
  return L;
}

std::shared_ptr<Linear> packed_linear(const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                                      const std::optional<Tensor>& bias, const std::optional<Tensor>& act_scale,
                                      const std::optional<Tensor>& act_zero, const std::optional<Tensor>& offsets,
                                      int64_t in_features, int64_t storage_bits, int64_t group_size, int64_t act_bits,
                                      bool act_symmetric, int64_t isa, int64_t hadamard) {
  auto L = std::make_shared<Linear>();
  L->packed = true;
  TORCH_CHECK(hadamard == 0 || (hadamard >= 2 && (hadamard & (hadamard - 1)) == 0 && in_features % hadamard == 0),
              "native decoder: the Hadamard block must be 0 or a power of two dividing in_features");
  L->hadamard = hadamard;
  L->qweight = qweight;
  L->scales = scales;
  L->zeros = zeros;
  if (bias.has_value()) L->bias = bias->to(at::kFloat).contiguous();
  if (act_scale.has_value()) L->act_scale = *act_scale;
  if (act_zero.has_value()) L->act_zero = *act_zero;
  if (offsets.has_value()) L->offsets = *offsets;
  L->in_features = in_features;
  L->out_features = qweight.size(0);
  L->storage_bits = storage_bits;
  L->group_size = group_size;
  L->act_bits = act_bits;
  L->act_symmetric = act_symmetric;
  L->isa = isa;
  // One call on a random input checks every argument now, not at the first token.
  Tensor x = at::randn({1, in_features}, qweight.options().dtype(at::kFloat));
  Tensor y = at::empty({1, L->out_features}, x.options());
  (*L)(x, y);
  return L;
}

struct Block {
  Tensor norm1, norm2;          // [hidden]
  Tensor q_norm, k_norm;        // [head_dim] (Qwen3) or undefined
  std::vector<std::shared_ptr<Linear>> qkv;      // [q|k|v] fused, or q, k, v
  std::shared_ptr<Linear> o, down;
  std::vector<std::shared_ptr<Linear>> gate_up;  // [gate|up] fused, or gate, up
  Tensor k_cache, v_cache;      // [n_kv, max_len, head_dim]
};

// y = x * rsqrt(mean(x^2) + eps) * w, in fp32 as Llama's RMSNorm (sum of squares in double: no order effects).
void rmsnorm(const float* x, const float* w, float eps, int64_t n, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
  const float r = 1.0f / std::sqrt((float)(ss / (double)n) + eps);
  for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

class NativeDecoder {
 public:
  NativeDecoder(Tensor embed, Tensor final_norm, double eps, Tensor cos, Tensor sin_signed, int64_t n_heads,
                int64_t n_kv, int64_t head_dim, double scaling, bool exact)
      : embed_(embed), final_norm_(final_norm), eps_((float)eps), eps_d_(eps), cos_(cos), sin_(sin_signed),
        hq_(n_heads), hkv_(n_kv), d_(head_dim), scaling_((float)scaling), scaling_d_(scaling), exact_(exact) {
    TORCH_CHECK(embed.dim() == 2 && embed.scalar_type() == at::kFloat && embed.is_contiguous(),
                "native decoder: the embedding must be contiguous float32 [vocab, hidden]");
    TORCH_CHECK(cos.dim() == 2 && cos.size(1) == head_dim && sin_signed.sizes() == cos.sizes() && cos.is_contiguous() &&
                    sin_signed.is_contiguous() && cos.scalar_type() == at::kFloat,
                "native decoder: rotary tables must be contiguous float32 [max_len, head_dim]");
    TORCH_CHECK(n_heads % n_kv == 0 && head_dim % 2 == 0, "native decoder: bad head counts");
    hidden_ = embed.size(1);
    max_len_ = cos.size(0);
    check_vec(final_norm, hidden_, "final norm");
    const bool fast = abqcpu::best_isa() >= abqcpu::ISA_AVX2;  // the kernels' own CPU check (AVX2 + FMA + F16C)
    dot_ = fast ? dot_avx2 : dot_plain;
    axpy_ = fast ? axpy_avx2 : axpy_plain;
  }

  void set_lm_head(std::shared_ptr<Linear> head) {
    TORCH_CHECK(head->in_features == hidden_, "native decoder: lm_head takes ", head->in_features, " inputs, not ",
                hidden_);
    lm_head_ = head;
    logits_ = at::empty({1, head->out_features}, embed_.options());
  }

  void add_block(Tensor norm1, Tensor norm2, std::vector<std::shared_ptr<Linear>> qkv, std::shared_ptr<Linear> o,
                 std::vector<std::shared_ptr<Linear>> gate_up, std::shared_ptr<Linear> down,
                 std::optional<Tensor> q_norm, std::optional<Tensor> k_norm, Tensor k_cache, Tensor v_cache) {
    Block b;
    check_vec(norm1, hidden_, "attention norm");
    check_vec(norm2, hidden_, "MLP norm");
    b.norm1 = norm1;
    b.norm2 = norm2;
    if (q_norm.has_value() || k_norm.has_value()) {
      TORCH_CHECK(q_norm.has_value() && k_norm.has_value(), "native decoder: q_norm and k_norm come together");
      check_vec(*q_norm, d_, "q norm");
      check_vec(*k_norm, d_, "k norm");
      b.q_norm = *q_norm;
      b.k_norm = *k_norm;
    }
    int64_t nqkv = 0;
    for (auto& l : qkv) {
      TORCH_CHECK(l->in_features == hidden_, "native decoder: q/k/v take the hidden state");
      nqkv += l->out_features;
    }
    TORCH_CHECK(nqkv == (hq_ + 2 * hkv_) * d_ && (qkv.size() == 1 || qkv.size() == 3),
                "native decoder: q/k/v produce ", nqkv, " outputs, expected ", (hq_ + 2 * hkv_) * d_);
    if (qkv.size() == 3)
      TORCH_CHECK(qkv[0]->out_features == hq_ * d_ && qkv[1]->out_features == hkv_ * d_,
                  "native decoder: q and k sizes do not match the heads");
    TORCH_CHECK(o->in_features == hq_ * d_ && o->out_features == hidden_, "native decoder: bad o_proj shape");
    int64_t ngu = 0;
    for (auto& l : gate_up) {
      TORCH_CHECK(l->in_features == hidden_, "native decoder: gate/up take the hidden state");
      ngu += l->out_features;
    }
    TORCH_CHECK((gate_up.size() == 1 || gate_up.size() == 2) && ngu % 2 == 0 && down->in_features == ngu / 2 &&
                    down->out_features == hidden_,
                "native decoder: gate/up/down shapes do not match");
    if (gate_up.size() == 2) TORCH_CHECK(gate_up[0]->out_features == ngu / 2, "native decoder: gate and up differ");
    for (const Tensor* c : {&k_cache, &v_cache})
      TORCH_CHECK(c->dim() == 3 && c->size(0) == hkv_ && c->size(1) == max_len_ && c->size(2) == d_ &&
                      c->is_contiguous() && c->scalar_type() == at::kFloat,
                  "native decoder: caches must be contiguous float32 [n_kv, max_len, head_dim]");
    b.qkv = std::move(qkv);
    b.o = o;
    b.gate_up = std::move(gate_up);
    b.down = down;
    b.k_cache = k_cache;
    b.v_cache = v_cache;
    inter_ = ngu / 2;
    blocks_.push_back(std::move(b));
  }

  // Logits [vocab] of `token` at position `pos` (the cache holds positions 0..pos-1). The returned tensor is
  // a buffer that the next step overwrites.
  Tensor step(int64_t token, int64_t pos) {
    TORCH_CHECK(lm_head_, "native decoder: no lm_head set");
    TORCH_CHECK(token >= 0 && token < embed_.size(0), "native decoder: token id ", token, " out of range");
    TORCH_CHECK(pos >= 0 && pos < max_len_, "native decoder: position ", pos, " outside the cache of ", max_len_);
    ensure_buffers();
    const int64_t H = hidden_, nq = hq_ * d_, nk = hkv_ * d_;
    float* x = x_.data_ptr<float>();
    std::memcpy(x, embed_.data_ptr<float>() + token * H, H * sizeof(float));
    for (Block& b : blocks_) {
      norm(x_, b.norm1, h_);
      run(b.qkv, h_, qkv_);
      float* q = qkv_.data_ptr<float>();
      float* k = q + nq;
      const float* v = k + nk;
      if (b.q_norm.defined()) {
        head_norm(qkv_.narrow(1, 0, nq).view({hq_, d_}), b.q_norm);
        head_norm(qkv_.narrow(1, nq, nk).view({hkv_, d_}), b.k_norm);
      }
      float* qk = qk_.data_ptr<float>();  // roped q | k, as [hq + hkv, d]
      rope(q, qk, hq_ + hkv_, pos);
      float* kc = b.k_cache.data_ptr<float>();
      float* vc = b.v_cache.data_ptr<float>();
      for (int64_t j = 0; j < hkv_; j++) {
        std::memcpy(kc + (j * max_len_ + pos) * d_, qk + nq + j * d_, d_ * sizeof(float));
        std::memcpy(vc + (j * max_len_ + pos) * d_, v + j * d_, d_ * sizeof(float));
      }
      attend(b, pos + 1);
      (*b.o)(attn_, out_);
      add_into(x, out_.data_ptr<float>(), H);
      norm(x_, b.norm2, h_);
      run(b.gate_up, h_, gu_);
      silu_mul();
      (*b.down)(mid_, out_);
      add_into(x, out_.data_ptr<float>(), H);
    }
    norm(x_, final_norm_, h_);
    (*lm_head_)(h_, logits_);
    return logits_[0];
  }

  int64_t max_len() const { return max_len_; }

 private:
  static void check_vec(const Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.dim() == 1 && t.numel() == n && t.is_contiguous() && t.scalar_type() == at::kFloat,
                "native decoder: ", what, " weight must be contiguous float32 [", n, "]");
  }

  void ensure_buffers() {
    if (x_.defined()) return;
    const auto f = embed_.options();
    x_ = at::empty({1, hidden_}, f);
    h_ = at::empty({1, hidden_}, f);
    out_ = at::empty({1, hidden_}, f);
    qkv_ = at::empty({1, (hq_ + 2 * hkv_) * d_}, f);
    attn_ = at::empty({1, hq_ * d_}, f);
    gu_ = at::empty({1, 2 * inter_}, f);
    mid_ = at::empty({1, inter_}, f);
    scores_ = at::empty({hq_, max_len_}, f);
    qk_ = at::empty({hq_ + hkv_, d_}, f);
  }

  // Linears reading the same input (q/k/v, gate/up): outputs written side by side into `out` [1, sum N] (a
  // column slice of one row is contiguous, so each layer writes its part in place; no fused copy of weights).
  void run(const std::vector<std::shared_ptr<Linear>>& ls, const Tensor& in, Tensor& out) {
    if (ls.size() == 1) return (*ls[0])(in, out);
    int64_t off = 0;
    for (auto& l : ls) {
      Tensor part = out.narrow(1, off, l->out_features);
      (*l)(in, part);
      off += l->out_features;
    }
  }

  // h = RMSNorm(x) [1, H]. Exact mode: torch's own op, as the Python step (F.rms_norm), bit for bit.
  void norm(const Tensor& x, const Tensor& w, Tensor& h) {
    if (exact_) {
      h.copy_(at::rms_norm(x, {hidden_}, w, eps_d_));
    } else {
      rmsnorm(x.data_ptr<float>(), w.data_ptr<float>(), eps_, hidden_, h.data_ptr<float>());
    }
  }

  // Per-head RMSNorm of q or k in place (Qwen3). Exact mode: the Hugging Face module's own op sequence.
  void head_norm(Tensor t, const Tensor& w) {
    if (exact_) {
      const Tensor var = t.pow(2).mean(-1, true);
      t.copy_(w * (t * at::rsqrt(var + eps_d_)));
    } else {
      float* p = t.data_ptr<float>();
      for (int64_t i = 0; i < t.size(0); i++) rmsnorm(p + i * d_, w.data_ptr<float>(), eps_, d_, p + i * d_);
    }
  }

  // mid = silu(gate) * up. Exact mode: torch's silu and mul (its vectorized exp), as the Python step.
  void silu_mul() {
    if (exact_) {
      Tensor g = gu_.narrow(1, 0, inter_), u = gu_.narrow(1, inter_, inter_);
      at::mul_out(mid_, at::silu(g), u);
      return;
    }
    const float* g = gu_.data_ptr<float>();
    float* mid = mid_.data_ptr<float>();
    for (int64_t i = 0; i < inter_; i++) mid[i] = g[i] / (1.0f + std::exp(-g[i])) * g[inter_ + i];
  }

  // dst = src * cos + roll(src, d/2) * sin_signed per head (the rotate_half form of the Python step: the same
  // two products and one sum per element, so the same values).
  void rope(const float* src, float* dst, int64_t heads, int64_t pos) const {
    const float* c = cos_.data_ptr<float>() + pos * d_;
    const float* s = sin_.data_ptr<float>() + pos * d_;
    const int64_t half = d_ / 2;
    for (int64_t hh = 0; hh < heads; hh++) {
      const float* p = src + hh * d_;
      float* o = dst + hh * d_;
      for (int64_t i = 0; i < d_; i++) {
        const float a = p[i] * c[i], b = p[i < half ? i + half : i - half] * s[i];
        o[i] = a + b;
      }
    }
  }

  // attn_ [1, hq * d] = softmax(q k^T * scaling) v over cache positions [0, n), grouped-query heads.
  void attend(Block& b, int64_t n) {
    if (exact_) {  // torch's SDPA on the same views as the Python step
      const Tensor q = qk_.narrow(0, 0, hq_).unsqueeze(0).transpose(0, 1).unsqueeze(0);  // [1, hq, 1, d]
      const Tensor k = b.k_cache.narrow(1, 0, n).unsqueeze(0), v = b.v_cache.narrow(1, 0, n).unsqueeze(0);
      const Tensor a = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, false, scaling_d_, hq_ != hkv_);
      attn_.view({1, hq_, d_}).copy_(a[0].transpose(0, 1));
      return;
    }
    attend_fast(qk_.data_ptr<float>(), b.k_cache.data_ptr<float>(), b.v_cache.data_ptr<float>(), n,
                attn_.data_ptr<float>());
  }

  void attend_fast(const float* q, const float* kc, const float* vc, int64_t n, float* out) {
    const int64_t group = hq_ / hkv_;
    float* scores = scores_.data_ptr<float>();
    auto head = [&](int64_t hh) {
      const float* qh = q + hh * d_;
      const float* kh = kc + (hh / group) * max_len_ * d_;
      const float* vh = vc + (hh / group) * max_len_ * d_;
      float* sc = scores + hh * max_len_;
      float mx = -INFINITY;
      for (int64_t t = 0; t < n; t++) {
        sc[t] = dot_(qh, kh + t * d_, d_) * scaling_;
        mx = sc[t] > mx ? sc[t] : mx;
      }
      float sum = 0.f;
      for (int64_t t = 0; t < n; t++) {
        sc[t] = std::exp(sc[t] - mx);
        sum += sc[t];
      }
      float* o = out + hh * d_;
      std::memset(o, 0, d_ * sizeof(float));
      for (int64_t t = 0; t < n; t++) axpy_(sc[t], vh + t * d_, o, d_);
      const float inv = 1.0f / sum;
      for (int64_t i = 0; i < d_; i++) o[i] *= inv;
    };
    // Heads in parallel once the context makes them worth a parallel region (~ a few us each).
    if (n * d_ * hq_ >= (int64_t(1) << 17)) {
      at::parallel_for(0, hq_, 1, [&](int64_t h0, int64_t h1) {
        for (int64_t hh = h0; hh < h1; hh++) head(hh);
      });
    } else {
      for (int64_t hh = 0; hh < hq_; hh++) head(hh);
    }
  }

  static void add_into(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
  }

  Tensor embed_, final_norm_, cos_, sin_;
  float eps_;
  double eps_d_;
  int64_t hq_, hkv_, d_, hidden_ = 0, max_len_ = 0, inter_ = 0;
  float scaling_;
  double scaling_d_;
  bool exact_;
  std::vector<Block> blocks_;
  std::shared_ptr<Linear> lm_head_;
  Tensor x_, h_, out_, qkv_, qk_, attn_, gu_, mid_, scores_, logits_;
  float (*dot_)(const float*, const float*, int64_t) = dot_plain;
  void (*axpy_)(float, const float*, float*, int64_t) = axpy_plain;
};

}  // namespace

void bind_decoder(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Linear, std::shared_ptr<Linear>>(m, "NativeLinear")
      .def_readonly("in_features", &Linear::in_features)
      .def_readonly("out_features", &Linear::out_features)
      .def_readonly("packed", &Linear::packed);
  m.def("float_linear", &float_linear, py::arg("weight"), py::arg("bias") = py::none());
  m.def("packed_linear", &packed_linear, py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("act_scale"), py::arg("act_zero"), py::arg("row_offsets"), py::arg("in_features"),
        py::arg("storage_bits"), py::arg("group_size"), py::arg("act_bits"), py::arg("act_symmetric"), py::arg("isa"),
        py::arg("hadamard") = 0);
  m.def("hadamard_transform", &hadamard_transform, py::arg("x"), py::arg("block"),
        py::call_guard<py::gil_scoped_release>());
  py::class_<NativeDecoder>(m, "NativeDecoder")
      .def(py::init<Tensor, Tensor, double, Tensor, Tensor, int64_t, int64_t, int64_t, double, bool>(),
           py::arg("embed"), py::arg("final_norm"), py::arg("eps"), py::arg("cos"), py::arg("sin_signed"),
           py::arg("n_heads"), py::arg("n_kv"), py::arg("head_dim"), py::arg("scaling"), py::arg("exact"))
      .def("set_lm_head", &NativeDecoder::set_lm_head)
      .def("add_block", &NativeDecoder::add_block, py::arg("norm1"), py::arg("norm2"), py::arg("qkv"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("q_norm"), py::arg("k_norm"), py::arg("k_cache"),
           py::arg("v_cache"))
      .def("step", &NativeDecoder::step, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("max_len", &NativeDecoder::max_len);
}

}  // namespace abqcpu_torch
