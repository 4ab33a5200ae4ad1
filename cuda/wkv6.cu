// CUDA WKV for RWKV-5 (static decay) and RWKV-6 (per-token decay): forward and backward.
//
// Maths (reference: rwkv_train/ops/reference.py, wkv6_reference), per (batch, head), with the
// state S[key][value] in float32:
//   y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1}),   S_t = diag(d_t) S_{t-1} + k_t v_t^T,
//   d_t = exp(-exp(w_t)).
// Every kernel runs one block of N threads per (batch, head) and scans time sequentially, the
// state held in registers (one column or one row of S per thread); T is a kernel argument.
// The step's inputs go through double-buffered shared memory (one barrier per step) and
// the next step's global loads are issued before the current step's arithmetic.
//
// Backward without stored states (three scans):
//   1. forward, thread = key row j:  gr_t = u k_t (gy_t.v_t) + S_{t-1} gy_t,
//      q_t = r_t * (S_{t-1} gy_t), gu += r_t k_t (gy_t.v_t), acc = rowsum(gS_T * S_T);
//   2. reverse, thread = key row j, G_t = dL/dS_t, G_{t-1} = d_t G_t + r_t gy_t^T:
//      gk_t = r_t u (gy_t.v_t) + G_t v_t,  p_t = k_t * (G_t v_t),
//      dL/dlog d_t = sum_{j>t} q_j - sum_{i>=t} p_i + acc,  gw_t = that * (-exp(w_t));
//      gS_0 = G_{-1};
//   3. reverse, thread = value column i:  gv_t = (sum_j r_j u_j k_j) gy_t + G_t^T k_t.

#include <type_traits>

#include "wkv_common.cuh"

namespace rwkv {
namespace {

template <typename W, bool STATIC>
__device__ __forceinline__ float load_w(const W* w, size_t o, int h, int N, int i) {
  return STATIC ? to_f(w[h * N + i]) : to_f(w[o]);
}

template <int N, typename F, typename W, bool STATIC>
__global__ void __launch_bounds__(N)
    wkv56_fwd_kernel(int T, int H, const F* __restrict__ r, const F* __restrict__ k,
                     const F* __restrict__ v, const W* __restrict__ w,
                     const float* __restrict__ u, const float* __restrict__ s0,
                     F* __restrict__ y, float* __restrict__ sT) {
  const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
  __shared__ __align__(16) float sr[2][N], sk[2][N], sd[2][N], su[N];
  su[i] = u[h * N + i];
  float s[N];  // column i of the state: s[j] = S[j][i]
  const float* s0p = s0 + (size_t)bh * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) s[j] = s0p[j * N + i];
  const size_t step = (size_t)H * N;
  size_t o = (size_t)b * T * step + (size_t)h * N + i;
  const float dstat = STATIC ? decay(load_w<W, STATIC>(w, o, h, N, i)) : 0.f;
  float nr = 0.f, nk = 0.f, nv = 0.f, nw = 0.f;
  if (T > 0) {
    nr = to_f(r[o]), nk = to_f(k[o]), nv = to_f(v[o]);
    if (!STATIC) nw = to_f(w[o]);
  }
  for (int t = 0; t < T; ++t, o += step) {
    const int p = t & 1;
    sr[p][i] = nr;
    sk[p][i] = nk;
    sd[p][i] = STATIC ? dstat : decay(nw);
    const float vi = nv;
    if (t + 1 < T) {
      nr = to_f(r[o + step]), nk = to_f(k[o + step]), nv = to_f(v[o + step]);
      if (!STATIC) nw = to_f(w[o + step]);
    }
    __syncthreads();
    float yi = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float kv = sk[p][j] * vi;
      yi += sr[p][j] * (su[j] * kv + s[j]);
      s[j] = s[j] * sd[p][j] + kv;
    }
    y[o] = from_f<F>(yi);
  }
  float* sTp = sT + (size_t)bh * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) sTp[j * N + i] = s[j];
}

// Scan 1: forward over time, thread j owns row j of S.
template <int N, typename F, typename W, bool STATIC>
__global__ void __launch_bounds__(N)
    wkv56_bwd_forward_kernel(int T, int H, const F* __restrict__ r, const F* __restrict__ k,
                             const F* __restrict__ v, const W* __restrict__ w,
                             const float* __restrict__ u, const float* __restrict__ s0,
                             const F* __restrict__ gy, const float* __restrict__ gsT,
                             F* __restrict__ gr, float* __restrict__ q, float* __restrict__ gu,
                             float* __restrict__ acc) {
  const int bh = blockIdx.x, b = bh / H, h = bh % H, j = threadIdx.x;
  __shared__ __align__(16) float sv[2][N], sg[2][N];
  float s[N];  // row j of the state
  const float* s0p = s0 + (size_t)bh * N * N + (size_t)j * N;
#pragma unroll
  for (int c = 0; c < N; ++c) s[c] = s0p[c];
  const float uj = u[h * N + j];
  const size_t step = (size_t)H * N;
  size_t o = (size_t)b * T * step + (size_t)h * N + j;
  const float dstat = STATIC ? decay(load_w<W, STATIC>(w, o, h, N, j)) : 0.f;
  float nr = 0.f, nk = 0.f, nv = 0.f, nw = 0.f, ng = 0.f, gu_acc = 0.f;
  if (T > 0) {
    nr = to_f(r[o]), nk = to_f(k[o]), nv = to_f(v[o]), ng = to_f(gy[o]);
    if (!STATIC) nw = to_f(w[o]);
  }
  for (int t = 0; t < T; ++t, o += step) {
    const int p = t & 1;
    sv[p][j] = nv;
    sg[p][j] = ng;
    const float rj = nr, kj = nk, dj = STATIC ? dstat : decay(nw);
    if (t + 1 < T) {
      nr = to_f(r[o + step]), nk = to_f(k[o + step]), nv = to_f(v[o + step]);
      ng = to_f(gy[o + step]);
      if (!STATIC) nw = to_f(w[o + step]);
    }
    __syncthreads();
    float a = 0.f, gyv = 0.f;
#pragma unroll
    for (int c = 0; c < N; ++c) {
      gyv += sg[p][c] * sv[p][c];
      a += sg[p][c] * s[c];
      s[c] = s[c] * dj + kj * sv[p][c];
    }
    gr[o] = from_f<F>(uj * kj * gyv + a);
    q[o] = rj * a;
    gu_acc += rj * kj * gyv;
  }
  const float* gp = gsT + (size_t)bh * N * N + (size_t)j * N;
  float x = 0.f;
#pragma unroll
  for (int c = 0; c < N; ++c) x += gp[c] * s[c];
  acc[bh * N + j] = x;
  gu[bh * N + j] = gu_acc;
}

// Scan 2: reverse over time, thread j owns row j of G = dL/dS.
template <int N, typename F, typename W, bool STATIC>
__global__ void __launch_bounds__(N)
    wkv56_bwd_reverse_rows_kernel(int T, int H, const F* __restrict__ r,
                                  const F* __restrict__ k, const F* __restrict__ v,
                                  const W* __restrict__ w, const float* __restrict__ u,
                                  const F* __restrict__ gy, const float* __restrict__ gsT,
                                  const float* __restrict__ q, const float* __restrict__ acc,
                                  F* __restrict__ gk, void* __restrict__ gw_out,
                                  float* __restrict__ gs0) {
  const int bh = blockIdx.x, b = bh / H, h = bh % H, j = threadIdx.x;
  __shared__ __align__(16) float sv[2][N], sg[2][N];
  float g[N];
  const float* gp = gsT + (size_t)bh * N * N + (size_t)j * N;
#pragma unroll
  for (int c = 0; c < N; ++c) g[c] = gp[c];
  const float uj = u[h * N + j], cst = acc[bh * N + j];
  const size_t step = (size_t)H * N;
  size_t o = (size_t)b * T * step + (size_t)h * N + j + (size_t)(T > 0 ? T - 1 : 0) * step;
  const float wstat = STATIC ? load_w<W, STATIC>(w, o, h, N, j) : 0.f;
  const float dstat = STATIC ? decay(wstat) : 0.f;
  float nr = 0.f, nk = 0.f, nv = 0.f, nw = 0.f, ng = 0.f, nq = 0.f;
  if (T > 0) {
    nr = to_f(r[o]), nk = to_f(k[o]), nv = to_f(v[o]), ng = to_f(gy[o]), nq = q[o];
    if (!STATIC) nw = to_f(w[o]);
  }
  // The decay gradient is a difference of running sums that grow with T: keep them in double
  // so it stays accurate at long T (float lost about 1e-3 relative at T = 4096).
  double P = 0.0, Q = 0.0, gw_acc = 0.0;
  for (int t = T - 1; t >= 0; --t, o -= step) {
    const int p = t & 1;
    sv[p][j] = nv;
    sg[p][j] = ng;
    const float rj = nr, kj = nk, qj = nq, wj = STATIC ? wstat : nw;
    const float dj = STATIC ? dstat : decay(wj);
    if (t > 0) {
      nr = to_f(r[o - step]), nk = to_f(k[o - step]), nv = to_f(v[o - step]);
      ng = to_f(gy[o - step]), nq = q[o - step];
      if (!STATIC) nw = to_f(w[o - step]);
    }
    __syncthreads();
    float gyv = 0.f, gvr = 0.f;
#pragma unroll
    for (int c = 0; c < N; ++c) {
      gyv += sg[p][c] * sv[p][c];
      gvr += g[c] * sv[p][c];
      g[c] = g[c] * dj + rj * sg[p][c];
    }
    gk[o] = from_f<F>(rj * uj * gyv + gvr);
    P += kj * gvr;
    const float gwv = static_cast<float>(Q - P + cst) * -expf(wj);
    Q += qj;
    if (STATIC)
      gw_acc += gwv;
    else
      static_cast<W*>(gw_out)[o] = from_f<W>(gwv);
  }
  float* g0 = gs0 + (size_t)bh * N * N + (size_t)j * N;
#pragma unroll
  for (int c = 0; c < N; ++c) g0[c] = g[c];
  if (STATIC) static_cast<float*>(gw_out)[bh * N + j] = static_cast<float>(gw_acc);
}

// Scan 3: reverse over time, thread i owns column i of G.
template <int N, typename F, typename W, bool STATIC>
__global__ void __launch_bounds__(N)
    wkv56_bwd_reverse_cols_kernel(int T, int H, const F* __restrict__ r,
                                  const F* __restrict__ k, const W* __restrict__ w,
                                  const float* __restrict__ u, const F* __restrict__ gy,
                                  const float* __restrict__ gsT, F* __restrict__ gv) {
  const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
  __shared__ __align__(16) float sr[2][N], sk[2][N], sd[2][N], su[N];
  su[i] = u[h * N + i];
  float g[N];  // column i of G: g[j] = G[j][i]
  const float* gp = gsT + (size_t)bh * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) g[j] = gp[j * N + i];
  const size_t step = (size_t)H * N;
  size_t o = (size_t)b * T * step + (size_t)h * N + i + (size_t)(T > 0 ? T - 1 : 0) * step;
  const float dstat = STATIC ? decay(load_w<W, STATIC>(w, o, h, N, i)) : 0.f;
  float nr = 0.f, nk = 0.f, nw = 0.f, ng = 0.f;
  if (T > 0) {
    nr = to_f(r[o]), nk = to_f(k[o]), ng = to_f(gy[o]);
    if (!STATIC) nw = to_f(w[o]);
  }
  for (int t = T - 1; t >= 0; --t, o -= step) {
    const int p = t & 1;
    sr[p][i] = nr;
    sk[p][i] = nk;
    sd[p][i] = STATIC ? dstat : decay(nw);
    const float gyi = ng;
    if (t > 0) {
      nr = to_f(r[o - step]), nk = to_f(k[o - step]), ng = to_f(gy[o - step]);
      if (!STATIC) nw = to_f(w[o - step]);
    }
    __syncthreads();
    float a = 0.f, bonus = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      a += sk[p][j] * g[j];
      bonus += sr[p][j] * su[j] * sk[p][j];
      g[j] = g[j] * sd[p][j] + sr[p][j] * gyi;
    }
    gv[o] = from_f<F>(bonus * gyi + a);
  }
}

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
  wkv56_bwd_forward_kernel<N, F, W, STATIC><<<B * H, N, 0, st>>>(
      T, H, rr, kk, vv, ww, u, s0, gg, gsT, static_cast<F*>(gr), q, gu, acc);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return static_cast<int>(e);
  wkv56_bwd_reverse_cols_kernel<N, F, W, STATIC>
      <<<B * H, N, 0, st>>>(T, H, rr, kk, ww, u, gg, gsT, static_cast<F*>(gv));
  e = cudaGetLastError();
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
  switch (N) {
    case 32:
      return by_types(std::integral_constant<int, 32>{});
    case 64:
      return by_types(std::integral_constant<int, 64>{});
    case 128:
      return by_types(std::integral_constant<int, 128>{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
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
