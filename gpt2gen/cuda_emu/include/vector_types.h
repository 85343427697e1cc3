// gpt2gen cuda_emu shim for <vector_types.h>: the emulated runtime lives in the force-included prelude.
#pragma once
#include "gpt2gen_emu/prelude.hpp"
