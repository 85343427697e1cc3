// gpt2gen cuda_emu shim for <device_launch_parameters.h>: the emulated runtime lives in the force-included prelude.
#pragma once
#include "gpt2gen_emu/prelude.hpp"
