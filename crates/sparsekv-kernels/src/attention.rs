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

/// Cubes to aim for when splitting the token range (a few waves on a large GPU).
const TARGET_CUBES: usize = 528;

/// Shared memory a split cube uses, in bytes (mirrors the kernel's allocations).
fn shared_bytes(
    tile: usize,
    head_dim: usize,
    group: usize,
    keep: usize,
    elem: usize,
    sparse: bool,
) -> usize {
    let common = 4 * (group * head_dim + group * tile + group);
    if sparse {
        common + tile * head_dim / 8 + tile * keep * elem
    } else {
        common + 8 + elem
    }
}

/// Tokens per tile (and units per cube): about 8K elements of a tile's rows, halved until the
/// cube's shared memory fits the device; at least 16.
fn tile_tokens(
    head_dim: usize,
    group: usize,
    keep: usize,
    elem: usize,
    sparse: bool,
    limit: usize,
    max_units: usize,
) -> Result<usize> {
    let mut tile = (8192 / head_dim).clamp(16, 128).min(max_units);
    while tile > 16 && shared_bytes(tile, head_dim, group, keep, elem, sparse) > limit {
        tile /= 2;
    }
    let need = shared_bytes(tile, head_dim, group, keep, elem, sparse);
    if tile < 16 || need > limit {
        return Err(KernelError::InvalidArguments(format!(
            "decode attention needs {need} bytes of shared memory (head_dim {head_dim}, group {group}); the device allows {limit}"
        )));
    }
    Ok(tile)
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn decode_split_kernel<F: Float>(
    q: &Array<F>,
    k_bits: &Array<u32>,
    k_vals: &Array<F>,
    v_bits: &Array<u32>,
    v_vals: &Array<F>,
    k_win: &Array<F>,
    v_win: &Array<F>,
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
    #[comptime] tile: usize,
    #[comptime] keep_k: usize,
    #[comptime] keep_v: usize,
    #[comptime] sparse: bool,
) {
    // Channels per unit and token lanes in the value phase.
    let cpt = comptime!(if head_dim > tile { head_dim / tile } else { 1 });
    let lanes = comptime!(if tile > head_dim { tile / head_dim } else { 1 });
    let units_per_lane = comptime!(head_dim / cpt);
    let words_per_row = comptime!(if head_dim >= 32 { head_dim / 32 } else { 1 });
    let bits_cap = comptime!(if sparse { tile * head_dim / 32 } else { 1 });
    let vals_cap = comptime!(if sparse {
        tile * if keep_k > keep_v { keep_k } else { keep_v }
    } else {
        1
    });

    let mut q_s = SharedMemory::<f32>::new(group * head_dim);
    let mut p_s = SharedMemory::<f32>::new(group * tile);
    let mut alpha_s = SharedMemory::<f32>::new(group);
    let mut bits_s = SharedMemory::<u32>::new(bits_cap);
    let mut vals_s = SharedMemory::<F>::new(vals_cap);

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
    let q_base = (b * q_heads as usize + h * group) * head_dim;

    let mut i = tid;
    while i < group * head_dim {
        q_s[i] = f32::cast_from(q[q_base + i]) * scale;
        i += tile;
    }

    let mut m_run = f32::new(-3.0e38);
    let mut l_run = 0.0f32;
    let mut acc = Array::<f32>::new(group * cpt);
    #[unroll]
    for a in 0..group * cpt {
        acc[a] = 0.0;
    }
    let lane = tid / units_per_lane;
    let c0 = (tid % units_per_lane) * cpt;
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
            let vbase = stream * k_vals_stride as usize + t0 * keep_k;
            let mut e = tid;
            while e < nc * keep_k {
                vals_s[e] = k_vals[vbase + e];
                e += tile;
            }
        }
        sync_cube();

        // Scores: one unit per token, for the whole group.
        let mut sc = Array::<f32>::new(group);
        #[unroll]
        for g in 0..group {
            sc[g] = 0.0;
        }
        if tid < n {
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
                            sc[g] += q_s[g * head_dim + j] * x;
                        }
                    }
                }
            } else {
                let base = stream * win_stride as usize + (t0 + tid - tc) * head_dim;
                for j in 0..head_dim {
                    let x = f32::cast_from(k_win[base + j]);
                    #[unroll]
                    for g in 0..group {
                        sc[g] += q_s[g * head_dim + j] * x;
                    }
                }
            }
        }
        #[unroll]
        for g in 0..group {
            let mut s = f32::new(-3.0e38);
            if tid < n {
                s = sc[g];
            }
            p_s[g * tile + tid] = s;
        }
        sync_cube();

        // Online softmax: unit g owns query head g's running max and sum.
        if tid < group {
            let mut m_tile = f32::new(-3.0e38);
            for k in 0..n {
                m_tile = max(m_tile, p_s[tid * tile + k]);
            }
            let m_new = max(m_run, m_tile);
            let alpha = Exp::exp(m_run - m_new);
            let mut sum = 0.0f32;
            for k in 0..n {
                let p = Exp::exp(p_s[tid * tile + k] - m_new);
                p_s[tid * tile + k] = p;
                sum += p;
            }
            l_run = l_run * alpha + sum;
            m_run = m_new;
            alpha_s[tid] = alpha;
        }
        sync_cube();

        if sparse && nc > 0 {
            let wbase = stream * bits_stride as usize + t0 * head_dim / 32;
            let mut w = tid;
            while w < (nc * head_dim).div_ceil(32) {
                bits_s[w] = v_bits[wbase + w];
                w += tile;
            }
            let vbase = stream * v_vals_stride as usize + t0 * keep_v;
            let mut e = tid;
            while e < nc * keep_v {
                vals_s[e] = v_vals[vbase + e];
                e += tile;
            }
            sync_cube();
        }

        #[unroll]
        for g in 0..group {
            let alpha = alpha_s[g];
            #[unroll]
            for ci in 0..cpt {
                acc[g * cpt + ci] *= alpha;
            }
        }
        let mut k = lane;
        while k < n {
            if sparse && k < nc {
                let row_bit0 = k * head_dim;
                let bitpos = row_bit0 + c0;
                let word = bits_s[bitpos / 32];
                let mut slot = k * keep_v;
                for wi in row_bit0 / 32..bitpos / 32 {
                    slot += bits_s[wi].count_ones() as usize;
                }
                let b0 = (bitpos % 32) as u32;
                let below = word & ((1u32 << b0) - 1u32);
                slot += (below >> (row_bit0 % 32) as u32).count_ones() as usize;
                #[unroll]
                for ci in 0..cpt {
                    if (word >> (b0 + ci as u32)) & 1u32 == 1u32 {
                        let x = f32::cast_from(vals_s[slot]);
                        slot += 1;
                        #[unroll]
                        for g in 0..group {
                            acc[g * cpt + ci] += p_s[g * tile + k] * x;
                        }
                    }
                }
            } else {
                let base = stream * win_stride as usize + (t0 + k - tc) * head_dim + c0;
                #[unroll]
                for ci in 0..cpt {
                    let x = f32::cast_from(v_win[base + ci]);
                    #[unroll]
                    for g in 0..group {
                        acc[g * cpt + ci] += p_s[g * tile + k] * x;
                    }
                }
            }
            k += lanes;
        }
        sync_cube();
        t0 += tile;
    }

    // Sum the token lanes (p_s is free now and holds lanes * group * head_dim floats).
    if comptime!(lanes > 1) {
        #[unroll]
        for g in 0..group {
            p_s[(lane * group + g) * head_dim + c0] = acc[g];
        }
        sync_cube();
        if lane == 0 {
            for l in 1..lanes {
                #[unroll]
                for g in 0..group {
                    acc[g] += p_s[(l * group + g) * head_dim + c0];
                }
            }
        }
    }
    let row0 = b * q_heads as usize + h * group;
    if lane == 0 {
        #[unroll]
        for g in 0..group {
            #[unroll]
            for ci in 0..cpt {
                part_o[((row0 + g) * splits + split) * head_dim + c0 + ci] = acc[g * cpt + ci];
            }
        }
    }
    if tid < group {
        let at = ((row0 + tid) * splits + split) * 2;
        part_ml[at] = m_run;
        part_ml[at + 1] = l_run;
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
    if batch == 0 || kv_heads == 0 || q_heads == 0 || q_heads % kv_heads != 0 {
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
    let tile = tile_tokens(
        d,
        group,
        keep_k.max(keep_v),
        es,
        segment.is_some(),
        hw.max_shared_memory_size,
        hw.max_units_per_cube as usize,
    )?;
    let max_total = (0..batch)
        .map(|s| (args.compressed_lens[s] + args.window_lens[s]) as usize)
        .max()
        .unwrap_or(1);
    let wanted_splits = TARGET_CUBES.div_ceil(streams).max(1);
    let split_tokens = max_total.div_ceil(wanted_splits).div_ceil(tile).max(1) * tile;
    let splits = max_total.div_ceil(split_tokens);

    let upload = |v: &[u32]| client.create_from_slice(u32::as_bytes(v));
    let (comp_len, win_len) = (upload(args.compressed_lens), upload(args.window_lens));
    let rows = batch * q_heads;
    let part_o = client.empty(rows * splits * d * 4);
    let part_ml = client.empty(rows * splits * 2 * 4);
    let placeholder = client.empty(16);
    let elems = |h: &cubecl::server::Handle, size: usize| h.size() as usize / size;
    let arr = |h: &cubecl::server::Handle, size: usize| unsafe {
        ArrayArg::from_raw_parts(h.clone(), elems(h, size))
    };
    let (kb, kv, vb, vv, bits_stride, kvs, vvs) = match segment {
        Some(s) => (
            arr(s.k_bitmap, 4),
            arr(s.k_values, es),
            arr(s.v_bitmap, 4),
            arr(s.v_values, es),
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
        arr(q, es),
        kb,
        kv,
        vb,
        vv,
        arr(window.k, es),
        arr(window.v, es),
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
        tile,
        keep_k,
        keep_v,
        segment.is_some(),
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
