// Atomics: a histogram privatised in shared memory (int atomicAdd on shared and global memory),
// atomicMax/atomicMin on ints, a float maximum built from atomicCAS, float and 64-bit atomicAdd,
// atomicExch, atomicInc, and a global spin lock taken by one thread per block.
#include <cuda_runtime.h>

#define NBINS 64

__global__ void histogram(const int* __restrict__ data, int n, unsigned* __restrict__ hist) {
  __shared__ unsigned local[NBINS];
  for (int i = threadIdx.x; i < NBINS; i += blockDim.x) local[i] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
    atomicAdd(&local[data[i] % NBINS], 1u);
  __syncthreads();
  for (int i = threadIdx.x; i < NBINS; i += blockDim.x)
    if (local[i]) atomicAdd(&hist[i], local[i]);
}

__device__ float atomic_max_float(float* addr, float value) {
  int* p = reinterpret_cast<int*>(addr);
  int old = *p, assumed;
  do {
    assumed = old;
    if (__int_as_float(assumed) >= value) break;
    old = atomicCAS(p, assumed, __float_as_int(value));
  } while (assumed != old);
  return __int_as_float(old);
}

// stats: [0] int max, [1] int min, [2] float max (bits), [3] float sum (bits), [4..5] u64 sum,
// [6] exch target, [7] atomicInc counter, [8] lock, [9] blocks that entered the critical section,
// [10] a non-atomic counter protected by the lock
__global__ void stats(const int* __restrict__ vals, const float* __restrict__ fvals, int n, int* s) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    atomicMax(&s[0], vals[i]);
    atomicMin(&s[1], vals[i]);
    atomic_max_float(reinterpret_cast<float*>(&s[2]), fvals[i]);
    atomicAdd(reinterpret_cast<float*>(&s[3]), fvals[i]);
    atomicAdd(reinterpret_cast<unsigned long long*>(&s[4]), (unsigned long long)vals[i] + 4000000000ull);
    atomicExch(&s[6], 1234);
    atomicInc(reinterpret_cast<unsigned*>(&s[7]), 1000000u);
  }
  if (threadIdx.x == 0) {
    while (atomicCAS(&s[8], 0, 1) != 0) {}
    __threadfence();
    volatile int* counter = &s[10];
    *counter = *counter + 1;
    atomicAdd(&s[9], 1);
    __threadfence();
    atomicExch(&s[8], 0);
  }
}

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) return (int)e_; } while (0)

extern "C" int run_histogram(const int* hdata, int n, unsigned* hhist) {
  int* d;
  unsigned* h;
  CHECK(cudaMalloc(&d, n * sizeof(int)));
  CHECK(cudaMalloc(&h, NBINS * sizeof(unsigned)));
  CHECK(cudaMemcpy(d, hdata, n * sizeof(int), cudaMemcpyHostToDevice));
  CHECK(cudaMemset(h, 0, NBINS * sizeof(unsigned)));
  histogram<<<8, 128>>>(d, n, h);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hhist, h, NBINS * sizeof(unsigned), cudaMemcpyDeviceToHost));
  cudaFree(d);
  cudaFree(h);
  return 0;
}

extern "C" int run_stats(const int* hv, const float* hf, int n, int* hs) {
  int *v, *s;
  float* f;
  CHECK(cudaMalloc(&v, n * sizeof(int)));
  CHECK(cudaMalloc(&f, n * sizeof(float)));
  CHECK(cudaMalloc(&s, 11 * sizeof(int)));
  CHECK(cudaMemcpy(v, hv, n * sizeof(int), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(f, hf, n * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(s, hs, 11 * sizeof(int), cudaMemcpyHostToDevice));
  stats<<<(n + 127) / 128, 128>>>(v, f, n, s);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hs, s, 11 * sizeof(int), cudaMemcpyDeviceToHost));
  cudaFree(v);
  cudaFree(f);
  cudaFree(s);
  return 0;
}
