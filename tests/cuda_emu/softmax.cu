// Softmax and layernorm kernels: warp reductions with __shfl_xor_sync, 2-D blocks, float4 loads,
// __ldg / __ldcs / __stcs, fast-math intrinsics, and a block-wide softmax that caches its row in
// more than 48 KB of dynamic shared memory (cudaFuncSetAttribute) launched on a stream.
#include <cuda_runtime.h>
#include <math_constants.h>

__device__ __forceinline__ float warp_max(float v) {
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// One warp per row; blockDim = (32, rows_per_block).
__global__ void softmax_warp(const float* __restrict__ x, float* __restrict__ y, int rows, int cols) {
  int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // uniform per warp: whole warps leave together
  const float* xr = x + (size_t)row * cols;
  float m = -CUDART_INF_F;
  for (int c = threadIdx.x; c < cols; c += 32) m = fmaxf(m, __ldg(xr + c));
  m = warp_max(m);
  float s = 0.0f;
  for (int c = threadIdx.x; c < cols; c += 32) s += __expf(xr[c] - m);
  s = warp_sum(s);
  float inv = __fdividef(1.0f, s);
  for (int c = threadIdx.x; c < cols; c += 32) y[(size_t)row * cols + c] = __expf(xr[c] - m) * inv;
}

// Layernorm over rows of length C (a multiple of 4), one block of 128 threads per row.
__global__ void layernorm(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                          float* __restrict__ y, int C, float eps) {
  __shared__ float red[2][4];
  const float4* xr = reinterpret_cast<const float4*>(x + (size_t)blockIdx.x * C);
  float s = 0.0f, ss = 0.0f;
  for (int i = threadIdx.x; i < C / 4; i += blockDim.x) {
    float4 v = __ldcs(xr + i);
    s += v.x + v.y + v.z + v.w;
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  s = warp_sum(s);
  ss = warp_sum(ss);
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) { red[0][wid] = s; red[1][wid] = ss; }
  __syncthreads();
  s = red[0][0] + red[0][1] + red[0][2] + red[0][3];
  ss = red[1][0] + red[1][1] + red[1][2] + red[1][3];
  float mean = s / C;
  float rstd = rsqrtf(ss / C - mean * mean + eps);
  float4* yr = reinterpret_cast<float4*>(y + (size_t)blockIdx.x * C);
  const float4* w4 = reinterpret_cast<const float4*>(w);
  const float4* b4 = reinterpret_cast<const float4*>(b);
  for (int i = threadIdx.x; i < C / 4; i += blockDim.x) {
    float4 v = xr[i], ww = __ldg(w4 + i), bb = __ldg(b4 + i);
    float4 o = make_float4((v.x - mean) * rstd * ww.x + bb.x, (v.y - mean) * rstd * ww.y + bb.y,
                           (v.z - mean) * rstd * ww.z + bb.z, (v.w - mean) * rstd * ww.w + bb.w);
    __stcs(yr + i, o);
  }
}

// Block softmax: the row is cached in dynamic shared memory (cols floats), reductions go through
// a second region of that buffer (one float per warp).
__global__ void softmax_block(const float* __restrict__ x, float* __restrict__ y, int cols) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* row = reinterpret_cast<float*>(smem_raw);
  float* red = row + cols;
  const float* xr = x + (size_t)blockIdx.x * cols;
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float m = -CUDART_INF_F;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    row[c] = xr[c];
    m = fmaxf(m, row[c]);
  }
  m = warp_max(m);
  if (lane == 0) red[wid] = m;
  __syncthreads();
  m = red[0];
  for (int i = 1; i < nw; ++i) m = fmaxf(m, red[i]);
  __syncthreads();
  float s = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    row[c] = expf(row[c] - m);
    s += row[c];
  }
  s = warp_sum(s);
  if (lane == 0) red[wid] = s;
  __syncthreads();
  s = 0.0f;
  for (int i = 0; i < nw; ++i) s += red[i];
  for (int c = threadIdx.x; c < cols; c += blockDim.x) y[(size_t)blockIdx.x * cols + c] = row[c] / s;
}

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) return (int)e_; } while (0)

extern "C" int run_softmax_warp(const float* hx, float* hy, int rows, int cols) {
  float *x, *y;
  size_t bytes = sizeof(float) * rows * cols;
  CHECK(cudaMalloc(&x, bytes));
  CHECK(cudaMalloc(&y, bytes));
  CHECK(cudaMemcpy(x, hx, bytes, cudaMemcpyHostToDevice));
  dim3 block(32, 4);
  softmax_warp<<<(rows + 3) / 4, block>>>(x, y, rows, cols);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hy, y, bytes, cudaMemcpyDeviceToHost));
  cudaFree(x);
  cudaFree(y);
  return 0;
}

extern "C" int run_layernorm(const float* hx, const float* hw, const float* hb, float* hy, int rows, int C) {
  float *x, *w, *b, *y;
  size_t bytes = sizeof(float) * rows * C;
  CHECK(cudaMalloc(&x, bytes));
  CHECK(cudaMalloc(&y, bytes));
  CHECK(cudaMalloc(&w, C * sizeof(float)));
  CHECK(cudaMalloc(&b, C * sizeof(float)));
  CHECK(cudaMemcpy(x, hx, bytes, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(w, hw, C * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(b, hb, C * sizeof(float), cudaMemcpyHostToDevice));
  layernorm<<<rows, 128>>>(x, w, b, y, C, 1e-5f);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hy, y, bytes, cudaMemcpyDeviceToHost));
  cudaFree(x);
  cudaFree(y);
  cudaFree(w);
  cudaFree(b);
  return 0;
}

extern "C" int run_softmax_block(const float* hx, float* hy, int rows, int cols) {
  float *x, *y;
  size_t bytes = sizeof(float) * rows * cols;
  int threads = 256;
  size_t smem = (cols + threads / 32) * sizeof(float);
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CHECK(cudaMalloc(&x, bytes));
  CHECK(cudaMalloc(&y, bytes));
  CHECK(cudaMemcpyAsync(x, hx, bytes, cudaMemcpyHostToDevice, stream));
  if (smem > 48 * 1024) CHECK(cudaFuncSetAttribute(softmax_block, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  softmax_block<<<rows, threads, smem, stream>>>(x, y, cols);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpyAsync(hy, y, bytes, cudaMemcpyDeviceToHost, stream));
  CHECK(cudaStreamSynchronize(stream));
  CHECK(cudaStreamDestroy(stream));
  cudaFree(x);
  cudaFree(y);
  return 0;
}
