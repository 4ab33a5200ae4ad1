// torch binding of the CUDA WKV kernels: checks, dtype handling and buffers, then the
// launchers of wkv6.cu / wkv4.cu (declared in wkv.h). Same Python interface as wkv_cpu.cpp.
//
// r, k, v (and gy) run natively in bf16 or float32 (other dtypes are computed in float32 and
// cast back); the RWKV-6 decay w runs in its own dtype when that is bf16 or float32 (bf16 only
// with bf16 r); u, the RWKV-5 decay, RWKV-4's w and u, and all states are float32.

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "wkv.h"

namespace {

using torch::Tensor;

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(code)));
}

void* stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

// The dtype the kernels use for r, k, v, y: bf16 or float32.
torch::ScalarType compute_dtype(const Tensor& x) {
  return x.scalar_type() == torch::kBFloat16 ? torch::kBFloat16 : torch::kFloat;
}

rwkv::DType tag(torch::ScalarType t) {
  return t == torch::kBFloat16 ? rwkv::DType::BF16 : rwkv::DType::F32;
}

Tensor as(const Tensor& x, torch::ScalarType t) { return x.to(t).contiguous(); }

void check_56(const Tensor& r, const Tensor& k, const Tensor& v, const Tensor& w,
              const Tensor& u, const Tensor& s0, bool static_w) {
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
  TORCH_CHECK(rwkv::wkv56_supports_head_size(static_cast<int>(N)),
              "the CUDA WKV kernels support head sizes 32, 64 and 128, not ", N);
  for (const auto* t : {&r, &k, &v, &w, &u, &s0})
    TORCH_CHECK(t->is_cuda() && t->device() == r.device(),
                "the cuda WKV op takes CUDA tensors on one device");
  TORCH_CHECK(r.numel() < (int64_t{1} << 62), "input too large");
}

torch::ScalarType w_dtype(const Tensor& w, torch::ScalarType x, bool static_w) {
  if (static_w) return torch::kFloat;
  return (x == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16) ? torch::kBFloat16
                                                                         : torch::kFloat;
}

std::vector<Tensor> wkv56_forward(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s0,
                                  bool static_w) {
  check_56(r, k, v, w, u, s0, static_w);
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const auto xt = compute_dtype(r), wt = w_dtype(w, xt, static_w);
  auto rx = as(r, xt), kx = as(k, xt), vx = as(v, xt), wx = as(w, wt);
  auto uf = as(u, torch::kFloat), sf = as(s0, torch::kFloat);
  auto y = torch::empty(r.sizes(), rx.options());
  auto sT = torch::empty(s0.sizes(), sf.options());
  check_launch(rwkv::wkv56_forward_cuda(B, T, H, N, tag(xt), tag(wt), static_w, rx.data_ptr(),
                                        kx.data_ptr(), vx.data_ptr(), wx.data_ptr(),
                                        uf.data_ptr<float>(), sf.data_ptr<float>(),
                                        y.data_ptr(), sT.data_ptr<float>(), stream()),
               "wkv56_forward_cuda");
  return {y.to(r.scalar_type()), sT};
}

std::vector<Tensor> wkv56_backward(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s0,
                                   Tensor gy, Tensor gsT, bool static_w) {
  check_56(r, k, v, w, u, s0, static_w);
  TORCH_CHECK(gy.sizes() == r.sizes() && gsT.sizes() == s0.sizes(), "gradient shapes differ");
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const auto xt = compute_dtype(r), wt = w_dtype(w, xt, static_w);
  auto rx = as(r, xt), kx = as(k, xt), vx = as(v, xt), wx = as(w, wt), gyx = as(gy, xt);
  auto uf = as(u, torch::kFloat), sf = as(s0, torch::kFloat), gsf = as(gsT, torch::kFloat);
  auto xo = rx.options();
  auto fo = sf.options();
  auto gr = torch::empty(r.sizes(), xo), gk = torch::empty(r.sizes(), xo),
       gv = torch::empty(r.sizes(), xo);
  auto gw = static_w ? torch::empty({B, H, N}, fo) : torch::empty(r.sizes(), wx.options());
  auto gu = torch::empty({B, H, N}, fo), gs0 = torch::empty(s0.sizes(), fo);
  auto q = torch::empty(r.sizes(), fo), acc = torch::empty({B, H, N}, fo);
  check_launch(rwkv::wkv56_backward_cuda(
                   B, T, H, N, tag(xt), tag(wt), static_w, rx.data_ptr(), kx.data_ptr(),
                   vx.data_ptr(), wx.data_ptr(), uf.data_ptr<float>(), sf.data_ptr<float>(),
                   gyx.data_ptr(), gsf.data_ptr<float>(), gr.data_ptr(), gk.data_ptr(),
                   gv.data_ptr(), gw.data_ptr(), gu.data_ptr<float>(), gs0.data_ptr<float>(),
                   q.data_ptr<float>(), acc.data_ptr<float>(), stream()),
               "wkv56_backward_cuda");
  if (static_w) gw = gw.sum(0);
  return {gr.to(r.scalar_type()), gk.to(k.scalar_type()), gv.to(v.scalar_type()),
          gw.to(w.scalar_type()),  gu.sum(0).to(u.scalar_type()), gs0.to(s0.scalar_type())};
}

void check_4(const Tensor& k, const Tensor& v, const Tensor& w, const Tensor& u,
             const Tensor& s0) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k, v must be (B, T, C)");
  const auto B = k.size(0), C = k.size(2);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C && u.sizes() == w.sizes(), "w, u must be (C,)");
  TORCH_CHECK(s0.dim() == 3 && s0.size(0) == B && s0.size(1) == 3 && s0.size(2) == C,
              "state must be (B, 3, C)");
  for (const auto* t : {&k, &v, &w, &u, &s0})
    TORCH_CHECK(t->is_cuda() && t->device() == k.device(),
                "the cuda WKV op takes CUDA tensors on one device");
}

std::vector<Tensor> wkv4_forward(Tensor k, Tensor v, Tensor w, Tensor u, Tensor s0) {
  check_4(k, v, w, u, s0);
  const c10::cuda::CUDAGuard guard(k.device());
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  const auto xt = compute_dtype(k);
  auto kx = as(k, xt), vx = as(v, xt);
  auto wf = as(w, torch::kFloat), uf = as(u, torch::kFloat), sf = as(s0, torch::kFloat);
  auto y = torch::empty(k.sizes(), kx.options());
  auto sT = torch::empty(s0.sizes(), sf.options());
  check_launch(rwkv::wkv4_forward_cuda(B, T, C, tag(xt), kx.data_ptr(), vx.data_ptr(),
                                       wf.data_ptr<float>(), uf.data_ptr<float>(),
                                       sf.data_ptr<float>(), y.data_ptr(), sT.data_ptr<float>(),
                                       stream()),
               "wkv4_forward_cuda");
  return {y.to(k.scalar_type()), sT};
}

std::vector<Tensor> wkv4_backward(Tensor k, Tensor v, Tensor w, Tensor u, Tensor s0, Tensor gy,
                                  Tensor gsT) {
  check_4(k, v, w, u, s0);
  TORCH_CHECK(gy.sizes() == k.sizes() && gsT.sizes() == s0.sizes(), "gradient shapes differ");
  const c10::cuda::CUDAGuard guard(k.device());
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  const auto xt = compute_dtype(k);
  auto kx = as(k, xt), vx = as(v, xt), gyx = as(gy, xt);
  auto wf = as(w, torch::kFloat), uf = as(u, torch::kFloat), sf = as(s0, torch::kFloat),
       gsf = as(gsT, torch::kFloat);
  auto xo = kx.options();
  auto fo = sf.options();
  auto gk = torch::empty(k.sizes(), xo), gv = torch::empty(k.sizes(), xo);
  auto gw = torch::empty({B, C}, fo), gu = torch::empty({B, C}, fo),
       gs0 = torch::empty(s0.sizes(), fo);
  auto states = torch::empty({B, T, 3, C}, fo);
  check_launch(rwkv::wkv4_backward_cuda(B, T, C, tag(xt), kx.data_ptr(), vx.data_ptr(),
                                        wf.data_ptr<float>(), uf.data_ptr<float>(),
                                        sf.data_ptr<float>(), gyx.data_ptr(),
                                        gsf.data_ptr<float>(), gk.data_ptr(), gv.data_ptr(),
                                        gw.data_ptr<float>(), gu.data_ptr<float>(),
                                        gs0.data_ptr<float>(), states.data_ptr<float>(),
                                        stream()),
               "wkv4_backward_cuda");
  return {gk.to(k.scalar_type()), gv.to(v.scalar_type()), gw.sum(0).to(w.scalar_type()),
          gu.sum(0).to(u.scalar_type()), gs0.to(s0.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CUDA WKV operators (bf16 or float32 inputs, float32 state)";
  m.def("wkv56_forward", &wkv56_forward, "RWKV-5/6 WKV forward -> (y, final state)");
  m.def("wkv56_backward", &wkv56_backward,
        "RWKV-5/6 WKV backward -> (gr, gk, gv, gw, gu, g_state0)");
  m.def("wkv4_forward", &wkv4_forward, "RWKV-4 WKV forward -> (y, final state)");
  m.def("wkv4_backward", &wkv4_backward, "RWKV-4 WKV backward -> (gk, gv, gw, gu, g_state0)");
}
