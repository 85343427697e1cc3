// gpt2gen_abi.h — the C interface between a generated model (model.c / model.cu) and the binding.
//
// A generated model defines these functions over flat arenas that the caller owns (on the CUDA target, device
// memory the model allocates for it: gg_alloc / gg_free in model.cu): params and grads
// (one layout, the precision's storage type), m and v (AdamW's moments, fp32, the same layout in
// elements), master (fp32 master weights, in mixed precision only; NULL otherwise), acts and dacts
// (activations and their gradients), cache (the decode program's keys and values). Sizes come from gg_arena_bytes(); gg_signature() names the layout
// so the runtime can refuse a mismatch.
#ifndef GPT2GEN_ABI_H
#define GPT2GEN_ABI_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    void* params;
    void* grads;
    void* master;   // fp32 master weights (mixed precision), or NULL
    void* m;        // AdamW first moment, fp32
    void* v;        // AdamW second moment, fp32
    void* acts;
    void* dacts;
    void* cache;    // the decode program's KV cache (training never touches it)
} gg_arenas;

enum { GG_F32 = 0, GG_BF16 = 1, GG_F16 = 2, GG_I32 = 3 };   // a tensor's storage dtype
enum { GG_ARENA_PARAMS = 0, GG_ARENA_ACTS = 1, GG_ARENA_DACTS = 2, GG_ARENA_MOMENTS = 3, GG_ARENA_MASTER = 4,
       GG_ARENA_CACHE = 5 };

typedef struct {
    const char* name;
    size_t offset;  // elements of the arena's own type from its start
    size_t numel;
    int decay;      // parameters: 1 if AdamW weight decay applies
    int dtype;      // GG_F32, GG_BF16, ...
} gg_tensor_entry;

const char* gg_signature(void);
size_t gg_arena_bytes(int which);    // GG_ARENA_*: params (grads alike), acts, dacts, moments (m, v alike), master, cache
int gg_num_inputs(void);

// Runs the forward pass for a (B,T) batch, B <= B_MAX, T <= T_MAX. inputs[i] may be NULL only for
// optional inputs; nodes that need a missing input are skipped. Returns the mean loss, or -1.
float gg_forward(const gg_arenas* ar, const int* const* inputs, int B, int T);
// Backward of the last forward (same inputs, B, T); accumulates into the parameter gradients the
// gradient of loss_scale x the mean loss (1 without loss scaling).
void gg_backward(const gg_arenas* ar, const int* const* inputs, int B, int T, float loss_scale);
void gg_zero_grad(const gg_arenas* ar);
// One AdamW step on grad_scale x the gradients. Returns 1 if taken; a model built with dynamic loss
// scaling returns 0, touching nothing, when any gradient is inf or nan.
int gg_update(const gg_arenas* ar, float lr, float beta1, float beta2, float eps,
              float weight_decay, int step, float grad_scale);
// The decode program: one sequence (B = 1), a chunk of T <= T_MAX new tokens at positions pos0 .. pos0+T-1
// (pos0 + T <= gg_decode_positions()), over the KV cache arena, which holds the positions before pos0 of the
// same sequence (from earlier calls) and gets the chunk's. Writes the chunk's logits where gg_forward does.
// inputs as gg_forward's, each of T values (optional ones NULL).
void gg_decode(const gg_arenas* ar, const int* const* inputs, int T, int pos0);
int gg_decode_positions(void);
// The error the model recorded in the last calls (a failed CUDA call or kernel, a cuBLASLt status), or NULL;
// reading it clears it. The CPU target records none. The binding raises it after every call.
const char* gg_error(void);

#ifdef __cplusplus
}
#endif

#endif  // GPT2GEN_ABI_H
