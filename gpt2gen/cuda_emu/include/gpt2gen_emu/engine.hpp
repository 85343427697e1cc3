// gpt2gen cuda_emu: the execution engine -- fibers, per-block scheduler, barriers, warp exchange,
// per-block shared memory, the worker pool that runs blocks in parallel, and error recording.
//
// One translation unit (the rewritten .cu file) includes this header once; everything is hidden
// inside the resulting shared object.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "vector_types.hpp"

namespace gpt2gen_emu {

// ---------------------------------------------------------------- limits of the emulated device (H100-like)
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimX = 1024, kMaxBlockDimY = 1024, kMaxBlockDimZ = 64;
constexpr unsigned long long kMaxGridDimX = 2147483647ULL;
constexpr unsigned kMaxGridDimYZ = 65535;
constexpr size_t kStaticSharedLimit = 48 * 1024;          // static __shared__ per kernel
constexpr size_t kDefaultDynSharedLimit = 48 * 1024;      // dynamic, without cudaFuncSetAttribute
constexpr size_t kOptinSharedLimit = 227 * 1024;          // sharedMemPerBlockOptin on H100 (232448)
constexpr size_t kCanary = 64;                            // red zone around dynamic shared memory

// CUDA error codes used by the emulator (values match cudaError_t).
enum : int {
  kErrInvalidValue = 1, kErrMemoryAllocation = 2, kErrInvalidConfiguration = 9,
  kErrInvalidDevicePointer = 17, kErrInvalidMemcpyDirection = 21, kErrInvalidDeviceFunction = 98,
  kErrInvalidResourceHandle = 400, kErrIllegalAddress = 700, kErrLaunchOutOfResources = 701,
  kErrAssert = 710, kErrIllegalInstruction = 715, kErrLaunchFailure = 719, kErrNotSupported = 801,
};

// ---------------------------------------------------------------- global (per shared object) state
struct Global {
  std::mutex err_mu;
  bool has_msg = false;
  std::string msg;          // first error since the last clear (read by Python)
  int last = 0;             // cudaGetLastError (non-sticky)
  int sticky = 0;           // kernel faults: every later API call fails until cleared
  std::atomic<unsigned long long> fail_block{~0ull};  // lowest failed block of the current launch
  unsigned long long launch_id = 0;                    // current launch (guarded by launch_mu)
  unsigned long long msg_launch = 0, msg_block = ~0ull;
  bool msg_from_kernel = false;
  std::mutex launch_mu;
};
inline Global& G() { static Global* g = new Global(); return *g; }  // leaked on purpose (worker threads)

inline void record_error(int code, const std::string& msg, bool sticky) {
  Global& g = G();
  std::lock_guard<std::mutex> lk(g.err_mu);
  if (!g.has_msg) { g.has_msg = true; g.msg = msg; g.msg_from_kernel = false; }
  if (sticky) { if (!g.sticky) g.sticky = code; } else { g.last = code; }
}

inline std::string fmt3(unsigned x, unsigned y, unsigned z) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "(%u,%u,%u)", x, y, z);
  return buf;
}
inline std::string fmt3(uint3 v) { return fmt3(v.x, v.y, v.z); }

// ---------------------------------------------------------------- fibers
enum class St : unsigned char { Ready, Barrier, Warp, Exited };
enum WarpOp : int {
  OP_SYNCWARP, OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR, OP_ALL, OP_ANY, OP_BALLOT,
  OP_MATCH_ANY, OP_MATCH_ALL, OP_RED_ADD, OP_RED_MIN_U, OP_RED_MAX_U, OP_RED_MIN_I, OP_RED_MAX_I,
  OP_RED_AND, OP_RED_OR, OP_RED_XOR,
};
inline const char* op_name(int op) {
  static const char* names[] = {
    "__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
    "__all_sync", "__any_sync", "__ballot_sync", "__match_any_sync", "__match_all_sync",
    "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync", "__reduce_min_sync",
    "__reduce_max_sync", "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync"};
  return (op >= 0 && op <= OP_RED_XOR) ? names[op] : "?";
}
enum BarKind : int { BAR_SYNC, BAR_COUNT, BAR_AND, BAR_OR };
inline const char* bar_name(int k) {
  static const char* names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                                "__syncthreads_or"};
  return names[k & 3];
}

struct Block;
struct LaunchInfo;

struct Fiber {
  void* sp = nullptr;
  Block* blk = nullptr;
  uint3 tid{0, 0, 0};
  unsigned linear = 0, lane = 0, warp = 0;
  St st = St::Ready;
  bool spun = false;
  // block barrier
  const char* file = nullptr;
  int line = 0, bar_kind = 0, pred = 0, bar_result = 0;
  // warp operation
  int op = 0, arg = 0, width = 32, aux = 0;
  unsigned mask = 0;
  uint64_t in = 0, out = 0;
  const char* op_file = nullptr;
  int op_line = 0;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};

struct SharedSite {
  const void* key;
  void* ptr;
  size_t bytes;
  const char* name;
  int line;
};

struct LaunchInfo {
  const char* kernel;
  const void* func;
  dim3 grid, block;
  size_t dyn_shmem;
  void (*invoke)(void*);
  void* ctx;
};

struct Block {
  const LaunchInfo* L = nullptr;
  uint3 bidx{0, 0, 0};
  unsigned nthreads = 0, nwarps = 0;
  unsigned long long linear = 0;
  Fiber* fibers = nullptr;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  bool aborted = false;
  unsigned char* static_arena = nullptr;
  size_t static_used = 0;
  std::vector<SharedSite> sites;
  unsigned char* dyn = nullptr;
  size_t dyn_bytes = 0;
};

static __thread Fiber* tls_fiber = nullptr;

inline bool in_kernel() { return tls_fiber != nullptr; }

struct Abort {};

inline std::string where(const Fiber* f) {
  const Block* b = f->blk;
  return std::string("kernel '") + b->L->kernel + "' block " + fmt3(b->bidx) + " thread " + fmt3(f->tid);
}

// Record an error of a block of the running launch: the lowest-indexed failing block wins, so the
// report does not depend on how blocks were spread over worker threads.
inline void record_block_error(unsigned long long block, int code, const std::string& msg) {
  Global& g = G();
  {
    std::lock_guard<std::mutex> lk(g.err_mu);
    bool replace = !g.has_msg || (g.msg_from_kernel && g.msg_launch == g.launch_id && block < g.msg_block);
    if (replace) {
      g.has_msg = true;
      g.msg = msg;
      g.msg_from_kernel = true;
      g.msg_launch = g.launch_id;
      g.msg_block = block;
    }
    if (!g.sticky) g.sticky = code;
  }
  unsigned long long cur = g.fail_block.load();
  while (block < cur && !g.fail_block.compare_exchange_weak(cur, block)) {}
}

// Record an error detected on behalf of fiber f (or on the host when f is null).
inline void record_at(const Fiber* f, int code, const std::string& what) {
  if (f) record_block_error(f->blk->linear, code, "[cuda_emu] " + where(f) + ": " + what);
  else record_error(code, "[cuda_emu] host: " + what, false);
}

// Fail inside device code: record the error and abandon the block (unwinds the fiber).
// Called on the host (outside any kernel) it records the error and returns.
inline void device_fail(int code, const std::string& what) {
  Fiber* f = tls_fiber;
  record_at(f, code, what);
  if (f) {
    f->blk->aborted = true;
    throw Abort{};
  }
}

// ---------------------------------------------------------------- context switching
#if defined(__x86_64__)
extern "C" void gpt2gen_emu_switch(void** save_sp, void* to_sp) __attribute__((visibility("hidden")));
extern "C" void gpt2gen_emu_trampoline() __attribute__((visibility("hidden")));
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl gpt2gen_emu_switch\n"
    ".hidden gpt2gen_emu_switch\n"
    ".type gpt2gen_emu_switch,@function\n"
    "gpt2gen_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size gpt2gen_emu_switch, .-gpt2gen_emu_switch\n"
    ".p2align 4\n"
    ".globl gpt2gen_emu_trampoline\n"
    ".hidden gpt2gen_emu_trampoline\n"
    ".type gpt2gen_emu_trampoline,@function\n"
    "gpt2gen_emu_trampoline:\n"
    "  movq %r12, %rdi\n"
    "  call gpt2gen_emu_fiber_entry@PLT\n"
    "  ud2\n"
    ".size gpt2gen_emu_trampoline, .-gpt2gen_emu_trampoline\n");
#endif

extern "C" void gpt2gen_emu_fiber_entry(Fiber* f) __attribute__((visibility("hidden"), used));

inline void switch_to_sched(Fiber* f) {
#if defined(__x86_64__)
  gpt2gen_emu_switch(&f->sp, f->blk->sched_sp);
#else
  swapcontext(&f->uc, &f->blk->sched_uc);
#endif
}

inline void resume(Block& b, Fiber* f) {
  tls_fiber = f;
#if defined(__x86_64__)
  gpt2gen_emu_switch(&b.sched_sp, f->sp);
#else
  swapcontext(&b.sched_uc, &f->uc);
#endif
  tls_fiber = nullptr;
}

// ---------------------------------------------------------------- per OS thread worker state
inline size_t stack_bytes() {
  static size_t s = [] {
    const char* e = std::getenv("GPT2GEN_EMU_STACK_KB");
    long kb = e ? std::atol(e) : 64;
    if (kb < 16) kb = 16;
    return (size_t)kb * 1024;
  }();
  return s;
}

// Below each fiber's stack lies one page: a guard page (PROT_NONE, an overflow faults at once) when
// GPT2GEN_EMU_GUARD_PAGES=1, otherwise a canary checked when a block finishes. Guard pages split the stacks'
// mapping into two per fiber, ~2000 per worker thread of every loaded library, and a process that loads
// dozens of emulated libraries (a test suite) runs out of the kernel's vm.max_map_count.
inline bool guard_pages() {
  static bool on = [] { const char* e = std::getenv("GPT2GEN_EMU_GUARD_PAGES"); return e && e[0] == '1'; }();
  return on;
}
constexpr size_t kStackCanaryBytes = 256;
constexpr unsigned char kStackCanary = 0xA5;

struct Worker {
  unsigned char* stacks = nullptr;   // kMaxThreadsPerBlock stacks, each with a guard or canary page below it
  size_t stride = 0;
  size_t page = 0;
  Fiber fibers[kMaxThreadsPerBlock];
  std::vector<unsigned char> static_arena;
  std::vector<unsigned char> dyn;
  Block blk;
  Worker() {
    static_arena.resize(kOptinSharedLimit + 512);
    page = (size_t)sysconf(_SC_PAGESIZE);
    stride = stack_bytes() + page;
    size_t total = stride * kMaxThreadsPerBlock;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { std::fprintf(stderr, "[cuda_emu] cannot map fiber stacks\n"); std::abort(); }
    stacks = (unsigned char*)p;
    for (unsigned i = 0; i < kMaxThreadsPerBlock; ++i) {
      if (guard_pages()) mprotect(stacks + i * stride, page, PROT_NONE);
      else std::memset(canary(i), kStackCanary, kStackCanaryBytes);
    }
  }
  // The bytes just below fiber i's stack (the top of its page): what an overflow writes first.
  unsigned char* canary(unsigned i) { return stacks + i * stride + page - kStackCanaryBytes; }
  // Fiber i overflowed its stack (and the canary is restored for the next block); false with guard pages.
  bool overflowed(unsigned i) {
    if (guard_pages()) return false;
    unsigned char* c = canary(i);
    for (size_t k = 0; k < kStackCanaryBytes; ++k)
      if (c[k] != kStackCanary) { std::memset(c, kStackCanary, kStackCanaryBytes); return true; }
    return false;
  }
  // Top of fiber i's stack; staggered so that fiber tops do not all alias in the caches.
  unsigned char* stack_top(unsigned i) {
    uintptr_t top = (uintptr_t)(stacks + (i + 1) * stride);
    top -= (i % 61) * 64 + 64;
    return (unsigned char*)(top & ~(uintptr_t)15);
  }
};
static __thread Worker* tls_worker = nullptr;
inline Worker& worker() {
  if (!tls_worker) tls_worker = new Worker();  // one per OS thread, never freed
  return *tls_worker;
}

inline void init_fiber(Worker& w, unsigned i, Fiber* f) {
  unsigned char* top = w.stack_top(i);
#if defined(__x86_64__)
  uint64_t* sp = (uint64_t*)top - 8;
  sp[0] = 0x1F80ULL | (0x037FULL << 32);  // MXCSR, x87 control word
  sp[1] = sp[2] = sp[3] = 0;              // r15 r14 r13
  sp[4] = (uint64_t)f;                    // r12 -> first argument of the entry
  sp[5] = sp[6] = 0;                      // rbx rbp
  sp[7] = (uint64_t)&gpt2gen_emu_trampoline;
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = top - stack_bytes() + 256;
  f->uc.uc_stack.ss_size = stack_bytes() - 512;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, (void (*)())gpt2gen_emu_fiber_entry, 1, f);
#endif
}

// ---------------------------------------------------------------- device-side synchronisation primitives
inline Fiber* need_fiber(const char* what) {
  Fiber* f = tls_fiber;
  if (!f) device_fail(kErrNotSupported, std::string(what) + " called outside a kernel");
  return f;
}

inline int block_barrier(int kind, int pred, const char* file, int line) {
  Fiber* f = need_fiber(bar_name(kind));
  if (!f) return 0;
  f->st = St::Barrier;
  f->bar_kind = kind;
  f->pred = pred;
  f->file = file;
  f->line = line;
  switch_to_sched(f);
  return f->bar_result;
}

inline unsigned valid_lanes(const Block& b, unsigned warp) {
  unsigned n = b.nthreads - warp * 32;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

inline uint64_t warp_op(int op, unsigned mask, uint64_t in, int arg, int width, const char* file, int line) {
  Fiber* f = need_fiber(op_name(op));
  if (!f) return 0;
  Block& b = *f->blk;
  char buf[256];
  if (!((mask >> f->lane) & 1u)) {
    std::snprintf(buf, sizeof buf, "%s at %s:%d: mask 0x%08x does not include the calling lane %u",
                  op_name(op), file, line, mask, f->lane);
    device_fail(kErrIllegalInstruction, buf);
  }
  if (op >= OP_SHFL_IDX && op <= OP_SHFL_XOR && (width < 1 || width > 32 || (width & (width - 1)))) {
    std::snprintf(buf, sizeof buf, "%s at %s:%d: width %d is not a power of two in [1, 32]",
                  op_name(op), file, line, width);
    device_fail(kErrIllegalInstruction, buf);
  }
  if (op != OP_SYNCWARP) {
    unsigned valid = valid_lanes(b, f->warp);
    unsigned missing = mask & ~valid;
    if (missing) {
      unsigned j = __builtin_ctz(missing);
      std::snprintf(buf, sizeof buf,
                    "%s at %s:%d: mask 0x%08x names lane %u of warp %u, which does not exist "
                    "(the block has %u threads)", op_name(op), file, line, mask, j, f->warp, b.nthreads);
      device_fail(kErrIllegalInstruction, buf);
    }
    Fiber* base = b.fibers + f->warp * 32;
    for (unsigned m = mask; m; m &= m - 1) {
      unsigned j = __builtin_ctz(m);
      if (base[j].st == St::Exited) {
        std::snprintf(buf, sizeof buf,
                      "%s at %s:%d: mask 0x%08x names lane %u (thread %s), which has already exited "
                      "and does not take part", op_name(op), file, line, mask, j, fmt3(base[j].tid).c_str());
        device_fail(kErrIllegalInstruction, buf);
      }
    }
  }
  f->st = St::Warp;
  f->op = op;
  f->mask = mask;
  f->in = in;
  f->arg = arg;
  f->width = width;
  f->op_file = file;
  f->op_line = line;
  switch_to_sched(f);
  return f->out;
}

// A spin-wait hint (failed atomicCAS, __nanosleep): let the other threads of the block run.
inline void spin_yield() {
  Fiber* f = tls_fiber;
  if (!f) return;
  f->spun = true;
  switch_to_sched(f);
}

// ---------------------------------------------------------------- shared memory
template <class T, size_t N>
struct SArr;

[[noreturn]] inline void shared_oob(const void* self, long long idx, size_t extent) {
  Fiber* f = tls_fiber;
  std::string name = "?";
  int line = 0;
  if (f) {
    for (auto& s : f->blk->sites) {
      if ((const unsigned char*)self >= (const unsigned char*)s.ptr &&
          (const unsigned char*)self < (const unsigned char*)s.ptr + s.bytes) {
        name = s.name;
        line = s.line;
        break;
      }
    }
  }
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "out-of-bounds shared-memory access: index %lld into a dimension of extent %zu of "
                "__shared__ array '%s' (declared at line %d)", idx, extent, name.c_str(), line);
  device_fail(kErrIllegalAddress, buf);
  std::abort();  // host-side misuse: no way to continue
}

// A bounds-checked static shared array: same size and layout as T[N].
template <class T, size_t N>
struct SArr {
  T v[N];
  template <class I>
  __attribute__((always_inline)) T& operator[](I i) {
    if (__builtin_expect((unsigned long long)(long long)i >= N, 0)) shared_oob(this, (long long)i, N);
    return v[i];
  }
  template <class I>
  __attribute__((always_inline)) const T& operator[](I i) const {
    if (__builtin_expect((unsigned long long)(long long)i >= N, 0)) shared_oob(this, (long long)i, N);
    return v[i];
  }
  operator T*() { return v; }
  operator const T*() const { return v; }
  T* data() { return v; }
  const T* data() const { return v; }
  T* begin() { return v; }
  T* end() { return v + N; }
};

template <class T, size_t... N>
struct sarr_impl { using type = T; };
#if defined(GPT2GEN_EMU_UNCHECKED_SHARED)
template <class T, size_t N0, size_t... N>
struct sarr_impl<T, N0, N...> { using type = typename sarr_impl<T, N...>::type[N0]; };
#else
template <class T, size_t N0, size_t... N>
struct sarr_impl<T, N0, N...> { using type = SArr<typename sarr_impl<T, N...>::type, N0>; };
#endif
template <class T, size_t... N>
using sarr_t = typename sarr_impl<T, N...>::type;

// Decay a shared array (checked or plain) to a pointer, for casts the rewriter redirects here.
template <class T, size_t N>
inline T* sdata(SArr<T, N>& a) { return a.v; }
template <class T, size_t N>
inline T* sdata(T (&a)[N]) { return a; }
template <class T>
inline T* sdata(T* p) { return p; }

template <class T, int Site>
inline char site_tag = 0;

inline size_t dyn_limit_for(const void* func);

template <class T, size_t Align, int Site>
inline T& shared_static(const char* name, int line) {
  Fiber* f = tls_fiber;
  if (!f) {
    device_fail(kErrNotSupported, std::string("__shared__ variable '") + name + "' used outside a kernel");
    std::abort();
  }
  Block& b = *f->blk;
  const void* key = &site_tag<T, Site>;
  for (auto& s : b.sites)
    if (s.key == key) return *reinterpret_cast<T*>(s.ptr);
  size_t al = std::max<size_t>(Align, alignof(T));
  size_t off = (b.static_used + al - 1) & ~(al - 1);
  size_t end = off + sizeof(T);
  if (end > kStaticSharedLimit) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "static __shared__ memory exceeds the 48 KB per-block limit: '%s' (line %d, %zu bytes) "
                  "brings the block to %zu bytes", name, line, sizeof(T), end);
    device_fail(kErrLaunchOutOfResources, buf);
  }
  if (end + b.dyn_bytes > kOptinSharedLimit) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "shared memory exceeds the 227 KB per-block limit: %zu bytes static ('%s' at line %d) "
                  "+ %zu bytes dynamic", end, name, line, b.dyn_bytes);
    device_fail(kErrLaunchOutOfResources, buf);
  }
  unsigned char* p = b.static_arena + off;
  std::memset(p, 0xFF, sizeof(T));  // poison: uninitialised shared memory reads NaN / -1
  b.static_used = end;
  b.sites.push_back(SharedSite{key, p, sizeof(T), name, line});
  return *reinterpret_cast<T*>(p);
}

template <class T>
inline T* dyn_shared(size_t align) {
  (void)align;
  Fiber* f = tls_fiber;
  if (!f) {
    device_fail(kErrNotSupported, "extern __shared__ memory used outside a kernel");
    return nullptr;
  }
  return reinterpret_cast<T*>(f->blk->dyn);
}

// Red zones around dynamic shared memory: a write past either end is reported at the next barrier
// (or when the block finishes).
inline void check_canaries(Block& b, const Fiber* at, const char* when) {
  if (!b.dyn) return;
  const unsigned char* lo = b.dyn - kCanary;
  const unsigned char* hi = b.dyn + b.dyn_bytes;
  for (size_t i = 0; i < kCanary; ++i) {
    if (lo[i] != 0xA5 || hi[i] != 0xA5) {
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "out-of-bounds shared-memory write: the red zone %s the %zu bytes of dynamic "
                    "(extern __shared__) memory was overwritten (detected %s)",
                    lo[i] != 0xA5 ? "before" : "after", b.dyn_bytes, when);
      std::string who = std::string("[cuda_emu] kernel '") + b.L->kernel + "' block " + fmt3(b.bidx);
      if (at) who += " thread " + fmt3(at->tid);
      record_block_error(b.linear, kErrIllegalAddress, who + ": " + buf);
      b.aborted = true;
      return;
    }
  }
}

// ---------------------------------------------------------------- the block scheduler
inline void describe_warp_stall(Block& b, Fiber* f, std::string& out) {
  Fiber* base = b.fibers + f->warp * 32;
  char buf[512];
  for (unsigned m = f->mask; m; m &= m - 1) {
    unsigned j = __builtin_ctz(m);
    Fiber& g = base[j];
    if (f->op == OP_SYNCWARP && g.st == St::Exited) continue;
    if (g.st == St::Warp && g.op == f->op && g.mask == f->mask) continue;
    std::string state;
    if (g.st == St::Exited) state = "has exited without taking part";
    else if (g.st == St::Barrier)
      state = std::string("is waiting at ") + bar_name(g.bar_kind) + " at " + g.file + ":" + std::to_string(g.line);
    else if (g.st == St::Warp) {
      char b2[200];
      std::snprintf(b2, sizeof b2, "is at %s with mask 0x%08x at %s:%d", op_name(g.op), g.mask, g.op_file, g.op_line);
      state = b2;
    } else state = "never arrives";
    std::snprintf(buf, sizeof buf,
                  "%s at %s:%d: mask 0x%08x names lane %u (thread %s), which does not take part: it %s",
                  op_name(f->op), f->op_file, f->op_line, f->mask, j, fmt3(g.tid).c_str(), state.c_str());
    out = buf;
    return;
  }
  std::snprintf(buf, sizeof buf, "%s at %s:%d: deadlock (mask 0x%08x)", op_name(f->op), f->op_file,
                f->op_line, f->mask);
  out = buf;
}

// Complete one warp operation for the lanes in `group` (all waiting with the same op and mask).
inline bool complete_warp_op(Block& b, Fiber* base, unsigned group, int op) {
  switch (op) {
    case OP_SYNCWARP:
      break;
    case OP_SHFL_IDX: case OP_SHFL_UP: case OP_SHFL_DOWN: case OP_SHFL_XOR:
      for (unsigned m = group; m; m &= m - 1) {
        unsigned l = __builtin_ctz(m);
        Fiber& f = base[l];
        int w = f.width;
        int seg_start = (int)l & ~(w - 1), seg_end = seg_start + w - 1;
        int a = f.arg, j = (int)l;
        if (op == OP_SHFL_IDX) j = seg_start + (a & (w - 1));
        else if (op == OP_SHFL_UP) { j = (int)l - (a & 31); if (j < seg_start) j = (int)l; }
        else if (op == OP_SHFL_DOWN) { j = (int)l + (a & 31); if (j > seg_end) j = (int)l; }
        else { j = (int)l ^ (a & 31); if (j > seg_end) j = (int)l; }
        if (!((group >> j) & 1u)) {
          char buf[256];
          std::snprintf(buf, sizeof buf,
                        "%s at %s:%d: lane %u reads lane %d, which is not named in mask 0x%08x "
                        "(its value would be undefined)", op_name(op), f.op_file, f.op_line, l, j, f.mask);
          record_at(&f, kErrIllegalInstruction, buf);
          b.aborted = true;
          return false;
        }
        f.out = base[j].in;
      }
      break;
    case OP_ALL: case OP_ANY: case OP_BALLOT: {
      unsigned ballot = 0;
      for (unsigned m = group; m; m &= m - 1) {
        unsigned l = __builtin_ctz(m);
        if (base[l].in) ballot |= 1u << l;
      }
      uint64_t r = op == OP_BALLOT ? ballot : op == OP_ALL ? (ballot == group) : (ballot != 0);
      for (unsigned m = group; m; m &= m - 1) base[__builtin_ctz(m)].out = r;
      break;
    }
    case OP_MATCH_ANY:
      for (unsigned m = group; m; m &= m - 1) {
        unsigned l = __builtin_ctz(m), same = 0;
        for (unsigned n = group; n; n &= n - 1) {
          unsigned k = __builtin_ctz(n);
          if (base[k].in == base[l].in) same |= 1u << k;
        }
        base[l].out = same;
      }
      break;
    case OP_MATCH_ALL: {
      bool all = true;
      uint64_t v0 = base[__builtin_ctz(group)].in;
      for (unsigned m = group; m; m &= m - 1) all = all && base[__builtin_ctz(m)].in == v0;
      for (unsigned m = group; m; m &= m - 1) {
        base[__builtin_ctz(m)].out = all ? group : 0;
        base[__builtin_ctz(m)].aux = all;
      }
      break;
    }
    default: {  // reductions over 32-bit values
      uint32_t acc = 0;
      bool first = true;
      for (unsigned m = group; m; m &= m - 1) {
        uint32_t v = (uint32_t)base[__builtin_ctz(m)].in;
        if (first) { acc = v; first = false; continue; }
        switch (op) {
          case OP_RED_ADD: acc += v; break;
          case OP_RED_MIN_U: acc = std::min(acc, v); break;
          case OP_RED_MAX_U: acc = std::max(acc, v); break;
          case OP_RED_MIN_I: acc = (uint32_t)std::min((int32_t)acc, (int32_t)v); break;
          case OP_RED_MAX_I: acc = (uint32_t)std::max((int32_t)acc, (int32_t)v); break;
          case OP_RED_AND: acc &= v; break;
          case OP_RED_OR: acc |= v; break;
          default: acc ^= v; break;
        }
      }
      for (unsigned m = group; m; m &= m - 1) base[__builtin_ctz(m)].out = acc;
    }
  }
  for (unsigned m = group; m; m &= m - 1) base[__builtin_ctz(m)].st = St::Ready;
  return true;
}

inline bool resolve_warps(Block& b) {
  bool progress = false;
  for (unsigned w = 0; w < b.nwarps && !b.aborted; ++w) {
    Fiber* base = b.fibers + w * 32;
    unsigned nl = std::min(32u, b.nthreads - w * 32);
    unsigned waiting = 0, exited = 0;
    for (unsigned l = 0; l < nl; ++l) {
      if (base[l].st == St::Warp) waiting |= 1u << l;
      else if (base[l].st == St::Exited) exited |= 1u << l;
    }
    if (!waiting) continue;
    unsigned nonexistent = ~valid_lanes(b, w);
    unsigned todo = waiting;
    while (todo) {
      unsigned l = __builtin_ctz(todo);
      Fiber& f = base[l];
      unsigned need = f.op == OP_SYNCWARP ? (f.mask & ~exited & ~nonexistent) : f.mask;
      bool ok = true;
      for (unsigned m = need; m; m &= m - 1) {
        unsigned j = __builtin_ctz(m);
        if (!((waiting >> j) & 1u) || base[j].op != f.op || base[j].mask != f.mask) { ok = false; break; }
      }
      if (ok) {
        if (!complete_warp_op(b, base, need, f.op)) return false;
        waiting &= ~need;
        todo &= ~need;
        progress = true;
      } else {
        todo &= ~(1u << l);
      }
    }
  }
  return progress;
}

inline void run_block(Worker& w, const LaunchInfo& L, unsigned long long linear_block) {
  Block& b = w.blk;
  b.L = &L;
  b.linear = linear_block;
  unsigned long long gx = L.grid.x, gy = L.grid.y;
  b.bidx = uint3{(unsigned)(linear_block % gx), (unsigned)((linear_block / gx) % gy),
                 (unsigned)(linear_block / (gx * gy))};
  unsigned bx = L.block.x, by = L.block.y;
  b.nthreads = L.block.x * L.block.y * L.block.z;
  b.nwarps = (b.nthreads + 31) / 32;
  b.aborted = false;
  b.fibers = w.fibers;
  b.sites.clear();
  b.static_used = 0;
  b.static_arena = (unsigned char*)(((uintptr_t)w.static_arena.data() + 255) & ~(uintptr_t)255);
  b.dyn_bytes = L.dyn_shmem;
  if (L.dyn_shmem) {
    size_t need = L.dyn_shmem + 2 * kCanary + 16;
    if (w.dyn.size() < need) w.dyn.resize(need);
    unsigned char* lo = w.dyn.data() + ((16 - ((uintptr_t)w.dyn.data() & 15)) & 15);
    std::memset(lo, 0xA5, kCanary);
    b.dyn = lo + kCanary;
    std::memset(b.dyn, 0xFF, L.dyn_shmem);  // poison
    std::memset(b.dyn + L.dyn_shmem, 0xA5, kCanary);
  } else {
    b.dyn = nullptr;
  }
  for (unsigned i = 0; i < b.nthreads; ++i) {
    Fiber* f = &w.fibers[i];
    f->blk = &b;
    f->linear = i;
    f->tid = uint3{i % bx, (i / bx) % by, i / (bx * by)};
    f->lane = i & 31;
    f->warp = i >> 5;
    f->st = St::Ready;
    f->spun = false;
    f->out = 0;
    init_fiber(w, i, f);
  }
  Fiber* fib = w.fibers;
  unsigned n = b.nthreads;
  unsigned long long spin_passes = 0;
  for (;;) {
    bool any_ran = false, real_progress = false;
    for (unsigned i = 0; i < n; ++i) {
      Fiber* f = &fib[i];
      if (f->st != St::Ready) continue;
      f->spun = false;
      resume(b, f);
      if (b.aborted) return;
      any_ran = true;
      if (!f->spun) real_progress = true;
    }
    if (any_ran) {
      if (real_progress) spin_passes = 0;
      else if (++spin_passes > (1ull << 22)) {
        for (unsigned i = 0; i < n; ++i)
          if (fib[i].st == St::Ready) {
            record_at(&fib[i], kErrLaunchFailure,
                      "livelock: threads keep spinning (atomicCAS retry / __nanosleep) while no thread "
                      "of the block makes progress");
            break;
          }
        b.aborted = true;
        return;
      }
      if (G().fail_block.load(std::memory_order_relaxed) < b.linear) { b.aborted = true; return; }
    }
    if (resolve_warps(b)) continue;
    if (b.aborted) return;
    if (any_ran) continue;
    // Nothing is runnable: all threads exited, wait at a barrier, or are stuck.
    unsigned nbar = 0, nexit = 0;
    Fiber* first_bar = nullptr;
    Fiber* first_exit = nullptr;
    Fiber* first_warp = nullptr;
    for (unsigned i = 0; i < n; ++i) {
      Fiber* f = &fib[i];
      if (f->st == St::Barrier) { ++nbar; if (!first_bar) first_bar = f; }
      else if (f->st == St::Exited) { ++nexit; if (!first_exit) first_exit = f; }
      else if (f->st == St::Warp && !first_warp) first_warp = f;
    }
    if (first_warp) {
      std::string msg;
      describe_warp_stall(b, first_warp, msg);
      record_at(first_warp, kErrIllegalInstruction, msg);
      b.aborted = true;
      return;
    }
    if (nexit == n) {
      check_canaries(b, nullptr, "when the block finished");
      for (unsigned i = 0; i < n; ++i)
        if (w.overflowed(i)) {
          record_at(&fib[i], kErrLaunchFailure,
                    "stack overflow: the thread used more than its " + std::to_string(stack_bytes() / 1024) +
                    " KiB stack (big local arrays?); raise GPT2GEN_EMU_STACK_KB, and set GPT2GEN_EMU_GUARD_PAGES=1 "
                    "to stop at the overflowing access");
          b.aborted = true;
          return;
        }
      return;
    }
    if (nexit) {
      char buf[512];
      std::snprintf(buf, sizeof buf,
                    "barrier divergence: %u thread(s) wait at %s at %s:%d, but thread %s has exited and "
                    "will never arrive", nbar, bar_name(first_bar->bar_kind), first_bar->file,
                    first_bar->line, fmt3(first_exit->tid).c_str());
      record_at(first_bar, kErrLaunchFailure, buf);
      b.aborted = true;
      return;
    }
    for (unsigned i = 0; i < n; ++i) {
      Fiber* f = &fib[i];
      if (f->bar_kind != first_bar->bar_kind || f->line != first_bar->line ||
          (f->file != first_bar->file && std::strcmp(f->file, first_bar->file) != 0)) {
        char buf[512];
        std::snprintf(buf, sizeof buf,
                      "barrier divergence: threads of the block wait at different barriers: thread %s at "
                      "%s (%s:%d), thread %s at %s (%s:%d)", fmt3(first_bar->tid).c_str(),
                      bar_name(first_bar->bar_kind), first_bar->file, first_bar->line, fmt3(f->tid).c_str(),
                      bar_name(f->bar_kind), f->file, f->line);
        record_at(f, kErrLaunchFailure, buf);
        b.aborted = true;
        return;
      }
    }
    // Release the barrier.
    int count = 0;
    for (unsigned i = 0; i < n; ++i) count += fib[i].pred != 0;
    int kind = first_bar->bar_kind;
    int result = kind == BAR_COUNT ? count : kind == BAR_AND ? (count == (int)n) : kind == BAR_OR ? (count > 0) : 0;
    std::string when = std::string("at ") + bar_name(kind) + " " + first_bar->file + ":" + std::to_string(first_bar->line);
    check_canaries(b, first_bar, when.c_str());
    if (b.aborted) return;
    for (unsigned i = 0; i < n; ++i) {
      fib[i].bar_result = result;
      fib[i].st = St::Ready;
    }
  }
}

extern "C" void gpt2gen_emu_fiber_entry(Fiber* f) {
  Block* b = f->blk;
  try {
    b->L->invoke(b->L->ctx);
  } catch (Abort&) {
    b->aborted = true;
  } catch (std::exception& e) {
    record_at(f, kErrLaunchFailure, std::string("C++ exception escaped the kernel: ") + e.what());
    b->aborted = true;
  } catch (...) {
    record_at(f, kErrLaunchFailure, "C++ exception escaped the kernel");
    b->aborted = true;
  }
  f->st = St::Exited;
  switch_to_sched(f);
  std::abort();  // an exited fiber is never resumed
}

// ---------------------------------------------------------------- the worker pool (blocks in parallel)
inline unsigned pool_size() {
  static unsigned n = [] {
    const char* e = std::getenv("GPT2GEN_EMU_THREADS");
    long v = e ? std::atol(e) : (long)std::thread::hardware_concurrency();
    return (unsigned)std::max(1L, std::min(v, 256L));
  }();
  return n;
}

struct Pool {
  std::mutex m;
  std::condition_variable cv, done;
  unsigned gen = 0;
  int busy = 0;
  const LaunchInfo* job = nullptr;
  unsigned long long total = 0;
  std::atomic<unsigned long long> next{0};
  unsigned nthreads = 0;

  void work() {
    Worker& w = worker();
    const LaunchInfo& L = *job;
    for (;;) {
      unsigned long long i = next.fetch_add(1);
      if (i >= total || i > G().fail_block.load(std::memory_order_relaxed)) return;
      run_block(w, L, i);
      if (w.blk.aborted) {  // make sure later blocks stop even if nothing was recorded
        unsigned long long cur = G().fail_block.load();
        while (i < cur && !G().fail_block.compare_exchange_weak(cur, i)) {}
      }
    }
  }
  void loop() {
    unsigned seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lk(m);
      cv.wait(lk, [&] { return gen != seen; });
      seen = gen;
      lk.unlock();
      work();
      lk.lock();
      if (--busy == 0) done.notify_all();
    }
  }
  void run(const LaunchInfo& L, unsigned long long nblocks) {
    job = &L;
    total = nblocks;
    next.store(0);
    unsigned helpers = (unsigned)std::min<unsigned long long>(pool_size(), nblocks) - 1;
    if (helpers == 0) { work(); return; }
    std::unique_lock<std::mutex> lk(m);
    while (nthreads < pool_size() - 1) {
      std::thread([this] { loop(); }).detach();
      ++nthreads;
    }
    busy = (int)nthreads;
    ++gen;
    cv.notify_all();
    lk.unlock();
    work();
    lk.lock();
    done.wait(lk, [&] { return busy == 0; });
  }
};
inline Pool& pool() { static Pool* p = new Pool(); return *p; }

}  // namespace gpt2gen_emu
