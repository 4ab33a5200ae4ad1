// Fused CPU WKV operators for RWKV-4/5/6: forward and hand-written backward.
//
// Everything is computed in float32 whatever the input dtype: the binding converts inputs to
// contiguous float32, runs the scans, and casts outputs and gradients back to the dtypes of
// the inputs (bf16 in, bf16 out). The state is always float32.
//
// Shapes follow rwkv_train/ops/__init__.py: r, k, v, w (B, T, H, N), the v5 decay w (H, N),
// u (H, N), state (B, H, N, N) indexed [key, value]; wkv4: k, v (B, T, C), w, u (C,),
// state (B, 3, C) = (aa, bb, pp). The maths (and the float64 recurrences the tests compare
// against) is in rwkv_train/ops/reference.py; the CUDA kernels in wkv6.cu / wkv4.cu compute
// the same things with the same backward identities.
//
// The v5/v6 backward needs no stored states: one forward sweep recomputes S_{t-1} and gives
// gr_t and q_t = r_t * (S_{t-1} gy_t); one reverse sweep carries G_t = dL/dS_t and gives gk,
// gv and p_t = k_t * (G_t v_t). The decay gradient follows from suffix sums of the two:
//   dL/dlog d_t = sum_{j>t} q_j - sum_{i>=t} p_i + sum_v gS_T * S_T.
// Work is split over (batch, head) pairs (or batch x channel blocks for v4) with
// at::parallel_for.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// ----------------------------------------------------------------------------- RWKV-5/6

// The hot loops get an AVX2+FMA clone where the CPU has one (chosen at load time, so a build
// cached on a shared filesystem still runs on older nodes), besides the baseline build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define WKV_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define WKV_CLONES
#endif

// Views of one (b, h) pair. The decays are precomputed by the caller: ew = exp(w) and
// d = exp(-ew), per token (stride H*N between steps) or static (stride 0, RWKV-5).
struct Bh {
  int64_t T, step;            // steps, elements between consecutive steps
  const float *r, *k, *v, *gy;  // (T, ., N) views at the pair's first element
  const float *d, *ew;        // decay and exp(w) at step 0
  int64_t wstep;              // step of d / ew: `step`, or 0 for a static decay
  const float* u;             // (N,)
};

// Forward scan of one pair; NC is the head size when known at compile time (0: use n).
template <int NC>
WKV_CLONES void fwd_scan(const Bh& a, int64_t n_rt, const float* __restrict s0,
                         float* __restrict y, float* __restrict sT) {
  const int64_t n = NC ? NC : n_rt;
  std::vector<float> state(s0, s0 + n * n), yacc(n);
  float* __restrict S = state.data();
  float* __restrict acc = yacc.data();
  for (int64_t t = 0; t < a.T; ++t) {
    const float* __restrict rt = a.r + t * a.step;
    const float* __restrict kt = a.k + t * a.step;
    const float* __restrict vt = a.v + t * a.step;
    const float* __restrict dt = a.d + t * a.wstep;
    float bonus = 0.f;  // sum_j r_j u_j k_j: the current token's own contribution
    for (int64_t c = 0; c < n; ++c) acc[c] = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const float rj = rt[j], kj = kt[j], dj = dt[j];
      bonus += rj * a.u[j] * kj;
      float* __restrict row = S + j * n;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        acc[c] += rj * row[c];
        row[c] = row[c] * dj + kj * vt[c];
      }
    }
    float* __restrict yt = y + t * a.step;
    for (int64_t c = 0; c < n; ++c) yt[c] = acc[c] + bonus * vt[c];
  }
  std::copy(S, S + n * n, sT);
}

// Backward of one pair. gw_t is written per token, or summed into gw_sum for a static decay.
template <int NC>
WKV_CLONES void bwd_scan(const Bh& a, int64_t n_rt, const float* __restrict s0,
                         const float* __restrict gsT, float* __restrict gr,
                         float* __restrict gk, float* __restrict gv, float* __restrict gw,
                         float* __restrict gw_sum, float* __restrict gu,
                         float* __restrict gs0) {
  const int64_t n = NC ? NC : n_rt;
  std::vector<float> buf(2 * n * n + a.T * n + 6 * n, 0.f);
  float* __restrict S = buf.data();
  float* __restrict G = S + n * n;
  float* __restrict q = G + n * n;  // (T, n)
  float* __restrict gu_acc = q + a.T * n;
  float* __restrict fin = gu_acc + n;  // sum_v gS_T * S_T per key
  float* __restrict P = fin + n;
  float* __restrict Q = P + n;
  float* __restrict gw_acc = Q + n;
  float* __restrict gvacc = gw_acc + n;
  std::copy(s0, s0 + n * n, S);

  // Forward sweep: S_{t-1} -> gr_t, q_t = r_t * (S_{t-1} gy_t), gu.
  for (int64_t t = 0; t < a.T; ++t) {
    const float* __restrict rt = a.r + t * a.step;
    const float* __restrict kt = a.k + t * a.step;
    const float* __restrict vt = a.v + t * a.step;
    const float* __restrict gyt = a.gy + t * a.step;
    const float* __restrict dt = a.d + t * a.wstep;
    float gyv = 0.f;
#pragma omp simd reduction(+ : gyv)
    for (int64_t c = 0; c < n; ++c) gyv += gyt[c] * vt[c];
    for (int64_t j = 0; j < n; ++j) {
      float* __restrict row = S + j * n;
      const float kj = kt[j], dj = dt[j];
      float x = 0.f;
#pragma omp simd reduction(+ : x)
      for (int64_t c = 0; c < n; ++c) {
        x += gyt[c] * row[c];
        row[c] = row[c] * dj + kj * vt[c];
      }
      gr[t * a.step + j] = a.u[j] * kj * gyv + x;
      q[t * n + j] = rt[j] * x;
      gu_acc[j] += rt[j] * kj * gyv;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    float x = 0.f;
#pragma omp simd reduction(+ : x)
    for (int64_t c = 0; c < n; ++c) x += gsT[j * n + c] * S[j * n + c];
    fin[j] = x;
  }

  // Reverse sweep: G_t = dL/dS_t -> gk_t, gv_t, gw_t; G_{t-1} = d_t G_t + r_t gy_t^T.
  std::copy(gsT, gsT + n * n, G);
  for (int64_t t = a.T - 1; t >= 0; --t) {
    const float* __restrict rt = a.r + t * a.step;
    const float* __restrict kt = a.k + t * a.step;
    const float* __restrict vt = a.v + t * a.step;
    const float* __restrict gyt = a.gy + t * a.step;
    const float* __restrict dt = a.d + t * a.wstep;
    const float* __restrict ewt = a.ew + t * a.wstep;
    float gyv = 0.f, bonus = 0.f;
#pragma omp simd reduction(+ : gyv)
    for (int64_t c = 0; c < n; ++c) gyv += gyt[c] * vt[c];
    for (int64_t c = 0; c < n; ++c) gvacc[c] = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      float* __restrict row = G + j * n;
      const float rj = rt[j], kj = kt[j], dj = dt[j];
      bonus += rj * a.u[j] * kj;
      float x = 0.f;
#pragma omp simd reduction(+ : x)
      for (int64_t c = 0; c < n; ++c) {
        x += row[c] * vt[c];
        gvacc[c] += kj * row[c];
        row[c] = row[c] * dj + rj * gyt[c];
      }
      gk[t * a.step + j] = rj * a.u[j] * gyv + x;
      P[j] += kj * x;
      const float g = (Q[j] - P[j] + fin[j]) * -ewt[j];
      Q[j] += q[t * n + j];
      if (gw_sum)
        gw_acc[j] += g;
      else
        gw[t * a.step + j] = g;
    }
    float* __restrict gvt = gv + t * a.step;
    for (int64_t c = 0; c < n; ++c) gvt[c] = gvacc[c] + bonus * gyt[c];
  }
  std::copy(G, G + n * n, gs0);
  for (int64_t j = 0; j < n; ++j) {
    gu[j] = gu_acc[j];
    if (gw_sum) gw_sum[j] = gw_acc[j];
  }
}

// The pair (b, h) of (B, T, H, N) tensors, with precomputed decays d and ew.
Bh pair_view(int64_t T, int64_t H, int64_t N, int64_t b, int64_t h, const float* r,
             const float* k, const float* v, const float* gy, const float* d, const float* ew,
             bool static_w, const float* u) {
  const int64_t o = (b * T * H + h) * N;
  const int64_t wo = static_w ? h * N : o;
  return Bh{T,       H * N,       r + o,       k + o,          v + o, gy ? gy + o : nullptr,
            d + wo,  ew + wo,     static_w ? 0 : H * N, u + h * N};
}

void check_56(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& s0,
              bool static_w) {
  TORCH_CHECK(r.dim() == 4, "r must be (B, T, H, N), got ", r.sizes());
  TORCH_CHECK(k.sizes() == r.sizes() && v.sizes() == r.sizes(), "r, k, v shapes differ");
  const auto B = r.size(0), H = r.size(2), N = r.size(3);
  if (static_w) {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == H && w.size(1) == N, "w must be (H, N)");
  } else {
    TORCH_CHECK(w.sizes() == r.sizes(), "w must be (B, T, H, N) like r");
  }
  TORCH_CHECK(u.dim() == 2 && u.size(0) == H && u.size(1) == N, "u must be (H, N)");
  TORCH_CHECK(s0.dim() == 4 && s0.size(0) == B && s0.size(1) == H && s0.size(2) == N &&
                  s0.size(3) == N,
              "state must be (B, H, N, N)");
  for (const auto* t : {&r, &k, &v, &w, &u, &s0})
    TORCH_CHECK(t->device().is_cpu(), "the cpp WKV op takes CPU tensors");
}

torch::Tensor f32(const torch::Tensor& x) { return x.to(torch::kFloat).contiguous(); }

// Pairs per task: small problems run on one thread, where waking the pool costs more than the
// work (about a million multiply-adds per task at least).
int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, work_per_item));
}

std::vector<torch::Tensor> wkv56_forward(torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                         torch::Tensor w, torch::Tensor u, torch::Tensor s0,
                                         bool static_w) {
  check_56(r, k, v, w, u, s0, static_w);
  const auto B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  auto rf = f32(r), kf = f32(k), vf = f32(v), uf = f32(u), sf = f32(s0);
  auto ew = f32(w).exp();  // torch's vectorised exp, once for the whole tensor
  auto d = (-ew).exp();
  auto y = torch::empty(r.sizes(), rf.options());
  auto sT = torch::empty(s0.sizes(), sf.options());
  at::parallel_for(0, B * H, grain(T * N * N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, o = (b * T * H + h) * N;
      const Bh a = pair_view(T, H, N, b, h, rf.data_ptr<float>(), kf.data_ptr<float>(),
                             vf.data_ptr<float>(), nullptr, d.data_ptr<float>(),
                             ew.data_ptr<float>(), static_w, uf.data_ptr<float>());
      const float* s0p = sf.data_ptr<float>() + i * N * N;
      float* sTp = sT.data_ptr<float>() + i * N * N;
      if (N == 64)
        fwd_scan<64>(a, N, s0p, y.data_ptr<float>() + o, sTp);
      else
        fwd_scan<0>(a, N, s0p, y.data_ptr<float>() + o, sTp);
    }
  });
  return {y.to(r.scalar_type()), sT};
}

std::vector<torch::Tensor> wkv56_backward(torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                          torch::Tensor w, torch::Tensor u, torch::Tensor s0,
                                          torch::Tensor gy, torch::Tensor gsT, bool static_w) {
  check_56(r, k, v, w, u, s0, static_w);
  TORCH_CHECK(gy.sizes() == r.sizes() && gsT.sizes() == s0.sizes(), "gradient shapes differ");
  const auto B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  auto rf = f32(r), kf = f32(k), vf = f32(v), uf = f32(u), sf = f32(s0);
  auto gyf = f32(gy), gsf = f32(gsT);
  auto ew = f32(w).exp();
  auto d = (-ew).exp();
  auto opt = rf.options();
  auto gr = torch::empty(r.sizes(), opt), gk = torch::empty(r.sizes(), opt),
       gv = torch::empty(r.sizes(), opt);
  auto gw = static_w ? torch::empty({B, H, N}, opt) : torch::empty(r.sizes(), opt);
  auto gu = torch::empty({B, H, N}, opt);
  auto gs0 = torch::empty(s0.sizes(), opt);
  at::parallel_for(0, B * H, grain(T * N * N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, o = (b * T * H + h) * N;
      const Bh a = pair_view(T, H, N, b, h, rf.data_ptr<float>(), kf.data_ptr<float>(),
                             vf.data_ptr<float>(), gyf.data_ptr<float>(), d.data_ptr<float>(),
                             ew.data_ptr<float>(), static_w, uf.data_ptr<float>());
      float* gwp = static_w ? nullptr : gw.data_ptr<float>() + o;
      float* gw_sum = static_w ? gw.data_ptr<float>() + i * N : nullptr;
      auto run = [&](auto scan) {
        scan(a, N, sf.data_ptr<float>() + i * N * N, gsf.data_ptr<float>() + i * N * N,
             gr.data_ptr<float>() + o, gk.data_ptr<float>() + o, gv.data_ptr<float>() + o, gwp,
             gw_sum, gu.data_ptr<float>() + i * N, gs0.data_ptr<float>() + i * N * N);
      };
      if (N == 64)
        run(bwd_scan<64>);
      else
        run(bwd_scan<0>);
    }
  });
  if (static_w) gw = gw.sum(0);
  return {gr.to(r.scalar_type()), gk.to(k.scalar_type()), gv.to(v.scalar_type()),
          gw.to(w.scalar_type()),  gu.sum(0).to(u.scalar_type()), gs0.to(s0.scalar_type())};
}

// ----------------------------------------------------------------------------- RWKV-4

// Channels [c0, c1) of batch b: the stable scan of reference.py, state (aa, bb, pp).
void wkv4_forward_block(int64_t T, int64_t C, int64_t b, int64_t c0, int64_t c1,
                        const float* k, const float* v, const float* w, const float* u,
                        const float* s0, float* y, float* sT) {
  for (int64_t c = c0; c < c1; ++c) {
    float aa = s0[(b * 3 + 0) * C + c], bb = s0[(b * 3 + 1) * C + c],
          pp = s0[(b * 3 + 2) * C + c];
    const float ew = -std::exp(w[c]), uc = u[c];
    for (int64_t t = 0; t < T; ++t) {
      const int64_t o = (b * T + t) * C + c;
      const float kt = k[o], vt = v[o];
      float ww = uc + kt, p = std::max(pp, ww);
      float e1 = std::exp(pp - p), e2 = std::exp(ww - p);
      y[o] = (e1 * aa + e2 * vt) / (e1 * bb + e2);
      ww = ew + pp;
      p = std::max(ww, kt);
      e1 = std::exp(ww - p);
      e2 = std::exp(kt - p);
      aa = e1 * aa + e2 * vt;
      bb = e1 * bb + e2;
      pp = p;
    }
    sT[(b * 3 + 0) * C + c] = aa;
    sT[(b * 3 + 1) * C + c] = bb;
    sT[(b * 3 + 2) * C + c] = pp;
  }
}

// The gradient of max(a, b) goes to the larger argument, split in half on a tie (as autograd).
inline void max_grad(float a, float b, float g, float& ga, float& gb) {
  if (a > b)
    ga += g;
  else if (b > a)
    gb += g;
  else {
    ga += 0.5f * g;
    gb += 0.5f * g;
  }
}

// Backward of one channel: recompute the states before every step, then walk back through
// the exact graph of the stable recurrence (the max branches included).
void wkv4_backward_block(int64_t T, int64_t C, int64_t b, int64_t c0, int64_t c1,
                         const float* k, const float* v, const float* w, const float* u,
                         const float* s0, const float* gy, const float* gsT, float* gk,
                         float* gv, float* gw, float* gu, float* gs0) {
  std::vector<float> st(3 * T);
  for (int64_t c = c0; c < c1; ++c) {
    float aa = s0[(b * 3 + 0) * C + c], bb = s0[(b * 3 + 1) * C + c],
          pp = s0[(b * 3 + 2) * C + c];
    const float ew = -std::exp(w[c]), uc = u[c];
    for (int64_t t = 0; t < T; ++t) {
      const int64_t o = (b * T + t) * C + c;
      st[3 * t] = aa;
      st[3 * t + 1] = bb;
      st[3 * t + 2] = pp;
      const float kt = k[o], vt = v[o];
      const float ww = ew + pp, p = std::max(ww, kt);
      const float e1 = std::exp(ww - p), e2 = std::exp(kt - p);
      aa = e1 * aa + e2 * vt;
      bb = e1 * bb + e2;
      pp = p;
    }
    float gaa = gsT[(b * 3 + 0) * C + c], gbb = gsT[(b * 3 + 1) * C + c],
          gpp = gsT[(b * 3 + 2) * C + c];
    float gew = 0.f, guc = 0.f;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t o = (b * T + t) * C + c;
      const float kt = k[o], vt = v[o];
      aa = st[3 * t];
      bb = st[3 * t + 1];
      pp = st[3 * t + 2];
      float gk_t = 0.f, gv_t = 0.f;
      // State update: aa' = f1 aa + f2 v, bb' = f1 bb + f2, pp' = p2 = max(ew + pp, k).
      const float ww2 = ew + pp, p2 = std::max(ww2, kt);
      const float f1 = std::exp(ww2 - p2), f2 = std::exp(kt - p2);
      const float gf1 = gaa * aa + gbb * bb, gf2 = gaa * vt + gbb;
      gv_t += gaa * f2;
      float n_gaa = gaa * f1, n_gbb = gbb * f1;
      float gww2 = gf1 * f1;
      gk_t += gf2 * f2;
      const float gp2 = gpp - gf1 * f1 - gf2 * f2;
      max_grad(ww2, kt, gp2, gww2, gk_t);
      gew += gww2;
      float n_gpp = gww2;
      // Output: y = (e1 aa + e2 v) / (e1 bb + e2), e1 = exp(pp - p1), e2 = exp(u + k - p1).
      const float ww1 = uc + kt, p1 = std::max(pp, ww1);
      const float e1 = std::exp(pp - p1), e2 = std::exp(ww1 - p1);
      const float den = e1 * bb + e2, yv = (e1 * aa + e2 * vt) / den;
      const float gyt = gy[o], gnum = gyt / den, gden = -gyt * yv / den;
      const float ge1 = gnum * aa + gden * bb, ge2 = gnum * vt + gden;
      n_gaa += gnum * e1;
      n_gbb += gden * e1;
      gv_t += gnum * e2;
      n_gpp += ge1 * e1;
      float gww1 = ge2 * e2;
      const float gp1 = -ge1 * e1 - ge2 * e2;
      max_grad(pp, ww1, gp1, n_gpp, gww1);
      guc += gww1;
      gk_t += gww1;
      gk[o] = gk_t;
      gv[o] = gv_t;
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
}

void check_4(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& w,
             const torch::Tensor& u, const torch::Tensor& s0) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k, v must be (B, T, C)");
  const auto B = k.size(0), C = k.size(2);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C && u.sizes() == w.sizes(), "w, u must be (C,)");
  TORCH_CHECK(s0.dim() == 3 && s0.size(0) == B && s0.size(1) == 3 && s0.size(2) == C,
              "state must be (B, 3, C)");
  for (const auto* t : {&k, &v, &w, &u, &s0})
    TORCH_CHECK(t->device().is_cpu(), "the cpp WKV op takes CPU tensors");
}

constexpr int64_t kChannelBlock = 16;

std::vector<torch::Tensor> wkv4_forward(torch::Tensor k, torch::Tensor v, torch::Tensor w,
                                        torch::Tensor u, torch::Tensor s0) {
  check_4(k, v, w, u, s0);
  const auto B = k.size(0), T = k.size(1), C = k.size(2);
  auto kf = f32(k), vf = f32(v), wf = f32(w), uf = f32(u), sf = f32(s0);
  auto y = torch::empty(k.sizes(), kf.options());
  auto sT = torch::empty(s0.sizes(), sf.options());
  const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, B * nblk, grain(T * kChannelBlock * 16), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nblk, c0 = (i % nblk) * kChannelBlock;
      wkv4_forward_block(T, C, b, c0, std::min(C, c0 + kChannelBlock), kf.data_ptr<float>(),
                         vf.data_ptr<float>(), wf.data_ptr<float>(), uf.data_ptr<float>(),
                         sf.data_ptr<float>(), y.data_ptr<float>(), sT.data_ptr<float>());
    }
  });
  return {y.to(k.scalar_type()), sT};
}

std::vector<torch::Tensor> wkv4_backward(torch::Tensor k, torch::Tensor v, torch::Tensor w,
                                         torch::Tensor u, torch::Tensor s0, torch::Tensor gy,
                                         torch::Tensor gsT) {
  check_4(k, v, w, u, s0);
  TORCH_CHECK(gy.sizes() == k.sizes() && gsT.sizes() == s0.sizes(), "gradient shapes differ");
  const auto B = k.size(0), T = k.size(1), C = k.size(2);
  auto kf = f32(k), vf = f32(v), wf = f32(w), uf = f32(u), sf = f32(s0);
  auto gyf = f32(gy), gsf = f32(gsT);
  auto opt = kf.options();
  auto gk = torch::empty(k.sizes(), opt), gv = torch::empty(k.sizes(), opt);
  auto gw = torch::empty({B, C}, opt), gu = torch::empty({B, C}, opt);
  auto gs0 = torch::empty(s0.sizes(), opt);
  const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, B * nblk, grain(T * kChannelBlock * 16), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nblk, c0 = (i % nblk) * kChannelBlock;
      wkv4_backward_block(T, C, b, c0, std::min(C, c0 + kChannelBlock), kf.data_ptr<float>(),
                          vf.data_ptr<float>(), wf.data_ptr<float>(), uf.data_ptr<float>(),
                          sf.data_ptr<float>(), gyf.data_ptr<float>(), gsf.data_ptr<float>(),
                          gk.data_ptr<float>(), gv.data_ptr<float>(), gw.data_ptr<float>(),
                          gu.data_ptr<float>(), gs0.data_ptr<float>());
    }
  });
  return {gk.to(k.scalar_type()), gv.to(v.scalar_type()), gw.sum(0).to(w.scalar_type()),
          gu.sum(0).to(u.scalar_type()), gs0.to(s0.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU WKV operators (float32 inside whatever the input dtype)";
  m.def("wkv56_forward", &wkv56_forward, "RWKV-5/6 WKV forward -> (y, final state)");
  m.def("wkv56_backward", &wkv56_backward,
        "RWKV-5/6 WKV backward -> (gr, gk, gv, gw, gu, g_state0)");
  m.def("wkv4_forward", &wkv4_forward, "RWKV-4 WKV forward -> (y, final state)");
  m.def("wkv4_backward", &wkv4_backward, "RWKV-4 WKV backward -> (gk, gv, gw, gu, g_state0)");
}
