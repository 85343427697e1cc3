// Syntax the source rewrite must handle: launches next to shifts, comments and strings, template
// and namespaced kernels, multi-line launches, shared declarations in every shape (aligned,
// several declarators, volatile, scalar, namespace scope static and extern), casts of shared arrays.
#include <cuda_runtime.h>
#include <cstdio>

#define LAUNCH_NOTE "launch with <<<grid, block>>> is rewritten"  // not in strings: <<<x>>>

__shared__ int ns_counter[2];               // namespace-scope static shared memory
extern __shared__ float ns_dyn[];           /* namespace-scope dynamic shared memory */

namespace kernels {
template <typename T, int N>
__global__ void fill(T* out, T value, int shift) {
  __shared__ __align__(16) T stage[N], other[N];
  __shared__ volatile int flag;
  __shared__ float4 vec[2];
  int t = threadIdx.x;
  if (t == 0) { flag = 1 << shift; ns_counter[0] = 0; }
  stage[t] = value + (T)(t >> 1 << 1);       // shifts are not launches
  other[t] = stage[t];
  __syncthreads();
  float4* pv = reinterpret_cast<float4*>(stage);
  const float* pf = (const float*)other;
  if (t == 0) vec[0] = pv[0];
  atomicAdd(&ns_counter[0], 1);
  __syncthreads();
  out[t] = other[t] + (T)flag + (T)(pf[t] - other[t]) + (T)ns_counter[0] + (T)(vec[0].x - stage[0]);
}
}  // namespace kernels

__global__ void use_ns_dyn(float* out) {
  ns_dyn[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = ns_dyn[blockDim.x - 1 - threadIdx.x];
}

extern "C" int run_syntax(float* hout, float* hrev) {
  float *d, *r;
  cudaMalloc(&d, 32 * sizeof(float));
  cudaMalloc(&r, 32 * sizeof(float));
  const char* s = "a<<<b>>>c";  (void)s;
  int x = 1 << 3, y = x >> 1;  (void)y;
  kernels::fill<float, 32><<<dim3(1),
                             dim3(32)>>>(
      d, 0.5f,
      3);
  ::use_ns_dyn<<<1, 32, 32 * sizeof(float)>>>(r);
  cudaMemcpy(hout, d, 32 * sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(hrev, r, 32 * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(d);
  cudaFree(r);
  return (int)cudaGetLastError();
}
