// gpt2gen cuda_emu: __half / __half2 and __nv_bfloat16 / __nv_bfloat162 with CUDA's conversion and
// rounding rules. Conversions round from the exact (double) value in the requested mode; arithmetic
// is computed in float (exact enough that the single rounding to 16 bits is correctly rounded, as
// the hardware's half/bf16 instructions are) and fma in double.
#pragma once
#include "device.hpp"

namespace gpt2gen_emu {
enum RoundMode { RN, RZ, RD, RU };

// Round a double to a binary format with EB exponent and MB mantissa bits (IEEE-like, with
// subnormals); NaN becomes the canonical 0x7fff as CUDA's conversions produce.
template <int EB, int MB>
inline uint16_t round_to(double d, RoundMode mode) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  uint16_t sign = (uint16_t)((u >> 63) << (EB + MB));
  bool neg = (u >> 63) != 0;
  int exp = (int)((u >> 52) & 0x7ff);
  uint64_t man = u & ((1ull << 52) - 1);
  const int bias = (1 << (EB - 1)) - 1, emin = 1 - bias, emax = bias;
  const uint16_t inf = (uint16_t)(((1u << EB) - 1) << MB), maxfin = (uint16_t)(inf - 1);
  if (exp == 0x7ff) return man ? (uint16_t)0x7fff : (uint16_t)(sign | inf);
  if (exp == 0 && man == 0) return sign;
  int e = exp ? exp - 1023 : -1022;
  uint64_t full = exp ? (man | (1ull << 52)) : man;
  if (!exp) {  // normalise a double subnormal
    while (!(full & (1ull << 52))) { full <<= 1; --e; }
  }
  auto overflow = [&]() -> uint16_t {
    if (mode == RN) return sign | inf;
    if (mode == RZ) return sign | maxfin;
    if (mode == RU) return neg ? (uint16_t)(sign | maxfin) : inf;
    return neg ? (uint16_t)(sign | inf) : maxfin;
  };
  if (e > emax) return overflow();
  int shift;
  int he;
  if (e >= emin) { shift = 52 - MB; he = e + bias; }
  else { shift = 52 - MB + (emin - e); he = 0; }
  uint64_t q, rem, half;
  if (shift >= 64) { q = 0; rem = full; half = ~0ull; }  // far below the smallest subnormal
  else { q = full >> shift; rem = full & ((1ull << shift) - 1); half = 1ull << (shift - 1); }
  bool up = false;
  if (rem) {
    if (mode == RN) up = rem > half || (rem == half && (q & 1));
    else if (mode == RU) up = !neg;
    else if (mode == RD) up = neg;
  }
  if (shift >= 64 && mode == RN) up = false;
  q += up;
  uint64_t bits;
  if (he == 0) bits = q;  // subnormal (q may carry into the smallest normal: still correct)
  else {
    if (q >> (MB + 1)) { q >>= 1; ++he; }
    if (he > 2 * bias) return overflow();
    bits = ((uint64_t)he << MB) | (q & ((1ull << MB) - 1));
  }
  return (uint16_t)(sign | bits);
}
inline float half_bits_to_float(uint16_t h) {
  uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t u;
  if (e == 0x1f) u = s | 0x7f800000u | (m << 13);
  else if (e == 0) {
    if (m == 0) u = s;
    else {  // subnormal: value = m * 2^-24
      float f = (float)m * 5.9604644775390625e-8f;
      return (h >> 15) ? -f : f;
    }
  } else u = s | ((e + 112) << 23) | (m << 13);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float bf16_bits_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f2h(double x, RoundMode m = RN) { return round_to<5, 10>(x, m); }
inline uint16_t f2bf(double x, RoundMode m = RN) { return round_to<8, 7>(x, m); }
}  // namespace gpt2gen_emu

// The CUDA number types are the user's types: default visibility, so an extern "C" function taking them is
// exported (the rest of the emulator is hidden, see prelude.hpp).
struct __attribute__((visibility("default"))) __half_raw { unsigned short x; };
struct __attribute__((visibility("default"))) __nv_bfloat16_raw { unsigned short x; };

struct __attribute__((visibility("default"), aligned(2))) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}
  __half(float f) : __x(gpt2gen_emu::f2h(f)) {}
  __half(double f) : __x(gpt2gen_emu::f2h(f)) {}
  __half(int v) : __x(gpt2gen_emu::f2h((double)v)) {}
  __half(unsigned v) : __x(gpt2gen_emu::f2h((double)v)) {}
  __half(short v) : __x(gpt2gen_emu::f2h((double)v)) {}
  __half(unsigned short v) : __x(gpt2gen_emu::f2h((double)v)) {}
  __half(long long v) : __x(gpt2gen_emu::f2h((double)v)) {}
  __half(unsigned long long v) : __x(gpt2gen_emu::f2h((double)v)) {}
  __half& operator=(const __half_raw& r) { __x = r.x; return *this; }
  __half& operator=(float f) { __x = gpt2gen_emu::f2h(f); return *this; }
  __half& operator=(double f) { __x = gpt2gen_emu::f2h(f); return *this; }
  operator float() const { return gpt2gen_emu::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct __attribute__((visibility("default"), aligned(2))) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(gpt2gen_emu::f2bf(f)) {}
  __nv_bfloat16(double f) : __x(gpt2gen_emu::f2bf(f)) {}
  __nv_bfloat16(int v) : __x(gpt2gen_emu::f2bf((double)v)) {}
  __nv_bfloat16(unsigned v) : __x(gpt2gen_emu::f2bf((double)v)) {}
  __nv_bfloat16(short v) : __x(gpt2gen_emu::f2bf((double)v)) {}
  __nv_bfloat16(unsigned short v) : __x(gpt2gen_emu::f2bf((double)v)) {}
  __nv_bfloat16(long long v) : __x(gpt2gen_emu::f2bf((double)v)) {}
  __nv_bfloat16(unsigned long long v) : __x(gpt2gen_emu::f2bf((double)v)) {}
  __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) { __x = r.x; return *this; }
  __nv_bfloat16& operator=(float f) { __x = gpt2gen_emu::f2bf(f); return *this; }
  __nv_bfloat16& operator=(double f) { __x = gpt2gen_emu::f2bf(f); return *this; }
  operator float() const { return gpt2gen_emu::bf16_bits_to_float(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};

struct __attribute__((visibility("default"), aligned(4))) __half2 {
  __half x, y;
  __half2() = default;
  constexpr __half2(const __half& a, const __half& b) : x(a), y(b) {}
};
struct __attribute__((visibility("default"), aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  constexpr __nv_bfloat162(const __nv_bfloat16& a, const __nv_bfloat16& b) : x(a), y(b) {}
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;
struct __attribute__((visibility("default"))) __half2_raw { unsigned short x, y; };
struct __attribute__((visibility("default"))) __nv_bfloat162_raw { unsigned short x, y; };

// ---------------------------------------------------------------- conversions: half
inline float __half2float(__half h) { return (float)h; }
inline __half __float2half(float f) { return __half_raw{gpt2gen_emu::f2h(f)}; }
inline __half __float2half_rn(float f) { return __half_raw{gpt2gen_emu::f2h(f)}; }
inline __half __float2half_rz(float f) { return __half_raw{gpt2gen_emu::f2h(f, gpt2gen_emu::RZ)}; }
inline __half __float2half_rd(float f) { return __half_raw{gpt2gen_emu::f2h(f, gpt2gen_emu::RD)}; }
inline __half __float2half_ru(float f) { return __half_raw{gpt2gen_emu::f2h(f, gpt2gen_emu::RU)}; }
inline __half __double2half(double f) { return __half_raw{gpt2gen_emu::f2h(f)}; }
inline __half __int2half_rn(int v) { return __half_raw{gpt2gen_emu::f2h((double)v)}; }
inline __half __uint2half_rn(unsigned v) { return __half_raw{gpt2gen_emu::f2h((double)v)}; }
inline int __half2int_rn(__half h) { return (int)lrintf((float)h); }
inline int __half2int_rz(__half h) { return (int)(float)h; }
inline unsigned __half2uint_rn(__half h) { return (unsigned)llrintf((float)h); }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __short_as_half(short v) { return __half_raw{(unsigned short)v}; }
inline __half __ushort_as_half(unsigned short v) { return __half_raw{v}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__float2half(a), __float2half(b)); }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline float2 __half22float2(__half2 v) { return make_float2((float)v.x, (float)v.y); }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline __half __low2half(__half2 v) { return v.x; }
inline __half __high2half(__half2 v) { return v.y; }
inline float __low2float(__half2 v) { return (float)v.x; }
inline float __high2float(__half2 v) { return (float)v.y; }
inline __half2 __lows2half2(__half2 a, __half2 b) { return __half2(a.x, b.x); }
inline __half2 __highs2half2(__half2 a, __half2 b) { return __half2(a.y, b.y); }
inline __half2 __lowhigh2highlow(__half2 a) { return __half2(a.y, a.x); }
inline __half2 __low2half2(__half2 a) { return __half2(a.x, a.x); }
inline __half2 __high2half2(__half2 a) { return __half2(a.y, a.y); }

// ---------------------------------------------------------------- conversions: bfloat16
inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16_raw{gpt2gen_emu::f2bf(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16_raw{gpt2gen_emu::f2bf(f)}; }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return __nv_bfloat16_raw{gpt2gen_emu::f2bf(f, gpt2gen_emu::RZ)}; }
inline __nv_bfloat16 __float2bfloat16_rd(float f) { return __nv_bfloat16_raw{gpt2gen_emu::f2bf(f, gpt2gen_emu::RD)}; }
inline __nv_bfloat16 __float2bfloat16_ru(float f) { return __nv_bfloat16_raw{gpt2gen_emu::f2bf(f, gpt2gen_emu::RU)}; }
inline __nv_bfloat16 __double2bfloat16(double f) { return __nv_bfloat16_raw{gpt2gen_emu::f2bf(f)}; }
inline __nv_bfloat16 __int2bfloat16_rn(int v) { return __nv_bfloat16_raw{gpt2gen_emu::f2bf((double)v)}; }
inline int __bfloat162int_rn(__nv_bfloat16 h) { return (int)lrintf((float)h); }
inline int __bfloat162int_rz(__nv_bfloat16 h) { return (int)(float)h; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __short_as_bfloat16(short v) { return __nv_bfloat16_raw{(unsigned short)v}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16_raw{v}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162(__float2bfloat16(a), __float2bfloat16(b)); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return make_float2((float)v.x, (float)v.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline float __low2float(__nv_bfloat162 v) { return (float)v.x; }
inline float __high2float(__nv_bfloat162 v) { return (float)v.y; }
inline __nv_bfloat162 __lows2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.x, b.x); }
inline __nv_bfloat162 __highs2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.y, b.y); }
inline __nv_bfloat162 __lowhigh2highlow(__nv_bfloat162 a) { return __nv_bfloat162(a.y, a.x); }
inline __nv_bfloat162 __low2bfloat162(__nv_bfloat162 a) { return __nv_bfloat162(a.x, a.x); }
inline __nv_bfloat162 __high2bfloat162(__nv_bfloat162 a) { return __nv_bfloat162(a.y, a.y); }

// ---------------------------------------------------------------- arithmetic shared by both types
#define GPT2GEN_EMU_H_OPS(H, H2)                                                                      \
  inline H __hadd(H a, H b) { return H((float)a + (float)b); }                                           \
  inline H __hsub(H a, H b) { return H((float)a - (float)b); }                                           \
  inline H __hmul(H a, H b) { return H((float)a * (float)b); }                                           \
  inline H __hdiv(H a, H b) { return H((float)a / (float)b); }                                           \
  inline H __hadd_sat(H a, H b) { float r = (float)a + (float)b; return H(r != r ? 0.0f : r < 0 ? 0.0f : r > 1 ? 1.0f : r); } \
  inline H __hmul_sat(H a, H b) { float r = (float)a * (float)b; return H(r != r ? 0.0f : r < 0 ? 0.0f : r > 1 ? 1.0f : r); } \
  inline H __hfma(H a, H b, H c) { return H(fma((double)(float)a, (double)(float)b, (double)(float)c)); } \
  inline H __hfma_relu(H a, H b, H c) { double r = fma((double)(float)a, (double)(float)b, (double)(float)c); return H(r < 0 ? 0.0 : r); } \
  inline H __hneg(H a) { H r = a; r.__x ^= 0x8000; return r; }                                           \
  inline H __habs(H a) { H r = a; r.__x &= 0x7fff; return r; }                                           \
  inline H __hmax(H a, H b) { return H(fmaxf((float)a, (float)b)); }                                     \
  inline H __hmin(H a, H b) { return H(fminf((float)a, (float)b)); }                                     \
  inline H __hmax_nan(H a, H b) { float x = a, y = b; return (x != x || y != y) ? H(NAN) : H(fmaxf(x, y)); } \
  inline H __hmin_nan(H a, H b) { float x = a, y = b; return (x != x || y != y) ? H(NAN) : H(fminf(x, y)); } \
  inline bool __heq(H a, H b) { return (float)a == (float)b; }                                           \
  inline bool __hne(H a, H b) { return (float)a != (float)b && (float)a == (float)a && (float)b == (float)b; } \
  inline bool __hlt(H a, H b) { return (float)a < (float)b; }                                            \
  inline bool __hle(H a, H b) { return (float)a <= (float)b; }                                           \
  inline bool __hgt(H a, H b) { return (float)a > (float)b; }                                            \
  inline bool __hge(H a, H b) { return (float)a >= (float)b; }                                           \
  inline bool __hneu(H a, H b) { return !__heq(a, b); }                                                \
  inline bool __hisnan(H a) { return (float)a != (float)a; }                                             \
  inline int __hisinf(H a) { float x = a; return std::isinf(x) ? (x > 0 ? 1 : -1) : 0; }                \
  inline H hsqrt(H a) { return H(sqrtf((float)a)); }                                                     \
  inline H hrsqrt(H a) { return H(1.0f / sqrtf((float)a)); }                                             \
  inline H hrcp(H a) { return H(1.0f / (float)a); }                                                      \
  inline H hexp(H a) { return H(expf((float)a)); }                                                       \
  inline H hexp2(H a) { return H(exp2f((float)a)); }                                                     \
  inline H hexp10(H a) { return H(exp10f((float)a)); }                                                   \
  inline H hlog(H a) { return H(logf((float)a)); }                                                       \
  inline H hlog2(H a) { return H(log2f((float)a)); }                                                     \
  inline H hlog10(H a) { return H(log10f((float)a)); }                                                   \
  inline H hsin(H a) { return H(sinf((float)a)); }                                                       \
  inline H hcos(H a) { return H(cosf((float)a)); }                                                       \
  inline H htanh(H a) { return H(tanhf((float)a)); }                                                     \
  inline H hfloor(H a) { return H(floorf((float)a)); }                                                   \
  inline H hceil(H a) { return H(ceilf((float)a)); }                                                     \
  inline H htrunc(H a) { return H(truncf((float)a)); }                                                   \
  inline H hrint(H a) { return H(rintf((float)a)); }                                                     \
  inline H operator+(const H& a, const H& b) { return __hadd(a, b); }                                    \
  inline H operator-(const H& a, const H& b) { return __hsub(a, b); }                                    \
  inline H operator*(const H& a, const H& b) { return __hmul(a, b); }                                    \
  inline H operator/(const H& a, const H& b) { return __hdiv(a, b); }                                    \
  inline H& operator+=(H& a, const H& b) { a = __hadd(a, b); return a; }                                 \
  inline H& operator-=(H& a, const H& b) { a = __hsub(a, b); return a; }                                 \
  inline H& operator*=(H& a, const H& b) { a = __hmul(a, b); return a; }                                 \
  inline H& operator/=(H& a, const H& b) { a = __hdiv(a, b); return a; }                                 \
  inline H operator+(const H& a) { return a; }                                                           \
  inline H operator-(const H& a) { return __hneg(a); }                                                   \
  inline H& operator++(H& a) { a = __hadd(a, H(1.0f)); return a; }                                       \
  inline H& operator--(H& a) { a = __hsub(a, H(1.0f)); return a; }                                       \
  inline H operator++(H& a, int) { H r = a; ++a; return r; }                                             \
  inline H operator--(H& a, int) { H r = a; --a; return r; }                                             \
  inline bool operator==(const H& a, const H& b) { return __heq(a, b); }                                 \
  inline bool operator!=(const H& a, const H& b) { return !__heq(a, b); }                                   \
  inline bool operator<(const H& a, const H& b) { return __hlt(a, b); }                                  \
  inline bool operator<=(const H& a, const H& b) { return __hle(a, b); }                                 \
  inline bool operator>(const H& a, const H& b) { return __hgt(a, b); }                                  \
  inline bool operator>=(const H& a, const H& b) { return __hge(a, b); }                                 \
  inline H2 __hadd2(H2 a, H2 b) { return H2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }                      \
  inline H2 __hsub2(H2 a, H2 b) { return H2(__hsub(a.x, b.x), __hsub(a.y, b.y)); }                      \
  inline H2 __hmul2(H2 a, H2 b) { return H2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }                      \
  inline H2 __h2div(H2 a, H2 b) { return H2(__hdiv(a.x, b.x), __hdiv(a.y, b.y)); }                      \
  inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }      \
  inline H2 __hneg2(H2 a) { return H2(__hneg(a.x), __hneg(a.y)); }                                       \
  inline H2 __habs2(H2 a) { return H2(__habs(a.x), __habs(a.y)); }                                       \
  inline H2 __hmax2(H2 a, H2 b) { return H2(__hmax(a.x, b.x), __hmax(a.y, b.y)); }                      \
  inline H2 __hmin2(H2 a, H2 b) { return H2(__hmin(a.x, b.x), __hmin(a.y, b.y)); }                      \
  inline H2 h2sqrt(H2 a) { return H2(hsqrt(a.x), hsqrt(a.y)); }                                          \
  inline H2 h2exp(H2 a) { return H2(hexp(a.x), hexp(a.y)); }                                             \
  inline H2 operator+(const H2& a, const H2& b) { return __hadd2(a, b); }                                \
  inline H2 operator-(const H2& a, const H2& b) { return __hsub2(a, b); }                                \
  inline H2 operator*(const H2& a, const H2& b) { return __hmul2(a, b); }                                \
  inline H2 operator/(const H2& a, const H2& b) { return __h2div(a, b); }                                \
  inline H2& operator+=(H2& a, const H2& b) { a = __hadd2(a, b); return a; }                             \
  inline H2& operator-=(H2& a, const H2& b) { a = __hsub2(a, b); return a; }                             \
  inline H2& operator*=(H2& a, const H2& b) { a = __hmul2(a, b); return a; }                             \
  inline H2 operator-(const H2& a) { return __hneg2(a); }                                                \
  inline bool operator==(const H2& a, const H2& b) { return a.x == b.x && a.y == b.y; }                  \
  inline bool operator!=(const H2& a, const H2& b) { return !(a == b); }                                 \
  inline H atomicAdd(H* p, H v) {                                                                        \
    return gpt2gen_emu::atomic_update<H, uint16_t>(p, [v](H o) { return __hadd(o, v); });               \
  }                                                                                                      \
  inline H2 atomicAdd(H2* p, H2 v) {                                                                     \
    return gpt2gen_emu::atomic_update<H2, uint32_t>(p, [v](H2 o) { return __hadd2(o, v); });            \
  }

GPT2GEN_EMU_H_OPS(__half, __half2)
GPT2GEN_EMU_H_OPS(__nv_bfloat16, __nv_bfloat162)
#undef GPT2GEN_EMU_H_OPS

#define CUDART_INF_FP16 __ushort_as_half((unsigned short)0x7C00U)
#define CUDART_NAN_FP16 __ushort_as_half((unsigned short)0x7FFFU)
#define CUDART_MAX_NORMAL_FP16 __ushort_as_half((unsigned short)0x7BFFU)
#define CUDART_ONE_FP16 __ushort_as_half((unsigned short)0x3C00U)
#define CUDART_ZERO_FP16 __ushort_as_half((unsigned short)0x0000U)
#define CUDART_INF_BF16 __ushort_as_bfloat16((unsigned short)0x7F80U)
#define CUDART_NAN_BF16 __ushort_as_bfloat16((unsigned short)0x7FFFU)
#define CUDART_MAX_NORMAL_BF16 __ushort_as_bfloat16((unsigned short)0x7F7FU)
#define CUDART_ONE_BF16 __ushort_as_bfloat16((unsigned short)0x3F80U)
#define CUDART_ZERO_BF16 __ushort_as_bfloat16((unsigned short)0x0000U)
