// Runs the CUDA kernels of cuda/wkv56_kernels.cuh (RWKV-5/6) and cuda/wkv4_kernels.cuh on CPU
// threads (see cuda_runtime.h here), with the launch shapes of cuda/wkv6.cu and cuda/wkv4.cu,
// behind C functions that tests/test_cuda_emulated.py calls through ctypes. float32 or bf16
// inputs; the RWKV-6 decay in the input dtype, the RWKV-5 and RWKV-4 decays in float32.
#include <type_traits>

#include "cuda_runtime.h"
#include "wkv4_kernels.cuh"
#include "wkv56_kernels.cuh"

using namespace rwkv::wkv56;
using namespace rwkv::wkv4;

namespace {

template <int N, typename F, bool S>
void fwd(int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
         const float* u, const float* s0, void* y, float* sT) {
  using W = std::conditional_t<S, float, F>;
  emu_launch(B * H, N, wkv56_fwd_kernel<N, F, W, S>, T, H, (const F*)r, (const F*)k,
             (const F*)v, (const W*)w, u, s0, (F*)y, sT);
}

template <int N, typename F, bool S>
void bwd(int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
         const float* u, const float* s0, const void* gy, const float* gsT, void* gr, void* gk,
         void* gv, void* gw, float* gu, float* gs0, float* q, float* acc) {
  using W = std::conditional_t<S, float, F>;
  emu_launch(2 * B * H, N, wkv56_bwd_scans13_kernel<N, F, W, S>, B * H, T, H, (const F*)r,
             (const F*)k, (const F*)v, (const W*)w, u, s0, (const F*)gy, gsT, (F*)gr, (F*)gv,
             q, gu, acc);
  emu_launch(B * H, N, wkv56_bwd_reverse_rows_kernel<N, F, W, S>, T, H, (const F*)r,
             (const F*)k, (const F*)v, (const W*)w, u, (const F*)gy, gsT, (const float*)q,
             (const float*)acc, (F*)gk, gw, gs0);
}

template <typename T>
struct Type {
  using type = T;
};

// Calls fn(n, type, static) with compile-time values for the run-time head size, dtype and
// decay kind; returns nonzero for a head size the kernels are not instantiated for.
template <typename Fn>
int dispatch(int N, bool bf16, bool st, const Fn& fn) {
  auto by_n = [&](auto n) {
    if (bf16)
      st ? fn(n, Type<__nv_bfloat16>{}, std::true_type{})
         : fn(n, Type<__nv_bfloat16>{}, std::false_type{});
    else
      st ? fn(n, Type<float>{}, std::true_type{}) : fn(n, Type<float>{}, std::false_type{});
    return 0;
  };
  return with_head_size(N, 1, by_n);
}

}  // namespace

extern "C" int emu_wkv56_forward(int bf16, int st, int B, int T, int H, int N, const void* r,
                                 const void* k, const void* v, const void* w, const float* u,
                                 const float* s0, void* y, float* sT) {
  return dispatch(N, bf16, st, [&](auto n, auto f, auto s) {
    fwd<decltype(n)::value, typename decltype(f)::type, decltype(s)::value>(B, T, H, r, k, v, w,
                                                                            u, s0, y, sT);
  });
}

extern "C" int emu_wkv56_backward(int bf16, int st, int B, int T, int H, int N, const void* r,
                                  const void* k, const void* v, const void* w, const float* u,
                                  const float* s0, const void* gy, const float* gsT, void* gr,
                                  void* gk, void* gv, void* gw, float* gu, float* gs0, float* q,
                                  float* acc) {
  return dispatch(N, bf16, st, [&](auto n, auto f, auto s) {
    bwd<decltype(n)::value, typename decltype(f)::type, decltype(s)::value>(
        B, T, H, r, k, v, w, u, s0, gy, gsT, gr, gk, gv, gw, gu, gs0, q, acc);
  });
}

// RWKV-4: one thread per (batch, channel) in blocks of 128, as cuda/wkv4.cu launches them.
constexpr int kWkv4Threads = 128;

extern "C" int emu_wkv4_forward(int bf16, int B, int T, int C, const void* k, const void* v,
                                const float* w, const float* u, const float* s0, void* y,
                                float* sT) {
  const int blocks = (B * C + kWkv4Threads - 1) / kWkv4Threads;
  if (bf16)
    emu_launch(blocks, kWkv4Threads, wkv4_fwd_kernel<__nv_bfloat16>, B, T, C,
               (const __nv_bfloat16*)k, (const __nv_bfloat16*)v, w, u, s0, (__nv_bfloat16*)y, sT);
  else
    emu_launch(blocks, kWkv4Threads, wkv4_fwd_kernel<float>, B, T, C, (const float*)k,
               (const float*)v, w, u, s0, (float*)y, sT);
  return 0;
}

extern "C" int emu_wkv4_backward(int bf16, int B, int T, int C, const void* k, const void* v,
                                 const float* w, const float* u, const float* s0, const void* gy,
                                 const float* gsT, void* gk, void* gv, float* gw, float* gu,
                                 float* gs0, float* states) {
  const int blocks = (B * C + kWkv4Threads - 1) / kWkv4Threads;
  if (bf16)
    emu_launch(blocks, kWkv4Threads, wkv4_bwd_kernel<__nv_bfloat16>, B, T, C,
               (const __nv_bfloat16*)k, (const __nv_bfloat16*)v, w, u, s0,
               (const __nv_bfloat16*)gy, gsT, (__nv_bfloat16*)gk, (__nv_bfloat16*)gv, gw, gu, gs0,
               states);
  else
    emu_launch(blocks, kWkv4Threads, wkv4_bwd_kernel<float>, B, T, C, (const float*)k,
               (const float*)v, w, u, s0, (const float*)gy, gsT, (float*)gk, (float*)gv, gw, gu,
               gs0, states);
  return 0;
}
