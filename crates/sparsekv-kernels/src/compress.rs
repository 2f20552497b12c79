//! Per-token magnitude prune + compress: dense rows in, bitmap words and packed values out,
//! written in place into preallocated stream storage (docs/FORMAT.md).
//!
//! A launch takes one or two targets (a cache's keys and values together: one launch and one
//! upload of the offsets where there were two). Every element's fate follows the oracle's
//! rule: an element is kept when fewer than `keep` elements of its row beat it (a larger
//! magnitude key, or an equal key and a lower index). Two kernels apply it:
//!
//! - **Plane selection** (devices with 32-lane plane operations, `head_dim` at least 32): one
//!   plane per row, each lane holding `head_dim / 32` elements. The row's `keep`-th largest
//!   key is found bit by bit from the top (radix select: a candidate stays when at least
//!   `keep` keys reach it, counted by ballots), stopping as soon as exactly `keep` keys reach
//!   it; ties at that key go to the lower indices. The ballots of the kept elements are the
//!   row's bitmap words, and their prefix counts the slots of the packed values. About 12
//!   steps of a few instructions per row where ranking costs `head_dim` per element.
//! - **Ranking** (elsewhere, e.g. lavapipe): a cube handles `ROW_BITS / head_dim` consecutive
//!   destination tokens of one stream, one unit per element; an element's rank is the number
//!   of elements of its row that beat it. Tiles are aligned to destination bitmap words, so no
//!   two cubes write the same word; a word shared with tokens compressed earlier is updated by
//!   read-modify-write of the bits this cube owns.

use cubecl::prelude::*;

use crate::error::{KernelError, Result};
use crate::rows::stream_rows;
use crate::upload::upload_u32;
use crate::{FloatElement, check_type_supported};
use sparsekv_format::{HeadDim, Sparsity, keep_count, layout::bitmap_words};

/// Bits (elements) a compress cube covers: one unit per element.
const ROW_BITS: usize = 256;
/// Magnitude key of NaN: above +Inf (0x7F80_0000); all NaNs tie.
const NAN_KEY: u32 = 0x7F80_0001;
/// Rows (planes) per cube of the plane-selection kernel.
const PLANE_ROWS: usize = 8;
/// Lanes per plane the plane-selection kernel is written for.
const PLANE_LANES: usize = 32;

/// The magnitude key of `x`: its absolute value's f32 bits (monotonic in `|x|`), NaN above
/// everything.
#[cube]
fn magnitude_key<F: Float>(x: F) -> u32 {
    let mut key = u32::reinterpret(f32::cast_from(x)) & 0x7FFF_FFFFu32;
    if key > 0x7F80_0000u32 {
        key = NAN_KEY;
    }
    key
}

/// The plane-selection kernel's work for one target (module docs): plane `UNIT_POS_Y` of the
/// cube compresses token `CUBE_POS_X * PLANE_ROWS + UNIT_POS_Y` of its sequence's range in
/// stream `CUBE_POS_Y`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn compress_rows_plane<F: Float>(
    src: &Array<F>,
    offsets: &Array<u32>,
    bitmap: &mut Array<u32>,
    values: &mut Array<F>,
    src_stride: u32,
    bitmap_stride: u32,
    values_stride: u32,
    kv_heads: u32,
    keep: u32,
    #[comptime] head_dim: usize,
) {
    let per_lane = comptime!(head_dim / PLANE_LANES);
    let (stream, src_start, dst_start, count) = stream_rows(offsets, kv_heads);
    let r = CUBE_POS_X as usize * PLANE_ROWS + UNIT_POS_Y as usize;
    // The whole plane takes the same branch: one row per plane.
    if r < count {
        let lane = UNIT_POS_X;
        let src0 = stream * src_stride as usize + (src_start + r) * head_dim;
        let dst_token = dst_start + r;
        // Element `j * 32 + lane` of the row, for each of this lane's `j`.
        let mut xs = Array::<F>::new(per_lane);
        let mut keys = Array::<u32>::new(per_lane);
        #[unroll]
        for j in 0..per_lane {
            let x = src[src0 + j * PLANE_LANES + lane as usize];
            xs[j] = x;
            keys[j] = magnitude_key::<F>(x);
        }
        // Radix select: `threshold` is the largest value that at least `keep` keys reach,
        // built from the top bit down; `reaching` counts the keys that reach it. Exactly
        // `keep` reaching ends the search early: the kept set is then known.
        let mut threshold = 0u32;
        let mut reaching = u32::new(comptime!(head_dim as i64));
        let mut bit = 31u32;
        while bit > 0u32 && reaching != keep {
            bit -= 1u32;
            let candidate = threshold | (1u32 << bit);
            let mut n = 0u32;
            #[unroll]
            for j in 0..per_lane {
                n += plane_ballot(keys[j] >= candidate)[0].count_ones();
            }
            if n >= keep {
                threshold = candidate;
                reaching = n;
            }
        }
        // Keys above the threshold are kept; of the keys equal to it, the lowest indices
        // (index order is j, then lane) fill what is left of `keep`.
        let mut above = 0u32;
        #[unroll]
        for j in 0..per_lane {
            above += plane_ballot(keys[j] > threshold)[0].count_ones();
        }
        let mut ties_left = keep - above;
        let below_lane = (1u32 << lane) - 1u32;
        let mut slot = 0u32;
        let row_words = stream * bitmap_stride as usize + dst_token * head_dim / 32;
        let row_values = stream * values_stride as usize + dst_token * keep as usize;
        #[unroll]
        for j in 0..per_lane {
            let tie = keys[j] == threshold;
            let ties = plane_ballot(tie)[0];
            let tie_rank = (ties & below_lane).count_ones();
            let kept = keys[j] > threshold || (tie && tie_rank < ties_left);
            ties_left -= min(ties.count_ones(), ties_left);
            let word = plane_ballot(kept)[0];
            if kept {
                values[row_values + (slot + (word & below_lane).count_ones()) as usize] = xs[j];
            }
            if lane == 0u32 {
                bitmap[row_words + j] = word;
            }
            slot += word.count_ones();
        }
    }
}

/// One cube's tile of one target (module docs).
#[cube]
#[allow(clippy::too_many_arguments)]
fn compress_tile<F: Float>(
    src: &Array<F>,
    offsets: &Array<u32>,
    bitmap: &mut Array<u32>,
    values: &mut Array<F>,
    src_stride: u32,
    bitmap_stride: u32,
    values_stride: u32,
    kv_heads: u32,
    keep: u32,
    #[comptime] head_dim: usize,
) {
    let rows = comptime!(ROW_BITS / head_dim);
    let mut keys = SharedMemory::<u32>::new(ROW_BITS);
    let mut kept = SharedMemory::<u32>::new(ROW_BITS);

    let (stream, src_start, dst0, count) = stream_rows(offsets, kv_heads);
    let tile_first = (dst0 / rows) * rows + CUBE_POS_X as usize * rows;
    let unit = UNIT_POS as usize;
    let row = unit / head_dim;
    let elem = unit % head_dim;
    let dst_token = tile_first + row;
    let valid = dst_token >= dst0 && dst_token < dst0 + count;

    let mut x = F::new(0.0);
    let mut key = 0u32;
    if valid {
        let src_token = src_start + (dst_token - dst0);
        x = src[stream * src_stride as usize + src_token * head_dim + elem];
        key = magnitude_key::<F>(x);
    }
    keys[unit] = key;
    sync_cube();

    let row_base = row * head_dim;
    let mut rank = 0u32;
    for i in 0..head_dim {
        let other = keys[row_base + i];
        if other > key || (other == key && i < elem) {
            rank += 1;
        }
    }
    let is_kept = rank < keep;
    kept[unit] = u32::cast_from(is_kept);
    sync_cube();

    if valid && is_kept {
        let mut slot = 0u32;
        for i in 0..elem {
            slot += kept[row_base + i];
        }
        values[stream * values_stride as usize + dst_token * keep as usize + slot as usize] = x;
    }

    // One unit per bitmap word of the tile assembles and stores it.
    if unit < comptime!(ROW_BITS / 32) {
        let mut word = 0u32;
        let mut mask = 0u32;
        for b in 0..32usize {
            let flat = unit * 32 + b;
            let t = tile_first + flat / head_dim;
            if t >= dst0 && t < dst0 + count {
                mask |= 1u32 << b as u32;
                word |= kept[flat] << b as u32;
            }
        }
        if mask != 0u32 {
            let index = stream * bitmap_stride as usize + (tile_first * head_dim) / 32 + unit;
            let old = bitmap[index];
            bitmap[index] = (old & !mask) | word;
        }
    }
}

/// One target's share of the launch: plane selection or ranking (module docs).
#[cube]
#[allow(clippy::too_many_arguments)]
fn compress_target<F: Float>(
    src: &Array<F>,
    offsets: &Array<u32>,
    bitmap: &mut Array<u32>,
    values: &mut Array<F>,
    src_stride: u32,
    bitmap_stride: u32,
    values_stride: u32,
    kv_heads: u32,
    keep: u32,
    #[comptime] head_dim: usize,
    #[comptime] plane: bool,
) {
    if comptime!(plane) {
        compress_rows_plane::<F>(
            src,
            offsets,
            bitmap,
            values,
            src_stride,
            bitmap_stride,
            values_stride,
            kv_heads,
            keep,
            head_dim,
        );
    } else {
        compress_tile::<F>(
            src,
            offsets,
            bitmap,
            values,
            src_stride,
            bitmap_stride,
            values_stride,
            kv_heads,
            keep,
            head_dim,
        );
    }
}

/// The prune+compress kernel: one or two targets (a cache's keys and values) in one launch,
/// grid `(tiles, streams, targets)`; the second target's arguments are placeholders when
/// there is one. `plane`: the plane-selection kernel (module docs), else ranking.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn prune_compress_kernel<F: Float>(
    src_a: &Array<F>,
    src_b: &Array<F>,
    offsets: &Array<u32>,
    bitmap_a: &mut Array<u32>,
    values_a: &mut Array<F>,
    bitmap_b: &mut Array<u32>,
    values_b: &mut Array<F>,
    src_stride: u32,
    bitmap_stride: u32,
    values_stride_a: u32,
    values_stride_b: u32,
    kv_heads: u32,
    keep_a: u32,
    keep_b: u32,
    #[comptime] head_dim: usize,
    #[comptime] plane: bool,
) {
    if CUBE_POS_Z == 0 {
        compress_target::<F>(
            src_a,
            offsets,
            bitmap_a,
            values_a,
            src_stride,
            bitmap_stride,
            values_stride_a,
            kv_heads,
            keep_a,
            head_dim,
            plane,
        );
    } else {
        compress_target::<F>(
            src_b,
            offsets,
            bitmap_b,
            values_b,
            src_stride,
            bitmap_stride,
            values_stride_b,
            kv_heads,
            keep_b,
            head_dim,
            plane,
        );
    }
}

/// Where a [`prune_compress`] call reads its dense rows and writes its compressed tokens.
///
/// Streams are numbered `sequence * kv_heads + kv_head`. Stream `s` reads token `i` from
/// `src[s * src_stride + (src_start[seq] + i) * head_dim ..]` and writes it as compressed
/// token `dst_start[seq] + i` of its stream, for `i < counts[seq]`; destination streams hold
/// `capacity` tokens each (docs/FORMAT.md's strides: `bitmap_words(capacity)` words and
/// `capacity * keep` values).
#[derive(Debug, Clone)]
pub struct CompressArgs<'a> {
    /// Sequences in the batch.
    pub sequences: usize,
    /// KV heads per sequence.
    pub kv_heads: usize,
    /// Elements per row.
    pub head_dim: HeadDim,
    /// Elements between the starts of consecutive source streams.
    pub src_stride: usize,
    /// First source token of each sequence.
    pub src_start: &'a [u32],
    /// First destination token of each sequence.
    pub dst_start: &'a [u32],
    /// Tokens to compress, per sequence.
    pub counts: &'a [u32],
    /// Tokens per destination stream.
    pub capacity: usize,
}

/// One set of buffers a [`prune_compress`] call compresses: dense rows of `F` in, `u32`
/// bitmap words and `F` packed values out, pruned at `sparsity`.
#[derive(Debug, Clone, Copy)]
pub struct CompressTarget<'a> {
    /// Dense source rows.
    pub src: &'a cubecl::server::Handle,
    /// Destination bitmap words.
    pub bitmap: &'a cubecl::server::Handle,
    /// Destination packed values.
    pub values: &'a cubecl::server::Handle,
    /// Fraction of each row pruned.
    pub sparsity: Sparsity,
}

/// Prunes and compresses dense rows into preallocated streams, on the device, without
/// synchronising with the host: one or two targets (a cache's keys and values, each at its
/// own sparsity) with the same rows, in one launch with one upload of the offsets. Lengths of
/// the handles are checked against the strides [`CompressArgs`] implies.
pub fn prune_compress<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    args: &CompressArgs<'_>,
    targets: &[CompressTarget<'_>],
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    // A single target binds small placeholders as the second one (never touched: the grid
    // has one layer), so no buffer is bound twice; two (a cache's K and V) need none.
    let placeholder;
    let (a, b) = match targets {
        [a] => {
            placeholder = crate::upload::placeholder(client, 0);
            let p = &placeholder;
            let none = CompressTarget {
                src: p,
                bitmap: p,
                values: p,
                sparsity: a.sparsity,
            };
            (*a, none)
        }
        [a, b] => (*a, *b),
        _ => {
            return Err(KernelError::InvalidArguments(format!(
                "prune_compress takes one or two targets, got {}",
                targets.len()
            )));
        }
    };
    let d = args.head_dim.get();
    let streams = args.sequences * args.kv_heads;
    for (name, v) in [
        ("src_start", args.src_start),
        ("dst_start", args.dst_start),
        ("counts", args.counts),
    ] {
        if v.len() != args.sequences {
            return Err(KernelError::InvalidArguments(format!(
                "{name} has {} entries for {} sequences",
                v.len(),
                args.sequences
            )));
        }
    }
    if streams == 0 {
        return Err(KernelError::InvalidArguments(
            "no sequences or no KV heads".into(),
        ));
    }
    for seq in 0..args.sequences {
        let (src0, dst0, n) = (
            args.src_start[seq] as usize,
            args.dst_start[seq] as usize,
            args.counts[seq] as usize,
        );
        if (src0 + n) * d > args.src_stride {
            return Err(KernelError::InvalidArguments(format!(
                "sequence {seq}: source tokens {src0}..{} exceed the source stream ({} tokens)",
                src0 + n,
                args.src_stride / d
            )));
        }
        if dst0 + n > args.capacity {
            return Err(KernelError::InvalidArguments(format!(
                "sequence {seq}: compressed tokens {dst0}..{} exceed the stream capacity ({})",
                dst0 + n,
                args.capacity
            )));
        }
    }
    let bitmap_stride = bitmap_words(args.capacity, args.head_dim);
    let keep = |t: &CompressTarget<'_>| keep_count(t.sparsity, args.head_dim);
    for t in targets {
        check_len("source", t.src, streams * args.src_stride * F::size_bytes())?;
        check_len("bitmap", t.bitmap, streams * bitmap_stride * 4)?;
        check_len(
            "values",
            t.values,
            streams * args.capacity * keep(t) * F::size_bytes(),
        )?;
    }
    let max_count = args.counts.iter().copied().max().unwrap_or(0) as usize;
    if max_count == 0 {
        return Ok(());
    }
    let hw = &client.properties().hardware;
    let plane = d >= PLANE_LANES
        && client
            .features()
            .plane
            .contains(cubecl::features::Plane::Ops)
        && hw.plane_size_min == PLANE_LANES as u32
        && hw.plane_size_max == PLANE_LANES as u32;
    let (tiles, dim) = if plane {
        (
            max_count.div_ceil(PLANE_ROWS),
            CubeDim::new_2d(PLANE_LANES as u32, PLANE_ROWS as u32),
        )
    } else {
        // +1 tile: destination tiles are aligned down to whole bitmap words.
        (
            max_count.div_ceil(ROW_BITS / d) + 1,
            CubeDim::new_1d(ROW_BITS as u32),
        )
    };
    // One upload: source starts, destination starts, counts.
    let offsets = upload_u32(
        client,
        &[args.src_start, args.dst_start, args.counts].concat(),
    );
    let word_count = |h: &cubecl::server::Handle, elem: usize| h.size_in_used() as usize / elem;
    let es = F::size_bytes();
    unsafe {
        prune_compress_kernel::launch::<F, R>(
            client,
            CubeCount::Static(tiles as u32, streams as u32, targets.len() as u32),
            dim,
            ArrayArg::from_raw_parts(a.src.clone(), word_count(a.src, es)),
            ArrayArg::from_raw_parts(b.src.clone(), word_count(b.src, es)),
            ArrayArg::from_raw_parts(offsets, 3 * args.sequences),
            ArrayArg::from_raw_parts(a.bitmap.clone(), word_count(a.bitmap, 4)),
            ArrayArg::from_raw_parts(a.values.clone(), word_count(a.values, es)),
            ArrayArg::from_raw_parts(b.bitmap.clone(), word_count(b.bitmap, 4)),
            ArrayArg::from_raw_parts(b.values.clone(), word_count(b.values, es)),
            args.src_stride as u32,
            bitmap_stride as u32,
            (args.capacity * keep(&a)) as u32,
            (args.capacity * keep(&b)) as u32,
            args.kv_heads as u32,
            keep(&a) as u32,
            keep(&b) as u32,
            d,
            plane,
        )
    };
    Ok(())
}

/// Checks that a handle holds at least `bytes` bytes.
pub(crate) fn check_len(what: &str, handle: &cubecl::server::Handle, bytes: usize) -> Result<()> {
    // A view of a larger buffer (an offset handle) holds only its own range.
    if (handle.size_in_used() as usize) < bytes {
        return Err(KernelError::InvalidArguments(format!(
            "{what} buffer holds {} bytes, the arguments need {bytes}",
            handle.size_in_used()
        )));
    }
    Ok(())
}
