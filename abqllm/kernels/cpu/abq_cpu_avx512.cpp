// AVX-512 (F, BW, VL, DQ, VNNI, VBMI) kernels, compiled for those instructions only in this file (runtime
// dispatch in abq_cpu_scalar.cpp). Everything but the abqcpu::avx512 entry points has internal linkage, and no
// standard library template is instantiated here, so no AVX-512 code can be shared with (and run by) the other
// paths.
//
// Expanding codes. Two runs (64 codes, 8b bytes) at a time into one 64-byte vector, in natural order, for
// every width b = 1..7 with three instructions: the 8 codes 8q..8q+7 of a run occupy exactly bytes [qb, qb + b),
// so `vpermb` gathers those bytes into qword q, `vpmultishiftqb` moves code i of the qword to byte i (bit offset
// i*b), and an AND keeps b bits. b = 8 is a plain load. A lone run (a group or row with an odd number of runs) is
// expanded the same way with the activations' upper half zero, so the other half adds nothing.
//
// Products:
//   A2..A8: u8 activation codes times s8 weights with `vpdpbusd` (4 products summed into int32 per lane, no int16
//     stage, so no chunking). The weights are either centered per group (w - z_w, s8 for b <= 7: CENTER) or used
//     as they are, w for b <= 7 and w - 128 (w ^ 0x80) for b = 8, with the zero point applied once per group and
//     token in int32: sum u (w - z) = sum u w' - z' U, U = the group's sums of u per int32 lane, so every lane
//     holds its own centered partial sum (no cancellation between lanes in the float sum) (CORRECT; used for
//     b = 8 and for per-channel rows, where it saves one instruction per 64 weights). Per group: float acc += s_w * int sum;
//     per row: y = s_x (acc - z_x R) + b, as in the AVX2 path. Activation codes are in natural order; for
//     storage bits 7, 8 the caller passes int16 codes (abq_cpu.h: wide_int_path), packed to u8 once per call.
//   A16: codes to int32 lanes (b = 1, 2, 4: a broadcast load, a variable shift and a mask per 16 codes; b = 8: a
//     zero-extending load; odd widths through the byte expander), converted and multiplied in fp32 (FMA), the
//     zero point once per row as sum_g s_w z_w X_g. M > 4: a row of s_w (code - z_w) in fp32, then token tiles.
// Token tiles: up to 16 tokens are multiplied straight from the expanded registers in tiles of 8, 4, 3, 2, 1;
// beyond that each row is expanded once into a buffer. Weight rows are prefetched a fixed distance ahead.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "abq_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c,bmi,bmi2")
#include <immintrin.h>

#define ABQ_INLINE __attribute__((always_inline)) inline
#define ABQ_INLINE_LAMBDA __attribute__((always_inline))

namespace abqcpu {
namespace {

constexpr int64_t SEG_RUNS = SEGMENT_COLS / 32;
constexpr int64_t FUSED_INT_MAX_M = 16;  // integer path: tokens multiplied straight from registers
constexpr int PREFETCH_BYTES = 1024;      // weights prefetched this far ahead of the row being read

ABQ_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
ABQ_INLINE void prefetch(const uint8_t* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }

// ---- expanding runs ---------------------------------------------------------------------------------

// Two runs (64 codes) at p into 64 bytes, natural order. Reads LOAD bytes from p.
template <int B>
struct Expand {
  static constexpr int LOAD = B <= 2 ? 16 : B <= 4 ? 32 : 64;
  static constexpr int overread = LOAD - 4 * B;  // bytes read past the end of a lone run
  __m512i idx, ctrl, mask;
  Expand() {
    alignas(64) uint8_t ix[64], ct[64];
    for (int i = 0; i < 64; i++) {
      const int qw = i / 8, run = qw / 4, q = qw % 4, byte = i % 8;
      ix[i] = (uint8_t)(run * 4 * B + q * B + byte);
      ct[i] = (uint8_t)(byte * B);
    }
    idx = _mm512_load_si512(ix);
    ctrl = _mm512_load_si512(ct);
    mask = _mm512_set1_epi8((char)((1 << B) - 1));
  }
  ABQ_INLINE __m512i operator()(const uint8_t* p) const {
    __m512i v;
    if (LOAD == 16)
      v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)p));
    else if (LOAD == 32)
      v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)p));
    else
      v = _mm512_loadu_si512(p);
    v = _mm512_permutexvar_epi8(idx, v);
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, v), mask);
  }
};

template <>
struct Expand<8> {
  static constexpr int LOAD = 64;
  static constexpr int overread = 32;
  ABQ_INLINE __m512i operator()(const uint8_t* p) const { return _mm512_loadu_si512(p); }
};

// The codes of one run as two vectors of 16 int32 lanes, for the float path. Position p of the run:
// natural order, except b = 4: within each 16 codes, position 2j holds code j and 2j + 1 code 8 + j.
template <int B>
struct F32Codes {  // odd widths: through the byte expander
  Expand<B> ex;
  ABQ_INLINE void operator()(const uint8_t* p, __m512i out[2]) const {
    const __m512i c = ex(p);
    out[0] = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(c));
    out[1] = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(c, 1));
  }
};

template <>
struct F32Codes<8> {
  ABQ_INLINE void operator()(const uint8_t* p, __m512i out[2]) const {
    out[0] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    out[1] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16)));
  }
};

template <>
struct F32Codes<4> {
  __m512i shift, mask;
  F32Codes() : mask(_mm512_set1_epi32(0xF)) {
    alignas(64) int32_t s[16];
    for (int i = 0; i < 16; i++) s[i] = 4 * (i / 2);
    shift = _mm512_load_si512(s);
  }
  ABQ_INLINE void operator()(const uint8_t* p, __m512i out[2]) const {
    for (int q = 0; q < 2; q++) {
      long long w;
      std::memcpy(&w, p + 8 * q, 8);
      out[q] = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi64(w), shift), mask);
    }
  }
};

template <>
struct F32Codes<2> {
  __m512i shift, mask;
  F32Codes() : mask(_mm512_set1_epi32(3)) {
    alignas(64) int32_t s[16];
    for (int i = 0; i < 16; i++) s[i] = 2 * i;
    shift = _mm512_load_si512(s);
  }
  ABQ_INLINE void operator()(const uint8_t* p, __m512i out[2]) const {
    for (int q = 0; q < 2; q++) {
      int w;
      std::memcpy(&w, p + 4 * q, 4);
      out[q] = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(w), shift), mask);
    }
  }
};

template <>
struct F32Codes<1> {
  __m512i shift0, shift1, mask;
  F32Codes() : mask(_mm512_set1_epi32(1)) {
    alignas(64) int32_t s[32];
    for (int i = 0; i < 32; i++) s[i] = i;
    shift0 = _mm512_load_si512(s);
    shift1 = _mm512_load_si512(s + 16);
  }
  ABQ_INLINE void operator()(const uint8_t* p, __m512i out[2]) const {
    int w;
    std::memcpy(&w, p, 4);
    const __m512i v = _mm512_set1_epi32(w);
    out[0] = _mm512_and_si512(_mm512_srlv_epi32(v, shift0), mask);
    out[1] = _mm512_and_si512(_mm512_srlv_epi32(v, shift1), mask);
  }
};

int perm_of(int bits, int p, bool float_act) {
  if (float_act && bits == 4) {
    const int base = p & ~15, i = p & 15;
    return base + i / 2 + 8 * (i % 2);
  }
  return p;
}

// ---- reading a row ----------------------------------------------------------------------------------

// The runs of row n. The expanders read up to 64 bytes from a run: on the tensor's last row its last three runs
// are copied out first, so nothing past the tensor is read (a pair starting earlier ends inside the row).
template <int B>
struct RowReader {
  const uint8_t* row;
  int64_t tail_from;  // first run served from the copy (runs when no copy)
  alignas(64) uint8_t tail[192];
  RowReader(const LinearArgs& L, int64_t n) : row(L.qweight + n * (L.Kpad / 32) * 4 * B) {
    const int64_t runs = L.Kpad / 32;
    tail_from = runs;
    if (n == L.N - 1) {
      tail_from = runs >= 3 ? runs - 3 : 0;
      std::memset(tail, 0, sizeof(tail));
      std::memcpy(tail, row + tail_from * 4 * B, (runs - tail_from) * 4 * B);
    }
  }
  ABQ_INLINE const uint8_t* run(int64_t r) const {
    return r < tail_from ? row + r * 4 * B : tail + (r - tail_from) * 4 * B;
  }
};

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
  for (; g + 16 <= L.G; g += 16)
    _mm512_storeu_ps(sw + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + g))));
  for (; g < L.G; g++) sw[g] = _cvtsh_ss(s[g]);
}

// Activation codes of run r (and r + 1 unless `lone`) of a token.
ABQ_INLINE __m512i act_pair(const uint8_t* x, int64_t r, bool lone) {
  return lone ? _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(x + r * 32)))
              : _mm512_loadu_si512(x + r * 32);
}

// Units of the integer accumulation: the groups, or for per-channel rows segments of SEG_RUNS runs (int32
// headroom). unit_runs gives (first run, end run) of unit i.
ABQ_INLINE int64_t int_units(const LinearArgs& L) {
  const int64_t runs = L.Kpad / 32;
  return L.group_size > 0 ? L.G : (runs + SEG_RUNS - 1) / SEG_RUNS;
}

// sum_g s_w[g] * W_g, W_g = sum of (w - z_w) over the group's real columns (padding codes are 0).
template <int B>
inline float row_offset(const LinearArgs& L, const Expand<B>& ex, int64_t n, const float* sw) {
  const RowReader<B> rd(L, n);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i lo_half = _mm512_set_epi64(0, 0, 0, 0, -1, -1, -1, -1);
  double wc = 0.0;
  for (int64_t g = 0; g < L.G; g++) {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    __m512i sad = zero;
    for (int64_t r = r0; r < r1; r += 2) {
      __m512i c = ex(rd.run(r));
      if (r + 1 >= r1) c = _mm512_and_si512(c, lo_half);
      sad = _mm512_add_epi64(sad, _mm512_sad_epu8(c, zero));
    }
    wc += (double)sw[g] *
          (double)(_mm512_reduce_add_epi64(sad) - group_cols(L.K, L.group_size, g) * (int64_t)L.zeros[n * L.G + g]);
  }
  return (float)wc;
}

// Groups in pairs, alternating two float accumulators so that consecutive groups do not wait on one FMA chain.
template <int T, typename F>
ABQ_INLINE void for_groups(int64_t G, __m512 (&out)[T], F&& body) {
  __m512 a[T], b[T];
  for (int t = 0; t < T; t++) a[t] = b[t] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 1 < G; g += 2) {
    body(g, a);
    body(g + 1, b);
  }
  if (g < G) body(g, a);
  for (int t = 0; t < T; t++) out[t] = _mm512_add_ps(a[t], b[t]);
}

ABQ_INLINE void finish_int(const LinearArgs& L, int64_t n, int64_t m, __m512 acc, float wc) {
  float y = L.sx[m] * (_mm512_reduce_add_ps(acc) - L.zx[m] * wc);
  if (L.bias) y += L.bias[n];
  L.y[m * L.ldy + n] = y;
}

ABQ_INLINE void finish_float(const LinearArgs& L, int64_t n, int64_t m, float v) {
  if (L.bias) v += L.bias[n];
  L.y[m * L.ldy + n] = v;
}

// ---- integer path -----------------------------------------------------------------------------------

// What linear_rows prepares once per call for the integer kernels.
struct IntActs {
  const uint8_t* q8;  // [M, Kpad] u8 codes, natural order
  const int32_t* U;   // CORRECT: [M, units, 16] sums of u per unit and int32 lane (as vpdpbusd adds them)
  int64_t units;
};

// sum over one output row of s_w * sum u (w - z_w), for T tokens. weight_pairs(g) gives a functor
// (r, lone) -> 64 weight bytes of runs r, r + 1 (centered for CENTER, w' for CORRECT).
template <int B, int T, bool CORR, typename WeightPairs>
ABQ_INLINE void dot_groups(const LinearArgs& L, const IntActs& A, int64_t n, int64_t m0, const float* sw,
                           __m512 (&facc)[T], WeightPairs&& weight_pairs) {
  const uint8_t* xs[T];
  const int32_t* us[T];
  for (int t = 0; t < T; t++) {
    xs[t] = A.q8 + (m0 + t) * L.Kpad;
    us[t] = CORR ? A.U + (m0 + t) * A.units * 16 : nullptr;
  }
  const bool per_channel = L.group_size == 0;
  for_groups<T>(L.G, facc, [&](int64_t g, __m512 (&fa)[T]) ABQ_INLINE_LAMBDA {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    const auto wp = weight_pairs(g);
    const __m512 vs = _mm512_set1_ps(sw[g]);
    const int zc = CORR ? (int)L.zeros[n * L.G + g] - (B == 8 ? 128 : 0) : 0;
    for (int64_t s = r0; s < r1; s += (per_channel ? SEG_RUNS : r1 - r0)) {
      const int64_t e = per_channel ? min64(s + SEG_RUNS, r1) : r1;
      __m512i acc[T];
      for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_si512();
      int64_t r = s;
      for (; r + 1 < e; r += 2) {
        const __m512i w = wp(r, false);
        for (int t = 0; t < T; t++)
          acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_loadu_si512(xs[t] + r * 32), w);
      }
      if (r < e) {
        const __m512i w = wp(r, true);
        for (int t = 0; t < T; t++) acc[t] = _mm512_dpbusd_epi32(acc[t], act_pair(xs[t], r, true), w);
      }
      if (CORR) {
        const int64_t unit = per_channel ? s / SEG_RUNS : g;
        const __m512i vz = _mm512_set1_epi32(zc);
        for (int t = 0; t < T; t++)
          acc[t] = _mm512_sub_epi32(acc[t], _mm512_mullo_epi32(vz, _mm512_loadu_si512(us[t] + unit * 16)));
      }
      for (int t = 0; t < T; t++) fa[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), vs, fa[t]);
    }
  });
}

template <int B, bool CORR>
struct PackedPairs {  // weights straight from the packed row, expanded in registers
  const RowReader<B>& rd;
  const Expand<B>& ex;
  __m512i z8;
  ABQ_INLINE __m512i operator()(int64_t r, bool) const {
    const uint8_t* p = rd.run(r);
    prefetch(p + PREFETCH_BYTES);
    const __m512i c = ex(p);
    if (CORR) return B == 8 ? _mm512_xor_si512(c, _mm512_set1_epi8((char)0x80)) : c;
    return _mm512_sub_epi8(c, z8);
  }
};

template <int B, int T, bool CORR>
void fused_int(const LinearArgs& L, const IntActs& A, const Expand<B>& ex, const RowReader<B>& rd, int64_t n,
               int64_t m0, const float* sw, float wc) {
  __m512 facc[T];
  dot_groups<B, T, CORR>(L, A, n, m0, sw, facc, [&](int64_t g) ABQ_INLINE_LAMBDA {
    return PackedPairs<B, CORR>{rd, ex, _mm512_set1_epi8((char)L.zeros[n * L.G + g])};
  });
  for (int t = 0; t < T; t++) finish_int(L, n, m0 + t, facc[t], wc);
}

template <int B, int T, bool CORR>
void buffered_int(const LinearArgs& L, const IntActs& A, const int8_t* w, int64_t n, int64_t m0, const float* sw,
                  float wc) {
  __m512 facc[T];
  dot_groups<B, T, CORR>(L, A, n, m0, sw, facc, [w](int64_t) ABQ_INLINE_LAMBDA {
    return [w](int64_t r, bool) ABQ_INLINE_LAMBDA { return _mm512_loadu_si512(w + r * 32); };
  });
  for (int t = 0; t < T; t++) finish_int(L, n, m0 + t, facc[t], wc);
}

// The row's weights as the kernels multiply them (centered or w'), [Kpad] bytes (+ 64 readable).
template <int B, bool CORR>
inline void expand_row_int(const LinearArgs& L, const Expand<B>& ex, int64_t n, int8_t* buf) {
  const RowReader<B> rd(L, n);
  for (int64_t g = 0; g < L.G; g++) {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    const PackedPairs<B, CORR> wp{rd, ex, _mm512_set1_epi8((char)L.zeros[n * L.G + g])};
    for (int64_t r = r0; r < r1; r += 2) {
      const __m512i w = wp(r, r + 1 >= r1);
      if (r + 1 < r1)
        _mm512_storeu_si512(buf + r * 32, w);
      else
        _mm256_storeu_si256((__m256i*)(buf + r * 32), _mm512_castsi512_si256(w));
    }
  }
}

// Calls f(m0, integral_constant<T>) for token tiles of 8, then 4, then the remainder.
template <typename F>
ABQ_INLINE void for_token_tiles(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) f(m, std::integral_constant<int, 8>());
  if (m + 4 <= M) {
    f(m, std::integral_constant<int, 4>());
    m += 4;
  }
  switch (M - m) {
    case 3: f(m, std::integral_constant<int, 3>()); break;
    case 2: f(m, std::integral_constant<int, 2>()); break;
    case 1: f(m, std::integral_constant<int, 1>()); break;
    default: break;
  }
}

// Scratch layout of linear_rows: [sw: G floats][row buffer: Kpad * 4 + 64][u8 codes: M * Kpad + 64][U]
struct Scratch {
  float* sw;
  uint8_t* row;
  uint8_t* q8;
  int32_t* U;
  Scratch(const LinearArgs& L, void* scratch) {
    auto up = [](size_t v) { return (v + 63) / 64 * 64; };
    uint8_t* p = (uint8_t*)scratch;
    sw = (float*)p;
    p += up(L.G * 4);
    row = p;
    p += up(L.Kpad * 4 + 64);
    q8 = p;
    p += up(L.M * L.Kpad + 64);
    U = (int32_t*)p;
  }
};

template <int B, bool CORR>
void linear_rows_int(const LinearArgs& L, int64_t n0, int64_t n1, const Scratch& S) {
  const Expand<B> ex;
  IntActs A{L.q8, S.U, int_units(L)};
  if (!L.q8) {  // int16 codes (storage bits 7, 8): pack to u8 once
    for (int64_t m = 0; m < L.M; m++)
      for (int64_t k = 0; k < L.Kpad; k += 32)
        _mm256_storeu_si256((__m256i*)(S.q8 + m * L.Kpad + k),
                            _mm512_cvtepi16_epi8(_mm512_loadu_si512(L.q16 + m * L.Kpad + k)));
    A.q8 = S.q8;
  }
  if (CORR) {  // U: sums of u per unit, token and int32 lane
    const int64_t runs = L.Kpad / 32;
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t m = 0; m < L.M; m++)
      for (int64_t i = 0; i < A.units; i++) {
        int64_t r0, r1;
        if (L.group_size > 0) {
          group_runs(L, i, &r0, &r1);
        } else {
          r0 = i * SEG_RUNS;
          r1 = min64(r0 + SEG_RUNS, runs);
        }
        __m512i u = _mm512_setzero_si512();
        for (int64_t r = r0; r < r1; r += 2) u = _mm512_dpbusd_epi32(u, act_pair(A.q8 + m * L.Kpad, r, r + 1 >= r1), ones);
        _mm512_storeu_si512(S.U + (m * A.units + i) * 16, u);
      }
  }
  const bool fused = L.M <= FUSED_INT_MAX_M;
  for (int64_t n = n0; n < n1; n++) {
    row_scales(L, n, S.sw);
    const float wc = L.row_offsets ? L.row_offsets[n] : row_offset<B>(L, ex, n, S.sw);
    if (fused) {
      const RowReader<B> rd(L, n);
      for_token_tiles(L.M, [&](int64_t m, auto t) {
        fused_int<B, decltype(t)::value, CORR>(L, A, ex, rd, n, m, S.sw, wc);
      });
    } else {
      expand_row_int<B, CORR>(L, ex, n, (int8_t*)S.row);
      for_token_tiles(L.M, [&](int64_t m, auto t) {
        buffered_int<B, decltype(t)::value, CORR>(L, A, (const int8_t*)S.row, n, m, S.sw, wc);
      });
    }
  }
}

// ---- float path -------------------------------------------------------------------------------------

template <int B, int T>
void fused_f32(const LinearArgs& L, const F32Codes<B>& dec, int64_t n, const float* sw) {
  constexpr int U = T == 1 ? 4 : 2;
  const RowReader<B> rd(L, n);
  const float* xs[T];
  for (int t = 0; t < T; t++) xs[t] = L.xf + t * L.Kpad;
  __m512 tot[T];
  for_groups<T>(L.G, tot, [&](int64_t g, __m512 (&fa)[T]) ABQ_INLINE_LAMBDA {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    __m512 acc[T][U];
    for (int t = 0; t < T; t++)
      for (int u = 0; u < U; u++) acc[t][u] = _mm512_setzero_ps();
    auto one_run = [&](int64_t r, auto base) ABQ_INLINE_LAMBDA {
      const uint8_t* p = rd.run(r);
      prefetch(p + PREFETCH_BYTES);
      __m512i c[2];
      dec(p, c);
      for (int q = 0; q < 2; q++) {
        constexpr int b0 = decltype(base)::value;
        const __m512 w = _mm512_cvtepi32_ps(c[q]);
        for (int t = 0; t < T; t++)
          acc[t][(b0 + q) % U] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs[t] + r * 32 + 16 * q), acc[t][(b0 + q) % U]);
      }
    };
    int64_t r = r0;
    for (; r + 1 < r1; r += 2) {
      one_run(r, std::integral_constant<int, 0>());
      one_run(r + 1, std::integral_constant<int, 2>());
    }
    if (r < r1) one_run(r, std::integral_constant<int, 0>());
    const __m512 vs = _mm512_set1_ps(sw[g]);
    for (int t = 0; t < T; t++) {
      __m512 sum = acc[t][0];
      for (int u = 1; u < U; u++) sum = _mm512_add_ps(sum, acc[t][u]);
      fa[t] = _mm512_fmadd_ps(sum, vs, fa[t]);
    }
  });
  // sum_g s_w z_w X_g per token
  const uint8_t* z = L.zeros + n * L.G;
  __m512 corr[T];
  for (int t = 0; t < T; t++) corr[t] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= L.G; g += 16) {
    const __m512 sz = _mm512_mul_ps(_mm512_loadu_ps(sw + g),
                                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(z + g)))));
    for (int t = 0; t < T; t++) corr[t] = _mm512_fmadd_ps(sz, _mm512_loadu_ps(L.xsum + t * L.G + g), corr[t]);
  }
  for (int t = 0; t < T; t++) {
    float c = _mm512_reduce_add_ps(corr[t]);
    for (int64_t h = g; h < L.G; h++) c += sw[h] * (float)z[h] * L.xsum[t * L.G + h];
    finish_float(L, n, t, _mm512_reduce_add_ps(tot[t]) - c);
  }
}

// s_w * (code - z) for every column of row n, in the float path's order.
template <int B>
inline void expand_row_f32(const LinearArgs& L, const F32Codes<B>& dec, int64_t n, const float* sw, float* out) {
  const RowReader<B> rd(L, n);
  for (int64_t g = 0; g < L.G; g++) {
    int64_t r0, r1;
    group_runs(L, g, &r0, &r1);
    const __m512i z32 = _mm512_set1_epi32(L.zeros[n * L.G + g]);
    const __m512 vs = _mm512_set1_ps(sw[g]);
    for (int64_t r = r0; r < r1; r++) {
      const uint8_t* p = rd.run(r);
      prefetch(p + PREFETCH_BYTES);
      __m512i c[2];
      dec(p, c);
      for (int q = 0; q < 2; q++)
        _mm512_storeu_ps(out + r * 32 + 16 * q, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c[q], z32)), vs));
    }
  }
}

template <int T>
void dot_f32(const LinearArgs& L, int64_t n, int64_t m0, const float* w) {
  const float* xs[T];
  for (int t = 0; t < T; t++) xs[t] = L.xf + (m0 + t) * L.Kpad;
  __m512 acc[T][2];
  for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < L.Kpad; k += 32) {  // Kpad is a multiple of 32
    const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
    for (int t = 0; t < T; t++) {
      acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs[t] + k), acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xs[t] + k + 16), acc[t][1]);
    }
  }
  for (int t = 0; t < T; t++) finish_float(L, n, m0 + t, _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])));
}

template <int B>
void linear_rows_f32(const LinearArgs& L, int64_t n0, int64_t n1, const Scratch& S) {
  const F32Codes<B> dec;
  const bool fused = L.M <= FUSED_MAX_M && L.xsum;
  for (int64_t n = n0; n < n1; n++) {
    row_scales(L, n, S.sw);
    if (fused) {
      switch (L.M) {
        case 1: fused_f32<B, 1>(L, dec, n, S.sw); break;
        case 2: fused_f32<B, 2>(L, dec, n, S.sw); break;
        case 3: fused_f32<B, 3>(L, dec, n, S.sw); break;
        default: fused_f32<B, 4>(L, dec, n, S.sw); break;
      }
    } else {
      expand_row_f32<B>(L, dec, n, S.sw, (float*)S.row);
      for_token_tiles(L.M, [&](int64_t m, auto t) { dot_f32<decltype(t)::value>(L, n, m, (const float*)S.row); });
    }
  }
}

template <int B>
void linear_rows_b(const LinearArgs& L, int64_t n0, int64_t n1, void* scratch) {
  const Scratch S(L, scratch);
  if (L.float_act) return linear_rows_f32<B>(L, n0, n1, S);
  // Per-channel rows and 8-bit codes apply the zero point per unit (CORRECT); grouped b <= 7 center the codes.
  if constexpr (B == 8) {
    linear_rows_int<B, true>(L, n0, n1, S);
  } else {
    if (L.group_size == 0) return linear_rows_int<B, true>(L, n0, n1, S);
    linear_rows_int<B, false>(L, n0, n1, S);
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
  __m512 vlo = _mm512_set1_ps(x[0]), vhi = vlo;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
  }
  if (k < K) {
    const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
    vlo = _mm512_mask_min_ps(vlo, mk, vlo, _mm512_maskz_loadu_ps(mk, x + k));
    vhi = _mm512_mask_max_ps(vhi, mk, vhi, _mm512_maskz_loadu_ps(mk, x + k));
  }
  act_qparams_from_range(_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi), a, s, z);
}

}  // namespace

namespace avx512 {

void run_permutation(int bits, bool float_act, int32_t perm[32]) {
  for (int p = 0; p < 32; p++) perm[p] = perm_of(bits, p, float_act);
}

void quantize_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, const ActQuant& a, int64_t m0,
                   int64_t m1, uint8_t* q8, int16_t* q16, float* sx, float* zx) {
  (void)bits;  // natural order for every width
  const __m512 vq = _mm512_set1_ps((float)((1 << a.bits) - 1)), v0 = _mm512_setzero_ps();
  for (int64_t m = m0; m < m1; m++) {
    const float* xr = x + m * ldx;
    float s, z;
    act_row_qparams(xr, K, a, &s, &z);
    sx[m] = s;
    zx[m] = z;
    const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
    for (int64_t k = 0; k < Kpad; k += 16) {
      const int64_t left = K - k;
      const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
      __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, xr + k), vs);
      v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
      v = _mm512_min_ps(_mm512_max_ps(v, v0), vq);
      const __m512i u = _mm512_maskz_mov_epi32(mk, _mm512_cvtps_epi32(v));  // padding: code 0 adds nothing
      if (q8) _mm_storeu_si128((__m128i*)(q8 + m * Kpad + k), _mm512_cvtepi32_epi8(u));
      if (q16) _mm256_storeu_si256((__m256i*)(q16 + m * Kpad + k), _mm512_cvtepi32_epi16(u));
    }
  }
}

void permute_rows(int bits, const float* x, int64_t ldx, int64_t K, int64_t Kpad, int64_t m0, int64_t m1, float* xp) {
  int32_t perm[32];
  run_permutation(bits, true, perm);
  for (int64_t m = m0; m < m1; m++) {
    const float* xr = x + m * ldx;
    float* o = xp + m * Kpad;
    for (int64_t k0 = 0; k0 < Kpad; k0 += 32)
      for (int p = 0; p < 32; p++) o[k0 + p] = k0 + perm[p] < K ? xr[k0 + perm[p]] : 0.f;
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

}  // namespace avx512
}  // namespace abqcpu

#pragma GCC pop_options
