//! A CPU emulation of `kernels/flash_attention.cu`, lane by lane, that CI runs without a GPU: whether each lane's
//! registers hold the rows and columns `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` expects, whether the
//! shared- and global-memory accesses cover every tile exactly once, and whether whole emulated blocks compute
//! attention.
//!
//! Two halves, written apart:
//! - the instruction, from the PTX ISA's tables ("Matrix Fragments for mma.m16n8k16 with floating point type",
//!   .bf16 A and B, f32 C and D), in [`isa_a`], [`isa_b`], [`isa_c`] and [`mma`];
//! - the kernel, its index expressions transliterated one by one, each quoted beside its transliteration as
//!   `[cu:LINE] `expression`` (a line of `kernels/flash_attention.cu`; `[rs:LINE]` for `src/flash_attention.rs`).
//!   `quoted_kernel_expressions_stand_on_their_lines` checks every quote against the source, so an edit that
//!   changes or moves one of them fails here until this emulation has been compared with it again.
//!
//! Every emulated 4-byte and 16-byte access checks its alignment and every index its bounds (a memcheck of
//! sorts); the shared tiles count their writes and reads and are checked after every step.

#![allow(clippy::needless_range_loop)] // loops written as the kernel's, index by index, to compare them

use half::bf16;

const LANES: usize = 32;
const WARPS: usize = 4; // [cu:30] `constexpr int WARPS = 4;`
const BLOCK_M: usize = 16 * WARPS; // [cu:31] `constexpr int BLOCK_M = 16 * WARPS;`
const BLOCK_N: usize = 64; // [cu:32] `constexpr int BLOCK_N = 64;`
const PAD: usize = 8; // [cu:34] `constexpr int PAD = 8;`

// ---------------------------------------------------------------------------------------------------------------
// The instruction, from the PTX ISA alone.

/// PTX ISA: `groupID = %laneid >> 2`, `threadID_in_group = %laneid % 4`.
fn group_and_thread(lane: usize) -> (usize, usize) {
    (lane >> 2, lane % 4)
}

/// Row and column in the 16×16 A of element `a_i`, `i` in 0..8 (register `i / 2`; its low half when `i` is even:
/// the ISA lists a fragment's elements "low to high").
fn isa_a(lane: usize, i: usize) -> (usize, usize) {
    let (group, thread) = group_and_thread(lane);
    let row = if i < 2 || (4..6).contains(&i) { group } else { group + 8 };
    let col = if i < 4 { thread * 2 + (i & 1) } else { thread * 2 + (i & 1) + 8 };
    (row, col)
}

/// Row (k) and column (n) in the 16×8 B of element `b_i`, `i` in 0..4.
fn isa_b(lane: usize, i: usize) -> (usize, usize) {
    let (group, thread) = group_and_thread(lane);
    let row = if i < 2 { thread * 2 + (i & 1) } else { thread * 2 + (i & 1) + 8 };
    (row, group)
}

/// Row and column in the 16×8 C (and D) of element `c_i`, `i` in 0..4.
fn isa_c(lane: usize, i: usize) -> (usize, usize) {
    let (group, thread) = group_and_thread(lane);
    let row = if i < 2 { group } else { group + 8 };
    (row, thread * 2 + (i & 1))
}

/// Element `i` of a lane's bf16 registers: register `i / 2`, low half for even `i`.
fn element(registers: &[u32], i: usize) -> f32 {
    bf16::from_bits((registers[i / 2] >> (16 * (i % 2))) as u16).to_f32()
}

/// Per lane: the four f32 of a C or D fragment.
type Accumulators = [[f32; 4]; LANES];

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, d` over the warp: the matrices rebuilt from the
/// lanes' registers as the ISA lays them out (each element exactly once), `D = A·B + C`.
fn mma(d: &mut Accumulators, a: &[[u32; 4]; LANES], b: &[[u32; 2]; LANES]) {
    let mut am = [[None::<f32>; 16]; 16];
    let mut bm = [[None::<f32>; 8]; 16];
    for lane in 0..LANES {
        for i in 0..8 {
            let (row, col) = isa_a(lane, i);
            assert!(am[row][col].replace(element(&a[lane], i)).is_none(), "A[{row}][{col}] held twice");
        }
        for i in 0..4 {
            let (row, col) = isa_b(lane, i);
            assert!(bm[row][col].replace(element(&b[lane], i)).is_none(), "B[{row}][{col}] held twice");
        }
    }
    for lane in 0..LANES {
        for i in 0..4 {
            let (row, col) = isa_c(lane, i);
            let products: f64 = (0..16).map(|k| f64::from(am[row][k].unwrap()) * f64::from(bm[k][col].unwrap())).sum();
            d[lane][i] = (f64::from(d[lane][i]) + products) as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel's index expressions, each a function of the lane (and loop counters) as the kernel writes it.

/// [cu:80] `const int g = lane / 4, t = lane % 4;`
fn lane_g_t(lane: usize) -> (usize, usize) {
    (lane / 4, lane % 4)
}

/// Row (within the warp's 16) and column of the first bf16 of `q_frag[kk][reg]`; the second is the next column.
fn q_frag_coords(lane: usize, kk: usize, reg: usize) -> (usize, usize) {
    let (g, t) = lane_g_t(lane);
    let (r_lo, r_hi) = (g, g + 8); // [cu:89] `const int r_lo = row0 + g, r_hi = row0 + g + 8;` (less row0)
    let c = kk * 16 + 2 * t; // [cu:91] `const int c = kk * 16 + 2 * t;`
    [
        (r_lo, c),     // [cu:96] `q_frag[kk][0] = pair(r_lo, c);`
        (r_hi, c),     // [cu:97] `q_frag[kk][1] = pair(r_hi, c);`
        (r_lo, c + 8), // [cu:98] `q_frag[kk][2] = pair(r_lo, c + 8);`
        (r_hi, c + 8), // [cu:99] `q_frag[kk][3] = pair(r_hi, c + 8);`
    ][reg]
}

/// Key (row of `k_tile`) and dim of the first bf16 of `b0` (`reg` 0) or `b1` (1) in S's n-tile `j`, k-step `kk`.
fn k_frag_coords(lane: usize, j: usize, kk: usize, reg: usize) -> (usize, usize) {
    let (g, t) = lane_g_t(lane);
    let key = j * 8 + g; // [cu:119] `const int key = j * 8 + g;`
    [
        (key, kk * 16 + 2 * t),     // [cu:121] `&k_tile[key][kk * 16 + 2 * t]`
        (key, kk * 16 + 2 * t + 8), // [cu:122] `&k_tile[key][kk * 16 + 2 * t + 8]`
    ][reg]
}

/// Row (within the warp's 16) and key (within the tile) the kernel takes `s[j][e]` for: the mask's column, and
/// rows `g` for e = 0, 1 and `g + 8` for e = 2, 3 (the maxima, sums and rescaling of `_lo` and `_hi`).
fn s_coords(lane: usize, j: usize, e: usize) -> (usize, usize) {
    let (g, t) = lane_g_t(lane);
    let col = j * 8 + 2 * t; // [cu:131] `const int col = j * 8 + 2 * t;`
    let key = col + (e & 1); // [cu:133] `const bool valid = col + (e & 1) < rows;`
                             // [cu:136] `tile_lo = fmaxf(tile_lo, fmaxf(s[j][0], s[j][1]));`
                             // [cu:137] `tile_hi = fmaxf(tile_hi, fmaxf(s[j][2], s[j][3]));`
    let row = if e < 2 { g } else { g + 8 };
    (row, key)
}

/// Which `s[n_tile][e]` pair (low, high) P's A-fragment register `reg` packs, for keys `16·i ..`: the n-tile
/// relative to `2·i`, and the two elements.
fn p_frag_source(reg: usize) -> (usize, [usize; 2]) {
    [
        (0, [0, 1]), // [cu:171] `pack_bf16(s[2 * i][0], s[2 * i][1]),`
        (0, [2, 3]), // [cu:172] `pack_bf16(s[2 * i][2], s[2 * i][3]),`
        (1, [0, 1]), // [cu:173] `pack_bf16(s[2 * i + 1][0], s[2 * i + 1][1]),`
        (1, [2, 3]), // [cu:174] `pack_bf16(s[2 * i + 1][2], s[2 * i + 1][3]),`
    ][reg]
}

/// Key (row of `v_tile`) and dim of the low (`half` 0) or high bf16 of `b0` (`reg` 0) or `b1` in P·V's k-step `i`
/// and n-tile `j`.
fn v_frag_coords(lane: usize, i: usize, j: usize, reg: usize, half: usize) -> (usize, usize) {
    let (g, t) = lane_g_t(lane);
    let key = i * 16 + 2 * t; // [cu:176] `const int key = i * 16 + 2 * t;`
    let dim = j * 8 + g; // [cu:178] `const int dim = j * 8 + g;`
                         // [cu:179] `pack_raw(v_tile[key][dim], v_tile[key + 1][dim]);`
                         // [cu:180] `pack_raw(v_tile[key + 8][dim], v_tile[key + 9][dim]);`
    [[(key, dim), (key + 1, dim)], [(key + 8, dim), (key + 9, dim)]][reg][half]
}

/// Row (within the warp's 16) and dim the kernel stores `o[j][e]` to.
fn o_coords(lane: usize, j: usize, e: usize) -> (usize, usize) {
    let (g, t) = lane_g_t(lane);
    let (r_lo, r_hi) = (g, g + 8); // [cu:194] `const int r_lo = row0 + g, r_hi = row0 + g + 8;` (less row0)
    let col = j * 8 + 2 * t; // [cu:196] `const int col = j * 8 + 2 * t;`
                             // [cu:198] `o_head + static_cast<long>(r_lo) * D + col) =`
                             // [cu:199] `pack_bf16(o[j][0] * inv_lo, o[j][1] * inv_lo);`
                             // [cu:201] `o_head + static_cast<long>(r_hi) * D + col) =`
                             // [cu:202] `pack_bf16(o[j][2] * inv_hi, o[j][3] * inv_hi);`
    (if e < 2 { r_lo } else { r_hi }, col + (e & 1))
}

// ---------------------------------------------------------------------------------------------------------------
// Memory, and the kernel run block by block.

/// A buffer of bf16 as the kernel sees it, counting each element's reads and writes. Indexing past its end
/// panics, as an out-of-bounds access would be reported by compute-sanitizer.
struct Memory {
    data: Vec<bf16>,
    reads: Vec<u32>,
    writes: Vec<u32>,
}

impl Memory {
    fn new(data: Vec<bf16>) -> Self {
        let n = data.len();
        Memory { data, reads: vec![0; n], writes: vec![0; n] }
    }

    fn zeros(n: usize) -> Self {
        Memory::new(vec![bf16::ZERO; n])
    }

    fn clear_counts(&mut self) {
        self.reads.fill(0);
        self.writes.fill(0);
    }

    fn load(&mut self, offset: usize) -> bf16 {
        self.reads[offset] += 1;
        self.data[offset]
    }

    /// `*reinterpret_cast<const uint32_t*>(p)`: two bf16, the first in the low half; 4-byte aligned.
    fn load_u32(&mut self, offset: usize) -> u32 {
        assert!(offset.is_multiple_of(2), "a 4-byte load at element {offset}: misaligned");
        pack_raw(self.load(offset), self.load(offset + 1))
    }

    fn load_u128(&mut self, offset: usize) -> [bf16; 8] {
        assert!(offset.is_multiple_of(8), "a 16-byte load at element {offset}: misaligned");
        std::array::from_fn(|i| self.load(offset + i))
    }

    fn store(&mut self, offset: usize, value: bf16) {
        self.writes[offset] += 1;
        self.data[offset] = value;
    }

    fn store_u32(&mut self, offset: usize, value: u32) {
        assert!(offset.is_multiple_of(2), "a 4-byte store at element {offset}: misaligned");
        self.store(offset, bf16::from_bits(value as u16));
        self.store(offset + 1, bf16::from_bits((value >> 16) as u16));
    }

    fn store_u128(&mut self, offset: usize, value: [bf16; 8]) {
        assert!(offset.is_multiple_of(8), "a 16-byte store at element {offset}: misaligned");
        for (i, v) in value.into_iter().enumerate() {
            self.store(offset + i, v);
        }
    }
}

/// Every lane's `b0`, `b1` of P·V's k-step `i` and dim tile `j`, loaded from `v_tile` (rows `d + PAD` wide).
fn v_fragments(v_tile: &mut Memory, d: usize, i: usize, j: usize) -> [[u32; 2]; LANES] {
    std::array::from_fn(|lane| {
        std::array::from_fn(|reg| {
            let [lo, hi] = [0, 1].map(|half| {
                let (key, dim) = v_frag_coords(lane, i, j, reg, half);
                v_tile.load(key * (d + PAD) + dim)
            });
            pack_raw(lo, hi)
        })
    })
}

/// `pack_raw(lo, hi)`: `lo` in the low 16 bits.
fn pack_raw(lo: bf16, hi: bf16) -> u32 {
    u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16)
}

/// `pack_bf16(lo, hi)`: `__floats2bfloat162_rn`, round to nearest even, `lo` in the low half.
fn pack_bf16(lo: f32, hi: f32) -> u32 {
    pack_raw(bf16::from_f32(lo), bf16::from_f32(hi))
}

/// `__shfl_xor_sync(0xffffffff, value, offset)` over the warp: every lane gets lane `lane ^ offset`'s value.
fn shfl_xor(values: &[f32; LANES], offset: usize) -> [f32; LANES] {
    std::array::from_fn(|lane| values[lane ^ offset])
}

/// One tensor argument: its memory, where the view starts, and its batch, head and row strides (in elements).
struct Input {
    memory: Memory,
    start: usize,
    strides: [usize; 3],
}

struct Launch {
    batch: usize,
    heads: usize,
    q_len: usize,
    k_len: usize,
    d: usize,
    scale: f64,
}

impl Launch {
    /// The query blocks of one (batch, head): `grid_dim.x`.
    fn q_blocks(&self) -> usize {
        self.q_len.div_ceil(BLOCK_M) // [rs:230] `grid_dim: (q_len.div_ceil(BLOCK_M) as u32, grid_y, 1),`
    }

    /// One row of blocks per (batch, head): `grid_dim.y`, as the host code computes it (`src/shapes.rs`).
    fn pairs(&self) -> usize {
        // [rs:228] `let grid_y = flash_attention_grid_y(batch, heads, q_len, k_len)?;`
        let grid_y = crate::shapes::flash_attention_grid_y(self.batch, self.heads, self.q_len, self.k_len);
        grid_y.expect("an emulated launch the host code refuses") as usize
    }

    /// The key tiles every block walks, `(key0, rows)`.
    fn tiles(&self) -> Vec<(usize, usize)> {
        // [cu:108] `for (int key0 = 0; key0 < k_len; key0 += BLOCK_N) {`
        // [cu:109] `const int rows = min(BLOCK_N, k_len - key0);`
        (0..self.k_len).step_by(BLOCK_N).map(|key0| (key0, BLOCK_N.min(self.k_len - key0))).collect()
    }
}

/// Copies `rows` rows of `src` (from element `src0`, row stride `stride`) into a shared tile, as `load_tile`'s
/// 128 threads do between them; checks that each element of the tile is written once and its padding never.
fn load_tile(dst: &mut Memory, src: &mut Memory, src0: usize, stride: usize, rows: usize, d: usize) {
    dst.clear_counts();
    let chunks = d / 8; // [cu:60] `constexpr int CHUNKS = D / 8;`
    for thread in 0..WARPS * 32 {
        // [cu:61] `for (int i = threadIdx.x; i < BLOCK_N * CHUNKS; i += WARPS * 32) {`
        for i in (thread..BLOCK_N * chunks).step_by(WARPS * 32) {
            let (row, chunk) = (i / chunks, i % chunks); // [cu:62] `const int row = i / CHUNKS, chunk = i % CHUNKS;`
            let mut value = [bf16::ZERO; 8];
            if row < rows {
                // [cu:64] `if (row < rows) value = *reinterpret_cast<const uint4*>(src + row * stride + chunk * 8);`
                value = src.load_u128(src0 + row * stride + chunk * 8);
            }
            dst.store_u128(row * (d + PAD) + chunk * 8, value); // [cu:65] `&dst[row][chunk * 8]) = value;`
        }
    }
    for row in 0..BLOCK_N {
        for col in 0..d + PAD {
            let want = u32::from(col < d);
            assert_eq!(dst.writes[row * (d + PAD) + col], want, "tile element [{row}][{col}] written wrongly");
        }
    }
}

/// Checks that a warp's step read each element of a shared tile once and its padding never.
fn assert_each_read_once(tile: &Memory, d: usize, what: &str) {
    for row in 0..BLOCK_N {
        for col in 0..d + PAD {
            let (got, want) = (tile.reads[row * (d + PAD) + col], u32::from(col < d));
            assert_eq!(got, want, "{what}[{row}][{col}] read {got} times by one warp, expected {want}");
        }
    }
}

/// One warp's registers.
struct Warp {
    row0: usize,
    q_frag: Vec<[[u32; 4]; LANES]>,
    o: Vec<Accumulators>,
    /// Running maxima and sums of rows g and g + 8, per lane.
    m: [[f32; 2]; LANES],
    l: [[f32; 2]; LANES],
}

impl Warp {
    /// The warp's Q fragments, from global memory (rows past `q_len` are zeros).
    fn new(launch: &Launch, q: &mut Input, q0: usize, row0: usize) -> Self {
        let d = launch.d;
        let mut q_frag = vec![[[0u32; 4]; LANES]; d / 16];
        for lane in 0..LANES {
            for kk in 0..d / 16 {
                for reg in 0..4 {
                    let (r, col) = q_frag_coords(lane, kk, reg);
                    let r = row0 + r;
                    // [cu:93] `if (r >= q_len) return 0u;`
                    // [cu:94] `return *reinterpret_cast<const uint32_t*>(q + r * q_row_stride + col);`
                    q_frag[kk][lane][reg] =
                        if r >= launch.q_len { 0 } else { q.memory.load_u32(q0 + r * q.strides[2] + col) };
                }
            }
        }
        // [cu:104] `for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;`
        // [cu:106] `float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;`
        let o = vec![[[0f32; 4]; LANES]; d / 8];
        Warp { row0, q_frag, o, m: [[f32::NEG_INFINITY; 2]; LANES], l: [[0.0; 2]; LANES] }
    }

    /// S = Q·Kᵀ for the tile: `s[j]` per lane.
    fn scores(&self, k_tile: &mut Memory, d: usize) -> Vec<Accumulators> {
        let mut s = vec![[[0f32; 4]; LANES]; BLOCK_N / 8]; // [cu:118] `s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;`
        for j in 0..BLOCK_N / 8 {
            for kk in 0..d / 16 {
                let b: [[u32; 2]; LANES] = std::array::from_fn(|lane| {
                    std::array::from_fn(|reg| {
                        let (key, dim) = k_frag_coords(lane, j, kk, reg);
                        k_tile.load_u32(key * (d + PAD) + dim)
                    })
                });
                mma(&mut s[j], &self.q_frag[kk], &b); // [cu:123] `mma_bf16(s[j], q_frag[kk], b0, b1);`
            }
        }
        s
    }

    /// One key tile of `rows` valid keys: scores, online softmax, O += P·V.
    fn step(&mut self, k_tile: &mut Memory, v_tile: &mut Memory, rows: usize, d: usize, scale_log2: f32) {
        let mut s = self.scores(k_tile, d);

        let mut tile = [[f32::NEG_INFINITY; 2]; LANES]; // [cu:129] `float tile_lo = -INFINITY, tile_hi = -INFINITY;`
        for lane in 0..LANES {
            for j in 0..BLOCK_N / 8 {
                for e in 0..4 {
                    let (row, key) = s_coords(lane, j, e);
                    // [cu:134] `s[j][e] = valid ? s[j][e] * scale_log2 : -INFINITY;`
                    let value = if key < rows { s[j][lane][e] * scale_log2 } else { f32::NEG_INFINITY };
                    s[j][lane][e] = value;
                    let half = usize::from(row >= 8);
                    tile[lane][half] = tile[lane][half].max(value);
                }
            }
        }
        // [cu:139] `for (int offset = 1; offset < 4; offset <<= 1) {`
        for offset in [1, 2] {
            for half in 0..2 {
                let mine: [f32; LANES] = std::array::from_fn(|lane| tile[lane][half]);
                let theirs = shfl_xor(&mine, offset); // [cu:140] `__shfl_xor_sync(0xffffffff, tile_lo, offset)`
                for lane in 0..LANES {
                    tile[lane][half] = mine[lane].max(theirs[lane]);
                }
            }
        }
        for lane in 0..LANES {
            let mut reference = [0f32; 2];
            let mut alpha = [0f32; 2];
            for half in 0..2 {
                let new = self.m[lane][half].max(tile[lane][half]); // [cu:146] `fmaxf(m_lo, tile_lo)`
                                                                    // [cu:147] `const float ref_lo = new_lo == -INFINITY ? 0.f : new_lo,`
                reference[half] = if new == f32::NEG_INFINITY { 0.0 } else { new };
                alpha[half] = (self.m[lane][half] - reference[half]).exp2(); // [cu:148] `exp2f(m_lo - ref_lo)`
                self.m[lane][half] = new;
                self.l[lane][half] *= alpha[half];
            }
            for j in 0..d / 8 {
                for e in 0..4 {
                    self.o[j][lane][e] *= alpha[e / 2]; // [cu:154] `o[j][0] *= alpha_lo;`
                }
            }
            for j in 0..BLOCK_N / 8 {
                for e in 0..4 {
                    s[j][lane][e] = (s[j][lane][e] - reference[e / 2]).exp2(); // [cu:160] `exp2f(s[j][0] - ref_lo)`
                }
                self.l[lane][0] += s[j][lane][0] + s[j][lane][1]; // [cu:164] `l_lo += s[j][0] + s[j][1];`
                self.l[lane][1] += s[j][lane][2] + s[j][lane][3]; // [cu:165] `l_hi += s[j][2] + s[j][3];`
            }
        }

        // [cu:169] `for (int i = 0; i < BLOCK_N / 16; ++i) {`
        for i in 0..BLOCK_N / 16 {
            let p: [[u32; 4]; LANES] = std::array::from_fn(|lane| {
                std::array::from_fn(|reg| {
                    let (n_tile, [lo, hi]) = p_frag_source(reg);
                    pack_bf16(s[2 * i + n_tile][lane][lo], s[2 * i + n_tile][lane][hi])
                })
            });
            for j in 0..d / 8 {
                let b = v_fragments(v_tile, d, i, j);
                mma(&mut self.o[j], &p, &b); // [cu:181] `mma_bf16(o[j], p, b0, b1);`
            }
        }
    }

    /// The quad's sums, O / l, stored to the contiguous output.
    fn store(&mut self, out: &mut Memory, launch: &Launch, block_y: usize) {
        let d = launch.d;
        // [cu:188] `for (int offset = 1; offset < 4; offset <<= 1) {`
        for offset in [1, 2] {
            for half in 0..2 {
                let mine: [f32; LANES] = std::array::from_fn(|lane| self.l[lane][half]);
                let theirs = shfl_xor(&mine, offset); // [cu:189] `l_lo += __shfl_xor_sync(0xffffffff, l_lo, offset);`
                for lane in 0..LANES {
                    self.l[lane][half] = mine[lane] + theirs[lane];
                }
            }
        }
        // [cu:193] `__nv_bfloat16* o_head = out + (static_cast<long>(blockIdx.y) * q_len) * D;`
        let o_head = block_y * launch.q_len * d;
        for lane in 0..LANES {
            // [cu:192] `const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f,`
            let inv = self.l[lane].map(|l| if l > 0.0 { 1.0 / l } else { 0.0 });
            for j in 0..d / 8 {
                for pair in [0, 2] {
                    let (row, col) = o_coords(lane, j, pair);
                    let row = self.row0 + row;
                    // [cu:197] `if (r_lo < q_len)`
                    if row < launch.q_len {
                        let half = pair / 2;
                        let value = pack_bf16(self.o[j][lane][pair] * inv[half], self.o[j][lane][pair + 1] * inv[half]);
                        out.store_u32(o_head + row * d + col, value);
                    }
                }
            }
        }
    }
}

/// The whole grid, block by block and warp by warp, over the key tiles `tiles` (the kernel's unless a test
/// changes them); returns the contiguous `[batch, heads, q_len, d]` output.
fn run(launch: &Launch, q: &mut Input, k: &mut Input, v: &mut Input, tiles: &[(usize, usize)]) -> Memory {
    let d = launch.d;
    assert!(d.is_multiple_of(16), "the kernel is compiled for head dims that are multiples of 16");
    // [rs:247] `(self.scale * std::f64::consts::LOG2_E) as f32`
    let scale_log2 = (launch.scale * std::f64::consts::LOG2_E) as f32;
    let mut out = Memory::zeros(launch.batch * launch.heads * launch.q_len * d);
    // [cu:75] `__shared__ __align__(16) __nv_bfloat16 k_tile[BLOCK_N][D + PAD];`
    let mut k_tile = Memory::zeros(BLOCK_N * (d + PAD));
    let mut v_tile = Memory::zeros(BLOCK_N * (d + PAD));
    for block_y in 0..launch.pairs() {
        for block_x in 0..launch.q_blocks() {
            // [cu:78] `const int batch = blockIdx.y / heads, head = blockIdx.y % heads;`
            let (batch, head) = (block_y / launch.heads, block_y % launch.heads);
            // [cu:82] `q += batch * q_batch_stride + head * q_head_stride;`
            let base = |t: &Input| t.start + batch * t.strides[0] + head * t.strides[1];
            let (q0, k0, v0) = (base(q), base(k), base(v));
            let mut warps: Vec<Warp> = (0..WARPS)
                // [cu:81] `const int row0 = blockIdx.x * BLOCK_M + warp * 16;`
                .map(|warp| Warp::new(launch, q, q0, block_x * BLOCK_M + warp * 16))
                .collect();
            for &(key0, rows) in tiles {
                // [cu:111] `load_tile<D>(k_tile, k + key0 * k_row_stride, k_row_stride, rows);`
                load_tile(&mut k_tile, &mut k.memory, k0 + key0 * k.strides[2], k.strides[2], rows, d);
                // [cu:112] `load_tile<D>(v_tile, v + key0 * v_row_stride, v_row_stride, rows);`
                load_tile(&mut v_tile, &mut v.memory, v0 + key0 * v.strides[2], v.strides[2], rows, d);
                for warp in &mut warps {
                    k_tile.clear_counts();
                    v_tile.clear_counts();
                    warp.step(&mut k_tile, &mut v_tile, rows, d, scale_log2);
                    assert_each_read_once(&k_tile, d, "k_tile");
                    assert_each_read_once(&v_tile, d, "v_tile");
                }
            }
            for warp in &mut warps {
                warp.store(&mut out, launch, block_y);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic normal samples (xorshift and Box-Muller), rounded to bf16.
    struct Samples(u64);

    impl Samples {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f32 {
            let (u, v) = (self.uniform(), self.uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        }

        fn bf16s(&mut self, n: usize, std: f32) -> Vec<bf16> {
            (0..n).map(|_| bf16::from_f32(self.normal() * std)).collect()
        }
    }

    /// How a `[batch, heads, len, d]` argument lies in memory.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        /// `[batch, heads, len, d]` itself.
        Contiguous,
        /// `[batch, len, heads, d]` seen through a transpose (what the transformer's projections give).
        TokensMajor,
        /// One `[len, d]` for every batch item and head (stride 0, as `broadcast_as` makes).
        Broadcast,
    }

    impl Layout {
        fn input(self, (batch, heads, len, d): (usize, usize, usize, usize), samples: &mut Samples, std: f32) -> Input {
            let (n, strides) = match self {
                Layout::Contiguous => (batch * heads * len * d, [heads * len * d, len * d, d]),
                Layout::TokensMajor => (batch * len * heads * d, [len * heads * d, d, heads * d]),
                Layout::Broadcast => (len * d, [0, 0, d]),
            };
            Input { memory: Memory::new(samples.bf16s(n, std)), start: 0, strides }
        }
    }

    fn at(t: &Input, batch: usize, head: usize, row: usize, col: usize) -> usize {
        t.start + batch * t.strides[0] + head * t.strides[1] + row * t.strides[2] + col
    }

    /// `softmax(q·kᵀ·scale)·v` in f64 from the same bf16 inputs, contiguous `[batch, heads, q_len, d]`.
    fn reference(launch: &Launch, q: &Input, k: &Input, v: &Input) -> Vec<f64> {
        let d = launch.d;
        let value = |t: &Input, b, h, r, c| f64::from(t.memory.data[at(t, b, h, r, c)].to_f32());
        let mut out = Vec::with_capacity(launch.batch * launch.heads * launch.q_len * d);
        for b in 0..launch.batch {
            for h in 0..launch.heads {
                for r in 0..launch.q_len {
                    let scores: Vec<f64> = (0..launch.k_len)
                        .map(|key| (0..d).map(|c| value(q, b, h, r, c) * value(k, b, h, key, c)).sum::<f64>())
                        .map(|s| s * launch.scale)
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = weights.iter().sum();
                    for c in 0..d {
                        out.push((0..launch.k_len).map(|key| weights[key] * value(v, b, h, key, c)).sum::<f64>() / sum);
                    }
                }
            }
        }
        out
    }

    /// Whole-tensor relative L2 error, and the worst row's largest difference relative to that row's largest
    /// reference value.
    fn errors(got: &[bf16], want: &[f64], d: usize) -> (f64, f64) {
        let got: Vec<f64> = got.iter().map(|x| f64::from(x.to_f32())).collect();
        let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
        let worst_row = got
            .chunks(d)
            .zip(want.chunks(d))
            .map(|(g, w)| {
                let largest_difference = g.iter().zip(w).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
                largest_difference / w.iter().map(|w| w.abs()).fold(1e-6, f64::max)
            })
            .fold(0.0, f64::max);
        (diff / norm, worst_row)
    }

    /// How often the kernel should read each element of an argument's memory: `per_view_element` times for every
    /// (batch, head, row < len, col < d) of the view that lies there (broadcast views share elements).
    fn expected_reads(t: &Input, launch: &Launch, len: usize, per_view_element: u32) -> Vec<u32> {
        let mut expected = vec![0; t.memory.data.len()];
        for b in 0..launch.batch {
            for h in 0..launch.heads {
                for r in 0..len {
                    for c in 0..launch.d {
                        expected[at(t, b, h, r, c)] += per_view_element;
                    }
                }
            }
        }
        expected
    }

    #[test]
    fn the_isa_fragments_cover_their_matrices_once() {
        let mut a = [[0; 16]; 16];
        let mut b = [[0; 8]; 16];
        let mut c = [[0; 8]; 16];
        for lane in 0..LANES {
            (0..8).map(|i| isa_a(lane, i)).for_each(|(r, col)| a[r][col] += 1);
            (0..4).map(|i| isa_b(lane, i)).for_each(|(r, col)| b[r][col] += 1);
            (0..4).map(|i| isa_c(lane, i)).for_each(|(r, col)| c[r][col] += 1);
        }
        assert!(a.iter().flatten().chain(b.iter().flatten()).chain(c.iter().flatten()).all(|&n| n == 1));
    }

    /// Each lane's registers, as the kernel fills and reads them, hold the elements the ISA puts there: Q's and
    /// P's A fragments, K's (B[k][n] = K[key n][dim k]) and V's (B[k][n] = V[key k][dim n]) B fragments, and the
    /// C fragments of S (masked, maxed and summed per row) and of O (stored).
    #[test]
    fn the_kernels_registers_hold_what_mma_expects() {
        for lane in 0..LANES {
            for kk in 0..128 / 16 {
                for reg in 0..4 {
                    let (row, col) = q_frag_coords(lane, kk, reg);
                    for half in 0..2 {
                        let (isa_row, isa_col) = isa_a(lane, 2 * reg + half);
                        assert_eq!(
                            (row, col + half),
                            (isa_row, kk * 16 + isa_col),
                            "Q: lane {lane} a{}",
                            2 * reg + half
                        );
                    }
                }
            }
            for j in 0..BLOCK_N / 8 {
                for kk in 0..128 / 16 {
                    for reg in 0..2 {
                        let (key, dim) = k_frag_coords(lane, j, kk, reg);
                        for half in 0..2 {
                            let (k, n) = isa_b(lane, 2 * reg + half);
                            assert_eq!(
                                (key, dim + half),
                                (j * 8 + n, kk * 16 + k),
                                "K: lane {lane} b{}",
                                2 * reg + half
                            );
                        }
                    }
                }
                for e in 0..4 {
                    let (row, col) = isa_c(lane, e);
                    assert_eq!(s_coords(lane, j, e), (row, j * 8 + col), "S: lane {lane} c{e}");
                    assert_eq!(o_coords(lane, j, e), (row, j * 8 + col), "O: lane {lane} c{e}");
                }
            }
            for i in 0..BLOCK_N / 16 {
                for reg in 0..4 {
                    let (n_tile, elements) = p_frag_source(reg);
                    for half in 0..2 {
                        // The key and row the kernel's S element holds, against the ISA's place for it in P's A.
                        let (row, key) = s_coords(lane, 2 * i + n_tile, elements[half]);
                        let (isa_row, isa_col) = isa_a(lane, 2 * reg + half);
                        assert_eq!((row, key), (isa_row, i * 16 + isa_col), "P: lane {lane} a{}", 2 * reg + half);
                    }
                }
                for j in 0..128 / 8 {
                    for reg in 0..2 {
                        for half in 0..2 {
                            let (k, n) = isa_b(lane, 2 * reg + half);
                            let want = (i * 16 + k, j * 8 + n);
                            assert_eq!(
                                v_frag_coords(lane, i, j, reg, half),
                                want,
                                "V: lane {lane} b{}",
                                2 * reg + half
                            );
                        }
                    }
                }
            }
        }
    }

    /// Q·Kᵀ and P·V of one tile through the kernel's loads and the emulated tensor cores, on small integers (every
    /// sum exact in f32), equal plain matmuls; S is read back where the kernel takes each element to be.
    #[test]
    fn an_emulated_tile_matmul_equals_a_plain_matmul() {
        let d = 64;
        let int = |i: usize, m: usize| bf16::from_f32((i * 7919 % m) as f32 - (m / 2) as f32);
        let q: Vec<bf16> = (0..16 * d).map(|i| int(i, 7)).collect();
        let k: Vec<bf16> = (0..BLOCK_N * d).map(|i| int(i + 3, 5)).collect();
        let mut q = Input { memory: Memory::new(q), start: 0, strides: [0, 0, d] };
        let mut k = Input { memory: Memory::new(k), start: 0, strides: [0, 0, d] };
        let launch = Launch { batch: 1, heads: 1, q_len: 16, k_len: BLOCK_N, d, scale: 1.0 };
        let warp = Warp::new(&launch, &mut q, 0, 0);
        let mut k_tile = Memory::zeros(BLOCK_N * (d + PAD));
        load_tile(&mut k_tile, &mut k.memory, 0, d, BLOCK_N, d);
        let s = warp.scores(&mut k_tile, d);
        assert_each_read_once(&k_tile, d, "k_tile");
        let value = |t: &Input, i: usize| t.memory.data[i].to_f32();
        for lane in 0..LANES {
            for j in 0..BLOCK_N / 8 {
                for e in 0..4 {
                    let (row, key) = s_coords(lane, j, e);
                    let want: f32 = (0..d).map(|c| value(&q, row * d + c) * value(&k, key * d + c)).sum();
                    assert_eq!(s[j][lane][e], want, "S[{row}][{key}]");
                }
            }
        }

        // P (16 × BLOCK_N) in the kernel's S layout, packed as the kernel packs it, times a V tile.
        let p = |row: usize, key: usize| ((row * 3 + key * 5) % 4) as f32 - 1.0;
        let v: Vec<bf16> = (0..BLOCK_N * d).map(|i| int(i + 1, 9)).collect();
        let mut v_tile = Memory::zeros(BLOCK_N * (d + PAD));
        load_tile(&mut v_tile, &mut Memory::new(v.clone()), 0, d, BLOCK_N, d);
        let mut o = vec![[[0f32; 4]; LANES]; d / 8];
        for i in 0..BLOCK_N / 16 {
            let a: [[u32; 4]; LANES] = std::array::from_fn(|lane| {
                std::array::from_fn(|reg| {
                    let (n_tile, elements) = p_frag_source(reg);
                    let [lo, hi] = elements.map(|e| {
                        let (row, key) = s_coords(lane, 2 * i + n_tile, e);
                        p(row, key)
                    });
                    pack_bf16(lo, hi)
                })
            });
            for j in 0..d / 8 {
                let b = v_fragments(&mut v_tile, d, i, j);
                mma(&mut o[j], &a, &b);
            }
        }
        assert_each_read_once(&v_tile, d, "v_tile");
        for lane in 0..LANES {
            for j in 0..d / 8 {
                for e in 0..4 {
                    let (row, dim) = o_coords(lane, j, e);
                    let want: f32 = (0..BLOCK_N).map(|key| p(row, key) * v[key * d + dim].to_f32()).sum();
                    assert_eq!(o[j][lane][e], want, "O[{row}][{dim}]");
                }
            }
        }
    }

    /// Whole emulated launches against attention in f64, over both head dims, partial query blocks and key tiles,
    /// cross-attention lengths and the three layouts; every global element read as often as the blocks need it,
    /// nothing outside the views, and every output element written once.
    #[test]
    fn emulated_launches_compute_attention() {
        use Layout::*;
        let mut samples = Samples(0x9e37_79b9_7f4a_7c15);
        // (batch, heads, q_len, k_len, d, q, k, v layouts)
        for (batch, heads, q_len, k_len, d, lq, lk, lv) in [
            (1, 1, 1, 1, 64, Contiguous, Contiguous, Contiguous),
            (2, 3, 20, 100, 64, Contiguous, Contiguous, Contiguous),
            (1, 2, 70, 130, 128, TokensMajor, TokensMajor, TokensMajor),
            (2, 2, 17, 64, 128, Contiguous, Broadcast, Broadcast),
            (1, 2, 65, 29, 64, TokensMajor, Broadcast, Contiguous),
        ] {
            let launch = Launch { batch, heads, q_len, k_len, d, scale: 1.0 / (d as f64).sqrt() };
            let mut q = lq.input((batch, heads, q_len, d), &mut samples, 1.0);
            let mut k = lk.input((batch, heads, k_len, d), &mut samples, 1.0);
            let mut v = lv.input((batch, heads, k_len, d), &mut samples, 1.0);
            let out = run(&launch, &mut q, &mut k, &mut v, &launch.tiles());
            let case = format!("{batch}x{heads}x{q_len}x{k_len}x{d} {lq:?}/{lk:?}/{lv:?}");
            let (err, worst_row) = errors(&out.data, &reference(&launch, &q, &k, &v), d);
            assert!(err < 1e-2 && worst_row < 3e-2, "{case}: relative error {err:.2e}, worst row {worst_row:.2e}");
            assert_eq!(q.memory.reads, expected_reads(&q, &launch, q_len, 1), "{case}: q's reads");
            let blocks = launch.q_blocks() as u32;
            assert_eq!(k.memory.reads, expected_reads(&k, &launch, k_len, blocks), "{case}: k's reads");
            assert_eq!(v.memory.reads, expected_reads(&v, &launch, k_len, blocks), "{case}: v's reads");
            assert!(out.writes.iter().all(|&n| n == 1), "{case}: an output element not written exactly once");
        }
    }

    /// Scores peaked on the last key, in the last and partial tile (150 = 2·64 + 22): every row's running maximum
    /// jumps there and what was accumulated is rescaled by a tiny factor; the result stays finite and right.
    #[test]
    fn a_maximum_in_the_last_partial_tile() {
        let (q_len, k_len, d) = (40, 150, 64);
        let mut samples = Samples(7);
        let toward: Vec<f32> = (0..d).map(|_| samples.normal()).collect();
        let q: Vec<bf16> = (0..q_len * d).map(|i| bf16::from_f32(toward[i % d] + 0.1 * samples.normal())).collect();
        let k: Vec<bf16> = (0..k_len * d)
            .map(|i| bf16::from_f32(if i / d == k_len - 1 { 4.0 * toward[i % d] } else { samples.normal() }))
            .collect();
        let v = samples.bf16s(k_len * d, 1.0);
        let input = |data| Input { memory: Memory::new(data), start: 0, strides: [0, 0, d] };
        let (mut q, mut k, mut v) = (input(q), input(k), input(v));
        let launch = Launch { batch: 1, heads: 1, q_len, k_len, d, scale: 1.0 / (d as f64).sqrt() };
        let out = run(&launch, &mut q, &mut k, &mut v, &launch.tiles());
        assert!(out.data.iter().all(|x| x.is_finite()));
        let (err, worst_row) = errors(&out.data, &reference(&launch, &q, &k, &v), d);
        assert!(err < 1e-2 && worst_row < 3e-2, "relative error {err:.2e}, worst row {worst_row:.2e}");
    }

    /// A tile with no valid key (all masked) leaves the running maximum at -inf without NaN: walked before the
    /// real tiles it changes nothing, bit for bit; walked alone, every row comes out 0.
    #[test]
    fn a_tile_with_no_valid_key_is_harmless() {
        let (q_len, k_len, d) = (30, 100, 64);
        let mut samples = Samples(11);
        let input = |samples: &mut Samples, len| Input {
            memory: Memory::new(samples.bf16s(len * d, 3.0)),
            start: 0,
            strides: [0, 0, d],
        };
        let (mut q, mut k, mut v) =
            (input(&mut samples, q_len), input(&mut samples, k_len), input(&mut samples, k_len));
        let launch = Launch { batch: 1, heads: 1, q_len, k_len, d, scale: 1.0 / (d as f64).sqrt() };
        let plain = run(&launch, &mut q, &mut k, &mut v, &launch.tiles());
        let empty_first: Vec<_> = std::iter::once((0, 0)).chain(launch.tiles()).collect();
        let guarded = run(&launch, &mut q, &mut k, &mut v, &empty_first);
        assert_eq!(plain.data, guarded.data);
        let nothing = run(&launch, &mut q, &mut k, &mut v, &[(0, 0), (0, 0)]);
        assert!(nothing.data.iter().all(|x| x.to_f32() == 0.0), "a row with no key at all: {:?}", &nothing.data[..4]);
    }

    /// Every `[cu:LINE] `expression`` (and `[rs:LINE]`) quoted in this file's comments stands on that line of the
    /// source it names.
    #[test]
    fn quoted_kernel_expressions_stand_on_their_lines() {
        let this = include_str!("flash_attention_emulation.rs");
        let sources =
            [("cu", include_str!("../../../kernels/flash_attention.cu")), ("rs", include_str!("flash_attention.rs"))];
        let mut checked = 0;
        for comment in this.lines().filter_map(|line| line.split_once("// ").map(|(_, c)| c)) {
            for (name, source) in sources {
                let marker = format!("[{name}:");
                for quote in comment.split(&marker).skip(1) {
                    let Some((number, rest)) = quote.split_once("] `") else { continue };
                    let Ok(number) = number.parse::<usize>() else { continue };
                    let expression = rest.split('`').next().unwrap();
                    let line = source.lines().nth(number - 1).unwrap_or("");
                    let now = source.lines().position(|l| l.contains(expression)).map(|i| i + 1);
                    assert!(
                        line.contains(expression),
                        "{name}:{number} no longer reads `{expression}` (found on line {now:?}): compare the \
                         emulation with the kernel again and update the quote"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 40, "only {checked} quotes found: is the quote syntax still `[cu:LINE] `...``?");
    }
}
