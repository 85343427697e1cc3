// gpt2gen cuda_emu: <mma.h> is not emulated.
#error "cuda_emu: unsupported header <mma.h> (not emulated on the CPU; see docs/cuda-emulator.md)"
