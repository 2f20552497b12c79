//! Split-K (flash-decoding) decode attention over a compressed segment plus a dense window,
//! and the dense baseline from the same source.
//!
//! One cube handles one (sequence, KV head, split of the token range) for all query heads of
//! the KV head's GQA group, so each byte of the cache is read once per step, not once per
//! query head. The split is walked in tiles of `tile` tokens (one unit per token); each tile
//! is four named steps:
//!
//! 1. **Stage** (`stage_compressed`, `stage_rows`): the tile's compressed bitmap words and
//!    packed values (K and V, loaded together as 32-bit words so that many loads are in
//!    flight), or in the dense kernel its key rows, are copied from global memory into shared
//!    memory with coalesced loads. Rows read by one unit each get a padded stride where their
//!    natural one would put every unit in the same bank.
//! 2. **Scores** (`sparse_scores`, `dense_scores`): one unit per token computes the scores
//!    of every query head of the group. A compressed key row is walked bit by bit (one loop
//!    per bitmap word), so only its kept values are multiplied ("load compressed, compute
//!    sparse"): one gather of the query vector of the group per kept value. The same unit records, per bitmap word of its value
//!    row, how many values the earlier words keep.
//! 3. **Softmax state** (`cube_reduce`): the tile's maximum per head, the rescale factor of
//!    what was accumulated so far, and the tile's probabilities, shared through memory.
//! 4. **Values** (`sparse_values`, `dense_values`): each unit owns `vec` consecutive
//!    channels of one row at a time (a whole row is `head_dim / vec` units) and accumulates
//!    `p * v` in registers. For a compressed row it finds its values by popcount of the bits
//!    below its channels (the word prefix from step 2 plus the bits of its own word), so no
//!    row is expanded in shared memory.
//!
//! Positions at or past the segment length come from the dense window, in the same pass. Each
//! split writes its unnormalised output, running max and sum; a second kernel merges the
//! splits. Reductions use plane (warp) operations where the device has them and a
//! shared-memory tree elsewhere (lavapipe), chosen at compile time.
//!
//! The softmax "minus infinity" is the finite -3e38, because WGSL has no infinity literals.
//!
//! The dense baseline is this kernel with the compressed part compiled out (`sparse = false`):
//! all tokens come from the dense arrays, key rows staged the same way.
//!
//! On CUDA with 16-bit values, [`DecodeKernel::Auto`] runs the kernel of the `tensor_core`
//! module instead (same split contract and merge): each plane expands its tiles' compressed
//! rows into dense tiles and runs both products on 16x8x16 matrix units. The kernel described
//! above serves every other runtime and type (f32, wgpu, lavapipe) and
//! [`DecodeKernel::Simt`].
//!
//! Runtimes other than CUDA whose planes are 32 units wide run the kernel of the `sliced`
//! module instead (same split contract and merge): one plane per cube, each unit a slice of
//! every key and value row (compressed ones decoded by popcount), the scores summed across
//! the plane by a butterfly of shuffles, so nothing is staged in shared memory and no barrier
//! waits on a tile's loads (those runtimes' compilers do not keep loads in flight across a
//! barrier or a loop trip).
//!
//! [`prefill_attention`] is the prompt's causal self-attention of an exact prefill, flash-style
//! on matrix units (module `prefill`).

mod prefill;
mod sliced;
mod tensor_core;

pub use prefill::{prefill_attention, prefill_attention_unsupported};

use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::reduce::cube_reduce;
use crate::upload::upload_u32;
use crate::{FloatElement, MmaApi, check_type_supported, has_mma, vector_size};
use sliced::SlicedPlan;
use sparsekv_format::{HeadDim, Sparsity, keep_count};
use tensor_core::TilePlan;

/// Cubes to aim for when splitting the token range: several waves of resident cubes on a large
/// GPU, so that the last, partial wave is a small part of the call.
const TARGET_CUBES: usize = 4096;
/// Cubes to aim for with the dense tensor-core kernel at head_dim 128 and more (see the split
/// rule in [`decode_attention_with`]).
const DENSE_TC_CUBES: usize = 2048;
/// Most splits per stream: the merge kernel walks every split of a row serially (twice), so
/// small batches (few streams) must not turn into hundreds of tiny splits.
const MAX_SPLITS: usize = 64;
/// Fewest tiles in a split, so per-split work (query load, final reductions, the merge) stays
/// small against the tiles.
const MIN_TILES_PER_SPLIT: usize = 2;
/// Fewest loads each unit issues before it stores any of them, when staging a tile.
const STAGE_UNROLL: usize = 4;
/// Bytes a unit of the CUDA-core kernel loads together on CUDA: dense rows in the key staging
/// and in the value step (4 vectors of 16 bytes), and compressed words in the staging of a
/// tile (16 words).
const IN_FLIGHT_BYTES: usize = 64;
/// The most row vectors a unit loads together on CUDA (narrow vectors of small head
/// dimensions would otherwise unroll the value step many times over).
const MAX_VALUE_BATCH: usize = 8;
/// Tokens per tile where the shader compiler does not keep the loads of successive loop trips
/// in flight by itself (every runtime but CUDA; measured on NVIDIA's Vulkan driver, where a
/// unit's loads are only in flight together when the code issues them together): a tile small
/// enough that one unit loads all of its value rows at once (a 16-token tile is one row per
/// token lane at head_dim 128).
const UNPIPELINED_TILE: usize = 16;
/// Row vectors a unit loads together there: a whole 16-token tile of dense rows.
const UNPIPELINED_BATCH_DENSE: usize = 16;
/// The same for the kernel that reads compressed rows, whose decode needs the registers
/// (batches of 16 took 255 registers a unit on NVIDIA's Vulkan driver, against 207 with 8).
const UNPIPELINED_BATCH_SPARSE: usize = 8;
/// The largest tile, in tokens; smaller when shared memory does not allow it.
const MAX_TILE: usize = 128;
/// The smallest tile: a whole bitmap word at every head_dim, and enough for lavapipe's
/// 32 KB of shared memory at head_dim 256 in f32.
const MIN_TILE: usize = 8;

/// How the value staging turns a 32-bit word of packed values into values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Unpack {
    /// One f32 per word, or two 16-bit values by a bit cast of the word to a 2-vector (CUDA,
    /// SPIR-V).
    Bitcast,
    /// Two f16 decoded with integer operations: WGSL's `bitcast` cannot turn a `u32` into a
    /// `vec2<f16>` in naga, the shader compiler of wgpu.
    F16Bits,
    /// Two bf16, each the high half of an f32.
    Bf16Bits,
}

/// Static launch parameters of the split kernel, chosen on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SplitPlan {
    /// Elements per head.
    head_dim: usize,
    /// Query heads per KV head.
    group: usize,
    /// Query heads per vector of the staged query and probabilities (divides `group`).
    group_vec: usize,
    /// Tokens per tile.
    tile: usize,
    /// Units per cube: one per token of a tile, and at least one row of the value step.
    units: usize,
    /// Elements per vector load (16 bytes at most) = channels a unit owns in the value step.
    vec: usize,
    /// Kept values per key row and per value row (0 for the dense kernel).
    keep_k: usize,
    keep_v: usize,
    /// Shared-memory stride of a staged key / value row, in elements (padded `keep`).
    k_row: usize,
    v_row: usize,
    /// Bitmap words per row (at least 1).
    words: usize,
    /// Bytes per value.
    elem: usize,
    /// How a staged 32-bit word of packed values becomes values.
    unpack: Unpack,
    /// Whether a compressed segment is read.
    sparse: bool,
    /// Whether plane operations are used.
    use_plane: bool,
    /// Dense row vectors a unit loads together in the value step ([`IN_FLIGHT_BYTES`] per
    /// unit on CUDA, a whole tile's elsewhere); the stagings follow it
    /// ([`SplitPlan::row_unroll`], [`SplitPlan::word_unroll`]).
    value_batch: usize,
    /// Whether the call has one split per row, so the split kernel normalises its result and
    /// writes the output itself (no partials, no merge launch: short contexts, where a
    /// decode step's attention is two launches of almost no work).
    direct: bool,
}

impl SplitPlan {
    /// Shared-memory stride of `keep` staged values of `elem` bytes: padded so that the rows
    /// read by consecutive units start in different banks (an odd number of 4-byte words, or
    /// a row that is not a whole number of words).
    fn padded_values(keep: usize, elem: usize) -> usize {
        if (keep * elem).is_multiple_of(8) {
            keep + (4 / elem).max(1)
        } else {
            keep
        }
    }

    /// Dense row vectors a unit loads together when staging key rows: `value_batch`, at
    /// least [`STAGE_UNROLL`].
    fn row_unroll(&self) -> usize {
        self.value_batch.max(STAGE_UNROLL)
    }

    /// Words of compressed data (bitmaps, packed values) a unit loads together when staging
    /// a tile: the bytes of `value_batch` row vectors, at least [`STAGE_UNROLL`] words.
    fn word_unroll(&self) -> usize {
        (self.value_batch * self.vec * self.elem / 4).max(STAGE_UNROLL)
    }

    /// Shared memory a split cube uses, in bytes (mirrors the kernel's allocations).
    fn shared_bytes(&self) -> usize {
        let (d, g, t, u, elem) = (self.head_dim, self.group, self.tile, self.units, self.elem);
        let common = 4 * (g * d + g * u + (g * u).max(d));
        if self.sparse {
            let bits = (t * d).div_ceil(32);
            common + 4 * (2 * bits + t * self.words) + elem * (t * (self.k_row + self.v_row) + 4)
        } else {
            common + elem * t * (d + self.vec)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        head_dim: usize,
        group: usize,
        keep_k: usize,
        keep_v: usize,
        elem: usize,
        unpack: Unpack,
        vec: usize,
        sparse: bool,
        use_plane: bool,
        pipelined_loads: bool,
        limit: usize,
        max_units: usize,
    ) -> Result<Self> {
        let words = (head_dim / 32).max(1);
        let row_units = head_dim / vec;
        // The tile to start from (halved below while shared memory does not allow it) and the
        // row vectors a unit loads together.
        let pipelined_batch = (IN_FLIGHT_BYTES / (vec * elem)).clamp(1, MAX_VALUE_BATCH);
        let (rows, value_batch) = match (pipelined_loads, sparse) {
            (true, true) => (MAX_TILE, pipelined_batch),
            // Dense key rows take the most shared memory: about 16 KB of them per tile.
            (true, false) => (8192 / head_dim, pipelined_batch),
            (false, true) => (UNPIPELINED_TILE, UNPIPELINED_BATCH_SPARSE),
            (false, false) => (UNPIPELINED_TILE, UNPIPELINED_BATCH_DENSE),
        };
        let plan = |tile: usize| SplitPlan {
            head_dim,
            group,
            group_vec: group.min(4),
            tile,
            units: tile.max(row_units),
            vec,
            keep_k,
            keep_v,
            k_row: Self::padded_values(keep_k, elem),
            // Value rows are read along the row (not one row per unit): no padding.
            v_row: keep_v,
            words,
            elem,
            unpack,
            sparse,
            use_plane,
            value_batch,
            direct: false,
        };
        let mut tile = rows.clamp(MIN_TILE, MAX_TILE).min(max_units);
        while tile > MIN_TILE && plan(tile).shared_bytes() > limit {
            tile /= 2;
        }
        let chosen = plan(tile);
        let need = chosen.shared_bytes();
        if need > limit || chosen.units > max_units {
            return Err(KernelError::InvalidArguments(format!(
                "decode attention needs {need} bytes of shared memory and {} units per cube (head_dim {head_dim}, group {group}); the device allows {limit} bytes and {max_units} units",
                chosen.units
            )));
        }
        Ok(chosen)
    }
}

/// Copies `count` consecutive items from `src[src0..]` into shared memory, as rows of `row`
/// items placed `stride` apart (`stride >= row`; equal for a plain copy). Every unit of the
/// cube takes part, consecutive units reading consecutive items (coalesced); each unit issues
/// `unroll` loads before it stores them, so that many loads are in flight.
#[cube]
fn stage_rows<T: CubePrimitive>(
    src: &Array<T>,
    src0: usize,
    count: usize,
    dst: &mut SharedMemory<T>,
    #[comptime] row: usize,
    #[comptime] stride: usize,
    #[comptime] units: usize,
    #[comptime] unroll: usize,
) {
    let mut i = UNIT_POS as usize;
    while i < count {
        let mut staged = Array::<T>::new(unroll);
        #[unroll]
        for u in 0..unroll {
            let j = i + u * units;
            if j < count {
                staged[u] = src[src0 + j];
            }
        }
        #[unroll]
        for u in 0..unroll {
            let j = i + u * units;
            if j < count {
                if comptime!(row == stride) {
                    dst[j] = staged[u];
                } else {
                    dst[(j / row) * stride + j % row] = staged[u];
                }
            }
        }
        i += unroll * units;
    }
}

/// Copies the packed values of a tile into shared memory as 32-bit words (coalesced, one or
/// two values each), `words` words from `src[src0..]`, unpacking each word into its values.
/// With `row_words > 0`, the values form rows of `row_words` words that are placed
/// `row_words + 1` words apart (the padded stride of [`SplitPlan::padded_values`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_values<F: Float>(
    src: &Array<u32>,
    src0: usize,
    words: usize,
    dst: &mut SharedMemory<F>,
    #[comptime] row_words: usize,
    #[comptime] elem: usize,
    #[comptime] unpack: Unpack,
    #[comptime] units: usize,
    #[comptime] unroll: usize,
) {
    let per_word = comptime!(4 / elem);
    let size!(P) = per_word;
    let mut i = UNIT_POS as usize;
    while i < words {
        let mut staged = Array::<u32>::new(unroll);
        #[unroll]
        for u in 0..unroll {
            let j = i + u * units;
            if j < words {
                staged[u] = src[src0 + j];
            }
        }
        #[unroll]
        for u in 0..unroll {
            let j = i + u * units;
            if j < words {
                let at = if comptime!(row_words > 0) {
                    ((j / row_words) * (row_words + 1) + j % row_words) * per_word
                } else {
                    j * per_word
                };
                let word = staged[u];
                match comptime!(unpack) {
                    Unpack::Bitcast => {
                        if comptime!(per_word == 1) {
                            dst[at] = F::reinterpret(word);
                        } else {
                            let values = Vector::<F, P>::reinterpret(word);
                            #[unroll]
                            for e in 0..per_word {
                                dst[at + e] = values[e];
                            }
                        }
                    }
                    Unpack::F16Bits => {
                        dst[at] = F::cast_from(f16_bits_to_f32(word & 0xffffu32));
                        dst[at + 1] = F::cast_from(f16_bits_to_f32(word >> 16u32));
                    }
                    Unpack::Bf16Bits => {
                        dst[at] = F::cast_from(f32::reinterpret(word << 16u32));
                        dst[at + 1] = F::cast_from(f32::reinterpret(word & 0xffff_0000u32));
                    }
                }
            }
        }
        i += unroll * units;
    }
}

/// Step 1 for a tile with `nc` compressed tokens from token `t0` of `stream`: its K and V
/// bitmap words and packed values into shared memory, all loads issued together. Value rows are
/// placed at the plan's strides (`k_row`, `v_row`; padded rows are whole words).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_compressed<F: Float>(
    k_bits: &Array<u32>,
    v_bits: &Array<u32>,
    k_vals: &Array<u32>,
    v_vals: &Array<u32>,
    kb_s: &mut SharedMemory<u32>,
    vb_s: &mut SharedMemory<u32>,
    kv_s: &mut SharedMemory<F>,
    vv_s: &mut SharedMemory<F>,
    stream: usize,
    t0: usize,
    nc: usize,
    bits_stride: u32,
    k_vals_stride: u32,
    v_vals_stride: u32,
    #[comptime] plan: SplitPlan,
    #[comptime] units: usize,
) {
    let d = comptime!(plan.head_dim);
    let w0 = stream * bits_stride as usize + t0 * d / 32;
    let nw = (nc * d).div_ceil(32);
    let unroll = comptime!(plan.word_unroll());
    stage_rows::<u32>(k_bits, w0, nw, kb_s, 1usize, 1usize, units, unroll);
    stage_rows::<u32>(v_bits, w0, nw, vb_s, 1usize, 1usize, units, unroll);
    let (kk, vk, elem) = comptime!((plan.keep_k, plan.keep_v, plan.elem));
    let per_word = comptime!(4 / plan.elem);
    // Padded rows are whole words; otherwise the values are copied as they are.
    let (k_row_words, v_row_words) = comptime!((
        if plan.k_row != plan.keep_k {
            plan.keep_k * plan.elem / 4
        } else {
            0
        },
        if plan.v_row != plan.keep_v {
            plan.keep_v * plan.elem / 4
        } else {
            0
        }
    ));
    // Streams and tiles start on whole words (capacities are multiples of 8 tokens).
    let k0 = (stream * k_vals_stride as usize + t0 * kk) / per_word;
    let v0 = (stream * v_vals_stride as usize + t0 * vk) / per_word;
    let kw = (nc * kk).div_ceil(per_word);
    let vw = (nc * vk).div_ceil(per_word);
    let unpack = comptime!(plan.unpack);
    stage_values::<F>(
        k_vals,
        k0,
        kw,
        kv_s,
        k_row_words,
        elem,
        unpack,
        units,
        unroll,
    );
    stage_values::<F>(
        v_vals,
        v0,
        vw,
        vv_s,
        v_row_words,
        elem,
        unpack,
        units,
        unroll,
    );
}

/// The f32 value of the IEEE half-precision bits `h` (low 16 bits), exactly: normal numbers
/// by moving the exponent and mantissa, subnormals by scaling the mantissa, infinities and NaN
/// kept as such.
#[cube]
fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u32) << 16u32;
    let exponent = (h >> 10u32) & 0x1fu32;
    let mantissa = h & 0x3ffu32;
    let normal = f32::reinterpret(sign | ((exponent + 112u32) << 23u32) | (mantissa << 13u32));
    let special = f32::reinterpret(sign | 0x7f80_0000u32 | (mantissa << 13u32));
    // 2^-24, the value of the lowest mantissa bit of a subnormal half.
    let magnitude = f32::cast_from(mantissa) * 5.960_464_5e-8f32;
    let subnormal = select(sign != 0u32, -magnitude, magnitude);
    select(
        exponent == 0u32,
        subnormal,
        select(exponent == 31u32, special, normal),
    )
}

/// The bitmap bits of row `r` of a staged tile: for `head_dim >= 32` word `w` of the row, else
/// the row's `head_dim` bits of the word it shares, shifted down.
#[cube]
fn row_word(bits: &SharedMemory<u32>, r: usize, w: usize, #[comptime] head_dim: usize) -> u32 {
    if comptime!(head_dim >= 32) {
        bits[r * (head_dim / 32) + w]
    } else {
        let bit = r * head_dim;
        (bits[bit / 32] >> (bit % 32) as u32) & comptime!(((1u64 << head_dim) - 1) as u32)
    }
}

/// Step 2 for a compressed token (tile row `r`): adds `q_g . k` to `scores[g]` for every head
/// of the group, walking the row's set bits and multiplying only the kept values; the query
/// of the group for channel `j` is the `j`-th group vector of `q_s`. Also records, in
/// `v_prefix`, how many values of the token's value row the words before each word keep.
#[cube]
#[allow(clippy::too_many_arguments)]
fn sparse_scores<F: Float, GV: Size>(
    r: usize,
    k_bits: &SharedMemory<u32>,
    k_vals: &SharedMemory<F>,
    v_bits: &SharedMemory<u32>,
    v_prefix: &mut SharedMemory<u32>,
    q_s: &SharedMemory<Vector<f32, GV>>,
    scores: &mut Array<f32>,
    #[comptime] plan: SplitPlan,
) {
    let (d, words) = comptime!((plan.head_dim, plan.words));
    let (gv, ngv) = comptime!((plan.group_vec, plan.group / plan.group_vec));
    // One loop per bitmap word, as many trips as the word has set bits (cheaper than one
    // uniform loop over the row's `keep` values, which must look for the next non-empty word
    // on every trip: 36 instructions per value against about 20, measured in v3.1).
    let mut slot = r * comptime!(plan.k_row);
    #[unroll]
    for wi in 0..words {
        let mut word = row_word(k_bits, r, wi, d);
        while word != 0u32 {
            let j = wi * 32 + word.trailing_zeros() as usize;
            word &= word - 1u32;
            let x = f32::cast_from(k_vals[slot]);
            slot += 1;
            #[unroll]
            for v in 0..ngv {
                let qv = q_s[j * ngv + v];
                #[unroll]
                for e in 0..gv {
                    scores[v * gv + e] += qv[e] * x;
                }
            }
        }
    }
    if comptime!(words > 1) {
        let mut kept = 0u32;
        #[unroll]
        for wi in 0..words {
            v_prefix[r * words + wi] = kept;
            kept += v_bits[r * words + wi].count_ones();
        }
    }
}

/// Step 2 for one vector of a dense key row: channels `v * vec ..` of the token, `x`.
#[cube]
fn dense_scores<F: Float, N: Size, GV: Size>(
    x: Vector<F, N>,
    v: usize,
    q_s: &SharedMemory<Vector<f32, GV>>,
    scores: &mut Array<f32>,
    #[comptime] plan: SplitPlan,
) {
    let (vec, gv, ngv) = comptime!((plan.vec, plan.group_vec, plan.group / plan.group_vec));
    #[unroll]
    for e in 0..vec {
        let xe = f32::cast_from(x[e]);
        #[unroll]
        for g in 0..ngv {
            let qv = q_s[(v * vec + e) * ngv + g];
            #[unroll]
            for k in 0..gv {
                scores[g * gv + k] += qv[k] * xe;
            }
        }
    }
}

/// Step 4 for a compressed token (tile row `r`): this unit's `vec` channels from `c0`. Its
/// first value is at the number of kept bits below `c0` in the row: the prefix of the earlier
/// words plus the bits below it in its own word. Channels whose bit is clear add nothing (the
/// value read for them, the next kept one, is discarded).
#[cube]
#[allow(clippy::too_many_arguments)]
fn sparse_values<F: Float>(
    r: usize,
    c0: usize,
    v_bits: &SharedMemory<u32>,
    v_vals: &SharedMemory<F>,
    v_prefix: &SharedMemory<u32>,
    p: &Array<f32>,
    acc: &mut Array<f32>,
    #[comptime] plan: SplitPlan,
) {
    let (d, vec, group) = comptime!((plan.head_dim, plan.vec, plan.group));
    let words = comptime!(plan.words);
    let wi = c0 / 32;
    let shift = (c0 % 32) as u32;
    let word = row_word(v_bits, r, wi, d);
    let mut rank = (word & ((1u32 << shift) - 1u32)).count_ones() as usize;
    if comptime!(words > 1) {
        rank += v_prefix[r * words + wi] as usize;
    }
    let bits = word >> shift;
    let mut idx = r * comptime!(plan.v_row) + rank;
    #[unroll]
    for c in 0..vec {
        let kept = (bits >> c as u32) & 1u32;
        let x = select(kept == 1u32, f32::cast_from(v_vals[idx]), 0.0f32);
        idx += kept as usize;
        #[unroll]
        for g in 0..group {
            acc[g * vec + c] += p[g] * x;
        }
    }
}

/// Step 4 for a dense token: this unit's `vec` channels of its value row, `x`.
#[cube]
fn dense_values<F: Float, N: Size>(
    x: Vector<F, N>,
    p: &Array<f32>,
    acc: &mut Array<f32>,
    #[comptime] plan: SplitPlan,
) {
    let (vec, group) = comptime!((plan.vec, plan.group));
    #[unroll]
    for c in 0..vec {
        let xe = f32::cast_from(x[c]);
        #[unroll]
        for g in 0..group {
            acc[g * vec + c] += p[g] * xe;
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decode_split_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k_bits: &Array<u32>,
    k_vals: &Array<u32>,
    v_bits: &Array<u32>,
    v_vals: &Array<u32>,
    k_win: &Array<Vector<F, N>>,
    v_win: &Array<Vector<F, N>>,
    lens: &Array<u32>,
    part_o: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    out: &mut Array<F>,
    bits_stride: u32,
    k_vals_stride: u32,
    v_vals_stride: u32,
    win_stride: u32,
    split_tokens: u32,
    q_heads: u32,
    scale: f32,
    #[comptime] plan: SplitPlan,
) {
    let (d, group, vec) = comptime!((plan.head_dim, plan.group, plan.vec));
    let (tile, units) = comptime!((plan.tile, plan.units));
    let (gv, ngv) = comptime!((plan.group_vec, plan.group / plan.group_vec));
    let size!(GV) = gv;
    let sparse = comptime!(plan.sparse);
    // Vectors per row = units per row in the value step.
    let vpr = comptime!(plan.head_dim / plan.vec);
    let lanes = comptime!(plan.units / (plan.head_dim / plan.vec));
    let bits_cap = comptime!(if plan.sparse {
        (plan.tile * plan.head_dim).div_ceil(32)
    } else {
        1
    });
    // Values: the rows, a word's second value past the last row, and one value read past it.
    let (k_cap, v_cap) = comptime!(if plan.sparse {
        (plan.tile * plan.k_row + 2, plan.tile * plan.v_row + 2)
    } else {
        (1, 1)
    });
    let prefix_cap = comptime!(if plan.sparse && plan.words > 1 {
        plan.tile * plan.words
    } else {
        1
    });
    let (rows_cap, row_stride) = comptime!(if plan.sparse {
        (1, 1)
    } else {
        let vpr = plan.head_dim / plan.vec;
        (plan.tile * (vpr + 1), vpr + 1)
    });
    let red_cap = comptime!(if plan.group * plan.units > plan.head_dim {
        plan.group * plan.units
    } else {
        plan.head_dim
    });

    // q_s[j * ngv + v]: the scaled query of heads v*gv .. v*gv+gv, channel j.
    let mut q_s = SharedMemory::<Vector<f32, GV>>::new(d * ngv);
    // p_s[t * ngv + v]: the tile's probabilities of token t, same heads.
    let mut p_s = SharedMemory::<Vector<f32, GV>>::new(units * ngv);
    let mut red_s = SharedMemory::<f32>::new(red_cap);
    let mut kb_s = SharedMemory::<u32>::new(bits_cap);
    let mut vb_s = SharedMemory::<u32>::new(bits_cap);
    let mut pre_s = SharedMemory::<u32>::new(prefix_cap);
    let mut kv_s = SharedMemory::<F>::new(k_cap);
    let mut vv_s = SharedMemory::<F>::new(v_cap);
    let mut rows_s = SharedMemory::<Vector<F, N>>::new(rows_cap);

    let b = CUBE_POS_Z as usize;
    let h = CUBE_POS_Y as usize;
    let split = CUBE_POS_X as usize;
    let kv_heads = CUBE_COUNT_Y as usize;
    let splits = CUBE_COUNT_X as usize;
    // lens: the compressed lengths of the rows, their window lengths, their sequences.
    let stream = lens[2 * CUBE_COUNT_Z as usize + b] as usize * kv_heads + h;
    let tid = UNIT_POS as usize;
    let tc = lens[b] as usize;
    let total = tc + lens[CUBE_COUNT_Z as usize + b] as usize;
    let s0 = split * split_tokens as usize;
    let s1 = min(s0 + split_tokens as usize, total);
    // First vector of this stream's dense rows.
    let win0 = stream * win_stride as usize / vec;

    // The scaled queries of the group, transposed to channel-major group vectors.
    let q0 = (b * q_heads as usize + h * group) * vpr;
    let mut i = tid;
    while i < vpr * ngv {
        let jv = i / ngv;
        let v = i % ngv;
        let mut xs = Array::<Vector<F, N>>::new(gv);
        #[unroll]
        for e in 0..gv {
            xs[e] = q[q0 + (v * gv + e) * vpr + jv];
        }
        #[unroll]
        for k in 0..vec {
            let mut qv = Vector::<f32, GV>::empty();
            #[unroll]
            for e in 0..gv {
                qv[e] = f32::cast_from(xs[e][k]) * scale;
            }
            q_s[(jv * vec + k) * ngv + v] = qv;
        }
        i += units;
    }

    let mut m_run = Array::<f32>::new(group);
    let mut l_run = Array::<f32>::new(group);
    let mut acc = Array::<f32>::new(group * vec);
    #[unroll]
    for g in 0..group {
        m_run[g] = f32::new(-3.0e38);
        l_run[g] = 0.0;
        #[unroll]
        for c in 0..vec {
            acc[g * vec + c] = 0.0;
        }
    }
    let lane = tid / vpr;
    let c0 = (tid % vpr) * vec;
    sync_cube();

    let mut t0 = s0;
    while t0 < s1 {
        let n = min(tile, s1 - t0);
        // Step 1: stage. Compressed tokens of this tile: [t0, t0 + nc).
        let mut nc = 0usize;
        if sparse {
            if t0 < tc {
                nc = min(t0 + n, tc) - t0;
                stage_compressed::<F>(
                    k_bits,
                    v_bits,
                    k_vals,
                    v_vals,
                    &mut kb_s,
                    &mut vb_s,
                    &mut kv_s,
                    &mut vv_s,
                    stream,
                    t0,
                    nc,
                    bits_stride,
                    k_vals_stride,
                    v_vals_stride,
                    plan,
                    units,
                );
            }
        } else {
            let r0 = win0 + t0 * vpr;
            stage_rows::<Vector<F, N>>(
                k_win,
                r0,
                n * vpr,
                &mut rows_s,
                vpr,
                row_stride,
                units,
                comptime!(plan.row_unroll()),
            );
        }
        sync_cube();

        // Step 2: scores, one unit per token, for the whole group.
        let mut sc = Array::<f32>::new(group);
        #[unroll]
        for g in 0..group {
            sc[g] = f32::new(-3.0e38);
        }
        if tid < n {
            #[unroll]
            for g in 0..group {
                sc[g] = 0.0;
            }
            if sparse && tid < nc {
                sparse_scores::<F, GV>(tid, &kb_s, &kv_s, &vb_s, &mut pre_s, &q_s, &mut sc, plan);
            } else if sparse {
                let row = win0 + (t0 + tid - tc) * vpr;
                for v in 0..vpr {
                    dense_scores::<F, N, GV>(k_win[row + v], v, &q_s, &mut sc, plan);
                }
            } else {
                for v in 0..vpr {
                    dense_scores::<F, N, GV>(rows_s[tid * row_stride + v], v, &q_s, &mut sc, plan);
                }
            }
        }

        // Step 3: online softmax. Every unit tracks the same running max; sums stay per unit.
        let m_tile = cube_reduce(
            &sc,
            &mut red_s,
            group,
            units,
            true,
            comptime!(plan.use_plane),
        );
        let mut alpha = Array::<f32>::new(group);
        #[unroll]
        for v in 0..ngv {
            let mut pv = Vector::<f32, GV>::empty();
            #[unroll]
            for e in 0..gv {
                let g = v * gv + e;
                let m_new = max(m_run[g], m_tile[g]);
                alpha[g] = Exp::exp(m_run[g] - m_new);
                m_run[g] = m_new;
                let p = Exp::exp(sc[g] - m_new);
                l_run[g] = l_run[g] * alpha[g] + p;
                pv[e] = p;
            }
            p_s[tid * ngv + v] = pv;
        }
        sync_cube();

        // Step 4: values. Each unit owns `vec` channels of every `lanes`-th token.
        #[unroll]
        for g in 0..group {
            #[unroll]
            for c in 0..vec {
                acc[g * vec + c] *= alpha[g];
            }
        }
        // Tokens r, r + lanes, .. in batches of `value_batch`: the batch's dense rows are all
        // loaded before any is used, so that many loads are in flight even where the
        // compiler does not pipeline the loop by itself.
        let batch = comptime!(plan.value_batch);
        let mut r = lane;
        while r < n {
            let mut rows = Array::<Vector<F, N>>::new(batch);
            #[unroll]
            for u in 0..batch {
                let ru = r + u * lanes;
                if ru < n && !(sparse && ru < nc) {
                    rows[u] = v_win[win0 + (t0 + ru - tc) * vpr + c0 / vec];
                }
            }
            #[unroll]
            for u in 0..batch {
                let ru = r + u * lanes;
                if ru < n {
                    let mut p = Array::<f32>::new(group);
                    #[unroll]
                    for v in 0..ngv {
                        let pv = p_s[ru * ngv + v];
                        #[unroll]
                        for e in 0..gv {
                            p[v * gv + e] = pv[e];
                        }
                    }
                    if sparse && ru < nc {
                        sparse_values::<F>(ru, c0, &vb_s, &vv_s, &pre_s, &p, &mut acc, plan);
                    } else {
                        dense_values::<F, N>(rows[u], &p, &mut acc, plan);
                    }
                }
            }
            r += batch * lanes;
        }
        // Nobody may stage the next tile before every unit is done with this one.
        sync_cube();
        t0 += tile;
    }

    let l_total = cube_reduce(
        &l_run,
        &mut red_s,
        group,
        units,
        false,
        comptime!(plan.use_plane),
    );
    // Sum the token lanes through red_s (head_dim floats), one head and one lane at a time.
    let row0 = b * q_heads as usize + h * group;
    #[unroll]
    for g in 0..group {
        for l in 1..lanes {
            if lane == l {
                #[unroll]
                for c in 0..vec {
                    red_s[c0 + c] = acc[g * vec + c];
                }
            }
            sync_cube();
            if lane == 0 {
                #[unroll]
                for c in 0..vec {
                    acc[g * vec + c] += red_s[c0 + c];
                }
            }
            sync_cube();
        }
        if lane == 0 {
            #[unroll]
            for c in 0..vec {
                if comptime!(plan.direct) {
                    out[(row0 + g) * d + c0 + c] = F::cast_from(acc[g * vec + c] / l_total[g]);
                } else {
                    part_o[((row0 + g) * splits + split) * d + c0 + c] = acc[g * vec + c];
                }
            }
        }
    }
    if tid == 0 && comptime!(!plan.direct) {
        #[unroll]
        for g in 0..group {
            let at = ((row0 + g) * splits + split) * 2;
            part_ml[at] = m_run[g];
            part_ml[at + 1] = l_total[g];
        }
    }
}

/// Units per cube of the merge kernel at most, groups of units at most (each walks its share of
/// the splits), and the width of the vectors of the partial outputs a unit reads (16 bytes;
/// every head dimension is a multiple).
const MERGE_UNITS: usize = 256;
const MERGE_GROUPS: usize = 16;
const MERGE_VEC: usize = 4;

/// Merges the splits' partial softmax states of one query row per cube. The splits are dealt
/// round-robin to `groups` groups of units, each unit of a group owning one vector of the
/// row's channels: a group combines its splits (their largest maximum first, then the weighted
/// sums), then the first group combines the groups' states through shared memory. Dealing out
/// the splits keeps each unit's chain of loads short: with one unit per channel walking every
/// split, the merge took 12-20 us at B = 8, T = 32K on the H200 (31-57 splits) for 4-7 MB of
/// partial outputs, a chain of memory round trips rather than bandwidth.
#[cube(launch_unchecked)]
fn decode_merge_kernel<F: Float, N: Size>(
    part_o: &Array<Vector<f32, N>>,
    part_ml: &Array<f32>,
    out: &mut Array<F>,
    splits: u32,
    #[comptime] head_dim: usize,
    #[comptime] vec: usize,
    #[comptime] groups: usize,
) {
    let vpr = comptime!(head_dim / vec);
    let row = CUBE_POS_X as usize;
    let j = UNIT_POS as usize % vpr;
    let group = UNIT_POS as usize / vpr;
    let splits = splits as usize;
    let mut m_s = SharedMemory::<f32>::new(groups);
    let mut l_s = SharedMemory::<f32>::new(groups);
    let mut o_s = SharedMemory::<f32>::new(comptime!(groups * head_dim));

    // This group's splits: `group`, `group + groups`, ...
    let mut m = f32::new(-3.0e38);
    let mut s = group;
    while s < splits {
        m = max(m, part_ml[(row * splits + s) * 2]);
        s += groups;
    }
    let mut l = 0.0f32;
    let mut o = Array::<f32>::new(vec);
    #[unroll]
    for c in 0..vec {
        o[c] = 0.0;
    }
    s = group;
    while s < splits {
        let at = row * splits + s;
        let w = Exp::exp(part_ml[at * 2] - m);
        l += w * part_ml[at * 2 + 1];
        let x = part_o[at * vpr + j];
        #[unroll]
        for c in 0..vec {
            o[c] += w * x[c];
        }
        s += groups;
    }
    if j == 0 {
        m_s[group] = m;
        l_s[group] = l;
    }
    #[unroll]
    for c in 0..vec {
        o_s[group * head_dim + j * vec + c] = o[c];
    }
    sync_cube();

    // The groups' states, combined by the first group (a group without splits has weight 0).
    if group == 0 {
        let mut m_all = f32::new(-3.0e38);
        #[unroll]
        for g in 0..groups {
            m_all = max(m_all, m_s[g]);
        }
        let mut l_all = 0.0f32;
        #[unroll]
        for c in 0..vec {
            o[c] = 0.0;
        }
        #[unroll]
        for g in 0..groups {
            let w = Exp::exp(m_s[g] - m_all);
            l_all += w * l_s[g];
            #[unroll]
            for c in 0..vec {
                o[c] += w * o_s[g * head_dim + j * vec + c];
            }
        }
        #[unroll]
        for c in 0..vec {
            out[row * head_dim + j * vec + c] = F::cast_from(o[c] / l_all);
        }
    }
}

/// The split kernel a call runs, with its static parameters.
#[derive(Debug, Clone, Copy)]
enum Split {
    /// The tensor-core kernel (its plan does not depend on the runtime).
    TensorCore,
    /// The CUDA-core kernel.
    Simt(SplitPlan),
    /// The sliced kernel (module `sliced`).
    Sliced(SlicedPlan),
}

/// Shapes and per-sequence lengths of one decode-attention call.
#[derive(Debug, Clone)]
pub struct AttentionArgs<'a> {
    /// Query rows: one per sequence in decode, several per sequence for the queries of a
    /// prompt chunk (see `row_sequences`).
    pub batch: usize,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads (`q_heads` must be a multiple).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: HeadDim,
    /// Compressed tokens per sequence (all zero without a segment).
    pub compressed_lens: &'a [u32],
    /// Dense (window) tokens per sequence; they follow the compressed ones.
    pub window_lens: &'a [u32],
    /// The cache sequence whose streams each query row reads (`None`: row `b` reads sequence
    /// `b`). Several rows may read one sequence, each with its own lengths (above): the
    /// queries of a prompt chunk, each seeing the tokens up to its own position.
    pub row_sequences: Option<&'a [u32]>,
}

/// The compressed segment: four stream buffers in the FORMAT.md layout.
#[derive(Debug, Clone)]
pub struct SparseSegmentArgs<'a> {
    /// K bitmap words, `bitmap_stride` per stream.
    pub k_bitmap: &'a cubecl::server::Handle,
    /// K values, `k_values_stride` per stream.
    pub k_values: &'a cubecl::server::Handle,
    /// V bitmap words, `bitmap_stride` per stream.
    pub v_bitmap: &'a cubecl::server::Handle,
    /// V values, `v_values_stride` per stream.
    pub v_values: &'a cubecl::server::Handle,
    /// Bitmap words per stream.
    pub bitmap_stride: usize,
    /// K values per stream.
    pub k_values_stride: usize,
    /// V values per stream.
    pub v_values_stride: usize,
    /// Sparsity the keys were compressed at.
    pub k_sparsity: Sparsity,
    /// Sparsity the values were compressed at.
    pub v_sparsity: Sparsity,
}

/// Dense K and V storage: `[streams, stride]` elements, token rows of `head_dim`.
#[derive(Debug, Clone)]
pub struct DenseCacheArgs<'a> {
    /// Keys.
    pub k: &'a cubecl::server::Handle,
    /// Values.
    pub v: &'a cubecl::server::Handle,
    /// Elements per stream (capacity in tokens times head_dim).
    pub stride: usize,
}

/// Which split kernel [`decode_attention_with`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeKernel {
    /// The tensor-core kernel where it applies, else the CUDA-core kernel.
    #[default]
    Auto,
    /// The CUDA-core kernel (every runtime, type and shape).
    Simt,
    /// The tensor-core kernel: each plane expands its tiles' compressed rows into dense 16-bit
    /// tiles and runs both products on 16x8x16 matrix units (module `tensor_core`). CUDA,
    /// f16 or bf16, head_dim a multiple of 16, at most 8 query heads per KV head, 16-byte
    /// aligned streams; anything else is an error.
    TensorCore,
    /// The sliced kernel (module `sliced`): one plane per cube, each unit a slice of every
    /// row (a compressed row's slice found by the popcount of the bits below it), keys read
    /// like values and scores summed across the plane by a butterfly of plane shuffles, so no
    /// shared staging or barrier sits between a tile's loads and their use. `Auto` picks it on
    /// runtimes other than CUDA whose planes are 32 units wide. head_dim a multiple of 32, a
    /// power of two of at most 8 query heads per KV head; anything else is an error. Without
    /// plane operations (lavapipe) it exchanges through shared memory (correct, not fast).
    Sliced,
}

/// Decode attention: `out[b, h, :] = softmax(q[b, h] · K_b^T / sqrt(d)) · V_b`, where K_b and
/// V_b are sequence `b`'s compressed segment (if `segment` is given) followed by its dense
/// window. `q` and `out` hold `[batch, q_heads, head_dim]` elements of `F`. Every sequence
/// needs at least one token. Lengths are uploaded and read by the kernel; nothing is read back.
pub fn decode_attention<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    args: &AttentionArgs<'_>,
    q: &cubecl::server::Handle,
    segment: Option<&SparseSegmentArgs<'_>>,
    window: &DenseCacheArgs<'_>,
    out: &cubecl::server::Handle,
) -> Result<()> {
    decode_attention_with::<R, F>(client, args, q, segment, window, out, DecodeKernel::Auto)
}

/// [`decode_attention`] with an explicit choice of split kernel.
pub fn decode_attention_with<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    args: &AttentionArgs<'_>,
    q: &cubecl::server::Handle,
    segment: Option<&SparseSegmentArgs<'_>>,
    window: &DenseCacheArgs<'_>,
    out: &cubecl::server::Handle,
    kernel: DecodeKernel,
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    let d = args.head_dim.get();
    let (batch, q_heads, kv_heads) = (args.batch, args.q_heads, args.kv_heads);
    if batch == 0 || kv_heads == 0 || q_heads == 0 || !q_heads.is_multiple_of(kv_heads) {
        return Err(KernelError::InvalidArguments(format!(
            "batch {batch}, {q_heads} query heads, {kv_heads} KV heads: need a non-empty batch and query heads a multiple of KV heads"
        )));
    }
    let group = q_heads / kv_heads;
    let identity: Vec<u32>;
    let row_sequences = match args.row_sequences {
        Some(rows) => rows,
        None => {
            identity = (0..batch as u32).collect();
            &identity
        }
    };
    if args.compressed_lens.len() != batch
        || args.window_lens.len() != batch
        || row_sequences.len() != batch
    {
        return Err(KernelError::InvalidArguments(format!(
            "{} compressed lengths, {} window lengths and {} row sequences for {batch} query rows",
            args.compressed_lens.len(),
            args.window_lens.len(),
            row_sequences.len()
        )));
    }
    // Streams the buffers must hold: every KV head of every sequence a row reads.
    let sequences = row_sequences
        .iter()
        .map(|&s| s as usize + 1)
        .max()
        .unwrap_or(0);
    let streams = sequences * kv_heads;
    let (keep_k, keep_v) = match segment {
        Some(s) => (
            keep_count(s.k_sparsity, args.head_dim),
            keep_count(s.v_sparsity, args.head_dim),
        ),
        None => (0, 0),
    };
    for seq in 0..batch {
        let (c, w) = (
            args.compressed_lens[seq] as usize,
            args.window_lens[seq] as usize,
        );
        if c + w == 0 {
            return Err(KernelError::InvalidArguments(format!(
                "sequence {seq} has no tokens to attend to"
            )));
        }
        if w * d > window.stride {
            return Err(KernelError::InvalidArguments(format!(
                "sequence {seq}: {w} window tokens exceed the dense capacity of {} tokens",
                window.stride / d
            )));
        }
        match segment {
            None if c > 0 => {
                return Err(KernelError::InvalidArguments(format!(
                    "sequence {seq} has {c} compressed tokens but no compressed segment was given"
                )));
            }
            Some(s)
                if c * d > s.bitmap_stride * 32
                    || c * keep_k > s.k_values_stride
                    || c * keep_v > s.v_values_stride =>
            {
                return Err(KernelError::InvalidArguments(format!(
                    "sequence {seq}: {c} compressed tokens exceed the segment capacity"
                )));
            }
            _ => {}
        }
    }
    let es = F::size_bytes();
    check_len("queries", q, batch * q_heads * d * es)?;
    check_len("output", out, batch * q_heads * d * es)?;
    check_len("dense keys", window.k, streams * window.stride * es)?;
    check_len("dense values", window.v, streams * window.stride * es)?;
    if let Some(s) = segment {
        // Values are staged as 32-bit words: every stream must start on a whole word.
        let per_word = 4 / es.min(4);
        if !s.k_values_stride.is_multiple_of(per_word)
            || !s.v_values_stride.is_multiple_of(per_word)
        {
            return Err(KernelError::InvalidArguments(format!(
                "value strides ({} and {}) must be multiples of {per_word} {} values (FORMAT.md: stream capacities are multiples of 8 tokens)",
                s.k_values_stride,
                s.v_values_stride,
                F::name()
            )));
        }
        check_len("K bitmap", s.k_bitmap, streams * s.bitmap_stride * 4)?;
        check_len("V bitmap", s.v_bitmap, streams * s.bitmap_stride * 4)?;
        check_len("K values", s.k_values, streams * s.k_values_stride * es)?;
        check_len("V values", s.v_values, streams * s.v_values_stride * es)?;
    }

    let hw = &client.properties().hardware;
    let sparse = segment.is_some();
    let tc_plan = TilePlan {
        head_dim: d,
        group,
        keep_k,
        keep_v,
        sparse,
    };
    let vec = vector_size(es, hw.max_vector_size, d, &[window.stride]);
    let use_plane = client
        .features()
        .plane
        .contains(cubecl::features::Plane::Ops);
    let is_cuda = R::name(client) == "cuda";
    let simt_plan = || {
        // 16-bit values are unpacked by a bit cast on CUDA and through CubeCL's SPIR-V
        // compiler (feature `vulkan`), with integer operations through WGSL.
        let unpack = if es == 4 || is_cuda || compiles_to_spirv(client) {
            Unpack::Bitcast
        } else if F::name() == "bf16" {
            Unpack::Bf16Bits
        } else {
            Unpack::F16Bits
        };
        SplitPlan::new(
            d,
            group,
            keep_k,
            keep_v,
            es,
            unpack,
            vec,
            sparse,
            use_plane,
            // NVRTC keeps the value step's loads of several trips in flight; the Vulkan
            // compilers measured do not (PERF-NOTES).
            is_cuda,
            hw.max_shared_memory_size,
            hw.max_units_per_cube as usize,
        )
    };
    let sliced_plan = || {
        // Plane exchanges where the planes are exactly as wide as the cube, shared memory
        // elsewhere (lavapipe has no plane operations).
        let lanes = sliced::LANES as u32;
        let exact_planes = use_plane && hw.plane_size_min == lanes && hw.plane_size_max == lanes;
        let keep = sparse.then_some((keep_k, keep_v));
        let plan = SlicedPlan::new(d, group, vec, keep, exact_planes)?;
        let shared = plan.shared_bytes();
        if shared > hw.max_shared_memory_size || hw.max_units_per_cube < lanes {
            return Err(format!(
                "it needs {shared} bytes of shared memory and {lanes} units per cube; the device allows {} and {}",
                hw.max_shared_memory_size, hw.max_units_per_cube
            ));
        }
        Ok(plan)
    };
    let choice = match kernel {
        DecodeKernel::Simt => Split::Simt(simt_plan()?),
        DecodeKernel::TensorCore => {
            match tensor_core_unsupported::<R, F>(client, &tc_plan, segment, window.stride) {
                Some(why) => {
                    return Err(KernelError::InvalidArguments(format!(
                        "the tensor-core decode kernel does not apply: {why}"
                    )));
                }
                None => Split::TensorCore,
            }
        }
        DecodeKernel::Sliced => Split::Sliced(sliced_plan().map_err(|why| {
            KernelError::InvalidArguments(format!("the sliced decode kernel does not apply: {why}"))
        })?),
        DecodeKernel::Auto => {
            if tensor_core_unsupported::<R, F>(client, &tc_plan, segment, window.stride).is_none() {
                Split::TensorCore
            } else if !is_cuda
                && let Ok(plan) = sliced_plan()
                && plan.use_plane
            {
                // Runtimes that do not keep loads in flight by themselves, where the planes
                // are as wide as the kernel's cube.
                Split::Sliced(plan)
            } else {
                Split::Simt(simt_plan()?)
            }
        }
    };
    // Tokens a cube walks per step: split lengths are whole multiples of it.
    let tile = match choice {
        Split::TensorCore => tensor_core::PLANES * tensor_core::TILE,
        Split::Simt(plan) => plan.tile,
        Split::Sliced(plan) => plan.tile,
    };
    let max_total = (0..batch)
        .map(|s| (args.compressed_lens[s] + args.window_lens[s]) as usize)
        .max()
        .unwrap_or(1);
    // The dense tensor-core kernel at head_dim 128 and more takes half the cubes of the
    // others: each cube pays a fixed cost (staging the queries, merging its planes, writing
    // its partial output), so fewer, longer splits leave more of the call to streaming (B = 8,
    // T = 16K on the H100: 230 us with 4096 cubes, 213 with 2048). One wave of resident
    // cubes was faster still in one call (200 us) and much slower in another (325 us: the
    // residency it assumes is not guaranteed), so several waves it stays; a later sweep with
    // the dealt-out merge (H100, 16K) kept 2048 (196 us; 1188 cubes 219, 2640 208, 1584 and
    // 3168 288-309, not explained yet). The sparse kernel (bound by its expansion) and rows
    // of head_dim 64 (too little in flight per tile) keep the full count.
    let target = if matches!(choice, Split::TensorCore) && !sparse && d >= 128 {
        DENSE_TC_CUBES
    } else {
        TARGET_CUBES
    };
    let wanted_splits = target.div_ceil(batch * kv_heads).clamp(1, MAX_SPLITS);
    let split_tokens = max_total
        .div_ceil(wanted_splits)
        .div_ceil(tile)
        .max(MIN_TILES_PER_SPLIT)
        * tile;
    let splits = max_total.div_ceil(split_tokens);

    // One upload: the compressed lengths, the window lengths, the rows' sequences.
    let lens = upload_u32(
        client,
        &[args.compressed_lens, args.window_lens, row_sequences].concat(),
    );
    let rows = batch * q_heads;
    // One split per row (CUDA-core and sliced kernels): the split kernel writes the output
    // (no partials, no merge).
    let direct = splits == 1 && !matches!(choice, Split::TensorCore);
    let choice = match choice {
        Split::TensorCore => Split::TensorCore,
        Split::Simt(plan) => Split::Simt(SplitPlan { direct, ..plan }),
        Split::Sliced(plan) => Split::Sliced(SlicedPlan { direct, ..plan }),
    };
    let (part_o, part_ml) = if direct {
        (
            crate::upload::placeholder(client, 1),
            crate::upload::placeholder(client, 2),
        )
    } else {
        (
            client.empty(rows * splits * d * 4),
            client.empty(rows * splits * 2 * 4),
        )
    };
    // The dense kernel binds a small placeholder (kept per device) for the segment it never
    // reads.
    let placeholder;
    let (kb, kv, vb, vv, bits_stride, kvs, vvs) = match segment {
        Some(s) => (
            s.k_bitmap,
            s.k_values,
            s.v_bitmap,
            s.v_values,
            s.bitmap_stride,
            s.k_values_stride,
            s.v_values_stride,
        ),
        None => {
            placeholder = crate::upload::placeholder(client, 0);
            (
                &placeholder,
                &placeholder,
                &placeholder,
                &placeholder,
                0,
                0,
                0,
            )
        }
    };
    // Arrays of `bytes`-byte items.
    let arr = |h: &cubecl::server::Handle, bytes: usize| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / bytes)
    };
    let count = CubeCount::Static(splits as u32, kv_heads as u32, batch as u32);
    let scale = 1.0 / (d as f32).sqrt();
    // The CUDA-core and sliced kernels take the same arguments but for the packed values'
    // item size (the former reads 32-bit words, the latter single values).
    macro_rules! launch_cube_kernel {
        ($($kernel:ident)::+, $units:expr, $value_bytes:expr, $plan:expr) => {
            $($kernel)::+::launch_unchecked::<F, R>(
                client,
                count,
                CubeDim::new_1d($units as u32),
                $plan.vec,
                arr(q, es * $plan.vec),
                arr(kb, 4),
                arr(kv, $value_bytes),
                arr(vb, 4),
                arr(vv, $value_bytes),
                arr(window.k, es * $plan.vec),
                arr(window.v, es * $plan.vec),
                arr(&lens, 4),
                arr(&part_o, 4),
                arr(&part_ml, 4),
                arr(out, es),
                bits_stride as u32,
                kvs as u32,
                vvs as u32,
                window.stride as u32,
                split_tokens as u32,
                q_heads as u32,
                scale,
                $plan,
            )
        };
    }
    // SAFETY: every index the kernels compute stays inside the buffers whose sizes were
    // checked above: tokens below each sequence's lengths, which fit the stream capacities,
    // and the partial buffers sized from `splits`. The tensor-core kernel's 16-byte chunks
    // stay inside each stream because streams and tiles are chunk-aligned (checked by
    // `tensor_core_unsupported`). The sliced kernel's reads of a compressed row's values are
    // clamped to the values array (a cleared channel may point one past the row).
    unsafe {
        match choice {
            Split::TensorCore => tensor_core::decode_split_tc_kernel::launch_unchecked::<F, R>(
                client,
                count,
                CubeDim::new_1d(tensor_core::UNITS as u32),
                4,
                arr(q, es),
                arr(kb, 16),
                arr(kv, 16),
                arr(vb, 16),
                arr(vv, 16),
                arr(window.k, 16),
                arr(window.v, 16),
                arr(&lens, 4),
                arr(&part_o, 4),
                arr(&part_ml, 4),
                bits_stride as u32,
                kvs as u32,
                vvs as u32,
                window.stride as u32,
                split_tokens as u32,
                q_heads as u32,
                scale,
                tc_plan,
            ),
            Split::Simt(plan) => launch_cube_kernel!(decode_split_kernel, plan.units, 4, plan),
            Split::Sliced(plan) => {
                launch_cube_kernel!(sliced::decode_sliced_kernel, sliced::LANES, es, plan)
            }
        }
        if direct {
            return Ok(());
        }
        let groups = (MERGE_UNITS / (d / MERGE_VEC)).min(MERGE_GROUPS);
        decode_merge_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d((groups * d / MERGE_VEC) as u32),
            MERGE_VEC,
            arr(&part_o, 4 * MERGE_VEC),
            arr(&part_ml, 4),
            arr(out, es),
            splits as u32,
            d,
            MERGE_VEC,
            groups,
        );
    }
    Ok(())
}

/// Whether `client`'s kernels go through CubeCL's SPIR-V compiler (a Vulkan adapter with the
/// `vulkan` feature). The runtime's name says `wgpu<spirv>` for every Vulkan adapter once the
/// feature is on, but an adapter without the features that compiler needs (the Vulkan memory
/// model, buffer device addresses, SPIR-V 1.3) still gets WGSL; only the SPIR-V set-up marks
/// plane synchronisation as supported on Vulkan, so that tells them apart.
fn compiles_to_spirv<R: Runtime>(client: &ComputeClient<R>) -> bool {
    R::name(client) == "wgpu<spirv>"
        && client
            .features()
            .plane
            .contains(cubecl::features::Plane::Sync)
}

/// Why the tensor-core kernel cannot run this call on `client`, or `None` when it can.
fn tensor_core_unsupported<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    plan: &TilePlan,
    segment: Option<&SparseSegmentArgs<'_>>,
    window_stride: usize,
) -> Option<String> {
    let hw = &client.properties().hardware;
    let shape = (16, tensor_core::HEADS, 16);
    let (d, group) = (plan.head_dim, plan.group);
    if R::name(client) != "cuda" || !has_mma::<R, F>(client, MmaApi::Registers, shape) {
        return Some(format!(
            "it needs CUDA with 16x8x16 {} matrix units (got {})",
            F::name(),
            R::name(client)
        ));
    }
    if !d.is_multiple_of(16) || group > tensor_core::HEADS {
        return Some(format!(
            "it needs head_dim a multiple of 16 and at most {} query heads per KV head (got {d} and {group})",
            tensor_core::HEADS
        ));
    }
    // 16-byte chunks: 8 values, 4 bitmap words.
    let misaligned = !window_stride.is_multiple_of(8)
        || segment.is_some_and(|s| {
            !s.bitmap_stride.is_multiple_of(4)
                || !s.k_values_stride.is_multiple_of(8)
                || !s.v_values_stride.is_multiple_of(8)
        });
    if misaligned {
        return Some(
            "it needs 16-byte aligned streams (window stride a multiple of 8 values, bitmap stride of 4 words, value strides of 8 values)".to_string(),
        );
    }
    let shared = plan.shared_bytes();
    if shared > hw.max_shared_memory_size || (hw.max_units_per_cube as usize) < tensor_core::UNITS {
        return Some(format!(
            "it needs {shared} bytes of shared memory and {} units per cube; the device allows {} and {}",
            tensor_core::UNITS,
            hw.max_shared_memory_size,
            hw.max_units_per_cube
        ));
    }
    None
}
