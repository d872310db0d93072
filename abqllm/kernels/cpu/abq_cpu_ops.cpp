// torch binding of the CPU kernels: ops in the `abqllm_cpu` namespace (torch.ops.abqllm_cpu.*), threads
// from torch's intra-op pool (at::parallel_for, so torch.set_num_threads applies).
//
//   linear(x f32 [M, K], qweight i32 [N, Kpad/32*b], scales f16 [N, G], zeros u8 [N, G], bias f32 [N]?,
//          act_scale f32 [1]?, act_zero f32 [1]?, row_offsets f32 [N]?, in_features, storage_bits, group_size, act_bits,
//          act_symmetric, isa=0, mm_from_m=0) -> y f32 [M, N]
//     act_bits 16: fp32 activations; 2..8: per-token (or static, with act_scale/act_zero) quantization fused.
//     mm_from_m > 0 (float path only): from this many tokens on, dequantize the weight per call into a
//     temporary fp32 matrix (at most 32 MB; larger ones in 8 MB slices) and multiply with at::mm (nothing is
//     cached).
//   linear.out(..., *, out f32 [M, N]) -> out   (the same, into a given buffer)
//   act_quant(x f32 [M, K], bits, symmetric, act_scale?, act_zero?, isa=0) -> (codes u8 [M, K], scale [M], zero [M])
//   row_offsets(qweight, scales, zeros, in_features, storage_bits, group_size, isa=0) -> f32 [N]
//     the weight-only term of the A2..A8 epilogue (abq_cpu.h); pass it to linear to skip recomputing it.
//   best_isa() -> int   (1 scalar, 2 AVX2+FMA+F16C)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "abq_cpu.h"
#include "abq_cpu_torch.h"

namespace {

using at::Tensor;

// Below this many weight columns x rows x tokens (~15 us on one core), a call runs on one thread: a parallel
// region costs a few us on an idle machine, and up to a scheduler tick (measured 16 ms) on an oversubscribed one.
constexpr int64_t MIN_PARALLEL_WORK = 1 << 18;

int resolve_isa(int64_t isa) {
  if (isa == abqcpu::ISA_AUTO) return abqcpu::best_isa();
  TORCH_CHECK(abqcpu::isa_available((int)isa), "abqllm_cpu: instruction set ", isa, " is not available on this CPU");
  return (int)isa;
}

int64_t grain(int64_t items, int64_t work_per_item) {
  if (items * work_per_item < MIN_PARALLEL_WORK) return items;  // one chunk: no parallel region
  return 1;
}

// Per-thread buffers reused across calls (an allocation costs about as much as a small layer's product).
// Slot 0: the calling thread's activation buffers (kept when <= 1 MB); slot 1: each worker's row scratch.
constexpr size_t KEEP_BYTES = 1 << 20;

uint8_t* thread_buffer(int slot, size_t bytes) {
  thread_local std::vector<uint8_t> bufs[2];
  std::vector<uint8_t>& v = bufs[slot];
  if (v.size() < bytes + 64) v.resize(bytes + 64);
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<uint8_t*>((p + 63) & ~uintptr_t(63));
}

uint8_t* row_scratch(const abqcpu::LinearArgs& L) { return thread_buffer(1, abqcpu::scratch_bytes(L)); }

template <typename F>
void parallel_rows(int64_t n, int64_t work_per_row, const F& f) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain(n, work_per_row), f);
}

abqcpu::ActQuant act_params(int64_t bits, bool symmetric, const std::optional<Tensor>& act_scale,
                            const std::optional<Tensor>& act_zero) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "abqllm_cpu: activation bits must be 2..8 (or 16 for float), got ", bits);
  abqcpu::ActQuant a;
  a.bits = (int)bits;
  a.symmetric = symmetric;
  if (act_scale.has_value()) {
    TORCH_CHECK(act_zero.has_value(), "abqllm_cpu: act_scale given without act_zero");
    a.is_static = true;
    a.static_scale = act_scale->to(at::kFloat).reshape({-1})[0].item<float>();
    a.static_zero = act_zero->to(at::kFloat).reshape({-1})[0].item<float>();
  }
  return a;
}

// Checks the packed weight (qweight [N, Kpad/32*b] int32, scales/zeros [N, G]) and fills the
// weight side of LinearArgs; M and the activation side are the caller's.
static abqcpu::LinearArgs packed_weight_args(const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                                             int64_t in_features, int64_t storage_bits, int64_t group_size) {
  const int64_t K = in_features, Kpad = (K + 31) / 32 * 32, b = storage_bits;
  TORCH_CHECK(b >= 1 && b <= 8, "abqllm_cpu: storage bits must be 1..8, got ", b);
  TORCH_CHECK(group_size >= 0 && group_size % 32 == 0, "abqllm_cpu: group size must be 0 or a multiple of 32, got ",
              group_size);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt && qweight.size(1) == Kpad / 32 * b &&
                  qweight.is_contiguous(),
              "abqllm_cpu: qweight must be contiguous int32 [N, ", Kpad / 32 * b, "], got ", qweight.sizes());
  const int64_t N = qweight.size(0), G = group_size == 0 ? 1 : (K + group_size - 1) / group_size;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) == G,
              "abqllm_cpu: scales must be contiguous float16 [", N, ", ", G, "]");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.dim() == 2 && zeros.size(0) == N &&
                  zeros.size(1) == G,
              "abqllm_cpu: zeros must be contiguous uint8 [", N, ", ", G, "]");
  abqcpu::LinearArgs L;
  L.N = N;
  L.K = K;
  L.Kpad = Kpad;
  L.G = G;
  L.bits = (int)b;
  L.group_size = group_size;
  L.qweight = reinterpret_cast<const uint8_t*>(qweight.data_ptr<int32_t>());
  L.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  L.zeros = zeros.data_ptr<uint8_t>();
  return L;
}

}  // namespace

namespace abqcpu_torch {

Tensor& linear_out(const Tensor& x_in, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                   const std::optional<Tensor>& bias, const std::optional<Tensor>& act_scale,
                   const std::optional<Tensor>& act_zero, const std::optional<Tensor>& row_offsets,
                   int64_t in_features, int64_t storage_bits, int64_t group_size, int64_t act_bits,
                   bool act_symmetric, int64_t isa_arg, int64_t mm_from_m, Tensor& y) {
  const int isa = resolve_isa(isa_arg);
  abqcpu::LinearArgs L = packed_weight_args(qweight, scales, zeros, in_features, storage_bits, group_size);
  const int64_t K = L.K, Kpad = L.Kpad, N = L.N, G = L.G, b = storage_bits;
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K && x_in.scalar_type() == at::kFloat,
              "abqllm_cpu: x must be float32 [M, ", K, "], got ", x_in.sizes(), " ", x_in.scalar_type());
  Tensor bias32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "abqllm_cpu: bias must have ", N, " elements");
    bias32 = bias->to(at::kFloat).contiguous();
  }
  if (row_offsets.has_value())
    TORCH_CHECK(row_offsets->scalar_type() == at::kFloat && row_offsets->is_contiguous() && row_offsets->numel() == N,
                "abqllm_cpu: row_offsets must be contiguous float32 [", N, "]");
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 && y.size(0) == M && y.size(1) == N,
              "abqllm_cpu: out must be contiguous float32 [", M, ", ", N, "]");
  if (M == 0 || N == 0) return y;

  L.M = M;
  L.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  L.row_offsets = row_offsets.has_value() ? row_offsets->data_ptr<float>() : nullptr;
  L.y = y.data_ptr<float>();
  L.ldy = N;
  const float* xd = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);

  // Activation buffers: [M, Kpad] x (fp32) or codes (u8 / int16), then s_x, z_x [M] or sum(x) [M, G].
  const bool wide = abqcpu::wide_int_path((int)b);
  const size_t xbytes = (size_t)M * Kpad * (act_bits == 16 ? 4 : wide ? 2 : 1), xbytes64 = (xbytes + 63) / 64 * 64;
  const size_t abytes = xbytes64 + (size_t)M * 4 * (act_bits == 16 ? G : 2) + 64;
  Tensor owned;
  uint8_t* abuf;
  if (abytes <= KEEP_BYTES) {
    abuf = thread_buffer(0, abytes);
  } else {
    owned = at::empty({(int64_t)abytes + 64}, x.options().dtype(at::kByte));
    const uintptr_t p = reinterpret_cast<uintptr_t>(owned.data_ptr<uint8_t>());
    abuf = reinterpret_cast<uint8_t*>((p + 63) & ~uintptr_t(63));
  }
  float* tail = reinterpret_cast<float*>(abuf + xbytes64);
  Tensor w;
  if (act_bits == 16) {
    L.float_act = true;
    int32_t perm[32];
    abqcpu::run_permutation(isa, (int)b, true, perm);
    bool identity = Kpad == K && ldx == K;
    for (int p = 0; p < 32; p++) identity = identity && perm[p] == p;
    float* xp = identity ? const_cast<float*>(xd) : reinterpret_cast<float*>(abuf);  // x itself when in order
    float* xs = M <= abqcpu::FUSED_MAX_M ? tail : nullptr;  // per-group sums of x (small-M AVX2 kernels)
    parallel_rows(M, Kpad, [&](int64_t m0, int64_t m1) {
      abqcpu::permute_rows(isa, (int)b, xd, ldx, K, Kpad, m0, m1, identity ? nullptr : xp, group_size, xs);
    });
    L.xf = xp;
    L.xsum = xs;
    if (mm_from_m > 0 && M >= mm_from_m) {
      // Dequantize to fp32 (in the runs' column order, as xp) and multiply with at::mm. Matrices over 32 MB
      // go 8 MB of rows at a time into y^T (a bounded temporary; few chunks, since each one is two parallel
      // regions).
      const Tensor xt = at::from_blob(xp, {M, Kpad}, x.options());
      const bool whole = N * Kpad <= (int64_t(1) << 23);
      const int64_t chunk = whole ? N : std::max<int64_t>(16, (int64_t(1) << 21) / Kpad);
      w = at::empty({chunk, Kpad}, x.options());
      L.w_out = w.data_ptr<float>();
      Tensor yT = whole ? Tensor() : at::empty({N, M}, x.options());
      for (int64_t c0 = 0; c0 < N; c0 += chunk) {
        const int64_t c1 = std::min(N, c0 + chunk);
        L.w_row0 = c0;
        parallel_rows(c1 - c0, Kpad, [&](int64_t n0, int64_t n1) {
          abqcpu::dequant_rows(isa, L, c0 + n0, c0 + n1, row_scratch(L));
        });
        if (whole) {
          if (bias32.defined()) return at::addmm_out(y, bias32, xt, w.t());
          return at::mm_out(y, xt, w.t());
        }
        Tensor out_rows = yT.narrow(0, c0, c1 - c0);
        at::mm_out(out_rows, w.narrow(0, 0, c1 - c0), xt.t());
      }
      y.copy_(yT.t());
      if (bias32.defined()) y.add_(bias32);
      return y;
    }
  } else {
    const abqcpu::ActQuant a = act_params(act_bits, act_symmetric, act_scale, act_zero);
    uint8_t* q8 = wide ? nullptr : abuf;
    int16_t* q16 = wide ? reinterpret_cast<int16_t*>(abuf) : nullptr;
    float *sxp = tail, *zxp = tail + M;
    parallel_rows(M, Kpad, [&](int64_t m0, int64_t m1) {
      abqcpu::quantize_rows(isa, (int)b, xd, ldx, K, Kpad, a, m0, m1, q8, q16, sxp, zxp);
    });
    L.q8 = q8;
    L.q16 = q16;
    L.sx = sxp;
    L.zx = zxp;
  }
  parallel_rows(N, Kpad * M, [&](int64_t n0, int64_t n1) {
    abqcpu::linear_rows(isa, L, n0, n1, row_scratch(L));
  });
  return y;
}

}  // namespace abqcpu_torch

namespace {

using abqcpu_torch::linear_out;

Tensor linear(const Tensor& x, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
              const std::optional<Tensor>& bias, const std::optional<Tensor>& act_scale,
              const std::optional<Tensor>& act_zero, const std::optional<Tensor>& row_offsets, int64_t in_features,
              int64_t storage_bits, int64_t group_size, int64_t act_bits, bool act_symmetric, int64_t isa,
              int64_t mm_from_m) {
  Tensor y = at::empty({x.dim() == 2 ? x.size(0) : 0, qweight.size(0)}, x.options().dtype(at::kFloat));
  return linear_out(x, qweight, scales, zeros, bias, act_scale, act_zero, row_offsets, in_features, storage_bits,
                    group_size, act_bits, act_symmetric, isa, mm_from_m, y);
}

Tensor row_offsets(const Tensor& qweight, const Tensor& scales, const Tensor& zeros, int64_t in_features,
                   int64_t storage_bits, int64_t group_size, int64_t isa_arg) {
  const int isa = resolve_isa(isa_arg);
  const abqcpu::LinearArgs L = packed_weight_args(qweight, scales, zeros, in_features, storage_bits, group_size);
  const int64_t N = L.N, Kpad = L.Kpad;
  Tensor out = at::empty({N}, qweight.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  parallel_rows(N, Kpad, [&](int64_t n0, int64_t n1) {
    abqcpu::row_offsets(isa, L, n0, n1, row_scratch(L), o);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> act_quant(const Tensor& x_in, int64_t bits, bool symmetric,
                                             const std::optional<Tensor>& act_scale,
                                             const std::optional<Tensor>& act_zero, int64_t isa_arg) {
  const int isa = resolve_isa(isa_arg);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "abqllm_cpu: x must be float32 [M, K]");
  const abqcpu::ActQuant a = act_params(bits, symmetric, act_scale, act_zero);
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), Kpad = (K + 31) / 32 * 32;
  Tensor q = at::empty({M, Kpad}, x.options().dtype(at::kByte));
  Tensor sx = at::empty({M}, x.options()), zx = at::empty({M}, x.options());
  const float* xd = x.data_ptr<float>();
  uint8_t* q8 = q.data_ptr<uint8_t>();
  float *sxp = sx.data_ptr<float>(), *zxp = zx.data_ptr<float>();
  // 8-bit codes are expanded in natural order, so their permutation is the identity.
  if (K > 0)
    parallel_rows(M, Kpad, [&](int64_t m0, int64_t m1) {
      abqcpu::quantize_rows(isa, 8, xd, x.stride(0), K, Kpad, a, m0, m1, q8, nullptr, sxp, zxp);
    });
  if (Kpad != K) q = q.narrow(1, 0, K).contiguous();
  return {q, sx, zx};
}

int64_t best_isa() { return abqcpu::best_isa(); }

}  // namespace

TORCH_LIBRARY(abqllm_cpu, m) {
  m.def(
      "linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, Tensor? act_scale, "
      "Tensor? act_zero, Tensor? row_offsets, int in_features, int storage_bits, int group_size, int act_bits, bool act_symmetric, "
      "int isa=0, int mm_from_m=0) -> Tensor");
  m.def(
      "linear.out(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, Tensor? act_scale, "
      "Tensor? act_zero, Tensor? row_offsets, int in_features, int storage_bits, int group_size, int act_bits, bool act_symmetric, "
      "int isa=0, int mm_from_m=0, *, Tensor(a!) out) -> Tensor(a!)");
  m.def(
      "act_quant(Tensor x, int bits, bool symmetric, Tensor? act_scale=None, Tensor? act_zero=None, int isa=0) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "row_offsets(Tensor qweight, Tensor scales, Tensor zeros, int in_features, int storage_bits, int group_size, "
      "int isa=0) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(abqllm_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear.out", &linear_out);
  m.impl("act_quant", &act_quant);
  m.impl("row_offsets", &row_offsets);
}

// The same linear as a plain Python function: calling through the dispatcher from Python boxes the 15
// arguments (~3 us, as much as a small layer's product); eager decode calls this one.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, pybind11::call_guard<pybind11::gil_scoped_release>());
  abqcpu_torch::bind_decoder(m);
}

