//! A sparse cache's tokens back to dense rows: every token a stream holds, compressed ones
//! expanded (pruned elements zero, docs/FORMAT.md) and then the window's, in one contiguous
//! `[streams, context, head_dim]` buffer. A prompt chunk that goes through a sparse cache
//! (the streaming prefill) attends to this with the prompt attention kernel, which reads dense
//! tiles: per layer and chunk the expansion writes the context once, where attending through
//! the decode kernel would expand every compressed row once per query row.
//!
//! One unit writes one vector of [`expand_vector`] elements of one row: the kept values below
//! it in its row (the bitmap words before it, the bits before it in its word) give where its
//! values start in the row's packed values.

use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::upload::upload_u32;
use crate::{FloatElement, check_type_supported};
use sparsekv_format::{HeadDim, Sparsity, keep_count, layout::bitmap_words};

/// Units per cube.
const UNITS: usize = 256;

/// Elements per unit and per store: 16 bytes of `F`, at most a row.
pub fn expand_vector<F: FloatElement>(head_dim: HeadDim) -> usize {
    (16 / F::size_bytes()).min(head_dim.get())
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn expand_context_kernel<F: Float, N: Size>(
    bitmap: &Array<u32>,
    values: &Array<F>,
    window: &Array<Vector<F, N>>,
    lengths: &Array<u32>,
    out: &mut Array<Vector<F, N>>,
    bitmap_stride: u32,
    values_stride: u32,
    window_capacity: u32,
    context: u32,
    kv_heads: u32,
    keep: u32,
    #[comptime] head_dim: usize,
    #[comptime] vector: usize,
) {
    // `vector` is `N`: elements per unit.
    let groups = comptime!(head_dim / vector);
    let stream = CUBE_POS_Y as usize;
    let i = CUBE_POS_X as usize * UNITS + UNIT_POS as usize;
    let context = context as usize;
    if i >= context * groups {
        terminate!();
    }
    let (row, group) = (i / groups, i % groups);
    let sequences = CUBE_COUNT_Y as usize / kv_heads as usize;
    let sequence = stream / kv_heads as usize;
    // lengths: compressed tokens per sequence, then window tokens per sequence.
    let compressed = lengths[sequence] as usize;
    let dense = lengths[sequences + sequence] as usize;

    let mut x = Vector::<F, N>::zeroed();
    if row < compressed {
        // Bits of the stream: element `j` of row `t` is bit `t d + j`. A row of fewer than
        // 32 elements lies in one word; a longer one starts a word.
        let row_bit = row * head_dim;
        let first = row_bit + group * vector;
        let words = stream * bitmap_stride as usize;
        let last = first / 32;
        let mut below = 0u32;
        for w in row_bit / 32..last {
            below += bitmap[words + w].count_ones();
        }
        let word = bitmap[words + last];
        let (lo, hi) = ((row_bit % 32) as u32, (first % 32) as u32);
        below += (word & ((1u32 << hi) - (1u32 << lo))).count_ones();
        let bits = word >> hi;
        let mut at = stream * values_stride as usize + row * keep as usize + below as usize;
        #[unroll]
        for e in 0..vector {
            if (bits >> e as u32) & 1u32 == 1u32 {
                x[e] = values[at];
                at += 1;
            }
        }
    } else if row < compressed + dense {
        x = window[(stream * window_capacity as usize + row - compressed) * groups + group];
    }
    out[(stream * context + row) * groups + group] = x;
}

/// Where [`expand_context`] reads a sparse cache and what it writes.
///
/// Streams are `sequence * kv_heads + kv_head`. Stream `s` of sequence `seq` becomes rows
/// `s * context ..` of the output: its `compressed[seq]` compressed tokens (from the bitmap
/// and values of a stream of `capacity` tokens), then the first `window[seq]` rows of its
/// window stream (`window_capacity` rows), then zero rows up to `context`.
#[derive(Debug, Clone)]
pub struct ExpandArgs<'a> {
    /// Sequences in the batch.
    pub sequences: usize,
    /// KV heads per sequence.
    pub kv_heads: usize,
    /// Elements per row.
    pub head_dim: HeadDim,
    /// Sparsity the compressed rows were pruned at.
    pub sparsity: Sparsity,
    /// Tokens per compressed stream (its allocation).
    pub capacity: usize,
    /// Rows per window stream.
    pub window_capacity: usize,
    /// Compressed tokens per sequence.
    pub compressed: &'a [u32],
    /// Window tokens per sequence (after the compressed ones).
    pub window: &'a [u32],
    /// Rows per output stream: at least each sequence's compressed plus window tokens.
    pub context: usize,
}

/// Expands every token of a sparse cache's streams into dense rows (module docs), on the
/// device, without synchronising with the host: `bitmap` `u32` words and `values` `F`
/// elements in docs/FORMAT.md's layout, `window` `[streams, window_capacity, head_dim]`,
/// `out` `[streams, context, head_dim]`, all `F`; buffer lengths and 16-byte alignment are
/// checked.
pub fn expand_context<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    args: &ExpandArgs<'_>,
    bitmap: &cubecl::server::Handle,
    values: &cubecl::server::Handle,
    window: &cubecl::server::Handle,
    out: &cubecl::server::Handle,
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    let (d, es) = (args.head_dim.get(), F::size_bytes());
    let keep = keep_count(args.sparsity, args.head_dim);
    let streams = args.sequences * args.kv_heads;
    if streams == 0 || args.context == 0 {
        return Err(KernelError::InvalidArguments(
            "no sequences, no KV heads or an empty context".into(),
        ));
    }
    for (name, v) in [("compressed", args.compressed), ("window", args.window)] {
        if v.len() != args.sequences {
            return Err(KernelError::InvalidArguments(format!(
                "{name} has {} entries for {} sequences",
                v.len(),
                args.sequences
            )));
        }
    }
    for (s, (&c, &w)) in args.compressed.iter().zip(args.window).enumerate() {
        let (c, w) = (c as usize, w as usize);
        if c > args.capacity || w > args.window_capacity || c + w > args.context {
            return Err(KernelError::InvalidArguments(format!(
                "sequence {s}: {c} compressed and {w} window tokens do not fit streams of {} and {} tokens and a context of {}",
                args.capacity, args.window_capacity, args.context
            )));
        }
    }
    // The kernel indexes elements with 32-bit integers.
    if streams * args.context.max(args.capacity) * d > u32::MAX as usize {
        return Err(KernelError::InvalidArguments(format!(
            "{streams} streams of {} tokens of {d} elements: the expansion indexes at most 2^32 elements",
            args.context.max(args.capacity)
        )));
    }
    let bitmap_stride = bitmap_words(args.capacity, args.head_dim);
    let values_stride = args.capacity * keep;
    check_len("bitmap", bitmap, streams * bitmap_stride * 4)?;
    check_len("values", values, streams * values_stride * es)?;
    check_len("window", window, streams * args.window_capacity * d * es)?;
    check_len("output", out, streams * args.context * d * es)?;
    if [window, out]
        .iter()
        .any(|h| !h.offset_start.unwrap_or(0).is_multiple_of(16))
    {
        return Err(KernelError::InvalidArguments(
            "the window and the output must start on 16-byte boundaries".to_string(),
        ));
    }
    let vector = expand_vector::<F>(args.head_dim);
    let vectors = args.context * d / vector;
    let lengths = upload_u32(client, &[args.compressed, args.window].concat());
    let arr = |h: &cubecl::server::Handle, bytes: usize| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / bytes)
    };
    // SAFETY: every unit reads bitmap words and values of compressed rows below its
    // sequence's count (at most the capacity the buffers were checked against), window rows
    // below its count (at most the window capacity) and writes one vector below `context`
    // rows of its stream; rows and strides are whole vectors (head_dim a multiple of the
    // vector, buffers on 16 bytes).
    unsafe {
        expand_context_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(vectors.div_ceil(UNITS) as u32, streams as u32, 1),
            CubeDim::new_1d(UNITS as u32),
            vector,
            arr(bitmap, 4),
            arr(values, es),
            arr(window, vector * es),
            ArrayArg::from_raw_parts(lengths, 2 * args.sequences),
            arr(out, vector * es),
            bitmap_stride as u32,
            values_stride as u32,
            args.window_capacity as u32,
            args.context as u32,
            args.kv_heads as u32,
            keep as u32,
            d,
            vector,
        );
    }
    Ok(())
}
