// CUDA WKV kernels for RWKV-5 (static decay) and RWKV-6 (per-token decay): forward and
// backward. Launched by wkv6.cu; kept apart from the launchers (no `<<<>>>` here) so that
// tests/cuda_emu can also compile them as plain C++ and run them on CPU threads.
//
// Maths (reference: rwkv_train/ops/reference.py, wkv6_reference), per (batch, head), with the
// state S[key][value] in float32:
//   y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1}),   S_t = diag(d_t) S_{t-1} + k_t v_t^T,
//   d_t = exp(-exp(w_t)).
// Every scan runs one block of N threads per (batch, head) and walks time sequentially, the
// state held in registers (one column or one row of S per thread); T is a kernel argument.
//
// A scan step is a few hundred cycles of arithmetic, far less than the latency of a global
// load, and with one small block per (batch, head) there are too few warps to hide it. So
// time is walked in chunks of CH steps: each thread loads its element of the next chunk's
// inputs into registers (CH independent loads in flight) while the block computes the
// current chunk from shared memory, and the steps inside a chunk need no barrier. Terms
// that are the same for every thread of a step (the bonus r.(u*k), the product gy.v) are
// reduced once per step when the chunk is staged.
//
// Backward without stored states (three scans):
//   1. forward, thread = key row j:  gr_t = u k_t (gy_t.v_t) + S_{t-1} gy_t,
//      q_t = r_t * (S_{t-1} gy_t), gu += r_t k_t (gy_t.v_t), acc = rowsum(gS_T * S_T);
//   2. reverse, thread = key row j, G_t = dL/dS_t, G_{t-1} = d_t G_t + r_t gy_t^T:
//      gk_t = r_t u (gy_t.v_t) + G_t v_t,  p_t = k_t * (G_t v_t),
//      dL/dlog d_t = sum_{j>t} q_j - sum_{i>=t} p_i + acc,  gw_t = that * (-exp(w_t));
//      gS_0 = G_{-1};
//   3. reverse, thread = value column i:  gv_t = (sum_j r_j u_j k_j) gy_t + G_t^T k_t.
// Scans 1 and 3 are independent and run as one launch (twice the blocks, so twice the warps
// to hide latency); scan 2 needs q and acc from scan 1.

#pragma once

#include <cstddef>
#include <type_traits>

#include "wkv_common.cuh"

namespace rwkv {
namespace wkv56 {

// Steps per chunk: 16, or 8 for N = 128, to bound registers (CH prefetched values per input
// per thread) and shared memory (about 6 arrays of CH x N floats per scan). Scans 1 and 3,
// which run together, take half that: with fewer registers per thread the 2 B H blocks of
// their launch fit on the GPU at once (about 5 blocks of 64 threads per SM).
template <int N, bool HALF = false>
__host__ __device__ constexpr int chunk_steps() {
  return (N > 64 ? 8 : 16) / (HALF ? 2 : 1);
}

// Calls fn(std::integral_constant<int, N>{}) for a head size the kernels are built for, or
// returns `unsupported`. The launchers and the CPU emulation of the kernels both dispatch
// through it, so they cover the same sizes.
template <typename Fn>
__host__ int with_head_size(int N, int unsupported, const Fn& fn) {
  switch (N) {
    case 32:
      return fn(std::integral_constant<int, 32>{});
    case 64:
      return fn(std::integral_constant<int, 64>{});
    case 128:
      return fn(std::integral_constant<int, 128>{});
    default:
      return unsupported;
  }
}

// One thread's element of CH consecutive steps of one input, held raw in registers. `d` is
// the signed distance between steps (negative for the reverse scans).
template <typename X, int CH>
struct Ahead {
  X x[CH] = {};
  __device__ __forceinline__ void load(const X* __restrict__ p, size_t o, ptrdiff_t d, int n) {
#pragma unroll
    for (int c = 0; c < CH; ++c)
      if (c < n) x[c] = p[static_cast<ptrdiff_t>(o) + c * d];
  }
  __device__ __forceinline__ float operator[](int c) const { return to_f(x[c]); }
};

// Sum of row c of a padded (CH x (N + 1)) shared array, for threads c < CH; the padding puts
// the rows in different banks.
template <int N, int CH>
__device__ __forceinline__ void row_sums(const float (*p)[N + 1], float* out, int tid) {
  if (tid < CH) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
    for (int j = 0; j < N; j += 4) {
      a0 += p[tid][j];
      a1 += p[tid][j + 1];
      a2 += p[tid][j + 2];
      a3 += p[tid][j + 3];
    }
    out[tid] = (a0 + a1) + (a2 + a3);
  }
}

// One scan step of a thread's column of the state (or of its gradient), x[j] over keys j:
// returns sum_j a[j] x[j], taken before the update x[j] = x[j] dec[j] + add[j] scale.
template <int N>
__device__ __forceinline__ float dot_then_step_col(float* x, const float* a, const float* dec,
                                                   const float* add, float scale) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
  for (int j = 0; j < N; j += 4) {
    a0 += a[j] * x[j];
    a1 += a[j + 1] * x[j + 1];
    a2 += a[j + 2] * x[j + 2];
    a3 += a[j + 3] * x[j + 3];
    x[j] = x[j] * dec[j] + add[j] * scale;
    x[j + 1] = x[j + 1] * dec[j + 1] + add[j + 1] * scale;
    x[j + 2] = x[j + 2] * dec[j + 2] + add[j + 2] * scale;
    x[j + 3] = x[j + 3] * dec[j + 3] + add[j + 3] * scale;
  }
  return (a0 + a1) + (a2 + a3);
}

// The same for a thread's row, x[c] over values c, whose elements share one key and so one
// decay: x[c] = x[c] dec + scale add[c].
template <int N>
__device__ __forceinline__ float dot_then_step_row(float* x, const float* a, float dec,
                                                   float scale, const float* add) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
  for (int c = 0; c < N; c += 4) {
    a0 += a[c] * x[c];
    a1 += a[c + 1] * x[c + 1];
    a2 += a[c + 2] * x[c + 2];
    a3 += a[c + 3] * x[c + 3];
    x[c] = x[c] * dec + scale * add[c];
    x[c + 1] = x[c + 1] * dec + scale * add[c + 1];
    x[c + 2] = x[c + 2] * dec + scale * add[c + 2];
    x[c + 3] = x[c + 3] * dec + scale * add[c + 3];
  }
  return (a0 + a1) + (a2 + a3);
}

template <typename W, bool STATIC>
__device__ __forceinline__ float static_w(const W* w, int h, int N, int i) {
  return STATIC ? to_f(w[h * N + i]) : 0.f;
}

// Forward, thread i owns column i of S.
template <int N, typename F, typename W, bool STATIC>
__global__ void __launch_bounds__(N)
    wkv56_fwd_kernel(int T, int H, const F* __restrict__ r, const F* __restrict__ k,
                     const F* __restrict__ v, const W* __restrict__ w,
                     const float* __restrict__ u, const float* __restrict__ s0,
                     F* __restrict__ y, float* __restrict__ sT) {
  constexpr int CH = chunk_steps<N>();
  const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
  __shared__ __align__(16) float sr[CH][N], sk[CH][N], sd[CH][N], sv[CH][N];
  __shared__ float sp[CH][N + 1], bonus[CH];
  const float ui = u[h * N + i];
  float s[N];  // column i of the state: s[j] = S[j][i]
  const float* s0p = s0 + (size_t)bh * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) s[j] = s0p[j * N + i];
  const ptrdiff_t step = (ptrdiff_t)H * N;
  const size_t base = (size_t)b * T * step + (size_t)h * N + i;
  const float dstat = STATIC ? decay(static_w<W, STATIC>(w, h, N, i)) : 0.f;
  Ahead<F, CH> ar, ak, av;
  Ahead<W, CH> aw;
  auto fetch = [&](int t0) {
    const int n = min(CH, T - t0);
    const size_t o = base + (size_t)t0 * step;
    ar.load(r, o, step, n), ak.load(k, o, step, n), av.load(v, o, step, n);
    if (!STATIC) aw.load(w, o, step, n);
  };
  if (T > 0) fetch(0);
  for (int t0 = 0; t0 < T; t0 += CH) {
    __syncthreads();  // nobody still reads the previous chunk
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      sr[c][i] = ar[c], sk[c][i] = ak[c], sv[c][i] = av[c];
      sd[c][i] = STATIC ? dstat : decay(aw[c]);
      sp[c][i] = ar[c] * ui * ak[c];
    }
    __syncthreads();
    row_sums<N, CH>(sp, bonus, i);
    if (t0 + CH < T) fetch(t0 + CH);
    __syncthreads();
    const int n = min(CH, T - t0);
    size_t o = base + (size_t)t0 * step;
    for (int c = 0; c < n; ++c, o += step) {
      const float vi = sv[c][i];
      const float ry = dot_then_step_col<N>(s, sr[c], sd[c], sk[c], vi);
      y[o] = from_f<F>(vi * bonus[c] + ry);
    }
  }
  float* sTp = sT + (size_t)bh * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) sTp[j * N + i] = s[j];
}

// Backward scan 1: forward over time, thread j owns row j of S.
template <int N, typename F, typename W, bool STATIC>
__device__ __forceinline__ void bwd_forward_rows(
    int bh, int T, int H, const F* __restrict__ r, const F* __restrict__ k,
    const F* __restrict__ v, const W* __restrict__ w, const float* __restrict__ u,
    const float* __restrict__ s0, const F* __restrict__ gy, const float* __restrict__ gsT,
    F* __restrict__ gr, float* __restrict__ q, float* __restrict__ gu, float* __restrict__ acc) {
  constexpr int CH = chunk_steps<N, true>();
  const int b = bh / H, h = bh % H, j = threadIdx.x;
  __shared__ __align__(16) float sv[CH][N], sg[CH][N], sr[CH][N], sk[CH][N], sd[CH][N];
  __shared__ float sp[CH][N + 1], gdotv[CH];
  float s[N];  // row j of the state
  const float* s0p = s0 + (size_t)bh * N * N + (size_t)j * N;
#pragma unroll
  for (int c = 0; c < N; ++c) s[c] = s0p[c];
  const float uj = u[h * N + j];
  const ptrdiff_t step = (ptrdiff_t)H * N;
  const size_t base = (size_t)b * T * step + (size_t)h * N + j;
  const float dstat = STATIC ? decay(static_w<W, STATIC>(w, h, N, j)) : 0.f;
  Ahead<F, CH> ar, ak, av, ag;
  Ahead<W, CH> aw;
  auto fetch = [&](int t0) {
    const int n = min(CH, T - t0);
    const size_t o = base + (size_t)t0 * step;
    ar.load(r, o, step, n), ak.load(k, o, step, n), av.load(v, o, step, n);
    ag.load(gy, o, step, n);
    if (!STATIC) aw.load(w, o, step, n);
  };
  if (T > 0) fetch(0);
  float gu_acc = 0.f;
  for (int t0 = 0; t0 < T; t0 += CH) {
    __syncthreads();
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      sv[c][j] = av[c], sg[c][j] = ag[c], sr[c][j] = ar[c], sk[c][j] = ak[c];
      sd[c][j] = STATIC ? dstat : decay(aw[c]);
      sp[c][j] = ag[c] * av[c];
    }
    __syncthreads();
    row_sums<N, CH>(sp, gdotv, j);
    if (t0 + CH < T) fetch(t0 + CH);
    __syncthreads();
    const int n = min(CH, T - t0);
    size_t o = base + (size_t)t0 * step;
    for (int t = 0; t < n; ++t, o += step) {
      const float rj = sr[t][j], kj = sk[t][j], dj = sd[t][j], gyv = gdotv[t];
      const float a = dot_then_step_row<N>(s, sg[t], dj, kj, sv[t]);
      gr[o] = from_f<F>(uj * kj * gyv + a);
      q[o] = rj * a;
      gu_acc += rj * kj * gyv;
    }
  }
  const float* gp = gsT + (size_t)bh * N * N + (size_t)j * N;
  float x = 0.f;
#pragma unroll
  for (int c = 0; c < N; ++c) x += gp[c] * s[c];
  acc[bh * N + j] = x;
  gu[bh * N + j] = gu_acc;
}

// Backward scan 3: reverse over time, thread i owns column i of G.
template <int N, typename F, typename W, bool STATIC>
__device__ __forceinline__ void bwd_reverse_cols(int bh, int T, int H, const F* __restrict__ r,
                                                 const F* __restrict__ k,
                                                 const W* __restrict__ w,
                                                 const float* __restrict__ u,
                                                 const F* __restrict__ gy,
                                                 const float* __restrict__ gsT,
                                                 F* __restrict__ gv) {
  constexpr int CH = chunk_steps<N, true>();
  const int b = bh / H, h = bh % H, i = threadIdx.x;
  __shared__ __align__(16) float sr[CH][N], sk[CH][N], sd[CH][N], sg[CH][N];
  __shared__ float sp[CH][N + 1], bonus[CH];
  const float ui = u[h * N + i];
  float g[N];  // column i of G: g[j] = G[j][i]
  const float* gp = gsT + (size_t)bh * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) g[j] = gp[j * N + i];
  const ptrdiff_t step = (ptrdiff_t)H * N;
  const size_t base = (size_t)b * T * step + (size_t)h * N + i;  // time 0
  const float dstat = STATIC ? decay(static_w<W, STATIC>(w, h, N, i)) : 0.f;
  Ahead<F, CH> ar, ak, ag;
  Ahead<W, CH> aw;
  // Chunk starting at time t0 (walking back): element c is time t0 - c.
  auto fetch = [&](int t0) {
    const int n = min(CH, t0 + 1);
    const size_t o = base + (size_t)t0 * step;
    ar.load(r, o, -step, n), ak.load(k, o, -step, n), ag.load(gy, o, -step, n);
    if (!STATIC) aw.load(w, o, -step, n);
  };
  if (T > 0) fetch(T - 1);
  for (int t0 = T - 1; t0 >= 0; t0 -= CH) {
    __syncthreads();
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      sr[c][i] = ar[c], sk[c][i] = ak[c], sg[c][i] = ag[c];
      sd[c][i] = STATIC ? dstat : decay(aw[c]);
      sp[c][i] = ar[c] * ui * ak[c];
    }
    __syncthreads();
    row_sums<N, CH>(sp, bonus, i);
    if (t0 - CH >= 0) fetch(t0 - CH);
    __syncthreads();
    const int n = min(CH, t0 + 1);
    size_t o = base + (size_t)t0 * step;
    for (int c = 0; c < n; ++c, o -= step) {
      const float gyi = sg[c][i];
      const float kg = dot_then_step_col<N>(g, sk[c], sd[c], sr[c], gyi);
      gv[o] = from_f<F>(bonus[c] * gyi + kg);
    }
  }
}

// Scans 1 and 3 in one launch: blocks [0, BH) run scan 1, blocks [BH, 2 BH) scan 3.
template <int N, typename F, typename W, bool STATIC>
__global__ void __launch_bounds__(N)
    wkv56_bwd_scans13_kernel(int BH, int T, int H, const F* __restrict__ r,
                             const F* __restrict__ k, const F* __restrict__ v,
                             const W* __restrict__ w, const float* __restrict__ u,
                             const float* __restrict__ s0, const F* __restrict__ gy,
                             const float* __restrict__ gsT, F* __restrict__ gr,
                             F* __restrict__ gv, float* __restrict__ q, float* __restrict__ gu,
                             float* __restrict__ acc) {
  if (blockIdx.x < BH)
    bwd_forward_rows<N, F, W, STATIC>(blockIdx.x, T, H, r, k, v, w, u, s0, gy, gsT, gr, q, gu,
                                      acc);
  else
    bwd_reverse_cols<N, F, W, STATIC>(blockIdx.x - BH, T, H, r, k, w, u, gy, gsT, gv);
}

// Backward scan 2: reverse over time, thread j owns row j of G = dL/dS.
template <int N, typename F, typename W, bool STATIC>
__global__ void __launch_bounds__(N)
    wkv56_bwd_reverse_rows_kernel(int T, int H, const F* __restrict__ r,
                                  const F* __restrict__ k, const F* __restrict__ v,
                                  const W* __restrict__ w, const float* __restrict__ u,
                                  const F* __restrict__ gy, const float* __restrict__ gsT,
                                  const float* __restrict__ q, const float* __restrict__ acc,
                                  F* __restrict__ gk, void* __restrict__ gw_out,
                                  float* __restrict__ gs0) {
  constexpr int CH = chunk_steps<N>();
  const int bh = blockIdx.x, b = bh / H, h = bh % H, j = threadIdx.x;
  __shared__ __align__(16) float sv[CH][N], sg[CH][N], sr[CH][N], sk[CH][N], se[CH][N],
      sq[CH][N];
  __shared__ float sp[CH][N + 1], gdotv[CH];
  float g[N];
  const float* gp = gsT + (size_t)bh * N * N + (size_t)j * N;
#pragma unroll
  for (int c = 0; c < N; ++c) g[c] = gp[c];
  const float uj = u[h * N + j], cst = acc[bh * N + j];
  const ptrdiff_t step = (ptrdiff_t)H * N;
  const size_t base = (size_t)b * T * step + (size_t)h * N + j;  // time 0
  const float estat = STATIC ? expf(static_w<W, STATIC>(w, h, N, j)) : 0.f;
  Ahead<F, CH> ar, ak, av, ag;
  Ahead<W, CH> aw;
  Ahead<float, CH> aq;
  auto fetch = [&](int t0) {
    const int n = min(CH, t0 + 1);
    const size_t o = base + (size_t)t0 * step;
    ar.load(r, o, -step, n), ak.load(k, o, -step, n), av.load(v, o, -step, n);
    ag.load(gy, o, -step, n), aq.load(q, o, -step, n);
    if (!STATIC) aw.load(w, o, -step, n);
  };
  if (T > 0) fetch(T - 1);
  // The decay gradient is a difference of running sums that grow with T: keep them in double
  // so it stays accurate at long T (float lost about 1e-3 relative at T = 4096).
  double P = 0.0, Q = 0.0, gw_acc = 0.0;
  for (int t0 = T - 1; t0 >= 0; t0 -= CH) {
    __syncthreads();
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      sv[c][j] = av[c], sg[c][j] = ag[c], sr[c][j] = ar[c], sk[c][j] = ak[c], sq[c][j] = aq[c];
      se[c][j] = STATIC ? estat : expf(aw[c]);  // exp(w): the decay is exp(-exp(w))
      sp[c][j] = ag[c] * av[c];
    }
    __syncthreads();
    row_sums<N, CH>(sp, gdotv, j);
    if (t0 - CH >= 0) fetch(t0 - CH);
    __syncthreads();
    const int n = min(CH, t0 + 1);
    size_t o = base + (size_t)t0 * step;
    for (int t = 0; t < n; ++t, o -= step) {
      const float rj = sr[t][j], kj = sk[t][j], ej = se[t][j], dj = expf(-ej);
      const float gvr = dot_then_step_row<N>(g, sv[t], dj, rj, sg[t]);
      gk[o] = from_f<F>(rj * uj * gdotv[t] + gvr);
      P += kj * gvr;
      const float gwv = static_cast<float>(Q - P + cst) * -ej;
      Q += sq[t][j];
      if (STATIC)
        gw_acc += gwv;
      else
        static_cast<W*>(gw_out)[o] = from_f<W>(gwv);
    }
  }
  float* g0 = gs0 + (size_t)bh * N * N + (size_t)j * N;
#pragma unroll
  for (int c = 0; c < N; ++c) g0[c] = g[c];
  if (STATIC) static_cast<float*>(gw_out)[bh * N + j] = static_cast<float>(gw_acc);
}

}  // namespace wkv56
}  // namespace rwkv
