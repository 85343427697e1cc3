// cuBLASLt through its real API: one configurable matmul (lt_run) and the descriptor / handle calls
// (lt_api_checks). Valid CUDA for nvcc with the real <cublasLt.h>; under gpt2gen.cuda_emu it runs on the CPU.
#include <cuda_runtime.h>
#include <cublasLt.h>
#include <stdint.h>
#include <string.h>

typedef struct {
  // the problem (column-major, as cuBLASLt counts)
  int32_t ab_type, cd_type, compute, transa, transb, epilogue, bias_type, aux_type;  // bias/aux_type -1: unset
  int64_t m, n, k, lda, ldb, ldc, ldd, aux_ld;
  int32_t batch, in_place;  // in_place: C is D (Cdesc is Ddesc)
  int64_t stride_a, stride_b, stride_c, stride_d;
  float alpha, beta;
  // bytes of the host buffers (copied to device buffers of that size, D / bias / aux copied back)
  int64_t bytes_a, bytes_b, bytes_c, bytes_d, bytes_bias, bytes_aux;
  // knobs for the checks
  int32_t offset_a, offset_d, offset_bias;  // bytes added to the device pointers (misalignment)
  int32_t order_a;                          // CUBLASLT_MATRIX_LAYOUT_ORDER of A
  int32_t use_algo;                         // 1: pass the heuristic's algo, 0: NULL
  int32_t null_handle;                      // 1: cublasLtMatmul gets a NULL handle
  int32_t host_a;                           // 1: A is host memory the device cannot see
  int64_t max_workspace, workspace;         // the preference's maximum; bytes passed to cublasLtMatmul (-1: the heuristic's)
  int32_t set_align;                        // 1: PREF_MIN_ALIGNMENT_* from the pointers' real alignment
  int64_t kb, mc;                           // > 0: B's layout has kb for k, C's has mc rows (mismatches)
  // results
  int32_t heuristic_status, returned;
  int64_t heuristic_workspace;
  int32_t matmul_status;
} LtCase;

static uint32_t alignment(const void* p) {
  uintptr_t a = (uintptr_t)p;
  uint32_t al = 256;
  while (al > 1 && a % al) al /= 2;
  return al;
}

static void* to_device(const void* h, int64_t bytes, int32_t offset) {
  if (!h || bytes <= 0) return NULL;
  char* d = NULL;
  if (cudaMalloc((void**)&d, (size_t)bytes + (size_t)offset) != cudaSuccess) return NULL;
  cudaMemcpy(d + offset, h, (size_t)bytes, cudaMemcpyHostToDevice);
  return d + offset;
}

extern "C" int lt_run(LtCase* c, const void* hA, const void* hB, const void* hC, void* hD, void* hBias, void* hAux) {
  cublasLtHandle_t handle = NULL;
  cublasStatus_t s = cublasLtCreate(&handle);
  if (s != CUBLAS_STATUS_SUCCESS) return (int)s;
  char* dA = c->host_a ? (char*)hA : (char*)to_device(hA, c->bytes_a, c->offset_a);
  void* dB = to_device(hB, c->bytes_b, 0);
  void* dD = to_device(hD, c->bytes_d, c->offset_d);
  void* dC = c->in_place ? dD : to_device(hC, c->bytes_c, 0);
  void* dBias = to_device(hBias, c->bytes_bias, c->offset_bias);
  void* dAux = to_device(hAux, c->bytes_aux, 0);

  cublasLtMatmulDesc_t desc = NULL;
  cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL, ld = NULL;
  cublasLtMatmulPreference_t pref = NULL;
  cublasLtMatmulDescCreate(&desc, (cublasComputeType_t)c->compute, CUDA_R_32F);
  cublasOperation_t opa = (cublasOperation_t)c->transa, opb = (cublasOperation_t)c->transb;
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa);
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb);
  cublasLtEpilogue_t epi = (cublasLtEpilogue_t)c->epilogue;
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi);
  if (dBias) cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &dBias, sizeof dBias);
  if (c->bias_type >= 0) {
    int32_t t = c->bias_type;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &t, sizeof t);
  }
  if (dAux) {
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &dAux, sizeof dAux);
    int64_t ldaux = c->aux_ld;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ldaux, sizeof ldaux);
  }
  if (c->aux_type >= 0) {
    int32_t t = c->aux_type;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &t, sizeof t);
  }
  cudaDataType_t tab = (cudaDataType_t)c->ab_type, tcd = (cudaDataType_t)c->cd_type;
  cublasLtMatrixLayoutCreate(&la, tab, c->transa ? c->k : c->m, c->transa ? c->m : c->k, c->lda);
  int64_t kb = c->kb > 0 ? c->kb : c->k, mc = c->mc > 0 ? c->mc : c->m;
  cublasLtMatrixLayoutCreate(&lb, tab, c->transb ? c->n : kb, c->transb ? kb : c->n, c->ldb);
  cublasLtMatrixLayoutCreate(&ld, tcd, c->m, c->n, c->ldd);
  if (!c->in_place) cublasLtMatrixLayoutCreate(&lc, tcd, mc, c->n, c->ldc);
  if (c->order_a != CUBLASLT_ORDER_COL) {
    int32_t order = c->order_a;
    cublasLtMatrixLayoutSetAttribute(la, CUBLASLT_MATRIX_LAYOUT_ORDER, &order, sizeof order);
  }
  if (c->batch > 1) {
    int32_t b = c->batch;
    int64_t strides[4] = {c->stride_a, c->stride_b, c->stride_c, c->stride_d};
    cublasLtMatrixLayout_t ls[4] = {la, lb, lc, ld};
    for (int i = 0; i < 4; ++i) {
      if (!ls[i]) continue;
      cublasLtMatrixLayoutSetAttribute(ls[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &b, sizeof b);
      cublasLtMatrixLayoutSetAttribute(ls[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i], sizeof strides[i]);
    }
  }
  cublasLtMatmulPreferenceCreate(&pref);
  uint64_t maxws = (uint64_t)c->max_workspace;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &maxws, sizeof maxws);
  if (c->set_align) {
    uint32_t al[4] = {alignment(dA), alignment(dB), alignment(dC), alignment(dD)};
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], sizeof al[0]);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], sizeof al[1]);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], sizeof al[2]);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[3], sizeof al[3]);
  }
  cublasLtMatmulHeuristicResult_t res;
  memset(&res, 0, sizeof res);
  int returned = 0;
  c->heuristic_status = (int32_t)cublasLtMatmulAlgoGetHeuristic(handle, desc, la, lb, lc ? lc : ld, ld, pref, 1, &res, &returned);
  c->returned = returned;
  c->heuristic_workspace = (int64_t)res.workspaceSize;
  c->matmul_status = -1;
  if (c->heuristic_status == CUBLAS_STATUS_SUCCESS && returned == 1 && res.state != CUBLAS_STATUS_SUCCESS)
    c->heuristic_status = (int32_t)res.state;
  if (c->heuristic_status == CUBLAS_STATUS_SUCCESS || !c->use_algo) {
    size_t ws = c->workspace < 0 ? res.workspaceSize : (size_t)c->workspace;
    void* dws = NULL;
    if (ws) cudaMalloc(&dws, ws);
    cudaStream_t stream;
    cudaStreamCreate(&stream);
    c->matmul_status = (int32_t)cublasLtMatmul(c->null_handle ? NULL : handle, desc, &c->alpha, dA, la, dB, lb, &c->beta,
                                               dC, lc ? lc : ld, dD, ld, c->use_algo ? &res.algo : NULL, dws, ws, stream);
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
    if (dws) cudaFree(dws);
  }
  if (hD && dD) cudaMemcpy(hD, dD, (size_t)c->bytes_d, cudaMemcpyDeviceToHost);
  if (hBias && dBias) cudaMemcpy(hBias, dBias, (size_t)c->bytes_bias, cudaMemcpyDeviceToHost);
  if (hAux && dAux) cudaMemcpy(hAux, dAux, (size_t)c->bytes_aux, cudaMemcpyDeviceToHost);

  cublasLtMatmulPreferenceDestroy(pref);
  if (lc) cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(handle);
  if (!c->host_a && dA) cudaFree(dA - c->offset_a);
  if (dB) cudaFree(dB);
  if (dD) cudaFree((char*)dD - c->offset_d);
  if (dC && !c->in_place) cudaFree(dC);
  if (dBias) cudaFree((char*)dBias - c->offset_bias);
  if (dAux) cudaFree(dAux);
  return 0;
}

extern "C" int lt_device_count(void) {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// The handle, descriptor and attribute calls; out[i] receives the i-th status (or value), in this order.
extern "C" int lt_api_checks(int64_t* out) {
  int i = 0;
  cublasLtHandle_t h = NULL;
  out[i++] = cublasLtCreate(&h);                                   // 0: SUCCESS
  out[i++] = cublasLtCreate(NULL);                                 // 1: INVALID_VALUE
  out[i++] = (int64_t)cublasLtGetVersion();                        // 2: a version number > 0
  cublasLtMatmulDesc_t desc = NULL;
  out[i++] = cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);  // 3: SUCCESS
  int32_t ct = 0;
  size_t written = 0;
  out[i++] = cublasLtMatmulDescGetAttribute(desc, CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, &ct, sizeof ct, &written);  // 4
  out[i++] = ct;                                                   // 5: CUBLAS_COMPUTE_32F (68)
  out[i++] = (int64_t)written;                                     // 6: 4
  int64_t wrong_size = 3;
  out[i++] = cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &wrong_size, sizeof wrong_size);  // 7: INVALID
  int32_t small_ld = 8;
  out[i++] = cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &small_ld, sizeof small_ld);  // 8: INVALID
  out[i++] = cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, NULL, 4);  // 9: INVALID
  written = 0;
  out[i++] = cublasLtMatmulDescGetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, NULL, 0, &written);  // 10: SUCCESS
  out[i++] = (int64_t)written;                                     // 11: sizeof(void*)
  out[i++] = cublasLtMatmulDescGetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, NULL, 0, NULL);  // 12: INVALID
  uint32_t epi = 0;
  cublasLtMatmulDescGetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi, NULL);
  out[i++] = epi;                                                  // 13: CUBLASLT_EPILOGUE_DEFAULT (1)
  cublasLtMatrixLayout_t lay = NULL;
  out[i++] = cublasLtMatrixLayoutCreate(&lay, CUDA_R_16BF, 7, 5, 9);  // 14: SUCCESS
  int32_t rows32 = 7;
  out[i++] = cublasLtMatrixLayoutSetAttribute(lay, CUBLASLT_MATRIX_LAYOUT_ROWS, &rows32, sizeof rows32);  // 15: INVALID (uint64_t)
  uint64_t rows = 0;
  out[i++] = cublasLtMatrixLayoutGetAttribute(lay, CUBLASLT_MATRIX_LAYOUT_ROWS, &rows, sizeof rows, NULL);  // 16: SUCCESS
  out[i++] = (int64_t)rows;                                        // 17: 7
  int32_t batch = 0;
  cublasLtMatrixLayoutGetAttribute(lay, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch, NULL);
  out[i++] = batch;                                                // 18: 1
  cublasLtMatmulPreference_t pref = NULL;
  out[i++] = cublasLtMatmulPreferenceCreate(&pref);                // 19: SUCCESS
  uint32_t ws32 = 1024;
  out[i++] = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws32, sizeof ws32);  // 20: INVALID
  uint64_t ws = 1 << 20;
  out[i++] = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);  // 21: SUCCESS
  // a heuristic with no handle, with a zero request count
  cublasLtMatmulHeuristicResult_t res;
  int n = -1;
  out[i++] = cublasLtMatmulAlgoGetHeuristic(NULL, desc, lay, lay, lay, lay, pref, 1, &res, &n);  // 22: NOT_INITIALIZED
  cublasLtMatrixLayout_t sq = NULL;
  cublasLtMatrixLayoutCreate(&sq, CUDA_R_32F, 8, 8, 8);
  out[i++] = cublasLtMatmulAlgoGetHeuristic(h, desc, sq, sq, sq, sq, pref, 0, &res, &n);  // 23: INVALID (count 0)
  out[i++] = cublasLtMatmulAlgoGetHeuristic(h, desc, sq, sq, sq, sq, pref, 4, &res, &n);  // 24: SUCCESS
  out[i++] = n;                                                    // 25: 1
  out[i++] = res.state;                                            // 26: SUCCESS
  out[i++] = (int64_t)res.workspaceSize;                           // 27: <= 1 MiB
  // descriptors that live on the stack (the Init variants)
  cublasLtMatrixLayoutOpaque_t stack_layout;
  out[i++] = cublasLtMatrixLayoutInit(&stack_layout, CUDA_R_32F, 8, 8, 8);  // 28: SUCCESS
  cublasLtMatmulDescOpaque_t stack_desc;
  out[i++] = cublasLtMatmulDescInit(&stack_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);  // 29: SUCCESS
  cublasLtMatmulPreferenceOpaque_t stack_pref;
  out[i++] = cublasLtMatmulPreferenceInit(&stack_pref);            // 30: SUCCESS
  out[i++] = cublasLtMatmulAlgoGetHeuristic(h, &stack_desc, &stack_layout, &stack_layout, &stack_layout,
                                            &stack_layout, &stack_pref, 1, &res, &n);  // 31: SUCCESS
  out[i++] = (int64_t)res.workspaceSize;                           // 32: 0 (the default preference allows none)
  cublasLtMatmulDescDestroy(desc);
  desc = NULL;
  out[i++] = cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulDescDestroy(desc) == CUBLAS_STATUS_SUCCESS;  // 33: 1
  cublasLtMatrixLayoutDestroy(sq);
  cublasLtMatrixLayoutDestroy(lay);
  cublasLtMatmulPreferenceDestroy(pref);
  out[i++] = cublasLtDestroy(h);                                   // 34: SUCCESS
  out[i++] = cublasLtDestroy(NULL);                                // 35: NOT_INITIALIZED
  return i;
}
