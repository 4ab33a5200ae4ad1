// CPU emulation of the CUDA constructs the WKV kernels use: one std::thread per CUDA thread,
// one block at a time, __syncthreads as a std::barrier, __shared__ as function statics.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(x)
#define __restrict__ __restrict
#define __align__(x) __attribute__((aligned(x)))

struct EmuDim { int x = 0; };
inline thread_local EmuDim threadIdx, blockIdx, blockDim;
inline std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
using std::max;
using std::min;

// Runs kernel(args...) as `blocks` blocks of `threads` threads.
template <typename K, typename... A>
void emu_launch(int blocks, int threads, K kernel, A... args) {
  for (int b = 0; b < blocks; ++b) {
    std::barrier<> bar(threads);
    emu_barrier = &bar;
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([=] {
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = threads;
        kernel(args...);
      });
    for (auto& th : ts) th.join();
  }
}
