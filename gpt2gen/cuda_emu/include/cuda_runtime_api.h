// gpt2gen cuda_emu shim for <cuda_runtime_api.h>: the emulated runtime lives in the force-included prelude.
#pragma once
#include "gpt2gen_emu/prelude.hpp"
