// Launchers of the CUDA WKV kernels (wkv6.cu, wkv4.cu): plain C++, no torch and no CUDA
// headers, so the .cu files compile alone with `nvcc -c` and the torch binding
// (wkv_cuda.cpp) compiles as ordinary C++.
//
// Layouts (all contiguous): r, k, v, w, y and their gradients (B, T, H, N); the static RWKV-5
// decay w (H, N) float; u (H, N) float; states (B, H, N, N) float indexed [key, value].
// RWKV-4: k, v, y (B, T, C); w, u (C,) float; states (B, 3, C) float = (aa, bb, pp).
// "x" tensors are float32 or bf16 (DType); accumulation and states are float32.
// Every launcher returns 0 or a cudaError_t code (a nonzero int), checked by the binding.
#pragma once

#include <cstdint>

namespace rwkv {

enum class DType : int { F32 = 0, BF16 = 1 };

// Head sizes the kernels are instantiated for.
bool wkv56_supports_head_size(int N);

// RWKV-5/6 forward. static_w: w is the (H, N) float decay of RWKV-5 (w_dtype ignored);
// otherwise w is (B, T, H, N) of w_dtype.
int wkv56_forward_cuda(int B, int T, int H, int N, DType x_dtype, DType w_dtype, bool static_w,
                       const void* r, const void* k, const void* v, const void* w,
                       const float* u, const float* s0, void* y, float* sT, void* stream);

// RWKV-5/6 backward. gr, gk, gv have x_dtype; gw has w_dtype for RWKV-6 and is a float
// (B, H, N) per-batch partial sum for RWKV-5; gu is a float (B, H, N) partial sum.
// q (B, T, H, N) and acc (B, H, N) are float scratch buffers.
int wkv56_backward_cuda(int B, int T, int H, int N, DType x_dtype, DType w_dtype, bool static_w,
                        const void* r, const void* k, const void* v, const void* w,
                        const float* u, const float* s0, const void* gy, const float* gsT,
                        void* gr, void* gk, void* gv, void* gw, float* gu, float* gs0, float* q,
                        float* acc, void* stream);

// RWKV-4 forward and backward. gw, gu are float (B, C) per-batch partial sums; states is a
// float (B, T, 3, C) scratch buffer for the recomputed states.
int wkv4_forward_cuda(int B, int T, int C, DType x_dtype, const void* k, const void* v,
                      const float* w, const float* u, const float* s0, void* y, float* sT,
                      void* stream);
int wkv4_backward_cuda(int B, int T, int C, DType x_dtype, const void* k, const void* v,
                       const float* w, const float* u, const float* s0, const void* gy,
                       const float* gsT, void* gk, void* gv, float* gw, float* gu, float* gs0,
                       float* states, void* stream);

}  // namespace rwkv
