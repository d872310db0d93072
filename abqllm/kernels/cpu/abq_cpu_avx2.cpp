// AVX2 + FMA + F16C kernels, compiled for those instructions only in this file (runtime dispatch in
// abq_cpu_scalar.cpp). Everything but the abqcpu::avx2 entry points has internal linkage, and no standard
// library template is instantiated here, so no AVX2 code can be shared with (and run by) the scalar path.
//
// Expanding a run of 32 codes (b storage bits, 4b bytes) into 32 bytes, in 2-3 instructions for b in {1, 2, 4}:
//   b = 8  one 32-byte load                                           position p = code p
//   b = 4  16 bytes to both lanes, shift the upper lane by 4, & 0x0F   p < 16: code 2p; p >= 16: code 2(p-16)+1
//   b = 2  8 bytes to 4 qwords, shift qword l by 2l, & 3               p = 8l + j: code 4j + l
//   b = 1  4 bytes to 8 dwords, shift dword i by i, & 1                p = 4i + j: code 8j + i
//   b = 3, 5, 6, 7 (codes straddle bytes): pshufb the two bytes holding each code into a 16-bit lane,
//          multiply by 2^(8 - bit offset) (a per-lane left shift) and keep the high byte; 16 codes per
//          vector, packed to bytes: positions hold codes 0-7, 16-23, 8-15, 24-31.
// The activations are permuted into the same order per call (permute_rows / quantize_rows). The float path
// (A16) reads 1-, 2-, 4- and 8-bit codes straight into int32 lanes in natural order instead (F32Codes).
//
// Products:
//   A16, M <= 4: sum code * x in fp32 per group, times s_w; the zero point once per row as
//     sum_g s_w z_w sum_group(x). M > 4: a row of s_w (code - z_w) in fp32, then token tiles.
//   A2..A8, storage bits <= 6: u8 activation codes u times s8 (w - z_w) with vpmaddubsw: each pair sum is
//     at most 2 * 255 * 63 < 2^15, and up to 32767 / (2 * 255 * (2^b - 1)) runs are added in int16
//     before vpmaddwd widens to int32 (21 runs at 2 bits, 4 at 4 bits, 1 at 6 bits).
//   A2..A8, storage bits 7, 8: int16 u times int16 (w - z_w) with vpmaddwd.
//   Per group: float acc += s_w * float(sum u (w - z_w)); per row: y = s_x (acc - z_x * R) + b with
//   R = sum_g s_w W_g, W_g = sum over the group's real columns of (w - z_w) (row_offset, vpsadbw; the
//   caller may pass it precomputed).
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "abq_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

// GCC does not inline lambdas and helpers across these hot loops on its own (a call per group spills the
// accumulators and costs ~10 cycles), so they are forced.
#define ABQ_INLINE __attribute__((always_inline)) inline
#define ABQ_INLINE_LAMBDA __attribute__((always_inline))

namespace abqcpu {
namespace {

constexpr int64_t SEG_RUNS = SEGMENT_COLS / 32;

// ---- expanding runs -----------------------------------------------------------------------------

template <int B>
struct Expand {  // odd widths 3, 5, 6, 7
  static constexpr int overread = 16 - B;  // bytes read past the end of the run
  __m256i shuf, mul, mask;
  Expand() {
    alignas(32) int8_t s[32];
    alignas(32) int16_t m[16];
    for (int lane = 0; lane < 2; lane++)
      for (int t = 0; t < 8; t++) {
        const int off = t * B;
        s[lane * 16 + 2 * t] = (int8_t)(off >> 3);
        s[lane * 16 + 2 * t + 1] = (int8_t)((off >> 3) + 1);
        m[lane * 8 + t] = (int16_t)(1 << (8 - (off & 7)));
      }
    shuf = _mm256_load_si256((const __m256i*)s);
    mul = _mm256_load_si256((const __m256i*)m);
    mask = _mm256_set1_epi8((char)((1 << B) - 1));
  }
  ABQ_INLINE __m256i operator()(const uint8_t* p) const {
    const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)p)),
                                               _mm_loadu_si128((const __m128i*)(p + B)), 1);
    const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(p + 2 * B))),
                                               _mm_loadu_si128((const __m128i*)(p + 3 * B)), 1);
    const __m256i a = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(lo, shuf), mul), 8);
    const __m256i b = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(hi, shuf), mul), 8);
    return _mm256_and_si256(_mm256_packus_epi16(a, b), mask);
  }
};

template <>
struct Expand<8> {
  static constexpr int overread = 0;
  ABQ_INLINE __m256i operator()(const uint8_t* p) const { return _mm256_loadu_si256((const __m256i*)p); }
};

template <>
struct Expand<4> {
  static constexpr int overread = 0;
  __m256i shift, mask;
  Expand() : shift(_mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), mask(_mm256_set1_epi8(0x0F)) {}
  ABQ_INLINE __m256i operator()(const uint8_t* p) const {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
    return _mm256_and_si256(_mm256_srlv_epi32(v, shift), mask);
  }
};

template <>
struct Expand<2> {
  static constexpr int overread = 0;
  __m256i shift, mask;
  Expand() : shift(_mm256_setr_epi64x(0, 2, 4, 6)), mask(_mm256_set1_epi8(0x03)) {}
  ABQ_INLINE __m256i operator()(const uint8_t* p) const {
    long long w;
    std::memcpy(&w, p, 8);
    return _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(w), shift), mask);
  }
};

template <>
struct Expand<1> {
  static constexpr int overread = 0;
  __m256i shift, mask;
  Expand() : shift(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), mask(_mm256_set1_epi8(0x01)) {}
  ABQ_INLINE __m256i operator()(const uint8_t* p) const {
    int w;
    std::memcpy(&w, p, 4);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), shift), mask);
  }
};

// Position p of an expanded run holds this code of the run. The float path (A16) decodes 1, 2, 4 and 8-bit
// codes straight to int32 lanes in natural order (F32Codes), so its order is the identity for those widths.
int perm_of(int bits, int p, bool float_act) {
  if (float_act && (bits == 1 || bits == 2 || bits == 4)) return p;
  switch (bits) {
    case 8: return p;
    case 4: return p < 16 ? 2 * p : 2 * (p - 16) + 1;
    case 2: return 4 * (p % 8) + p / 8;
    case 1: return 8 * (p % 4) + p / 4;
    default: {
      static const int block[4] = {0, 2, 1, 3};
      return block[p / 8] * 8 + p % 8;
    }
  }
}

// The codes of one run as four vectors of 8 int32 lanes, for the float path. Widths 1, 2, 4, 8 in natural
// order straight from the packed words (a broadcast load, a variable shift and a mask per 8 codes: no
// shuffles); odd widths through the byte expander, widened.
template <int B>
struct F32Codes {
  Expand<B> ex;
  ABQ_INLINE void operator()(const uint8_t* p, __m256i out[4]) const {
    const __m256i c = ex(p);
    const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    out[0] = _mm256_cvtepu8_epi32(lo);
    out[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
    out[2] = _mm256_cvtepu8_epi32(hi);
    out[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
  }
};

template <>
struct F32Codes<8> {
  ABQ_INLINE void operator()(const uint8_t* p, __m256i out[4]) const {
    for (int q = 0; q < 4; q++) out[q] = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * q)));
  }
};

ABQ_INLINE __m256i bcast32(const uint8_t* p) {
  int w;
  std::memcpy(&w, p, 4);
  return _mm256_set1_epi32(w);
}

template <>
struct F32Codes<4> {
  __m256i shift, mask;
  F32Codes() : shift(_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)), mask(_mm256_set1_epi32(0xF)) {}
  ABQ_INLINE void operator()(const uint8_t* p, __m256i out[4]) const {
    for (int q = 0; q < 4; q++) out[q] = _mm256_and_si256(_mm256_srlv_epi32(bcast32(p + 4 * q), shift), mask);
  }
};

template <>
struct F32Codes<2> {
  __m256i lo, hi, mask;
  F32Codes()
      : lo(_mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)), hi(_mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)),
        mask(_mm256_set1_epi32(3)) {}
  ABQ_INLINE void operator()(const uint8_t* p, __m256i out[4]) const {
    const __m256i w0 = bcast32(p), w1 = bcast32(p + 4);
    out[0] = _mm256_and_si256(_mm256_srlv_epi32(w0, lo), mask);
    out[1] = _mm256_and_si256(_mm256_srlv_epi32(w0, hi), mask);
    out[2] = _mm256_and_si256(_mm256_srlv_epi32(w1, lo), mask);
    out[3] = _mm256_and_si256(_mm256_srlv_epi32(w1, hi), mask);
  }
};

template <>
struct F32Codes<1> {
  __m256i shift[4], mask;
  F32Codes() : mask(_mm256_set1_epi32(1)) {
    for (int q = 0; q < 4; q++)
      shift[q] = _mm256_setr_epi32(8 * q, 8 * q + 1, 8 * q + 2, 8 * q + 3, 8 * q + 4, 8 * q + 5, 8 * q + 6, 8 * q + 7);
  }
  ABQ_INLINE void operator()(const uint8_t* p, __m256i out[4]) const {
    const __m256i w = bcast32(p);
    for (int q = 0; q < 4; q++) out[q] = _mm256_and_si256(_mm256_srlv_epi32(w, shift[q]), mask);
  }
};

// ---- small helpers ------------------------------------------------------------------------------

ABQ_INLINE float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

ABQ_INLINE int64_t hsum_epi64(__m256i v) {
  const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

ABQ_INLINE void group_runs(const LinearArgs& L, int64_t g, int64_t* r0, int64_t* r1) {
  const int64_t runs = (int64_t)((uint64_t)L.Kpad >> 5), per = (int64_t)((uint64_t)L.group_size >> 5);
  if (per == 0) {
    *r0 = 0;
    *r1 = runs;
    return;
  }
  *r0 = g * per;
  *r1 = *r0 + per < runs ? *r0 + per : runs;
}

inline void row_scales(const LinearArgs& L, int64_t n, float* sw) {
  const uint16_t* s = L.scales + n * L.G;
  int64_t g = 0;
  for (; g + 8 <= L.G; g += 8) _mm256_storeu_ps(sw + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + g))));
  for (; g < L.G; g++) sw[g] = _cvtsh_ss(s[g]);
}

ABQ_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- reading a row ------------------------------------------------------------------------------

// The runs of row n; the last run of the last row is copied out first when the expander reads past it.
template <int B>
struct RowReader {
  const uint8_t* row;
  int64_t runs;
  bool copy_tail;
  alignas(32) uint8_t tail[64];
  RowReader(const LinearArgs& L, int64_t n)
      : row(L.qweight + n * (L.Kpad / 32) * 4 * B), runs(L.Kpad / 32),
        copy_tail(Expand<B>::overread > 0 && n == L.N - 1) {
    if (copy_tail) {
      std::memset(tail, 0, sizeof(tail));
      std::memcpy(tail, row + (runs - 1) * 4 * B, 4 * B);
    }
  }
  ABQ_INLINE const uint8_t* run(int64_t r) const { return copy_tail && r == runs - 1 ? tail : row + r * 4 * B; }
};

// sum_g s_w[g] * W_g, W_g = sum of (w - z_w) over the group's real columns (padding codes are 0).
template <int B>
inline float row_offset(const LinearArgs& L, const Expand<B>& ex, int64_t n, const float* sw) {
  const RowReader<B> rd(L, n);
  const __m256i zero = _mm256_setzero_si256();
  double wc = 0.0;
  for (int64_t g = 0; g < L.G; g++) {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    __m256i sad = zero;
    for (int64_t r = r0; r < r1; r++) sad = _mm256_add_epi64(sad, _mm256_sad_epu8(ex(rd.run(r)), zero));
    wc += (double)sw[g] * (double)(hsum_epi64(sad) - group_cols(L.K, L.group_size, g) * (int64_t)L.zeros[n * L.G + g]);
  }
  return (float)wc;
}

// Groups in pairs, alternating two float accumulators so that consecutive groups do not wait on one
// FMA chain (short groups would otherwise be bound by its latency).
template <int T, typename F>
ABQ_INLINE void for_groups(int64_t G, __m256 (&out)[T], F&& body) {
  __m256 a[T], b[T];
  for (int t = 0; t < T; t++) a[t] = b[t] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 1 < G; g += 2) {
    body(g, a);
    body(g + 1, b);
  }
  if (g < G) body(g, a);
  for (int t = 0; t < T; t++) out[t] = _mm256_add_ps(a[t], b[t]);
}

ABQ_INLINE void finish_int(const LinearArgs& L, int64_t n, int64_t m, __m256 acc, float wc) {
  float y = L.sx[m] * (hsum_ps(acc) - L.zx[m] * wc);
  if (L.bias) y += L.bias[n];
  L.y[m * L.ldy + n] = y;
}

ABQ_INLINE void finish_float(const LinearArgs& L, int64_t n, int64_t m, float v) {
  if (L.bias) v += L.bias[n];
  L.y[m * L.ldy + n] = v;
}

// ---- M <= 4: expand in registers, multiply at once ------------------------------------------------

// u8 activation codes x s8 weight runs (w - z_w, storage bits <= 6) over all groups of one output
// row for T token rows: weight_run(g) gives a per-group functor r -> 32 signed weights of run r.
// Pair sums are kept in int16 for at most R16 runs (no overflow), then widened to int32.
template <int B, int T, typename WeightRuns>
ABQ_INLINE void dot_groups_s8(const LinearArgs& L, const uint8_t* (&xs)[T], const float* sw,
                              __m256 (&facc)[T], WeightRuns&& weight_run) {
  constexpr int R16 = 32767 / (2 * 255 * ((1 << B) - 1));  // runs summed in int16 before widening
  static_assert(R16 >= 1, "u8 x s8 pair sums must fit int16");
  const __m256i ones = _mm256_set1_epi16(1);
  const bool one_chunk = L.group_size > 0 && L.group_size / 32 <= R16;  // a group's int16 sums cannot overflow
  for_groups<T>(L.G, facc, [&](int64_t g, __m256 (&fa)[T]) ABQ_INLINE_LAMBDA {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    const auto wrun = weight_run(g);
    const __m256 vs = _mm256_set1_ps(sw[g]);
    for (int64_t s = r0; s < r1; s += (one_chunk ? r1 - r0 : SEG_RUNS)) {
      const int64_t e = one_chunk ? r1 : min64(s + SEG_RUNS, r1);
      __m256i acc[T];
      for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_si256();
      for (int64_t r = s; r < e;) {
        const int64_t c = one_chunk ? e - r : min64(R16, e - r);
        __m256i a16[T];
        for (int t = 0; t < T; t++) a16[t] = _mm256_setzero_si256();
        for (int64_t i = 0; i < c; i++, r++) {
          const __m256i w = wrun(r);
          for (int t = 0; t < T; t++)
            a16[t] = _mm256_add_epi16(a16[t],
                                      _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)(xs[t] + r * 32)), w));
        }
        for (int t = 0; t < T; t++) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(a16[t], ones));
      }
      for (int t = 0; t < T; t++) fa[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), vs, fa[t]);
    }
  });
}

// M <= 4: packed runs expanded in registers.
template <int B, int T>
void fused_s8(const LinearArgs& L, const Expand<B>& ex, int64_t n, const float* sw, float wc) {
  const RowReader<B> rd(L, n);
  const uint8_t* xs[T];
  for (int t = 0; t < T; t++) xs[t] = L.q8 + t * L.Kpad;
  __m256 facc[T];
  dot_groups_s8<B, T>(L, xs, sw, facc, [&](int64_t g) {
    const __m256i z8 = _mm256_set1_epi8((char)L.zeros[n * L.G + g]);
    return [&rd, &ex, z8](int64_t r) ABQ_INLINE_LAMBDA { return _mm256_sub_epi8(ex(rd.run(r)), z8); };
  });
  for (int t = 0; t < T; t++) finish_int(L, n, t, facc[t], wc);
}

// int16 activation codes x int16 (w - z_w), storage bits 7, 8.
template <int B, int T>
void fused_s16(const LinearArgs& L, const Expand<B>& ex, int64_t n, const float* sw, float wc) {
  const RowReader<B> rd(L, n);
  const int16_t* xs[T];
  for (int t = 0; t < T; t++) xs[t] = L.q16 + t * L.Kpad;
  __m256 facc[T];
  for_groups<T>(L.G, facc, [&](int64_t g, __m256 (&fa)[T]) ABQ_INLINE_LAMBDA {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    const __m256i z16 = _mm256_set1_epi16((short)L.zeros[n * L.G + g]);
    const __m256 vs = _mm256_set1_ps(sw[g]);
    for (int64_t s = r0; s < r1; s += SEG_RUNS) {
      const int64_t e = min64(s + SEG_RUNS, r1);
      __m256i acc[T];
      for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_si256();
      for (int64_t r = s; r < e; r++) {
        const __m256i c = ex(rd.run(r));
        const __m256i lo = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(c)), z16);
        const __m256i hi = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(c, 1)), z16);
        for (int t = 0; t < T; t++) {
          const __m256i p0 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(xs[t] + r * 32)), lo);
          const __m256i p1 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(xs[t] + r * 32 + 16)), hi);
          acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(p0, p1));
        }
      }
      for (int t = 0; t < T; t++) fa[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), vs, fa[t]);
    }
  });
  for (int t = 0; t < T; t++) finish_int(L, n, t, facc[t], wc);
}

// fp32 activations: codes converted to fp32 in registers and multiplied as they are; per group the sum is
// scaled by s_w, and the zero point enters once per row as sum_g s_w z_w X_g (X_g: the group's sum of x, from
// permute_rows). Three instructions per 8 weights (widen, convert, FMA); U independent accumulators per token
// hide the FMA latency.
template <int B, int T>
void fused_f32(const LinearArgs& L, const F32Codes<B>& dec, int64_t n, const float* sw) {
  constexpr int U = T == 1 ? 4 : 2;
  const RowReader<B> rd(L, n);
  const float* xs[T];
  for (int t = 0; t < T; t++) xs[t] = L.xf + t * L.Kpad;
  __m256 tot[T];
  for_groups<T>(L.G, tot, [&](int64_t g, __m256 (&fa)[T]) ABQ_INLINE_LAMBDA {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    __m256 acc[T][U];
    for (int t = 0; t < T; t++)
      for (int u = 0; u < U; u++) acc[t][u] = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; r++) {
      __m256i c[4];
      dec(rd.run(r), c);
      for (int q = 0; q < 4; q++) {
        const __m256 w = _mm256_cvtepi32_ps(c[q]);
        for (int t = 0; t < T; t++)
          acc[t][q % U] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[t] + r * 32 + 8 * q), acc[t][q % U]);
      }
    }
    const __m256 vs = _mm256_set1_ps(sw[g]);
    for (int t = 0; t < T; t++) {
      __m256 sum = acc[t][0];
      for (int u = 1; u < U; u++) sum = _mm256_add_ps(sum, acc[t][u]);
      fa[t] = _mm256_fmadd_ps(sum, vs, fa[t]);
    }
  });
  // sum_g s_w z_w X_g per token
  const uint8_t* z = L.zeros + n * L.G;
  __m256 corr[T];
  for (int t = 0; t < T; t++) corr[t] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= L.G; g += 8) {
    const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(sw + g),
                                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(z + g)))));
    for (int t = 0; t < T; t++) corr[t] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(L.xsum + t * L.G + g), corr[t]);
  }
  for (int t = 0; t < T; t++) {
    float c = hsum_ps(corr[t]);
    for (int64_t h = g; h < L.G; h++) c += sw[h] * (float)z[h] * L.xsum[t * L.G + h];
    finish_float(L, n, t, hsum_ps(tot[t]) - c);
  }
}

// ---- M > 4: expand a row once into a buffer, then token tiles of 4 -------------------------------

enum Mode { CENTERED_S8, CENTERED_S16 };

template <int B, int MODE>
inline void expand_row(const LinearArgs& L, const Expand<B>& ex, int64_t n, void* buf) {
  const RowReader<B> rd(L, n);
  for (int64_t g = 0; g < L.G; g++) {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    const int z = L.zeros[n * L.G + g];
    const __m256i z8 = _mm256_set1_epi8((char)z), z16 = _mm256_set1_epi16((short)z);
    for (int64_t r = r0; r < r1; r++) {
      const __m256i c = ex(rd.run(r));
      if (MODE == CENTERED_S8) {
        _mm256_storeu_si256((__m256i*)((int8_t*)buf + r * 32), _mm256_sub_epi8(c, z8));
      } else {
        int16_t* o = (int16_t*)buf + r * 32;
        _mm256_storeu_si256((__m256i*)o, _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(c)), z16));
        _mm256_storeu_si256((__m256i*)(o + 16),
                            _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(c, 1)), z16));
      }
    }
  }
}

// s_w * (code - z) for every column of row n, in the float path's order.
template <int B>
inline void expand_row_f32(const LinearArgs& L, const F32Codes<B>& dec, int64_t n, const float* sw, float* out) {
  const RowReader<B> rd(L, n);
  for (int64_t g = 0; g < L.G; g++) {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    const __m256i z32 = _mm256_set1_epi32(L.zeros[n * L.G + g]);
    const __m256 vs = _mm256_set1_ps(sw[g]);
    for (int64_t r = r0; r < r1; r++) {
      __m256i c[4];
      dec(rd.run(r), c);
      for (int q = 0; q < 4; q++)
        _mm256_storeu_ps(out + r * 32 + 8 * q, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c[q], z32)), vs));
    }
  }
}

// Larger M: weights expanded once per row tile into int8 (w - z_w) by the caller.
template <int B, int T>
void dot_s8(const LinearArgs& L, int64_t n, int64_t m0, const int8_t* w, const float* sw, float wc) {
  const uint8_t* xs[T];
  for (int t = 0; t < T; t++) xs[t] = L.q8 + (m0 + t) * L.Kpad;
  __m256 facc[T];
  dot_groups_s8<B, T>(L, xs, sw, facc, [w](int64_t) {
    return [w](int64_t r) ABQ_INLINE_LAMBDA { return _mm256_loadu_si256((const __m256i*)(w + r * 32)); };
  });
  for (int t = 0; t < T; t++) finish_int(L, n, m0 + t, facc[t], wc);
}

template <int T>
void dot_s16(const LinearArgs& L, int64_t n, int64_t m0, const int16_t* w, const float* sw, float wc) {
  const int16_t* xs[T];
  for (int t = 0; t < T; t++) xs[t] = L.q16 + (m0 + t) * L.Kpad;
  __m256 facc[T];
  for_groups<T>(L.G, facc, [&](int64_t g, __m256 (&fa)[T]) ABQ_INLINE_LAMBDA {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    const __m256 vs = _mm256_set1_ps(sw[g]);
    for (int64_t s = r0; s < r1; s += SEG_RUNS) {
      const int64_t e = min64(s + SEG_RUNS, r1);
      __m256i acc[T];
      for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_si256();
      for (int64_t k = s * 32; k < e * 32; k += 16) {
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + k));
        for (int t = 0; t < T; t++)
          acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(xs[t] + k)), wv));
      }
      for (int t = 0; t < T; t++) fa[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), vs, fa[t]);
    }
  });
  for (int t = 0; t < T; t++) finish_int(L, n, m0 + t, facc[t], wc);
}

template <int T>
void dot_f32(const LinearArgs& L, int64_t n, int64_t m0, const float* w) {
  const float* xs[T];
  for (int t = 0; t < T; t++) xs[t] = L.xf + (m0 + t) * L.Kpad;
  __m256 acc[T][2];
  for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < L.Kpad; k += 16) {  // Kpad is a multiple of 32
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int t = 0; t < T; t++) {
      acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[t] + k), acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs[t] + k + 8), acc[t][1]);
    }
  }
  for (int t = 0; t < T; t++) finish_float(L, n, m0 + t, hsum_ps(_mm256_add_ps(acc[t][0], acc[t][1])));
}

// Calls f(m0, integral_constant<T>) for token tiles of 4, then the remainder.
template <typename F>
ABQ_INLINE void for_token_tiles(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) f(m, std::integral_constant<int, 4>());
  switch (M - m) {
    case 3: f(m, std::integral_constant<int, 3>()); break;
    case 2: f(m, std::integral_constant<int, 2>()); break;
    case 1: f(m, std::integral_constant<int, 1>()); break;
    default: break;
  }
}

template <int B>
void linear_rows_b(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch) {
  const Expand<B> ex;
  const F32Codes<B> dec;
  float* sw = (float*)scratch;
  void* buf = (uint8_t*)scratch + ((L.G * 4 + 63) / 64) * 64;
  const bool fused = L.M <= FUSED_MAX_M;
  for (int64_t n = n0; n < n1; n++) {
    row_scales(L, n, sw);
    if (L.float_act) {
      if (fused) {
        for_token_tiles(L.M, [&](int64_t, auto t) { fused_f32<B, decltype(t)::value>(L, dec, n, sw); });
      } else {
        expand_row_f32<B>(L, dec, n, sw, (float*)buf);
        for_token_tiles(L.M, [&](int64_t m, auto t) { dot_f32<decltype(t)::value>(L, n, m, (const float*)buf); });
      }
      continue;
    }
    const float wc = L.row_offsets ? L.row_offsets[n] : row_offset<B>(L, ex, n, sw);
    if constexpr (B <= 6) {
      if (fused) {
        for_token_tiles(L.M, [&](int64_t, auto t) { fused_s8<B, decltype(t)::value>(L, ex, n, sw, wc); });
      } else {
        expand_row<B, CENTERED_S8>(L, ex, n, buf);
        for_token_tiles(L.M, [&](int64_t m, auto t) {
          dot_s8<B, decltype(t)::value>(L, n, m, (const int8_t*)buf, sw, wc);
        });
      }
    } else {
      if (fused) {
        for_token_tiles(L.M, [&](int64_t, auto t) { fused_s16<B, decltype(t)::value>(L, ex, n, sw, wc); });
      } else {
        expand_row<B, CENTERED_S16>(L, ex, n, buf);
        for_token_tiles(L.M, [&](int64_t m, auto t) {
          dot_s16<decltype(t)::value>(L, n, m, (const int16_t*)buf, sw, wc);
        });
      }
    }
  }
}

template <int B>
void dequant_rows_b(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch) {
  const F32Codes<B> dec;
  float* sw = (float*)scratch;
  for (int64_t n = n0; n < n1; n++) {
    row_scales(L, n, sw);
    expand_row_f32<B>(L, dec, n, sw, L.w_out + (n - L.w_row0) * L.Kpad);
  }
}

template <int B>
void row_offsets_b(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch, float* out) {
  const Expand<B> ex;
  float* sw = (float*)scratch;
  for (int64_t n = n0; n < n1; n++) {
    row_scales(L, n, sw);
    out[n] = row_offset<B>(L, ex, n, sw);
  }
}

// Per-row activation qparams exactly as quant/primitives.py computes them in float32 (IEEE division,
// round half to even), min/max vectorized.
void act_row_qparams(const float* x, int64_t K, const ActQuant& a, float* s, float* z) {
  if (a.is_static) {
    *s = a.static_scale;
    *z = a.static_zero;
    return;
  }
  __m256 vlo = _mm256_set1_ps(x[0]), vhi = vlo;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  alignas(32) float l8[8], h8[8];
  _mm256_store_ps(l8, vlo);
  _mm256_store_ps(h8, vhi);
  float lo = l8[0], hi = h8[0];
  for (int i = 1; i < 8; i++) {
    lo = l8[i] < lo ? l8[i] : lo;
    hi = h8[i] > hi ? h8[i] : hi;
  }
  for (; k < K; k++) {
    lo = x[k] < lo ? x[k] : lo;
    hi = x[k] > hi ? x[k] : hi;
  }
  act_qparams_from_range(lo, hi, a, s, z);
}

}  // namespace

namespace avx2 {

void run_permutation(int bits, bool float_act, int32_t perm[32]) {
  for (int p = 0; p < 32; p++) perm[p] = perm_of(bits, p, float_act);
}

void quantize_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, const ActQuant& a, int64_t m0,
                   int64_t m1, uint8_t* q8, int16_t* q16, float* sx, float* zx) {
  int32_t perm[32];
  run_permutation(bits, false, perm);
  const __m256 vq = _mm256_set1_ps((float)((1 << a.bits) - 1)), v0 = _mm256_setzero_ps();
  for (int64_t m = m0; m < m1; m++) {
    const float* xr = x + m * ldx;
    float s, z;
    act_row_qparams(xr, K, a, &s, &z);
    sx[m] = s;
    zx[m] = z;
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    for (int64_t r = 0; r < Kpad / 32; r++) {
      const int64_t k0 = r * 32;
      alignas(32) float xin[32];
      alignas(32) int32_t u[32];
      const float* src = xr + k0;
      if (k0 + 32 > K) {
        for (int j = 0; j < 32; j++) xin[j] = k0 + j < K ? xr[k0 + j] : 0.f;
        src = xin;
      }
      for (int q = 0; q < 4; q++) {
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(src + 8 * q), vs);
        v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
        v = _mm256_min_ps(_mm256_max_ps(v, v0), vq);
        _mm256_store_si256((__m256i*)(u + 8 * q), _mm256_cvtps_epi32(v));
      }
      for (int j = 0; j < 32; j++)
        if (k0 + j >= K) u[j] = 0;  // padding: code 0 adds nothing
      if (q8) {
        uint8_t* o = q8 + m * Kpad + k0;
        for (int p = 0; p < 32; p++) o[p] = (uint8_t)u[perm[p]];
      }
      if (q16) {
        int16_t* o = q16 + m * Kpad + k0;
        for (int p = 0; p < 32; p++) o[p] = (int16_t)u[perm[p]];
      }
    }
  }
}

void permute_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, int64_t m0, int64_t m1, float* xp) {
  int32_t perm[32];
  run_permutation(bits, true, perm);
  for (int64_t m = m0; m < m1; m++) {
    const float* xr = x + m * ldx;
    float* o = xp + m * Kpad;
    for (int64_t k0 = 0; k0 < Kpad; k0 += 32) {
      if (k0 + 32 <= K) {
        for (int p = 0; p < 32; p++) o[k0 + p] = xr[k0 + perm[p]];
      } else {
        for (int p = 0; p < 32; p++) o[k0 + p] = k0 + perm[p] < K ? xr[k0 + perm[p]] : 0.f;
      }
    }
  }
}

void linear_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch) {
  switch (L.bits) {
    case 1: return linear_rows_b<1>(L, n0, n1, scratch);
    case 2: return linear_rows_b<2>(L, n0, n1, scratch);
    case 3: return linear_rows_b<3>(L, n0, n1, scratch);
    case 4: return linear_rows_b<4>(L, n0, n1, scratch);
    case 5: return linear_rows_b<5>(L, n0, n1, scratch);
    case 6: return linear_rows_b<6>(L, n0, n1, scratch);
    case 7: return linear_rows_b<7>(L, n0, n1, scratch);
    default: return linear_rows_b<8>(L, n0, n1, scratch);
  }
}

void dequant_rows(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch) {
  switch (L.bits) {
    case 1: return dequant_rows_b<1>(L, n0, n1, scratch);
    case 2: return dequant_rows_b<2>(L, n0, n1, scratch);
    case 3: return dequant_rows_b<3>(L, n0, n1, scratch);
    case 4: return dequant_rows_b<4>(L, n0, n1, scratch);
    case 5: return dequant_rows_b<5>(L, n0, n1, scratch);
    case 6: return dequant_rows_b<6>(L, n0, n1, scratch);
    case 7: return dequant_rows_b<7>(L, n0, n1, scratch);
    default: return dequant_rows_b<8>(L, n0, n1, scratch);
  }
}

void row_offsets(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch, float* out) {
  switch (L.bits) {
    case 1: return row_offsets_b<1>(L, n0, n1, scratch, out);
    case 2: return row_offsets_b<2>(L, n0, n1, scratch, out);
    case 3: return row_offsets_b<3>(L, n0, n1, scratch, out);
    case 4: return row_offsets_b<4>(L, n0, n1, scratch, out);
    case 5: return row_offsets_b<5>(L, n0, n1, scratch, out);
    case 6: return row_offsets_b<6>(L, n0, n1, scratch, out);
    case 7: return row_offsets_b<7>(L, n0, n1, scratch, out);
    default: return row_offsets_b<8>(L, n0, n1, scratch, out);
  }
}

}  // namespace avx2
}  // namespace abqcpu

#pragma GCC pop_options
