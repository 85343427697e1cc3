// gpt2gen cuda_emu shim for <cuda_bf16.h>.
#pragma once
#include "gpt2gen_emu/prelude.hpp"
#pragma GCC visibility push(hidden)
#include "gpt2gen_emu/fp16.hpp"
#pragma GCC visibility pop
