// The feed-forward's activation fused with the bias add before it: GELU (tanh approximation, diffusers'
// `gelu-approximate`) of `x + bias`, bf16 in and out, f32 inside. `x` is the first projection's product, which
// cuBLAS computes without its bias, so the sum is rounded once, after the activation, as PyTorch's fused
// bias epilogue rounds it. Rows are contiguous [rows, cols]; one pass over memory, 8 values a thread when
// `vectorized` (the caller checked that `cols` is a multiple of 8 and both arrays start 16-byte aligned), else one.

#include <cuda_bf16.h>

namespace {

// 0.5·v·(1 + tanh(u)) written as v·sigmoid(2u) = v / (1 + e^(−2u)): the same function, without tanhf, which
// --use_fast_math turns into tanh.approx (off by about 50 bf16 ulps at v ≲ −2), and without the cancellation of
// 1 + tanh(u) where tanh(u) is near −1. e^(−2u) overflowing to infinity gives −0, GELU's limit.
__device__ __forceinline__ float gelu_tanh(float v) {
    const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);  // sqrt(2/pi)
    return v / (1.f + __expf(-2.f * inner));
}

}  // namespace

extern "C" __global__ void bias_gelu_tanh_bf16(const __nv_bfloat16* __restrict__ x,
                                               const __nv_bfloat16* __restrict__ bias,
                                               __nv_bfloat16* __restrict__ out, long n, int cols,
                                               int vectorized) {
    const long stride = (long)gridDim.x * blockDim.x;
    const long first = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vectorized) {
        // Eight values at once: one uint4 of x, of the bias and of the output.
        for (long i = first * 8; i < n; i += stride * 8) {
            const uint4 xs = *reinterpret_cast<const uint4*>(x + i);
            const uint4 bs = *reinterpret_cast<const uint4*>(bias + i % cols);
            const __nv_bfloat162* xv = reinterpret_cast<const __nv_bfloat162*>(&xs);
            const __nv_bfloat162* bv = reinterpret_cast<const __nv_bfloat162*>(&bs);
            uint4 result;
            __nv_bfloat162* rv = reinterpret_cast<__nv_bfloat162*>(&result);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 a = __bfloat1622float2(xv[k]), b = __bfloat1622float2(bv[k]);
                rv[k] = __floats2bfloat162_rn(gelu_tanh(a.x + b.x), gelu_tanh(a.y + b.y));
            }
            *reinterpret_cast<uint4*>(out + i) = result;
        }
    } else {
        for (long i = first; i < n; i += stride) {
            out[i] = __float2bfloat16_rn(gelu_tanh(__bfloat162float(x[i]) + __bfloat162float(bias[i % cols])));
        }
    }
}
