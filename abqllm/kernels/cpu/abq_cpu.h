// CPU linear kernels for packed WpAq weights: the interface between the torch binding
// (abq_cpu_ops.cpp) and the kernels (abq_cpu_scalar.cpp, abq_cpu_avx2.cpp, abq_cpu_avx512.cpp). Plain C++, no
// torch headers.
//
// Weights are read straight from the checkpoint's plain packed layout (formats/packing.py): row n is
// Kpad/32 runs of b int32 words, code j of a run at bits [j*b, j*b + b) of the run's bit string.
// A kernel expands one run of 32 codes into 32 bytes at a time. The AVX2 expanders write them in a
// fixed order of their own (see `run_permutation`): the activations are permuted into the same order
// once per call, so the dot products never shuffle weights. Groups are multiples of 32 columns, so a
// permutation inside a run never mixes groups. The AVX-512 expanders produce natural order (except 4-bit codes on
// the float path), two runs per vector.
#pragma once

#include <cstddef>
#include <cstdint>

namespace abqcpu {

enum Isa : int { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

// Per-channel integer sums are flushed to float every this many columns (int32 headroom).
constexpr int64_t SEGMENT_COLS = 8192;
// Up to this many tokens the weights are expanded in registers and used at once (all tokens in one tile);
// beyond it each row is expanded once into a buffer and token tiles of 4 read it.
constexpr int64_t FUSED_MAX_M = 4;

// ISA_AVX512 when the CPU (and OS) has AVX-512 F/BW/VL/DQ/VNNI/VBMI besides the AVX2 set; else ISA_AVX2 when it
// has AVX2, FMA and F16C; else ISA_SCALAR.
int best_isa();
bool isa_available(int isa);

// Position p of an expanded run holds code perm[p] of the run, for the integer (A2..A8) or the float (A16)
// kernels (identity for the scalar kernels).
void run_permutation(int isa, int bits, bool float_act, int32_t perm[32]);

// Whether A2..A8 activation codes are passed as int16 (storage bits 7, 8) instead of u8 (storage bits <= 6). The
// AVX2 kernels multiply int16 x int16 there; the AVX-512 ones pack the codes back to u8 once per call.
static inline bool wide_int_path(int bits) { return bits > 6; }

struct ActQuant {
  int bits = 8;            // 2..8
  bool symmetric = false;
  bool is_static = false;  // one scale/zero for all rows (calibrated), else per row
  float static_scale = 1.f, static_zero = 0.f;
};

// Activations in the kernels' form, rows [m0, m1) of x [M, K] (fp32, row stride ldx):
//   quantize_rows: per-row scale/zero exactly as quant/primitives.py (act_qparams, quantize_act), codes
//     written permuted for `bits` into q8 [M, Kpad] (uint8) or q16 [M, Kpad] (int16, wide path);
//   permute_rows: fp32 copy permuted into xp [M, Kpad] (skipped when xp is null); padding columns K..Kpad get
//     0. With xsum, also the per-group sums of each row, xsum [M, G] (group_size 0: one group).
void quantize_rows(int isa, int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, const ActQuant& a,
                   int64_t m0, int64_t m1, uint8_t* q8, int16_t* q16, float* sx, float* zx);
void permute_rows(int isa, int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, int64_t m0, int64_t m1,
                  float* xp, int64_t group_size = 0, float* xsum = nullptr);

struct LinearArgs {
  int64_t M = 0, N = 0, K = 0, Kpad = 0, G = 1;
  int bits = 4;         // storage bits of a code, 1..8
  int64_t group_size = 0;  // 0: per output channel
  const uint8_t* qweight = nullptr;  // [N, Kpad/8*bits] bytes
  const uint16_t* scales = nullptr;  // [N, G] float16 bits
  const uint8_t* zeros = nullptr;    // [N, G]
  const float* bias = nullptr;       // [N] or null
  const float* row_offsets = nullptr;  // [N] sum_g s_w W_g (see row_offsets) or null: computed per call
  bool float_act = false;            // A16: xf; else q8 / q16 with sx, zx
  const float* xf = nullptr;
  const float* xsum = nullptr;       // A16, M <= 4: [M, G] sum of x over each group (permute_rows)
  const uint8_t* q8 = nullptr;
  const int16_t* q16 = nullptr;
  const float* sx = nullptr;
  const float* zx = nullptr;
  float* y = nullptr;                // [M, ldy]
  int64_t ldy = 0;
  float* w_out = nullptr;            // dequant_rows only: rows [w_row0, ...) as [., Kpad] fp32, in the runs' order
  int64_t w_row0 = 0;
};

// Scratch one thread needs for linear_rows / dequant_rows (bytes).
size_t scratch_bytes(const LinearArgs& L);
// y[:, n0:n1] for output rows [n0, n1).
void linear_rows(int isa, const LinearArgs& L, int64_t n0, int64_t n1, void* scratch);
// w_out[n0:n1, :] = s * (code - z) in the order of run_permutation (pair it with permute_rows' x).
void dequant_rows(int isa, const LinearArgs& L, int64_t n0, int64_t n1, void* scratch);
// out[n] = sum_g s_w[n, g] * W[n, g], W = sum of (code - z_w) over the group's real columns: the weight side of
// the activation zero-point term, y = s_x (sum_g s_w sum u (w - z_w) - z_x out[n]) + b. Depends on the weights
// only, so callers may compute it once per layer.
void row_offsets(int isa, const LinearArgs& L, int64_t n0, int64_t n1, void* scratch, float* out);

// The same entry points per instruction set (dispatched by the functions above).
namespace scalar {
void quantize_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, const ActQuant& a, int64_t m0,
                   int64_t m1, uint8_t* q8, int16_t* q16, float* sx, float* zx);
void permute_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, int64_t m0, int64_t m1, float* xp);
void linear_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch);
void dequant_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch);
void row_offsets(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch, float* out);
}  // namespace scalar
namespace avx2 {
void run_permutation(int bits, bool float_act, int32_t perm[32]);
void quantize_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, const ActQuant& a, int64_t m0,
                   int64_t m1, uint8_t* q8, int16_t* q16, float* sx, float* zx);
void permute_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, int64_t m0, int64_t m1, float* xp);
void linear_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch);
void dequant_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch);
void row_offsets(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch, float* out);
}  // namespace avx2
namespace avx512 {
void run_permutation(int bits, bool float_act, int32_t perm[32]);
void quantize_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, const ActQuant& a, int64_t m0,
                   int64_t m1, uint8_t* q8, int16_t* q16, float* sx, float* zx);
void permute_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, int64_t m0, int64_t m1, float* xp);
void linear_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch);
void dequant_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch);
void row_offsets(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch, float* out);
}  // namespace avx512

// Shared helpers (header-only, plain scalar code; static so that no AVX2-compiled copy is shared).
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      man &= 0x3ff;
      bits = sign | ((exp + 112) << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// Per-token activation scale and zero point from the row's min and max, exactly as
// quant/primitives.py computes them in float32 (round half to even, like torch.round).
static inline void act_qparams_from_range(float lo, float hi, const ActQuant& a, float* s, float* z) {
  if (a.symmetric) {
    const float alo = __builtin_fabsf(lo), ahi = __builtin_fabsf(hi);
    const float half = (float)(1 << (a.bits - 1));
    const float scale = (alo > ahi ? alo : ahi) / (half - 1.0f);
    *s = scale > 1e-8f ? scale : 1e-8f;
    *z = half;
    return;
  }
  lo = lo < 0.f ? lo : 0.f;
  hi = hi > 0.f ? hi : 0.f;
  const float scale = (hi - lo) / (float)((1 << a.bits) - 1);
  *s = scale > 1e-8f ? scale : 1e-8f;
  *z = __builtin_nearbyintf(-lo / *s);
}

// The number of real (not padded) columns of group g.
static inline int64_t group_cols(int64_t K, int64_t group_size, int64_t g) {
  if (group_size == 0) return K;
  int64_t s = g * group_size, e = s + group_size < K ? s + group_size : K;
  return e - s;
}

}  // namespace abqcpu
