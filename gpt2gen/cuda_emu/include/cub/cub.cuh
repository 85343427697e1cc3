// gpt2gen cuda_emu: <cub/cub.cuh> is not emulated.
#error "cuda_emu: unsupported header <cub/cub.cuh> (not emulated on the CPU; see docs/cuda-emulator.md)"
