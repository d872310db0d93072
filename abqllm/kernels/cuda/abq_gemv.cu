// Decode GEMV on the k-packed layout (abqllm/kernels/kpacked.py), hand-written for few instructions per code.
//
// Layout: qweight_t [NW, N] int32, N-contiguous; word (g * WPG + i, n) holds PER = 32 / BITS codes of column n
// (code j at bits [j * BITS, j * BITS + BITS)), columns g * SEG + i * PER + j of row n; scales_t [G, N] fp16,
// zeros_t [G, N] uint8. Every width 1..8 (no code straddles a word); the dp4a path needs 1, 2, 4 or 8 (codes
// never straddle a byte).
//
// Work split: a block of 4 warps owns 128 output columns (4 per lane: one 16-byte load per word row) and a run
// of word rows (split-K across blocks); its warps take consecutive quarters of the run and meet in shared
// memory, and the blocks of a column tile meet in a float32 workspace through atomics; the last block to finish
// (a counter per tile) writes y and leaves workspace and counter zero.
//
// Arithmetic, per word of 4 columns:
//  - float path (fp16/bf16 x; also integer activations xq + a for the widths dp4a cannot take, 3/5/6/7 bits,
//    exact since every product and group sum stays under 2^24): code j's bit field, masked in place and ORed
//    into the exponent of 2^23,
//    is the float 2^23 + code * 2^sh; one FADD leaves code * 2^sh and one FFMA multiplies it by x_j * 2^-sh,
//    staged in shared memory (exact: a power of two). Fields that end above bit 23 are read from the word
//    shifted right once (HIGH). Three instructions a code, every product exact; per group
//    s * (sum code x - z sum x). (Half2 arithmetic would take 2.5 a code but overflows fp16 on the large
//    activations LLMs have, and rounds every product.)
//  - A8 (int8 codes xq = u_x - c and offset a, u_x - z_x = xq + a): bytes of (word >> j * BITS) & mask are
//    codes j, R + j, 2R + j, 3R + j (R = 8 / BITS), and one dp4a (unsigned x signed) against the staged x bytes
//    adds four exact products. Per group: s * (sum u xq - z sum xq + a (sum u - z count)), in integers.
//
// Every phase is a __host__ __device__ function: the kernel runs them with barriers between, and
// abq_gemv_emulate runs the same functions block by block on the CPU (barriers become phase boundaries,
// atomics plain updates), which is how the CPU test suite checks this file without a GPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#define HD __host__ __device__ __forceinline__

namespace kpgemv {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int COLS = 4;                  // columns per lane (one int4 load of words)
constexpr int TILE_N = 32 * COLS;        // columns per block
constexpr int UNROLL = 4;                // word rows loaded before any is used

struct Args {
  const int32_t* qw;    // [NW, N]
  const __half* sw;     // [G, N]
  const uint8_t* zw;    // [G, N]
  const void* x;        // float x (fp16/bf16) or int8 xq [M, stride_x]
  const float* sx;      // integer activations: token scale [M]
  const int32_t* ax;    // integer activations: offset a [M] (u_x - z_x = xq + a)
  const void* bias;     // [N] or null, of type bias_kind: read as it is stored (no cast kernel, no rounding)
  int bias_kind;        // 0 fp16, 1 bf16, 2 float32
  void* y;              // [M, stride_y], fp16 or bf16
  float* ws;            // [M, N] zero, split-K partial sums
  int32_t* cnt;         // [M, tiles] zero, split-K arrival counters
  int M, N, K, SEG, WPG, NW, stride_x, stride_y, words_per_split, splits, tiles;
  // 0x4B000000 (2^23), a run-time value so that it sits in a register: then each code's mask is the immediate
  // of one LOP3 ((word & mask) | magic). As a constant, nvcc splits that into two LOP3s (one immediate each).
  uint32_t magic;
  int x_int;            // the float path reads int8 xq + a (and multiplies by sx at the end)
  int bf16;             // x (float path) and y are bf16, else fp16
  // quant: the block quantizes float x itself (per token, or with the static act_scale/act_zero), as act_quant
  // does (abqllm/kernels/triton_kernels.py act_quant_kernel: same operations, same roundings), instead of
  // reading act_quant's int8 xq, sx and ax: one launch less per linear.
  int quant, qmax, half, symmetric, center_exact;
  float min_scale;
  const float* act_scale;  // static: [1] scale and zero, else null
  const float* act_zero;
};

struct Shared {        // views into the block's dynamic shared memory (ROWS activation rows)
  uint32_t* xt;        // staged x [ROWS][words][SLOTS]: float path x_j * 2^-sh; dp4a byte quads
  int32_t* xsum;       // [ROWS][words]: dp4a the sum of the word's real xq; float path their float sum (bits)
  int32_t* xcnt;       // [words]: real codes in the word (dp4a)
  float* red;          // [WARPS][ROWS][TILE_N] per-warp partial sums (first, the quantizer's min/max tree)
  int32_t* last;       // this block finishes its tile
  float* qs;           // [ROWS] quant: the row's scale, zero point and centre (u - c is the int8 code)
  float* qz;
  float* qc;
};

template <int BITS, bool A8>
struct Traits {
  static constexpr int PER = 32 / BITS;
  static constexpr int SLOTS = A8 ? 8 / BITS : 32 / BITS;  // staged x entries per word
};

// First code whose field ends above mantissa bit 23 (read from word >> HIGH), and the shift of code j's field
// within the word it is read from.
template <int BITS>
HD constexpr int high_shift() {
  return (23 / BITS) * BITS + BITS > 23 ? (23 / BITS) * BITS : 0;
}
template <int BITS>
HD constexpr int field_shift(int j) {
  return j * BITS + BITS <= 23 ? j * BITS : j * BITS - high_shift<BITS>();
}

HD float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
HD uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

// sum of four unsigned bytes of a times the four signed bytes of b, plus c
HD int32_t dp4a_us(uint32_t a, uint32_t b, int32_t c) {
#ifdef __CUDA_ARCH__
  int32_t d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  for (int i = 0; i < 4; ++i) c += (int32_t)((a >> (8 * i)) & 0xFF) * (int32_t)(int8_t)((b >> (8 * i)) & 0xFF);
  return c;
#endif
}

HD void load_words(const int4* src, uint32_t out[COLS]) {
#ifdef __CUDA_ARCH__
  int4 v = __ldcs(src);  // streamed once: evict first
#else
  int4 v = *src;
#endif
  out[0] = (uint32_t)v.x; out[1] = (uint32_t)v.y; out[2] = (uint32_t)v.z; out[3] = (uint32_t)v.w;
}

HD float atomic_add_f(float* p, float v) {
#ifdef __CUDA_ARCH__
  return atomicAdd(p, v);
#else
  float old = *p; *p = old + v; return old;
#endif
}

HD float atomic_take_f(float* p) {  // read the total at L2 and leave zero
#ifdef __CUDA_ARCH__
  return atomicExch(p, 0.0f);
#else
  float old = *p; *p = 0.0f; return old;
#endif
}

HD int32_t atomic_inc_i(int32_t* p) {
#ifdef __CUDA_ARCH__
  return atomicAdd(p, 1);
#else
  return (*p)++;
#endif
}

HD void fence() {
#ifdef __CUDA_ARCH__
  __threadfence();
#endif
}

HD float load_float(const void* base, size_t i, bool bf16) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i])
              : __half2float(static_cast<const __half*>(base)[i]);
}

HD void store_float(void* base, size_t i, float v, bool bf16) {
  if (bf16) static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  else static_cast<__half*>(base)[i] = __float2half_rn(v);
}

// The integer activation k of `row` as the kernels take it (u - c, in int8), its offset a (u - z = code + a) and
// the token scale: from act_quant's outputs, or quantized here (quant) with the block's scale and zero.
HD float round_even(float v) {
#ifdef __CUDA_ARCH__
  return rintf(v);
#else
  return nearbyintf(v);  // the default rounding mode: to nearest, ties to even
#endif
}

HD int act_code(const Args& p, const Shared& s, int r, int row, int k) {
  const size_t i = (size_t)row * p.stride_x + k;
  if (!p.quant) return static_cast<const int8_t*>(p.x)[i];
  const float u = fminf(fmaxf(round_even(load_float(p.x, i, p.bf16) / s.qs[r]) + s.qz[r], 0.f), (float)p.qmax);
  return (int)(u - s.qc[r]);
}

HD int act_offset(const Args& p, const Shared& s, int r, int row) {
  return p.quant ? (int)(s.qc[r] - s.qz[r]) : p.ax[row];
}

HD float act_scale(const Args& p, const Shared& s, int r, int row) {
  return p.quant ? s.qs[r] : p.sx[row];
}

// The float path's activation k of `row`: x itself, or the integer activation + a (exact).
HD float act_value(const Args& p, const Shared& s, int r, int row, int k) {
  const size_t i = (size_t)row * p.stride_x + k;
  if (p.quant) return (float)(act_code(p, s, r, row, k) + act_offset(p, s, r, row));
  if (p.x_int) return (float)(static_cast<const int8_t*>(p.x)[i] + p.ax[row]);
  return load_float(p.x, i, p.bf16);
}

// Column k of word w's slot `code` (within the word), or -1 past the segment or past K.
HD int code_column(const Args& p, int w, int code, int PER) {
  int g = w / p.WPG, i = w - g * p.WPG;
  int in_seg = i * PER + code;
  int k = g * p.SEG + in_seg;
  return (in_seg < p.SEG && k < p.K) ? k : -1;
}

// ---- phase 0 (quant): the rows' min and max through a tree in s.red, then each row's scale, zero and centre.
// Dynamic ranges start at 0 (act_qparams clamps lo <= 0 <= hi); static ones come from act_scale/act_zero.
template <int ROWS>
HD void minmax_partials(const Args& p, const Shared& s, int row0, int tid) {
  for (int r = 0; r < ROWS; ++r) {
    float lo = 0.f, hi = 0.f;
    if (row0 + r < p.M && !p.act_scale)
      for (int k = tid; k < p.K; k += THREADS) {
        const float v = load_float(p.x, (size_t)(row0 + r) * p.stride_x + k, p.bf16);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      }
    s.red[r * 2 * THREADS + tid] = lo;
    s.red[r * 2 * THREADS + THREADS + tid] = hi;
  }
}

template <int ROWS>
HD void minmax_step(const Shared& s, int stride, int tid) {  // one level of the tree (a barrier between levels)
  if (tid >= stride) return;
  for (int r = 0; r < ROWS; ++r) {
    float* lo = s.red + r * 2 * THREADS;
    float* hi = lo + THREADS;
    lo[tid] = fminf(lo[tid], lo[tid + stride]);
    hi[tid] = fmaxf(hi[tid], hi[tid + stride]);
  }
}

template <int ROWS>
HD void quant_params(const Args& p, const Shared& s, int tid) {  // thread r < ROWS sets row r's parameters
  if (tid >= ROWS) return;
  const float lo = s.red[tid * 2 * THREADS], hi = s.red[tid * 2 * THREADS + THREADS];
  float scale, zero;
  if (p.act_scale) {
    scale = *p.act_scale;
    zero = *p.act_zero;
  } else if (p.symmetric) {
    scale = fmaxf(fmaxf(hi, -lo) / (float)(p.half - 1), p.min_scale);
    zero = (float)p.half;
  } else {
    scale = fmaxf((hi - lo) / (float)p.qmax, p.min_scale);
    zero = round_even(-lo / scale);
  }
  s.qs[tid] = scale;
  s.qz[tid] = zero;
  s.qc[tid] = p.center_exact ? zero : (float)p.half;
}

// ---- phase 1: stage the block's x for its ROWS activation rows (thread tid of THREADS); rows past M are zeros
template <int BITS, bool A8, int ROWS>
HD void stage_x(const Args& p, const Shared& s, int row0, int w0, int nwords, int tid) {
  constexpr int PER = Traits<BITS, A8>::PER, SLOTS = Traits<BITS, A8>::SLOTS;
  for (int r = 0; r < ROWS; ++r) {
    const int row = row0 + r;
    const bool live = row < p.M;
    uint32_t* xt = s.xt + (size_t)r * p.words_per_split * SLOTS;
    for (int e = tid; e < nwords * SLOTS; e += THREADS) {
      int wl = e / SLOTS, j = e - wl * SLOTS, w = w0 + wl;
      if (A8) {
        uint32_t quad = 0;
        for (int b = 0; b < 4 && live; ++b) {
          int k = code_column(p, w, b * SLOTS + j, PER);
          quad |= (uint32_t)(uint8_t)(int8_t)(k >= 0 ? act_code(p, s, r, row, k) : 0) << (8 * b);
        }
        xt[e] = quad;
      } else {
        int k = live ? code_column(p, w, j, PER) : -1;
        float v = k >= 0 ? act_value(p, s, r, row, k) : 0.f;
        xt[e] = float_bits(v * (1.0f / (float)(1u << field_shift<BITS>(j))));
      }
    }
    int32_t* xsum = s.xsum + (size_t)r * p.words_per_split;
    for (int wl = tid; wl < nwords; wl += THREADS) {
      int isum = 0, count = 0;
      float fsum = 0.f;
      for (int c = 0; c < PER; ++c) {
        int k = code_column(p, w0 + wl, c, PER);
        if (k < 0) continue;
        ++count;
        if (!live) continue;
        if (A8) isum += act_code(p, s, r, row, k);
        else fsum += act_value(p, s, r, row, k);
      }
      xsum[wl] = A8 ? isum : (int32_t)float_bits(fsum);
      if (A8 && r == 0) s.xcnt[wl] = count;
    }
  }
}

// The word rows [wa, wb) of warp `warp`: consecutive quarters of the block's [w0, w0 + nwords).
HD void warp_range(int w0, int nwords, int warp, int& wa, int& wb) {
  const int per_warp = (nwords + WARPS - 1) / WARPS;
  wa = w0 + warp * per_warp;
  wb = (w0 + nwords < wa + per_warp) ? w0 + nwords : wa + per_warp;
}

// One group's sum for one output before its scale: sum (u - z)(xq + a) in integers on the dp4a path, expanded as
// sum u xq - z sum xq + a (sum u - z count); sum code x - z sum x on the float path.
template <bool A8>
HD float group_total(int32_t dot, int32_t usum, int32_t zero, int32_t xs, int32_t xc, int a, float gsum, float xsf) {
  if (A8) return (float)((long long)dot - (long long)zero * xs + (long long)a * (usum - (long long)zero * xc));
  return gsum - (float)zero * xsf;
}

// ---- phase 2: this lane's 4 columns x ROWS rows over its warp's quarter of the block's words; partials to s.red
template <int BITS, bool A8, int ROWS>
HD void accumulate(const Args& p, const Shared& s, int row0, int tile, int w0, int nwords, int tid) {
  constexpr int SLOTS = Traits<BITS, A8>::SLOTS;
  constexpr uint32_t FIELD = (1u << BITS) - 1;
  constexpr uint32_t MASK = FIELD * 0x01010101u;  // A8: the field in each byte
  const int warp = tid / 32, lane = tid % 32;
  const int n0 = tile * TILE_N + lane * COLS;
  const size_t xt_row = (size_t)p.words_per_split * SLOTS, xs_row = (size_t)p.words_per_split;
  float acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) acc[r][c] = 0.f;
  if (n0 < p.N) {
    int wa, wb;
    warp_range(w0, nwords, warp, wa, wb);
    int a[ROWS];
    bool offset = false;  // any row with an activation offset (uniform across the block)
    for (int r = 0; r < ROWS; ++r) {
      a[r] = A8 && row0 + r < p.M ? act_offset(p, s, r, row0 + r) : 0;
      offset |= a[r] != 0;
    }
    // the running group (ends before word `group_end`): its scale and zero, and its integer (A8) or float sums.
    // Tracked by its end so that the loop divides only when a group starts.
    int group_end = wa;
    // a running pointer to word row w's 4 columns (N % 4 == 0): one add per load, no 64-bit multiplies
    const size_t row4 = (size_t)(p.N / 4);
    const int4* wp = reinterpret_cast<const int4*>(p.qw + (size_t)wa * p.N + n0);
    const uint32_t magic = p.magic;
    float scale[COLS] = {0.f, 0.f, 0.f, 0.f};
    int32_t zero[COLS] = {0, 0, 0, 0};
    float gsum[ROWS][COLS];
    int32_t dot[ROWS][COLS], usum[COLS] = {0, 0, 0, 0};
    int32_t xs[ROWS], xc = 0;  // A8: the group's sums of xq per row, and its count of real codes
    float xsf[ROWS];           // float path: the group's sum of x per row
    for (int r = 0; r < ROWS; ++r) {
      xs[r] = 0; xsf[r] = 0.f;
      for (int c = 0; c < COLS; ++c) { gsum[r][c] = 0.f; dot[r][c] = 0; }
    }
    for (int w = wa; w < wb; w += UNROLL, wp += UNROLL * row4) {
      uint32_t words[UNROLL][COLS];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (w + u < wb) load_words(wp + u * row4, words[u]);
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int wu = w + u;
        if (wu >= wb) break;
        if (wu >= group_end) {  // flush the finished group, fetch the next one's scale and zero
          const int g = wu / p.WPG;
          group_end = (g + 1) * p.WPG;
          for (int c = 0; c < COLS; ++c) {
            for (int r = 0; r < ROWS; ++r) {
              acc[r][c] += scale[c] * group_total<A8>(dot[r][c], usum[c], zero[c], xs[r], xc, a[r], gsum[r][c], xsf[r]);
              dot[r][c] = 0;
              gsum[r][c] = 0.f;
            }
            usum[c] = 0;
            scale[c] = __half2float(p.sw[(size_t)g * p.N + n0 + c]);
            zero[c] = p.zw[(size_t)g * p.N + n0 + c];
          }
          xc = 0;
          for (int r = 0; r < ROWS; ++r) { xs[r] = 0; xsf[r] = 0.f; }
        }
        const int wl = wu - w0;
        if (A8) {
          xc += s.xcnt[wl];
          for (int r = 0; r < ROWS; ++r) xs[r] += s.xsum[r * xs_row + wl];
#pragma unroll
          for (int j = 0; j < SLOTS; ++j) {
            uint32_t xq[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) xq[r] = s.xt[r * xt_row + (size_t)wl * SLOTS + j];
#pragma unroll
            for (int c = 0; c < COLS; ++c) {
              const uint32_t v = (words[u][c] >> (j * BITS)) & MASK;
#pragma unroll
              for (int r = 0; r < ROWS; ++r) dot[r][c] = dp4a_us(v, xq[r], dot[r][c]);
            }
          }
          if (offset) {  // one uniform branch a word (inside the loop above nvcc kept one a dp4a)
#pragma unroll
            for (int j = 0; j < SLOTS; ++j)
#pragma unroll
              for (int c = 0; c < COLS; ++c)
                usum[c] = dp4a_us((words[u][c] >> (j * BITS)) & MASK, 0x01010101u, usum[c]);
          }
        } else {
          for (int r = 0; r < ROWS; ++r) xsf[r] += bits_float((uint32_t)s.xsum[r * xs_row + wl]);
          uint32_t high[COLS];
#pragma unroll
          for (int c = 0; c < COLS; ++c) high[c] = words[u][c] >> high_shift<BITS>();
#pragma unroll
          for (int j = 0; j < SLOTS; ++j) {
            float xj[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) xj[r] = bits_float(s.xt[r * xt_row + (size_t)wl * SLOTS + j]);
#pragma unroll
            for (int c = 0; c < COLS; ++c) {
              const uint32_t src = j * BITS + BITS <= 23 ? words[u][c] : high[c];
              const float code = bits_float((src & (FIELD << field_shift<BITS>(j))) | magic) - 8388608.0f;
#pragma unroll
              for (int r = 0; r < ROWS; ++r) gsum[r][c] = fmaf(code, xj[r], gsum[r][c]);
            }
          }
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) {  // the last group
      const float sx = (A8 || p.x_int || p.quant) && row0 + r < p.M ? act_scale(p, s, r, row0 + r) : 1.f;
      for (int c = 0; c < COLS; ++c) {
        acc[r][c] += scale[c] * group_total<A8>(dot[r][c], usum[c], zero[c], xs[r], xc, a[r], gsum[r][c], xsf[r]);
        acc[r][c] *= sx;
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) s.red[((size_t)warp * ROWS + r) * TILE_N + lane * COLS + c] = acc[r][c];
}

// ---- phase 3: the block's sums of one column (thread tid = column in tile) for its rows; to y, or into the
// workspace
template <int ROWS>
HD float block_column(const Shared& s, int r, int tid) {
  float t = 0.f;
  for (int wp = 0; wp < WARPS; ++wp) t += s.red[((size_t)wp * ROWS + r) * TILE_N + tid];
  return t;
}

HD void write_y(const Args& p, int row, int n, float v) {
  if (p.bias) v += p.bias_kind == 2 ? static_cast<const float*>(p.bias)[n] : load_float(p.bias, n, p.bias_kind == 1);
  store_float(p.y, (size_t)row * p.stride_y + n, v, p.bf16);
}

template <int ROWS>
HD void publish(const Args& p, const Shared& s, int row0, int tile, int tid) {
  const int n = tile * TILE_N + tid;
  if (n >= p.N) return;
  for (int r = 0; r < ROWS && row0 + r < p.M; ++r) {
    const float v = block_column<ROWS>(s, r, tid);
    if (p.splits == 1) write_y(p, row0 + r, n, v);
    else atomic_add_f(p.ws + (size_t)(row0 + r) * p.N + n, v);
  }
  if (p.splits > 1) fence();  // this thread's partials are visible before the block's arrival is counted
}

HD void arrive(const Args& p, const Shared& s, int rblock, int tile) {  // one thread per block
  int ticket = atomic_inc_i(p.cnt + (size_t)rblock * p.tiles + tile);
  *s.last = ticket == p.splits - 1;
}

template <int ROWS>
HD void finish(const Args& p, const Shared& s, int rblock, int tile, int tid) {
  if (!*s.last) return;
  const int n = tile * TILE_N + tid;
  const int row0 = rblock * ROWS;
  if (n < p.N)
    for (int r = 0; r < ROWS && row0 + r < p.M; ++r)
      write_y(p, row0 + r, n, atomic_take_f(p.ws + (size_t)(row0 + r) * p.N + n));
  if (tid == 0) p.cnt[(size_t)rblock * p.tiles + tile] = 0;
}

// [red][last, 12 bytes free][qs][qz][qc] (16 * rows bytes)[xt][xsum][xcnt]
HD size_t misc_bytes(int rows) { return 16 + 16 * (size_t)rows; }

HD size_t shared_bytes(int words, int slots, bool a8, int rows) {
  return (size_t)rows * words * (slots + 1) * 4 + (a8 ? (size_t)words * 4 : 0) + (size_t)WARPS * rows * TILE_N * 4 +
         misc_bytes(rows);
}

HD Shared carve(unsigned char* base, int words, int slots, bool a8, int rows) {
  Shared s;
  s.red = reinterpret_cast<float*>(base);
  const size_t red = (size_t)WARPS * rows * TILE_N * 4;
  s.last = reinterpret_cast<int32_t*>(base + red);
  s.qs = reinterpret_cast<float*>(base + red + 16);
  s.qz = s.qs + rows;
  s.qc = s.qz + rows;
  unsigned char* rest = base + red + misc_bytes(rows);
  s.xt = reinterpret_cast<uint32_t*>(rest);
  s.xsum = reinterpret_cast<int32_t*>(rest + (size_t)rows * words * slots * 4);
  s.xcnt = s.xsum + (size_t)rows * words;
  (void)a8;
  return s;
}

HD void block_range(const Args& p, int split, int& w0, int& nwords) {
  w0 = split * p.words_per_split;
  int end = w0 + p.words_per_split;
  nwords = (end < p.NW ? end : p.NW) - w0;
}

// Device only (a hint, no effect on results): L2 prefetch of the first 2 * UNROLL word rows of this thread's
// warp, issued before the activations are staged so that the two latencies overlap.
__device__ __forceinline__ void prefetch_words(const Args& p, int tile, int w0, int nwords, int tid) {
  const int warp = tid / 32, lane = tid % 32, n0 = tile * TILE_N + lane * COLS;
  int wa, wb;
  warp_range(w0, nwords, warp, wa, wb);
  if (n0 >= p.N) return;
  for (int w = wa; w < wb && w < wa + 2 * UNROLL; ++w)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p.qw + (size_t)w * p.N + n0));
}

// Block (tile, split, rblock): 128 columns, one run of word rows, activation rows rblock * ROWS ...
template <int BITS, bool A8, int ROWS>
__global__ void __launch_bounds__(THREADS) gemv_kernel(Args p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tile = blockIdx.x, split = blockIdx.y, rblock = blockIdx.z, tid = threadIdx.x;
  const int row0 = rblock * ROWS;
  int w0, nwords;
  block_range(p, split, w0, nwords);
  const Shared s = carve(smem, p.words_per_split, Traits<BITS, A8>::SLOTS, A8, ROWS);
  prefetch_words(p, tile, w0, nwords, tid);  // the first weight rows travel to L2 while x is staged
  if (p.quant) {
    minmax_partials<ROWS>(p, s, row0, tid);
    for (int stride = THREADS / 2; stride > 0; stride /= 2) {
      __syncthreads();
      minmax_step<ROWS>(s, stride, tid);
    }
    __syncthreads();
    quant_params<ROWS>(p, s, tid);
    __syncthreads();
  }
  stage_x<BITS, A8, ROWS>(p, s, row0, w0, nwords, tid);
  __syncthreads();
  accumulate<BITS, A8, ROWS>(p, s, row0, tile, w0, nwords, tid);
  __syncthreads();
  publish<ROWS>(p, s, row0, tile, tid);
  if (p.splits == 1) return;
  __syncthreads();
  if (tid == 0) arrive(p, s, rblock, tile);
  __syncthreads();
  finish<ROWS>(p, s, rblock, tile, tid);
}

template <int BITS, bool A8, int ROWS>
void emulate(const Args& p) {
  std::vector<unsigned char> smem(shared_bytes(p.words_per_split, Traits<BITS, A8>::SLOTS, A8, ROWS) + 16);
  for (int rblock = 0; rblock * ROWS < p.M; ++rblock)
    for (int split = 0; split < p.splits; ++split)
      for (int tile = 0; tile < p.tiles; ++tile) {
        int w0, nwords;
        block_range(p, split, w0, nwords);
        const Shared s = carve(smem.data(), p.words_per_split, Traits<BITS, A8>::SLOTS, A8, ROWS);
        const int row0 = rblock * ROWS;
        if (p.quant) {
          for (int t = 0; t < THREADS; ++t) minmax_partials<ROWS>(p, s, row0, t);
          for (int stride = THREADS / 2; stride > 0; stride /= 2)
            for (int t = 0; t < THREADS; ++t) minmax_step<ROWS>(s, stride, t);
          for (int t = 0; t < THREADS; ++t) quant_params<ROWS>(p, s, t);
        }
        for (int t = 0; t < THREADS; ++t) stage_x<BITS, A8, ROWS>(p, s, row0, w0, nwords, t);
        for (int t = 0; t < THREADS; ++t) accumulate<BITS, A8, ROWS>(p, s, row0, tile, w0, nwords, t);
        for (int t = 0; t < THREADS; ++t) publish<ROWS>(p, s, row0, tile, t);
        if (p.splits == 1) continue;
        arrive(p, s, rblock, tile);
        for (int t = 0; t < THREADS; ++t) finish<ROWS>(p, s, rblock, tile, t);
      }
}

template <int BITS, bool A8, int ROWS>
int launch(const Args& p, cudaStream_t stream) {
  const size_t bytes = shared_bytes(p.words_per_split, Traits<BITS, A8>::SLOTS, A8, ROWS);
  if (bytes > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(gemv_kernel<BITS, A8, ROWS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)bytes);
    if (e != cudaSuccess) return (int)e;
  }
  dim3 grid(p.tiles, p.splits, (p.M + ROWS - 1) / ROWS);
  gemv_kernel<BITS, A8, ROWS><<<grid, THREADS, bytes, stream>>>(p);
  return (int)cudaGetLastError();
}

template <int BITS, bool A8>
int run(const Args& p, int rows, cudaStream_t stream, bool on_cpu) {
  switch (rows) {
    case 1: if (on_cpu) { emulate<BITS, A8, 1>(p); return 0; } return launch<BITS, A8, 1>(p, stream);
    case 2: if (on_cpu) { emulate<BITS, A8, 2>(p); return 0; } return launch<BITS, A8, 2>(p, stream);
    case 4: if (on_cpu) { emulate<BITS, A8, 4>(p); return 0; } return launch<BITS, A8, 4>(p, stream);
    default: return -1;
  }
}

// dp4a: the integer path (bits 1, 2, 4, 8); otherwise the float path (every width). rows: 1, 2 or 4 activation
// rows a block (each block reads its weights once for all of them).
int dispatch(const Args& p, int bits, bool dp4a, int rows, cudaStream_t stream, bool on_cpu) {
  if (dp4a) {
    switch (bits) {
      case 1: return run<1, true>(p, rows, stream, on_cpu);
      case 2: return run<2, true>(p, rows, stream, on_cpu);
      case 4: return run<4, true>(p, rows, stream, on_cpu);
      case 8: return run<8, true>(p, rows, stream, on_cpu);
      default: return -1;
    }
  }
  switch (bits) {
    case 1: return run<1, false>(p, rows, stream, on_cpu);
    case 2: return run<2, false>(p, rows, stream, on_cpu);
    case 3: return run<3, false>(p, rows, stream, on_cpu);
    case 4: return run<4, false>(p, rows, stream, on_cpu);
    case 5: return run<5, false>(p, rows, stream, on_cpu);
    case 6: return run<6, false>(p, rows, stream, on_cpu);
    case 7: return run<7, false>(p, rows, stream, on_cpu);
    case 8: return run<8, false>(p, rows, stream, on_cpu);
    default: return -1;
  }
}

}  // namespace kpgemv

using kpgemv::Args;

// mode: 0 the float path on float x, 1 the dp4a path (integer activations, bits 1/2/4/8), 2 the float path on
// integer activations. bf16: x (float x) and y are bf16, else fp16; bias_kind: the bias's type (0 fp16, 1 bf16,
// 2 float32). rows: 1, 2 or 4 activation rows a block. quant: x is float and the kernel quantizes it (act_bits,
// symmetric, center_exact as act_quant's; static scale and zero when act_scale is given); else integer modes read
// act_quant's xq, sx, ax.
struct QuantArgs {
  int quant, act_bits, symmetric, center_exact;
  float min_scale;
  const float* act_scale;
  const float* act_zero;
};

static Args make_args(const void* qw, const void* sw, const void* zw, const void* x, const float* sx,
                      const int32_t* ax, const void* bias, void* y, float* ws, int32_t* cnt, int M, int N, int K,
                      int SEG, int WPG, int NW, int stride_x, int stride_y, int mode, int bf16, int words_per_split,
                      int splits, uint32_t magic, const QuantArgs& q, int bias_kind) {
  Args p;
  p.qw = static_cast<const int32_t*>(qw); p.sw = static_cast<const __half*>(sw); p.zw = static_cast<const uint8_t*>(zw);
  p.x = x; p.sx = sx; p.ax = ax; p.bias = bias; p.bias_kind = bias_kind; p.y = y;
  p.ws = ws; p.cnt = cnt; p.M = M; p.N = N; p.K = K; p.SEG = SEG; p.WPG = WPG; p.NW = NW; p.stride_x = stride_x;
  p.stride_y = stride_y; p.words_per_split = words_per_split; p.splits = splits;
  p.tiles = (N + kpgemv::TILE_N - 1) / kpgemv::TILE_N;
  p.magic = magic;
  p.x_int = mode == 2;
  p.bf16 = bf16;
  p.quant = q.quant;
  p.qmax = (1 << q.act_bits) - 1;
  p.half = 1 << (q.act_bits - 1);
  p.symmetric = q.symmetric;
  p.center_exact = q.center_exact;
  p.min_scale = q.min_scale;
  p.act_scale = q.act_scale;
  p.act_zero = q.act_zero;
  return p;
}

extern "C" {

// Bytes of dynamic shared memory a block needs (the launcher keeps it under the device's limit).
size_t abq_gemv_shared_bytes(int words_per_split, int bits, int dp4a, int rows) {
  int slots = dp4a ? 8 / bits : 32 / bits;
  return kpgemv::shared_bytes(words_per_split, slots, dp4a != 0, rows);
}

// Returns a cudaError_t (0: launched), or -1 for an unsupported width or row count. `magic` must be 0x4B000000.
int abq_gemv(const void* qw, const void* sw, const void* zw, const void* x, const float* sx, const int32_t* ax,
             const void* bias, void* y, float* ws, int32_t* cnt, int M, int N, int K, int SEG, int WPG, int NW,
             int stride_x, int stride_y, int bits, int mode, int bf16, int rows, int words_per_split, int splits,
             uint32_t magic, int quant, int act_bits, int symmetric, int center_exact, float min_scale,
             const float* act_scale, const float* act_zero, int bias_kind, void* stream) {
  QuantArgs q{quant, act_bits, symmetric, center_exact, min_scale, act_scale, act_zero};
  Args p = make_args(qw, sw, zw, x, sx, ax, bias, y, ws, cnt, M, N, K, SEG, WPG, NW, stride_x, stride_y, mode, bf16,
                     words_per_split, splits, magic, q, bias_kind);
  return kpgemv::dispatch(p, bits, mode == 1, rows, static_cast<cudaStream_t>(stream), false);
}

// The same kernel run on the CPU over host pointers (phases in order, blocks one after another).
int abq_gemv_emulate(const void* qw, const void* sw, const void* zw, const void* x, const float* sx,
                     const int32_t* ax, const void* bias, void* y, float* ws, int32_t* cnt, int M, int N, int K,
                     int SEG, int WPG, int NW, int stride_x, int stride_y, int bits, int mode, int bf16, int rows,
                     int words_per_split, int splits, uint32_t magic, int quant, int act_bits, int symmetric,
                     int center_exact, float min_scale, const float* act_scale, const float* act_zero,
                     int bias_kind) {
  QuantArgs q{quant, act_bits, symmetric, center_exact, min_scale, act_scale, act_zero};
  Args p = make_args(qw, sw, zw, x, sx, ax, bias, y, ws, cnt, M, N, K, SEG, WPG, NW, stride_x, stride_y, mode, bf16,
                     words_per_split, splits, magic, q, bias_kind);
  return kpgemv::dispatch(p, bits, mode == 1, rows, nullptr, true);
}

const char* abq_gemv_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
