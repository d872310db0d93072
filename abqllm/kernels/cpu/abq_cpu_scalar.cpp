// Portable scalar kernels (any CPU): natural column order, the same arithmetic as the AVX2 path.
// Also the dispatch functions of abq_cpu.h.
#include <cmath>
#include <cstring>
#include <cpuid.h>

#include "abq_cpu.h"

namespace abqcpu {

namespace {

bool cpu_has_avx2_fma_f16c() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return false;
  unsigned xlo, xhi;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  if ((xlo & 6) != 6) return false;  // the OS saves xmm and ymm state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return b & (1u << 5);  // AVX2
#else
  return false;
#endif
}

// AVX-512 F/BW/VL/DQ/VNNI/VBMI with the OS saving the opmask and zmm state (XCR0 bits 5-7), besides the AVX2 set.
bool cpu_has_avx512_vnni_vbmi() {
#if defined(__x86_64__) || defined(__i386__)
  if (!cpu_has_avx2_fma_f16c()) return false;
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi")))
    return false;
  unsigned xlo, xhi;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  return (xlo & 0xE6) == 0xE6;
#else
  return false;
#endif
}

// Expand run r of a packed row into 32 codes, natural order. Copies the run first: the run is 4*bits bytes
// and the two-byte window of the last code may lie past it.
inline void expand_run(const uint8_t* row, int bits, int64_t r, uint8_t* out) {
  uint8_t tmp[40];
  std::memset(tmp, 0, sizeof(tmp));
  std::memcpy(tmp, row + r * 4 * bits, 4 * bits);
  const unsigned mask = (1u << bits) - 1;
  for (int j = 0; j < 32; j++) {
    const int bit = j * bits;
    const unsigned v = tmp[bit >> 3] | (unsigned)tmp[(bit >> 3) + 1] << 8;
    out[j] = (uint8_t)((v >> (bit & 7)) & mask);
  }
}

// (first run, end run) of group g; per channel: all runs.
inline void group_runs(const LinearArgs& L, int64_t g, int64_t* r0, int64_t* r1) {
  const int64_t runs = L.Kpad / 32;
  if (L.group_size == 0) {
    *r0 = 0;
    *r1 = runs;
    return;
  }
  const int64_t per = L.group_size / 32;
  *r0 = g * per;
  *r1 = *r0 + per < runs ? *r0 + per : runs;
}

}  // namespace

int best_isa() {
  static const int isa = cpu_has_avx512_vnni_vbmi() ? ISA_AVX512 : cpu_has_avx2_fma_f16c() ? ISA_AVX2 : ISA_SCALAR;
  return isa;
}

bool isa_available(int isa) { return isa >= ISA_SCALAR && isa <= best_isa(); }

static int resolve(int isa) { return isa == ISA_AUTO ? best_isa() : isa; }

void run_permutation(int isa, int bits, bool float_act, int32_t perm[32]) {
  isa = resolve(isa);
  if (isa == ISA_AVX512) return avx512::run_permutation(bits, float_act, perm);
  if (isa == ISA_AVX2) return avx2::run_permutation(bits, float_act, perm);
  for (int p = 0; p < 32; p++) perm[p] = p;
}

void quantize_rows(int isa, int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, const ActQuant& a,
                   int64_t m0, int64_t m1, uint8_t* q8, int16_t* q16, float* sx, float* zx) {
  isa = resolve(isa);
  if (isa == ISA_AVX512) return avx512::quantize_rows(bits, x, ldx, K, Kpad, a, m0, m1, q8, q16, sx, zx);
  if (isa == ISA_AVX2) return avx2::quantize_rows(bits, x, ldx, K, Kpad, a, m0, m1, q8, q16, sx, zx);
  scalar::quantize_rows(bits, x, ldx, K, Kpad, a, m0, m1, q8, q16, sx, zx);
}

void permute_rows(int isa, int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, int64_t m0, int64_t m1,
                  float* xp, int64_t group_size, float* xsum) {
  isa = resolve(isa);
  if (xp && isa == ISA_AVX512)
    avx512::permute_rows(bits, x, ldx, K, Kpad, m0, m1, xp);
  else if (xp && isa == ISA_AVX2)
    avx2::permute_rows(bits, x, ldx, K, Kpad, m0, m1, xp);
  else if (xp)
    scalar::permute_rows(bits, x, ldx, K, Kpad, m0, m1, xp);
  if (!xsum) return;
  const int64_t gs = group_size == 0 ? K : group_size, G = (K + gs - 1) / gs;
  for (int64_t m = m0; m < m1; m++)
    for (int64_t g = 0; g < G; g++) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: vectorizable, and less rounding than one
      const float* xr = x + m * ldx;
      const int64_t e = (g + 1) * gs < K ? (g + 1) * gs : K;
      int64_t k = g * gs;
      for (; k + 8 <= e; k += 8)
        for (int j = 0; j < 8; j++) acc[j] += xr[k + j];
      for (; k < e; k++) acc[0] += xr[k];
      xsum[m * G + g] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
}

size_t scratch_bytes(const LinearArgs& L) {
  // codes (u8, or int16 for the wide integer path, or fp32 weights for the float path) + fp32 scales; the AVX-512
  // integer path also keeps the activation codes as u8 [M, Kpad] and their sums per group (or per-segment) and
  // int32 lane
  const size_t units = (size_t)L.G + (size_t)(L.Kpad / SEGMENT_COLS) + 1;
  return (size_t)L.Kpad * 4 + (size_t)L.G * 4 + 256 + (size_t)L.M * L.Kpad + (size_t)L.M * units * 64 + 256;
}

void linear_rows(int isa, const LinearArgs& L, int64_t n0, int64_t n1, void* scratch) {
  isa = resolve(isa);
  if (isa == ISA_AVX512) return avx512::linear_rows(L, n0, n1, scratch);
  if (isa == ISA_AVX2) return avx2::linear_rows(L, n0, n1, scratch);
  scalar::linear_rows(L, n0, n1, scratch);
}

void dequant_rows(int isa, const LinearArgs& L, int64_t n0, int64_t n1, void* scratch) {
  isa = resolve(isa);
  if (isa == ISA_AVX512) return avx512::dequant_rows(L, n0, n1, scratch);
  if (isa == ISA_AVX2) return avx2::dequant_rows(L, n0, n1, scratch);
  scalar::dequant_rows(L, n0, n1, scratch);
}

void row_offsets(int isa, const LinearArgs& L, int64_t n0, int64_t n1, void* scratch, float* out) {
  isa = resolve(isa);
  if (isa == ISA_AVX512) return avx512::row_offsets(L, n0, n1, scratch, out);
  if (isa == ISA_AVX2) return avx2::row_offsets(L, n0, n1, scratch, out);
  scalar::row_offsets(L, n0, n1, scratch, out);
}

namespace scalar {

// Per-row scale and zero exactly as quant/primitives.py computes them in float32.
void act_row_qparams(const float* x, int64_t K, const ActQuant& a, float* s, float* z) {
  if (a.is_static) {
    *s = a.static_scale;
    *z = a.static_zero;
    return;
  }
  float lo = x[0], hi = x[0];
  for (int64_t k = 1; k < K; k++) {
    lo = x[k] < lo ? x[k] : lo;
    hi = x[k] > hi ? x[k] : hi;
  }
  act_qparams_from_range(lo, hi, a, s, z);
}

void quantize_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, const ActQuant& a, int64_t m0,
                   int64_t m1, uint8_t* q8, int16_t* q16, float* sx, float* zx) {
  (void)bits;
  const float qmax = (float)((1 << a.bits) - 1);
  for (int64_t m = m0; m < m1; m++) {
    const float* xr = x + m * ldx;
    float s, z;
    act_row_qparams(xr, K, a, &s, &z);
    sx[m] = s;
    zx[m] = z;
    for (int64_t k = 0; k < Kpad; k++) {
      float u = 0.f;
      if (k < K) {
        u = std::nearbyint(xr[k] / s) + z;
        u = u < 0.f ? 0.f : (u > qmax ? qmax : u);
      }
      if (q8) q8[m * Kpad + k] = (uint8_t)u;
      if (q16) q16[m * Kpad + k] = (int16_t)u;
    }
  }
}

void permute_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, int64_t m0, int64_t m1, float* xp) {
  (void)bits;
  for (int64_t m = m0; m < m1; m++)
    for (int64_t k = 0; k < Kpad; k++) xp[m * Kpad + k] = k < K ? x[m * ldx + k] : 0.f;
}

void linear_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch) {
  uint8_t* codes = static_cast<uint8_t*>(scratch);
  const int64_t runs = L.Kpad / 32, row_bytes = runs * 4 * L.bits;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = L.qweight + n * row_bytes;
    for (int64_t r = 0; r < runs; r++) expand_run(row, L.bits, r, codes + r * 32);
    for (int64_t m = 0; m < L.M; m++) {
      double acc = 0.0;
      for (int64_t g = 0; g < L.G; g++) {
        int64_t r0, r1;
        group_runs(L, g, &r0, &r1);
        const float s = half_to_float(L.scales[n * L.G + g]);
        const int z = L.zeros[n * L.G + g];
        if (L.float_act) {
          float part = 0.f;
          const float* xr = L.xf + m * L.Kpad;
          for (int64_t k = r0 * 32; k < r1 * 32; k++) part += (float)(codes[k] - z) * xr[k];
          acc += (double)s * part;
        } else {
          // sum over real columns of (u - z_x)(w - z_w): padded columns have u = 0 and are left out by
          // counting z_x only over the group's real columns.
          int64_t dot = 0, wsum = 0;
          for (int64_t k = r0 * 32; k < r1 * 32; k++) {
            const int w = codes[k] - z;
            const int u = L.q8 ? L.q8[m * L.Kpad + k] : L.q16[m * L.Kpad + k];
            dot += (int64_t)u * w;
            if (k < L.K) wsum += w;
          }
          acc += (double)s * ((double)dot - (double)L.zx[m] * (double)wsum);
        }
      }
      float y = L.float_act ? (float)acc : (float)((double)L.sx[m] * acc);
      if (L.bias) y += L.bias[n];
      L.y[m * L.ldy + n] = y;
    }
  }
}

void dequant_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch) {
  uint8_t* codes = static_cast<uint8_t*>(scratch);
  const int64_t runs = L.Kpad / 32, row_bytes = runs * 4 * L.bits;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = L.qweight + n * row_bytes;
    for (int64_t r = 0; r < runs; r++) expand_run(row, L.bits, r, codes + r * 32);
    for (int64_t g = 0; g < L.G; g++) {
      int64_t r0, r1;
      group_runs(L, g, &r0, &r1);
      const float s = half_to_float(L.scales[n * L.G + g]);
      const int z = L.zeros[n * L.G + g];
      for (int64_t k = r0 * 32; k < r1 * 32; k++) L.w_out[(n - L.w_row0) * L.Kpad + k] = (float)(codes[k] - z) * s;
    }
  }
}

void row_offsets(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch, float* out) {
  uint8_t* codes = static_cast<uint8_t*>(scratch);
  const int64_t runs = L.Kpad / 32, row_bytes = runs * 4 * L.bits;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = L.qweight + n * row_bytes;
    for (int64_t r = 0; r < runs; r++) expand_run(row, L.bits, r, codes + r * 32);
    double acc = 0.0;
    for (int64_t g = 0; g < L.G; g++) {
      int64_t r0, r1;
      group_runs(L, g, &r0, &r1);
      const int z = L.zeros[n * L.G + g];
      int64_t wsum = 0;
      for (int64_t k = r0 * 32; k < r1 * 32 && k < L.K; k++) wsum += codes[k] - z;
      acc += (double)half_to_float(L.scales[n * L.G + g]) * (double)wsum;
    }
    out[n] = (float)acc;
  }
}

}  // namespace scalar
}  // namespace abqcpu
