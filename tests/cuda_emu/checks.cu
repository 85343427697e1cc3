// Kernels that break the emulator's checks on purpose; each host function runs one of them.
// All of it is valid CUDA (nvcc compiles it) except the GPT2GEN_CUDA_EMU-only part at the end.
#include <cuda_runtime.h>
#include <cassert>

__global__ void divergent_barrier(float* x) {
  if (threadIdx.x < 32) {
    x[threadIdx.x] = 1.0f;
    __syncthreads();
  } else {
    __syncthreads();
    x[threadIdx.x] = 2.0f;
  }
}

__global__ void exit_before_barrier(float* x) {
  if (threadIdx.x >= 40) return;
  x[threadIdx.x] = 1.0f;
  __syncthreads();
}

__global__ void shuffle_partial(float* x) {
  float v = x[threadIdx.x];
  if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  x[threadIdx.x] = v;
}

__global__ void vote_partial_warp(int* x) {  // launched with 48 threads: warp 1 has 16 lanes
  x[threadIdx.x] = (int)__ballot_sync(0xffffffffu, x[threadIdx.x] > 0);
}

__global__ void vote_after_exit(int* x) {
  if (threadIdx.x == 5) return;
  x[threadIdx.x] = __all_sync(0xffffffffu, x[threadIdx.x] > 0);
}

__global__ void shuffle_reads_outside_mask(float* x) {
  if (threadIdx.x < 16) x[threadIdx.x] = __shfl_sync(0x0000ffffu, x[threadIdx.x], 20);
}

__global__ void shuffle_vs_barrier(float* x) {
  if (threadIdx.x < 16) x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
  else __syncthreads();
}

__global__ void shared_oob_static(float* x) {
  __shared__ float buf[64];
  buf[threadIdx.x] = x[threadIdx.x];  // launched with 128 threads
  __syncthreads();
  x[threadIdx.x] = buf[63 - (threadIdx.x % 64)];
}

__global__ void shared_oob_2d(float* x) {
  __shared__ float tile[8][8];
  tile[threadIdx.y][threadIdx.x + 1] = 1.0f;  // column 8 does not exist
  __syncthreads();
  x[threadIdx.y * 8 + threadIdx.x] = tile[threadIdx.y][threadIdx.x];
}

__global__ void shared_oob_dynamic(float* x) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x + 1] = x[threadIdx.x];  // one past the end for the last thread
  __syncthreads();
  x[threadIdx.x] = dyn[threadIdx.x];
}

__global__ void device_assert(const float* x) {
  assert(x[threadIdx.x] >= 0.0f);
}

__global__ void trap_kernel(float*) {
  if (blockIdx.x == 2 && threadIdx.x == 3) __trap();
}

__global__ void spin_forever(int* flag) {
  if (threadIdx.x == 0) {
    while (atomicCAS(flag, 1, 1) != 1) {}  // waits for a store that comes after the barrier
  }
  __syncthreads();
  if (threadIdx.x == 1) atomicExch(flag, 1);
}

__global__ void ok_kernel(float* x) { x[threadIdx.x] = 2.0f * threadIdx.x; }

static float* dev_buffer(int n) {
  float* d = nullptr;
  cudaMalloc(&d, n * sizeof(float));
  cudaMemset(d, 0, n * sizeof(float));
  return d;
}

extern "C" int check_divergent_barrier() { float* d = dev_buffer(64); divergent_barrier<<<1, 64>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_exit_before_barrier() { float* d = dev_buffer(64); exit_before_barrier<<<2, 64>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_shuffle_partial() { float* d = dev_buffer(32); shuffle_partial<<<1, 32>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_vote_partial_warp() { int* d; cudaMalloc(&d, 48 * sizeof(int)); cudaMemset(d, 0, 48 * sizeof(int)); vote_partial_warp<<<1, 48>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_vote_after_exit() { int* d; cudaMalloc(&d, 32 * sizeof(int)); cudaMemset(d, 0, 32 * sizeof(int)); vote_after_exit<<<1, 32>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_shuffle_reads_outside_mask() { float* d = dev_buffer(32); shuffle_reads_outside_mask<<<1, 32>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_shuffle_vs_barrier() { float* d = dev_buffer(32); shuffle_vs_barrier<<<1, 32>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_shared_oob_static() { float* d = dev_buffer(128); shared_oob_static<<<4, 128>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_shared_oob_2d() { float* d = dev_buffer(64); shared_oob_2d<<<1, dim3(8, 8)>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_shared_oob_dynamic() { float* d = dev_buffer(64); shared_oob_dynamic<<<1, 64, 64 * sizeof(float)>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_device_assert() {
  float h[32];
  for (int i = 0; i < 32; ++i) h[i] = i == 17 ? -1.0f : 1.0f;
  float* d = dev_buffer(32);
  cudaMemcpy(d, h, sizeof h, cudaMemcpyHostToDevice);
  device_assert<<<1, 32>>>(d);
  cudaFree(d);
  return cudaDeviceSynchronize();
}
extern "C" int check_trap() { float* d = dev_buffer(1); trap_kernel<<<4, 32>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_spin_forever() { int* d; cudaMalloc(&d, sizeof(int)); cudaMemset(d, 0, sizeof(int)); spin_forever<<<1, 32>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
extern "C" int check_too_many_threads() { float* d = dev_buffer(2048); ok_kernel<<<1, 2048>>>(d); cudaFree(d); return cudaGetLastError(); }
extern "C" int check_block_z() { float* d = dev_buffer(2048); ok_kernel<<<1, dim3(1, 1, 65)>>>(d); cudaFree(d); return cudaGetLastError(); }
extern "C" int check_grid_y() { float* d = dev_buffer(2048); ok_kernel<<<dim3(1, 70000), 1>>>(d); cudaFree(d); return cudaGetLastError(); }
extern "C" int check_dynamic_smem_default_limit() { float* d = dev_buffer(64); shared_oob_dynamic<<<1, 32, 64 * 1024>>>(d); cudaFree(d); return cudaGetLastError(); }
extern "C" int check_dynamic_smem_optin_limit() {
  return cudaFuncSetAttribute(shared_oob_dynamic, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 * 1024);
}
extern "C" int check_memcpy_host_as_device(float* host_dst, const float* host_src, int n) {
  return cudaMemcpy(host_dst, host_src, n * sizeof(float), cudaMemcpyHostToDevice);
}
extern "C" int run_ok(float* hx, int n) {
  float* d = dev_buffer(n);
  ok_kernel<<<1, n>>>(d);
  cudaError_t e = cudaMemcpy(hx, d, n * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(d);
  return e;
}

#ifdef GPT2GEN_CUDA_EMU
// Not valid for nvcc (ptxas rejects more than 48 KB of static shared memory), so emulator-only.
__global__ void static_smem_too_big(float* x) {
  __shared__ float big[16 * 1024];  // 64 KB
  big[threadIdx.x] = 1.0f;
  __syncthreads();
  x[threadIdx.x] = big[threadIdx.x];
}
extern "C" int check_static_smem_limit() { float* d = dev_buffer(32); static_smem_too_big<<<1, 32>>>(d); cudaFree(d); return cudaDeviceSynchronize(); }
#endif
