// gpt2gen cuda_emu: the CUDA runtime API subset (memory, streams, events, errors, device
// properties, function attributes) and the kernel launch that <<<...>>> is rewritten into.
#pragma once
#include <map>
#include <set>
#include "device.hpp"

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
  cudaErrorIllegalInstruction = 715,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

struct CUstream_st { unsigned flags; int priority; };
struct CUevent_st { double ms; bool recorded; unsigned flags; };
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02
#define cudaEventInterprocess 0x04
#define cudaHostAllocDefault 0x00
#define cudaHostAllocPortable 0x01
#define cudaHostAllocMapped 0x02
#define cudaHostAllocWriteCombined 0x04
#define cudaMemAttachGlobal 0x01
#define CUDART_VERSION 13000

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaFuncCache { cudaFuncCachePreferNone = 0, cudaFuncCachePreferShared = 1, cudaFuncCachePreferL1 = 2,
                     cudaFuncCachePreferEqual = 3 };
enum cudaSharedMemConfig { cudaSharedMemBankSizeDefault = 0, cudaSharedMemBankSizeFourByte = 1,
                           cudaSharedMemBankSizeEightByte = 2 };
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMaxBlockDimX = 2, cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4, cudaDevAttrMaxGridDimX = 5, cudaDevAttrMaxGridDimY = 6, cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8, cudaDevAttrTotalConstantMemory = 9, cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12, cudaDevAttrClockRate = 13, cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38, cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81, cudaDevAttrMaxRegistersPerMultiprocessor = 82,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMaxBlocksPerMultiprocessor = 106,
};

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  int regsPerBlock;
  int warpSize;
  size_t memPitch;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int clockRate;
  size_t totalConstMem;
  int major;
  int minor;
  size_t textureAlignment;
  int multiProcessorCount;
  int integrated;
  int canMapHostMemory;
  int concurrentKernels;
  int ECCEnabled;
  int pciBusID;
  int pciDeviceID;
  int asyncEngineCount;
  int unifiedAddressing;
  int memoryClockRate;
  int memoryBusWidth;
  int l2CacheSize;
  int persistingL2CacheMaxSize;
  int maxThreadsPerMultiProcessor;
  int streamPrioritiesSupported;
  int globalL1CacheSupported;
  int localL1CacheSupported;
  size_t sharedMemPerMultiprocessor;
  int regsPerMultiprocessor;
  int managedMemory;
  int isMultiGpuBoard;
  int cooperativeLaunch;
  size_t sharedMemPerBlockOptin;
  int maxBlocksPerMultiProcessor;
  size_t reservedSharedMemPerBlock;
};

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
  int cacheModeCA;
  int maxDynamicSharedSizeBytes;
  int preferredShmemCarveout;
};

namespace gpt2gen_emu {

struct RtState {
  std::mutex mu;
  std::map<uintptr_t, size_t> device;   // cudaMalloc / cudaMallocManaged / symbol ranges
  std::map<uintptr_t, size_t> host;     // cudaMallocHost
  std::set<const void*> streams, events;
  std::map<const void*, size_t> max_dyn_smem;
};
inline RtState& RT() { static RtState* s = new RtState(); return *s; }

inline std::string hexptr(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

inline cudaError_t host_error(cudaError_t code, const std::string& what) {
  record_error(code, "[cuda_emu] host: " + what, false);
  return code;
}
inline cudaError_t sticky() { return (cudaError_t)G().sticky; }

// Is [p, p+n) inside one device allocation?
inline bool is_device_range(const void* p, size_t n) {
  RtState& r = RT();
  std::lock_guard<std::mutex> lk(r.mu);
  uintptr_t a = (uintptr_t)p;
  auto it = r.device.upper_bound(a);
  if (it == r.device.begin()) return false;
  --it;
  return a >= it->first && a + n <= it->first + it->second && (n > 0 || a < it->first + it->second || it->second == 0);
}

inline bool valid_stream(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return true;
  RtState& r = RT();
  std::lock_guard<std::mutex> lk(r.mu);
  return r.streams.count(s) != 0;
}

inline size_t dyn_limit_for(const void* func) {
  RtState& r = RT();
  std::lock_guard<std::mutex> lk(r.mu);
  auto it = r.max_dyn_smem.find(func);
  return it == r.max_dyn_smem.end() ? kDefaultDynSharedLimit : it->second;
}

inline const char* kind_name(cudaMemcpyKind k) {
  switch (k) {
    case cudaMemcpyHostToHost: return "cudaMemcpyHostToHost";
    case cudaMemcpyHostToDevice: return "cudaMemcpyHostToDevice";
    case cudaMemcpyDeviceToHost: return "cudaMemcpyDeviceToHost";
    case cudaMemcpyDeviceToDevice: return "cudaMemcpyDeviceToDevice";
    default: return "cudaMemcpyDefault";
  }
}

inline cudaError_t check_copy(const char* api, void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  if (n == 0) return cudaSuccess;
  if (!dst || !src) return host_error(cudaErrorInvalidValue, std::string(api) + ": null pointer");
  bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if ((int)kind < 0 || (int)kind > 4) return host_error(cudaErrorInvalidMemcpyDirection, std::string(api) + ": invalid kind");
  if (dst_dev && !is_device_range(dst, n))
    return host_error(cudaErrorInvalidValue, std::string(api) + "(" + kind_name(kind) + ", " + std::to_string(n) +
                                                 " bytes): destination " + hexptr(dst) +
                                                 " is not inside a device allocation of that size");
  if (src_dev && !is_device_range(src, n))
    return host_error(cudaErrorInvalidValue, std::string(api) + "(" + kind_name(kind) + ", " + std::to_string(n) +
                                                 " bytes): source " + hexptr(src) +
                                                 " is not inside a device allocation of that size");
  return cudaSuccess;
}

// ---------------------------------------------------------------- kernel launch
struct LaunchCfg {
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;
  LaunchCfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), shmem(s), stream(st) {}
};

inline cudaError_t run_launch(const char* name, const void* func, const LaunchCfg& c, void (*invoke)(void*), void* ctx) {
  std::string head = std::string("[cuda_emu] launch of kernel '") + name + "' with grid " + fmt3(c.grid.x, c.grid.y, c.grid.z) +
                     " block " + fmt3(c.block.x, c.block.y, c.block.z) + ": ";
  if (in_kernel()) {
    device_fail(kErrNotSupported, std::string("kernel '") + name + "' launched from device code (dynamic parallelism is not emulated)");
    return cudaErrorNotSupported;
  }
  if (G().sticky) return sticky();
  auto bad = [&](cudaError_t code, const std::string& what) {
    record_error(code, head + what, false);
    return code;
  };
  const dim3& b = c.block;
  const dim3& g = c.grid;
  if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0)
    return bad(cudaErrorInvalidConfiguration, "a grid or block dimension is zero");
  unsigned long long nt = (unsigned long long)b.x * b.y * b.z;
  if (nt > kMaxThreadsPerBlock)
    return bad(cudaErrorInvalidConfiguration,
               std::to_string(nt) + " threads per block exceed the device limit of 1024");
  if (b.x > kMaxBlockDimX || b.y > kMaxBlockDimY || b.z > kMaxBlockDimZ)
    return bad(cudaErrorInvalidConfiguration, "block dimensions exceed the device limit (1024, 1024, 64)");
  if (g.x > kMaxGridDimX || g.y > kMaxGridDimYZ || g.z > kMaxGridDimYZ)
    return bad(cudaErrorInvalidConfiguration, "grid dimensions exceed the device limit (2^31-1, 65535, 65535)");
  size_t lim = dyn_limit_for(func);
  if (c.shmem > lim)
    return bad(cudaErrorInvalidValue,
               std::to_string(c.shmem) + " bytes of dynamic shared memory exceed the kernel's limit of " +
                   std::to_string(lim) + " bytes" +
                   (lim == kDefaultDynSharedLimit ? " (raise it with cudaFuncSetAttribute("
                                                    "cudaFuncAttributeMaxDynamicSharedMemorySize), up to 227 KB)"
                                                  : ""));
  if (!valid_stream(c.stream)) return bad(cudaErrorInvalidResourceHandle, "invalid stream " + hexptr(c.stream));
  std::lock_guard<std::mutex> lk(G().launch_mu);
  G().fail_block.store(~0ull);
  {
    std::lock_guard<std::mutex> elk(G().err_mu);
    ++G().launch_id;
  }
  LaunchInfo L{name, func, c.grid, c.block, c.shmem, invoke, ctx};
  unsigned long long nblocks = (unsigned long long)g.x * g.y * g.z;
  pool().run(L, nblocks);
  return G().sticky ? sticky() : cudaSuccess;
}

template <class... P>
struct KernelCall {
  void (*fn)(P...);
  std::tuple<std::decay_t<P>...> args;
  static void invoke(void* p) {
    auto* k = static_cast<KernelCall*>(p);
    std::apply(k->fn, k->args);
  }
};

template <class... P>
struct Launcher {
  void (*fn)(P...);
  const char* name;
  LaunchCfg cfg;
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "cuda_emu: wrong number of kernel arguments in <<<...>>> launch");
    KernelCall<P...> call{fn, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
    run_launch(name, (const void*)fn, cfg, &KernelCall<P...>::invoke, &call);
  }
};

template <class... P>
inline Launcher<P...> launch(void (*fn)(P...), const char* name, LaunchCfg cfg) {
  return Launcher<P...>{fn, name, cfg};
}

template <class... P, size_t... I>
inline cudaError_t launch_packed(void (*fn)(P...), dim3 g, dim3 b, void** args, size_t sh, cudaStream_t s,
                                 std::index_sequence<I...>) {
  KernelCall<P...> call{fn, std::tuple<std::decay_t<P>...>(*static_cast<std::decay_t<P>*>(args[I])...)};
  return run_launch("(cudaLaunchKernel)", (const void*)fn, LaunchCfg(g, b, sh, s), &KernelCall<P...>::invoke, &call);
}

}  // namespace gpt2gen_emu

template <class... P>
inline cudaError_t cudaLaunchKernel(void (*fn)(P...), dim3 gridDim, dim3 blockDim, void** args,
                                    size_t sharedMem = 0, cudaStream_t stream = nullptr) {
  return gpt2gen_emu::launch_packed(fn, gridDim, blockDim, args, sharedMem, stream, std::index_sequence_for<P...>{});
}

// ---------------------------------------------------------------- errors
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
#define GPT2GEN_EMU_E(x) case x: return #x;
    GPT2GEN_EMU_E(cudaSuccess) GPT2GEN_EMU_E(cudaErrorInvalidValue) GPT2GEN_EMU_E(cudaErrorMemoryAllocation)
    GPT2GEN_EMU_E(cudaErrorInitializationError) GPT2GEN_EMU_E(cudaErrorInvalidConfiguration)
    GPT2GEN_EMU_E(cudaErrorInvalidDevicePointer) GPT2GEN_EMU_E(cudaErrorInvalidMemcpyDirection)
    GPT2GEN_EMU_E(cudaErrorInvalidDeviceFunction) GPT2GEN_EMU_E(cudaErrorInvalidDevice)
    GPT2GEN_EMU_E(cudaErrorInvalidResourceHandle) GPT2GEN_EMU_E(cudaErrorNotReady)
    GPT2GEN_EMU_E(cudaErrorIllegalAddress) GPT2GEN_EMU_E(cudaErrorLaunchOutOfResources)
    GPT2GEN_EMU_E(cudaErrorAssert) GPT2GEN_EMU_E(cudaErrorIllegalInstruction) GPT2GEN_EMU_E(cudaErrorLaunchFailure)
    GPT2GEN_EMU_E(cudaErrorNotSupported) GPT2GEN_EMU_E(cudaErrorUnknown)
#undef GPT2GEN_EMU_E
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorIllegalInstruction: return "an illegal instruction was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    default: return cudaGetErrorName(e);
  }
}
inline cudaError_t cudaGetLastError() {
  gpt2gen_emu::Global& g = gpt2gen_emu::G();
  std::lock_guard<std::mutex> lk(g.err_mu);
  cudaError_t r = (cudaError_t)(g.sticky ? g.sticky : g.last);
  g.last = 0;
  return r;
}
inline cudaError_t cudaPeekAtLastError() {
  gpt2gen_emu::Global& g = gpt2gen_emu::G();
  std::lock_guard<std::mutex> lk(g.err_mu);
  return (cudaError_t)(g.sticky ? g.sticky : g.last);
}
inline cudaError_t cudaDeviceSynchronize() { return gpt2gen_emu::sticky(); }
inline cudaError_t cudaThreadSynchronize() { return gpt2gen_emu::sticky(); }
inline cudaError_t cudaDeviceReset() {
  gpt2gen_emu::Global& g = gpt2gen_emu::G();
  std::lock_guard<std::mutex> lk(g.err_mu);
  g.sticky = 0;
  g.last = 0;
  return cudaSuccess;
}

// ---------------------------------------------------------------- devices
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) {
  if (d != 0) return gpt2gen_emu::host_error(cudaErrorInvalidDevice, "cudaSetDevice: the emulator has one device (0)");
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p);
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (device != 0) return gpt2gen_emu::host_error(cudaErrorInvalidDevice, "cudaGetDeviceProperties: no such device");
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "gpt2gen cuda_emu (H100-like, emulated on CPU)");
  p->totalGlobalMem = 80ull << 30;
  p->sharedMemPerBlock = 48 * 1024;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->memPitch = 2147483647;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
  p->clockRate = 1980000;
  p->totalConstMem = 65536;
  p->major = 9;
  p->minor = 0;
  p->textureAlignment = 512;
  p->multiProcessorCount = 132;
  p->canMapHostMemory = 1;
  p->concurrentKernels = 1;
  p->ECCEnabled = 1;
  p->asyncEngineCount = 3;
  p->unifiedAddressing = 1;
  p->memoryClockRate = 2619000;
  p->memoryBusWidth = 5120;
  p->l2CacheSize = 50 * 1024 * 1024;
  p->persistingL2CacheMaxSize = 32 * 1024 * 1024;
  p->maxThreadsPerMultiProcessor = 2048;
  p->streamPrioritiesSupported = 1;
  p->globalL1CacheSupported = 1;
  p->localL1CacheSupported = 1;
  p->sharedMemPerMultiprocessor = 228 * 1024;
  p->regsPerMultiprocessor = 65536;
  p->managedMemory = 1;
  p->cooperativeLaunch = 1;
  p->sharedMemPerBlockOptin = 227 * 1024;
  p->maxBlocksPerMultiProcessor = 32;
  p->reservedSharedMemPerBlock = 1024;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  cudaDeviceProp p;
  cudaError_t e = cudaGetDeviceProperties(&p, device);
  if (e) return e;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *v = p.maxThreadsDim[0]; break;
    case cudaDevAttrMaxBlockDimY: *v = p.maxThreadsDim[1]; break;
    case cudaDevAttrMaxBlockDimZ: *v = p.maxThreadsDim[2]; break;
    case cudaDevAttrMaxGridDimX: *v = p.maxGridSize[0]; break;
    case cudaDevAttrMaxGridDimY: *v = p.maxGridSize[1]; break;
    case cudaDevAttrMaxGridDimZ: *v = p.maxGridSize[2]; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = (int)p.sharedMemPerBlock; break;
    case cudaDevAttrTotalConstantMemory: *v = (int)p.totalConstMem; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *v = p.regsPerBlock; break;
    case cudaDevAttrClockRate: *v = p.clockRate; break;
    case cudaDevAttrMultiProcessorCount: *v = p.multiProcessorCount; break;
    case cudaDevAttrL2CacheSize: *v = p.l2CacheSize; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *v = p.maxThreadsPerMultiProcessor; break;
    case cudaDevAttrComputeCapabilityMajor: *v = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = p.minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = (int)p.sharedMemPerMultiprocessor; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *v = p.regsPerMultiprocessor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = (int)p.sharedMemPerBlockOptin; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *v = p.maxBlocksPerMultiProcessor; break;
    default: return gpt2gen_emu::host_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute not emulated");
  }
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
inline cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  if (least) *least = 0;
  if (greatest) *greatest = -5;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSetCacheConfig(cudaFuncCache) { return cudaSuccess; }
inline cudaError_t cudaDeviceSetSharedMemConfig(cudaSharedMemConfig) { return cudaSuccess; }

// ---------------------------------------------------------------- function attributes / occupancy
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || (size_t)value > gpt2gen_emu::kOptinSharedLimit)
      return gpt2gen_emu::host_error(cudaErrorInvalidValue,
          "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize, " + std::to_string(value) +
          "): exceeds the device's 227 KB (232448 bytes) per-block opt-in limit");
    gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
    std::lock_guard<std::mutex> lk(r.mu);
    r.max_dyn_smem[(const void*)func] = (size_t)value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return gpt2gen_emu::host_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute not emulated");
}
template <class T>
inline cudaError_t cudaFuncSetCacheConfig(T*, cudaFuncCache) { return cudaSuccess; }
template <class T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, T* func) {
  std::memset(a, 0, sizeof *a);
  a->maxThreadsPerBlock = 1024;
  a->numRegs = 32;
  a->ptxVersion = 90;
  a->binaryVersion = 90;
  a->maxDynamicSharedSizeBytes = (int)gpt2gen_emu::dyn_limit_for((const void*)func);
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, T* func, int blockSize, size_t dynSmem) {
  (void)func;
  if (blockSize <= 0) { *n = 0; return cudaSuccess; }
  int by_threads = 2048 / blockSize;
  int by_smem = dynSmem ? (int)((228 * 1024) / (dynSmem + 1024)) : 32;
  *n = std::max(0, std::min(std::min(by_threads, by_smem), 32));
  return cudaSuccess;
}

// ---------------------------------------------------------------- memory
inline cudaError_t cudaMalloc(void** p, size_t size) {
  if (gpt2gen_emu::G().sticky) return gpt2gen_emu::sticky();
  if (!p) return gpt2gen_emu::host_error(cudaErrorInvalidValue, "cudaMalloc: null output pointer");
  if (size == 0) { *p = nullptr; return cudaSuccess; }
  size_t rounded = (size + 255) & ~(size_t)255;
  void* m = std::aligned_alloc(256, rounded);
  if (!m) return gpt2gen_emu::host_error(cudaErrorMemoryAllocation, "cudaMalloc: out of memory");
  std::memset(m, 0xFF, rounded);  // poison: device memory is not zeroed
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  std::lock_guard<std::mutex> lk(r.mu);
  r.device[(uintptr_t)m] = size;
  *p = m;
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t size) { return cudaMalloc(reinterpret_cast<void**>(p), size); }
template <class T>
inline cudaError_t cudaMallocManaged(T** p, size_t size, unsigned = cudaMemAttachGlobal) {
  return cudaMalloc(reinterpret_cast<void**>(p), size);
}
inline cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  {
    std::lock_guard<std::mutex> lk(r.mu);
    auto it = r.device.find((uintptr_t)p);
    if (it != r.device.end()) {
      r.device.erase(it);
      std::free(p);
      return gpt2gen_emu::sticky();
    }
  }
  return gpt2gen_emu::host_error(cudaErrorInvalidDevicePointer,
                                 "cudaFree(" + gpt2gen_emu::hexptr(p) + "): not a pointer returned by cudaMalloc");
}
inline cudaError_t cudaMallocHost(void** p, size_t size) {
  size_t rounded = (std::max<size_t>(size, 1) + 255) & ~(size_t)255;
  *p = std::aligned_alloc(256, rounded);
  if (!*p) return gpt2gen_emu::host_error(cudaErrorMemoryAllocation, "cudaMallocHost: out of memory");
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  std::lock_guard<std::mutex> lk(r.mu);
  r.host[(uintptr_t)*p] = size;
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMallocHost(T** p, size_t size) { return cudaMallocHost(reinterpret_cast<void**>(p), size); }
template <class T>
inline cudaError_t cudaHostAlloc(T** p, size_t size, unsigned) { return cudaMallocHost(reinterpret_cast<void**>(p), size); }
inline cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  std::lock_guard<std::mutex> lk(r.mu);
  auto it = r.host.find((uintptr_t)p);
  if (it == r.host.end())
    return gpt2gen_emu::host_error(cudaErrorInvalidValue, "cudaFreeHost(" + gpt2gen_emu::hexptr(p) + "): not from cudaMallocHost");
  r.host.erase(it);
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b) {
  *total_b = 80ull << 30;
  *free_b = 79ull << 30;
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  if (gpt2gen_emu::G().sticky) return gpt2gen_emu::sticky();
  cudaError_t e = gpt2gen_emu::check_copy("cudaMemcpy", dst, src, count, kind);
  if (e) return e;
  if (count) std::memmove(dst, src, count);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                                   cudaStream_t stream = nullptr) {
  if (gpt2gen_emu::G().sticky) return gpt2gen_emu::sticky();
  if (!gpt2gen_emu::valid_stream(stream)) return gpt2gen_emu::host_error(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync: invalid stream");
  cudaError_t e = gpt2gen_emu::check_copy("cudaMemcpyAsync", dst, src, count, kind);
  if (e) return e;
  if (count) std::memmove(dst, src, count);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                                size_t height, cudaMemcpyKind kind) {
  if (gpt2gen_emu::G().sticky) return gpt2gen_emu::sticky();
  if (width > dpitch || width > spitch) return gpt2gen_emu::host_error(cudaErrorInvalidValue, "cudaMemcpy2D: width exceeds pitch");
  for (size_t r = 0; r < height; ++r) {
    cudaError_t e = gpt2gen_emu::check_copy("cudaMemcpy2D", (char*)dst + r * dpitch, (const char*)src + r * spitch, width, kind);
    if (e) return e;
    std::memmove((char*)dst + r * dpitch, (const char*)src + r * spitch, width);
  }
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, size_t count) {
  if (gpt2gen_emu::G().sticky) return gpt2gen_emu::sticky();
  if (count && !gpt2gen_emu::is_device_range(p, count))
    return gpt2gen_emu::host_error(cudaErrorInvalidValue, "cudaMemset(" + gpt2gen_emu::hexptr(p) + ", " + std::to_string(count) +
                                                              " bytes): not inside a device allocation of that size");
  if (count) std::memset(p, value, count);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t stream = nullptr) {
  if (!gpt2gen_emu::valid_stream(stream)) return gpt2gen_emu::host_error(cudaErrorInvalidResourceHandle, "cudaMemsetAsync: invalid stream");
  return cudaMemset(p, value, count);
}
template <class T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t count, size_t offset = 0,
                                      cudaMemcpyKind kind = cudaMemcpyHostToDevice) {
  (void)kind;
  if (gpt2gen_emu::G().sticky) return gpt2gen_emu::sticky();
  if (offset + count > sizeof(T))
    return gpt2gen_emu::host_error(cudaErrorInvalidValue, "cudaMemcpyToSymbol: " + std::to_string(offset + count) +
                                                              " bytes exceed the symbol's " + std::to_string(sizeof(T)));
  std::memmove(reinterpret_cast<char*>(&symbol) + offset, src, count);
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t count, size_t offset = 0,
                                        cudaMemcpyKind kind = cudaMemcpyDeviceToHost) {
  (void)kind;
  if (gpt2gen_emu::G().sticky) return gpt2gen_emu::sticky();
  if (offset + count > sizeof(T))
    return gpt2gen_emu::host_error(cudaErrorInvalidValue, "cudaMemcpyFromSymbol: " + std::to_string(offset + count) +
                                                              " bytes exceed the symbol's " + std::to_string(sizeof(T)));
  std::memmove(dst, reinterpret_cast<const char*>(&symbol) + offset, count);
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMemcpyToSymbolAsync(T& symbol, const void* src, size_t count, size_t offset = 0,
                                           cudaMemcpyKind kind = cudaMemcpyHostToDevice, cudaStream_t = nullptr) {
  return cudaMemcpyToSymbol(symbol, src, count, offset, kind);
}
template <class T>
inline cudaError_t cudaMemcpyFromSymbolAsync(void* dst, const T& symbol, size_t count, size_t offset = 0,
                                             cudaMemcpyKind kind = cudaMemcpyDeviceToHost, cudaStream_t = nullptr) {
  return cudaMemcpyFromSymbol(dst, symbol, count, offset, kind);
}
template <class T>
inline cudaError_t cudaGetSymbolAddress(void** p, T& symbol) {
  *p = (void*)&symbol;
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  std::lock_guard<std::mutex> lk(r.mu);
  r.device[(uintptr_t)&symbol] = sizeof(T);
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaGetSymbolSize(size_t* n, const T&) { *n = sizeof(T); return cudaSuccess; }

// ---------------------------------------------------------------- streams and events (all work is synchronous)
inline cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned flags, int priority) {
  *s = new CUstream_st{flags, priority};
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  std::lock_guard<std::mutex> lk(r.mu);
  r.streams.insert(*s);
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) { return cudaStreamCreateWithPriority(s, flags, 0); }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithPriority(s, 0, 0); }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  std::lock_guard<std::mutex> lk(r.mu);
  if (!r.streams.erase(s))
    return gpt2gen_emu::host_error(cudaErrorInvalidResourceHandle, "cudaStreamDestroy: invalid stream");
  delete s;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  if (!gpt2gen_emu::valid_stream(s)) return gpt2gen_emu::host_error(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize: invalid stream");
  return gpt2gen_emu::sticky();
}
inline cudaError_t cudaStreamQuery(cudaStream_t s) { return cudaStreamSynchronize(s); }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t, unsigned = 0) { return cudaStreamSynchronize(s); }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  *e = new CUevent_st{0.0, false, flags};
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  std::lock_guard<std::mutex> lk(r.mu);
  r.events.insert(*e);
  return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, 0); }
inline cudaError_t cudaEventCreate(cudaEvent_t* e, unsigned flags) { return cudaEventCreateWithFlags(e, flags); }
namespace gpt2gen_emu {
inline bool valid_event(cudaEvent_t e) {
  RtState& r = RT();
  std::lock_guard<std::mutex> lk(r.mu);
  return r.events.count(e) != 0;
}
}  // namespace gpt2gen_emu
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr) {
  if (!gpt2gen_emu::valid_event(e) || !gpt2gen_emu::valid_stream(s))
    return gpt2gen_emu::host_error(cudaErrorInvalidResourceHandle, "cudaEventRecord: invalid event or stream");
  e->ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
  e->recorded = true;
  return gpt2gen_emu::sticky();
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!gpt2gen_emu::valid_event(e)) return gpt2gen_emu::host_error(cudaErrorInvalidResourceHandle, "cudaEventSynchronize: invalid event");
  return gpt2gen_emu::sticky();
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) { return cudaEventSynchronize(e); }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (!gpt2gen_emu::valid_event(a) || !gpt2gen_emu::valid_event(b) || !a->recorded || !b->recorded ||
      (a->flags & cudaEventDisableTiming) || (b->flags & cudaEventDisableTiming))
    return gpt2gen_emu::host_error(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: events not recorded or without timing");
  *ms = (float)(b->ms - a->ms);
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  {
    std::lock_guard<std::mutex> lk(r.mu);
    if (r.events.erase(e)) { delete e; return cudaSuccess; }
  }
  return gpt2gen_emu::host_error(cudaErrorInvalidResourceHandle, "cudaEventDestroy: invalid event");
}

// ---------------------------------------------------------------- entry points for the Python side
extern "C" __attribute__((visibility("default"))) const char* gpt2gen_emu_last_error() {
  gpt2gen_emu::Global& g = gpt2gen_emu::G();
  std::lock_guard<std::mutex> lk(g.err_mu);
  return g.has_msg ? g.msg.c_str() : nullptr;
}
extern "C" __attribute__((visibility("default"))) void gpt2gen_emu_clear_error() {
  gpt2gen_emu::Global& g = gpt2gen_emu::G();
  std::lock_guard<std::mutex> lk(g.err_mu);
  g.has_msg = false;
  g.msg.clear();
  g.sticky = 0;
  g.last = 0;
}
extern "C" __attribute__((visibility("default"))) int gpt2gen_emu_num_workers() {
  return (int)gpt2gen_emu::pool_size();
}
extern "C" __attribute__((visibility("default"))) size_t gpt2gen_emu_device_bytes_in_use() {
  gpt2gen_emu::RtState& r = gpt2gen_emu::RT();
  std::lock_guard<std::mutex> lk(r.mu);
  size_t n = 0;
  for (auto& kv : r.device) n += kv.second;
  return n;
}

// Target of the assert() shim (include/assert.h): a failed assertion in a kernel is a device-side
// assert (cudaErrorAssert) naming the thread; on the host it aborts as the C library would.
namespace gpt2gen_emu {
__attribute__((visibility("hidden"))) void assert_fail(const char* expr, const char* file, int line, const char* func) {
  if (tls_fiber) {
    device_fail(kErrAssert, std::string("device-side assertion `") + expr + "` failed at " + file + ":" +
                                std::to_string(line) + " in " + func);
    return;
  }
  std::fprintf(stderr, "%s:%d: %s: Assertion `%s' failed.\n", file, line, func, expr);
  std::abort();
}
}  // namespace gpt2gen_emu
