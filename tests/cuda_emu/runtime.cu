// The runtime API subset host code uses: device properties and attributes, streams and events,
// cudaMemset / cudaMemcpyAsync, __constant__ memory and __device__ variables through the symbol
// API, 3-D grids and blocks, cudaLaunchKernel, opt-in dynamic shared memory, and error queries.
#include <cuda_runtime.h>
#include <cstdio>

__constant__ float c_scale[4];
__device__ int d_counter;

// Every thread records its coordinates: out[linear global id] = packed (block, thread) indices.
__global__ void coords(int* out) {
  unsigned bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
  out[bid * nthreads + tid] = (int)((blockIdx.z << 24) | (blockIdx.y << 20) | (blockIdx.x << 16) |
                                    (threadIdx.z << 8) | (threadIdx.y << 4) | threadIdx.x);
  atomicAdd(&d_counter, 1);
}

__global__ void scale(const float* __restrict__ x, float* __restrict__ y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i] * c_scale[i % 4];
}

// Uses 100 KB of dynamic shared memory (needs the opt-in attribute).
__global__ void big_smem(float* out) {
  extern __shared__ float buf[];
  const int n = 100 * 1024 / 4;
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = (float)i;
  __syncthreads();
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += buf[n - 1 - i];
  atomicAdd(out, s);
}

// info: [0] major [1] minor [2] maxThreadsPerBlock [3] warpSize [4] sharedMemPerBlock
//       [5] sharedMemPerBlockOptin [6] multiProcessorCount [7] attr max threads [8] device count
//       [9] last error after a good launch [10] elapsed ms >= 0 [11] d_counter [12] runtime version
extern "C" int run_runtime(int* info, int* hcoords, float* hy, const float* hx, int n, float* hbig) {
  cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return 1;
  info[0] = p.major;
  info[1] = p.minor;
  info[2] = p.maxThreadsPerBlock;
  info[3] = p.warpSize;
  info[4] = (int)p.sharedMemPerBlock;
  info[5] = (int)p.sharedMemPerBlockOptin;
  info[6] = p.multiProcessorCount;
  cudaDeviceGetAttribute(&info[7], cudaDevAttrMaxThreadsPerBlock, 0);
  cudaGetDeviceCount(&info[8]);
  cudaSetDevice(0);

  cudaStream_t s1, s2;
  cudaEvent_t start, stop;
  cudaStreamCreate(&s1);
  cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking);
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start, s1);

  int zero = 0;
  cudaMemcpyToSymbol(d_counter, &zero, sizeof(int));
  int* dc;
  dim3 grid(3, 2, 2), block(4, 3, 2);
  int total = 3 * 2 * 2 * 4 * 3 * 2;
  cudaMalloc(&dc, total * sizeof(int));
  cudaMemsetAsync(dc, 0xff, total * sizeof(int), s1);
  coords<<<grid, block, 0, s1>>>(dc);
  info[9] = (int)cudaGetLastError();
  cudaMemcpyAsync(hcoords, dc, total * sizeof(int), cudaMemcpyDeviceToHost, s1);
  cudaMemcpyFromSymbol(&info[11], d_counter, sizeof(int));

  float scales[4] = {1.0f, 2.0f, 0.5f, -1.0f};
  cudaMemcpyToSymbol(c_scale, scales, sizeof(scales));
  float *x, *y;
  cudaMalloc(&x, n * sizeof(float));
  cudaMalloc(&y, n * sizeof(float));
  cudaMemcpy(x, hx, n * sizeof(float), cudaMemcpyHostToDevice);
  int nn = n;
  void* args[] = {&x, &y, &nn};
  cudaLaunchKernel(scale, dim3((n + 63) / 64), dim3(64), args, 0, s2);
  cudaStreamSynchronize(s2);
  cudaMemcpy(hy, y, n * sizeof(float), cudaMemcpyDeviceToHost);

  float* dbig;
  cudaMalloc(&dbig, sizeof(float));
  cudaMemset(dbig, 0, sizeof(float));
  cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
  big_smem<<<2, 256, 100 * 1024>>>(dbig);
  cudaMemcpy(hbig, dbig, sizeof(float), cudaMemcpyDeviceToHost);

  cudaEventRecord(stop, s1);
  cudaEventSynchronize(stop);
  float ms = -1.0f;
  cudaEventElapsedTime(&ms, start, stop);
  info[10] = ms >= 0.0f;
  cudaRuntimeGetVersion(&info[12]);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(s1);
  cudaStreamDestroy(s2);
  cudaFree(x);
  cudaFree(y);
  cudaFree(dc);
  cudaFree(dbig);
  cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    std::printf("error: %s\n", cudaGetErrorString(e));
    return (int)e;
  }
  return (int)cudaGetLastError();
}
