// lmforge's own kernels for decode (a few rows) and training's loss on CPUs with AVX512 (-VNNI), built on first
// use by cpu_kernels.py:
//   lmforge_q4_mm             int4 weights (llama.cpp's q4_1 blocks) times int8-rounded activations, integer dot
//                             products (and lmforge_q4_dequant: the weights in bf16, for calls of many rows)
//   lmforge_f32_mm            fp32 weights packed in column tiles, for 1-16 rows of fp32 activations
//   lmforge_decode_attention  one query per row over the KV cache (section 3)
//   lmforge_xent_grad_        training's loss: cross-entropy and its gradient from the logits in one pass (section 4)
//   lmforge_attn_softmax      training attention's scaled, masked softmax of bf16 scores, and its backward (5)
//   lmforge_rms_norm          RMSNorm for eager training, output in bf16, and its backward (6)
//   lmforge_swiglu            silu(gate) * up for eager training in bf16, and its backward (7)
//   lmforge_rope              rotate-half RoPE of bf16 queries or keys for eager training, and its backward (8)
//
// 1. int4: the matmul for few rows (decode) on CPUs with AVX512-VNNI: y [M, N] = x [M, K] @ W^T, W in blocks
// of 32 weights along K, w = q * scale + min with q in 0..15 (one scale and one min per block, float16).
//
// As llama.cpp's q4 x q8 dot products: each block of x is rounded to int8 with a scale of its own (dx = max|x|/127),
// so a block's sum of products is integer dot products, `vpdpbusd` (4 u8 x s8 products per int32 lane);
// torch's int4 kernels dequantize every weight to float and multiply-add in fp32, about 2x the instructions.
//   y[m, n] = sum_b scale[n, b] * dx[m, b] * sum_j q[n, b, j] * xq[m, b, j]  +  sum_b min[n, b] * sum_j x[m, b, j]
//
// Layout (lmforge/model/quantize.py packs it): rows of W in tiles of 16, interleaved so that int32 lane r of a
// vector is row r of the tile (llama.cpp's repacked q4_0 GEMV does the same with 8 rows): a block's dot products
// then need no horizontal sums and its 16 rows' scales are one contiguous load. Each tile is one contiguous stream,
// so a decode step reads its weights from memory front to back.
//   qweight [N/16, 8K] uint8: per tile, per block b, 4 chunks c of 64 bytes; in chunk c, row r's 4 bytes j are
//       q[r, 32 b + 8 c + j] | q[r, 32 b + 8 c + 4 + j] << 4 (low nibbles: 4 weights, high: the next 4)
//   scales, mins [N/16, 16 K/32] float16: per tile, per block, the 16 rows'
// The low nibbles of a chunk against x's 4 int8 values at 8 c (broadcast to every lane) and the high nibbles
// against those at 8 c + 4 are two vpdpbusd; a block is 8, summed in int32, then one multiply-add by its scales.
// Against the earlier layout (tiles of 4 rows, two blocks per vector, whose lanes mixed the blocks so that every
// row's scales were permuted into place): the 0.5B shape's 97 matrices, 2 threads, 1 row 11.5-11.9 ms both (read
// at the memory's speed), 4 rows 13.4 against 26.1 ms, 16 rows 33.8 against 100.7.
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
constexpr int64_t TILE = 16;  // rows of W per tile: one int32 lane each

// x [M, K] float -> int8 xq [M, K] (per block of 32: dx = max|x| / 127), the scales dx [M, NB] and the exact block
// sums sx [M, NB] (for the min term)
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
      int8_t* dst = xq + m * K + b * BLOCK;  // round to nearest even, as torch.round
      _mm_storeu_si128((__m128i*)dst, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, vid))));
      _mm_storeu_si128((__m128i*)(dst + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(c, vid))));
    }
  }
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// tile t of W (16 rows) against rows [m, m + MB) of x. The loops over rows are unrolled, so that the
// accumulators stay in registers; low and high nibbles accumulate apart (two dependency chains a row).
template <int MB>
void tile(const uint8_t* qw, const at::Half* scales, const at::Half* mins, const int8_t* xq, const float* dx,
          const float* sx, float* y, int64_t t, int64_t m, int64_t N, int64_t K) {
  const int64_t NB = K / BLOCK;
  const uint8_t* w = qw + t * 8 * K;
  const at::Half* s = scales + t * TILE * NB;
  const at::Half* mn = mins + t * TILE * NB;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MB], macc[MB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; i++) acc[i] = macc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB; b++) {
    const uint8_t* wb = w + b * 256;
    _mm_prefetch((const char*)(wb + 1024), _MM_HINT_T0);
    _mm_prefetch((const char*)(wb + 1024 + 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(wb + 1024 + 128), _MM_HINT_T0);
    _mm_prefetch((const char*)(wb + 1024 + 192), _MM_HINT_T0);
    __m512i lo_dot[MB], hi_dot[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; i++) lo_dot[i] = hi_dot[i] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) {
      const __m512i v = _mm512_loadu_si512(wb + c * 64);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
#pragma GCC unroll 4
      for (int i = 0; i < MB; i++) {
        const int8_t* xb = xq + (m + i) * K + b * BLOCK + c * 8;
        lo_dot[i] = _mm512_dpbusd_epi32(lo_dot[i], lo, broadcast4(xb));
        hi_dot[i] = _mm512_dpbusd_epi32(hi_dot[i], hi, broadcast4(xb + 4));
      }
    }
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + b * TILE)));
    const __m512 mi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mn + b * TILE)));
#pragma GCC unroll 4
    for (int i = 0; i < MB; i++) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_dot[i], hi_dot[i]));
      acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sc, _mm512_set1_ps(dx[(m + i) * NB + b])), acc[i]);
      macc[i] = _mm512_fmadd_ps(mi, _mm512_set1_ps(sx[(m + i) * NB + b]), macc[i]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; i++) _mm512_storeu_ps(y + (m + i) * N + t * TILE, _mm512_add_ps(acc[i], macc[i]));
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

void check_packed(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, int64_t K,
                  const char* op) {
  TORCH_CHECK(qweight.dim() == 2 && K % BLOCK == 0 && qweight.size(1) == 8 * K, op, ": K must be a multiple of 32 ",
              "and qweight [N/16, 8K]; got K ", K, " and qweight ", qweight.sizes());
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf &&
                  mins.scalar_type() == at::kHalf && scales.dim() == 2 && scales.size(0) == qweight.size(0) &&
                  scales.size(1) == TILE * (K / BLOCK) && mins.sizes() == scales.sizes(),
              op, ": qweight uint8 [N/16, 8K], scales and mins float16 [N/16, 16K/32]");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && mins.is_contiguous(), op,
              ": packed weights must be contiguous");
}

}  // namespace

at::Tensor lmforge_q4_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& mins) {
  TORCH_CHECK(x.dim() == 2, "lmforge_q4_mm: x [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0) * TILE;
  check_packed(qweight, scales, mins, K, "lmforge_q4_mm");
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  const int64_t NB = K / BLOCK;
  std::vector<int8_t> xq(M * K);
  std::vector<float> dx(M * NB), sx(M * NB);
  quantize_rows(xf.data_ptr<float>(), M, K, xq.data(), dx.data(), sx.data());
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* mn = mins.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / TILE, 1, [&](int64_t t0, int64_t t1) {
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

// 16 weights q (uint8 0..15) * scale + min -> bfloat16 at dst
inline void dequant16(__m128i q, float scale, float min, at::BFloat16* dst) {
  __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), _mm512_set1_ps(scale), _mm512_set1_ps(min));
  _mm256_storeu_si256((__m256i*)dst, to_bf16(w));
}

}  // namespace

// W [N, K] in bfloat16 from the packed layout: for prompts, whose many rows go faster through a bf16 GEMM
at::Tensor lmforge_q4_dequant(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins) {
  TORCH_CHECK(qweight.dim() == 2, "lmforge_q4_dequant: qweight [N/16, 8K]");
  const int64_t N = qweight.size(0) * TILE, K = qweight.size(1) / 8, NB = K / BLOCK;
  check_packed(qweight, scales, mins, K, "lmforge_q4_dequant");
  at::Tensor out = at::empty({N, K}, qweight.options().dtype(at::kBFloat16));
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const at::Half* sc = scales.data_ptr<at::Half>();
  const at::Half* mn = mins.data_ptr<at::Half>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  at::parallel_for(0, N / TILE, 4, [&](int64_t t0, int64_t t1) {
    alignas(64) uint8_t q[TILE][BLOCK];  // one block of the tile's 16 rows, in element order
    alignas(64) uint64_t u[2][8];
    for (int64_t t = t0; t < t1; t++) {
      for (int64_t b = 0; b < NB; b++) {
        const uint8_t* wb = qw + t * 8 * K + b * 256;
        for (int c = 0; c < 4; c++) {
          const __m512i v = _mm512_loadu_si512(wb + c * 64);
          const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          // per 128-bit lane g (rows 4g..4g+3): unpacklo gives rows 4g, 4g+1 as [4 low, 4 high] = 8 weights in
          // order each; unpackhi rows 4g+2, 4g+3
          _mm512_store_si512(u[0], _mm512_unpacklo_epi32(lo, hi));
          _mm512_store_si512(u[1], _mm512_unpackhi_epi32(lo, hi));
          for (int g = 0; g < 4; g++) {
            std::memcpy(&q[4 * g][8 * c], &u[0][2 * g], 8);
            std::memcpy(&q[4 * g + 1][8 * c], &u[0][2 * g + 1], 8);
            std::memcpy(&q[4 * g + 2][8 * c], &u[1][2 * g], 8);
            std::memcpy(&q[4 * g + 3][8 * c], &u[1][2 * g + 1], 8);
          }
        }
        for (int r = 0; r < TILE; r++) {
          const float s = sc[(t * NB + b) * TILE + r], m = mn[(t * NB + b) * TILE + r];
          at::BFloat16* row = o + (t * TILE + r) * K + b * BLOCK;
          dequant16(_mm_load_si128((const __m128i*)q[r]), s, m, row);
          dequant16(_mm_load_si128((const __m128i*)(q[r] + 16)), s, m, row + 16);
        }
      }
    }
  });
  return out;
}

// ---- 2. fp32 --------------------------------------------------------------------------------------------------

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

// ---- 3. decode attention ---------------------------------------------------------------------------------------

namespace {

// e^x for x <= 0 (scores minus their maximum): 2^(x log2 e) with a degree-6 polynomial for 2^f, f in [-0.5, 0.5]
// (relative error ~1e-7), the integer part through scalef
inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace

// out [B, H, D] = softmax(q k^T / sqrt(D), masked) v for one query per row: q [B, H, D], k and v [B, KV, L, D]
// (any strides but a contiguous last dimension: views of the KV cache), mask [B, L] bool (True = attend). Each
// group of H/KV query heads attends with its kv head: a task per (row, kv head) reads that head's keys and values
// once for the whole group.
at::Tensor lmforge_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes() && mask.dim() == 2,
              "lmforge_decode_attention: q [B, H, D], k and v [B, KV, L, D], mask [B, L]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && H % KV == 0 && D % 16 == 0 && mask.size(0) == B &&
                  mask.size(1) == L && L > 0,
              "lmforge_decode_attention: shapes q ", q.sizes(), " k ", k.sizes(), " mask ", mask.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  mask.scalar_type() == at::kBool && k.stride(3) == 1 && v.stride(3) == 1,
              "lmforge_decode_attention: float32 q, k, v (last dimension contiguous) and a bool mask");
  const at::Tensor qc = q.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty({B, H, D}, q.options());
  const int64_t G = H / KV, DV = D / 16;
  const float scale = 1.0f / std::sqrt((float)D);
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mc.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(G * L);
    std::vector<int64_t> keep(L);
    for (int64_t task = t0; task < t1; task++) {
      const int64_t b = task / KV, h = task % KV;
      const float* kb = kp + b * k.stride(0) + h * k.stride(1);
      const float* vb = vp + b * v.stride(0) + h * v.stride(1);
      const float* qb = qp + (b * H + h * G) * D;
      int64_t n = 0;  // the attended positions
      for (int64_t l = 0; l < L; l++)
        if (mp[b * L + l]) keep[n++] = l;
      float* ob = op + (b * H + h * G) * D;
      if (n == 0) {  // nothing to attend to (a padding row): zeros, where softmax over -inf gives NaN
        std::fill(ob, ob + G * D, 0.0f);
        continue;
      }
      // scores: each key row read once for the G query heads
      for (int64_t i = 0; i < n; i++) {
        const float* kr = kb + keep[i] * k.stride(2);
        for (int64_t g = 0; g < G; g++) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t d = 0; d < DV; d++)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(qb + g * D + d * 16), _mm512_loadu_ps(kr + d * 16), acc);
          s[g * L + i] = _mm512_reduce_add_ps(acc) * scale;
        }
      }
      // softmax per query head, vectorized over positions
      for (int64_t g = 0; g < G; g++) {
        float* sg = s.data() + g * L;
        float mx = -INFINITY;
        for (int64_t i = 0; i < n; i++) mx = std::max(mx, sg[i]);
        const __m512 vmx = _mm512_set1_ps(mx);
        __m512 vsum = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
          const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sg + i), vmx));
          _mm512_storeu_ps(sg + i, e);
          vsum = _mm512_add_ps(vsum, e);
        }
        if (i < n) {
          const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
          const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + i), vmx));
          _mm512_mask_storeu_ps(sg + i, m, e);
          vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
        for (int64_t j = 0; j < n; j++) sg[j] *= inv;
      }
      // out[g] = sum_i p[g, i] v[i]: each value row read once for the G heads, D/16 accumulators a head
      for (int64_t g0 = 0; g0 < G; g0 += 4) {
        const int64_t gn = std::min<int64_t>(4, G - g0);
        for (int64_t d0 = 0; d0 < DV; d0 += 4) {
          const int64_t dn = std::min<int64_t>(4, DV - d0);
          __m512 acc[4][4];
          for (int gi = 0; gi < 4; gi++)
            for (int di = 0; di < 4; di++) acc[gi][di] = _mm512_setzero_ps();
          for (int64_t i = 0; i < n; i++) {
            const float* vr = vb + keep[i] * v.stride(2) + d0 * 16;
            for (int64_t gi = 0; gi < gn; gi++) {
              const __m512 p = _mm512_set1_ps(s[(g0 + gi) * L + i]);
              for (int64_t di = 0; di < dn; di++)
                acc[gi][di] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + di * 16), acc[gi][di]);
            }
          }
          for (int64_t gi = 0; gi < gn; gi++)
            for (int64_t di = 0; di < dn; di++) _mm512_storeu_ps(ob + (g0 + gi) * D + (d0 + di) * 16, acc[gi][di]);
        }
      }
    }
  });
  return out;
}

// ---- 4. the loss: softmax cross-entropy and its gradient in one pass over the logits ---------------------------

namespace {

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store16(float* p, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(p, m, x); }
inline void store16(at::BFloat16* p, __m512 x, __mmask16 m) {  // round to nearest even (no NaNs here)
  const __m512i i = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(i, _mm512_set1_epi32(0x7fff)), lsb), 16);
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
inline __mmask16 tail(int64_t i, int64_t V) {
  return V - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (V - i)) - 1);
}

template <typename T>
void xent_rows(T* logits, const int64_t* targets, float* loss, int64_t N, int64_t V, int64_t ignore_index) {
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      T* x = logits + r * V;
      const int64_t t = targets[r];
      if (t == ignore_index) {  // no loss, no gradient
        for (int64_t i = 0; i < V; i += 16) store16(x + i, _mm512_setzero_ps(), tail(i, V));
        loss[r] = 0.0f;
        continue;
      }
      __m512 vmx = _mm512_set1_ps(-INFINITY);
      for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 m = tail(i, V);
        vmx = _mm512_mask_max_ps(vmx, m, vmx, load16(x + i, m));
      }
      const float mx = _mm512_reduce_max_ps(vmx);
      vmx = _mm512_set1_ps(mx);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 m = tail(i, V);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, exp_neg(_mm512_sub_ps(load16(x + i, m), vmx))));
      }
      const float sum = _mm512_reduce_add_ps(vsum);
      const float xt = static_cast<float>(x[t]);
      loss[r] = mx + std::log(sum) - xt;
      const __m512 inv = _mm512_set1_ps(1.0f / sum);
      for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 m = tail(i, V);
        store16(x + i, _mm512_mul_ps(exp_neg(_mm512_sub_ps(load16(x + i, m), vmx)), inv), m);
      }
      x[t] = static_cast<T>(std::exp(xt - mx) / sum - 1.0f);
    }
  });
}

}  // namespace

// Cross-entropy of logits [N, V] (bfloat16 or float32, contiguous) against targets [N] (int64):
// returns each row's loss, log-sum-exp minus the target's logit (float32 [N]; 0 where the target is
// ignore_index), and overwrites the logits with the loss's gradient, softmax - onehot (0 on ignored rows), in
// their own dtype. One task per block of rows; each row is read three times from cache (maximum, sum of
// exponentials, gradient), where the unfused path (log_softmax to fp32, exp, subtract, cast back) streamed
// [N, V] fp32 tensors through memory four times.
at::Tensor lmforge_xent_grad_(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && targets.dim() == 1 &&
                  targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong,
              "lmforge_xent_grad_: logits [N, V] contiguous, targets [N] int64");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "lmforge_xent_grad_: logits must be float32 or bfloat16");
  const int64_t N = logits.size(0), V = logits.size(1);
  const at::Tensor tc = targets.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; r++)
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < V), "lmforge_xent_grad_: target ", tp[r],
                " outside the vocabulary of ", V);
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  if (logits.scalar_type() == at::kFloat)
    xent_rows(logits.data_ptr<float>(), tp, loss.data_ptr<float>(), N, V, ignore_index);
  else
    xent_rows(logits.data_ptr<at::BFloat16>(), tp, loss.data_ptr<float>(), N, V, ignore_index);
  return loss;
}

// ---- 5. training attention's softmax: bf16 scores to bf16 probabilities in one pass per row, and back -------

namespace {

// which of keys [j, j + 16) a row attends to: the first n (causal: up to its own position), and where a mask row is
// given, those it allows
inline __mmask16 attends(const bool* mrow, int64_t j, int64_t n) {
  __mmask16 m = tail(j, n);
  if (mrow != nullptr)
    m &= _mm_cmpneq_epi8_mask(_mm_maskz_loadu_epi8(m, mrow + j), _mm_setzero_si128());
  return m;
}

}  // namespace

// p = softmax(scale * s) over each row's attended keys, 0 elsewhere (and on rows that attend to none):
// s [B, X, T, L] bfloat16 contiguous (X heads of T queries over L keys), mask [Bm, T, L] bool (Bm 1 or B; True =
// attend) or none, causal: the T queries are the last T of the L positions, each attending up to its own. Each row
// is read once from memory and worked on in an fp32 buffer in cache (maximum, exponentials and their sum, scaled
// store), with the keys past a causal row's position skipped; unfused, the fp32 copy, the scaling, the mask, the
// softmax and the cast back each streamed the [B, X, T, L] scores through memory.
at::Tensor lmforge_attn_softmax(const at::Tensor& s, const c10::optional<at::Tensor>& mask, bool causal,
                                double scale) {
  TORCH_CHECK(s.dim() == 4 && s.is_contiguous() && s.scalar_type() == at::kBFloat16,
              "lmforge_attn_softmax: scores [B, X, T, L] bfloat16, contiguous");
  const int64_t B = s.size(0), X = s.size(1), T = s.size(2), L = s.size(3);
  TORCH_CHECK(L >= T || !causal, "lmforge_attn_softmax: causal needs at least as many keys as queries");
  at::Tensor mc;
  const bool* mp = nullptr;
  int64_t Bm = 0;
  if (mask.has_value() && mask->defined()) {
    mc = mask->contiguous();
    TORCH_CHECK(mc.scalar_type() == at::kBool && mc.dim() == 3 && mc.size(1) == T && mc.size(2) == L &&
                    (mc.size(0) == 1 || mc.size(0) == B),
                "lmforge_attn_softmax: mask [1 or B, T, L] bool");
    mp = mc.data_ptr<bool>();
    Bm = mc.size(0);
  }
  at::Tensor p = at::empty_like(s);
  const at::BFloat16* sp = s.data_ptr<at::BFloat16>();
  at::BFloat16* pp = p.data_ptr<at::BFloat16>();
  const float sc = static_cast<float>(scale);
  const int64_t L16 = (L + 15) / 16 * 16;
  at::parallel_for(0, B * X * T, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(L16);
    for (int64_t r = r0; r < r1; r++) {
      const int64_t t = r % T, b = r / (X * T);
      const int64_t n = causal ? t + (L - T) + 1 : L;
      const bool* mrow = mp == nullptr ? nullptr : mp + ((Bm == 1 ? 0 : b) * T + t) * L;
      const at::BFloat16* x = sp + r * L;
      at::BFloat16* y = pp + r * L;
      __m512 vmx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = attends(mrow, j, n);
        const __m512 v = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m,
                                            _mm512_mul_ps(load16(x + j, m), _mm512_set1_ps(sc)));
        _mm512_storeu_ps(buf.data() + j, v);
        vmx = _mm512_max_ps(vmx, v);
      }
      const float mx = _mm512_reduce_max_ps(vmx);
      if (mx == -INFINITY) {  // attends to nothing
        for (int64_t j = 0; j < L; j += 16) store16(y + j, _mm512_setzero_ps(), tail(j, L));
        continue;
      }
      vmx = _mm512_set1_ps(mx);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = attends(mrow, j, n);
        const __m512 e = _mm512_maskz_mov_ps(m, exp_neg(_mm512_sub_ps(_mm512_loadu_ps(buf.data() + j), vmx)));
        _mm512_storeu_ps(buf.data() + j, e);
        vsum = _mm512_add_ps(vsum, e);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
      for (int64_t j = 0; j < L; j += 16) {
        const __m512 v = j < n ? _mm512_mul_ps(_mm512_loadu_ps(buf.data() + j), inv) : _mm512_setzero_ps();
        store16(y + j, v, tail(j, L));
      }
    }
  });
  return p;
}

// The gradient of the scores from that of the probabilities: ds = scale * p * (dp - sum_j p dp), per row (p and dp
// [..., L] bfloat16 contiguous, ds in bfloat16); rows attending to nothing have p = 0, so ds = 0.
at::Tensor lmforge_attn_softmax_backward(const at::Tensor& p, const at::Tensor& dp, double scale) {
  TORCH_CHECK(p.scalar_type() == at::kBFloat16 && dp.scalar_type() == at::kBFloat16 && p.sizes() == dp.sizes() &&
                  p.dim() >= 1,
              "lmforge_attn_softmax_backward: p and dp of one shape, bfloat16");
  const at::Tensor pc = p.contiguous(), dc = dp.contiguous();
  at::Tensor ds = at::empty_like(pc);
  const int64_t L = pc.size(-1), R = L == 0 ? 0 : pc.numel() / L;
  const at::BFloat16* pp = pc.data_ptr<at::BFloat16>();
  const at::BFloat16* dpp = dc.data_ptr<at::BFloat16>();
  at::BFloat16* out = ds.data_ptr<at::BFloat16>();
  const __m512 vsc = _mm512_set1_ps(static_cast<float>(scale));
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const at::BFloat16* a = pp + r * L;
      const at::BFloat16* g = dpp + r * L;
      __m512 vdot = _mm512_setzero_ps();
      for (int64_t j = 0; j < L; j += 16) {
        const __mmask16 m = tail(j, L);
        vdot = _mm512_fmadd_ps(load16(a + j, m), load16(g + j, m), vdot);
      }
      const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(vdot));
      for (int64_t j = 0; j < L; j += 16) {
        const __mmask16 m = tail(j, L);
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(load16(a + j, m), vsc), _mm512_sub_ps(load16(g + j, m), dot));
        store16(out + r * L + j, v, m);
      }
    }
  });
  return ds;
}

// ---- 6. RMSNorm for eager training: the norm in one pass per row, its output in bf16, and its backward -------

// y = weight * x / sqrt(mean(x^2) + eps) per row of x [N, C] (float32, contiguous), weight [C] float32; y in
// bfloat16 (what autocast would round it to for the matmuls it feeds) or float32; also returns 1 / rms per row
// (float32 [N]) for the backward. Unfused, the square, mean, rsqrt, two products and autocast's cast of the
// output for each projection that reads it streamed [N, C] fp32 tensors through memory.
std::tuple<at::Tensor, at::Tensor> lmforge_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                    bool bf16) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && weight.dim() == 1 &&
                  weight.size(0) == x.size(1) && weight.scalar_type() == at::kFloat,
              "lmforge_rms_norm: x [N, C] float32 contiguous, weight [C] float32");
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor y = at::empty({N, C}, x.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  at::Tensor rstd = at::empty({N}, x.options());
  const at::Tensor wc = weight.contiguous();
  const float* xp = x.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::BFloat16* yb = bf16 ? y.data_ptr<at::BFloat16>() : nullptr;
  float* yf = bf16 ? nullptr : y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* a = xp + r * C;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t j = 0; j < C; j += 16) {
        const __m512 v = load16(a + j, tail(j, C));
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(C) + e);
      rp[r] = inv;
      const __m512 vinv = _mm512_set1_ps(inv);
      for (int64_t j = 0; j < C; j += 16) {
        const __mmask16 m = tail(j, C);
        const __m512 v = _mm512_mul_ps(load16(wp + j, m), _mm512_mul_ps(load16(a + j, m), vinv));
        if (bf16)
          store16(yb + r * C + j, v, m);
        else
          store16(yf + r * C + j, v, m);
      }
    }
  });
  return {y, rstd};
}

namespace {

// dx for rows [r0, r1), and those rows' sum of dy * x * rstd into dw_part (C floats) when dw_part is not null
template <typename G>
void rms_norm_rows_backward(const G* dy, const float* x, const float* w, const float* rstd, float* dx,
                            float* dw_part, int64_t r0, int64_t r1, int64_t C) {
  for (int64_t r = r0; r < r1; r++) {
    const G* g = dy + r * C;
    const float* a = x + r * C;
    const __m512 vr = _mm512_set1_ps(rstd[r]);
    __m512 dot = _mm512_setzero_ps();  // sum of (dy * w) * (x * rstd)
    for (int64_t j = 0; j < C; j += 16) {
      const __mmask16 m = tail(j, C);
      const __m512 xh = _mm512_mul_ps(load16(a + j, m), vr);
      dot = _mm512_fmadd_ps(_mm512_mul_ps(load16(g + j, m), load16(w + j, m)), xh, dot);
    }
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / static_cast<float>(C));
    for (int64_t j = 0; j < C; j += 16) {
      const __mmask16 m = tail(j, C);
      const __m512 xh = _mm512_mul_ps(load16(a + j, m), vr);
      const __m512 gy = load16(g + j, m);
      // dx = rstd * (dy * w - xh * mean(dy * w * xh))
      const __m512 d = _mm512_mul_ps(vr, _mm512_fnmadd_ps(xh, mean, _mm512_mul_ps(gy, load16(w + j, m))));
      store16(dx + r * C + j, d, m);
      if (dw_part != nullptr) store16(dw_part + j, _mm512_fmadd_ps(gy, xh, load16(dw_part + j, m)), m);
    }
  }
}

}  // namespace

// The gradients of lmforge_rms_norm: dx [N, C] float32 from dy [N, C] (bfloat16 or float32), and dw [C] float32
// (summed over the rows in float32, a partial sum per thread) when want_dw (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> lmforge_rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& weight, const at::Tensor& rstd,
                                                             bool want_dw) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && dy.sizes() == x.sizes() &&
                  (dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kBFloat16) &&
                  weight.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "lmforge_rms_norm_backward: dy and x [N, C] (x float32), weight and rstd float32");
  const int64_t N = x.size(0), C = x.size(1);
  const at::Tensor g = dy.contiguous(), wc = weight.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));  // a range of rows each
  at::Tensor dw_parts = want_dw ? at::zeros({parts, C}, x.options()) : at::Tensor();
  const int64_t rows = (N + parts - 1) / parts;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
      const int64_t r0 = p * rows, r1 = std::min(N, r0 + rows);
      float* part = want_dw ? dw_parts.data_ptr<float>() + p * C : nullptr;
      if (g.scalar_type() == at::kBFloat16)
        rms_norm_rows_backward(g.data_ptr<at::BFloat16>(), x.data_ptr<float>(), wc.data_ptr<float>(),
                               rc.data_ptr<float>(), dx.data_ptr<float>(), part, r0, r1, C);
      else
        rms_norm_rows_backward(g.data_ptr<float>(), x.data_ptr<float>(), wc.data_ptr<float>(),
                               rc.data_ptr<float>(), dx.data_ptr<float>(), part, r0, r1, C);
    }
  });
  return {dx, want_dw ? dw_parts.sum(0) : at::empty({0}, x.options())};
}

// ---- 7. SwiGLU for eager training: silu(gate) * up of bf16 projections in one pass, and its backward --------

namespace {

// sigmoid(g) = 1 / (1 + e^-g), from e^-|g| so that no exponential overflows
inline __m512 sigmoid16(__m512 g) {
  const __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  return _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), r, e);  // g < 0: e / (1 + e)
}

void check_swiglu(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && a.sizes() == b.sizes() &&
                  a.is_contiguous() && b.is_contiguous(),
              what, ": tensors of one shape, bfloat16, contiguous");
}

}  // namespace

// silu(gate) * up in fp32, rounded once to bfloat16 (gate, up bfloat16 of one shape, contiguous); unfused, silu
// and the product each read and wrote the activations through memory, and silu's exponentials ran scalar-wide.
at::Tensor lmforge_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu(gate, up, "lmforge_swiglu");
  at::Tensor y = at::empty_like(gate);
  const at::BFloat16* g = gate.data_ptr<at::BFloat16>();
  const at::BFloat16* u = up.data_ptr<at::BFloat16>();
  at::BFloat16* out = y.data_ptr<at::BFloat16>();
  const int64_t n = gate.numel();
  at::parallel_for(0, (n + 15) / 16, 256, [&](int64_t v0, int64_t v1) {
    for (int64_t i = v0 * 16; i < std::min(n, v1 * 16); i += 16) {
      const __mmask16 m = tail(i, n);
      const __m512 x = load16(g + i, m);
      store16(out + i, _mm512_mul_ps(_mm512_mul_ps(x, sigmoid16(x)), load16(u + i, m)), m);
    }
  });
  return y;
}

// d gate = dy * up * s (1 + gate (1 - s)) with s = sigmoid(gate), d up = dy * silu(gate); bfloat16 in and out
std::tuple<at::Tensor, at::Tensor> lmforge_swiglu_backward(const at::Tensor& dy, const at::Tensor& gate,
                                                           const at::Tensor& up) {
  check_swiglu(gate, up, "lmforge_swiglu_backward");
  const at::Tensor d = dy.contiguous();
  check_swiglu(d, gate, "lmforge_swiglu_backward");
  at::Tensor dg = at::empty_like(gate), du = at::empty_like(up);
  const at::BFloat16* g = gate.data_ptr<at::BFloat16>();
  const at::BFloat16* u = up.data_ptr<at::BFloat16>();
  const at::BFloat16* dp = d.data_ptr<at::BFloat16>();
  at::BFloat16* dgp = dg.data_ptr<at::BFloat16>();
  at::BFloat16* dup = du.data_ptr<at::BFloat16>();
  const int64_t n = gate.numel();
  const __m512 one = _mm512_set1_ps(1.0f);
  at::parallel_for(0, (n + 15) / 16, 256, [&](int64_t v0, int64_t v1) {
    for (int64_t i = v0 * 16; i < std::min(n, v1 * 16); i += 16) {
      const __mmask16 m = tail(i, n);
      const __m512 x = load16(g + i, m), dy16 = load16(dp + i, m);
      const __m512 sg = sigmoid16(x);
      store16(dup + i, _mm512_mul_ps(dy16, _mm512_mul_ps(x, sg)), m);
      const __m512 dsilu = _mm512_mul_ps(sg, _mm512_fmadd_ps(x, _mm512_sub_ps(one, sg), one));
      store16(dgp + i, _mm512_mul_ps(_mm512_mul_ps(dy16, load16(u + i, m)), dsilu), m);
    }
  });
  return {dg, du};
}

// ---- 8. RoPE for eager training: bf16 queries or keys rotated in one pass, and the backward ------------------

namespace {

// rows of D: y = x * cos + rotate_half(x) * sin (sign -1), or its transpose dx = dy * cos - rotate_half(dy * sin)
// (sign +1, the backward), for each (b, h, t) of x [B, H, T, D] (strides sx, last dimension contiguous), cos and
// sin [Bc, T, D] float32 (Bc 1 or B); out [B, H, T, D] contiguous bfloat16
void rope_rows(const at::BFloat16* x, const int64_t* sx, const float* cos, const float* sin, int64_t Bc,
               at::BFloat16* out, int64_t B, int64_t H, int64_t T, int64_t D, bool backward) {
  const int64_t half = D / 2;
  at::parallel_for(0, B * H * T, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const int64_t t = r % T, h = (r / T) % H, b = r / (T * H);
      const at::BFloat16* a = x + b * sx[0] + h * sx[1] + t * sx[2];
      const float* c = cos + ((Bc == 1 ? 0 : b) * T + t) * D;
      const float* s = sin + ((Bc == 1 ? 0 : b) * T + t) * D;
      at::BFloat16* y = out + r * D;
      for (int64_t j = 0; j < half; j += 16) {
        const __mmask16 m = tail(j, half);
        const __m512 x1 = load16(a + j, m), x2 = load16(a + half + j, m);
        const __m512 c1 = load16(c + j, m), c2 = load16(c + half + j, m);
        const __m512 s1 = load16(s + j, m), s2 = load16(s + half + j, m);
        if (!backward) {  // y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
          store16(y + j, _mm512_fnmadd_ps(x2, s1, _mm512_mul_ps(x1, c1)), m);
          store16(y + half + j, _mm512_fmadd_ps(x1, s2, _mm512_mul_ps(x2, c2)), m);
        } else {  // dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
          store16(y + j, _mm512_fmadd_ps(x2, s2, _mm512_mul_ps(x1, c1)), m);
          store16(y + half + j, _mm512_fnmadd_ps(x1, s1, _mm512_mul_ps(x2, c2)), m);
        }
      }
    }
  });
}

}  // namespace

// x [B, H, T, D] bfloat16 (any strides but a contiguous last dimension: the heads' view of a projection's output)
// rotated by cos and sin [1 or B, T, D] float32 as Llama's rotate-half RoPE does, computed in fp32 and rounded
// once to bfloat16, contiguous (what the attention matmuls read); backward: the gradient of that map, for dy in
// place of x. Unfused: two products with fp32 tables (so an fp32 result), the halves' copies, a negation, a
// concatenation and the sum, each through memory, and autocast's cast back for the matmuls.
at::Tensor lmforge_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "lmforge_rope: x [B, H, T, D] bfloat16 with a contiguous last dimension and an even D");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(1) == T && cos.size(2) == D &&
                  (cos.size(0) == 1 || cos.size(0) == B) && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "lmforge_rope: cos and sin [1 or B, T, D] float32");
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = at::empty({B, H, T, D}, x.options());
  const int64_t strides[3] = {x.stride(0), x.stride(1), x.stride(2)};
  rope_rows(x.data_ptr<at::BFloat16>(), strides, cc.data_ptr<float>(), sc.data_ptr<float>(), cc.size(0),
            out.data_ptr<at::BFloat16>(), B, H, T, D, backward);
  return out;
}

TORCH_LIBRARY(lmforge, m) {
  m.def("lmforge_q4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("lmforge_q4_dequant(Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("lmforge_f32_mm(Tensor x, Tensor packed) -> Tensor");
  m.def("lmforge_decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("lmforge_xent_grad_(Tensor(a!) logits, Tensor targets, int ignore_index) -> Tensor");
  m.def("lmforge_attn_softmax(Tensor scores, Tensor? mask, bool causal, float scale) -> Tensor");
  m.def("lmforge_attn_softmax_backward(Tensor p, Tensor dp, float scale) -> Tensor");
  m.def("lmforge_rms_norm(Tensor x, Tensor weight, float eps, bool bf16) -> (Tensor, Tensor)");
  m.def("lmforge_rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, bool want_dw) -> (Tensor, Tensor)");
  m.def("lmforge_swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("lmforge_swiglu_backward(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("lmforge_rope(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("lmforge_q4_mm", &lmforge_q4_mm);
  m.impl("lmforge_q4_dequant", &lmforge_q4_dequant);
  m.impl("lmforge_f32_mm", &lmforge_f32_mm);
  m.impl("lmforge_decode_attention", &lmforge_decode_attention);
  m.impl("lmforge_xent_grad_", &lmforge_xent_grad_);
  m.impl("lmforge_attn_softmax", &lmforge_attn_softmax);
  m.impl("lmforge_attn_softmax_backward", &lmforge_attn_softmax_backward);
  m.impl("lmforge_rms_norm", &lmforge_rms_norm);
  m.impl("lmforge_rms_norm_backward", &lmforge_rms_norm_backward);
  m.impl("lmforge_swiglu", &lmforge_swiglu);
  m.impl("lmforge_swiglu_backward", &lmforge_swiglu_backward);
  m.impl("lmforge_rope", &lmforge_rope);
}

// The C functions AOTInductor calls (config aot_inductor.custom_ops_to_c_shims): no dispatcher on the way.
namespace {

inline const at::Tensor& tensor(AtenTensorHandle h) { return *torch::aot_inductor::tensor_handle_to_tensor_pointer(h); }

template <typename Op>
AOTITorchError shim(Op&& op, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({ *ret0 = torch::aot_inductor::new_tensor_handle(op()); });
}

}  // namespace

extern "C" AOTITorchError aoti_torch_cpu_lmforge_q4_dequant(AtenTensorHandle qweight, AtenTensorHandle scales,
                                                            AtenTensorHandle mins, AtenTensorHandle* ret0) {
  return shim([&] { return lmforge_q4_dequant(tensor(qweight), tensor(scales), tensor(mins)); }, ret0);
}

extern "C" AOTITorchError aoti_torch_cpu_lmforge_q4_mm(AtenTensorHandle x, AtenTensorHandle qweight,
                                                       AtenTensorHandle scales, AtenTensorHandle mins,
                                                       AtenTensorHandle* ret0) {
  return shim([&] { return lmforge_q4_mm(tensor(x), tensor(qweight), tensor(scales), tensor(mins)); }, ret0);
}

extern "C" AOTITorchError aoti_torch_cpu_lmforge_f32_mm(AtenTensorHandle x, AtenTensorHandle packed,
                                                        AtenTensorHandle* ret0) {
  return shim([&] { return lmforge_f32_mm(tensor(x), tensor(packed)); }, ret0);
}

extern "C" AOTITorchError aoti_torch_cpu_lmforge_decode_attention(AtenTensorHandle q, AtenTensorHandle k,
                                                                  AtenTensorHandle v, AtenTensorHandle mask,
                                                                  AtenTensorHandle* ret0) {
  return shim([&] { return lmforge_decode_attention(tensor(q), tensor(k), tensor(v), tensor(mask)); }, ret0);
}
