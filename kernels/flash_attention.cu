// Flash attention forward (FlashAttention-2's algorithm: Dao, 2023, https://arxiv.org/abs/2307.08691):
// O = softmax(Q·Kᵀ·scale)·V, non-causal, no mask, bf16 in and out, f32 accumulation and softmax, without
// ever materializing the Lq×Lk score matrix. Wan's self-attention at 832×480×81 frames is 32,760 tokens: the
// scores alone would be 26 GB in bf16.
//
// One block computes BLOCK_M = 16·WARPS query rows of one (batch, head); each warp owns 16 rows and keeps their
// output, running max and running sum in registers. The block walks the keys in tiles of BLOCK_N, staged in
// shared memory. Products use the tensor cores through `mma.sync.aligned.m16n8k16` (bf16 in, f32 out), whose
// register layouts are fixed by the PTX ISA, so that the scores of S = Q·Kᵀ come out exactly in the layout the
// A operand of P·V needs (FlashAttention-2's register reuse), and every element's row is known for the
// row-wise softmax. Needs sm_80 or newer.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", .bf16), lane = 4·g + t (g = lane / 4,
// t = lane % 4):
//   A (16×16, row major), four .b32 registers of two bf16 each:
//     a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16×8, "col": indexed [k][n]), two registers:
//     b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C, D (16×8, f32), four floats:
//     c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
//
// Tensors are [batch, heads, len, head_dim] with any batch, head and row strides (in elements, multiples of 8)
// and the head dimension contiguous; the output is contiguous [batch, heads, q_len, head_dim].

#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int WARPS = 4;
constexpr int BLOCK_M = 16 * WARPS;
constexpr int BLOCK_N = 64;
// Padding of each shared-memory row, in bf16: keeps 16-byte alignment and spreads rows over the banks.
constexpr int PAD = 8;

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_raw(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&lo)) |
           (static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&hi)) << 16);
}

// d[0..4] += A·B for one m16n8k16 tile.
__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Copies `rows` valid rows (of BLOCK_N) of a [len, D] tile starting at `src` (row stride `stride`) into shared
// memory, 16 bytes at a time; rows past the end are zeros.
template <int D>
__device__ __forceinline__ void load_tile(__nv_bfloat16 (*dst)[D + PAD], const __nv_bfloat16* src, long stride,
                                          int rows) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < BLOCK_N * CHUNKS; i += WARPS * 32) {
        const int row = i / CHUNKS, chunk = i % CHUNKS;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (row < rows) value = *reinterpret_cast<const uint4*>(src + row * stride + chunk * 8);
        *reinterpret_cast<uint4*>(&dst[row][chunk * 8]) = value;
    }
}

template <int D>
__device__ void flash_attention(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out, int heads,
                                int q_len, int k_len, long q_batch_stride, long q_head_stride, long q_row_stride,
                                long k_batch_stride, long k_head_stride, long k_row_stride, long v_batch_stride,
                                long v_head_stride, long v_row_stride, float scale_log2) {
    __shared__ __align__(16) __nv_bfloat16 k_tile[BLOCK_N][D + PAD];
    __shared__ __align__(16) __nv_bfloat16 v_tile[BLOCK_N][D + PAD];

    const int batch = blockIdx.y / heads, head = blockIdx.y % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int row0 = blockIdx.x * BLOCK_M + warp * 16;  // this warp's first query row
    q += batch * q_batch_stride + head * q_head_stride;
    k += batch * k_batch_stride + head * k_head_stride;
    v += batch * v_batch_stride + head * v_head_stride;

    // The warp's 16 query rows as A fragments, one per 16 columns of the head dimension; rows past q_len are 0.
    uint32_t q_frag[D / 16][4];
    {
        const int r_lo = row0 + g, r_hi = row0 + g + 8;
        for (int kk = 0; kk < D / 16; ++kk) {
            const int c = kk * 16 + 2 * t;
            auto pair = [&](int r, int col) -> uint32_t {
                if (r >= q_len) return 0u;
                return *reinterpret_cast<const uint32_t*>(q + r * q_row_stride + col);
            };
            q_frag[kk][0] = pair(r_lo, c);
            q_frag[kk][1] = pair(r_hi, c);
            q_frag[kk][2] = pair(r_lo, c + 8);
            q_frag[kk][3] = pair(r_hi, c + 8);
        }
    }

    float o[D / 8][4];
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    // Running max (in log2 units, scale applied) and this thread's share of the running sum, for rows g, g+8.
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

    for (int key0 = 0; key0 < k_len; key0 += BLOCK_N) {
        const int rows = min(BLOCK_N, k_len - key0);
        __syncthreads();  // the previous tile is no longer read
        load_tile<D>(k_tile, k + key0 * k_row_stride, k_row_stride, rows);
        load_tile<D>(v_tile, v + key0 * v_row_stride, v_row_stride, rows);
        __syncthreads();

        // S = Q·Kᵀ for the warp's 16 rows and the tile's BLOCK_N keys, eight keys per n-tile.
        float s[BLOCK_N / 8][4];
        for (int j = 0; j < BLOCK_N / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            const int key = j * 8 + g;  // B[k][n] = K[key n][dim k]
            for (int kk = 0; kk < D / 16; ++kk) {
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&k_tile[key][kk * 16 + 2 * t]);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&k_tile[key][kk * 16 + 2 * t + 8]);
                mma_bf16(s[j], q_frag[kk], b0, b1);
            }
        }

        // Online softmax in base 2: scale, mask the keys past k_len, new row maxima over the quad of lanes
        // that share a row, rescale what was accumulated, exponentiate.
        float tile_lo = -INFINITY, tile_hi = -INFINITY;
        for (int j = 0; j < BLOCK_N / 8; ++j) {
            const int col = j * 8 + 2 * t;
            for (int e = 0; e < 4; ++e) {
                const bool valid = col + (e & 1) < rows;
                s[j][e] = valid ? s[j][e] * scale_log2 : -INFINITY;
            }
            tile_lo = fmaxf(tile_lo, fmaxf(s[j][0], s[j][1]));
            tile_hi = fmaxf(tile_hi, fmaxf(s[j][2], s[j][3]));
        }
        for (int offset = 1; offset < 4; offset <<= 1) {
            tile_lo = fmaxf(tile_lo, __shfl_xor_sync(0xffffffff, tile_lo, offset));
            tile_hi = fmaxf(tile_hi, __shfl_xor_sync(0xffffffff, tile_hi, offset));
        }
        // A row with no valid key so far (a tile past k_len, or a mask that hides every key) keeps a maximum of
        // -inf; measuring against 0 instead keeps exp2f(-inf - -inf) from making NaN: its scores and its
        // rescale factor are then exp2f(-inf) = 0, and the row waits for a tile with a valid key.
        const float new_lo = fmaxf(m_lo, tile_lo), new_hi = fmaxf(m_hi, tile_hi);
        const float ref_lo = new_lo == -INFINITY ? 0.f : new_lo, ref_hi = new_hi == -INFINITY ? 0.f : new_hi;
        const float alpha_lo = exp2f(m_lo - ref_lo), alpha_hi = exp2f(m_hi - ref_hi);
        m_lo = new_lo;
        m_hi = new_hi;
        l_lo *= alpha_lo;
        l_hi *= alpha_hi;
        for (int j = 0; j < D / 8; ++j) {
            o[j][0] *= alpha_lo;
            o[j][1] *= alpha_lo;
            o[j][2] *= alpha_hi;
            o[j][3] *= alpha_hi;
        }
        for (int j = 0; j < BLOCK_N / 8; ++j) {
            s[j][0] = exp2f(s[j][0] - ref_lo);
            s[j][1] = exp2f(s[j][1] - ref_lo);
            s[j][2] = exp2f(s[j][2] - ref_hi);
            s[j][3] = exp2f(s[j][3] - ref_hi);
            l_lo += s[j][0] + s[j][1];
            l_hi += s[j][2] + s[j][3];
        }

        // O += P·V: the scores of n-tiles 2i and 2i+1 are the A fragment of keys 16i..16i+16.
        for (int i = 0; i < BLOCK_N / 16; ++i) {
            const uint32_t p[4] = {
                pack_bf16(s[2 * i][0], s[2 * i][1]),
                pack_bf16(s[2 * i][2], s[2 * i][3]),
                pack_bf16(s[2 * i + 1][0], s[2 * i + 1][1]),
                pack_bf16(s[2 * i + 1][2], s[2 * i + 1][3]),
            };
            const int key = i * 16 + 2 * t;  // B[k][n] = V[key k][dim n]
            for (int j = 0; j < D / 8; ++j) {
                const int dim = j * 8 + g;
                const uint32_t b0 = pack_raw(v_tile[key][dim], v_tile[key + 1][dim]);
                const uint32_t b1 = pack_raw(v_tile[key + 8][dim], v_tile[key + 9][dim]);
                mma_bf16(o[j], p, b0, b1);
            }
        }
    }

    // The row sums are spread over the quad; then O / l, stored as bf16 pairs. A row that never saw a valid key
    // (none today: k_len > 0 and every tile has one) has l = 0 and o = 0, and is written as zeros, not 0·inf = NaN.
    for (int offset = 1; offset < 4; offset <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffff, l_lo, offset);
        l_hi += __shfl_xor_sync(0xffffffff, l_hi, offset);
    }
    const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f, inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
    __nv_bfloat16* o_head = out + (static_cast<long>(blockIdx.y) * q_len) * D;
    const int r_lo = row0 + g, r_hi = row0 + g + 8;
    for (int j = 0; j < D / 8; ++j) {
        const int col = j * 8 + 2 * t;
        if (r_lo < q_len)
            *reinterpret_cast<uint32_t*>(o_head + static_cast<long>(r_lo) * D + col) =
                pack_bf16(o[j][0] * inv_lo, o[j][1] * inv_lo);
        if (r_hi < q_len)
            *reinterpret_cast<uint32_t*>(o_head + static_cast<long>(r_hi) * D + col) =
                pack_bf16(o[j][2] * inv_hi, o[j][3] * inv_hi);
    }
}

}  // namespace

#define FLASH_ATTENTION(D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                         \
        flash_attention_bf16_d##D(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,           \
                                  __nv_bfloat16* out, int heads, int q_len, int k_len, long q_batch_stride,          \
                                  long q_head_stride, long q_row_stride, long k_batch_stride, long k_head_stride,    \
                                  long k_row_stride, long v_batch_stride, long v_head_stride, long v_row_stride,     \
                                  float scale_log2) {                                                                \
        flash_attention<D>(q, k, v, out, heads, q_len, k_len, q_batch_stride, q_head_stride, q_row_stride,           \
                           k_batch_stride, k_head_stride, k_row_stride, v_batch_stride, v_head_stride,               \
                           v_row_stride, scale_log2);                                                                \
    }

FLASH_ATTENTION(64)
FLASH_ATTENTION(128)
