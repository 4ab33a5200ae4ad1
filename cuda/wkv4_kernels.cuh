// CUDA WKV kernels for RWKV-4: the numerically stable channel-wise scan, forward and
// backward. Launched by wkv4.cu; kept apart from the launchers (no `<<<>>>` here) so that
// tests/cuda_emu can also compile them as plain C++ and run them on CPU threads.
//
// Maths (reference: rwkv_train/ops/reference.py, wkv4_reference), per (batch, channel), state
// (aa, bb, pp) in float32, ew = -exp(w):
//   p = max(pp, u + k_t); y_t = (e^{pp-p} aa + e^{u+k_t-p} v_t) / (e^{pp-p} bb + e^{u+k_t-p})
//   p = max(ew + pp, k_t); aa = e^{ew+pp-p} aa + e^{k_t-p} v_t; bb = e^{ew+pp-p} bb + e^{k_t-p};
//   pp = p.
// One thread per (batch, channel); T is a kernel argument. The backward first recomputes the
// state before every step into a scratch buffer, then walks back through the exact graph of
// the scan (a max passes its gradient to the larger argument, half to each on a tie, as
// autograd does), so the initial-state gradient matches the reference's.

#pragma once

#include "wkv_common.cuh"

namespace rwkv {
namespace wkv4 {

template <typename F>
__global__ void wkv4_fwd_kernel(int B, int T, int C, const F* __restrict__ k,
                                const F* __restrict__ v, const float* __restrict__ w,
                                const float* __restrict__ u, const float* __restrict__ s0,
                                F* __restrict__ y, float* __restrict__ sT) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int b = idx / C, c = idx % C;
  float aa = s0[(b * 3 + 0) * C + c], bb = s0[(b * 3 + 1) * C + c],
        pp = s0[(b * 3 + 2) * C + c];
  const float ew = -expf(w[c]), uc = u[c];
  size_t o = (size_t)b * T * C + c;
  for (int t = 0; t < T; ++t, o += C) {
    const float kt = to_f(k[o]), vt = to_f(v[o]);
    float ww = uc + kt, p = fmaxf(pp, ww);
    float e1 = expf(pp - p), e2 = expf(ww - p);
    y[o] = from_f<F>((e1 * aa + e2 * vt) / (e1 * bb + e2));
    ww = ew + pp;
    p = fmaxf(ww, kt);
    e1 = expf(ww - p);
    e2 = expf(kt - p);
    aa = e1 * aa + e2 * vt;
    bb = e1 * bb + e2;
    pp = p;
  }
  sT[(b * 3 + 0) * C + c] = aa;
  sT[(b * 3 + 1) * C + c] = bb;
  sT[(b * 3 + 2) * C + c] = pp;
}

__device__ __forceinline__ void max_grad(float a, float b, float g, float& ga, float& gb) {
  if (a > b) {
    ga += g;
  } else if (b > a) {
    gb += g;
  } else {
    ga += 0.5f * g;
    gb += 0.5f * g;
  }
}

template <typename F>
__global__ void wkv4_bwd_kernel(int B, int T, int C, const F* __restrict__ k,
                                const F* __restrict__ v, const float* __restrict__ w,
                                const float* __restrict__ u, const float* __restrict__ s0,
                                const F* __restrict__ gy, const float* __restrict__ gsT,
                                F* __restrict__ gk, F* __restrict__ gv, float* __restrict__ gw,
                                float* __restrict__ gu, float* __restrict__ gs0,
                                float* __restrict__ st) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int b = idx / C, c = idx % C;
  float aa = s0[(b * 3 + 0) * C + c], bb = s0[(b * 3 + 1) * C + c],
        pp = s0[(b * 3 + 2) * C + c];
  const float ew = -expf(w[c]), uc = u[c];
  // st is (B, T, 3, C): the state before each step.
  size_t o = (size_t)b * T * C + c;
  size_t so = (size_t)b * T * 3 * C + c;
  for (int t = 0; t < T; ++t, o += C, so += 3 * C) {
    st[so] = aa;
    st[so + C] = bb;
    st[so + 2 * C] = pp;
    const float kt = to_f(k[o]), vt = to_f(v[o]);
    const float ww = ew + pp, p = fmaxf(ww, kt);
    const float e1 = expf(ww - p), e2 = expf(kt - p);
    aa = e1 * aa + e2 * vt;
    bb = e1 * bb + e2;
    pp = p;
  }
  float gaa = gsT[(b * 3 + 0) * C + c], gbb = gsT[(b * 3 + 1) * C + c],
        gpp = gsT[(b * 3 + 2) * C + c];
  float gew = 0.f, guc = 0.f;
  for (int t = T - 1; t >= 0; --t) {
    o -= C;
    so -= 3 * C;
    const float kt = to_f(k[o]), vt = to_f(v[o]);
    aa = st[so];
    bb = st[so + C];
    pp = st[so + 2 * C];
    float gk_t = 0.f, gv_t = 0.f;
    // state update
    const float ww2 = ew + pp, p2 = fmaxf(ww2, kt);
    const float f1 = expf(ww2 - p2), f2 = expf(kt - p2);
    const float gf1 = gaa * aa + gbb * bb, gf2 = gaa * vt + gbb;
    gv_t += gaa * f2;
    float n_gaa = gaa * f1, n_gbb = gbb * f1;
    float gww2 = gf1 * f1;
    gk_t += gf2 * f2;
    max_grad(ww2, kt, gpp - gf1 * f1 - gf2 * f2, gww2, gk_t);
    gew += gww2;
    float n_gpp = gww2;
    // output
    const float ww1 = uc + kt, p1 = fmaxf(pp, ww1);
    const float e1 = expf(pp - p1), e2 = expf(ww1 - p1);
    const float den = e1 * bb + e2, yv = (e1 * aa + e2 * vt) / den;
    const float g = to_f(gy[o]), gnum = g / den, gden = -g * yv / den;
    const float ge1 = gnum * aa + gden * bb, ge2 = gnum * vt + gden;
    n_gaa += gnum * e1;
    n_gbb += gden * e1;
    gv_t += gnum * e2;
    n_gpp += ge1 * e1;
    float gww1 = ge2 * e2;
    max_grad(pp, ww1, -ge1 * e1 - ge2 * e2, n_gpp, gww1);
    guc += gww1;
    gk_t += gww1;
    gk[o] = from_f<F>(gk_t);
    gv[o] = from_f<F>(gv_t);
    gaa = n_gaa;
    gbb = n_gbb;
    gpp = n_gpp;
  }
  gs0[(b * 3 + 0) * C + c] = gaa;
  gs0[(b * 3 + 1) * C + c] = gbb;
  gs0[(b * 3 + 2) * C + c] = gpp;
  gw[b * C + c] = gew * ew;
  gu[b * C + c] = guc;
}

}  // namespace wkv4
}  // namespace rwkv
