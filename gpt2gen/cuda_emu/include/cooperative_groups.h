// gpt2gen cuda_emu shim for <cooperative_groups.h>.
#pragma once
#include "gpt2gen_emu/prelude.hpp"
#pragma GCC visibility push(hidden)
#include "gpt2gen_emu/cg.hpp"
#pragma GCC visibility pop
