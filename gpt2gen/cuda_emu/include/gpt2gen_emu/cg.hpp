// gpt2gen cuda_emu: cooperative groups -- thread_block, thread_block_tile<N> (N a power of two
// up to 32), reduce / inclusive_scan / exclusive_scan and the functional operators.
#pragma once
#include "device.hpp"

namespace cooperative_groups {

class thread_block {
 public:
  void sync(GPT2GEN_EMU_SITE) const { __syncthreads(GPT2GEN_EMU_AT); }
  unsigned long long thread_rank() const {
    return ::gpt2gen_emu::tls_fiber ? ::gpt2gen_emu::tls_fiber->linear : 0;
  }
  unsigned long long size() const { return num_threads(); }
  unsigned long long num_threads() const { dim3 b = blockDim; return (unsigned long long)b.x * b.y * b.z; }
  dim3 group_index() const { return dim3(blockIdx); }
  dim3 thread_index() const { return dim3(threadIdx); }
  dim3 group_dim() const { return blockDim; }
  dim3 dim_threads() const { return blockDim; }
};
inline thread_block this_thread_block() { return thread_block(); }

class grid_group {
 public:
  unsigned long long thread_rank() const {
    dim3 b = blockDim, g = gridDim;
    uint3 bi = blockIdx;
    unsigned long long block = bi.x + (unsigned long long)g.x * (bi.y + (unsigned long long)g.y * bi.z);
    return block * b.x * b.y * b.z + ::gpt2gen_emu::tls_fiber->linear;
  }
  unsigned long long size() const { return num_threads(); }
  unsigned long long num_threads() const {
    dim3 b = blockDim, g = gridDim;
    return (unsigned long long)b.x * b.y * b.z * g.x * g.y * g.z;
  }
  template <class D = void>
  void sync() const {
    static_assert(::gpt2gen_emu::dependent_false<D>::value,
                  "cuda_emu: unsupported intrinsic grid_group::sync (needs a cooperative launch)");
  }
};
inline grid_group this_grid() { return grid_group(); }

template <unsigned N>
class thread_block_tile {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "cuda_emu: tile size must be a power of two <= 32");

 public:
  static constexpr unsigned num_threads_c = N;
  unsigned lane() const { return ::gpt2gen_emu::tls_fiber->lane; }
  unsigned mask() const {
    unsigned m = N == 32 ? 0xffffffffu : ((1u << N) - 1u);
    return N == 32 ? m : m << (lane() & ~(N - 1));
  }
  void sync(GPT2GEN_EMU_SITE) const { __syncwarp(mask(), GPT2GEN_EMU_AT); }
  unsigned long long thread_rank() const { return lane() & (N - 1); }
  unsigned long long size() const { return N; }
  unsigned long long num_threads() const { return N; }
  unsigned long long meta_group_rank() const { return ::gpt2gen_emu::tls_fiber->linear / N; }
  unsigned long long meta_group_size() const {
    dim3 b = blockDim;
    return ((unsigned long long)b.x * b.y * b.z + N - 1) / N;
  }
  template <class T>
  T shfl(T v, int src, GPT2GEN_EMU_SITE) const { return __shfl_sync(mask(), v, src, (int)N, GPT2GEN_EMU_AT); }
  template <class T>
  T shfl_up(T v, unsigned d, GPT2GEN_EMU_SITE) const { return __shfl_up_sync(mask(), v, d, (int)N, GPT2GEN_EMU_AT); }
  template <class T>
  T shfl_down(T v, unsigned d, GPT2GEN_EMU_SITE) const { return __shfl_down_sync(mask(), v, d, (int)N, GPT2GEN_EMU_AT); }
  template <class T>
  T shfl_xor(T v, int m, GPT2GEN_EMU_SITE) const { return __shfl_xor_sync(mask(), v, m, (int)N, GPT2GEN_EMU_AT); }
  int any(int p, GPT2GEN_EMU_SITE) const { return __any_sync(mask(), p, GPT2GEN_EMU_AT); }
  int all(int p, GPT2GEN_EMU_SITE) const { return __all_sync(mask(), p, GPT2GEN_EMU_AT); }
  unsigned ballot(int p, GPT2GEN_EMU_SITE) const {
    unsigned b = __ballot_sync(mask(), p, GPT2GEN_EMU_AT);
    return N == 32 ? b : (b >> (lane() & ~(N - 1))) & ((1u << N) - 1u);
  }
};

template <unsigned N, class Parent>
inline thread_block_tile<N> tiled_partition(const Parent&) { return thread_block_tile<N>(); }

template <class G>
inline void sync(const G& g, GPT2GEN_EMU_SITE) { g.sync(GPT2GEN_EMU_AT); }

template <class T = void>
struct plus { T operator()(const T& a, const T& b) const { return a + b; } };
template <class T = void>
struct less { T operator()(const T& a, const T& b) const { return b < a ? b : a; } };
template <class T = void>
struct greater { T operator()(const T& a, const T& b) const { return a < b ? b : a; } };
template <class T = void>
struct bit_and { T operator()(const T& a, const T& b) const { return a & b; } };
template <class T = void>
struct bit_or { T operator()(const T& a, const T& b) const { return a | b; } };
template <class T = void>
struct bit_xor { T operator()(const T& a, const T& b) const { return a ^ b; } };

// Butterfly reduction: every thread of the tile receives the result (as in CUDA).
template <unsigned N, class T, class Op>
inline T reduce(const thread_block_tile<N>& g, T v, Op op) {
  for (unsigned off = N / 2; off > 0; off /= 2) v = op(v, g.shfl_xor(v, (int)off));
  return v;
}
template <unsigned N, class T, class Op>
inline T inclusive_scan(const thread_block_tile<N>& g, T v, Op op) {
  unsigned r = (unsigned)g.thread_rank();
  for (unsigned d = 1; d < N; d *= 2) {
    T o = g.shfl_up(v, d);
    if (r >= d) v = op(o, v);
  }
  return v;
}
template <unsigned N, class T>
inline T inclusive_scan(const thread_block_tile<N>& g, T v) { return inclusive_scan(g, v, plus<T>()); }
template <unsigned N, class T, class Op>
inline T exclusive_scan(const thread_block_tile<N>& g, T v, Op op) {
  T inc = inclusive_scan(g, v, op);
  T prev = g.shfl_up(inc, 1);
  return g.thread_rank() == 0 ? T() : prev;
}
template <unsigned N, class T>
inline T exclusive_scan(const thread_block_tile<N>& g, T v) { return exclusive_scan(g, v, plus<T>()); }

template <class... A>
inline int coalesced_threads(A...) {
  static_assert(::gpt2gen_emu::dependent_false<A...>::value,
                "cuda_emu: unsupported intrinsic cooperative_groups::coalesced_threads");
  return 0;
}

}  // namespace cooperative_groups
