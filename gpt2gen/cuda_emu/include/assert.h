/* gpt2gen cuda_emu shim for <assert.h>: a failed assert() inside a kernel is reported as a
   device-side assertion (naming kernel, block and thread) instead of aborting the process.
   Deliberately no include guard: <assert.h> may be included again with NDEBUG changed. */
#include_next <assert.h>
#ifdef __cplusplus
#ifndef NDEBUG
namespace gpt2gen_emu {
__attribute__((visibility("hidden"))) void assert_fail(const char* expr, const char* file, int line, const char* func);
}
#undef assert
#define assert(e) ((e) ? (void)0 : ::gpt2gen_emu::assert_fail(#e, __FILE__, __LINE__, __func__))
#endif
#endif
