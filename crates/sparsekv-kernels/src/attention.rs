//! Split-K (flash-decoding) decode attention over a compressed segment plus a dense window,
//! and the dense baseline from the same source.
//!
//! One cube handles one (sequence, KV head, split of the token range) for all query heads of
//! the KV head's GQA group, so each compressed byte is read once per step, not once per query
//! head. Per tile of tokens it loads the compressed bitmap words and packed values
//! cooperatively (coalesced) into shared memory, computes every token's scores for the whole
//! group from the set bits ("loads compressed, computes dense"), updates an online softmax,
//! and accumulates the values. Positions at or past the segment length come from the dense
//! window, in the same pass. Each split writes its unnormalised output, running max and sum;
//! a second kernel merges the splits. The kernels use shared memory only (no plane
//! operations), so the same code runs on every runtime, lavapipe included.
//!
//! The softmax "minus infinity" is the finite -3e38, because WGSL has no infinity literals.
//!
//! The dense baseline is this kernel with the compressed part compiled out (`sparse = false`):
//! all tokens come from the dense arrays, read the same way.

use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::{FloatElement, check_type_supported};
use sparsekv_format::{HeadDim, Sparsity, keep_count};

/// Cubes to aim for when splitting the token range: several per multiprocessor, so that
/// enough warps are resident to keep loads in flight.
const TARGET_CUBES: usize = 2048;
/// Fewest tiles in a split, so per-split work (query load, final reductions, the merge) stays
/// small against the tiles.
const MIN_TILES_PER_SPLIT: usize = 4;

/// Static launch parameters of the split kernel, chosen on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SplitPlan {
    /// Tokens per tile = units per cube.
    tile: usize,
    /// Elements per vector load (16 bytes at most).
    vec: usize,
    /// Channels each unit accumulates in the value phase.
    cpt: usize,
}

impl SplitPlan {
    /// Shared memory a split cube uses, in bytes (mirrors the kernel's allocations).
    fn shared_bytes(
        &self,
        head_dim: usize,
        group: usize,
        keep: usize,
        elem: usize,
        sparse: bool,
    ) -> usize {
        let common = 4 * (group * head_dim + 2 * group * self.tile);
        if sparse {
            let vals = (self.tile * keep).div_ceil(self.vec) * self.vec;
            common + self.tile * head_dim / 8 + (vals + self.tile * head_dim) * elem
        } else {
            common + 4 + 2 * elem
        }
    }

    /// Tokens per tile: about 8K elements of rows (16K dense), halved until the cube's shared memory fits
    /// the device; at least 8.
    #[allow(clippy::too_many_arguments)]
    fn new(
        head_dim: usize,
        group: usize,
        keep: usize,
        elem: usize,
        vec: usize,
        sparse: bool,
        limit: usize,
        max_units: usize,
    ) -> Result<Self> {
        let plan = |tile: usize| SplitPlan {
            tile,
            vec,
            cpt: vec.max(head_dim / tile),
        };
        // Dense tiles need little shared memory, so they can be longer.
        let rows = if sparse { 8192 } else { 16384 };
        let mut tile = (rows / head_dim).clamp(16, 128).min(max_units);
        while tile > 8 && plan(tile).shared_bytes(head_dim, group, keep, elem, sparse) > limit {
            tile /= 2;
        }
        let need = plan(tile).shared_bytes(head_dim, group, keep, elem, sparse);
        if need > limit {
            return Err(KernelError::InvalidArguments(format!(
                "decode attention needs {need} bytes of shared memory (head_dim {head_dim}, group {group}); the device allows {limit}"
            )));
        }
        Ok(plan(tile))
    }
}

/// The maximum (`is_max`) or sum over the cube of one value per unit, for each of `group`
/// values; every unit gets the results. With plane operations: a plane reduction, then one
/// value per plane through shared memory. Without (lavapipe): a shared-memory tree.
/// `red` holds `group * tile` floats; `tile` is the cube size, a power of two.
#[cube]
fn cube_reduce(
    values: &Array<f32>,
    red: &mut SharedMemory<f32>,
    #[comptime] group: usize,
    #[comptime] tile: usize,
    #[comptime] is_max: bool,
    #[comptime] use_plane: bool,
) -> Array<f32> {
    let tid = UNIT_POS as usize;
    let mut out = Array::<f32>::new(group);
    if comptime!(use_plane) {
        #[unroll]
        for g in 0..group {
            let r = if comptime!(is_max) {
                plane_max(values[g])
            } else {
                plane_sum(values[g])
            };
            if UNIT_POS_PLANE == 0 {
                red[PLANE_POS as usize * group + g] = r;
            }
        }
        sync_cube();
        let planes = (CUBE_DIM / PLANE_DIM) as usize;
        #[unroll]
        for g in 0..group {
            let mut r = red[g];
            for p in 1..planes {
                let x = red[p * group + g];
                if comptime!(is_max) {
                    r = max(r, x);
                } else {
                    r += x;
                }
            }
            out[g] = r;
        }
    } else {
        #[unroll]
        for g in 0..group {
            red[g * tile + tid] = values[g];
        }
        sync_cube();
        let levels = comptime!(tile.trailing_zeros() as usize);
        for level in 0..levels {
            let stride = tile >> (level + 1);
            if tid < stride {
                #[unroll]
                for g in 0..group {
                    let a = red[g * tile + tid];
                    let b = red[g * tile + tid + stride];
                    red[g * tile + tid] = if comptime!(is_max) { max(a, b) } else { a + b };
                }
            }
            sync_cube();
        }
        #[unroll]
        for g in 0..group {
            out[g] = red[g * tile];
        }
    }
    // Nobody may overwrite `red` before every unit has read it.
    sync_cube();
    out
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn decode_split_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k_bits: &Array<u32>,
    k_vals: &Array<Vector<F, N>>,
    v_bits: &Array<u32>,
    v_vals: &Array<Vector<F, N>>,
    k_win: &Array<Vector<F, N>>,
    v_win: &Array<Vector<F, N>>,
    comp_len: &Array<u32>,
    win_len: &Array<u32>,
    part_o: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    bits_stride: u32,
    k_vals_stride: u32,
    v_vals_stride: u32,
    win_stride: u32,
    split_tokens: u32,
    q_heads: u32,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] group: usize,
    #[comptime] plan: SplitPlan,
    #[comptime] keep_k: usize,
    #[comptime] keep_v: usize,
    #[comptime] sparse: bool,
    #[comptime] use_plane: bool,
) {
    let tile = comptime!(plan.tile);
    let vec = comptime!(plan.vec);
    let cpt = comptime!(plan.cpt);
    let units_per_row = comptime!(head_dim / plan.cpt);
    let lanes = comptime!(plan.tile / (head_dim / plan.cpt));
    let vecs_per_row = comptime!(head_dim / plan.vec);
    let words_per_row = comptime!(if head_dim >= 32 { head_dim / 32 } else { 1 });
    let bits_cap = comptime!(if sparse { plan.tile * head_dim / 32 } else { 1 });
    let keep_max = comptime!(if keep_k > keep_v { keep_k } else { keep_v });
    let vals_cap = comptime!(if sparse {
        (plan.tile * keep_max).div_ceil(plan.vec) * plan.vec
    } else {
        1
    });
    let dense_cap = comptime!(if sparse { plan.tile * head_dim } else { 1 });

    // q_s[j * group + g]: the scaled query of head g, channel j (later reused for the lane sum).
    let mut q_s = SharedMemory::<f32>::new(group * head_dim);
    let mut p_s = SharedMemory::<f32>::new(group * tile);
    let mut red_s = SharedMemory::<f32>::new(group * tile);
    let mut bits_s = SharedMemory::<u32>::new(bits_cap);
    let mut vals_s = SharedMemory::<F>::new(vals_cap);
    let mut rows_s = SharedMemory::<F>::new(dense_cap);

    let b = CUBE_POS_Z as usize;
    let h = CUBE_POS_Y as usize;
    let split = CUBE_POS_X as usize;
    let kv_heads = CUBE_COUNT_Y as usize;
    let splits = CUBE_COUNT_X as usize;
    let stream = b * kv_heads + h;
    let tid = UNIT_POS as usize;
    let tc = comp_len[b] as usize;
    let total = tc + win_len[b] as usize;
    let s0 = split * split_tokens as usize;
    let s1 = min(s0 + split_tokens as usize, total);

    let q_base = (b * q_heads as usize + h * group) * vecs_per_row;
    let mut i = tid;
    while i < group * vecs_per_row {
        let g = i / vecs_per_row;
        let v = i % vecs_per_row;
        let x = q[q_base + i];
        #[unroll]
        for e in 0..vec {
            q_s[(v * vec + e) * group + g] = f32::cast_from(x[e]) * scale;
        }
        i += tile;
    }

    let mut m_run = Array::<f32>::new(group);
    let mut l_run = Array::<f32>::new(group);
    let mut alpha = Array::<f32>::new(group);
    let mut acc = Array::<f32>::new(group * cpt);
    #[unroll]
    for g in 0..group {
        m_run[g] = f32::new(-3.0e38);
        l_run[g] = 0.0;
        #[unroll]
        for c in 0..cpt {
            acc[g * cpt + c] = 0.0;
        }
    }
    let lane = tid / units_per_row;
    let c0 = (tid % units_per_row) * cpt;
    sync_cube();

    let mut t0 = s0;
    while t0 < s1 {
        let n = min(tile, s1 - t0);
        // Compressed tokens of this tile: [t0, t0 + nc).
        let mut nc = 0usize;
        if sparse && t0 < tc {
            nc = min(t0 + n, tc) - t0;
            let wbase = stream * bits_stride as usize + t0 * head_dim / 32;
            let mut w = tid;
            while w < (nc * head_dim).div_ceil(32) {
                bits_s[w] = k_bits[wbase + w];
                w += tile;
            }
            let vbase = (stream * k_vals_stride as usize + t0 * keep_k) / vec;
            let mut e = tid;
            while e < (nc * keep_k).div_ceil(vec) {
                let x = k_vals[vbase + e];
                #[unroll]
                for k in 0..vec {
                    vals_s[e * vec + k] = x[k];
                }
                e += tile;
            }
            sync_cube();
        }

        // Scores: one unit per token, for the whole group.
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
                let bit0 = tid * head_dim;
                let mut slot = tid * keep_k;
                #[unroll]
                for wi in 0..words_per_row {
                    let mut word = bits_s[bit0 / 32 + wi];
                    if comptime!(head_dim < 32) {
                        word = (word >> (bit0 % 32) as u32)
                            & comptime!(((1u64 << head_dim) - 1) as u32);
                    }
                    while word != 0u32 {
                        let j = wi * 32 + word.trailing_zeros() as usize;
                        word &= word - 1u32;
                        let x = f32::cast_from(vals_s[slot]);
                        slot += 1;
                        #[unroll]
                        for g in 0..group {
                            sc[g] += q_s[j * group + g] * x;
                        }
                    }
                }
            } else {
                let base = (stream * win_stride as usize + (t0 + tid - tc) * head_dim) / vec;
                for v in 0..vecs_per_row {
                    let x = k_win[base + v];
                    #[unroll]
                    for e in 0..vec {
                        let xe = f32::cast_from(x[e]);
                        #[unroll]
                        for g in 0..group {
                            sc[g] += q_s[(v * vec + e) * group + g] * xe;
                        }
                    }
                }
            }
        }

        // Online softmax. Every unit tracks the same running max; sums stay per unit.
        let m_tile = cube_reduce(&sc, &mut red_s, group, tile, true, use_plane);
        #[unroll]
        for g in 0..group {
            let m_new = max(m_run[g], m_tile[g]);
            alpha[g] = Exp::exp(m_run[g] - m_new);
            m_run[g] = m_new;
            let p = Exp::exp(sc[g] - m_new);
            l_run[g] = l_run[g] * alpha[g] + p;
            p_s[g * tile + tid] = p;
        }
        sync_cube();

        // Compressed value rows: stage, then expand each row once into rows_s.
        if sparse && nc > 0 {
            let wbase = stream * bits_stride as usize + t0 * head_dim / 32;
            let mut w = tid;
            while w < (nc * head_dim).div_ceil(32) {
                bits_s[w] = v_bits[wbase + w];
                w += tile;
            }
            let vbase = (stream * v_vals_stride as usize + t0 * keep_v) / vec;
            let mut e = tid;
            while e < (nc * keep_v).div_ceil(vec) {
                let x = v_vals[vbase + e];
                #[unroll]
                for k in 0..vec {
                    vals_s[e * vec + k] = x[k];
                }
                e += tile;
            }
            // Zero the rows cooperatively (consecutive units, consecutive elements: no bank
            // conflicts), then scatter each row's kept values.
            let mut z = tid;
            while z < nc * head_dim {
                rows_s[z] = F::new(0.0);
                z += tile;
            }
            sync_cube();
            if tid < nc {
                let row = tid * head_dim;
                let bit0 = tid * head_dim;
                let mut slot = tid * keep_v;
                #[unroll]
                for wi in 0..words_per_row {
                    let mut word = bits_s[bit0 / 32 + wi];
                    if comptime!(head_dim < 32) {
                        word = (word >> (bit0 % 32) as u32)
                            & comptime!(((1u64 << head_dim) - 1) as u32);
                    }
                    while word != 0u32 {
                        let j = wi * 32 + word.trailing_zeros() as usize;
                        word &= word - 1u32;
                        rows_s[row + j] = vals_s[slot];
                        slot += 1;
                    }
                }
            }
            sync_cube();
        }

        // Values: each unit accumulates `cpt` channels over every `lanes`-th token.
        #[unroll]
        for g in 0..group {
            #[unroll]
            for c in 0..cpt {
                acc[g * cpt + c] *= alpha[g];
            }
        }
        let mut k = lane;
        while k < n {
            let mut p = Array::<f32>::new(group);
            #[unroll]
            for g in 0..group {
                p[g] = p_s[g * tile + k];
            }
            if sparse && k < nc {
                #[unroll]
                for c in 0..cpt {
                    let x = f32::cast_from(rows_s[k * head_dim + c0 + c]);
                    #[unroll]
                    for g in 0..group {
                        acc[g * cpt + c] += p[g] * x;
                    }
                }
            } else {
                let base = (stream * win_stride as usize + (t0 + k - tc) * head_dim + c0) / vec;
                #[unroll]
                for v in 0..cpt / vec {
                    let x = v_win[base + v];
                    #[unroll]
                    for e in 0..vec {
                        let xe = f32::cast_from(x[e]);
                        #[unroll]
                        for g in 0..group {
                            acc[g * cpt + v * vec + e] += p[g] * xe;
                        }
                    }
                }
            }
            k += lanes;
        }
        sync_cube();
        t0 += tile;
    }

    let l_total = cube_reduce(&l_run, &mut red_s, group, tile, false, use_plane);
    // Sum the token lanes through q_s (group * head_dim floats), one lane at a time.
    for l in 1..lanes {
        if lane == l {
            #[unroll]
            for g in 0..group {
                #[unroll]
                for c in 0..cpt {
                    q_s[g * head_dim + c0 + c] = acc[g * cpt + c];
                }
            }
        }
        sync_cube();
        if lane == 0 {
            #[unroll]
            for g in 0..group {
                #[unroll]
                for c in 0..cpt {
                    acc[g * cpt + c] += q_s[g * head_dim + c0 + c];
                }
            }
        }
        sync_cube();
    }
    let row0 = b * q_heads as usize + h * group;
    if lane == 0 {
        #[unroll]
        for g in 0..group {
            #[unroll]
            for c in 0..cpt {
                part_o[((row0 + g) * splits + split) * head_dim + c0 + c] = acc[g * cpt + c];
            }
        }
    }
    if tid == 0 {
        #[unroll]
        for g in 0..group {
            let at = ((row0 + g) * splits + split) * 2;
            part_ml[at] = m_run[g];
            part_ml[at + 1] = l_total[g];
        }
    }
}

#[cube(launch)]
fn decode_merge_kernel<F: Float>(
    part_o: &Array<f32>,
    part_ml: &Array<f32>,
    out: &mut Array<F>,
    splits: u32,
    #[comptime] head_dim: usize,
) {
    let row = CUBE_POS_X as usize;
    let c = UNIT_POS as usize;
    let splits = splits as usize;
    let mut m = f32::new(-3.0e38);
    for s in 0..splits {
        m = max(m, part_ml[(row * splits + s) * 2]);
    }
    let mut l = 0.0f32;
    let mut o = 0.0f32;
    for s in 0..splits {
        let w = Exp::exp(part_ml[(row * splits + s) * 2] - m);
        l += w * part_ml[(row * splits + s) * 2 + 1];
        o += w * part_o[(row * splits + s) * head_dim + c];
    }
    out[row * head_dim + c] = F::cast_from(o / l);
}

/// Elements per vector load: 16 bytes at most, dividing the head dimension and every stride,
/// so that each row and each tile of packed values starts on a whole vector.
fn vector_size(elem: usize, head_dim: usize, strides: &[usize]) -> usize {
    let mut vec = (16 / elem).max(1);
    while vec > 1
        && (!head_dim.is_multiple_of(vec) || strides.iter().any(|s| !s.is_multiple_of(vec)))
    {
        vec /= 2;
    }
    vec
}

/// Shapes and per-sequence lengths of one decode-attention call.
#[derive(Debug, Clone)]
pub struct AttentionArgs<'a> {
    /// Sequences in the batch.
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
    check_type_supported::<R, F>(client)?;
    let d = args.head_dim.get();
    let (batch, q_heads, kv_heads) = (args.batch, args.q_heads, args.kv_heads);
    if batch == 0 || kv_heads == 0 || q_heads == 0 || !q_heads.is_multiple_of(kv_heads) {
        return Err(KernelError::InvalidArguments(format!(
            "batch {batch}, {q_heads} query heads, {kv_heads} KV heads: need a non-empty batch and query heads a multiple of KV heads"
        )));
    }
    let group = q_heads / kv_heads;
    if args.compressed_lens.len() != batch || args.window_lens.len() != batch {
        return Err(KernelError::InvalidArguments(format!(
            "{} compressed and {} window lengths for a batch of {batch}",
            args.compressed_lens.len(),
            args.window_lens.len()
        )));
    }
    let streams = batch * kv_heads;
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
        check_len("K bitmap", s.k_bitmap, streams * s.bitmap_stride * 4)?;
        check_len("V bitmap", s.v_bitmap, streams * s.bitmap_stride * 4)?;
        check_len("K values", s.k_values, streams * s.k_values_stride * es)?;
        check_len("V values", s.v_values, streams * s.v_values_stride * es)?;
    }

    let hw = &client.properties().hardware;
    let vec = vector_size(
        es,
        d,
        &[
            window.stride,
            segment.map_or(0, |s| s.k_values_stride),
            segment.map_or(0, |s| s.v_values_stride),
        ],
    );
    let plan = SplitPlan::new(
        d,
        group,
        keep_k.max(keep_v),
        es,
        vec,
        segment.is_some(),
        hw.max_shared_memory_size,
        hw.max_units_per_cube as usize,
    )?;
    let tile = plan.tile;
    let max_total = (0..batch)
        .map(|s| (args.compressed_lens[s] + args.window_lens[s]) as usize)
        .max()
        .unwrap_or(1);
    let wanted_splits = TARGET_CUBES.div_ceil(streams).max(1);
    let split_tokens = max_total
        .div_ceil(wanted_splits)
        .div_ceil(tile)
        .max(MIN_TILES_PER_SPLIT)
        * tile;
    let splits = max_total.div_ceil(split_tokens);
    let use_plane = client
        .features()
        .plane
        .contains(cubecl::features::Plane::Ops);

    let upload = |v: &[u32]| client.create_from_slice(u32::as_bytes(v));
    let (comp_len, win_len) = (upload(args.compressed_lens), upload(args.window_lens));
    let rows = batch * q_heads;
    let part_o = client.empty(rows * splits * d * 4);
    let part_ml = client.empty(rows * splits * 2 * 4);
    let placeholder = client.empty(32);
    let elems = |h: &cubecl::server::Handle, size: usize| h.size() as usize / size;
    let arr = |h: &cubecl::server::Handle, size: usize| unsafe {
        ArrayArg::from_raw_parts(h.clone(), elems(h, size))
    };
    // Arrays of F are read as vectors of `vec` elements.
    let varr = |h: &cubecl::server::Handle| unsafe {
        ArrayArg::from_raw_parts(h.clone(), elems(h, es * vec))
    };
    let (kb, kv, vb, vv, bits_stride, kvs, vvs) = match segment {
        Some(s) => (
            arr(s.k_bitmap, 4),
            varr(s.k_values),
            arr(s.v_bitmap, 4),
            varr(s.v_values),
            s.bitmap_stride,
            s.k_values_stride,
            s.v_values_stride,
        ),
        None => (
            arr(&placeholder, 4),
            arr(&placeholder, es),
            arr(&placeholder, 4),
            arr(&placeholder, es),
            0,
            0,
            0,
        ),
    };
    decode_split_kernel::launch::<F, R>(
        client,
        CubeCount::Static(splits as u32, kv_heads as u32, batch as u32),
        CubeDim::new_1d(tile as u32),
        vec,
        varr(q),
        kb,
        kv,
        vb,
        vv,
        varr(window.k),
        varr(window.v),
        arr(&comp_len, 4),
        arr(&win_len, 4),
        arr(&part_o, 4),
        arr(&part_ml, 4),
        bits_stride as u32,
        kvs as u32,
        vvs as u32,
        window.stride as u32,
        split_tokens as u32,
        q_heads as u32,
        1.0 / (d as f32).sqrt(),
        d,
        group,
        plan,
        keep_k,
        keep_v,
        segment.is_some(),
        use_plane,
    );
    decode_merge_kernel::launch::<F, R>(
        client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(d as u32),
        arr(&part_o, 4),
        arr(&part_ml, 4),
        arr(out, es),
        splits as u32,
        d,
    );
    Ok(())
}
