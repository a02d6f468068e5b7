// seerattn: the smoke kernel. It does nothing useful for attention; it exists
// so that the driver layer (src/cuda) can be tested end to end on a GPU:
// module loading, function lookup, launch on a caller stream, results.
#include "common.cuh"

// out[i] = v + i for every i < n (the index term lets a test tell apart
// elements written by the right thread from a plain memset).
extern "C" __global__ void seer_smoke_fill(float* out, float v, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = v + static_cast<float>(i);
    }
}
