// gpt2gen cuda_emu prelude: force-included (g++ -include) before every emulated .cu file.
// It plays the part of nvcc's implicit <cuda_runtime.h>: execution-space qualifiers, the built-in
// variables, device intrinsics and the runtime API, all implemented on the CPU.
#pragma once
#ifndef GPT2GEN_CUDA_EMU
#define GPT2GEN_CUDA_EMU 1
#endif
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#define __CUDACC_VER_MAJOR__ 13
#define __CUDACC_VER_MINOR__ 0
#define __CUDACC_VER_BUILD__ 0
// __CUDA_ARCH__ is deliberately left undefined: host and device code share one compilation pass.

// System headers first: only the emulator's own declarations get hidden visibility.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <map>
#include <math.h>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#pragma GCC visibility push(hidden)
#include "runtime.hpp"
#pragma GCC visibility pop

// Execution-space and storage qualifiers.
#define __global__
#define __device__
#define __host__
#define __managed__
#define __constant__
#define __grid_constant__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __maxnreg__(n)
// __restrict__ and __inline__ are native GNU C++ keywords.

// Built-in variables: per emulated thread (threadIdx) and per block (blockIdx, blockDim, gridDim).
#define threadIdx (::gpt2gen_emu::tls_fiber->tid)
#define blockIdx (::gpt2gen_emu::tls_fiber->blk->bidx)
#define blockDim (::gpt2gen_emu::tls_fiber->blk->L->block)
#define gridDim (::gpt2gen_emu::tls_fiber->blk->L->grid)

// Inline PTX cannot run on the CPU: any use is a compile-time error naming it.
#define asm gpt2gen_cuda_emu_error_inline_PTX_asm_is_not_supported
