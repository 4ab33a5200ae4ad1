// Small device helpers shared by the WKV kernels: dtype conversion to and from float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "wkv.h"

namespace rwkv {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// The decay d = exp(-exp(w)) in float32 (w is the raw decay).
__device__ __forceinline__ float decay(float w) { return expf(-expf(w)); }

}  // namespace rwkv
