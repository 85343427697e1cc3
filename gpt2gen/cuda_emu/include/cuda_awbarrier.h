// gpt2gen cuda_emu: <cuda_awbarrier.h> is not emulated.
#error "cuda_emu: unsupported header <cuda_awbarrier.h> (not emulated on the CPU; see docs/cuda-emulator.md)"
