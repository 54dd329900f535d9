// lmforge's own matmul kernels for decode (a few rows) on CPUs with AVX512 (-VNNI), built on first use by
// cpu_kernels.py. Two of them:
//   lmforge_q4_mm   int4 weights (llama.cpp's q4_1 blocks) times int8-rounded activations, integer dot products
//   lmforge_f32_mm  fp32 weights packed in column tiles, for 1-16 rows of fp32 activations
//
// 1. int4: the matmul for few rows (decode) on CPUs with AVX512-VNNI: y [M, N] = x [M, K] @ W^T, W in blocks
// of 32 weights along K, w = q * scale + min with q in 0..15 (one scale and one min per block, float16).
//
// As llama.cpp's q4 x q8 dot products: each block of x is rounded to int8 with a scale of its own (dx = max|x|/127),
// so a block's sum of products is one integer dot product, `vpdpbusd` (64 u8 x s8 products a cycle per port);
// torch's int4 kernels dequantize every weight to float and multiply-add in fp32, about 2x the instructions.
//   y[m, n] = sum_b scale[n, b] * dx[m, b] * sum_j q[n, b, j] * xq[m, b, j]  +  sum_b min[n, b] * sum_j x[m, b, j]
//
// Layout (lmforge/model/quantize.py packs it): rows of W in tiles of 4, each tile one contiguous stream, so that
// a decode step reads its weights from memory front to back (with one array per row the 4 rows' streams, and their
// scales', went at half the speed). A block of 32 weights is 16 bytes, byte j = q[j] | q[j + 16] << 4.
//   qweight [N/4, 2K] uint8: per tile, for each pair of blocks p: the 4 rows' 32 bytes; then, when the number of
//       blocks NB = K/32 is odd, the 4 rows' last block (16 bytes each)
//   scales [N/4, 4 NB] float16: per tile, for each pair p: the 4 rows' two scales; then the odd block's 4
//   mins [N/4, 4 NB] float16: per tile, row by row, NB each
// Two blocks (32 bytes) make one 512-bit vector: low nibbles (elements 0-15 of both) then high nibbles (16-31),
// so the int8 activations of each pair of blocks are stored in that same order; a last odd block uses 256 bits.
//
// 2. fp32: y [M, N] = x [M, K] @ W^T with W packed as [N/16, K, 16]: tiles of 16 output columns, each one
// contiguous stream. Per step along K, one 16-wide load of weights feeds a multiply-add into each row's
// accumulator (the rows' x values broadcast), so up to 8 rows share each weight read from memory; row chunks of 8
// go over a group of tiles while it is in cache. aten's matmul (MKL) at 16 rows of a decode step reached a third of
// the machine's fp32 multiply-add rate on weights read from memory (the 27M model's 33 matrices, 2 threads: 16.7 ms
// a step's matmuls, this kernel 6.4-7.0; at 1 row both this kernel and the C++ GEMM template read at the memory's
// speed).
//
// Registered as torch operators (lmforge::lmforge_q4_mm, lmforge::lmforge_q4_dequant (W in bfloat16, for prompts'
// many rows), lmforge::lmforge_f32_mm) on CPU, and as the C functions aoti_torch_cpu_lmforge_* that AOTInductor
// packages call directly (inference/decode.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;

// x [M, K] float -> int8 blocks (pair order), their scales dx [M, NB] and exact sums sx [M, NB]
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx) {
  const int64_t NB = K / BLOCK;
  for (int64_t m = 0; m < M; m++) {
    for (int64_t b = 0; b < NB; b++) {
      const float* xb = x + m * K + b * BLOCK;
      __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
      float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      dx[m * NB + b] = d;
      sx[m * NB + b] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
      __m512 vid = _mm512_set1_ps(id);
      __m128i qa = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, vid)));  // round to nearest even
      __m128i qc = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(c, vid)));
      int8_t* dst = xq + m * NB * BLOCK + (b / 2) * 2 * BLOCK;
      if (b == NB - 1 && NB % 2) {  // a lone last block: [0:16, 16:32]
        _mm_storeu_si128((__m128i*)dst, qa);
        _mm_storeu_si128((__m128i*)(dst + 16), qc);
      } else {  // [b0 0:16, b1 0:16, b0 16:32, b1 16:32]
        const int64_t half = b % 2;
        _mm_storeu_si128((__m128i*)(dst + half * 16), qa);
        _mm_storeu_si128((__m128i*)(dst + 32 + half * 16), qc);
      }
    }
  }
}

inline float hsum_epi32_256(__m256i d) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return (float)_mm_cvtsi128_si32(s);
}

// the 4 rows of tile t of W against rows [m, m + MB) of x. The loops over rows are unrolled, so that the
// accumulators, unpacked weights and activations stay in registers.
template <int MB>
void tile(const uint8_t* qw, const at::Half* scales, const at::Half* mins, const int8_t* xq, const float* dx,
          const float* sx, float* y, int64_t t, int64_t m, int64_t N, int64_t K) {
  constexpr int R = 4;
  const int64_t NB = K / BLOCK, NP = NB / 2;
  const uint8_t* w = qw + t * 2 * K;
  const at::Half* s = scales + t * R * NB;
  const at::Half* mn = mins + t * R * NB;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i shifts = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);  // low nibbles in the lower half, high in the upper
  // int32 lane l of a pair's dot product sums elements of block (l / 4) % 2; row r's two scales sit at 2r, 2r + 1
  // of the tile's 8 for the pair: spread them over the lanes
  __m512i lanes[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; r++) {
    const int a = 2 * r, b = 2 * r + 1;
    lanes[r] = _mm512_set_epi32(b, b, b, b, a, a, a, a, b, b, b, b, a, a, a, a);
  }
  __m512 acc[MB][R];
#pragma GCC unroll 4
  for (int i = 0; i < MB; i++)
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < NP; p++) {
    // the 4 rows' 8 scales for this pair, times the activations' two block scales: [s0 d0, s1 d1, s2 d0, ...]
    const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + p * R * 2)));
    __m512i xv[MB];
    __m512 sd[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; i++) {
      xv[i] = _mm512_loadu_si512(xq + (m + i) * NB * BLOCK + p * 2 * BLOCK);
      const __m256 d2 = _mm256_castpd_ps(_mm256_broadcast_sd((const double*)(dx + (m + i) * NB + 2 * p)));
      sd[i] = _mm512_castps256_ps512(_mm256_mul_ps(s8, d2));
    }
    _mm_prefetch((const char*)(w + (p + 4) * R * 32), _MM_HINT_T0);
    _mm_prefetch((const char*)(w + (p + 4) * R * 32 + 64), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
      // the pair's 32 bytes in both halves, shifted right by 0 and 4 bits: 64 weights in element order
      __m512i wb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(w + (p * R + r) * 32)));
      __m512i v = _mm512_and_si512(_mm512_srlv_epi64(wb, shifts), low4);
#pragma GCC unroll 4
      for (int i = 0; i < MB; i++) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, xv[i]);
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(lanes[r], sd[i]), acc[i][r]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    const at::Half* mr = mn + r * NB;
    for (int i = 0; i < MB; i++) {
      const float* d = dx + (m + i) * NB;
      const float* sxm = sx + (m + i) * NB;
      float out = _mm512_reduce_add_ps(acc[i][r]);
      if (NB % 2) {  // the lone last block
        const int64_t b = NB - 1;
        __m128i wb = _mm_loadu_si128((const __m128i*)(w + NP * R * 32 + r * 16));
        const __m128i low = _mm_set1_epi8(0x0F);
        __m256i wv = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(wb, low)),
                                             _mm_and_si128(_mm_srli_epi16(wb, 4), low), 1);
        __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv,
                                          _mm256_loadu_si256((const __m256i*)(xq + (m + i) * NB * BLOCK + b * BLOCK)));
        out += (float)s[NP * R * 2 + r] * d[b] * hsum_epi32_256(dot);
      }
      __m512 macc = _mm512_setzero_ps();
      int64_t b = 0;
      for (; b + 16 <= NB; b += 16)
        macc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mr + b))),
                               _mm512_loadu_ps(sxm + b), macc);
      out += _mm512_reduce_add_ps(macc);
      for (; b < NB; b++) out += (float)mr[b] * sxm[b];
      y[(m + i) * N + t * R + r] = out;
    }
  }
}

void tile_rows(const uint8_t* qw, const at::Half* s, const at::Half* mn, const int8_t* xq, const float* dx,
               const float* sx, float* y, int64_t t, int64_t M, int64_t N, int64_t K) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4>(qw, s, mn, xq, dx, sx, y, t, m, N, K);
  switch (M - m) {
    case 3: tile<3>(qw, s, mn, xq, dx, sx, y, t, m, N, K); break;
    case 2: tile<2>(qw, s, mn, xq, dx, sx, y, t, m, N, K); break;
    case 1: tile<1>(qw, s, mn, xq, dx, sx, y, t, m, N, K); break;
    default: break;
  }
}

}  // namespace

at::Tensor lmforge_q4_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& mins) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "lmforge_q4_mm: x [M, K] and qweight [N/4, 2K]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0) * 4;
  TORCH_CHECK(K % BLOCK == 0 && qweight.size(1) == 2 * K, "lmforge_q4_mm: K must be a multiple of 32 and qweight ",
              "[N/4, 2K]; got K ", K, " and qweight ", qweight.sizes());
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf &&
                  mins.scalar_type() == at::kHalf && scales.size(0) == N / 4 && scales.size(1) == 4 * (K / BLOCK) &&
                  mins.sizes() == scales.sizes(),
              "lmforge_q4_mm: qweight uint8 [N/4, 2K], scales and mins float16 [N/4, 4K/32]");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && mins.is_contiguous(),
              "lmforge_q4_mm: packed weights must be contiguous");
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  const int64_t NB = K / BLOCK;
  std::vector<int8_t> xq(M * NB * BLOCK);
  std::vector<float> dx(M * NB), sx(M * NB);
  quantize_rows(xf.data_ptr<float>(), M, K, xq.data(), dx.data(), sx.data());
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* mn = mins.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  // tiles of 4 rows: independent accumulators hide the multiply-add latency, one load of x serves all four
  at::parallel_for(0, N / 4, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) tile_rows(qw, s, mn, xq.data(), dx.data(), sx.data(), yp, t, M, N, K);
  });
  return y;
}

namespace {

// 16 floats -> 16 bfloat16, rounding to nearest even (no AVX512-BF16 needed)
inline __m256i to_bf16(__m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}

// 16 weights q (uint8 0..15 in a 128-bit lane) * scale + min -> bfloat16 at dst
inline void dequant16(__m128i q, float scale, float min, at::BFloat16* dst) {
  __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), _mm512_set1_ps(scale), _mm512_set1_ps(min));
  _mm256_storeu_si256((__m256i*)dst, to_bf16(w));
}

}  // namespace

// W [N, K] in bfloat16 from the packed layout: for prompts, whose many rows go faster through a bf16 GEMM
at::Tensor lmforge_q4_dequant(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
                  scales.is_contiguous() && mins.is_contiguous(),
              "lmforge_q4_dequant: qweight uint8 [N/4, 2K], scales and mins float16 [N/4, 4K/32]");
  const int64_t N = qweight.size(0) * 4, K = qweight.size(1) / 2, NB = K / BLOCK, NP = NB / 2;
  at::Tensor out = at::empty({N, K}, qweight.options().dtype(at::kBFloat16));
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const at::Half* sc = scales.data_ptr<at::Half>();
  const at::Half* mn = mins.data_ptr<at::Half>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  at::parallel_for(0, N / 4, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const uint8_t* w = qw + t * 2 * K;
      const at::Half* s = sc + t * 4 * NB;
      const at::Half* m = mn + t * 4 * NB;
      for (int64_t p = 0; p < NP; p++) {
        for (int r = 0; r < 4; r++) {
          __m256i wb = _mm256_loadu_si256((const __m256i*)(w + (p * 4 + r) * 32));
          __m256i lo = _mm256_and_si256(wb, low4), hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), low4);
          at::BFloat16* row = o + (t * 4 + r) * K + p * 2 * BLOCK;
          const int64_t b0 = 2 * p, b1 = 2 * p + 1;
          const float s0 = s[(p * 4 + r) * 2], s1 = s[(p * 4 + r) * 2 + 1];
          const float m0 = m[r * NB + b0], m1 = m[r * NB + b1];
          dequant16(_mm256_castsi256_si128(lo), s0, m0, row);               // block b0, elements 0-15
          dequant16(_mm256_castsi256_si128(hi), s0, m0, row + 16);          // block b0, elements 16-31
          dequant16(_mm256_extracti128_si256(lo, 1), s1, m1, row + 32);     // block b1, elements 0-15
          dequant16(_mm256_extracti128_si256(hi, 1), s1, m1, row + 48);     // block b1, elements 16-31
        }
      }
      if (NB % 2) {
        for (int r = 0; r < 4; r++) {
          __m128i wb = _mm_loadu_si128((const __m128i*)(w + NP * 4 * 32 + r * 16));
          const __m128i low = _mm_set1_epi8(0x0F);
          const float sb = s[NP * 4 * 2 + r], mb = m[r * NB + NB - 1];
          at::BFloat16* row = o + (t * 4 + r) * K + (NB - 1) * BLOCK;
          dequant16(_mm_and_si128(wb, low), sb, mb, row);
          dequant16(_mm_and_si128(_mm_srli_epi16(wb, 4), low), sb, mb, row + 16);
        }
      }
    }
  });
  return out;
}


// ---- fp32 -----------------------------------------------------------------------------------------------------

namespace {

constexpr int64_t COLS = 16;  // output columns per tile: one 512-bit vector of fp32
constexpr int64_t ROW_CHUNK = 8;  // rows per pass over a tile (8 rows x 2 tiles = 16 accumulators in registers)
constexpr int64_t TILE_GROUP = 4;  // tiles per task: each row chunk goes over them while they are in cache

// T tiles (each [K, 16], contiguous) times MB rows of x, given transposed (xt [K, MB]); y rows are ldy apart
template <int MB, int T>
inline void f32_tiles(const float* w, const float* xt, float* y, int64_t ldy, int64_t K) {
  __m512 acc[T][MB];
#pragma GCC unroll 8
  for (int j = 0; j < T; j++)
#pragma GCC unroll 8
    for (int i = 0; i < MB; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
#pragma GCC unroll 8
    for (int j = 0; j < T; j++) {
      const float* wk = w + j * K * COLS + k * COLS;
      _mm_prefetch((const char*)(wk + 8 * COLS), _MM_HINT_T0);
      const __m512 wv = _mm512_loadu_ps(wk);
#pragma GCC unroll 8
      for (int i = 0; i < MB; i++) acc[j][i] = _mm512_fmadd_ps(_mm512_set1_ps(xt[k * MB + i]), wv, acc[j][i]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < T; j++)
#pragma GCC unroll 8
    for (int i = 0; i < MB; i++) _mm512_storeu_ps(y + i * ldy + j * COLS, acc[j][i]);
}

// MB rows over `tiles` consecutive tiles: 2 at a time (4 for up to 4 rows), so that enough independent
// accumulators hide the multiply-add latency
template <int MB>
void f32_row_chunk(const float* w, const float* xt, float* y, int64_t ldy, int64_t K, int64_t tiles) {
  constexpr int T = MB >= 5 ? 2 : 4;
  int64_t j = 0;
  for (; j + T <= tiles; j += T) f32_tiles<MB, T>(w + j * K * COLS, xt, y + j * COLS, ldy, K);
  for (; j < tiles; j++) f32_tiles<MB, 1>(w + j * K * COLS, xt, y + j * COLS, ldy, K);
}

void f32_rows(int64_t rows, const float* w, const float* xt, float* y, int64_t ldy, int64_t K, int64_t tiles) {
  switch (rows) {
    case 1: f32_row_chunk<1>(w, xt, y, ldy, K, tiles); break;
    case 2: f32_row_chunk<2>(w, xt, y, ldy, K, tiles); break;
    case 3: f32_row_chunk<3>(w, xt, y, ldy, K, tiles); break;
    case 4: f32_row_chunk<4>(w, xt, y, ldy, K, tiles); break;
    case 5: f32_row_chunk<5>(w, xt, y, ldy, K, tiles); break;
    case 6: f32_row_chunk<6>(w, xt, y, ldy, K, tiles); break;
    case 7: f32_row_chunk<7>(w, xt, y, ldy, K, tiles); break;
    case 8: f32_row_chunk<8>(w, xt, y, ldy, K, tiles); break;
    default: break;
  }
}

}  // namespace

at::Tensor lmforge_f32_mm(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == COLS && packed.size(1) == x.size(1),
              "lmforge_f32_mm: x [M, K] and packed weights [N/16, K, 16]; got ", x.sizes(), " and ", packed.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat && packed.is_contiguous(),
              "lmforge_f32_mm: float32 x and contiguous float32 packed weights");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = tiles * COLS;
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* w = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> xt(M * K);  // each chunk of rows transposed to [K, rows]: one load per step broadcasts them
  for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
    const int64_t mb = std::min(ROW_CHUNK, M - m0);
    for (int64_t k = 0; k < K; k++)
      for (int64_t i = 0; i < mb; i++) xt[m0 * K + k * mb + i] = xp[(m0 + i) * K + k];
  }
  at::parallel_for(0, (tiles + TILE_GROUP - 1) / TILE_GROUP, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
      const int64_t t = g * TILE_GROUP, nt = std::min(TILE_GROUP, tiles - t);
      for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK)
        f32_rows(std::min(ROW_CHUNK, M - m0), w + t * K * COLS, xt.data() + m0 * K, yp + m0 * N + t * COLS, N, K, nt);
    }
  });
  return y;
}

TORCH_LIBRARY(lmforge, m) {
  m.def("lmforge_q4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("lmforge_q4_dequant(Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("lmforge_f32_mm(Tensor x, Tensor packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("lmforge_q4_mm", &lmforge_q4_mm);
  m.impl("lmforge_q4_dequant", &lmforge_q4_dequant);
  m.impl("lmforge_f32_mm", &lmforge_f32_mm);
}

// The C functions AOTInductor calls (config aot_inductor.custom_ops_to_c_shims): no dispatcher on the way.
extern "C" AOTITorchError aoti_torch_cpu_lmforge_q4_dequant(AtenTensorHandle qweight, AtenTensorHandle scales,
                                                            AtenTensorHandle mins, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor w = lmforge_q4_dequant(*tensor_handle_to_tensor_pointer(qweight), *tensor_handle_to_tensor_pointer(scales),
                                      *tensor_handle_to_tensor_pointer(mins));
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(w));
  });
}

extern "C" AOTITorchError aoti_torch_cpu_lmforge_q4_mm(AtenTensorHandle x, AtenTensorHandle qweight,
                                                       AtenTensorHandle scales, AtenTensorHandle mins,
                                                       AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor y = lmforge_q4_mm(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(qweight),
                                 *tensor_handle_to_tensor_pointer(scales), *tensor_handle_to_tensor_pointer(mins));
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(y));
  });
}

extern "C" AOTITorchError aoti_torch_cpu_lmforge_f32_mm(AtenTensorHandle x, AtenTensorHandle packed,
                                                        AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor y = lmforge_f32_mm(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(packed));
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(y));
  });
}
