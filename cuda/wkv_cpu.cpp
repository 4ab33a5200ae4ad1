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
// For head sizes 32, 64 and 128 both run in a chunked form (16 steps per pass over the state,
// as small register-tiled matrix products; see "chunked form" below); other head sizes take
// plain per-step scans. Work is split over (batch, head) pairs (or batch x channel blocks
// for v4) with at::parallel_for.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace {

// ----------------------------------------------------------------------------- RWKV-5/6

// The hot loops get an AVX2+FMA clone where the CPU has one (chosen at load time, so a build
// cached on a shared filesystem still runs on older nodes), besides the baseline build. The
// clone is x86-64-v3 (the AVX2/FMA feature level, dispatched on CPU features): an
// "arch=haswell" clone is dispatched on the CPU model and never runs on AMD or newer Intel.
// -DWKV_BASELINE_ONLY builds the baseline alone: the tests compare it with the clones.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(WKV_BASELINE_ONLY)
#define WKV_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define WKV_CLONES
#endif

// Views of one (b, h) pair. The decays are precomputed by the caller: ew = exp(w) and
// d = exp(-ew), per token (stride H*N between steps) or static (stride 0, RWKV-5).
struct Bh {
  int64_t T, step;            // steps, elements between consecutive steps
  const float *r, *k, *v, *gy;  // (T, ., N) views at the pair's first element
  const float *d, *ew;        // decay and exp(w) at step 0 (the scans above)
  const float* w;             // raw w at step 0 (the chunked form takes its own exps)
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

// ----------------------------------------------------------- RWKV-5/6, chunked form (N % 16 == 0)
//
// The scans above touch every state element three to five times per token with loads and
// stores in between. The chunked form below processes kChunk = L steps per pass over the
// state, as small dense products whose operands stay in registers. Within a chunk of steps
// t0..t0+L-1 (local index t = 0..L-1, D_t = diag(d_t)), with the running decay products
//   Dc_t = prod_{u<t} d_u (prefix, exclusive),   E_t = prod_{u>t} d_u (suffix, exclusive),
//   Dend = prod_u d_u,   A[t][s] = sum_j r_tj k_sj prod_{s<u<t} d_uj  (s < t),
//   A[t][t] = sum_j r_tj u_j k_tj  (the bonus),
// the forward is, for S the state before the chunk,
//   y_t = (r_t * Dc_t)^T S + sum_{s<=t} A[t][s] v_s,
//   S'  = Dend S + sum_s (k_s * E_s) v_s^T.
// The backward's first sweep needs x_t = S_{t-1} gy_t (gr_t = u k_t (gy_t.v_t) + x_t and
// q_t = r_t * x_t):
//   x_t = Dc_t * (S gy_t) + sum_{s<t} (v_s.gy_t) k_s * prod_{s<u<t} d_u.
// The reverse sweep carries G = dL/dS from the chunk's last step (G_end) to the step before
// the chunk, and needs G_t v_t (for gk_t and p_t) and G_t^T k_t (for gv_t):
//   G_t v_t   = E_t * (G_end v_t) + sum_{s>t} (gy_s.v_t) r_s * prod_{t<u<s} d_u,
//   G_t^T k_t = (k_t * E_t)^T G_end + sum_{s>t} A[s][t] gy_s,
//   G_{t0-1}  = Dend G_end + sum_s (r_s * Dc_s) gy_s^T.
// Every product of decays runs over at most L - 1 factors in [0, 1], so nothing is divided
// and nothing overflows. The O(N^2) terms are three kernels (rows_times_mat,
// decay_rank_update, mat_times_rows_t); the intra-chunk terms cost O(L N) per step. A
// sequence is padded to a multiple of L with identity steps (r = k = v = gy = 0, d = 1),
// which change neither the state nor any gradient. The decay gradient's running sums (and
// gu's) are kept in double: they grow with T and the decay gradient is their difference.
// (Float sums within each chunk, double only between chunks, doubled the decay gradient's
// error at T = 22528 and gained nothing measurable.)

constexpr int kChunk = 16;  // L; mat_times_rows_t holds a row of L floats in two vectors

// Eight floats: one AVX register in the AVX2 clone, two SSE registers in the baseline build.
typedef float v8 __attribute__((vector_size(32)));

#define WKV_INLINE inline __attribute__((always_inline))
// The three small matrix products are functions of their own (each with its AVX2 clone):
// inlined into the large chunk loops, GCC ran short of registers and built some broadcasts
// lane by lane (eight vinsertps each); alone, every broadcast is one vbroadcastss. That made
// the forward about 1.3x faster on the project's 2-core AMD EPYC machine.
#define WKV_KERNEL WKV_CLONES __attribute__((noinline))

WKV_INLINE v8 ld8(const float* p) {
  v8 x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}
WKV_INLINE void st8(float* p, v8 x) { __builtin_memcpy(p, &x, sizeof x); }
// A broadcast as a shuffle of lane 0: GCC 12 builds `a - v8{}` or an initialiser list
// {a, a, ...} lane by lane (seven vinsertps) where it runs short of registers.
typedef int v8m __attribute__((vector_size(32)));  // shuffle masks
WKV_INLINE v8 bc8(float a) { return __builtin_shuffle(v8{a}, v8m{}); }
WKV_INLINE float hsum8(v8 x) {  // pairwise: three shuffles and adds, not seven serial adds
  x += __builtin_shuffle(x, v8m{4, 5, 6, 7, 0, 1, 2, 3});
  x += __builtin_shuffle(x, v8m{2, 3, 0, 1, 6, 7, 4, 5});
  x += __builtin_shuffle(x, v8m{1, 0, 3, 2, 5, 4, 7, 6});
  return x[0];
}

// dst[c][i] = src[i][c] for an 8 x 8 block (row strides in floats): three rounds of
// two-input shuffles (24 in all) instead of 64 scalar loads and stores.
WKV_INLINE void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  v8 x[8], t[8];
  for (int i = 0; i < 8; ++i) x[i] = ld8(src + i * ss);
  for (int i = 0; i < 8; i += 2) {  // interleave rows i and i + 1
    t[i] = __builtin_shuffle(x[i], x[i + 1], v8m{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(x[i], x[i + 1], v8m{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4)  // then pairs of pairs: columns of four rows per lane
    for (int h = 0; h < 2; ++h) {
      x[i + 2 * h] = __builtin_shuffle(t[i + h], t[i + h + 2], v8m{0, 1, 8, 9, 4, 5, 12, 13});
      x[i + 2 * h + 1] =
          __builtin_shuffle(t[i + h], t[i + h + 2], v8m{2, 3, 10, 11, 6, 7, 14, 15});
    }
  for (int c = 0; c < 4; ++c) {  // then join the 128-bit halves of rows 0-3 and 4-7
    st8(dst + c * ds, __builtin_shuffle(x[c], x[c + 4], v8m{0, 1, 2, 3, 8, 9, 10, 11}));
    st8(dst + (c + 4) * ds,
        __builtin_shuffle(x[c], x[c + 4], v8m{4, 5, 6, 7, 12, 13, 14, 15}));
  }
}

// (rows, cols) -> (cols, rows), both multiples of 8.
template <int ROWS, int COLS>
WKV_INLINE void transpose(const float* src, float* dst) {
  for (int i = 0; i < ROWS; i += 8)
    for (int c = 0; c < COLS; c += 8)
      transpose8x8(src + i * COLS + c, COLS, dst + c * ROWS + i, ROWS);
}

// exp of eight floats (the hot loops' own, so that the decays cost no extra pass over
// memory): exp(x) = 2^n exp(f), n = round(x / ln 2), f = x - n ln 2 in [-ln2/2, ln2/2] (ln 2
// split in two for an exact product), exp(f) by its degree-7 Taylor polynomial (relative
// error under 1e-7 on that interval). Results under the smallest normal float flush to 0 (a
// decay that small is 0 to float precision), overflow saturates at 2^128 ~ inf, NaN stays NaN.
typedef int v8i __attribute__((vector_size(32)));
WKV_INLINE v8 exp8(v8 x) {
  const v8 xc = x < -87.3f ? bc8(-87.3f) : (x > 88.7f ? bc8(88.7f) : x);
  const v8 shifter = bc8(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8 big = xc * 1.44269504f + shifter;
  const v8 n = big - shifter;
  const v8 f = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  v8 p = bc8(1.f / 5040.f);
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  v8i ni;
  __builtin_memcpy(&ni, &big, sizeof ni);
  ni -= 0x4B400000;  // the integer n sits in the low mantissa bits of `big`
  const v8i scale = (ni + 127) << 23;
  v8 two_n;
  __builtin_memcpy(&two_n, &scale, sizeof two_n);
  v8 y = p * two_n;
  y = x < -87.3f ? bc8(0.f) : y;
  return x != x ? x : y;
}

// A row of N floats as N / 8 vector variables, for the intra-chunk loops that carry a row
// from step to step: GCC keeps about half of one in registers at N = 64 (the rest spills),
// where a float[N] array went to memory and back whole on every step.
template <int N>
struct Row {
  v8 x[N / 8];

  static WKV_INLINE Row zero() { return Row{}; }
  static WKV_INLINE Row load(const float* p) {
    Row r;
#pragma GCC unroll 16
    for (int i = 0; i < N / 8; ++i) r.x[i] = ld8(p + 8 * i);
    return r;
  }
  WKV_INLINE void store(float* p) const {
#pragma GCC unroll 16
    for (int i = 0; i < N / 8; ++i) st8(p + 8 * i, x[i]);
  }
  WKV_INLINE void mul(const float* p) {  // this *= p
#pragma GCC unroll 16
    for (int i = 0; i < N / 8; ++i) x[i] *= ld8(p + 8 * i);
  }
  WKV_INLINE void add_scaled(float a, const float* p) {  // this += a p
    const v8 av = bc8(a);
#pragma GCC unroll 16
    for (int i = 0; i < N / 8; ++i) x[i] += av * ld8(p + 8 * i);
  }
  WKV_INLINE void add_scaled_to(float a, float* out) const {  // out += a this
    const v8 av = bc8(a);
#pragma GCC unroll 16
    for (int i = 0; i < N / 8; ++i) st8(out + 8 * i, ld8(out + 8 * i) + av * x[i]);
  }
  WKV_INLINE float dot(const float* p) const {  // two accumulators halve the FMA chain
    v8 s0{}, s1{};
#pragma GCC unroll 16
    for (int i = 0; i < N / 8; i += 2) {
      s0 += x[i] * ld8(p + 8 * i);
      s1 += x[i + 1] * ld8(p + 8 * i + 8);
    }
    return hsum8(s0 + s1);
  }
};

// out[t][c] += sum_j a[t][j] m[j][c]: a, out (L, N), m (N, N). Tiles of 4 x 16 outputs in
// eight registers; per j two loads of m and four broadcasts feed eight FMAs.
template <int N>
WKV_KERNEL void rows_times_mat(const float* __restrict a, const float* __restrict m,
                               float* __restrict out) {
  for (int t0 = 0; t0 < kChunk; t0 += 4)
    for (int c0 = 0; c0 < N; c0 += 16) {
      v8 acc[4][2];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        acc[i][0] = ld8(out + (t0 + i) * N + c0);
        acc[i][1] = ld8(out + (t0 + i) * N + c0 + 8);
      }
      for (int j = 0; j < N; ++j) {
        const v8 m0 = ld8(m + j * N + c0), m1 = ld8(m + j * N + c0 + 8);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const v8 x = bc8(a[(t0 + i) * N + j]);
          acc[i][0] += x * m0;
          acc[i][1] += x * m1;
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        st8(out + (t0 + i) * N + c0, acc[i][0]);
        st8(out + (t0 + i) * N + c0 + 8, acc[i][1]);
      }
    }
}

// m[j][c] = dec[j] m[j][c] + sum_s a[s][j] b[s][c]: m (N, N), a, b (L, N). The state update
// of a whole chunk: one load and one store of m per L steps.
template <int N>
WKV_KERNEL void decay_rank_update(float* __restrict m, const float* __restrict dec,
                                  const float* __restrict a, const float* __restrict b) {
  for (int j0 = 0; j0 < N; j0 += 4)
    for (int c0 = 0; c0 < N; c0 += 16) {
      v8 acc[4][2];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const v8 dj = bc8(dec[j0 + i]);
        acc[i][0] = dj * ld8(m + (j0 + i) * N + c0);
        acc[i][1] = dj * ld8(m + (j0 + i) * N + c0 + 8);
      }
      for (int s = 0; s < kChunk; ++s) {
        const v8 b0 = ld8(b + s * N + c0), b1 = ld8(b + s * N + c0 + 8);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const v8 x = bc8(a[s * N + j0 + i]);
          acc[i][0] += x * b0;
          acc[i][1] += x * b1;
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        st8(m + (j0 + i) * N + c0, acc[i][0]);
        st8(m + (j0 + i) * N + c0 + 8, acc[i][1]);
      }
    }
}

// xt[j][t] = sum_c m[j][c] bt[c][t]: m (ROWS, N), bt (N, L) the transpose of L rows b_t, xt
// (ROWS, L). This is m b_t for every t of the chunk at once, without horizontal sums.
template <int N, int ROWS = N>
WKV_KERNEL void mat_times_rows_t(const float* __restrict m, const float* __restrict bt,
                                 float* __restrict xt) {
  static_assert(kChunk == 16, "a row of bt is two vectors");
  static_assert(ROWS % 4 == 0, "rows come in fours");
  for (int j0 = 0; j0 < ROWS; j0 += 4) {
    v8 acc[4][2] = {};
    for (int c = 0; c < N; ++c) {
      const v8 b0 = ld8(bt + c * kChunk), b1 = ld8(bt + c * kChunk + 8);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const v8 x = bc8(m[(j0 + i) * N + c]);
        acc[i][0] += x * b0;
        acc[i][1] += x * b1;
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      st8(xt + (j0 + i) * kChunk, acc[i][0]);
      st8(xt + (j0 + i) * kChunk + 8, acc[i][1]);
    }
  }
}

// One chunk's inputs gathered into contiguous (L, N) blocks, padded with identity steps. The
// methods are inlined into the callers' clones (a member of its own would be baseline code).
template <int N>
struct Chunk {
  static constexpr int L = kChunk;
  alignas(64) float r[L * N], k[L * N], v[L * N], gy[L * N], d[L * N], ew[L * N];
  alignas(64) float dc[L * N];  // Dc_t: prefix products of d, exclusive
  alignas(64) float e[L * N];   // E_t: suffix products of d, exclusive
  alignas(64) float dend[N];    // product of all d of the chunk
  alignas(64) float att[L * L];  // A[t][s], s <= t

  // Gathers steps t0 .. t0 + n - 1 (n <= L), gy only when asked for, and takes the decays:
  // d and ew from `saved` (2 L N floats that save_decays wrote for this chunk), else from w.
  // It also prefetches the chunk that starts at `next` (the one the sweep gathers after this
  // one, if any): rows lie H * N floats apart, so a 4 KB page holds only a few steps of one
  // pair and the hardware prefetchers, which stop at page boundaries, miss most of them.
  WKV_INLINE void load(const Bh& a, int64_t t0, int n, bool with_gy, int64_t next,
                       const float* saved = nullptr) {
    if (saved) {
      std::copy(saved, saved + L * N, d);
      std::copy(saved + L * N, saved + 2 * L * N, ew);
    }
    for (int t = 0; t < L; ++t) {
      const int64_t o = (t0 + t) * a.step, wo = (t0 + t) * a.wstep;
      const int tn = t * N;
      if (next >= 0 && next + t < a.T) {
        const int64_t po = (next + t) * a.step, pwo = (next + t) * a.wstep;
        for (int j = 0; j < N; j += 16) {
          __builtin_prefetch(a.r + po + j);
          __builtin_prefetch(a.k + po + j);
          __builtin_prefetch(a.v + po + j);
          if (!saved) __builtin_prefetch(a.w + pwo + j);
          if (with_gy) __builtin_prefetch(a.gy + po + j);
        }
      }
      if (t < n) {
        for (int j = 0; j < N; j += 8) {
          st8(r + tn + j, ld8(a.r + o + j));
          st8(k + tn + j, ld8(a.k + o + j));
          st8(v + tn + j, ld8(a.v + o + j));
          if (with_gy) st8(gy + tn + j, ld8(a.gy + o + j));
          if (saved) continue;
          const v8 e = exp8(ld8(a.w + wo + j));
          st8(ew + tn + j, e);
          st8(d + tn + j, exp8(-e));
        }
      } else {
        std::fill(r + tn, r + tn + N, 0.f);
        std::fill(k + tn, k + tn + N, 0.f);
        std::fill(v + tn, v + tn + N, 0.f);
        if (with_gy) std::fill(gy + tn, gy + tn + N, 0.f);
        if (saved) continue;
        std::fill(d + tn, d + tn + N, 1.f);
        std::fill(ew + tn, ew + tn + N, 0.f);
      }
    }
    for (int j = 0; j < N; ++j) dc[j] = 1.f;
    for (int t = 1; t < L; ++t)
      for (int j = 0; j < N; ++j) dc[t * N + j] = dc[(t - 1) * N + j] * d[(t - 1) * N + j];
    for (int j = 0; j < N; ++j) dend[j] = dc[(L - 1) * N + j] * d[(L - 1) * N + j];
    for (int j = 0; j < N; ++j) e[(L - 1) * N + j] = 1.f;
    for (int t = L - 2; t >= 0; --t)
      for (int j = 0; j < N; ++j) e[t * N + j] = e[(t + 1) * N + j] * d[(t + 1) * N + j];
  }

  // The chunk's d and ew, for a later load() of the same steps (2 L N floats).
  WKV_INLINE void save_decays(float* dst) const {
    std::copy(d, d + L * N, dst);
    std::copy(ew, ew + L * N, dst + L * N);
  }

  // A[t][s] for s <= t (zero above the diagonal), u the bonus.
  WKV_INLINE void attention(const float* u) {
    for (int s = 0; s < L; ++s) {
      Row<N> p = Row<N>::load(k + s * N);  // k_s * prod_{s<u<t} d_u for the current t
      for (int t = 0; t < s; ++t) att[t * L + s] = 0.f;
      Row<N> ru = Row<N>::load(r + s * N);
      ru.mul(u);
      att[s * L + s] = ru.dot(k + s * N);
      for (int t = s + 1; t < L; ++t) {
        att[t * L + s] = p.dot(r + t * N);
        p.mul(d + t * N);
      }
    }
  }
};

// n floats of scratch for the calling thread (3 T N for the backward of one (batch, head)
// pair). Up to kKeptScratch floats (16 MB; T = 16384 at N = 64) stay with the thread from
// call to call: malloc maps an allocation this large afresh on every call, and every page of
// it then faults at first touch, which is slow on virtual machines (BENCHMARKS.md has the
// measurement). A larger request gets memory of its own in `own`, freed with it, so that one
// long call does not leave every thread holding that much.
constexpr int64_t kKeptScratch = int64_t{4} << 20;

float* thread_scratch(int64_t n, std::unique_ptr<float[]>& own) {
  if (n > kKeptScratch) {
    own.reset(new float[n]);
    return own.get();
  }
  thread_local std::vector<float> kept;
  if (static_cast<int64_t>(kept.size()) < n) kept.resize(n);
  return kept.data();
}

template <int N>
WKV_CLONES void fwd_chunked(const Bh& a, const float* __restrict s0, float* __restrict y,
                            float* __restrict sT) {
  constexpr int L = kChunk;
  std::unique_ptr<Chunk<N>> ch(new Chunk<N>);  // uninitialised: load() fills it
  std::vector<float> buf(N * N + 3 * L * N);
  float* __restrict S = buf.data();
  float* __restrict rp = S + N * N;   // r_t * Dc_t
  float* __restrict ke = rp + L * N;  // k_s * E_s
  float* __restrict yc = ke + L * N;  // y_t
  std::copy(s0, s0 + N * N, S);
  for (int64_t t0 = 0; t0 < a.T; t0 += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, a.T - t0));
    ch->load(a, t0, n, false, t0 + L);
    ch->attention(a.u);
    for (int i = 0; i < L * N; ++i) {
      rp[i] = ch->r[i] * ch->dc[i];
      ke[i] = ch->k[i] * ch->e[i];
    }
    // Intra-chunk part, then the state's.
    for (int t = 0; t < L; ++t) {
      Row<N> yt = Row<N>::zero();
      for (int s = 0; s <= t; ++s) yt.add_scaled(ch->att[t * L + s], ch->v + s * N);
      yt.store(yc + t * N);
    }
    rows_times_mat<N>(rp, S, yc);
    decay_rank_update<N>(S, ch->dend, ke, ch->v);
    for (int t = 0; t < n; ++t) std::copy(yc + t * N, yc + (t + 1) * N, y + (t0 + t) * a.step);
  }
  std::copy(S, S + N * N, sT);
}

template <int N>
WKV_CLONES void bwd_chunked(const Bh& a, const float* __restrict s0,
                            const float* __restrict gsT, float* __restrict gr,
                            float* __restrict gk, float* __restrict gv, float* __restrict gw,
                            float* __restrict gw_sum, float* __restrict gu,
                            float* __restrict gs0) {
  constexpr int L = kChunk;
  std::unique_ptr<Chunk<N>> ch(new Chunk<N>);  // uninitialised: load() fills it
  std::vector<float> buf(N * N + 4 * L * N + 2 * N * L);
  float* __restrict S = buf.data();   // the state in sweep 1, G = dL/dS in sweep 2
  float* __restrict rp = S + N * N;   // r_t * Dc_t
  float* __restrict ke = rp + L * N;  // k_t * E_t
  float* __restrict xc = ke + L * N;  // x_t (sweep 1), G_t v_t (sweep 2)
  float* __restrict gc = xc + L * N;  // gv rows (sweep 2)
  float* __restrict bt = gc + L * N;  // (N, L): gy (sweep 1) or v (sweep 2) transposed
  float* __restrict xt = bt + N * L;  // (N, L): S gy_t (sweep 1), G_end v_t (sweep 2)
  // q_t (sweep 1 writes every step before sweep 2 reads it) and sweep 1's decays for sweep 2
  // (two exps per element cost about as much as one of the chunk's matrix products).
  const int64_t n_chunks = (a.T + L - 1) / L;
  std::unique_ptr<float[]> own;
  float* __restrict q = thread_scratch(a.T * N + n_chunks * 2 * L * N, own);
  float* __restrict saved = q + a.T * N;
  std::vector<double> dbuf(5 * N, 0.0);
  double* __restrict gu_acc = dbuf.data();
  double* __restrict fin = gu_acc + N;     // sum_v gS_T * S_T per key
  double* __restrict Pd = fin + N;         // sum_{i>=t} p_i
  double* __restrict Qd = Pd + N;          // sum_{j>t} q_j
  double* __restrict gw_acc = Qd + N;      // static decay: sum over t of its gradient
  float gyv[L];
  alignas(32) float bm[L * L];  // the chunk's dot products of v and gy rows

  // Sweep 1, forward: S -> x_t -> gr_t, q_t, gu.
  std::copy(s0, s0 + N * N, S);
  for (int64_t t0 = 0; t0 < a.T; t0 += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, a.T - t0));
    ch->load(a, t0, n, true, t0 + L);
    ch->save_decays(saved + t0 * 2 * N);
    for (int i = 0; i < L * N; ++i) ke[i] = ch->k[i] * ch->e[i];
    transpose<L, N>(ch->gy, bt);
    mat_times_rows_t<N>(S, bt, xt);
    mat_times_rows_t<N, L>(ch->v, bt, bm);  // bm[s][t] = v_s . gy_t
    transpose<N, L>(xt, xc);
    for (int i = 0; i < L * N; ++i) xc[i] *= ch->dc[i];
    for (int t = 0; t < L; ++t) gyv[t] = bm[t * L + t];
    for (int s = 0; s < L; ++s) {
      Row<N> p = Row<N>::load(ch->k + s * N);  // k_s * prod_{s<u<t} d_u
      for (int t = s + 1; t < L; ++t) {
        p.add_scaled_to(bm[s * L + t], xc + t * N);
        p.mul(ch->d + t * N);
      }
    }
    for (int t = 0; t < n; ++t) {
      const float *rt = ch->r + t * N, *kt = ch->k + t * N, *xr = xc + t * N;
      float* __restrict grt = gr + (t0 + t) * a.step;
      float* __restrict qt = q + (t0 + t) * N;
      for (int j = 0; j < N; ++j) {
        grt[j] = a.u[j] * kt[j] * gyv[t] + xr[j];
        qt[j] = rt[j] * xr[j];
        gu_acc[j] += rt[j] * kt[j] * gyv[t];
      }
    }
    decay_rank_update<N>(S, ch->dend, ke, ch->v);
  }
  for (int j = 0; j < N; ++j) fin[j] = Row<N>::load(gsT + j * N).dot(S + j * N);

  // Sweep 2, reverse: G from dL/dS_T back to dL/dS_0, giving gk, gv, gw on the way.
  std::copy(gsT, gsT + N * N, S);
  for (int64_t ci = n_chunks - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * L;
    const int n = static_cast<int>(std::min<int64_t>(L, a.T - t0));
    ch->load(a, t0, n, true, t0 - L, saved + t0 * 2 * N);
    ch->attention(a.u);
    for (int i = 0; i < L * N; ++i) {
      rp[i] = ch->r[i] * ch->dc[i];
      ke[i] = ch->k[i] * ch->e[i];
    }
    transpose<L, N>(ch->v, bt);
    mat_times_rows_t<N>(S, bt, xt);
    mat_times_rows_t<N, L>(ch->gy, bt, bm);  // bm[s][t] = gy_s . v_t
    transpose<N, L>(xt, xc);
    for (int i = 0; i < L * N; ++i) xc[i] *= ch->e[i];
    for (int t = 0; t < L; ++t) gyv[t] = bm[t * L + t];
    for (int s = L - 1; s > 0; --s) {
      Row<N> p = Row<N>::load(ch->r + s * N);  // r_s * prod_{t<u<s} d_u
      for (int t = s - 1; t >= 0; --t) {
        p.add_scaled_to(bm[s * L + t], xc + t * N);
        p.mul(ch->d + t * N);
      }
    }
    // gv_t = sum_{s>=t} A[s][t] gy_s + (k_t * E_t)^T G_end.
    for (int t = 0; t < L; ++t) {
      Row<N> gt = Row<N>::zero();
      for (int s = t; s < L; ++s) gt.add_scaled(ch->att[s * L + t], ch->gy + s * N);
      gt.store(gc + t * N);
    }
    rows_times_mat<N>(ke, S, gc);
    for (int t = n - 1; t >= 0; --t) {
      const float *rt = ch->r + t * N, *kt = ch->k + t * N, *xr = xc + t * N;
      const float* ewt = ch->ew + t * N;
      const float* qt = q + (t0 + t) * N;
      float* __restrict gkt = gk + (t0 + t) * a.step;
      for (int j = 0; j < N; ++j) gkt[j] = rt[j] * a.u[j] * gyv[t] + xr[j];
      if (gw_sum) {
        for (int j = 0; j < N; ++j) {
          Pd[j] += static_cast<double>(kt[j]) * xr[j];
          gw_acc[j] += (Qd[j] - Pd[j] + fin[j]) * -static_cast<double>(ewt[j]);
          Qd[j] += qt[j];
        }
      } else {
        float* __restrict gwt = gw + (t0 + t) * a.step;
        for (int j = 0; j < N; ++j) {
          Pd[j] += static_cast<double>(kt[j]) * xr[j];
          gwt[j] = static_cast<float>((Qd[j] - Pd[j] + fin[j]) * -static_cast<double>(ewt[j]));
          Qd[j] += qt[j];
        }
      }
      std::copy(gc + t * N, gc + (t + 1) * N, gv + (t0 + t) * a.step);
    }
    decay_rank_update<N>(S, ch->dend, rp, ch->gy);
  }
  std::copy(S, S + N * N, gs0);
  for (int j = 0; j < N; ++j) {
    gu[j] = static_cast<float>(gu_acc[j]);
    if (gw_sum) gw_sum[j] = static_cast<float>(gw_acc[j]);
  }
}

// The pair (b, h) of (B, T, H, N) tensors, with precomputed decays d and ew.
Bh pair_view(int64_t T, int64_t H, int64_t N, int64_t b, int64_t h, const float* r,
             const float* k, const float* v, const float* gy, const float* d, const float* ew,
             const float* w, bool static_w, const float* u) {
  const int64_t o = (b * T * H + h) * N;
  const int64_t wo = static_w ? h * N : o;
  return Bh{T,      H * N,   r + o,  k + o,  v + o, gy ? gy + o : nullptr, d + wo,
            ew + wo, w + wo, static_w ? 0 : H * N, u + h * N};
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

// Head sizes of the chunked form; other sizes take the per-step scans.
bool chunked_size(int64_t N) { return N == 32 || N == 64 || N == 128; }

// (d, exp(w)) for the per-step scans, by torch's vectorised exp over the whole tensor. The
// chunked form computes both while gathering a chunk (saving three passes over memory), and
// gets w itself in both places (unused).
std::pair<torch::Tensor, torch::Tensor> decays(const torch::Tensor& wf, int64_t N) {
  if (chunked_size(N)) return {wf, wf};
  auto ew = wf.exp();
  return {(-ew).exp(), ew};
}

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
  auto wf = f32(w);
  auto [d, ew] = decays(wf, N);
  auto y = torch::empty(r.sizes(), rf.options());
  auto sT = torch::empty(s0.sizes(), sf.options());
  at::parallel_for(0, B * H, grain(T * N * N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, o = (b * T * H + h) * N;
      const Bh a = pair_view(T, H, N, b, h, rf.data_ptr<float>(), kf.data_ptr<float>(),
                             vf.data_ptr<float>(), nullptr, d.data_ptr<float>(),
                             ew.data_ptr<float>(), wf.data_ptr<float>(), static_w, uf.data_ptr<float>());
      const float* s0p = sf.data_ptr<float>() + i * N * N;
      float* sTp = sT.data_ptr<float>() + i * N * N;
      float* yp = y.data_ptr<float>() + o;
      if (!chunked_size(N))
        fwd_scan<0>(a, N, s0p, yp, sTp);
      else if (N == 64)
        fwd_chunked<64>(a, s0p, yp, sTp);
      else if (N == 128)
        fwd_chunked<128>(a, s0p, yp, sTp);
      else if (N == 32)
        fwd_chunked<32>(a, s0p, yp, sTp);
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
  auto wf = f32(w);
  auto [d, ew] = decays(wf, N);
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
                             ew.data_ptr<float>(), wf.data_ptr<float>(), static_w, uf.data_ptr<float>());
      float* gwp = static_w ? nullptr : gw.data_ptr<float>() + o;
      float* gw_sum = static_w ? gw.data_ptr<float>() + i * N : nullptr;
      auto run = [&](auto scan) {
        scan(a, sf.data_ptr<float>() + i * N * N, gsf.data_ptr<float>() + i * N * N,
             gr.data_ptr<float>() + o, gk.data_ptr<float>() + o, gv.data_ptr<float>() + o, gwp,
             gw_sum, gu.data_ptr<float>() + i * N, gs0.data_ptr<float>() + i * N * N);
      };
      if (!chunked_size(N))
        run([&](const Bh& a_, auto... rest) { bwd_scan<0>(a_, N, rest...); });
      else if (N == 64)
        run(bwd_chunked<64>);
      else if (N == 128)
        run(bwd_chunked<128>);
      else if (N == 32)
        run(bwd_chunked<32>);
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
