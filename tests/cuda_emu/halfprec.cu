// bf16 / fp16: conversions in several rounding modes, scalar and paired arithmetic, operators,
// shuffles of 16-bit types, and a mixed-precision (bf16 in, fp32 accumulate, bf16 out) dot product.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// 4 outputs per element: half rn / rz bits, bf16 rn / rz bits (as unsigned short), and the values
// converted back to float.
__global__ void convert(const float* __restrict__ x, unsigned short* __restrict__ bits, float* __restrict__ back, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = x[i];
  __half h = __float2half_rn(v);
  __nv_bfloat16 b = __float2bfloat16(v);
  bits[4 * i + 0] = __half_as_ushort(h);
  bits[4 * i + 1] = __half_as_ushort(__float2half_rz(v));
  bits[4 * i + 2] = __bfloat16_as_ushort(b);
  bits[4 * i + 3] = __bfloat16_as_ushort(__float2bfloat16_rz(v));
  back[2 * i + 0] = __half2float(h);
  back[2 * i + 1] = __bfloat162float(b);
}

// 6 results per element: a+b, a-b, a*b, a/b, fma(a,b,c), max(a,b); then a*b+c with operators.
template <class T>
__device__ void arith(const T* a, const T* b, const T* c, T* out, int i) {
  T x = a[i], y = b[i], z = c[i];
  out[7 * i + 0] = __hadd(x, y);
  out[7 * i + 1] = __hsub(x, y);
  out[7 * i + 2] = __hmul(x, y);
  out[7 * i + 3] = __hdiv(x, y);
  out[7 * i + 4] = __hfma(x, y, z);
  out[7 * i + 5] = __hmax(x, y);
  T t = x * y + z;
  t += z;
  out[7 * i + 6] = -t;
}
__global__ void arith_half(const __half* a, const __half* b, const __half* c, __half* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) arith(a, b, c, out, i);
}
__global__ void arith_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* c,
                           __nv_bfloat16* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) arith(a, b, c, out, i);
}

// Paired types and 16-bit shuffles; one warp, out has 6 floats per lane.
__global__ void pairs(const float* __restrict__ x, float* __restrict__ out) {
  int l = threadIdx.x;
  float p = x[2 * l], q = x[2 * l + 1];
  __half2 h = __floats2half2_rn(p, q);
  __half2 h2 = __hadd2(__hmul2(h, h), h);
  float2 hf = __half22float2(h2);
  __nv_bfloat162 b = __floats2bfloat162_rn(p, q);
  __nv_bfloat162 b2 = __hfma2(b, b, b);
  float2 bf = __bfloat1622float2(b2);
  __nv_bfloat16 s = __shfl_xor_sync(0xffffffffu, __low2bfloat16(b), 1);
  __half2 hs = __shfl_down_sync(0xffffffffu, h, 1);
  out[6 * l + 0] = hf.x;
  out[6 * l + 1] = hf.y;
  out[6 * l + 2] = bf.x;
  out[6 * l + 3] = bf.y;
  out[6 * l + 4] = __bfloat162float(s);
  out[6 * l + 5] = __high2float(hs);
}

// y[r] = bf16(sum_k a[r,k] * b[k]) with fp32 accumulation; one warp per row.
__global__ void dot_bf16(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ b,
                         __nv_bfloat16* __restrict__ y, int rows, int k) {
  int r = blockIdx.x;
  float acc = 0.0f;
  for (int j = threadIdx.x; j < k; j += 32) acc += __bfloat162float(a[(size_t)r * k + j]) * __bfloat162float(b[j]);
  for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (threadIdx.x == 0 && r < rows) y[r] = __float2bfloat16_rn(acc);
}

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) return (int)e_; } while (0)

template <class T>
static int upload(T** d, const void* h, size_t bytes) {
  cudaError_t e = cudaMalloc(d, bytes);
  if (e == cudaSuccess && h) e = cudaMemcpy(*d, h, bytes, cudaMemcpyHostToDevice);
  return (int)e;
}

extern "C" int run_convert(const float* hx, unsigned short* hbits, float* hback, int n) {
  float *x, *back;
  unsigned short* bits;
  CHECK((cudaError_t)upload(&x, hx, n * sizeof(float)));
  CHECK((cudaError_t)upload(&bits, nullptr, 4 * n * sizeof(unsigned short)));
  CHECK((cudaError_t)upload(&back, nullptr, 2 * n * sizeof(float)));
  convert<<<(n + 255) / 256, 256>>>(x, bits, back, n);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hbits, bits, 4 * n * sizeof(unsigned short), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hback, back, 2 * n * sizeof(float), cudaMemcpyDeviceToHost));
  cudaFree(x);
  cudaFree(bits);
  cudaFree(back);
  return 0;
}

// kind 0: half, 1: bf16; buffers hold 16-bit patterns
extern "C" int run_arith(int kind, const unsigned short* ha, const unsigned short* hb, const unsigned short* hc,
                         unsigned short* hout, int n) {
  unsigned short *a, *b, *c, *out;
  size_t bytes = n * sizeof(unsigned short);
  CHECK((cudaError_t)upload(&a, ha, bytes));
  CHECK((cudaError_t)upload(&b, hb, bytes));
  CHECK((cudaError_t)upload(&c, hc, bytes));
  CHECK((cudaError_t)upload(&out, nullptr, 7 * bytes));
  if (kind == 0)
    arith_half<<<(n + 127) / 128, 128>>>((__half*)a, (__half*)b, (__half*)c, (__half*)out, n);
  else
    arith_bf16<<<(n + 127) / 128, 128>>>((__nv_bfloat16*)a, (__nv_bfloat16*)b, (__nv_bfloat16*)c,
                                         (__nv_bfloat16*)out, n);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hout, out, 7 * bytes, cudaMemcpyDeviceToHost));
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cudaFree(out);
  return 0;
}

extern "C" int run_pairs(const float* hx, float* hout) {
  float *x, *out;
  CHECK((cudaError_t)upload(&x, hx, 64 * sizeof(float)));
  CHECK((cudaError_t)upload(&out, nullptr, 6 * 32 * sizeof(float)));
  pairs<<<1, 32>>>(x, out);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hout, out, 6 * 32 * sizeof(float), cudaMemcpyDeviceToHost));
  cudaFree(x);
  cudaFree(out);
  return 0;
}

extern "C" int run_dot_bf16(const unsigned short* ha, const unsigned short* hb, unsigned short* hy, int rows, int k) {
  __nv_bfloat16 *a, *b, *y;
  CHECK((cudaError_t)upload(&a, ha, (size_t)rows * k * 2));
  CHECK((cudaError_t)upload(&b, hb, (size_t)k * 2));
  CHECK((cudaError_t)upload(&y, nullptr, (size_t)rows * 2));
  dot_bf16<<<rows, 32>>>(a, b, y, rows, k);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(hy, y, (size_t)rows * 2, cudaMemcpyDeviceToHost));
  cudaFree(a);
  cudaFree(b);
  cudaFree(y);
  return 0;
}
