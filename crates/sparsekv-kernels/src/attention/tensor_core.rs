//! The tensor-core split kernel (CUDA, f16/bf16): sparse and dense from one source.
//!
//! Same split-K contract as the CUDA-core kernel of the parent module (one cube per sequence,
//! KV head and split; partial outputs merged by the same merge kernel), built around matrix
//! units and independent planes instead of a cube-wide tile:
//!
//! - Each of the cube's [`PLANES`] planes walks its own tiles of [`TILE`] tokens
//!   (`s0 + plane * TILE`, then every `PLANES * TILE`), with plane barriers only; planes meet
//!   once, at the end, to merge their softmax states.
//! - Per tile, four named steps:
//!   1. **Stage** (`load_compressed`, `store_compressed`): the tile's compressed bitmap words
//!      and packed values of K and V, one virtual array of 16-byte chunks, are loaded into
//!      registers with coalesced loads while the plane still works on the previous tile, then
//!      stored into the plane's shared memory; dense rows (`stage_dense_rows`: the window, or
//!      every row in the dense kernel) go straight into the plane's dense K/V tiles, rows past
//!      the split's end as zeros.
//!   2. **Expand** (`expand_row`): lane `r` of the first half-plane rebuilds key row `r`, lane
//!      `16 + r` value row `r`, as a dense row: zeroed with 16-byte stores, then its kept values
//!      written at their channels by walking the bitmap (one trip per kept value). Keys and
//!      values run the same instructions, so the half-planes never diverge by kind.
//!   3. **Scores** (in the kernel body): `S^T = K Q^T` (16 tokens x 8 heads) with `d / 16`
//!      16x8x16 products; the key tile and the query of the group (staged once per cube, heads
//!      past the group zero) are read with `ldmatrix`.
//!   4. **Softmax and values** (in the kernel body): the online-softmax state of each
//!      lane's two heads, reductions over the tile by plane shuffles, the probabilities handed
//!      to the `B` operand through 256 bytes of shared memory; then `O^T += V^T P^T` with
//!      `d / 16` products, the value tile read transposed by `ldmatrix`.
//!
//! Register layouts are those of PTX `mma.m16n8k16` (lane `l`: `g = l / 4`, `c = l % 4`):
//! `A` holds rows `g`, `g + 8` at columns `2c, 2c + 1, 2c + 8, 2c + 9`; `B` holds rows
//! `2c, 2c + 1, 2c + 8, 2c + 9` of column `g`; `C` holds rows `g`, `g + 8` at columns
//! `2c, 2c + 1`. So the lane owning heads `2c, 2c + 1` of the scores owns the same heads
//! of the output, and the softmax rescale needs no exchange.
//!
//! Requirements (checked by the launcher, which falls back to the CUDA-core kernel or errors):
//! 16-bit values, `head_dim` a multiple of 16, at most 8 query heads per KV head, and every
//! stream and tile 16-byte aligned (FORMAT.md's 8-token stream alignment gives that).

use cubecl::prelude::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

/// Tokens per plane tile: the `M` of the scores product and the `K` of the values product.
pub(super) const TILE: usize = 16;
/// Planes per cube; each walks its own tiles.
pub(super) const PLANES: usize = 4;
/// Units per cube.
pub(super) const UNITS: usize = 32 * PLANES;
/// Query heads per product (the `N` of both products): groups of up to 8 heads.
pub(super) const HEADS: usize = 8;
/// Elements per 16-byte chunk of 16-bit values.
const CHUNK: usize = 8;
/// Padding of a dense tile row, in elements: one chunk, so that the eight rows of an
/// `ldmatrix` start in different banks.
const ROW_PAD: usize = CHUNK;

/// Static launch parameters of the tensor-core split kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct TilePlan {
    /// Elements per head (a multiple of 16).
    pub head_dim: usize,
    /// Query heads per KV head (at most [`HEADS`]).
    pub group: usize,
    /// Kept values per key row and per value row (0 in the dense kernel).
    pub keep_k: usize,
    pub keep_v: usize,
    /// Whether a compressed segment is read.
    pub sparse: bool,
}

impl TilePlan {
    /// Shared-memory stride of a dense tile row, in elements.
    fn row(&self) -> usize {
        self.head_dim + ROW_PAD
    }

    /// Bitmap words of one tile of one of K and V.
    fn tile_words(&self) -> usize {
        TILE * self.head_dim / 32
    }

    /// Shared-memory stride of a staged row of `keep` values, in elements. Rows of a multiple
    /// of 4 values would start every lane's reads in the same bank (64 values = 32 words: a
    /// 32-way conflict); they get one word of padding, for an odd word stride. Other rows are
    /// staged as they are (an odd word stride, or rows that do not start on words).
    fn staged_row(keep: usize) -> usize {
        if keep.is_multiple_of(4) {
            keep + 2
        } else {
            keep
        }
    }

    /// Staged values of one tile of K (then of V), in elements: a whole number of chunks.
    fn staged_tile(keep: usize) -> usize {
        (TILE * Self::staged_row(keep)).next_multiple_of(CHUNK)
    }

    /// Shared memory of one cube, in bytes (mirrors the kernel's allocations; values are 16-bit).
    pub fn shared_bytes(&self) -> usize {
        let dense = 2 * TILE * self.row() * 2;
        let probabilities = HEADS * TILE * 2;
        let staged = if self.sparse {
            2 * self.tile_words() * 4
                + (Self::staged_tile(self.keep_k) + Self::staged_tile(self.keep_v)) * 2
        } else {
            0
        };
        let merge = 4 * self.group * (self.head_dim + 2);
        let queries = HEADS * self.row() * 2;
        PLANES * (dense + probabilities + staged + merge) + queries
    }
}

/// 16-byte chunks of a full tile's compressed data: K bitmap, V bitmap, K values, V values.
/// They form one virtual array (in this order) that the plane's lanes stage together.
fn full_chunks(plan: &TilePlan) -> [usize; 4] {
    let bits = plan.tile_words() / 4;
    [
        bits,
        bits,
        TILE * plan.keep_k / CHUNK,
        TILE * plan.keep_v / CHUNK,
    ]
}

/// 16-byte chunk slots per lane: the virtual array of a full tile over 32 lanes.
pub(super) fn chunk_slots(plan: &TilePlan) -> usize {
    full_chunks(plan).iter().sum::<usize>().div_ceil(32)
}

/// Reads chunk `idx - start` of one part of the virtual array into `x`, if `idx` falls in the
/// part's `count` chunks starting at `start`.
#[cube]
fn load_part<N: Size>(
    src: &Array<Vector<u32, N>>,
    src0: usize,
    idx: usize,
    start: usize,
    count: usize,
    x: &mut Vector<u32, N>,
) {
    if idx >= start && idx < start + count {
        *x = src[src0 + idx - start];
    }
}

/// Step 1a for the tile of `nc` compressed rows from token `t0`: issues the loads of its
/// chunks into `chunks` (slot `u` = virtual chunk `lane + 32 u`), all in flight together.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_compressed<N: Size>(
    k_bits: &Array<Vector<u32, N>>,
    v_bits: &Array<Vector<u32, N>>,
    k_vals: &Array<Vector<u32, N>>,
    v_vals: &Array<Vector<u32, N>>,
    chunks: &mut Array<Vector<u32, N>>,
    srcs: &Array<usize>,
    nc: usize,
    lane: usize,
    #[comptime] plan: TilePlan,
) {
    let full = comptime!(full_chunks(&plan));
    let d = comptime!(plan.head_dim);
    let bits = (nc * d).div_ceil(128);
    let kc = (nc * comptime!(plan.keep_k)).div_ceil(CHUNK);
    let vc = (nc * comptime!(plan.keep_v)).div_ceil(CHUNK);
    #[unroll]
    for u in 0..comptime!(chunk_slots(&plan)) {
        let idx = lane + 32 * u;
        let mut x = Vector::<u32, N>::zeroed();
        load_part::<N>(k_bits, srcs[0], idx, 0usize, bits, &mut x);
        load_part::<N>(v_bits, srcs[1], idx, comptime!(full[0]), bits, &mut x);
        load_part::<N>(
            k_vals,
            srcs[2],
            idx,
            comptime!(full[0] + full[1]),
            kc,
            &mut x,
        );
        load_part::<N>(
            v_vals,
            srcs[3],
            idx,
            comptime!(full[0] + full[1] + full[2]),
            vc,
            &mut x,
        );
        chunks[u] = x;
    }
}

/// Writes chunk `j` of a tile's packed values of `keep` values per row into `dst[dst0..]`,
/// rows [`TilePlan::staged_row`] apart: the chunk as it is when rows are not padded, else each
/// of its 32-bit words into its padded row.
#[cube]
fn store_values<F: Float, N: Size>(
    x: Vector<u32, N>,
    j: usize,
    dst: &mut SharedMemory<F>,
    dst0: usize,
    #[comptime] keep: usize,
) {
    let len = comptime!(TilePlan::staged_tile(keep));
    if comptime!(TilePlan::staged_row(keep) == keep) {
        let size!(E) = CHUNK;
        let mut view = dst
            .slice_mut(dst0, dst0 + len)
            .into_vectorized()
            .with_vector_size::<E>();
        view[j] = Vector::<F, E>::reinterpret(x);
    } else {
        let size!(P) = 2usize;
        let row_words = comptime!(keep / 2);
        let mut view = dst
            .slice_mut(dst0, dst0 + len)
            .into_vectorized()
            .with_vector_size::<P>();
        #[unroll]
        for e in 0..4usize {
            let w = j * 4 + e;
            view[(w / row_words) * (row_words + 1) + w % row_words] =
                Vector::<F, P>::reinterpret(x[e]);
        }
    }
}

/// The first chunk of each part of the tile from token `t0` of `stream`, into `srcs`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_sources(
    srcs: &mut Array<usize>,
    stream: usize,
    t0: usize,
    bits_stride: u32,
    k_vals_stride: u32,
    v_vals_stride: u32,
    #[comptime] plan: TilePlan,
) {
    let bits = (stream * bits_stride as usize + t0 * comptime!(plan.head_dim) / 32) / 4;
    srcs[0] = bits;
    srcs[1] = bits;
    srcs[2] = (stream * k_vals_stride as usize + t0 * comptime!(plan.keep_k)) / CHUNK;
    srcs[3] = (stream * v_vals_stride as usize + t0 * comptime!(plan.keep_v)) / CHUNK;
}

/// Step 1b: writes the chunks loaded by [`load_compressed`] into the plane's staging areas:
/// bitmap words at `bits_s[words0..]` (K, then V a tile later), values at `vals_s[vals0..]`
/// (K, then V from `vals0 + k_tile`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_compressed<F: Float, N: Size>(
    chunks: &Array<Vector<u32, N>>,
    bits_s: &mut SharedMemory<u32>,
    words0: usize,
    vals_s: &mut SharedMemory<F>,
    vals0: usize,
    nc: usize,
    lane: usize,
    #[comptime] plan: TilePlan,
) {
    let full = comptime!(full_chunks(&plan));
    let d = comptime!(plan.head_dim);
    let (kk, vk) = comptime!((plan.keep_k, plan.keep_v));
    let k_tile = comptime!(TilePlan::staged_tile(plan.keep_k));
    let bits = (nc * d).div_ceil(128);
    let kc = (nc * kk).div_ceil(CHUNK);
    let vc = (nc * vk).div_ceil(CHUNK);
    let (b1, b2, b3) = comptime!((full[0], full[0] + full[1], full[0] + full[1] + full[2]));
    #[unroll]
    for u in 0..comptime!(chunk_slots(&plan)) {
        let idx = lane + 32 * u;
        let x = chunks[u];
        if idx < b2 {
            // K bitmap chunks then V bitmap chunks: the tile's words, K then V.
            let part = idx / b1;
            let j = idx % b1;
            if j < bits {
                let mut words = bits_s
                    .slice_mut(words0, words0 + comptime!(2 * plan.tile_words()))
                    .into_vectorized()
                    .with_vector_size::<N>();
                words[part * b1 + j] = x;
            }
        } else if idx < b3 {
            let j = idx - b2;
            if j < kc {
                store_values::<F, N>(x, j, vals_s, vals0, kk);
            }
        } else {
            let j = idx - b3;
            if j < vc {
                store_values::<F, N>(x, j, vals_s, vals0 + k_tile, vk);
            }
        }
    }
}

/// Rebuilds tile row `r` of the dense tile at `dense[row0..]` from its bitmap (`bits`, the
/// tile's words from `bits0`) and packed values (`vals`, the row's first at `slot`): zeroes
/// the row, then writes each kept value at its channel, one loop per bitmap word.
#[cube]
#[allow(clippy::too_many_arguments)]
fn expand_row<F: Float, E: Size>(
    r: usize,
    bits: &SharedMemory<u32>,
    bits0: usize,
    vals: &SharedMemory<F>,
    slot0: usize,
    dense: &mut SharedMemory<F>,
    row0: usize,
    #[comptime] head_dim: usize,
) {
    let chunks = comptime!(head_dim / CHUNK);
    {
        let mut view = dense
            .slice_mut(row0, row0 + head_dim)
            .into_vectorized()
            .with_vector_size::<E>();
        #[unroll]
        for c in 0..chunks {
            view[c] = Vector::<F, E>::zeroed();
        }
    }
    let mut slot = slot0;
    if comptime!(head_dim >= 32) {
        let words = comptime!(head_dim / 32);
        #[unroll]
        for wi in 0..words {
            let mut word = bits[bits0 + r * words + wi];
            while word != 0u32 {
                let j = wi * 32 + word.trailing_zeros() as usize;
                word &= word - 1u32;
                dense[row0 + j] = vals[slot];
                slot += 1;
            }
        }
    } else {
        // head_dim 16: two rows per word.
        let mut word = (bits[bits0 + r / 2] >> ((r % 2) * 16) as u32) & 0xffffu32;
        while word != 0u32 {
            let j = word.trailing_zeros() as usize;
            word &= word - 1u32;
            dense[row0 + j] = vals[slot];
            slot += 1;
        }
    }
}

/// Chunks of dense rows each lane stages per batch (K and V each) in the dense kernel: all the
/// loads of a batch are issued before any store, so a tile costs one or two memory round trips
/// instead of one per chunk (dense B = 8, T = 32K: 383 -> 316 us).
const DENSE_BATCH: usize = 8;
/// The same in the sparse kernel, where only window tiles have dense rows: a large batch's
/// registers would be allocated for the whole kernel (16 chunks took a third of its occupancy:
/// sparse B = 8, T = 32K 365 -> 504 us).
const WINDOW_BATCH: usize = 1;

/// Step 1 for the dense rows `[nc, n)` of a tile (the window, or every row in the dense
/// kernel): their K and V rows from `k_win`/`v_win` (tile row `r` is window row
/// `first + r - skip`, at element `win0 + (first + r - skip) * d`) into
/// the plane's dense tiles at `dense[dense0..]`, and zeros for the rows `[n, TILE)` past the
/// split's end. Rows below `nc` (compressed, expanded later) are left alone.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_dense_rows<F: Float, N: Size>(
    k_win: &Array<Vector<u32, N>>,
    v_win: &Array<Vector<u32, N>>,
    win0: usize,
    first: usize,
    skip: usize,
    dense: &mut SharedMemory<F>,
    dense0: usize,
    nc: usize,
    n: usize,
    lane: usize,
    #[comptime] plan: TilePlan,
) {
    let size!(E) = CHUNK;
    let d = comptime!(plan.head_dim);
    let row = comptime!(plan.row());
    let row_chunks = comptime!(plan.head_dim / CHUNK);
    // Chunk slots per lane for a whole tile (one kind), in batches.
    let slots = comptime!(TILE * plan.head_dim / CHUNK / 32);
    let batch = comptime!(slots.min(if plan.sparse {
        WINDOW_BATCH
    } else {
        DENSE_BATCH
    }));
    let v_tile = comptime!(TILE * plan.row() / CHUNK);
    let mut tiles = dense
        .slice_mut(dense0, dense0 + comptime!(2 * TILE * plan.row()))
        .into_vectorized()
        .with_vector_size::<E>();
    let mut ks = Array::<Vector<u32, N>>::new(batch);
    let mut vs = Array::<Vector<u32, N>>::new(batch);
    #[unroll]
    for b0 in 0..comptime!(slots / batch) {
        #[unroll]
        for u in 0..batch {
            let i = lane + 32 * (b0 * batch + u);
            let r = i / row_chunks;
            let mut kx = Vector::<u32, N>::zeroed();
            let mut vx = Vector::<u32, N>::zeroed();
            if r >= nc && r < n {
                let src = (win0 + (first + r - skip) * d) / CHUNK + i % row_chunks;
                kx = k_win[src];
                vx = v_win[src];
            }
            ks[u] = kx;
            vs[u] = vx;
        }
        #[unroll]
        for u in 0..batch {
            let i = lane + 32 * (b0 * batch + u);
            let r = i / row_chunks;
            if r >= nc {
                let at = r * (row / CHUNK) + i % row_chunks;
                tiles[at] = Vector::<F, E>::reinterpret(ks[u]);
                tiles[at + v_tile] = Vector::<F, E>::reinterpret(vs[u]);
            }
        }
    }
}

/// The tensor-core split kernel (module docs). Arguments as the CUDA-core split kernel's,
/// except that every buffer but the queries and lengths is read as 16-byte chunks of `u32`
/// (`N` = 4) and the queries as scalars.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_split_tc_kernel<F: Float, N: Size>(
    q: &Array<F>,
    k_bits: &Array<Vector<u32, N>>,
    k_vals: &Array<Vector<u32, N>>,
    v_bits: &Array<Vector<u32, N>>,
    v_vals: &Array<Vector<u32, N>>,
    k_win: &Array<Vector<u32, N>>,
    v_win: &Array<Vector<u32, N>>,
    lens: &Array<u32>,
    part_o: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    bits_stride: u32,
    k_vals_stride: u32,
    v_vals_stride: u32,
    win_stride: u32,
    split_tokens: u32,
    q_heads: u32,
    scale: f32,
    #[comptime] plan: TilePlan,
) {
    let (d, group, sparse) = comptime!((plan.head_dim, plan.group, plan.sparse));
    let steps = comptime!(plan.head_dim / 16);
    let row = comptime!(plan.row());
    let tile_words = comptime!(plan.tile_words());
    let size!(E) = CHUNK;
    let size!(P) = 2usize;

    // Per plane: dense K then V tile; probabilities [head][token]; staged bitmap words (K, V)
    // and packed values (K, V).
    let dense_len = comptime!(2 * TILE * plan.row());
    let words_len = comptime!(if plan.sparse {
        2 * plan.tile_words()
    } else {
        1
    });
    let (k_row, v_row) = comptime!((
        TilePlan::staged_row(plan.keep_k),
        TilePlan::staged_row(plan.keep_v)
    ));
    let k_tile = comptime!(TilePlan::staged_tile(plan.keep_k));
    let vals_len = comptime!(if plan.sparse {
        TilePlan::staged_tile(plan.keep_k) + TilePlan::staged_tile(plan.keep_v)
    } else {
        CHUNK
    });
    let mut dense_s = SharedMemory::<F>::new_aligned(comptime!(PLANES * dense_len), 16usize);
    let mut p_s = SharedMemory::<F>::new(comptime!(PLANES * HEADS * TILE));
    let mut q_s = SharedMemory::<F>::new_aligned(comptime!(HEADS * plan.row()), 16usize);
    let mut bits_s = SharedMemory::<u32>::new_aligned(comptime!(PLANES * words_len), 16usize);
    let mut vals_s = SharedMemory::<F>::new_aligned(comptime!(PLANES * vals_len), 16usize);
    let mut o_s = SharedMemory::<f32>::new(comptime!(PLANES * plan.group * plan.head_dim));
    let mut ml_s = SharedMemory::<f32>::new(comptime!(PLANES * plan.group * 2));

    let b = CUBE_POS_Z as usize;
    let h = CUBE_POS_Y as usize;
    let split = CUBE_POS_X as usize;
    let kv_heads = CUBE_COUNT_Y as usize;
    let splits = CUBE_COUNT_X as usize;
    // lens: the compressed lengths of the rows, their window lengths, their sequences.
    let stream = lens[2 * CUBE_COUNT_Z as usize + b] as usize * kv_heads + h;
    let plane = UNIT_POS as usize / 32;
    let lane = UNIT_POS as usize % 32;
    // mma fragment coordinates.
    let g = lane / 4;
    let c = lane % 4;
    let tc = lens[b] as usize;
    let total = tc + lens[CUBE_COUNT_Z as usize + b] as usize;
    let s0 = split * split_tokens as usize;
    let s1 = min(s0 + split_tokens as usize, total);

    let def = MmaDefinition::<F, F, f32>::new(16usize, HEADS, 16usize);

    // The queries of the group, [head][channel] rows of `row` elements (heads past the group
    // zero): the B operand of the scores, read per 16-channel step with `ldmatrix` (kept in
    // shared memory rather than in 2 d / 16 registers per lane).
    let row0 = b * q_heads as usize + h * group;
    let mut i = UNIT_POS as usize;
    while i < HEADS * d {
        let head = i / d;
        let ch = i % d;
        let mut x = F::new(0.0);
        if head < group {
            x = q[(row0 + head) * d + ch];
        }
        q_s[head * row + ch] = x;
        i += UNITS;
    }
    sync_cube();

    // Output accumulators: per 16-channel step, rows (channels) g and g+8 at heads 2c, 2c+1.
    let mut o = Array::<Vector<f32, P>>::new(comptime!(2 * steps));
    #[unroll]
    for i in 0..comptime!(2 * steps) {
        o[i] = Vector::<f32, P>::zeroed();
    }
    let mut m_run = Array::<f32>::new(2usize);
    let mut l_run = Array::<f32>::new(2usize);
    #[unroll]
    for e in 0..2usize {
        m_run[e] = f32::new(-3.0e38);
        l_run[e] = 0.0;
    }

    let dense0 = plane * dense_len;
    let words0 = plane * words_len;
    let vals0 = plane * vals_len;
    let p0 = plane * HEADS * TILE;
    // This lane's row in the expansion step: keys for lanes 0..16, values for 16..32.
    let kind = lane / TILE;
    let r_own = lane % TILE;

    // Chunk sources of a tile (K bitmap, V bitmap, K values, V values) and its loaded chunks.
    let mut srcs = Array::<usize>::new(4usize);
    let mut chunks = Array::<Vector<u32, N>>::new(comptime!(chunk_slots(&plan)));
    let mut t0 = s0 + plane * TILE;
    if sparse && t0 < min(s1, tc) {
        let first_nc = min(min(TILE, s1 - t0), tc - t0);
        tile_sources(
            &mut srcs,
            stream,
            t0,
            bits_stride,
            k_vals_stride,
            v_vals_stride,
            plan,
        );
        load_compressed::<N>(
            k_bits,
            v_bits,
            k_vals,
            v_vals,
            &mut chunks,
            &srcs,
            first_nc,
            lane,
            plan,
        );
    }
    while t0 < s1 {
        let n = min(TILE, s1 - t0);
        // Compressed rows of this tile: [0, nc).
        let mut nc = 0usize;
        if sparse && t0 < tc {
            nc = min(n, tc - t0);
        }

        // Step 1: stage. The compressed chunks of this tile were loaded during the previous
        // one (or before the loop); the next tile's are loaded once these are stored.
        if sparse && nc > 0 {
            store_compressed::<F, N>(
                &chunks,
                &mut bits_s,
                words0,
                &mut vals_s,
                vals0,
                nc,
                lane,
                plan,
            );
        }
        let next = t0 + comptime!(PLANES * TILE);
        if sparse && next < min(s1, tc) {
            let next_nc = min(min(TILE, s1 - next), tc - next);
            tile_sources(
                &mut srcs,
                stream,
                next,
                bits_stride,
                k_vals_stride,
                v_vals_stride,
                plan,
            );
            load_compressed::<N>(
                k_bits,
                v_bits,
                k_vals,
                v_vals,
                &mut chunks,
                &srcs,
                next_nc,
                lane,
                plan,
            );
        }
        if nc < TILE {
            // Window row of tile row r: t0 + r - tc (r >= nc, so never negative).
            let win0 = stream * win_stride as usize;
            let first = t0 - min(tc, t0);
            let skip = tc - min(tc, t0);
            stage_dense_rows::<F, N>(
                k_win,
                v_win,
                win0,
                first,
                skip,
                &mut dense_s,
                dense0,
                nc,
                n,
                lane,
                plan,
            );
        }
        sync_plane();

        // Step 2: expand the compressed rows.
        if sparse && nc > 0 {
            if r_own < nc {
                let stride = select(kind == 0, k_row, v_row);
                let slot0 = vals0 + kind * k_tile + r_own * stride;
                expand_row::<F, E>(
                    r_own,
                    &bits_s,
                    words0 + kind * tile_words,
                    &vals_s,
                    slot0,
                    &mut dense_s,
                    dense0 + kind * TILE * row + r_own * row,
                    d,
                );
            }
            sync_plane();
        }

        // Step 3: scores S^T (16 tokens x 8 heads) = K Q^T.
        let mut s = Array::<Vector<f32, P>>::new(2usize);
        s[0] = Vector::<f32, P>::zeroed();
        s[1] = Vector::<f32, P>::zeroed();
        #[unroll]
        for ks in 0..steps {
            // Lane l gives row l % 16 (token), channels 16ks + 8 (l / 16).
            let at = dense0 + (lane % 16) * row + ks * 16 + (lane / 16) * 8;
            let a = def.load_matrix::<F, P>(
                &dense_s.slice(at, at + CHUNK),
                MatrixIdent::A,
                4usize,
                false,
            );
            // Lanes 0..8 give head l of channels 16ks.., lanes 8..16 of 16ks + 8.. (the
            // others repeat them: every lane must give a valid address).
            let qa = ((lane % 8) * row) + ks * 16 + ((lane / 8) % 2) * 8;
            let bq =
                def.load_matrix::<F, P>(&q_s.slice(qa, qa + CHUNK), MatrixIdent::B, 2usize, false);
            def.execute_inplace(&a, &bq, &mut s);
        }

        // Step 4a: online softmax for heads 2c, 2c+1 over tokens g, g+8.
        #[unroll]
        for e in 0..2usize {
            let x0 = select(g < n, s[0][e] * scale, f32::new(-3.0e38));
            let x1 = select(g + 8 < n, s[1][e] * scale, f32::new(-3.0e38));
            let mut mx = max(x0, x1);
            mx = max(mx, plane_shuffle_xor(mx, 4u32));
            mx = max(mx, plane_shuffle_xor(mx, 8u32));
            mx = max(mx, plane_shuffle_xor(mx, 16u32));
            let m_new = max(m_run[e], mx);
            let alpha = Exp::exp(m_run[e] - m_new);
            let pa = Exp::exp(x0 - m_new);
            let pb = Exp::exp(x1 - m_new);
            l_run[e] = l_run[e] * alpha + pa + pb;
            m_run[e] = m_new;
            #[unroll]
            for i in 0..comptime!(2 * steps) {
                let mut v = o[i];
                v[e] *= alpha;
                o[i] = v;
            }
            let head = 2 * c + e;
            p_s[p0 + head * TILE + g] = F::cast_from(pa);
            p_s[p0 + head * TILE + g + 8] = F::cast_from(pb);
        }
        sync_plane();
        // P^T as the B operand: tokens 2c, 2c+1 and 2c+8, 2c+9 of head g.
        let mut pf = Array::<Vector<F, P>>::new(2usize);
        #[unroll]
        for half in 0..2usize {
            let at = p0 + g * TILE + half * 8 + 2 * c;
            let mut v = Vector::<F, P>::empty();
            v[0] = p_s[at];
            v[1] = p_s[at + 1];
            pf[half] = v;
        }

        // Step 4b: O^T (d x 8 heads) += V^T P^T. ldmatrix.trans: lane l gives token
        // l % 8 + 8 (l / 16), channels 16mt + 8 ((l / 8) % 2).
        let vt = dense0 + comptime!(TILE * plan.row());
        #[unroll]
        for mt in 0..steps {
            let at = vt + (lane % 8 + 8 * (lane / 16)) * row + mt * 16 + ((lane / 8) % 2) * 8;
            let a = def.load_matrix::<F, P>(
                &dense_s.slice(at, at + CHUNK),
                MatrixIdent::A,
                4usize,
                true,
            );
            let mut acc = Array::<Vector<f32, P>>::new(2usize);
            acc[0] = o[2 * mt];
            acc[1] = o[2 * mt + 1];
            def.execute_inplace(&a, &pf, &mut acc);
            o[2 * mt] = acc[0];
            o[2 * mt + 1] = acc[1];
        }
        // The next tile's staging overwrites what this one read.
        sync_plane();
        t0 += comptime!(PLANES * TILE);
    }

    // Merge the planes: sums over the lanes of a head (tokens g), then over planes through
    // shared memory.
    #[unroll]
    for e in 0..2usize {
        let mut l = l_run[e];
        l += plane_shuffle_xor(l, 4u32);
        l += plane_shuffle_xor(l, 8u32);
        l += plane_shuffle_xor(l, 16u32);
        let head = 2 * c + e;
        if g == 0 && head < group {
            ml_s[(plane * group + head) * 2] = m_run[e];
            ml_s[(plane * group + head) * 2 + 1] = l;
        }
    }
    sync_cube();
    #[unroll]
    for e in 0..2usize {
        let head = 2 * c + e;
        if head < group {
            let mut m_all = f32::new(-3.0e38);
            #[unroll]
            for p in 0..PLANES {
                m_all = max(m_all, ml_s[(p * group + head) * 2]);
            }
            let factor = Exp::exp(m_run[e] - m_all);
            #[unroll]
            for mt in 0..steps {
                #[unroll]
                for half in 0..2usize {
                    let ch = mt * 16 + g + 8 * half;
                    let v = o[2 * mt + half];
                    o_s[(plane * group + head) * d + ch] = v[e] * factor;
                }
            }
        }
    }
    sync_cube();
    let mut i = UNIT_POS as usize;
    while i < group * d {
        let head = i / d;
        let ch = i % d;
        let mut sum = 0.0f32;
        #[unroll]
        for p in 0..PLANES {
            sum += o_s[(p * group + head) * d + ch];
        }
        part_o[((row0 + head) * splits + split) * d + ch] = sum;
        i += UNITS;
    }
    if UNIT_POS < group as u32 {
        let head = UNIT_POS as usize;
        let mut m_all = f32::new(-3.0e38);
        #[unroll]
        for p in 0..PLANES {
            m_all = max(m_all, ml_s[(p * group + head) * 2]);
        }
        let mut l_all = 0.0f32;
        #[unroll]
        for p in 0..PLANES {
            let at = (p * group + head) * 2;
            l_all += ml_s[at + 1] * Exp::exp(ml_s[at] - m_all);
        }
        let at = ((row0 + head) * splits + split) * 2;
        part_ml[at] = m_all;
        part_ml[at + 1] = l_all;
    }
}
