// The Wan transformer's normalizations, each fused with what follows it, one block per token row, bf16 in
// and out, f32 inside (as diffusers computes them):
// - rms_norm_rope: RMSNorm across all heads of q or k with its weight, then the 3D rotary
//   embedding on interleaved pairs of each head, from a [len, head_dim] table: a row's cosines, then its sines.
// - ada_layer_norm: LayerNorm without affine parameters (two passes: mean, then variance of the centred values),
//   then the adaLN modulation `· (1 + scale) + shift`, with one shift/scale row per batch item or per token.
// - gated_residual: what follows the attention and the feed-forward, the residual stream plus the block's output
//   times its gate, `x + y · gate`, summed in f32 (one gate row per batch item or per token).
// Rows are contiguous [rows, dim], at least one row and `dim` ≥ 1; rms_norm_rope's `head_dim` is even and
// divides `dim` (so `dim` is even too). The host code refuses anything else before launching
// (crates/kinetoscope-kernels/src/shapes.rs).

#include <cuda_bf16.h>

namespace {

constexpr int THREADS = 256;

// The sum of `v` over the block; `scratch` holds one float per warp and is free again on return.
__device__ float block_sum(float v, float* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];
    __syncthreads();
    return total;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    rms_norm_rope_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ weight,
                       const float* __restrict__ cos_sin, __nv_bfloat16* __restrict__ out, int len, int dim,
                       int head_dim, float eps) {
    __shared__ float scratch[THREADS / 32];
    const long row = blockIdx.x;
    const __nv_bfloat16* xr = x + row * dim;
    __nv_bfloat16* outr = out + row * dim;

    float squares = 0.f;
    for (int i = threadIdx.x; i < dim; i += THREADS) {
        const float v = __bfloat162float(xr[i]);
        squares += v * v;
    }
    const float inv = rsqrtf(block_sum(squares, scratch) / dim + eps);

    const int half = head_dim / 2;
    const float* cos_row = cos_sin + (row % len) * head_dim;
    for (int p = threadIdx.x; p < dim / 2; p += THREADS) {
        const int i = 2 * p;
        const float a = __bfloat162float(xr[i]) * inv * __bfloat162float(weight[i]);
        const float b = __bfloat162float(xr[i + 1]) * inv * __bfloat162float(weight[i + 1]);
        const int pair = (i % head_dim) / 2;
        const float c = cos_row[pair], s = cos_row[half + pair];
        outr[i] = __float2bfloat16_rn(a * c - b * s);
        outr[i + 1] = __float2bfloat16_rn(a * s + b * c);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    ada_layer_norm_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ shift,
                        const float* __restrict__ scale, __nv_bfloat16* __restrict__ out, int len, int dim,
                        int per_token, float eps) {
    __shared__ float scratch[THREADS / 32];
    const long row = blockIdx.x;
    const __nv_bfloat16* xr = x + row * dim;
    __nv_bfloat16* outr = out + row * dim;
    const long mod = (per_token ? row : row / len) * dim;

    float sum = 0.f;
    for (int i = threadIdx.x; i < dim; i += THREADS) sum += __bfloat162float(xr[i]);
    const float mean = block_sum(sum, scratch) / dim;
    float centred = 0.f;
    for (int i = threadIdx.x; i < dim; i += THREADS) {
        const float v = __bfloat162float(xr[i]) - mean;
        centred += v * v;
    }
    const float inv = rsqrtf(block_sum(centred, scratch) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += THREADS) {
        const float normed = (__bfloat162float(xr[i]) - mean) * inv;
        outr[i] = __float2bfloat16_rn(normed * (1.f + scale[mod + i]) + shift[mod + i]);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    gated_residual_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ y,
                        const float* __restrict__ gate, __nv_bfloat16* __restrict__ out, int len, int dim,
                        int per_token) {
    const long row = blockIdx.x;
    const long offset = row * dim;
    const long mod = (per_token ? row : row / len) * dim;
    for (int i = threadIdx.x; i < dim; i += THREADS) {
        const float sum = __bfloat162float(x[offset + i]) + __bfloat162float(y[offset + i]) * gate[mod + i];
        out[offset + i] = __float2bfloat16_rn(sum);
    }
}
