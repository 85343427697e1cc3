// gpt2gen_abi.h — the C interface between a generated model (model.c / model.cu) and the binding.
//
// A generated model defines these functions over six flat float arenas that the caller owns:
// params, grads, m, v (one layout), acts and dacts (activation gradients). Sizes come from
// gg_arena_floats(); gg_signature() names the layout so the runtime can refuse a mismatch.
#ifndef GPT2GEN_ABI_H
#define GPT2GEN_ABI_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    float* params;
    float* grads;
    float* m;       // AdamW first moment
    float* v;       // AdamW second moment
    float* acts;
    float* dacts;
} gg_arenas;

typedef struct {
    const char* name;
    size_t offset;  // floats from the arena's start
    size_t numel;
    int decay;      // parameters: 1 if AdamW weight decay applies
} gg_tensor_entry;

const char* gg_signature(void);
size_t gg_arena_floats(int which);   // 0 = params (grads, m, v alike), 1 = acts, 2 = dacts
int gg_num_inputs(void);

// Runs the forward pass for a (B,T) batch, B <= B_MAX, T <= T_MAX. inputs[i] may be NULL only for
// optional inputs; nodes that need a missing input are skipped. Returns the mean loss, or -1.
float gg_forward(const gg_arenas* ar, const int* const* inputs, int B, int T);
// Backward of the last forward (same inputs, B, T); accumulates into the parameter gradients.
void gg_backward(const gg_arenas* ar, const int* const* inputs, int B, int T);
void gg_zero_grad(const gg_arenas* ar);
void gg_update(const gg_arenas* ar, float lr, float beta1, float beta2, float eps,
               float weight_decay, int step, float grad_scale);

#ifdef __cplusplus
}
#endif

#endif  // GPT2GEN_ABI_H
