// gpt2gen cuda_emu: device intrinsics (barriers, warp functions, atomics, math, loads/stores).
#pragma once
#include <cmath>
#include <math.h>
#include <ctime>
#include "engine.hpp"

namespace gpt2gen_emu {
template <class T>
struct nd { using type = T; };  // blocks template argument deduction
template <class T>
using nd_t = typename nd<T>::type;

template <class T>
inline uint64_t pack_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value, "cuda_emu: warp functions need a trivially copyable type");
  static_assert(sizeof(T) <= 8, "cuda_emu: warp shuffles move at most 8 bytes (as on the GPU)");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T unpack_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
inline unsigned active_lanes() {
  Fiber* f = tls_fiber;
  if (!f) return 0;
  Block& b = *f->blk;
  Fiber* base = b.fibers + f->warp * 32;
  unsigned valid = valid_lanes(b, f->warp), m = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (((valid >> l) & 1u) && base[l].st != St::Exited) m |= 1u << l;
  return m;
}
}  // namespace gpt2gen_emu

#define GPT2GEN_EMU_SITE const char *gpt2gen_file = __builtin_FILE(), int gpt2gen_line = __builtin_LINE()
#define GPT2GEN_EMU_AT gpt2gen_file, gpt2gen_line

constexpr int warpSize = 32;

// ---------------------------------------------------------------- block barriers
inline void __syncthreads(GPT2GEN_EMU_SITE) {
  gpt2gen_emu::block_barrier(gpt2gen_emu::BAR_SYNC, 0, GPT2GEN_EMU_AT);
}
inline int __syncthreads_count(int pred, GPT2GEN_EMU_SITE) {
  return gpt2gen_emu::block_barrier(gpt2gen_emu::BAR_COUNT, pred != 0, GPT2GEN_EMU_AT);
}
inline int __syncthreads_and(int pred, GPT2GEN_EMU_SITE) {
  return gpt2gen_emu::block_barrier(gpt2gen_emu::BAR_AND, pred != 0, GPT2GEN_EMU_AT);
}
inline int __syncthreads_or(int pred, GPT2GEN_EMU_SITE) {
  return gpt2gen_emu::block_barrier(gpt2gen_emu::BAR_OR, pred != 0, GPT2GEN_EMU_AT);
}

// ---------------------------------------------------------------- warp-level functions
inline void __syncwarp(unsigned mask = 0xffffffffu, GPT2GEN_EMU_SITE) {
  gpt2gen_emu::warp_op(gpt2gen_emu::OP_SYNCWARP, mask, 0, 0, 32, GPT2GEN_EMU_AT);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, GPT2GEN_EMU_SITE) {
  return gpt2gen_emu::unpack_bits<T>(gpt2gen_emu::warp_op(gpt2gen_emu::OP_SHFL_IDX, mask,
      gpt2gen_emu::pack_bits(var), srcLane, width, GPT2GEN_EMU_AT));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, GPT2GEN_EMU_SITE) {
  return gpt2gen_emu::unpack_bits<T>(gpt2gen_emu::warp_op(gpt2gen_emu::OP_SHFL_UP, mask,
      gpt2gen_emu::pack_bits(var), (int)delta, width, GPT2GEN_EMU_AT));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, GPT2GEN_EMU_SITE) {
  return gpt2gen_emu::unpack_bits<T>(gpt2gen_emu::warp_op(gpt2gen_emu::OP_SHFL_DOWN, mask,
      gpt2gen_emu::pack_bits(var), (int)delta, width, GPT2GEN_EMU_AT));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, GPT2GEN_EMU_SITE) {
  return gpt2gen_emu::unpack_bits<T>(gpt2gen_emu::warp_op(gpt2gen_emu::OP_SHFL_XOR, mask,
      gpt2gen_emu::pack_bits(var), laneMask, width, GPT2GEN_EMU_AT));
}
inline int __all_sync(unsigned mask, int pred, GPT2GEN_EMU_SITE) {
  return (int)gpt2gen_emu::warp_op(gpt2gen_emu::OP_ALL, mask, pred != 0, 0, 32, GPT2GEN_EMU_AT);
}
inline int __any_sync(unsigned mask, int pred, GPT2GEN_EMU_SITE) {
  return (int)gpt2gen_emu::warp_op(gpt2gen_emu::OP_ANY, mask, pred != 0, 0, 32, GPT2GEN_EMU_AT);
}
inline unsigned __ballot_sync(unsigned mask, int pred, GPT2GEN_EMU_SITE) {
  return (unsigned)gpt2gen_emu::warp_op(gpt2gen_emu::OP_BALLOT, mask, pred != 0, 0, 32, GPT2GEN_EMU_AT);
}
inline unsigned __activemask() { return gpt2gen_emu::active_lanes(); }
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, GPT2GEN_EMU_SITE) {
  return (unsigned)gpt2gen_emu::warp_op(gpt2gen_emu::OP_MATCH_ANY, mask, gpt2gen_emu::pack_bits(value), 0, 32,
                                        GPT2GEN_EMU_AT);
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred, GPT2GEN_EMU_SITE) {
  unsigned r = (unsigned)gpt2gen_emu::warp_op(gpt2gen_emu::OP_MATCH_ALL, mask, gpt2gen_emu::pack_bits(value), 0,
                                              32, GPT2GEN_EMU_AT);
  *pred = r != 0;
  return r;
}
#define GPT2GEN_EMU_WRED(name, T, OP)                                                                   \
  inline T name(unsigned mask, T value, GPT2GEN_EMU_SITE) {                                            \
    return (T)(uint32_t)gpt2gen_emu::warp_op(gpt2gen_emu::OP, mask, (uint32_t)value, 0, 32, GPT2GEN_EMU_AT); \
  }
GPT2GEN_EMU_WRED(__reduce_add_sync, unsigned, OP_RED_ADD)
GPT2GEN_EMU_WRED(__reduce_add_sync, int, OP_RED_ADD)
GPT2GEN_EMU_WRED(__reduce_min_sync, unsigned, OP_RED_MIN_U)
GPT2GEN_EMU_WRED(__reduce_min_sync, int, OP_RED_MIN_I)
GPT2GEN_EMU_WRED(__reduce_max_sync, unsigned, OP_RED_MAX_U)
GPT2GEN_EMU_WRED(__reduce_max_sync, int, OP_RED_MAX_I)
GPT2GEN_EMU_WRED(__reduce_and_sync, unsigned, OP_RED_AND)
GPT2GEN_EMU_WRED(__reduce_or_sync, unsigned, OP_RED_OR)
GPT2GEN_EMU_WRED(__reduce_xor_sync, unsigned, OP_RED_XOR)
#undef GPT2GEN_EMU_WRED

// ---------------------------------------------------------------- memory fences, timing, traps
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline long long clock64() {
  return (long long)std::chrono::steady_clock::now().time_since_epoch().count();
}
inline void __nanosleep(unsigned) { gpt2gen_emu::spin_yield(); }
[[noreturn]] inline void __trap() {
  gpt2gen_emu::device_fail(gpt2gen_emu::kErrIllegalInstruction, "__trap() was called");
  std::abort();
}
[[noreturn]] inline void __brkpt() {
  gpt2gen_emu::device_fail(gpt2gen_emu::kErrIllegalInstruction, "__brkpt() was called");
  std::abort();
}

// ---------------------------------------------------------------- cache-hinted loads and stores
#define GPT2GEN_EMU_LD(name) template <class T> inline T name(const T* p) { return *p; }
GPT2GEN_EMU_LD(__ldg) GPT2GEN_EMU_LD(__ldcg) GPT2GEN_EMU_LD(__ldca) GPT2GEN_EMU_LD(__ldcs)
GPT2GEN_EMU_LD(__ldlu) GPT2GEN_EMU_LD(__ldcv)
#undef GPT2GEN_EMU_LD
#define GPT2GEN_EMU_ST(name) template <class T> inline void name(T* p, gpt2gen_emu::nd_t<T> v) { *p = v; }
GPT2GEN_EMU_ST(__stcs) GPT2GEN_EMU_ST(__stcg) GPT2GEN_EMU_ST(__stwb) GPT2GEN_EMU_ST(__stwt)
#undef GPT2GEN_EMU_ST

// ---------------------------------------------------------------- atomics
#define GPT2GEN_EMU_ATOMIC_INT(T)                                                                         \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }                 \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }                 \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }               \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }                 \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }                   \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }                 \
  inline T atomicMin(T* a, T v) {                                                                       \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                       \
    while (v < old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
    return old;                                                                                         \
  }                                                                                                     \
  inline T atomicMax(T* a, T v) {                                                                       \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                       \
    while (v > old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
    return old;                                                                                         \
  }                                                                                                     \
  inline T atomicCAS(T* a, T compare, T v) {                                                            \
    T expected = compare;                                                                               \
    __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);            \
    if (expected != compare) gpt2gen_emu::spin_yield();                                                 \
    return expected;                                                                                    \
  }
GPT2GEN_EMU_ATOMIC_INT(int)
GPT2GEN_EMU_ATOMIC_INT(unsigned int)
GPT2GEN_EMU_ATOMIC_INT(unsigned long long)
GPT2GEN_EMU_ATOMIC_INT(long long)
#undef GPT2GEN_EMU_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* a, unsigned short compare, unsigned short v) {
  unsigned short expected = compare;
  __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  if (expected != compare) gpt2gen_emu::spin_yield();
  return expected;
}

namespace gpt2gen_emu {
template <class T, class U, class F>
inline T atomic_update(T* a, F f) {  // CAS loop on the bit pattern of T (stored as U)
  static_assert(sizeof(T) == sizeof(U), "");
  U* p = reinterpret_cast<U*>(a);
  U old = __atomic_load_n(p, __ATOMIC_RELAXED), nw;
  do {
    T o;
    std::memcpy(&o, &old, sizeof o);
    T n = f(o);
    std::memcpy(&nw, &n, sizeof n);
  } while (!__atomic_compare_exchange_n(p, &old, nw, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  T r;
  std::memcpy(&r, &old, sizeof r);
  return r;
}
}  // namespace gpt2gen_emu
inline float atomicAdd(float* a, float v) {
  return gpt2gen_emu::atomic_update<float, uint32_t>(a, [v](float o) { return o + v; });
}
inline double atomicAdd(double* a, double v) {
  return gpt2gen_emu::atomic_update<double, uint64_t>(a, [v](double o) { return o + v; });
}
inline float atomicExch(float* a, float v) {
  return gpt2gen_emu::atomic_update<float, uint32_t>(a, [v](float) { return v; });
}
inline unsigned atomicInc(unsigned* a, unsigned val) {
  return gpt2gen_emu::atomic_update<unsigned, uint32_t>(a, [val](unsigned o) { return o >= val ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* a, unsigned val) {
  return gpt2gen_emu::atomic_update<unsigned, uint32_t>(a, [val](unsigned o) { return (o == 0 || o > val) ? val : o - 1; });
}
#define GPT2GEN_EMU_SCOPED(name) \
  template <class T, class U> inline T name##_block(T* a, U v) { return name(a, (T)v); } \
  template <class T, class U> inline T name##_system(T* a, U v) { return name(a, (T)v); }
GPT2GEN_EMU_SCOPED(atomicAdd) GPT2GEN_EMU_SCOPED(atomicSub) GPT2GEN_EMU_SCOPED(atomicExch)
GPT2GEN_EMU_SCOPED(atomicMin) GPT2GEN_EMU_SCOPED(atomicMax) GPT2GEN_EMU_SCOPED(atomicAnd)
GPT2GEN_EMU_SCOPED(atomicOr) GPT2GEN_EMU_SCOPED(atomicXor)
#undef GPT2GEN_EMU_SCOPED
template <class T>
inline T atomicCAS_block(T* a, T c, T v) { return atomicCAS(a, c, v); }
template <class T>
inline T atomicCAS_system(T* a, T c, T v) { return atomicCAS(a, c, v); }

// ---------------------------------------------------------------- min / max as CUDA declares them
#define GPT2GEN_EMU_MINMAX(T)                                       \
  inline T min(T a, T b) { return b < a ? b : a; }                  \
  inline T max(T a, T b) { return a < b ? b : a; }
GPT2GEN_EMU_MINMAX(int) GPT2GEN_EMU_MINMAX(unsigned int) GPT2GEN_EMU_MINMAX(long)
GPT2GEN_EMU_MINMAX(unsigned long) GPT2GEN_EMU_MINMAX(long long) GPT2GEN_EMU_MINMAX(unsigned long long)
#undef GPT2GEN_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline unsigned umin(unsigned a, unsigned b) { return min(a, b); }
inline unsigned umax(unsigned a, unsigned b) { return max(a, b); }
inline long long llmin(long long a, long long b) { return min(a, b); }
inline long long llmax(long long a, long long b) { return max(a, b); }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return min(a, b); }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return max(a, b); }

// ---------------------------------------------------------------- float math intrinsics
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752); }
inline int __float2int_rn(float x) { return (int)lrintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)llrintf(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
inline long long __float2ll_rn(float x) { return llrintf(x); }
inline long long __float2ll_rz(float x) { return (long long)x; }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __double2float_rn(double x) { return (float)x; }
inline int __double2int_rn(double x) { return (int)lrint(x); }
inline int __double2int_rz(double x) { return (int)x; }
inline int __float_as_int(float x) { int r; std::memcpy(&r, &x, 4); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; std::memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; std::memcpy(&r, &x, 4); return r; }
inline long long __double_as_longlong(double x) { long long r; std::memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; std::memcpy(&r, &x, 8); return r; }
inline int __double2hiint(double x) { return (int)(__double_as_longlong(x) >> 32); }
inline int __double2loint(double x) { return (int)__double_as_longlong(x); }
inline double __hiloint2double(int hi, int lo) {
  return __longlong_as_double((long long)(((unsigned long long)(unsigned)hi << 32) | (unsigned)lo));
}
inline int __isnanf(float x) { return std::isnan(x); }
inline int __isinff(float x) { return std::isinf(x); }
inline int __finitef(float x) { return std::isfinite(x); }

// ---------------------------------------------------------------- integer intrinsics
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (((s >> (4 * i)) & 7) * 8)) & 0xFF) << (8 * i);
  return r;
}
inline int __mul24(int a, int b) { return (int)(((long long)(a << 8 >> 8)) * (long long)(b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xFFFFFF) * (b & 0xFFFFFF); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __hadd(int a, int b) { return (int)(((long long)a + b) >> 1); }
inline int __rhadd(int a, int b) { return (int)(((long long)a + b + 1) >> 1); }
inline unsigned __uhadd(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a + b) >> 1); }
inline unsigned __urhadd(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a + b + 1) >> 1); }
inline unsigned __sad(int x, int y, unsigned z) { return (unsigned)(x > y ? x - y : y - x) + z; }
inline unsigned __usad(unsigned x, unsigned y, unsigned z) { return (x > y ? x - y : y - x) + z; }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  return (unsigned)((((unsigned long long)hi << 32 | lo) << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  return (unsigned)(((unsigned long long)hi << 32 | lo) >> (s & 31));
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned s) {
  return __funnelshift_l(lo, hi, s > 32 ? 32 : s);  // clamp: shift 32 yields lo
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned s) {
  return s >= 32 ? hi : __funnelshift_r(lo, hi, s);
}

// ---------------------------------------------------------------- explicitly unsupported intrinsics
namespace gpt2gen_emu {
template <class... A>
struct dependent_false : std::false_type {};
}  // namespace gpt2gen_emu
#define GPT2GEN_EMU_UNSUPPORTED(name, why)                                                    \
  template <class... A>                                                                     \
  inline int name(A...) {                                                                   \
    static_assert(gpt2gen_emu::dependent_false<A...>::value,                                \
                  "cuda_emu: unsupported intrinsic " #name ": " why);                       \
    return 0;                                                                               \
  }
GPT2GEN_EMU_UNSUPPORTED(__shfl, "the non-_sync shuffles were removed for sm_70+; use __shfl_sync")
GPT2GEN_EMU_UNSUPPORTED(__shfl_up, "use __shfl_up_sync")
GPT2GEN_EMU_UNSUPPORTED(__shfl_down, "use __shfl_down_sync")
GPT2GEN_EMU_UNSUPPORTED(__shfl_xor, "use __shfl_xor_sync")
GPT2GEN_EMU_UNSUPPORTED(__any, "use __any_sync")
GPT2GEN_EMU_UNSUPPORTED(__all, "use __all_sync")
GPT2GEN_EMU_UNSUPPORTED(__ballot, "use __ballot_sync")
GPT2GEN_EMU_UNSUPPORTED(tex1Dfetch, "textures are not emulated")
GPT2GEN_EMU_UNSUPPORTED(tex1D, "textures are not emulated")
GPT2GEN_EMU_UNSUPPORTED(tex2D, "textures are not emulated")
GPT2GEN_EMU_UNSUPPORTED(tex3D, "textures are not emulated")
GPT2GEN_EMU_UNSUPPORTED(surf2Dread, "surfaces are not emulated")
GPT2GEN_EMU_UNSUPPORTED(surf2Dwrite, "surfaces are not emulated")
GPT2GEN_EMU_UNSUPPORTED(__prof_trigger, "profiler counters are not emulated")
GPT2GEN_EMU_UNSUPPORTED(__cvta_generic_to_shared, "address-space conversion is not emulated")
GPT2GEN_EMU_UNSUPPORTED(__pipeline_memcpy_async, "asynchronous copies are not emulated")
GPT2GEN_EMU_UNSUPPORTED(__pipeline_commit, "asynchronous copies are not emulated")
GPT2GEN_EMU_UNSUPPORTED(__pipeline_wait_prior, "asynchronous copies are not emulated")
GPT2GEN_EMU_UNSUPPORTED(cudaLaunchCooperativeKernel, "cooperative (grid-synchronising) launches are not emulated")
GPT2GEN_EMU_UNSUPPORTED(cudaLaunchKernelEx, "use <<<...>>> or cudaLaunchKernel")
GPT2GEN_EMU_UNSUPPORTED(cudaGraphCreate, "CUDA graphs are not emulated")
GPT2GEN_EMU_UNSUPPORTED(cudaStreamBeginCapture, "CUDA graphs are not emulated")
GPT2GEN_EMU_UNSUPPORTED(cudaMallocAsync, "stream-ordered allocation is not emulated")
GPT2GEN_EMU_UNSUPPORTED(cudaFreeAsync, "stream-ordered allocation is not emulated")
