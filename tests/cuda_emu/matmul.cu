// Tiled matrix multiply C[M,N] = A[M,K] @ B[K,N] with shared-memory tiles and __syncthreads,
// as a template kernel (launched as matmul_tiled<16><<<...>>>), handling ragged edges.
#include <cuda_runtime.h>

template <int TILE>
__global__ void matmul_tiled(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                             int M, int N, int K) {
  __shared__ float As[TILE][TILE], Bs[TILE][TILE + 1];  // +1: no bank conflicts on the transpose read
  int tx = threadIdx.x, ty = threadIdx.y;
  int row = blockIdx.y * TILE + ty;
  int col = blockIdx.x * TILE + tx;
  float acc = 0.0f;
  for (int k0 = 0; k0 < K; k0 += TILE) {
    As[ty][tx] = (row < M && k0 + tx < K) ? A[(size_t)row * K + k0 + tx] : 0.0f;
    Bs[ty][tx] = (k0 + ty < K && col < N) ? B[(size_t)(k0 + ty) * N + col] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < TILE; ++k) acc = fmaf(As[ty][k], Bs[k][tx], acc);
    __syncthreads();
  }
  if (row < M && col < N) C[(size_t)row * N + col] = acc;
}

extern "C" int matmul(const float* hA, const float* hB, float* hC, int M, int N, int K) {
  constexpr int T = 16;
  float *A, *B, *C;
  cudaMalloc(&A, sizeof(float) * M * K);
  cudaMalloc(&B, sizeof(float) * K * N);
  cudaMalloc(&C, sizeof(float) * M * N);
  cudaMemcpy(A, hA, sizeof(float) * M * K, cudaMemcpyHostToDevice);
  cudaMemcpy(B, hB, sizeof(float) * K * N, cudaMemcpyHostToDevice);
  dim3 block(T, T);
  dim3 grid((N + T - 1) / T, (M + T - 1) / T);
  matmul_tiled<T><<<grid, block>>>(A, B, C, M, N, K);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(hC, C, sizeof(float) * M * N, cudaMemcpyDeviceToHost);
  cudaFree(A);
  cudaFree(B);
  cudaFree(C);
  return (int)err;
}
