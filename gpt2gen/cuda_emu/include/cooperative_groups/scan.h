// gpt2gen cuda_emu shim for <cooperative_groups/scan.h> (implemented with the other groups).
#pragma once
#include "../cooperative_groups.h"
