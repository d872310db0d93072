// ABQ-LLM's binary path: WpAq as p*q bit-plane products on the tensor cores, with the zero-point and
// scale epilogue (ABQ.md section 5) that the authors' kernels leave out.
//
// Plain CUDA C++ (no torch headers): built at run time by abqllm/kernels/cuda/__init__.py with
//   nvcc -O3 -shared -Xcompiler -fPIC -gencode arch=compute_XY,code=sm_XY
// and called through ctypes with raw device pointers and the caller's stream. Needs sm_80+
// (mma.sync m8n8k128 .b1 .and.popc). Every launcher returns the cudaError_t of its launch.
//
// Layouts (all uint32 words, column 32*w + t of a row at bit t of word w):
//   weight planes  wp [p][N][KW]   bit j of every weight code        (KW = ceil(K / 32))
//   act planes     xp [q][M][KW]   bit i of every activation code
//   wsum [N][G], xsum [M][G]       sums of the codes over each group's real columns
// With u = sum_i 2^i X_i, w = sum_j 2^j W_j (all planes +1: codes are unsigned), per group g:
//   D[m][n] = sum_i sum_j 2^(i+j) popc(X_i[m] AND W_j[n])            (= sum_k u[m][k] w[n][k])
//   I = D - zx[m] * wsum[n][g] - zw[n][g] * xsum[m][g] + Kg * zx[m] * zw[n][g]
//   y[m][n] = sx[m] * sum_g sw[n][g] * I + bias[n]
//
// MMA tiling: one warp owns 8 output columns and one "row tile" of the A operand. The 8 A rows are
// (token, activation plane) pairs: with QP = q rounded up to a power of two, row r holds plane r % QP of
// token r / QP (8 / QP tokens per tile; planes >= q are zero). For M = 1, q = 8 the 8 planes fill the tile,
// as in the paper's decode scheme. Each 128-bit k chunk costs one m8n8k128 per weight plane; plane
// weights 2^j are applied after the group, 2^i by a shuffle reduction across the rows of one token.
// Fragments (PTX ISA, m8n8k128 .b1): A row = lane / 4, k word = lane % 4; B column = lane / 4, same k
// word; D row = lane / 4, columns 2 * (lane % 4) + {0, 1}. AND+popc counts matching pairs, so the bit
// order inside a word only has to agree between A and B, which it does (both use the same packing).

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr unsigned kFull = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }

// torch.clamp(torch.round(x / s) + z, 0, qmax): IEEE division, round half to even.
__device__ __forceinline__ unsigned code_of(float v, float s, float z, float qmax) {
  float u = rintf(__fdiv_rn(v, s)) + z;
  return (unsigned)fminf(fmaxf(u, 0.f), qmax);
}

__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// One block per token row: per-token (or static) qparams exactly as quant/primitives.py computes
// them, then one warp per 32-column word: ballot each bit plane, add the codes into the group sums.
template <typename T>
__global__ void act_quant_pack_kernel(const T* __restrict__ x, int ldx, int M, int K, int KW, int q,
                                      int symmetric, const float* __restrict__ s_static,
                                      const float* __restrict__ z_static, int gs_words, int G,
                                      uint32_t* __restrict__ planes, int* __restrict__ sums,
                                      float* __restrict__ sx, float* __restrict__ zx) {
  extern __shared__ int group_sum[];
  __shared__ float red_lo[32], red_hi[32];
  __shared__ float s_sh, z_sh;
  const int m = blockIdx.x;
  const T* xr = x + (size_t)m * ldx;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const float qmax = (float)((1 << q) - 1), half = (float)(1 << (q - 1));
  for (int g = tid; g < G; g += blockDim.x) group_sum[g] = 0;
  if (s_static != nullptr) {
    if (tid == 0) { s_sh = *s_static; z_sh = *z_static; }
  } else {
    float lo = 0.f, hi = 0.f;  // act_qparams clamps min <= 0 <= max
    for (int k = tid; k < K; k += blockDim.x) {
      const float v = to_f32(xr[k]);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    lo = warp_min(lo);
    hi = warp_max(hi);
    if (lane == 0) { red_lo[warp] = lo; red_hi[warp] = hi; }
    __syncthreads();
    if (warp == 0) {
      lo = lane < nwarps ? red_lo[lane] : 0.f;
      hi = lane < nwarps ? red_hi[lane] : 0.f;
      lo = warp_min(lo);
      hi = warp_max(hi);
      if (lane == 0) {
        float s, z;
        if (symmetric) {
          s = fmaxf(__fdiv_rn(fmaxf(hi, -lo), half - 1.f), 1e-8f);
          z = half;
        } else {
          s = fmaxf(__fdiv_rn(hi - lo, qmax), 1e-8f);
          z = rintf(__fdiv_rn(-lo, s));
        }
        s_sh = s;
        z_sh = z;
      }
    }
  }
  __syncthreads();
  const float s = s_sh, z = z_sh;
  for (int w = warp; w < KW; w += nwarps) {
    const int col = w * 32 + lane;
    const unsigned u = col < K ? code_of(to_f32(xr[col]), s, z, qmax) : 0u;
    for (int i = 0; i < q; ++i) {
      const unsigned bits = __ballot_sync(kFull, (u >> i) & 1u);
      if (lane == 0) planes[((size_t)i * M + m) * KW + w] = bits;
    }
    const unsigned total = __reduce_add_sync(kFull, u);
    if (lane == 0) atomicAdd(&group_sum[gs_words ? w / gs_words : 0], (int)total);
  }
  __syncthreads();
  for (int g = tid; g < G; g += blockDim.x) sums[(size_t)m * G + g] = group_sum[g];
  if (tid == 0) { sx[m] = s; zx[m] = z; }
}

// Plain bitstream (formats/packing.py: code k of a row at bits [k*p, k*p + p) of the row's bit string)
// -> bit planes [p][N][KW] and per-group code sums [N][G]. One block per weight row.
__global__ void repack_bitplanes_kernel(const uint32_t* __restrict__ qw, int N, int K, int KW, int p, int gs_words,
                                        int G, uint32_t* __restrict__ planes, int* __restrict__ sums) {
  extern __shared__ int group_sum[];
  const int n = blockIdx.x;
  const uint32_t* row = qw + (size_t)n * KW * p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  for (int g = tid; g < G; g += blockDim.x) group_sum[g] = 0;
  __syncthreads();
  const unsigned mask = (p == 32) ? kFull : ((1u << p) - 1u);
  for (int w = warp; w < KW; w += nwarps) {
    const int col = w * 32 + lane;
    unsigned c = 0;
    if (col < K) {
      const unsigned bit = (unsigned)col * (unsigned)p;
      const unsigned word = bit >> 5, sh = bit & 31u;
      c = row[word] >> sh;
      if (sh + p > 32) c |= row[word + 1] << (32u - sh);
      c &= mask;
    }
    for (int j = 0; j < p; ++j) {
      const unsigned bits = __ballot_sync(kFull, (c >> j) & 1u);
      if (lane == 0) planes[((size_t)j * N + n) * KW + w] = bits;
    }
    const unsigned total = __reduce_add_sync(kFull, c);
    if (lane == 0) atomicAdd(&group_sum[gs_words ? w / gs_words : 0], (int)total);
  }
  __syncthreads();
  for (int g = tid; g < G; g += blockDim.x) sums[(size_t)n * G + g] = group_sum[g];
}

__device__ __forceinline__ void bmma_and_popc(int& d0, int& d1, unsigned a, unsigned b) {
  asm volatile(
      "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc {%0, %1}, {%2}, {%3}, {%0, %1};\n"
      : "+r"(d0), "+r"(d1)
      : "r"(a), "r"(b));
}

constexpr int kMaxPlanes = 8;

template <typename TOut>
__global__ void bmma_linear_kernel(const uint32_t* __restrict__ xp, const int* __restrict__ xsum,
                                   const float* __restrict__ sx, const float* __restrict__ zx, int M, int q,
                                   int qp_log2, const uint32_t* __restrict__ wp, const int* __restrict__ wsum,
                                   const __half* __restrict__ sw, const uint8_t* __restrict__ zw,
                                   const float* __restrict__ bias, TOut* __restrict__ y, int ldy, int N, int K,
                                   int KW, int p, int gs_words, int G) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * (blockDim.x >> 5) + warp) * 8;
  if (n0 >= N) return;  // whole warps leave together: the mma below needs all 32 lanes
  const int qp = 1 << qp_log2;
  const int row = lane >> 2, tig = lane & 3;
  const int m = blockIdx.y * (8 >> qp_log2) + (row >> qp_log2);
  const int i = row & (qp - 1);
  const bool a_ok = m < M && i < q;
  const uint32_t* arow = xp + ((size_t)(a_ok ? i : 0) * M + (a_ok ? m : 0)) * KW;
  const int nb = n0 + row;  // the B column (weight row) this lane feeds
  const bool b_ok = nb < N;
  const int words_per_group = gs_words ? gs_words : KW;
  const bool owner = i == 0 && m < M;  // holds the token's sums after the reduction
  float accf[2] = {0.f, 0.f};
  for (int g = 0; g < G; ++g) {
    int acc[kMaxPlanes][2];
#pragma unroll
    for (int j = 0; j < kMaxPlanes; ++j) acc[j][0] = acc[j][1] = 0;
    const int w_lo = g * words_per_group, w_hi = min(KW, w_lo + words_per_group);
    for (int c = w_lo; c < w_hi; c += 4) {
      const int wi = c + tig;
      const bool in = wi < w_hi;  // a chunk never reaches into the next group
      const unsigned a = (a_ok && in) ? __ldg(arow + wi) : 0u;
#pragma unroll
      for (int j = 0; j < kMaxPlanes; ++j) {
        if (j < p) {
          const unsigned b = (b_ok && in) ? __ldg(wp + ((size_t)j * N + nb) * KW + wi) : 0u;
          bmma_and_popc(acc[j][0], acc[j][1], a, b);
        }
      }
    }
    int v0 = 0, v1 = 0;
#pragma unroll
    for (int j = 0; j < kMaxPlanes; ++j) {
      if (j < p) {
        v0 += acc[j][0] << j;
        v1 += acc[j][1] << j;
      }
    }
    v0 <<= i;
    v1 <<= i;
    for (int off = 1; off < qp; off <<= 1) {  // rows of one token are lanes 4 apart
      v0 += __shfl_xor_sync(kFull, v0, off * 4);
      v1 += __shfl_xor_sync(kFull, v1, off * 4);
    }
    if (owner) {
      const long long kg = gs_words ? (long long)(min(K, (g + 1) * gs_words * 32) - g * gs_words * 32) : K;
      const long long zxm = (long long)zx[m];
      const long long sxm = xsum[(size_t)m * G + g];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int n = n0 + tig * 2 + t;
        if (n < N) {
          const size_t ng = (size_t)n * G + g;
          const long long z = zw[ng];
          const long long dot = t ? v1 : v0;
          const long long tot = dot - zxm * wsum[ng] - z * sxm + kg * zxm * z;
          accf[t] += (float)tot * __half2float(sw[ng]);
        }
      }
    }
  }
  if (owner) {
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int n = n0 + tig * 2 + t;
      if (n < N) y[(size_t)m * ldy + n] = from_f32<TOut>(accf[t] * sx[m] + (bias ? bias[n] : 0.f));
    }
  }
}

constexpr int kPackThreads = 256;
constexpr int kBmmaWarps = 4;

}  // namespace

// dtype codes shared with the Python loader: 0 float16, 1 bfloat16, 2 float32.
extern "C" {

int abq_act_quant_pack(const void* x, int x_dtype, int ldx, int M, int K, int q, int symmetric,
                       const float* s_static, const float* z_static, int gs_words, int G, uint32_t* planes,
                       int* sums, float* sx, float* zx, void* stream) {
  const int KW = (K + 31) / 32;
  const dim3 grid(M), block(kPackThreads);
  const size_t smem = (size_t)G * sizeof(int);
  cudaStream_t st = (cudaStream_t)stream;
  switch (x_dtype) {
    case 0:
      act_quant_pack_kernel<__half><<<grid, block, smem, st>>>((const __half*)x, ldx, M, K, KW, q, symmetric,
                                                               s_static, z_static, gs_words, G, planes, sums, sx, zx);
      break;
    case 1:
      act_quant_pack_kernel<__nv_bfloat16><<<grid, block, smem, st>>>((const __nv_bfloat16*)x, ldx, M, K, KW, q,
                                                                      symmetric, s_static, z_static, gs_words, G,
                                                                      planes, sums, sx, zx);
      break;
    case 2:
      act_quant_pack_kernel<float><<<grid, block, smem, st>>>((const float*)x, ldx, M, K, KW, q, symmetric, s_static,
                                                              z_static, gs_words, G, planes, sums, sx, zx);
      break;
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

int abq_repack_bitplanes(const uint32_t* qw, int N, int K, int p, int gs_words, int G, uint32_t* planes, int* sums,
                         void* stream) {
  const int KW = (K + 31) / 32;
  repack_bitplanes_kernel<<<N, kPackThreads, (size_t)G * sizeof(int), (cudaStream_t)stream>>>(qw, N, K, KW, p,
                                                                                              gs_words, G, planes, sums);
  return (int)cudaGetLastError();
}

int abq_bmma_linear(const uint32_t* xp, const int* xsum, const float* sx, const float* zx, int M, int q,
                    const uint32_t* wp, const int* wsum, const void* sw, const uint8_t* zw, const float* bias,
                    void* y, int y_dtype, int ldy, int N, int K, int p, int gs_words, int G, void* stream) {
  if (p < 1 || p > kMaxPlanes || q < 1 || q > 8) return (int)cudaErrorInvalidValue;
  const int KW = (K + 31) / 32;
  const int qp_log2 = q <= 1 ? 0 : q <= 2 ? 1 : q <= 4 ? 2 : 3;
  const int tokens_per_tile = 8 >> qp_log2;
  const dim3 grid((N + 8 * kBmmaWarps - 1) / (8 * kBmmaWarps), (M + tokens_per_tile - 1) / tokens_per_tile);
  const dim3 block(32 * kBmmaWarps);
  cudaStream_t st = (cudaStream_t)stream;
  const __half* s = (const __half*)sw;
  switch (y_dtype) {
    case 0:
      bmma_linear_kernel<__half><<<grid, block, 0, st>>>(xp, xsum, sx, zx, M, q, qp_log2, wp, wsum, s, zw, bias,
                                                         (__half*)y, ldy, N, K, KW, p, gs_words, G);
      break;
    case 1:
      bmma_linear_kernel<__nv_bfloat16><<<grid, block, 0, st>>>(xp, xsum, sx, zx, M, q, qp_log2, wp, wsum, s, zw,
                                                                bias, (__nv_bfloat16*)y, ldy, N, K, KW, p, gs_words, G);
      break;
    case 2:
      bmma_linear_kernel<float><<<grid, block, 0, st>>>(xp, xsum, sx, zx, M, q, qp_log2, wp, wsum, s, zw, bias,
                                                        (float*)y, ldy, N, K, KW, p, gs_words, G);
      break;
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

const char* abq_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

}  // extern "C"
