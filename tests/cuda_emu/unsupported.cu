// Each variant uses something the emulator cannot run; compiling it must fail, naming the construct.
#include <cuda_runtime.h>
#if defined(USE_LEGACY_SHFL)
__global__ void k(float* x) { x[threadIdx.x] = __shfl(x[threadIdx.x], 0); }
#elif defined(USE_INLINE_PTX)
__global__ void k(unsigned* x) {
  unsigned lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  x[threadIdx.x] = lane;
}
#elif defined(USE_WMMA)
#include <mma.h>
#elif defined(USE_GRID_SYNC)
#include <cooperative_groups.h>
__global__ void k(float* x) { cooperative_groups::this_grid().sync(); }
#else
__global__ void k(float* x) { x[threadIdx.x] = 1.0f; }
#endif
extern "C" int run(float* x) { k<<<1, 32>>>(x); return cudaGetLastError(); }
