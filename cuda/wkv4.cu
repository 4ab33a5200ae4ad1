// Launchers of the RWKV-4 WKV kernels (wkv4_kernels.cuh): grid shapes, dtypes, error codes.
// The maths is described there.

#include "wkv4_kernels.cuh"

namespace rwkv {
namespace {

using namespace wkv4;

constexpr int kThreads = 128;

}  // namespace

int wkv4_forward_cuda(int B, int T, int C, DType x_dtype, const void* k, const void* v,
                      const float* w, const float* u, const float* s0, void* y, float* sT,
                      void* stream) {
  if (B * C == 0) return 0;
  const int blocks = (B * C + kThreads - 1) / kThreads;
  auto st = static_cast<cudaStream_t>(stream);
  if (x_dtype == DType::F32)
    wkv4_fwd_kernel<float><<<blocks, kThreads, 0, st>>>(
        B, T, C, static_cast<const float*>(k), static_cast<const float*>(v), w, u, s0,
        static_cast<float*>(y), sT);
  else
    wkv4_fwd_kernel<__nv_bfloat16><<<blocks, kThreads, 0, st>>>(
        B, T, C, static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v), w,
        u, s0, static_cast<__nv_bfloat16*>(y), sT);
  return static_cast<int>(cudaGetLastError());
}

int wkv4_backward_cuda(int B, int T, int C, DType x_dtype, const void* k, const void* v,
                       const float* w, const float* u, const float* s0, const void* gy,
                       const float* gsT, void* gk, void* gv, float* gw, float* gu, float* gs0,
                       float* states, void* stream) {
  if (B * C == 0) return 0;
  const int blocks = (B * C + kThreads - 1) / kThreads;
  auto st = static_cast<cudaStream_t>(stream);
  if (x_dtype == DType::F32)
    wkv4_bwd_kernel<float><<<blocks, kThreads, 0, st>>>(
        B, T, C, static_cast<const float*>(k), static_cast<const float*>(v), w, u, s0,
        static_cast<const float*>(gy), gsT, static_cast<float*>(gk), static_cast<float*>(gv),
        gw, gu, gs0, states);
  else
    wkv4_bwd_kernel<__nv_bfloat16><<<blocks, kThreads, 0, st>>>(
        B, T, C, static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v), w,
        u, s0, static_cast<const __nv_bfloat16*>(gy), gsT, static_cast<__nv_bfloat16*>(gk),
        static_cast<__nv_bfloat16*>(gv), gw, gu, gs0, states);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace rwkv
