// Reductions: shared-memory tree, warp shuffles, cooperative groups, dynamic shared memory,
// and the warp vote / shuffle / block-barrier-reduction intrinsics.
#include <cuda_runtime.h>
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>

namespace cg = cooperative_groups;

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) return (int)e_; } while (0)

// Classic tree reduction in a static shared array (grid-stride accumulation first).
__global__ void block_reduce_shared(const float* __restrict__ x, float* __restrict__ partial, int n) {
  __shared__ float sdata[256];
  unsigned t = threadIdx.x;
  float v = 0.0f;
  for (int i = blockIdx.x * blockDim.x + t; i < n; i += blockDim.x * gridDim.x) v += x[i];
  sdata[t] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) sdata[t] += sdata[t + s];
    __syncthreads();
  }
  if (t == 0) partial[blockIdx.x] = sdata[0];
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = warpSize / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Warp-shuffle reduction: warps reduce in registers, warp leaders meet in shared memory,
// the block result is accumulated with a float atomicAdd.
__global__ void warp_reduce_shuffle(const float* __restrict__ x, float* out, int n) {
  __shared__ float warp_sums[32];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? x[i] : 0.0f;
  v = warp_sum(v);
  int lane = threadIdx.x % warpSize, wid = threadIdx.x / warpSize;
  if (lane == 0) warp_sums[wid] = v;
  __syncthreads();
  if (wid == 0) {
    int nw = (blockDim.x + warpSize - 1) / warpSize;
    v = lane < nw ? warp_sums[lane] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) atomicAdd(out, v);
  }
}

// Cooperative groups: per-block sum and max with thread_block_tile<32> and cg::reduce.
__global__ void cg_reduce(const float* __restrict__ x, float* sums, float* maxes, int n) {
  cg::thread_block block = cg::this_thread_block();
  cg::thread_block_tile<32> tile = cg::tiled_partition<32>(block);
  __shared__ float s_sum[32], s_max[32];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? x[i] : 0.0f;
  float m = i < n ? x[i] : -3.0e38f;
  float ts = cg::reduce(tile, v, cg::plus<float>());
  float tm = cg::reduce(tile, m, cg::greater<float>());
  if (tile.thread_rank() == 0) {
    s_sum[tile.meta_group_rank()] = ts;
    s_max[tile.meta_group_rank()] = tm;
  }
  block.sync();
  if (tile.meta_group_rank() == 0) {
    unsigned nt = (unsigned)tile.meta_group_size();
    float a = tile.thread_rank() < nt ? s_sum[tile.thread_rank()] : 0.0f;
    float b = tile.thread_rank() < nt ? s_max[tile.thread_rank()] : -3.0e38f;
    a = cg::reduce(tile, a, cg::plus<float>());
    b = cg::reduce(tile, b, cg::greater<float>());
    if (tile.thread_rank() == 0) {
      sums[blockIdx.x] = a;
      maxes[blockIdx.x] = b;
    }
  }
}

// Tree reduction over dynamic shared memory (size given at launch).
__global__ void dyn_reduce(const float* __restrict__ x, float* partial, int n) {
  extern __shared__ float smem[];
  unsigned t = threadIdx.x;
  int i = blockIdx.x * blockDim.x + t;
  smem[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) smem[t] += smem[t + s];
    __syncthreads();
  }
  if (t == 0) partial[blockIdx.x] = smem[0];
}

// Warp votes, shuffles (all modes and widths), block barrier reductions.
// out has 12 ints per thread.
__global__ void warp_ops(const int* __restrict__ x, int* out) {
  int t = threadIdx.x;
  int v = x[t];
  int lane = t & 31;
  int* o = out + 12 * t;
  o[0] = (int)__ballot_sync(0xffffffffu, v > 0);
  o[1] = __all_sync(0xffffffffu, v > -100);
  o[2] = __any_sync(0xffffffffu, v == 7);
  o[3] = __shfl_sync(0xffffffffu, v, 3, 16);          // broadcast lane 3 of each half warp
  int scan = v;                                         // inclusive prefix sum in the warp
  for (int d = 1; d < 32; d <<= 1) {
    int y = __shfl_up_sync(0xffffffffu, scan, d);
    if (lane >= d) scan += y;
  }
  o[4] = scan;
  o[5] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[6] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  o[7] = __syncthreads_count(v > 0);
  o[8] = __syncthreads_and(v > -100);
  o[9] = __syncthreads_or(v == 7);
  if (lane < 16) {                                      // a sub-warp shuffle with a partial mask
    o[10] = __shfl_xor_sync(0x0000ffffu, v, 1);
  } else {
    o[10] = __shfl_xor_sync(0xffff0000u, v, 2);
  }
  __syncwarp();
  o[11] = (int)__reduce_add_sync(0xffffffffu, (unsigned)v);
}

extern "C" int reduce_shared(const float* hx, int n, float* hpartial, int blocks) {
  float *dx, *dp;
  CHECK(cudaMalloc(&dx, n * sizeof(float)));
  CHECK(cudaMalloc(&dp, blocks * sizeof(float)));
  CHECK(cudaMemcpy(dx, hx, n * sizeof(float), cudaMemcpyHostToDevice));
  block_reduce_shared<<<blocks, 256>>>(dx, dp, n);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hpartial, dp, blocks * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaFree(dx));
  CHECK(cudaFree(dp));
  return 0;
}

extern "C" int reduce_warp(const float* hx, int n, float* hout) {
  float *dx, *dout;
  CHECK(cudaMalloc(&dx, n * sizeof(float)));
  CHECK(cudaMalloc(&dout, sizeof(float)));
  CHECK(cudaMemcpy(dx, hx, n * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemset(dout, 0, sizeof(float)));
  int threads = 256;
  warp_reduce_shuffle<<<(n + threads - 1) / threads, threads>>>(dx, dout, n);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaMemcpy(hout, dout, sizeof(float), cudaMemcpyDeviceToHost));
  cudaFree(dx);
  cudaFree(dout);
  return 0;
}

extern "C" int reduce_cg(const float* hx, int n, int threads, float* hsums, float* hmaxes) {
  int blocks = (n + threads - 1) / threads;
  float *dx, *ds, *dm;
  CHECK(cudaMalloc(&dx, n * sizeof(float)));
  CHECK(cudaMalloc(&ds, blocks * sizeof(float)));
  CHECK(cudaMalloc(&dm, blocks * sizeof(float)));
  CHECK(cudaMemcpy(dx, hx, n * sizeof(float), cudaMemcpyHostToDevice));
  cg_reduce<<<blocks, threads>>>(dx, ds, dm, n);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hsums, ds, blocks * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hmaxes, dm, blocks * sizeof(float), cudaMemcpyDeviceToHost));
  cudaFree(dx);
  cudaFree(ds);
  cudaFree(dm);
  return 0;
}

extern "C" int reduce_dynamic(const float* hx, int n, int threads, float* hpartial) {
  int blocks = (n + threads - 1) / threads;
  float *dx, *dp;
  CHECK(cudaMalloc(&dx, n * sizeof(float)));
  CHECK(cudaMalloc(&dp, blocks * sizeof(float)));
  CHECK(cudaMemcpy(dx, hx, n * sizeof(float), cudaMemcpyHostToDevice));
  dyn_reduce<<<blocks, threads, threads * sizeof(float)>>>(dx, dp, n);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hpartial, dp, blocks * sizeof(float), cudaMemcpyDeviceToHost));
  cudaFree(dx);
  cudaFree(dp);
  return 0;
}

extern "C" int run_warp_ops(const int* hx, int threads, int* hout) {
  int *dx, *dout;
  CHECK(cudaMalloc(&dx, threads * sizeof(int)));
  CHECK(cudaMalloc(&dout, 12 * threads * sizeof(int)));
  CHECK(cudaMemcpy(dx, hx, threads * sizeof(int), cudaMemcpyHostToDevice));
  warp_ops<<<1, threads>>>(dx, dout);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hout, dout, 12 * threads * sizeof(int), cudaMemcpyDeviceToHost));
  cudaFree(dx);
  cudaFree(dout);
  return 0;
}
