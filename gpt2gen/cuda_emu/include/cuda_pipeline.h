// gpt2gen cuda_emu: <cuda_pipeline.h> is not emulated.
#error "cuda_emu: unsupported header <cuda_pipeline.h> (not emulated on the CPU; see docs/cuda-emulator.md)"
