// gpt2gen cuda_emu: cuBLASLt on the CPU. Included (hidden visibility) by the stand-in <cublasLt.h>.
//
// D = epilogue(alpha * op(A) op(B) + beta * C), column-major, strided batches. Products are accumulated in
// fp32 (inputs converted exactly from fp16/bf16), alpha/beta/bias/epilogue are applied in fp32 and the result
// is rounded once to D's type (round to nearest even). Execution is synchronous; columns of D are computed in
// parallel on GPT2GEN_EMU_THREADS threads. Every rejected call prints "[cuda_emu] <function>: <why>" on
// stderr and returns the status the real library documents; it does not touch the CUDA error state. A
// matrix that does not lie inside device memory is a device fault: sticky cudaErrorIllegalAddress, as a
// cuBLASLt kernel reading it would cause, and CUBLAS_STATUS_EXECUTION_FAILED.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <vector>
#include "fp16.hpp"

namespace gpt2gen_emu {
namespace lt {

constexpr uint64_t kHandleMagic = 0x4c54484e444c4530ull;  // "0ELDNHTL"
constexpr uint64_t kLayoutMagic = 0x4c544c41594f5530ull;
constexpr uint64_t kDescMagic = 0x4c544445534330ull;
constexpr uint64_t kPrefMagic = 0x4c545052454630ull;
constexpr uint64_t kAlgoMagic = 0x4c54414c474f30ull;
constexpr unsigned kKernelAlign = 16;   // the most any modelled kernel assumes (128-bit vector loads, TMA)
constexpr int32_t kTypeUnset = -1;

struct Context { uint64_t magic; };

struct Layout {
  uint64_t magic;
  uint32_t type;
  int32_t order;
  uint64_t rows, cols;
  int64_t ld;
  int32_t batch;
  uint32_t batch_mode;
  int64_t stride;
  int64_t plane_offset;
  uint8_t heap;
};

struct Desc {
  uint64_t magic;
  int32_t compute, scale, pointer_mode, transa, transb, transc, fill;
  uint32_t epilogue;
  void* bias;
  int64_t bias_batch_stride;
  void* aux;
  int64_t aux_ld, aux_batch_stride, alpha_vec_batch_stride;
  int32_t sm_count;
  void *a_scale, *b_scale, *c_scale, *d_scale, *amax_d;
  int32_t aux_type;
  void *aux_scale, *aux_amax;
  int8_t fast_accum;
  int32_t bias_type;
  int32_t scale_mode[6];  // A, B, C, D, AUX, D_OUT
  void* d_out_scale;
  void* emulation;
  int64_t alpha_batch_stride, beta_batch_stride;
  int32_t batch_invariance;
  uint8_t heap;
};

struct Pref {
  uint64_t magic;
  uint32_t search_mode;
  uint64_t max_workspace;
  uint32_t reduction_mask;
  uint32_t align[4];  // A, B, C, D
  float max_waves;
  uint64_t impl_mask;
  uint8_t heap;
};

struct Algo {  // what cublasLtMatmulAlgoGetHeuristic decided, carried in cublasLtMatmulAlgo_t
  uint64_t magic;
  uint64_t workspace;
  uint32_t align[4];  // the alignment the chosen kernel assumes for A, B, C, D
  uint32_t bias_align, aux_align;
};

static_assert(sizeof(Layout) <= sizeof(cublasLtMatrixLayoutOpaque_t), "cuda_emu: layout does not fit");
static_assert(sizeof(Desc) <= sizeof(cublasLtMatmulDescOpaque_t), "cuda_emu: matmul desc does not fit");
static_assert(sizeof(Pref) <= sizeof(cublasLtMatmulPreferenceOpaque_t), "cuda_emu: preference does not fit");
static_assert(sizeof(Algo) <= sizeof(cublasLtMatmulAlgo_t), "cuda_emu: algo does not fit");

inline Layout* L(cublasLtMatrixLayout_t p) { return reinterpret_cast<Layout*>(p); }
inline Desc* D(cublasLtMatmulDesc_t p) { return reinterpret_cast<Desc*>(p); }
inline Pref* P(cublasLtMatmulPreference_t p) { return reinterpret_cast<Pref*>(p); }

// ---------------------------------------------------------------- messages
inline const char* status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

inline cublasStatus_t fail(const char* api, cublasStatus_t s, const std::string& why) {
  std::fprintf(stderr, "[cuda_emu] %s: %s -> %s\n", api, why.c_str(), status_name(s));
  std::fflush(stderr);
  return s;
}

inline std::string type_name(int32_t t) {
  switch (t) {
    case CUDA_R_32F: return "CUDA_R_32F";
    case CUDA_R_16F: return "CUDA_R_16F";
    case CUDA_R_16BF: return "CUDA_R_16BF";
    case CUDA_R_64F: return "CUDA_R_64F";
    case CUDA_R_8I: return "CUDA_R_8I";
    case CUDA_R_32I: return "CUDA_R_32I";
    case CUDA_R_8F_E4M3: return "CUDA_R_8F_E4M3";
    case CUDA_R_8F_E5M2: return "CUDA_R_8F_E5M2";
  }
  return "cudaDataType " + std::to_string(t);
}
inline size_t type_size(int32_t t) {
  switch (t) {
    case CUDA_R_32F: return 4;
    case CUDA_R_16F: case CUDA_R_16BF: return 2;
  }
  return 0;
}
inline bool emulated_type(int32_t t) { return type_size(t) != 0; }

inline const char* epilogue_name(uint32_t e) {
  switch (e) {
    case CUBLASLT_EPILOGUE_DEFAULT: return "CUBLASLT_EPILOGUE_DEFAULT";
    case CUBLASLT_EPILOGUE_RELU: return "CUBLASLT_EPILOGUE_RELU";
    case CUBLASLT_EPILOGUE_RELU_AUX: return "CUBLASLT_EPILOGUE_RELU_AUX";
    case CUBLASLT_EPILOGUE_BIAS: return "CUBLASLT_EPILOGUE_BIAS";
    case CUBLASLT_EPILOGUE_RELU_BIAS: return "CUBLASLT_EPILOGUE_RELU_BIAS";
    case CUBLASLT_EPILOGUE_RELU_AUX_BIAS: return "CUBLASLT_EPILOGUE_RELU_AUX_BIAS";
    case CUBLASLT_EPILOGUE_DRELU: return "CUBLASLT_EPILOGUE_DRELU";
    case CUBLASLT_EPILOGUE_DRELU_BGRAD: return "CUBLASLT_EPILOGUE_DRELU_BGRAD";
    case CUBLASLT_EPILOGUE_GELU: return "CUBLASLT_EPILOGUE_GELU";
    case CUBLASLT_EPILOGUE_GELU_AUX: return "CUBLASLT_EPILOGUE_GELU_AUX";
    case CUBLASLT_EPILOGUE_GELU_BIAS: return "CUBLASLT_EPILOGUE_GELU_BIAS";
    case CUBLASLT_EPILOGUE_GELU_AUX_BIAS: return "CUBLASLT_EPILOGUE_GELU_AUX_BIAS";
    case CUBLASLT_EPILOGUE_DGELU: return "CUBLASLT_EPILOGUE_DGELU";
    case CUBLASLT_EPILOGUE_DGELU_BGRAD: return "CUBLASLT_EPILOGUE_DGELU_BGRAD";
    case CUBLASLT_EPILOGUE_BGRADA: return "CUBLASLT_EPILOGUE_BGRADA";
    case CUBLASLT_EPILOGUE_BGRADB: return "CUBLASLT_EPILOGUE_BGRADB";
  }
  return "an unknown epilogue";
}

inline std::string hex(const void* p) {
  char b[32];
  std::snprintf(b, sizeof b, "%p", p);
  return b;
}
inline unsigned alignment_of(const void* p) {  // the largest power of two (<= 256) dividing the address
  uintptr_t a = (uintptr_t)p;
  unsigned al = 256;
  while (al > 1 && a % al) al /= 2;
  return al;
}

// ---------------------------------------------------------------- attribute plumbing
// SetAttribute / GetAttribute: the size must be that of the attribute's storage (the library's rule).
template <class T>
inline cublasStatus_t set_field(const char* api, const char* attr, const char* ctype, T& field, const void* buf,
                                size_t n) {
  if (!buf) return fail(api, CUBLAS_STATUS_INVALID_VALUE, std::string(attr) + ": buf is NULL");
  if (n != sizeof(T))
    return fail(api, CUBLAS_STATUS_INVALID_VALUE,
                std::string(attr) + " takes " + std::to_string(sizeof(T)) + " bytes (" + ctype + "), sizeInBytes is " +
                    std::to_string(n));
  std::memcpy(&field, buf, sizeof(T));
  return CUBLAS_STATUS_SUCCESS;
}
template <class T>
inline cublasStatus_t get_field(const char* api, const char* attr, const T& field, void* buf, size_t n,
                                size_t* written) {
  if (n == 0) {
    if (!written) return fail(api, CUBLAS_STATUS_INVALID_VALUE, std::string(attr) + ": sizeInBytes is 0 and sizeWritten is NULL");
    *written = sizeof(T);
    return CUBLAS_STATUS_SUCCESS;
  }
  if (!buf) return fail(api, CUBLAS_STATUS_INVALID_VALUE, std::string(attr) + ": buf is NULL");
  if (n != sizeof(T))
    return fail(api, CUBLAS_STATUS_INVALID_VALUE,
                std::string(attr) + " has " + std::to_string(sizeof(T)) + " bytes, sizeInBytes is " + std::to_string(n));
  std::memcpy(buf, &field, sizeof(T));
  if (written) *written = sizeof(T);
  return CUBLAS_STATUS_SUCCESS;
}

// Calls f(name, ctype, field&) for a matmul descriptor attribute; false if the attribute is unknown.
template <class F>
inline bool visit_desc(Desc& d, int attr, F&& f) {
#define GPT2GEN_LT_A(name, ctype, field) case name: f(#name, #ctype, d.field); return true;
  switch (attr) {
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, int32_t, compute)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_SCALE_TYPE, int32_t, scale)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_POINTER_MODE, int32_t, pointer_mode)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_TRANSA, int32_t, transa)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_TRANSB, int32_t, transb)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_TRANSC, int32_t, transc)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_FILL_MODE, int32_t, fill)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_EPILOGUE, uint32_t, epilogue)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_BIAS_POINTER, void*, bias)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, int64_t, bias_batch_stride)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, void*, aux)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, int64_t, aux_ld)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, int64_t, aux_batch_stride)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE, int64_t, alpha_vec_batch_stride)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, int32_t, sm_count)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, void*, a_scale)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, void*, b_scale)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_C_SCALE_POINTER, void*, c_scale)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_D_SCALE_POINTER, void*, d_scale)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, void*, amax_d)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, int32_t, aux_type)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER, void*, aux_scale)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER, void*, aux_amax)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_FAST_ACCUM, int8_t, fast_accum)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, int32_t, bias_type)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, int32_t, scale_mode[0])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_B_SCALE_MODE, int32_t, scale_mode[1])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_C_SCALE_MODE, int32_t, scale_mode[2])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_D_SCALE_MODE, int32_t, scale_mode[3])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE, int32_t, scale_mode[4])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER, void*, d_out_scale)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE, int32_t, scale_mode[5])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR, void*, emulation)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_ALPHA_BATCH_STRIDE, int64_t, alpha_batch_stride)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_BETA_BATCH_STRIDE, int64_t, beta_batch_stride)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_DESC_BATCH_INVARIANCE_FLAGS, int32_t, batch_invariance)
  }
  return false;
}
template <class F>
inline bool visit_layout(Layout& d, int attr, F&& f) {
  switch (attr) {
    GPT2GEN_LT_A(CUBLASLT_MATRIX_LAYOUT_TYPE, uint32_t, type)
    GPT2GEN_LT_A(CUBLASLT_MATRIX_LAYOUT_ORDER, int32_t, order)
    GPT2GEN_LT_A(CUBLASLT_MATRIX_LAYOUT_ROWS, uint64_t, rows)
    GPT2GEN_LT_A(CUBLASLT_MATRIX_LAYOUT_COLS, uint64_t, cols)
    GPT2GEN_LT_A(CUBLASLT_MATRIX_LAYOUT_LD, int64_t, ld)
    GPT2GEN_LT_A(CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, int32_t, batch)
    GPT2GEN_LT_A(CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, int64_t, stride)
    GPT2GEN_LT_A(CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET, int64_t, plane_offset)
    GPT2GEN_LT_A(CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, uint32_t, batch_mode)
  }
  return false;
}
template <class F>
inline bool visit_pref(Pref& d, int attr, F&& f) {
  switch (attr) {
    GPT2GEN_LT_A(CUBLASLT_MATMUL_PREF_SEARCH_MODE, uint32_t, search_mode)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t, max_workspace)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, uint32_t, reduction_mask)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, uint32_t, align[0])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, uint32_t, align[1])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, uint32_t, align[2])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, uint32_t, align[3])
    GPT2GEN_LT_A(CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT, float, max_waves)
    GPT2GEN_LT_A(CUBLASLT_MATMUL_PREF_IMPL_MASK, uint64_t, impl_mask)
  }
  return false;
#undef GPT2GEN_LT_A
}

inline void init_layout(Layout* l, cudaDataType type, uint64_t rows, uint64_t cols, int64_t ld, bool heap) {
  std::memset(l, 0, sizeof(cublasLtMatrixLayoutOpaque_t));
  l->magic = kLayoutMagic;
  l->type = (uint32_t)type;
  l->order = CUBLASLT_ORDER_COL;
  l->rows = rows;
  l->cols = cols;
  l->ld = ld;
  l->batch = 1;
  l->batch_mode = CUBLASLT_BATCH_MODE_STRIDED;
  l->heap = heap;
}
inline void init_desc(Desc* d, cublasComputeType_t compute, cudaDataType_t scale, bool heap) {
  std::memset(d, 0, sizeof(cublasLtMatmulDescOpaque_t));
  d->magic = kDescMagic;
  d->compute = compute;
  d->scale = scale;
  d->pointer_mode = CUBLASLT_POINTER_MODE_HOST;
  d->transa = d->transb = d->transc = CUBLAS_OP_N;
  d->fill = CUBLAS_FILL_MODE_FULL;
  d->epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  d->aux_type = kTypeUnset;
  d->bias_type = kTypeUnset;
  d->batch_invariance = 0x8000;  // CUBLASLT_BATCH_INVARIANCE_UNSET
  d->heap = heap;
}
inline void init_pref(Pref* p, bool heap) {
  std::memset(p, 0, sizeof(cublasLtMatmulPreferenceOpaque_t));
  p->magic = kPrefMagic;
  p->search_mode = CUBLASLT_SEARCH_BEST_FIT;
  p->max_workspace = 0;
  p->reduction_mask = CUBLASLT_REDUCTION_SCHEME_MASK;
  for (auto& a : p->align) a = 256;
  p->impl_mask = ~0ull;
  p->heap = heap;
}

// ---------------------------------------------------------------- the problem and its checks
enum : uint32_t { EP_BIAS_IN = 1, EP_AUX_OUT = 2, EP_AUX_IN = 4, EP_GELU = 8, EP_DGELU = 16, EP_RELU = 32,
                  EP_BGRAD_D = 64, EP_BGRAD_A = 128, EP_BGRAD_B = 256 };

inline bool epilogue_flags(uint32_t e, uint32_t& f) {
  switch (e) {
    case CUBLASLT_EPILOGUE_DEFAULT: f = 0; return true;
    case CUBLASLT_EPILOGUE_RELU: f = EP_RELU; return true;
    case CUBLASLT_EPILOGUE_BIAS: f = EP_BIAS_IN; return true;
    case CUBLASLT_EPILOGUE_RELU_BIAS: f = EP_BIAS_IN | EP_RELU; return true;
    case CUBLASLT_EPILOGUE_GELU: f = EP_GELU; return true;
    case CUBLASLT_EPILOGUE_GELU_AUX: f = EP_GELU | EP_AUX_OUT; return true;
    case CUBLASLT_EPILOGUE_GELU_BIAS: f = EP_GELU | EP_BIAS_IN; return true;
    case CUBLASLT_EPILOGUE_GELU_AUX_BIAS: f = EP_GELU | EP_AUX_OUT | EP_BIAS_IN; return true;
    case CUBLASLT_EPILOGUE_DGELU: f = EP_DGELU | EP_AUX_IN; return true;
    case CUBLASLT_EPILOGUE_DGELU_BGRAD: f = EP_DGELU | EP_AUX_IN | EP_BGRAD_D; return true;
    case CUBLASLT_EPILOGUE_BGRADA: f = EP_BGRAD_A; return true;
    case CUBLASLT_EPILOGUE_BGRADB: f = EP_BGRAD_B; return true;
  }
  return false;
}

struct Problem {
  const Layout *A, *B, *C, *D;
  bool ta, tb;
  int64_t m, n, k;
  int32_t batch;
  uint32_t ab_type, d_type, bias_type, aux_type;
  uint32_t ep;           // EP_* flags
  int64_t bias_len;      // 0: no bias vector
};

inline std::string shape(const Layout* l) {
  return std::to_string(l->rows) + "x" + std::to_string(l->cols) + " (ld " + std::to_string(l->ld) + ")";
}

// The checks that need no pointers (shared by cublasLtMatmulAlgoGetHeuristic and cublasLtMatmul).
inline cublasStatus_t validate(const char* api, const Desc* d, cublasLtMatrixLayout_t Ad, cublasLtMatrixLayout_t Bd,
                               cublasLtMatrixLayout_t Cd, cublasLtMatrixLayout_t Dd, Problem& p) {
  const cublasStatus_t INV = CUBLAS_STATUS_INVALID_VALUE, NS = CUBLAS_STATUS_NOT_SUPPORTED;
  if (!d) return fail(api, INV, "computeDesc is NULL");
  if (d->magic != kDescMagic) return fail(api, INV, "computeDesc was not made by cublasLtMatmulDescCreate/Init (or was destroyed)");
  const char* names[4] = {"Adesc", "Bdesc", "Cdesc", "Ddesc"};
  cublasLtMatrixLayout_t ls[4] = {Ad, Bd, Cd ? Cd : Dd, Dd};
  for (int i = 0; i < 4; ++i) {
    if (!ls[i]) return fail(api, INV, std::string(names[i]) + " is NULL");
    if (L(ls[i])->magic != kLayoutMagic)
      return fail(api, INV, std::string(names[i]) + " was not made by cublasLtMatrixLayoutCreate/Init (or was destroyed)");
  }
  p.A = L(ls[0]); p.B = L(ls[1]); p.C = L(ls[2]); p.D = L(ls[3]);
  const Layout* all[4] = {p.A, p.B, p.C, p.D};
  const char* mat[4] = {"A", "B", "C", "D"};

  // the operation
  switch (d->compute) {
    case CUBLAS_COMPUTE_32F: case CUBLAS_COMPUTE_32F_PEDANTIC: case CUBLAS_COMPUTE_32F_FAST_TF32:
    case CUBLAS_COMPUTE_32F_FAST_16F: case CUBLAS_COMPUTE_32F_FAST_16BF: break;
    default:
      return fail(api, NS, "compute type " + std::to_string(d->compute) +
                               " is not emulated (CUBLAS_COMPUTE_32F and its _PEDANTIC/_FAST_* variants are)");
  }
  if (d->scale != CUDA_R_32F)
    return fail(api, NS, "scale type " + type_name(d->scale) + " is not emulated (CUDA_R_32F with a 32F compute type)");
  if (d->pointer_mode != CUBLASLT_POINTER_MODE_HOST && d->pointer_mode != CUBLASLT_POINTER_MODE_DEVICE)
    return fail(api, NS, "pointer mode " + std::to_string(d->pointer_mode) +
                             " is not emulated (CUBLASLT_POINTER_MODE_HOST and _DEVICE are)");
  for (int t : {d->transa, d->transb})
    if (t != CUBLAS_OP_N && t != CUBLAS_OP_T && t != CUBLAS_OP_C)
      return fail(api, INV, "CUBLASLT_MATMUL_DESC_TRANSA/B is " + std::to_string(t) + ", not a cublasOperation_t");
  if (d->transc != CUBLAS_OP_N) return fail(api, NS, "CUBLASLT_MATMUL_DESC_TRANSC must be CUBLAS_OP_N");
  if (d->fill != CUBLAS_FILL_MODE_FULL) return fail(api, NS, "CUBLASLT_MATMUL_DESC_FILL_MODE must be CUBLAS_FILL_MODE_FULL");
  if (d->a_scale || d->b_scale || d->c_scale || d->d_scale || d->amax_d || d->aux_scale || d->aux_amax || d->d_out_scale)
    return fail(api, INV, "scale / amax pointers are only for fp8 matmuls, not for these data types");
  for (int i = 0; i < 6; ++i)
    if (d->scale_mode[i] != 0) return fail(api, NS, "matrix scaling modes are not emulated");
  if (d->emulation) return fail(api, NS, "CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR is not emulated");

  // the layouts
  for (int i = 0; i < 4; ++i) {
    const Layout* l = all[i];
    if (l->order != CUBLASLT_ORDER_COL)
      return fail(api, NS, std::string(mat[i]) + ": only CUBLASLT_ORDER_COL is emulated (the layout's order is " +
                               std::to_string(l->order) + ")");
    if (l->batch_mode != CUBLASLT_BATCH_MODE_STRIDED)
      return fail(api, NS, std::string(mat[i]) + ": only CUBLASLT_BATCH_MODE_STRIDED is emulated");
    if (l->plane_offset != 0) return fail(api, NS, std::string(mat[i]) + ": planar complex layouts are not emulated");
    if (l->rows > 0x7fffffffull || l->cols > 0x7fffffffull)
      return fail(api, NS, std::string(mat[i]) + ": more than 2^31-1 rows or columns");
    if (l->batch < 1) return fail(api, INV, std::string(mat[i]) + ": CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT < 1");
    if (l->stride < 0) return fail(api, INV, std::string(mat[i]) + ": negative CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET");
  }

  // the types: A and B of one type, C and D of one type (fp32 or A's type)
  p.ab_type = p.A->type;
  p.d_type = p.D->type;
  for (int i = 0; i < 4; ++i)
    if (!emulated_type(all[i]->type))
      return fail(api, NS, std::string(mat[i]) + " is " + type_name(all[i]->type) +
                               ": only CUDA_R_32F, CUDA_R_16F and CUDA_R_16BF matrices are emulated");
  if (p.B->type != p.ab_type)
    return fail(api, NS, "A is " + type_name(p.ab_type) + " but B is " + type_name(p.B->type) + " (they must match)");
  if (p.C->type != p.d_type)
    return fail(api, NS, "C is " + type_name(p.C->type) + " but D is " + type_name(p.d_type) + " (they must match)");
  if (p.d_type != CUDA_R_32F && p.d_type != p.ab_type)
    return fail(api, NS, "A/B of " + type_name(p.ab_type) + " with C/D of " + type_name(p.d_type) +
                             " is not a supported combination (C/D must be CUDA_R_32F or A's type)");
  if ((d->compute == CUBLAS_COMPUTE_32F_FAST_TF32 || d->compute == CUBLAS_COMPUTE_32F_FAST_16F ||
       d->compute == CUBLAS_COMPUTE_32F_FAST_16BF) && (p.ab_type != CUDA_R_32F || p.d_type != CUDA_R_32F))
    return fail(api, NS, "the CUBLAS_COMPUTE_32F_FAST_* compute types need CUDA_R_32F matrices");

  // the shapes: op(A) m x k, op(B) k x n, C and D m x n
  p.ta = d->transa != CUBLAS_OP_N;
  p.tb = d->transb != CUBLAS_OP_N;
  p.m = (int64_t)p.D->rows;
  p.n = (int64_t)p.D->cols;
  int64_t am = p.ta ? p.A->cols : p.A->rows, ak = p.ta ? p.A->rows : p.A->cols;
  int64_t bk = p.tb ? p.B->cols : p.B->rows, bn = p.tb ? p.B->rows : p.B->cols;
  p.k = ak;
  std::string dims = "op(A) is " + std::to_string(am) + "x" + std::to_string(ak) + ", op(B) " + std::to_string(bk) + "x" +
                     std::to_string(bn) + ", D " + std::to_string(p.m) + "x" + std::to_string(p.n);
  if (am != p.m || bn != p.n || bk != ak)
    return fail(api, INV, "inconsistent shapes: " + dims + " (op(A) must be m x k, op(B) k x n, D m x n)");
  if ((int64_t)p.C->rows != p.m || (int64_t)p.C->cols != p.n)
    return fail(api, INV, "C is " + std::to_string(p.C->rows) + "x" + std::to_string(p.C->cols) + " but D is " +
                              std::to_string(p.m) + "x" + std::to_string(p.n));
  for (int i = 0; i < 4; ++i) {
    const Layout* l = all[i];
    bool c_out_of_place = i == 2 && p.C != p.D;   // an out-of-place C may have ld 0 (broadcast)
    if (l->ld < 0 || (l->ld < (int64_t)l->rows && !(c_out_of_place && l->ld == 0)) || (l->ld == 0 && l->rows > 0 && !c_out_of_place))
      return fail(api, INV, std::string(mat[i]) + " is " + shape(l) + ": the leading dimension must be >= the rows");
  }
  p.batch = p.D->batch;
  for (int i = 0; i < 3; ++i)
    if (all[i]->batch != p.batch)
      return fail(api, INV, std::string(mat[i]) + " has CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT " + std::to_string(all[i]->batch) +
                                " but D has " + std::to_string(p.batch));

  // the epilogue
  if (!epilogue_flags(d->epilogue, p.ep)) {
    if (d->epilogue == CUBLASLT_EPILOGUE_RELU_AUX || d->epilogue == CUBLASLT_EPILOGUE_RELU_AUX_BIAS ||
        d->epilogue == CUBLASLT_EPILOGUE_DRELU || d->epilogue == CUBLASLT_EPILOGUE_DRELU_BGRAD)
      return fail(api, NS, std::string(epilogue_name(d->epilogue)) + " (ReLU bit-mask) is not emulated");
    return fail(api, NS, "epilogue " + std::to_string(d->epilogue) + " is not a cublasLtEpilogue_t the emulator knows");
  }
  if (p.ep && p.batch > 1)
    return fail(api, NS, std::string(epilogue_name(d->epilogue)) + " with a batch count of " + std::to_string(p.batch) +
                             ": the emulator supports epilogues only for unbatched matmuls");
  p.bias_len = 0;
  p.bias_type = d->bias_type == kTypeUnset ? p.d_type : (uint32_t)d->bias_type;
  if (p.ep & (EP_BIAS_IN | EP_BGRAD_D | EP_BGRAD_A | EP_BGRAD_B)) {
    p.bias_len = (p.ep & EP_BGRAD_B) ? p.n : p.m;
    if (p.bias_type != p.d_type && p.bias_type != CUDA_R_32F)
      return fail(api, NS, "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE " + type_name(p.bias_type) + " with D of " +
                               type_name(p.d_type) + " (the bias must be D's type or CUDA_R_32F)");
  }
  p.aux_type = d->aux_type == kTypeUnset ? p.d_type : (uint32_t)d->aux_type;
  if (p.ep & (EP_AUX_IN | EP_AUX_OUT)) {
    if (p.aux_type != p.d_type && p.aux_type != CUDA_R_32F)
      return fail(api, NS, "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE " + type_name(p.aux_type) + " with D of " +
                               type_name(p.d_type) + " (the aux matrix must be D's type or CUDA_R_32F)");
    if (d->aux_ld < p.m || d->aux_ld % 8 != 0)
      return fail(api, INV, std::string(epilogue_name(d->epilogue)) + ": CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD is " +
                                std::to_string(d->aux_ld) + "; it must be divisible by 8 and >= the rows of D (" +
                                std::to_string(p.m) + ")");
  }
  return CUBLAS_STATUS_SUCCESS;
}

inline uint64_t workspace_for(const Problem& p, uint64_t max_ws) {
  // A split-K kernel would keep one fp32 partial tile set per output: ask for it when the preference allows.
  uint64_t need = (uint64_t)p.m * (uint64_t)p.n * 4ull;
  return need <= max_ws ? need : 0;
}

// ---------------------------------------------------------------- memory
inline bool accessible(const void* p, size_t n) {  // device memory or pinned host memory (both are device-visible)
  if (n == 0) return true;
  if (is_device_range(p, n)) return true;
  RtState& r = RT();
  std::lock_guard<std::mutex> lk(r.mu);
  uintptr_t a = (uintptr_t)p;
  auto it = r.host.upper_bound(a);
  if (it == r.host.begin()) return false;
  --it;
  return a >= it->first && a + n <= it->first + it->second;
}
inline size_t extent_bytes(const Layout* l, uint32_t type) {
  if (l->rows == 0 || l->cols == 0) return 0;
  uint64_t elems = (uint64_t)(l->batch - 1) * (uint64_t)l->stride + (l->cols - 1) * (uint64_t)l->ld + l->rows;
  return (size_t)(elems * type_size(type));
}

inline float load(const void* p, size_t i, uint32_t t) {
  switch (t) {
    case CUDA_R_32F: return static_cast<const float*>(p)[i];
    case CUDA_R_16F: return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void store(void* p, size_t i, uint32_t t, float v) {
  switch (t) {
    case CUDA_R_32F: static_cast<float*>(p)[i] = v; break;
    case CUDA_R_16F: static_cast<uint16_t*>(p)[i] = f2h((double)v); break;
    default: static_cast<uint16_t*>(p)[i] = f2bf((double)v); break;
  }
}

// GELU, tanh approximation (as cuBLASLt's epilogues), and its derivative.
constexpr float kGeluS = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluC = 0.044715f;
inline float gelu(float x) { return 0.5f * x * (1.0f + std::tanh(kGeluS * (x + kGeluC * x * x * x))); }
inline float dgelu(float x) {
  float t = std::tanh(kGeluS * (x + kGeluC * x * x * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kGeluS * (1.0f + 3.0f * kGeluC * x * x);
}

template <class F>
inline bool parallel_for(size_t ntasks, unsigned nthreads, F&& f) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  auto work = [&] {
    for (;;) {
      size_t t = next.fetch_add(1);
      if (t >= ntasks || failed.load(std::memory_order_relaxed)) return;
      try { f(t); } catch (...) { failed = true; }
    }
  };
  if (nthreads > ntasks) nthreads = (unsigned)ntasks;
  std::vector<std::thread> th;
  try {
    for (unsigned i = 1; i < nthreads; ++i) th.emplace_back(work);
  } catch (...) {}  // fewer threads
  work();
  for (auto& x : th) x.join();
  return !failed;
}

// acc[c*m + i] = sum_p Af[p*m + i] * Bf[c*k + p] for the ncols (<= 16) columns of one task, four columns at a
// time (each element of op(A) loaded gives four products; the four accumulator columns stay in L1). The sum
// runs over p in order for every element. (Blocking over rows and k was measured: no faster on CPUs with
// 512 KB+ of L2 per core.)
__attribute__((optimize("O3"))) inline void gemm_cols(const float* __restrict__ Af, const float* __restrict__ Bf,
                                                      float* __restrict__ acc, int64_t m, int64_t k, int ncols) {
  std::memset(acc, 0, sizeof(float) * (size_t)(m * ((ncols + 3) / 4 * 4)));
  for (int c = 0; c < ncols; c += 4) {
    float* __restrict__ c0 = acc + (c + 0) * m;
    float* __restrict__ c1 = acc + (c + 1) * m;
    float* __restrict__ c2 = acc + (c + 2) * m;
    float* __restrict__ c3 = acc + (c + 3) * m;
    const float* b = Bf + c * k;
    const int nc = std::min(4, ncols - c);
    for (int64_t p = 0; p < k; ++p) {
      const float* __restrict__ a = Af + p * m;
      const float b0 = b[p], b1 = nc > 1 ? b[k + p] : 0.f, b2 = nc > 2 ? b[2 * k + p] : 0.f,
                  b3 = nc > 3 ? b[3 * k + p] : 0.f;
      for (int64_t i = 0; i < m; ++i) {
        const float av = a[i];
        c0[i] += av * b0;
        c1[i] += av * b1;
        c2[i] += av * b2;
        c3[i] += av * b3;
      }
    }
  }
}

// Element access with the type known at compile time (the hot loops); load()/store() above decide at run time.
template <uint32_t T> struct Elem;
template <> struct Elem<CUDA_R_32F> {
  using S = float;
  static float get(const S* p, size_t i) { return p[i]; }
  static void put(S* p, size_t i, float v) { p[i] = v; }
};
template <> struct Elem<CUDA_R_16F> {
  using S = uint16_t;
  static float get(const S* p, size_t i) { return half_bits_to_float(p[i]); }
  static void put(S* p, size_t i, float v) { p[i] = f2h((double)v); }
};
template <> struct Elem<CUDA_R_16BF> {
  using S = uint16_t;
  static float get(const S* p, size_t i) { return bf16_bits_to_float(p[i]); }
  static void put(S* p, size_t i, float v) { p[i] = f2bf((double)v); }
};

struct Run {
  const Problem* p;
  float alpha, beta;
  const void *A, *B, *C;
  void* Dp;
  void* bias;
  void* aux;
  int64_t aux_ld;
};

template <uint32_t TAB, uint32_t TD>
inline cublasStatus_t execute_typed(const char* api, const Run& r) {
  using EA = Elem<TAB>;
  using ED = Elem<TD>;
  using SA = typename EA::S;
  using SD = typename ED::S;
  const Problem& p = *r.p;
  const int64_t m = p.m, n = p.n, k = p.k;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  constexpr int64_t kChunk = 16;  // columns of D per task
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const size_t ntasks = (size_t)p.batch * (size_t)chunks;
  const double flops = 2.0 * (double)m * (double)n * (double)k * p.batch;
  const unsigned nthreads = flops < 4e6 ? 1u : pool_size();
  std::vector<float> Af, Bf;
  std::vector<double> partial;  // DGELU_BGRAD: one bias-gradient vector per task (summed in task order)
  try {
    Af.resize((size_t)p.batch * (size_t)(m * k));
    Bf.resize((size_t)p.batch * (size_t)(k * n));
    if (p.ep & EP_BGRAD_D) partial.assign(ntasks * (size_t)m, 0.0);
  } catch (const std::bad_alloc&) {
    return fail(api, CUBLAS_STATUS_ALLOC_FAILED, "out of host memory for the emulated matmul");
  }
  // op(A) as an m x k and op(B) as a k x n column-major fp32 matrix, per batch (conversions are exact)
  bool ok = parallel_for((size_t)p.batch * 2, nthreads, [&](size_t t) {
    const int64_t b = (int64_t)(t / 2);
    if (t % 2 == 0) {
      const SA* A = static_cast<const SA*>(r.A) + b * p.A->stride;
      float* dst = Af.data() + (size_t)(b * m * k);
      const int64_t lda = p.A->ld;
      if (p.ta) {
        for (int64_t i = 0; i < m; ++i)
          for (int64_t q = 0; q < k; ++q) dst[q * m + i] = EA::get(A, (size_t)(q + i * lda));
      } else {
        for (int64_t q = 0; q < k; ++q)
          for (int64_t i = 0; i < m; ++i) dst[q * m + i] = EA::get(A, (size_t)(i + q * lda));
      }
    } else {
      const SA* B = static_cast<const SA*>(r.B) + b * p.B->stride;
      float* dst = Bf.data() + (size_t)(b * k * n);
      const int64_t ldb = p.B->ld;
      if (p.tb) {
        for (int64_t q = 0; q < k; ++q)
          for (int64_t j = 0; j < n; ++j) dst[j * k + q] = EA::get(B, (size_t)(j + q * ldb));
      } else {
        for (int64_t j = 0; j < n; ++j)
          for (int64_t q = 0; q < k; ++q) dst[j * k + q] = EA::get(B, (size_t)(q + j * ldb));
      }
    }
  });
  if (!ok) return fail(api, CUBLAS_STATUS_ALLOC_FAILED, "out of host memory for the emulated matmul");

  const bool use_c = r.beta != 0.0f;
  ok = parallel_for(ntasks, nthreads, [&](size_t t) {
    const int64_t b = (int64_t)t / chunks, j0 = ((int64_t)t % chunks) * kChunk, j1 = std::min(n, j0 + kChunk);
    const float* Ab = Af.data() + (size_t)(b * m * k);
    const float* Bb = Bf.data() + (size_t)(b * k * n);
    const SD* C = use_c ? static_cast<const SD*>(r.C) + b * p.C->stride : nullptr;
    SD* Dm = static_cast<SD*>(r.Dp) + b * p.D->stride;
    std::vector<float> acc((size_t)(kChunk * m));
    double* part = (p.ep & EP_BGRAD_D) ? partial.data() + t * (size_t)m : nullptr;
    const int nc = (int)(j1 - j0);
    gemm_cols(Ab, Bb + j0 * k, acc.data(), m, k, nc);
    for (int c = 0; c < nc; ++c) {
      const float* a = acc.data() + c * m;
      const int64_t col = j0 + c;
      SD* dcol = Dm + col * p.D->ld;
      const SD* ccol = use_c ? C + col * p.C->ld : nullptr;
      if (!p.ep) {  // the common case, without the epilogue's branches
        for (int64_t i = 0; i < m; ++i) {
          float x = r.alpha * a[i];
          if (use_c) x += r.beta * ED::get(ccol, (size_t)i);
          ED::put(dcol, (size_t)i, x);
        }
        continue;
      }
      for (int64_t i = 0; i < m; ++i) {
        float x = r.alpha * a[i];
        if (use_c) x += r.beta * ED::get(ccol, (size_t)i);
        if (p.ep & EP_BIAS_IN) x += load(r.bias, (size_t)i, p.bias_type);
        if (p.ep & EP_AUX_OUT) store(r.aux, (size_t)(i + col * r.aux_ld), p.aux_type, x);
        if (p.ep & EP_GELU) x = gelu(x);
        if (p.ep & EP_RELU) x = std::fmax(x, 0.0f);
        if (p.ep & EP_DGELU) x *= dgelu(load(r.aux, (size_t)(i + col * r.aux_ld), p.aux_type));
        if (part) part[i] += (double)x;
        ED::put(dcol, (size_t)i, x);
      }
    }
  });
  if (!ok) return fail(api, CUBLAS_STATUS_ALLOC_FAILED, "out of host memory for the emulated matmul");

  // bias gradients: DGELU_BGRAD sums the columns of the result, BGRADA / BGRADB op(A) / op(B) over k
  if (p.ep & EP_BGRAD_D) {
    for (int64_t i = 0; i < m; ++i) {
      double s = 0.0;
      for (size_t t = 0; t < ntasks; ++t) s += partial[t * (size_t)m + (size_t)i];
      store(r.bias, (size_t)i, p.bias_type, (float)s);
    }
  } else if (p.ep & EP_BGRAD_A) {
    std::vector<double> s((size_t)m, 0.0);
    for (int64_t q = 0; q < k; ++q)
      for (int64_t i = 0; i < m; ++i) s[(size_t)i] += Af[(size_t)(q * m + i)];
    for (int64_t i = 0; i < m; ++i) store(r.bias, (size_t)i, p.bias_type, (float)s[(size_t)i]);
  } else if (p.ep & EP_BGRAD_B) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t q = 0; q < k; ++q) s += Bf[(size_t)(j * k + q)];
      store(r.bias, (size_t)j, p.bias_type, (float)s);
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t execute(const char* api, const Run& r) {
  const uint32_t ab = r.p->ab_type, d = r.p->d_type;
  if (ab == CUDA_R_32F) return execute_typed<CUDA_R_32F, CUDA_R_32F>(api, r);
  if (ab == CUDA_R_16F)
    return d == CUDA_R_32F ? execute_typed<CUDA_R_16F, CUDA_R_32F>(api, r) : execute_typed<CUDA_R_16F, CUDA_R_16F>(api, r);
  return d == CUDA_R_32F ? execute_typed<CUDA_R_16BF, CUDA_R_32F>(api, r) : execute_typed<CUDA_R_16BF, CUDA_R_16BF>(api, r);
}

}  // namespace lt
}  // namespace gpt2gen_emu

// ================================================================ the API (extern "C", as the real header)
extern "C" {

inline cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) {
  if (!h) return gpt2gen_emu::lt::fail("cublasLtCreate", CUBLAS_STATUS_INVALID_VALUE, "lightHandle is NULL");
  auto* c = new (std::nothrow) gpt2gen_emu::lt::Context{gpt2gen_emu::lt::kHandleMagic};
  if (!c) return CUBLAS_STATUS_ALLOC_FAILED;
  *h = reinterpret_cast<cublasLtHandle_t>(c);
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
  auto* c = reinterpret_cast<gpt2gen_emu::lt::Context*>(h);
  if (!c || c->magic != gpt2gen_emu::lt::kHandleMagic)
    return gpt2gen_emu::lt::fail("cublasLtDestroy", CUBLAS_STATUS_NOT_INITIALIZED, "lightHandle is not an initialised handle");
  c->magic = 0;
  delete c;
  return CUBLAS_STATUS_SUCCESS;
}
inline const char* cublasLtGetStatusName(cublasStatus_t s) { return gpt2gen_emu::lt::status_name(s); }
inline const char* cublasLtGetStatusString(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "error detected trying to check the license";
  }
  return "unknown error";
}
inline size_t cublasLtGetVersion(void) { return CUBLAS_VERSION; }
inline size_t cublasLtGetCudartVersion(void) { return CUDART_VERSION; }
inline cublasStatus_t cublasLtGetProperty(libraryPropertyType type, int* value) {
  if (!value) return CUBLAS_STATUS_INVALID_VALUE;
  switch (type) {
    case MAJOR_VERSION: *value = CUBLAS_VER_MAJOR; return CUBLAS_STATUS_SUCCESS;
    case MINOR_VERSION: *value = CUBLAS_VER_MINOR; return CUBLAS_STATUS_SUCCESS;
    case PATCH_LEVEL: *value = CUBLAS_VER_PATCH; return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}
inline cublasStatus_t cublasLtHeuristicsCacheGetCapacity(size_t* capacity) {
  if (!capacity) return CUBLAS_STATUS_INVALID_VALUE;
  *capacity = 8192;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtHeuristicsCacheSetCapacity(size_t) { return CUBLAS_STATUS_SUCCESS; }
inline unsigned cublasLtDisableCpuInstructionsSetMask(unsigned) { return 0; }
inline cublasStatus_t cublasLtLoggerSetCallback(cublasLtLoggerCallback_t) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasLtLoggerSetFile(FILE*) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasLtLoggerOpenFile(const char*) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasLtLoggerSetLevel(int) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasLtLoggerSetMask(int) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasLtLoggerForceDisable() { return CUBLAS_STATUS_SUCCESS; }

// ---------------------------------------------------------------- matrix layouts
inline cublasStatus_t cublasLtMatrixLayoutInit_internal(cublasLtMatrixLayout_t l, size_t size, cudaDataType type,
                                                        uint64_t rows, uint64_t cols, int64_t ld) {
  if (!l) return CUBLAS_STATUS_INVALID_VALUE;
  if (size < sizeof(cublasLtMatrixLayoutOpaque_t)) return CUBLAS_STATUS_ALLOC_FAILED;
  gpt2gen_emu::lt::init_layout(gpt2gen_emu::lt::L(l), type, rows, cols, ld, false);
  return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatrixLayoutInit(cublasLtMatrixLayout_t l, cudaDataType type, uint64_t rows,
                                                      uint64_t cols, int64_t ld) {
  return cublasLtMatrixLayoutInit_internal(l, sizeof(*l), type, rows, cols, ld);
}
inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType type, uint64_t rows,
                                                 uint64_t cols, int64_t ld) {
  if (!l) return gpt2gen_emu::lt::fail("cublasLtMatrixLayoutCreate", CUBLAS_STATUS_INVALID_VALUE, "matLayout is NULL");
  auto* o = new (std::nothrow) cublasLtMatrixLayoutOpaque_t;
  if (!o) return CUBLAS_STATUS_ALLOC_FAILED;
  gpt2gen_emu::lt::init_layout(gpt2gen_emu::lt::L(o), type, rows, cols, ld, true);
  *l = o;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  if (!l) return CUBLAS_STATUS_SUCCESS;
  gpt2gen_emu::lt::Layout* x = gpt2gen_emu::lt::L(l);
  bool heap = x->magic == gpt2gen_emu::lt::kLayoutMagic && x->heap;
  x->magic = 0;
  if (heap) delete l;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t attr,
                                                       const void* buf, size_t n) {
  const char* api = "cublasLtMatrixLayoutSetAttribute";
  if (!l || gpt2gen_emu::lt::L(l)->magic != gpt2gen_emu::lt::kLayoutMagic)
    return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "matLayout is not a created layout");
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  bool known = gpt2gen_emu::lt::visit_layout(*gpt2gen_emu::lt::L(l), (int)attr, [&](const char* name, const char* ct, auto& f) {
    st = gpt2gen_emu::lt::set_field(api, name, ct, f, buf, n);
  });
  if (!known) {
    if ((int)attr >= CUBLASLT_GROUPED_MATRIX_LAYOUT_ROWS_ARRAY && (int)attr <= CUBLASLT_GROUPED_MATRIX_LAYOUT_LD_ARRAY_INTEGER_WIDTH)
      return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_NOT_SUPPORTED, "grouped layouts are not emulated");
    return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "unknown attribute " + std::to_string((int)attr));
  }
  return st;
}
inline cublasStatus_t cublasLtMatrixLayoutGetAttribute(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t attr,
                                                       void* buf, size_t n, size_t* written) {
  const char* api = "cublasLtMatrixLayoutGetAttribute";
  if (!l || gpt2gen_emu::lt::L(l)->magic != gpt2gen_emu::lt::kLayoutMagic)
    return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "matLayout is not a created layout");
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  bool known = gpt2gen_emu::lt::visit_layout(*gpt2gen_emu::lt::L(l), (int)attr, [&](const char* name, const char*, auto& f) {
    st = gpt2gen_emu::lt::get_field(api, name, f, buf, n, written);
  });
  if (!known) return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "unknown attribute " + std::to_string((int)attr));
  return st;
}

// ---------------------------------------------------------------- matmul descriptors
inline cublasStatus_t cublasLtMatmulDescInit_internal(cublasLtMatmulDesc_t d, size_t size, cublasComputeType_t compute,
                                                      cudaDataType_t scale) {
  if (!d) return CUBLAS_STATUS_INVALID_VALUE;
  if (size < sizeof(cublasLtMatmulDescOpaque_t)) return CUBLAS_STATUS_ALLOC_FAILED;
  gpt2gen_emu::lt::init_desc(gpt2gen_emu::lt::D(d), compute, scale, false);
  return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulDescInit(cublasLtMatmulDesc_t d, cublasComputeType_t compute,
                                                    cudaDataType_t scale) {
  return cublasLtMatmulDescInit_internal(d, sizeof(*d), compute, scale);
}
inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute, cudaDataType_t scale) {
  if (!d) return gpt2gen_emu::lt::fail("cublasLtMatmulDescCreate", CUBLAS_STATUS_INVALID_VALUE, "matmulDesc is NULL");
  auto* o = new (std::nothrow) cublasLtMatmulDescOpaque_t;
  if (!o) return CUBLAS_STATUS_ALLOC_FAILED;
  gpt2gen_emu::lt::init_desc(gpt2gen_emu::lt::D(o), compute, scale, true);
  *d = o;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  if (!d) return CUBLAS_STATUS_SUCCESS;
  gpt2gen_emu::lt::Desc* x = gpt2gen_emu::lt::D(d);
  bool heap = x->magic == gpt2gen_emu::lt::kDescMagic && x->heap;
  x->magic = 0;
  if (heap) delete d;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                                     const void* buf, size_t n) {
  const char* api = "cublasLtMatmulDescSetAttribute";
  if (!d || gpt2gen_emu::lt::D(d)->magic != gpt2gen_emu::lt::kDescMagic)
    return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "matmulDesc is not a created descriptor");
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  bool known = gpt2gen_emu::lt::visit_desc(*gpt2gen_emu::lt::D(d), (int)attr, [&](const char* name, const char* ct, auto& f) {
    st = gpt2gen_emu::lt::set_field(api, name, ct, f, buf, n);
  });
  if (!known) return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "unknown attribute " + std::to_string((int)attr));
  return st;
}
inline cublasStatus_t cublasLtMatmulDescGetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, void* buf,
                                                     size_t n, size_t* written) {
  const char* api = "cublasLtMatmulDescGetAttribute";
  if (!d || gpt2gen_emu::lt::D(d)->magic != gpt2gen_emu::lt::kDescMagic)
    return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "matmulDesc is not a created descriptor");
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  bool known = gpt2gen_emu::lt::visit_desc(*gpt2gen_emu::lt::D(d), (int)attr, [&](const char* name, const char*, auto& f) {
    st = gpt2gen_emu::lt::get_field(api, name, f, buf, n, written);
  });
  if (!known) return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "unknown attribute " + std::to_string((int)attr));
  return st;
}

// ---------------------------------------------------------------- preferences
inline cublasStatus_t cublasLtMatmulPreferenceInit_internal(cublasLtMatmulPreference_t p, size_t size) {
  if (!p) return CUBLAS_STATUS_INVALID_VALUE;
  if (size < sizeof(cublasLtMatmulPreferenceOpaque_t)) return CUBLAS_STATUS_ALLOC_FAILED;
  gpt2gen_emu::lt::init_pref(gpt2gen_emu::lt::P(p), false);
  return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulPreferenceInit(cublasLtMatmulPreference_t p) {
  return cublasLtMatmulPreferenceInit_internal(p, sizeof(*p));
}
inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
  if (!p) return gpt2gen_emu::lt::fail("cublasLtMatmulPreferenceCreate", CUBLAS_STATUS_INVALID_VALUE, "pref is NULL");
  auto* o = new (std::nothrow) cublasLtMatmulPreferenceOpaque_t;
  if (!o) return CUBLAS_STATUS_ALLOC_FAILED;
  gpt2gen_emu::lt::init_pref(gpt2gen_emu::lt::P(o), true);
  *p = o;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
  if (!p) return CUBLAS_STATUS_SUCCESS;
  gpt2gen_emu::lt::Pref* x = gpt2gen_emu::lt::P(p);
  bool heap = x->magic == gpt2gen_emu::lt::kPrefMagic && x->heap;
  x->magic = 0;
  if (heap) delete p;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                           cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                           size_t n) {
  const char* api = "cublasLtMatmulPreferenceSetAttribute";
  if (!p || gpt2gen_emu::lt::P(p)->magic != gpt2gen_emu::lt::kPrefMagic)
    return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "pref is not a created preference");
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  bool known = gpt2gen_emu::lt::visit_pref(*gpt2gen_emu::lt::P(p), (int)attr, [&](const char* name, const char* ct, auto& f) {
    st = gpt2gen_emu::lt::set_field(api, name, ct, f, buf, n);
  });
  if (!known) {
    if ((int)attr >= CUBLASLT_MATMUL_PREF_GROUPED_AVERAGE_REDUCTION_DIM && (int)attr <= CUBLASLT_MATMUL_PREF_GROUPED_DESC_D_AVERAGE_COLS)
      return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_NOT_SUPPORTED, "grouped matmuls are not emulated");
    return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "unknown attribute " + std::to_string((int)attr));
  }
  return st;
}
inline cublasStatus_t cublasLtMatmulPreferenceGetAttribute(cublasLtMatmulPreference_t p,
                                                           cublasLtMatmulPreferenceAttributes_t attr, void* buf, size_t n,
                                                           size_t* written) {
  const char* api = "cublasLtMatmulPreferenceGetAttribute";
  if (!p || gpt2gen_emu::lt::P(p)->magic != gpt2gen_emu::lt::kPrefMagic)
    return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "pref is not a created preference");
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  bool known = gpt2gen_emu::lt::visit_pref(*gpt2gen_emu::lt::P(p), (int)attr, [&](const char* name, const char*, auto& f) {
    st = gpt2gen_emu::lt::get_field(api, name, f, buf, n, written);
  });
  if (!known) return gpt2gen_emu::lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "unknown attribute " + std::to_string((int)attr));
  return st;
}

// ---------------------------------------------------------------- heuristic
inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t Ad,
                                                     cublasLtMatrixLayout_t Bd, cublasLtMatrixLayout_t Cd,
                                                     cublasLtMatrixLayout_t Dd, cublasLtMatmulPreference_t pref,
                                                     int requested, cublasLtMatmulHeuristicResult_t results[],
                                                     int* returned) {
  namespace lt = gpt2gen_emu::lt;
  const char* api = "cublasLtMatmulAlgoGetHeuristic";
  auto* c = reinterpret_cast<lt::Context*>(h);
  if (!c || c->magic != lt::kHandleMagic) return lt::fail(api, CUBLAS_STATUS_NOT_INITIALIZED, "lightHandle is not an initialised handle");
  if (!returned) return lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "returnAlgoCount is NULL");
  *returned = 0;
  if (requested <= 0) return lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "requestedAlgoCount <= 0");
  if (!results) return lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "heuristicResultsArray is NULL");
  if (!pref || lt::P(pref)->magic != lt::kPrefMagic)
    return lt::fail(api, CUBLAS_STATUS_INVALID_VALUE, "preference is not a created preference");
  lt::Problem p;
  cublasStatus_t st = lt::validate(api, desc ? lt::D(desc) : nullptr, Ad, Bd, Cd, Dd, p);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  const lt::Pref& pr = *lt::P(pref);
  const lt::Desc& d = *lt::D(desc);
  std::memset(&results[0], 0, sizeof results[0]);
  lt::Algo a{};
  a.magic = lt::kAlgoMagic;
  a.workspace = lt::workspace_for(p, pr.max_workspace);
  for (int i = 0; i < 4; ++i) a.align[i] = std::min<uint32_t>(lt::kKernelAlign, std::max<uint32_t>(pr.align[i], 1));
  // the bias / aux pointers set now tell the heuristic how they are aligned (no preference covers them)
  a.bias_align = d.bias ? std::min(lt::kKernelAlign, lt::alignment_of(d.bias)) : lt::kKernelAlign;
  a.aux_align = d.aux ? std::min(lt::kKernelAlign, lt::alignment_of(d.aux)) : lt::kKernelAlign;
  std::memcpy(&results[0].algo, &a, sizeof a);
  results[0].workspaceSize = (size_t)a.workspace;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  double tiles = (double)((p.m + 127) / 128) * (double)((p.n + 127) / 128) * p.batch;
  results[0].wavesCount = (float)(tiles / 132.0);
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

// ---------------------------------------------------------------- matmul
inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t desc, const void* alpha, const void* A,
                                     cublasLtMatrixLayout_t Ad, const void* B, cublasLtMatrixLayout_t Bd, const void* beta,
                                     const void* C, cublasLtMatrixLayout_t Cd, void* Dptr, cublasLtMatrixLayout_t Dd,
                                     const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspaceSize,
                                     cudaStream_t stream) {
  namespace lt = gpt2gen_emu::lt;
  const char* api = "cublasLtMatmul";
  const cublasStatus_t INV = CUBLAS_STATUS_INVALID_VALUE, NS = CUBLAS_STATUS_NOT_SUPPORTED;
  auto* c = reinterpret_cast<lt::Context*>(h);
  if (!c || c->magic != lt::kHandleMagic) return lt::fail(api, CUBLAS_STATUS_NOT_INITIALIZED, "lightHandle is not an initialised handle");
  if (gpt2gen_emu::in_kernel()) return lt::fail(api, NS, "called from device code");
  lt::Problem p;
  cublasStatus_t st = lt::validate(api, desc ? lt::D(desc) : nullptr, Ad, Bd, Cd, Dd, p);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  const lt::Desc& d = *lt::D(desc);
  if (!alpha || !beta) return lt::fail(api, INV, "alpha or beta is NULL");
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);

  // the algorithm and its workspace
  lt::Algo a{};
  if (algo) {
    std::memcpy(&a, algo, sizeof a);
    if (a.magic != lt::kAlgoMagic)
      return lt::fail(api, INV, "algo is not a result of cublasLtMatmulAlgoGetHeuristic (cublasLtMatmulAlgoInit is not emulated)");
    if (workspaceSize < a.workspace)
      return lt::fail(api, INV, "workspaceSizeInBytes is " + std::to_string(workspaceSize) + " but the algorithm needs " +
                                    std::to_string(a.workspace) + " (heuristicResult.workspaceSize)");
  } else {  // the library picks an algorithm itself, with the default preference (256-byte alignment)
    a.workspace = 0;
    for (auto& x : a.align) x = lt::kKernelAlign;
    a.bias_align = a.aux_align = 1;
  }
  if (a.workspace > 0 && !workspace) return lt::fail(api, INV, "workspace is NULL but the algorithm needs " + std::to_string(a.workspace) + " bytes");

  // pointers
  const bool in_place = C == Dptr;
  if (in_place && Cd && Cd != Dd) {
    const lt::Layout *lc = p.C, *ldl = p.D;
    if (lc->ld != ldl->ld || lc->stride != ldl->stride)
      return lt::fail(api, INV, "C == D (in place) but Cdesc and Ddesc differ (C is " + lt::shape(lc) + ", D " + lt::shape(ldl) + ")");
  }
  const bool zero_size_ab = p.m == 0 || p.n == 0 || p.k == 0;
  if ((!A || !B) && !zero_size_ab) return lt::fail(api, INV, "A or B is NULL");
  if (!Dptr && p.m > 0 && p.n > 0) return lt::fail(api, INV, "D is NULL");
  if (!C && be != 0.0f && p.m > 0 && p.n > 0) return lt::fail(api, INV, "C is NULL but beta != 0");
  const bool use_c = be != 0.0f && p.m > 0 && p.n > 0;
  if ((p.ep & (lt::EP_BIAS_IN | lt::EP_BGRAD_D | lt::EP_BGRAD_A | lt::EP_BGRAD_B)) && !d.bias)
    return lt::fail(api, INV, std::string(lt::epilogue_name(d.epilogue)) + " needs CUBLASLT_MATMUL_DESC_BIAS_POINTER");
  if ((p.ep & (lt::EP_AUX_IN | lt::EP_AUX_OUT)) && !d.aux)
    return lt::fail(api, INV, std::string(lt::epilogue_name(d.epilogue)) + " needs CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER");

  // alignment: what the chosen kernel assumes (the preference's MIN_ALIGNMENT_*_BYTES, at most 16)
  struct Ptr { const char* name; const void* ptr; uint32_t type; uint32_t need; const char* why; };
  std::vector<Ptr> ptrs = {{"A", A, p.ab_type, a.align[0], "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES"},
                           {"B", B, p.ab_type, a.align[1], "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES"},
                           {"D", Dptr, p.d_type, a.align[3], "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES"}};
  if (use_c) ptrs.push_back({"C", C, p.d_type, a.align[2], "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES"});
  if (p.bias_len) ptrs.push_back({"the bias", d.bias, p.bias_type, a.bias_align, "the bias pointer's alignment when the heuristic ran"});
  if (p.ep & (lt::EP_AUX_IN | lt::EP_AUX_OUT))
    ptrs.push_back({"the aux matrix", d.aux, p.aux_type, a.aux_align, "the aux pointer's alignment when the heuristic ran"});
  for (const Ptr& q : ptrs) {
    if (!q.ptr) continue;
    uint32_t need = std::max<uint32_t>(q.need, (uint32_t)lt::type_size(q.type));
    if (lt::alignment_of(q.ptr) < need)
      return lt::fail(api, NS, std::string(q.name) + " (" + lt::hex(q.ptr) + ") is " + std::to_string(lt::alignment_of(q.ptr)) +
                                   "-byte aligned but the algorithm assumes " + std::to_string(need) + " bytes (" + q.why +
                                   (algo ? "" : "; algo is NULL: the default preference, 256") + ")");
  }

  // execution: a bad stream or an earlier fault fails the launch; memory outside device allocations faults
  if (!gpt2gen_emu::valid_stream(stream)) return lt::fail(api, CUBLAS_STATUS_EXECUTION_FAILED, "invalid stream " + lt::hex(stream));
  if (gpt2gen_emu::G().sticky)
    return lt::fail(api, CUBLAS_STATUS_EXECUTION_FAILED, "an earlier device fault is pending (sticky CUDA error)");
  struct Range { const char* name; const void* ptr; size_t bytes; };
  std::vector<Range> ranges = {{"A", A, zero_size_ab ? 0 : lt::extent_bytes(p.A, p.ab_type)},
                               {"B", B, zero_size_ab ? 0 : lt::extent_bytes(p.B, p.ab_type)},
                               {"D", Dptr, lt::extent_bytes(p.D, p.d_type)}};
  if (use_c) ranges.push_back({"C", C, lt::extent_bytes(p.C, p.d_type)});
  if (p.bias_len && p.m > 0 && p.n > 0) ranges.push_back({"the bias vector", d.bias, (size_t)p.bias_len * lt::type_size(p.bias_type)});
  if ((p.ep & (lt::EP_AUX_IN | lt::EP_AUX_OUT)) && p.m > 0 && p.n > 0)
    ranges.push_back({"the aux matrix", d.aux, (size_t)((p.n - 1) * d.aux_ld + p.m) * lt::type_size(p.aux_type)});
  if (a.workspace) ranges.push_back({"the workspace", workspace, (size_t)a.workspace});
  for (const Range& r : ranges)
    if (!lt::accessible(r.ptr, r.bytes)) {
      std::string what = std::string("[cuda_emu] cublasLtMatmul: ") + r.name + " (" + lt::hex(r.ptr) + ", " + std::to_string(r.bytes) +
                         " bytes as its layout describes) is not inside a device allocation: the kernel would fault";
      gpt2gen_emu::record_error(gpt2gen_emu::kErrIllegalAddress, what, true);
      return lt::fail(api, CUBLAS_STATUS_EXECUTION_FAILED, std::string(r.name) + " is not inside a device allocation (illegal address)");
    }

  lt::Run run{&p, al, be, A, B, use_c ? C : nullptr, Dptr, d.bias, d.aux, d.aux_ld};
  return lt::execute(api, run);
}

}  // extern "C"
