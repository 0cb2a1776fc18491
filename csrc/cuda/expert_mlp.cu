// CUDA kernels of expert_mlp. JAKIRO_EXPERT_MLP_KERNEL (grouped_kernel_choice.h)
// picks the implementation; none reads anything back to the host.
//
// Many tokens (T > 64, or "cublas"): every expert on every token with cuBLAS
// (x against all experts' gate/up rows in ONE mm, the gated activation, a strided bmm for
// the down products) and combine_kernel, which adds only routed experts. With
// Jakiro's few experts (E = 2, mostly both routed) little work is wasted, and
// the routing stays on the device (graph capturable). Many experts with top-k
// routing would want a routed (gathered) cuBLAS path instead.
//
// Few tokens (T <= 64), in three steps on the device:
//   1. route_kernel: per expert, the list of tokens with a non-zero coefficient
//      in any head (positions e*T .. e*T + count_e), and each token's position.
//   2. gate/up product with the gated epilogue: h[pos] = act(g) * u, act = silu
//      (SwiGLU, Epilogue::kSwiGLU) or the tanh-approximated GELU (GeGLU, kGeGLU),
//      a template parameter so each activation has its own kernels.
//   3. down product: the weight-streaming kernel adds coeff[t, r, e] * y
//      straight into an fp32 accumulator per head (the combine fused into
//      the product).
// The weight-streaming kernel is mma_stream_kernel (tensor cores, every
// expert's weights read once for all its tokens) for fp16/bf16 on sm_80+, and
// stream_kernel otherwise. "v1" selects the first implementation: stream_kernel
// for T <= 64 and the WMMA tile kernel plus combine_kernel above.
// Each expert's weights are read once per pass for all of its tokens; tokens
// routed elsewhere cost nothing.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "jakiro/checks.h"
#include "jakiro/cuda_dispatch.cuh"
#include "jakiro/grouped_kernel_choice.h"
#include "jakiro/grouped_kernels.cuh"
#include "jakiro/grouped_mma_stream.cuh"
#include "jakiro/moe.h"

namespace jakiro {
namespace {

// Up to this many tokens the weight-streaming kernels are used (weight-bandwidth bound).
constexpr int64_t kStreamMaxTokens = 64;
constexpr int kRouteThreads = 1024;
constexpr int kCombineThreads = 256;

__device__ __forceinline__ bool routed(const float* coeff, int64_t t, int heads, int experts, int e) {
  for (int r = 0; r < heads; ++r) {
    if (coeff[(t * heads + r) * experts + e] != 0.f) return true;
  }
  return false;
}

// One block per expert e: compacts the routed tokens, in token order, into
// token_of[e*T ..], writes position_of[e*T + t] (-1 when not routed) and the
// expert's segment [e*T, e*T + count).
__global__ void __launch_bounds__(kRouteThreads)
    route_kernel(const float* __restrict__ coeff, int64_t tokens, int heads, int experts,
                 int32_t* __restrict__ token_of, int32_t* __restrict__ position_of,
                 int32_t* __restrict__ seg_begin, int32_t* __restrict__ seg_end) {
  constexpr int kWarps = kRouteThreads / 32;
  __shared__ int32_t warp_offset[kWarps];
  __shared__ int32_t chunk_total;
  const int e = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t base_pos = static_cast<int64_t>(e) * tokens;
  int32_t filled = 0;  // tokens listed so far (same value in every thread)

  for (int64_t t0 = 0; t0 < tokens; t0 += kRouteThreads) {
    const int64_t t = t0 + threadIdx.x;
    const bool active = t < tokens && routed(coeff, t, heads, experts, e);
    const unsigned ballot = __ballot_sync(0xffffffffu, active);
    if (lane == 0) warp_offset[warp] = __popc(ballot);
    __syncthreads();
    if (threadIdx.x == 0) {
      int32_t sum = 0;
      for (int i = 0; i < kWarps; ++i) {
        const int32_t c = warp_offset[i];
        warp_offset[i] = sum;
        sum += c;
      }
      chunk_total = sum;
    }
    __syncthreads();
    if (t < tokens) {
      const int32_t slot = filled + warp_offset[warp] + __popc(ballot & ((1u << lane) - 1u));
      position_of[base_pos + t] = active ? static_cast<int32_t>(base_pos + slot) : -1;
      if (active) token_of[base_pos + slot] = static_cast<int32_t>(t);
    }
    filled += chunk_total;
    __syncthreads();  // warp_offset and chunk_total are rewritten by the next chunk
  }
  if (threadIdx.x == 0) {
    seg_begin[e] = static_cast<int32_t>(base_pos);
    seg_end[e] = static_cast<int32_t>(base_pos + filled);
  }
}

// out[r, t, n] = sum over routed experts e of coeff[t, r, e] * y[position_of[e*T + t], n];
// with position_of null, y is dense ([E, T, n]) and position e*T + t is used when routed.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const T* __restrict__ y, const int32_t* __restrict__ position_of,
                   const float* __restrict__ coeff, T* __restrict__ out, int64_t tokens, int heads,
                   int experts, int64_t n) {
  const int64_t total = tokens * n;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kCombineThreads) {
    const int64_t t = i / n, c = i % n;
    float sum[kMaxRoutingHeads];
#pragma unroll
    for (int r = 0; r < kMaxRoutingHeads; ++r) sum[r] = 0.f;
    for (int e = 0; e < experts; ++e) {
      // Dense y holds every expert's output, but tokens an expert is not routed to
      // must not see it (it may be inf or NaN): the same rule as route_kernel.
      const int64_t pos = position_of ? position_of[e * tokens + t]
                                      : (routed(coeff, t, heads, experts, e) ? e * tokens + t : -1);
      if (pos < 0) continue;
      const float v = grouped::to_float(y[pos * n + c]);
#pragma unroll
      for (int r = 0; r < kMaxRoutingHeads; ++r) {
        if (r < heads) sum[r] = fmaf(coeff[(t * heads + r) * experts + e], v, sum[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxRoutingHeads; ++r) {
      if (r < heads) out[(r * tokens + t) * n + c] = grouped::from_float<T>(sum[r]);
    }
  }
}

// Every expert on every token with cuBLAS, then the per-head combine (see the top).
at::Tensor expert_mlp_dense(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                            const at::Tensor& coeff, const ExpertMlpShape& s, ExpertActivation act,
                            at::Tensor& out) {
  const int64_t E = s.experts, T = s.tokens, H = s.hidden, I = s.intermediate;
  const at::Tensor gate_up = at::mm(x, w_gate_up.view({E * 2 * I, H}).t()).view({T, E, 2, I});
  const at::Tensor gate = gate_up.select(2, 0);
  const at::Tensor activated = act == ExpertActivation::kSilu ? at::silu(gate) : at::gelu(gate, "tanh");
  const at::Tensor h = activated.mul_(gate_up.select(2, 1)).contiguous();                        // [T, E, I]
  const at::Tensor y = at::bmm(h.transpose(0, 1), w_down.transpose(1, 2)).contiguous();           // [E, T, H]
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda_float(x.scalar_type(), "expert_mlp", "x", [&](auto tag) {
    using T_ = decltype(tag);
    const int64_t blocks = std::min<int64_t>((T * H + kCombineThreads - 1) / kCombineThreads, 8192);
    combine_kernel<T_><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(
        reinterpret_cast<const T_*>(y.const_data_ptr()), nullptr, coeff.const_data_ptr<float>(),
        reinterpret_cast<T_*>(out.mutable_data_ptr()), T, static_cast<int>(s.heads), static_cast<int>(E), H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor expert_mlp_cuda(const at::Tensor& x_in, const at::Tensor& w_gate_up_in, const at::Tensor& w_down_in,
                           const at::Tensor& coeff_in, c10::string_view activation) {
  constexpr const char* op = "expert_mlp";
  const ExpertActivation act = check_expert_activation(activation, op);
  const ExpertMlpShape s = check_expert_mlp_args(x_in, w_gate_up_in, w_down_in, coeff_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  JAKIRO_CHECK(s.experts * s.tokens <= INT32_MAX, op, "E * T = ", s.experts * s.tokens,
               " routed positions; at most 2^31 - 1 are supported");
  const at::Tensor x = x_in.contiguous(), w_gate_up = w_gate_up_in.contiguous(), w_down = w_down_in.contiguous();
  const at::Tensor coeff = coeff_in.to(at::kFloat).contiguous();

  const GroupedKernel kernel = grouped_kernel_choice(op);

  at::Tensor out = at::empty({s.heads, s.tokens, s.hidden}, x.options());
  if (s.tokens == 0) return out;
  if (kernel == GroupedKernel::kCublas || (kernel == GroupedKernel::kAuto && s.tokens > kStreamMaxTokens)) {
    return expert_mlp_dense(x, w_gate_up, w_down, coeff, s, act, out);
  }
  const bool use_mma = kernel == GroupedKernel::kAuto;  // v1 keeps stream_kernel (and the tile kernel)
  const int device_major = at::cuda::getCurrentDeviceProperties()->major;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t positions = s.experts * s.tokens;
  const auto int_options = x.options().dtype(at::kInt);
  at::Tensor token_of = at::empty({positions}, int_options);
  at::Tensor position_of = at::empty({positions}, int_options);
  at::Tensor segments = at::empty({2, s.experts}, int_options);  // begin, end per expert
  at::Tensor h = at::empty({positions, s.intermediate}, x.options());

  dispatch_cuda_float(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    const float* coeff_ptr = coeff.const_data_ptr<float>();
    int32_t* seg = segments.mutable_data_ptr<int32_t>();
    route_kernel<<<static_cast<unsigned>(s.experts), kRouteThreads, 0, stream>>>(
        coeff_ptr, s.tokens, static_cast<int>(s.heads), static_cast<int>(s.experts),
        token_of.mutable_data_ptr<int32_t>(), position_of.mutable_data_ptr<int32_t>(), seg, seg + s.experts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const bool small = s.tokens <= kStreamMaxTokens;
    // A tile-count bound valid for any routing: sum_e ceil(count_e / M) <= ceil(E*T / M) + E.
    const int64_t max_tiles = (positions + grouped::kTileM - 1) / grouped::kTileM + s.experts;

    // Gate/up product, gated epilogue: h[pos] for the routed tokens.
    grouped::GroupedParams<T> up{};
    up.src = reinterpret_cast<const T*>(x.const_data_ptr());
    up.src_rows = token_of.const_data_ptr<int32_t>();
    up.w = reinterpret_cast<const T*>(w_gate_up.const_data_ptr());
    up.seg_begin = seg;
    up.seg_end = seg + s.experts;
    up.positions = positions;
    up.w_rows = 2 * s.intermediate;
    up.experts = static_cast<int32_t>(s.experts);
    up.n = static_cast<int32_t>(s.intermediate);
    up.k = static_cast<int32_t>(s.hidden);
    up.out = reinterpret_cast<T*>(h.mutable_data_ptr());
    const bool up_vec = grouped::can_vectorize<T>(s.hidden, {up.src, up.w});
    const auto launch_gate_up = [&](auto epilogue) {
      constexpr grouped::Epilogue EPI = decltype(epilogue)::value;
      if (small && use_mma && grouped::mma_stream_supported<T>(up_vec, s.experts, device_major)) {
        grouped::launch_mma_stream<T, EPI>(up, s.tokens, stream);
      } else if (small) {
        grouped::launch_stream<T, EPI>(up, up_vec, s.tokens, stream);
      } else {
        grouped::launch_tile<T, EPI>(up, up_vec, max_tiles, stream);
      }
    };
    if (act == ExpertActivation::kGeluTanh) {
      launch_gate_up(std::integral_constant<grouped::Epilogue, grouped::Epilogue::kGeGLU>{});
    } else {
      launch_gate_up(std::integral_constant<grouped::Epilogue, grouped::Epilogue::kSwiGLU>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Down product over h (already in position order) and the per-head combine.
    grouped::GroupedParams<T> down{};
    down.src = reinterpret_cast<const T*>(h.const_data_ptr());
    down.w = reinterpret_cast<const T*>(w_down.const_data_ptr());
    down.seg_begin = seg;
    down.seg_end = seg + s.experts;
    down.positions = positions;
    down.w_rows = s.hidden;
    down.experts = static_cast<int32_t>(s.experts);
    down.n = static_cast<int32_t>(s.hidden);
    down.k = static_cast<int32_t>(s.intermediate);
    const bool down_vec = grouped::can_vectorize<T>(s.intermediate, {down.src, down.w});
    if (small) {
      const bool fp32 = std::is_same_v<T, float>;
      at::Tensor acc = fp32 ? out.zero_() : at::zeros({s.heads, s.tokens, s.hidden}, x.options().dtype(at::kFloat));
      down.acc = acc.mutable_data_ptr<float>();
      down.coeff = coeff_ptr;
      down.out_tokens = token_of.const_data_ptr<int32_t>();
      down.heads = static_cast<int32_t>(s.heads);
      down.tokens = s.tokens;
      if (use_mma && grouped::mma_stream_supported<T>(down_vec, s.experts, device_major)) {
        grouped::launch_mma_stream<T, grouped::Epilogue::kCombine>(down, s.tokens, stream);
      } else {
        grouped::launch_stream<T, grouped::Epilogue::kCombine>(down, down_vec, s.tokens, stream);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!fp32) out.copy_(acc);
    } else {
      at::Tensor y = at::empty({positions, s.hidden}, x.options());
      down.out = reinterpret_cast<T*>(y.mutable_data_ptr());
      grouped::launch_tile<T, grouped::Epilogue::kStore>(down, down_vec, max_tiles, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t blocks = std::min<int64_t>((s.tokens * s.hidden + kCombineThreads - 1) / kCombineThreads, 8192);
      combine_kernel<T><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(
          reinterpret_cast<const T*>(y.const_data_ptr()), position_of.const_data_ptr<int32_t>(), coeff_ptr,
          reinterpret_cast<T*>(out.mutable_data_ptr()), s.tokens, static_cast<int>(s.heads),
          static_cast<int>(s.experts), s.hidden);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("expert_mlp", &expert_mlp_cuda); }

}  // namespace jakiro
