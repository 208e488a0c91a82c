// Skinny float32 matrix products y = x W^T + b for a few rows of x (the verify forward of a small
// CPU target: 1 to a few dozen tokens against weights of hundreds of rows), see specdec/kernels.py.
//
// W is packed once into panels of 16 output columns, [ceil(N / 16)][K][16], so one panel is one
// contiguous stream and one 16-float vector per k. Each task takes kCols panels and up to kRows
// rows of x at a time; the kRows x kCols vector accumulators stay in registers for the whole K
// loop, every loaded weight vector feeds kRows fused multiply-adds, and the panels stay in the
// core's cache while the next rows reuse them. Panels are split across ATen's intra-op threads.
// Plain GCC vector extensions: the compiler picks the widest vectors the host has
// (-march=native), so the same source builds for AVX-512, AVX2 or NEON. The tile is sized to the
// register file: with AVX-512's 32 registers (one per 16-float vector) 8 rows x 2 panels; with
// AVX2's 16 (two per vector) 6 rows x 1 panel, the classic 6x16 AVX2 tile. An 8 x 2 tile on AVX2
// needs 32 registers for its accumulators alone and spills: 8-row products then ran 7x slower
// than MKL (measured on an AVX2-only EPYC).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;  // floats per panel row (one 64-byte cache line)
// Native vector width: GCC lowers a vector wider than the hardware's piecewise through the
// stack, so a 16-float vector on AVX2 is slow; each panel row is kSub native vectors instead.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kRows = 8;
constexpr int64_t kCols = 2;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kRows = 6;
constexpr int64_t kCols = 1;
#else
constexpr int kVecBytes = 16;
constexpr int kRows = 6;
constexpr int64_t kCols = 1;
#endif
typedef float vec __attribute__((vector_size(kVecBytes)));
typedef float vecu __attribute__((vector_size(kVecBytes), aligned(4)));
constexpr int kVec = kVecBytes / 4;      // floats per native vector
constexpr int kSub = kLanes / kVec;      // native vectors per panel row
// panel rows prefetched ahead of the loads: 32 streamed fastest of 0, 16, 32, 64 and 128 on the
// AVX2 EPYC (60 cold 3072 x 576 weights); -DSPECDEC_PREFETCH=N to tune on another CPU
#ifndef SPECDEC_PREFETCH
#define SPECDEC_PREFETCH 32
#endif
constexpr int64_t kPrefetch = SPECDEC_PREFETCH;
typedef uint16_t half_vec __attribute__((vector_size(kVecBytes / 2), aligned(2)));
typedef uint32_t word_vec __attribute__((vector_size(kVecBytes)));

typedef int8_t byte_vec __attribute__((vector_size(kVec), aligned(1)));
typedef int32_t int_vec __attribute__((vector_size(kVecBytes)));
// int8 panels end in kScaleRows extra rows of 16 x 4 bytes: the panel's 16 float32 column scales
constexpr int64_t kScaleRows = 4;

// kVec weights at p as floats: float32 as is; bfloat16 (the high half of a float32) widened by a
// 16-bit shift, so a bfloat16 panel streams half the bytes and the products still accumulate in
// float32; int8 converted exactly (the column's scale is applied once, to the sum).
inline vec load_weights(const float* p) { return *(const vec*)p; }
inline vec load_weights(const at::BFloat16* p) {
  return (vec)(__builtin_convertvector(*(const half_vec*)p, word_vec) << 16);
}
inline vec load_weights(const int8_t* p) {
  // GCC scalarises the generic byte -> int conversion; the sign-extending loads are explicit
#if defined(__AVX512F__)
  return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  return __builtin_convertvector(__builtin_convertvector(*(const byte_vec*)p, int_vec), vec);
#endif
}
template <typename W> constexpr int64_t extra_rows() { return 0; }
template <> constexpr int64_t extra_rows<int8_t>() { return kScaleRows; }

template <int R, int C, typename W>
inline void tile(const float* __restrict x, int64_t K, const W* __restrict panels,
                 float* __restrict y, int64_t N, int64_t panel, const float* __restrict bias) {
  constexpr int V = C * kSub;
  vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = (vec){};
  const W* w[C];
  constexpr int64_t E = extra_rows<W>();
  for (int c = 0; c < C; ++c) w[c] = panels + (panel + c) * (K + E) * kLanes;
  for (int64_t k = 0; k < K; ++k) {
    vec wv[V];
    for (int c = 0; c < C; ++c) {
      __builtin_prefetch(w[c] + (k + kPrefetch) * kLanes);
      for (int s = 0; s < kSub; ++s) wv[c * kSub + s] = load_weights(w[c] + k * kLanes + s * kVec);
    }
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * K + k];
      for (int v = 0; v < V; ++v) acc[r][v] += xv * wv[v];
    }
  }
  if constexpr (E > 0) {  // int8: the per-column scales stored after the panel's K rows
    for (int c = 0; c < C; ++c)
      for (int s = 0; s < kSub; ++s) {
        const vec scale = *(const vecu*)((const float*)(w[c] + K * kLanes) + s * kVec);
        for (int r = 0; r < R; ++r) acc[r][c * kSub + s] *= scale;
      }
  }
  for (int c = 0; c < C; ++c) {
    const int64_t col = (panel + c) * kLanes;
    if (col + kLanes <= N) {
      for (int s = 0; s < kSub; ++s) {
        vec b = (vec){};
        if (bias) b = *(const vecu*)(bias + col + s * kVec);
        for (int r = 0; r < R; ++r) *(vecu*)(y + r * N + col + s * kVec) = acc[r][c * kSub + s] + b;
      }
    } else {  // the last, partial panel (N not a multiple of 16; its padding is zeros)
      for (int r = 0; r < R; ++r)
        for (int64_t j = 0; col + j < N; ++j)
          y[r * N + col + j] = acc[r][c * kSub + j / kVec][j % kVec] + (bias ? bias[col + j] : 0.f);
    }
  }
}

// tile<R, C> for the R (1..kRows) rows left
template <int C, typename W, int Max = kRows>
inline void rows(int R, const float* x, int64_t K, const W* panels, float* y, int64_t N,
                 int64_t panel, const float* bias) {
  if constexpr (Max > 1) {
    if (R < Max) return rows<C, W, Max - 1>(R, x, K, panels, y, N, panel, bias);
  }
  tile<Max, C>(x, K, panels, y, N, panel, bias);
}

template <typename W>
void run_panels(const float* xp, int64_t M, int64_t K, const W* w, int64_t P, float* yp,
                int64_t N, const float* b) {
  const int64_t groups = (P + kCols - 1) / kCols;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, (groups + threads - 1) / threads);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t panel = kCols * group;
      for (int64_t r0 = 0; r0 < M; r0 += kRows) {
        const int R = static_cast<int>(std::min<int64_t>(kRows, M - r0));
        if (panel + kCols <= P)
          rows<kCols>(R, xp + r0 * K, K, w, yp + r0 * N, N, panel, b);
        else
          rows<1>(R, xp + r0 * K, K, w, yp + r0 * N, N, panel, b);
      }
    }
  });
}

}  // namespace

// x [M, K] float32, panels [P, K, 16] float32 or bfloat16, or [P, K + 4, 16] int8 (the last 4
// rows: the 16 column scales as float32) (P = ceil(N / 16)), bias [N] float32 or None
// -> [M, N] float32
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor panels, c10::optional<torch::Tensor> bias,
                            int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "skinny_linear: x must be a 2-D float32 CPU tensor");
  const auto type = panels.scalar_type();
  TORCH_CHECK(panels.dim() == 3 &&
                  (type == torch::kFloat || type == torch::kBFloat16 || type == torch::kChar) &&
                  panels.size(2) == kLanes && panels.is_contiguous(),
              "skinny_linear: panels must be a contiguous float32, bfloat16 or int8 [P, K, 16] "
              "tensor");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  const int64_t weight_rows = panels.size(1) - (type == torch::kChar ? kScaleRows : 0);
  TORCH_CHECK(weight_rows == K, "skinny_linear: x has ", K, " columns, the weight ",
              weight_rows);
  TORCH_CHECK(P * kLanes >= N && (P - 1) * kLanes < N, "skinny_linear: ", P,
              " panels cannot hold ", N, " outputs");
  const float* b = nullptr;
  torch::Tensor bias_c;
  if (bias.has_value()) {
    bias_c = bias->contiguous();
    TORCH_CHECK(bias_c.scalar_type() == torch::kFloat && bias_c.numel() == N,
                "skinny_linear: bias must be float32 with ", N, " elements");
    b = bias_c.data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (type == torch::kBFloat16)
    run_panels(xp, M, K, panels.data_ptr<at::BFloat16>(), P, yp, N, b);
  else if (type == torch::kChar)
    run_panels(xp, M, K, panels.data_ptr<int8_t>(), P, yp, N, b);
  else
    run_panels(xp, M, K, panels.data_ptr<float>(), P, yp, N, b);
  return y;
}

// LlamaRMSNorm in float32 over the rows of h [n, H]: each row times rsqrt(mean of its squares +
// eps), then times weight. One pass per row: ATen's rms_norm runs about six operations (square,
// mean, add, rsqrt, two products), each with its own dispatch, which for one 576-wide row cost
// ~50 us, 3 ms of a one-token forward of the embedded model.
torch::Tensor rms_norm_rows(torch::Tensor h, torch::Tensor weight, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == torch::kFloat && h.device().is_cpu() &&
                  weight.scalar_type() == torch::kFloat && weight.numel() == h.size(1),
              "rms_norm_rows: h must be [n, H] float32 on CPU and weight float32 with H elements");
  h = h.contiguous();
  auto w = weight.contiguous();
  auto out = torch::empty_like(h);
  const int64_t n = h.size(0), H = h.size(1), body = H - H % kVec;
  const float* wp = w.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    const float* x = h.data_ptr<float>() + r * H;
    float* y = out.data_ptr<float>() + r * H;
    vec acc = (vec){};
    for (int64_t j = 0; j < body; j += kVec) {
      const vec v = *(const vecu*)(x + j);
      acc += v * v;
    }
    float sum = 0.f;
    for (int i = 0; i < kVec; ++i) sum += acc[i];
    for (int64_t j = body; j < H; ++j) sum += x[j] * x[j];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(H) + static_cast<float>(eps));
    for (int64_t j = 0; j < H; ++j) y[j] = (x[j] * inv) * wp[j];
  }
  return out;
}

// The decoder layers of specdec/fastpath.py's lean forward in one native call, for float32 on
// CPU with every product on skinny_linear: the same ATen operations in the same order as the
// Python loop (so the same numbers), without ~20 Python-level operator calls per layer.
//
// h [n, H] the embedded tokens; cos, sin [n, hd]; mask [1, 1, n, past + n] float or None;
// weights: per layer 10 tensors in order: input norm weight, q/k/v panels, q/k/v bias, o panels,
// o bias, post-attention norm weight, gate/up panels, gate/up bias, down panels, down bias (an
// empty tensor for no bias); keys, values: per layer the cache buffer [1, nkv, capacity, hd];
// past: the rows already cached in each; sizes: heads, key/value heads, head size, MLP width;
// eps: the two norms' epsilons per layer; scale: the attention scale per layer.
// Writes the new keys/values at rows past .. past + n - 1 of each buffer and returns the final
// hidden state before the model's last norm, plus every layer's output if asked.
std::vector<torch::Tensor> decoder_layers(
    torch::Tensor h, torch::Tensor cos, torch::Tensor sin, c10::optional<torch::Tensor> mask,
    std::vector<torch::Tensor> weights, std::vector<torch::Tensor> keys,
    std::vector<torch::Tensor> values, int64_t past, std::vector<int64_t> sizes,
    std::vector<double> eps, std::vector<double> scale, bool all_hidden) {
  TORCH_CHECK(sizes.size() == 4, "decoder_layers: sizes are heads, kv heads, head size, MLP width");
  const int64_t nh = sizes[0], nkv = sizes[1], hd = sizes[2], inter = sizes[3];
  const int64_t layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 10 * layers && values.size() == keys.size()
                  && static_cast<int64_t>(eps.size()) == 2 * layers
                  && static_cast<int64_t>(scale.size()) == layers,
              "decoder_layers: inconsistent per-layer arguments");
  const int64_t n = h.size(0), H = h.size(1);
  const int64_t qs = nh * hd, kvs = nkv * hd, half = hd / 2;
  auto opt = [](const torch::Tensor& t) -> c10::optional<torch::Tensor> {
    return t.numel() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
  };
  auto linear = [&](const torch::Tensor& x, const torch::Tensor& panels, const torch::Tensor& b,
                    int64_t out) { return skinny_linear(x, panels, opt(b), out); };
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = &weights[10 * i];
    auto normed = rms_norm_rows(h, w[0], eps[2 * i]);
    auto proj = linear(normed, w[1], w[2], qs + 2 * kvs);
    auto qk = proj.slice(1, 0, qs + kvs).view({n, nh + nkv, hd}).transpose(0, 1);
    qk = qk * cos + at::cat({-qk.slice(2, half), qk.slice(2, 0, half)}, -1) * sin;
    auto q = qk.slice(0, 0, nh), k = qk.slice(0, nh);
    auto v = proj.slice(1, qs + kvs).view({n, nkv, hd}).transpose(0, 1);
    keys[i].select(0, 0).slice(1, past, past + n).copy_(k);
    values[i].select(0, 0).slice(1, past, past + n).copy_(v);
    auto K = keys[i].slice(2, 0, past + n), V = values[i].slice(2, 0, past + n);
    auto attn = at::scaled_dot_product_attention(q.unsqueeze(0), K, V, mask, 0.0, false,
                                                 scale[i], nh != nkv);
    h = h + linear(attn.select(0, 0).transpose(0, 1).reshape({n, qs}), w[3], w[4], H);
    normed = rms_norm_rows(h, w[5], eps[2 * i + 1]);
    auto gu = linear(normed, w[6], w[7], 2 * inter);
    h = h + linear(at::silu(gu.slice(1, 0, inter)) * gu.slice(1, inter), w[8], w[9], H);
    if (all_hidden) out.push_back(h);
  }
  if (!all_hidden) out.push_back(h);
  return out;
}
