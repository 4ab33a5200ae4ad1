// Launchers of the RWKV-5/6 WKV kernels (wkv56_kernels.cuh): dispatch on head size and
// dtypes, grid shapes, error codes. The maths and the kernels' design are described there.

#include <type_traits>

#include "wkv56_kernels.cuh"

namespace rwkv {
namespace {

using namespace wkv56;

template <int N, typename F, typename W, bool STATIC>
int forward_t(int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
              const float* u, const float* s0, void* y, float* sT, cudaStream_t st) {
  wkv56_fwd_kernel<N, F, W, STATIC><<<B * H, N, 0, st>>>(
      T, H, static_cast<const F*>(r), static_cast<const F*>(k), static_cast<const F*>(v),
      static_cast<const W*>(w), u, s0, static_cast<F*>(y), sT);
  return static_cast<int>(cudaGetLastError());
}

template <int N, typename F, typename W, bool STATIC>
int backward_t(int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
               const float* u, const float* s0, const void* gy, const float* gsT, void* gr,
               void* gk, void* gv, void* gw, float* gu, float* gs0, float* q, float* acc,
               cudaStream_t st) {
  const F *rr = static_cast<const F*>(r), *kk = static_cast<const F*>(k),
          *vv = static_cast<const F*>(v), *gg = static_cast<const F*>(gy);
  const W* ww = static_cast<const W*>(w);
  wkv56_bwd_scans13_kernel<N, F, W, STATIC><<<2 * B * H, N, 0, st>>>(
      B * H, T, H, rr, kk, vv, ww, u, s0, gg, gsT, static_cast<F*>(gr), static_cast<F*>(gv), q,
      gu, acc);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return static_cast<int>(e);
  wkv56_bwd_reverse_rows_kernel<N, F, W, STATIC><<<B * H, N, 0, st>>>(
      T, H, rr, kk, vv, ww, u, gg, gsT, q, acc, static_cast<F*>(gk), gw, gs0);
  return static_cast<int>(cudaGetLastError());
}

// Calls fn.template run<N, F, W, STATIC>() for the run-time choices, or returns
// cudaErrorInvalidValue for a combination that is not instantiated.
template <typename Fn>
int dispatch(int N, DType x, DType wd, bool static_w, const Fn& fn) {
  auto by_types = [&](auto n) -> int {
    constexpr int NN = decltype(n)::value;
    if (static_w) {
      if (x == DType::F32) return fn.template run<NN, float, float, true>();
      return fn.template run<NN, __nv_bfloat16, float, true>();
    }
    if (x == DType::F32 && wd == DType::F32)
      return fn.template run<NN, float, float, false>();
    if (x == DType::BF16 && wd == DType::BF16)
      return fn.template run<NN, __nv_bfloat16, __nv_bfloat16, false>();
    if (x == DType::BF16 && wd == DType::F32)
      return fn.template run<NN, __nv_bfloat16, float, false>();
    return static_cast<int>(cudaErrorInvalidValue);
  };
  return with_head_size(N, static_cast<int>(cudaErrorInvalidValue), by_types);
}

struct Fwd {
  int B, T, H;
  const void *r, *k, *v, *w;
  const float *u, *s0;
  void* y;
  float* sT;
  cudaStream_t st;
  template <int NN, typename F, typename W, bool S>
  int run() const {
    return forward_t<NN, F, W, S>(B, T, H, r, k, v, w, u, s0, y, sT, st);
  }
};

struct Bwd {
  int B, T, H;
  const void *r, *k, *v, *w;
  const float *u, *s0;
  const void* gy;
  const float* gsT;
  void *gr, *gk, *gv, *gw;
  float *gu, *gs0, *q, *acc;
  cudaStream_t st;
  template <int NN, typename F, typename W, bool S>
  int run() const {
    return backward_t<NN, F, W, S>(B, T, H, r, k, v, w, u, s0, gy, gsT, gr, gk, gv, gw, gu,
                                   gs0, q, acc, st);
  }
};

}  // namespace

bool wkv56_supports_head_size(int N) { return N == 32 || N == 64 || N == 128; }

int wkv56_forward_cuda(int B, int T, int H, int N, DType x_dtype, DType w_dtype, bool static_w,
                       const void* r, const void* k, const void* v, const void* w,
                       const float* u, const float* s0, void* y, float* sT, void* stream) {
  if (B * H == 0) return 0;
  const Fwd fn{B, T, H, r, k, v, w, u, s0, y, sT, static_cast<cudaStream_t>(stream)};
  return dispatch(N, x_dtype, w_dtype, static_w, fn);
}

int wkv56_backward_cuda(int B, int T, int H, int N, DType x_dtype, DType w_dtype, bool static_w,
                        const void* r, const void* k, const void* v, const void* w,
                        const float* u, const float* s0, const void* gy, const float* gsT,
                        void* gr, void* gk, void* gv, void* gw, float* gu, float* gs0, float* q,
                        float* acc, void* stream) {
  if (B * H == 0) return 0;
  const Bwd fn{B, T, H, r, k, v, w, u, s0, gy, gsT, gr, gk, gv, gw, gu, gs0, q, acc,
             static_cast<cudaStream_t>(stream)};
  return dispatch(N, x_dtype, w_dtype, static_w, fn);
}

}  // namespace rwkv
