// gpt2gen cuda_emu shim for <cooperative_groups/reduce.h> (implemented with the other groups).
#pragma once
#include "../cooperative_groups.h"
