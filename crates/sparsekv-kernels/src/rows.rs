//! Copies token rows between dense stream buffers at per-sequence offsets: appending new
//! tokens to a cache's dense storage, and compacting a dense window after its oldest tokens
//! were compressed. One launch for every stream of the batch, ragged counts included.

use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::upload::upload_u32;
use crate::{FloatElement, check_type_supported};

/// Units per cube.
const UNITS: usize = 256;

/// Where this cube's stream (`CUBE_POS_Y`, `sequence * kv_heads + kv_head`) reads and writes,
/// from the offsets every row kernel is given (source start rows, destination start rows and
/// row counts, one per sequence each): `(stream, source start, destination start, count)`.
#[cube]
pub(crate) fn stream_rows(offsets: &Array<u32>, kv_heads: u32) -> (usize, usize, usize, usize) {
    let stream = CUBE_POS_Y as usize;
    let seqs = CUBE_COUNT_Y as usize / kv_heads as usize;
    let seq = stream / kv_heads as usize;
    (
        stream,
        offsets[seq] as usize,
        offsets[seqs + seq] as usize,
        offsets[2 * seqs + seq] as usize,
    )
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn copy_rows_kernel<F: Float, N: Size>(
    src_a: &Array<Vector<F, N>>,
    dst_a: &mut Array<Vector<F, N>>,
    src_b: &Array<Vector<F, N>>,
    dst_b: &mut Array<Vector<F, N>>,
    offsets: &Array<u32>,
    src_stride: u32,
    dst_stride: u32,
    kv_heads: u32,
    #[comptime] row_vecs: usize,
) {
    let (stream, src_start, dst_start, count) = stream_rows(offsets, kv_heads);
    let i = ABSOLUTE_POS_X as usize;
    let row = i / row_vecs;
    let part = i % row_vecs;
    if row < count {
        let s = stream * src_stride as usize + (src_start + row) * row_vecs + part;
        let d = stream * dst_stride as usize + (dst_start + row) * row_vecs + part;
        if CUBE_POS_Z == 0 {
            dst_a[d] = src_a[s];
        } else {
            dst_b[d] = src_b[s];
        }
    }
}

/// Where [`copy_rows`] reads and writes. Streams are `sequence * kv_heads + kv_head`; a
/// stream's rows are `head_dim` elements each, `src_capacity` / `dst_capacity` rows apart
/// from one stream to the next. Sequence `s` copies `counts[s]` rows from row
/// `src_start[s]` to row `dst_start[s]` of each of its streams.
#[derive(Debug, Clone)]
pub struct CopyRowsArgs<'a> {
    /// Sequences in the batch.
    pub sequences: usize,
    /// KV heads per sequence.
    pub kv_heads: usize,
    /// Elements per row.
    pub head_dim: usize,
    /// Rows per source stream.
    pub src_capacity: usize,
    /// Rows per destination stream.
    pub dst_capacity: usize,
    /// First source row, per sequence.
    pub src_start: &'a [u32],
    /// First destination row, per sequence.
    pub dst_start: &'a [u32],
    /// Rows to copy, per sequence.
    pub counts: &'a [u32],
}

impl CopyRowsArgs<'_> {
    /// Checks that every per-sequence list has one entry per sequence and that each
    /// sequence's rows stay within both capacities.
    pub(crate) fn validate(&self) -> Result<()> {
        let seqs = self.sequences;
        for (name, v) in [
            ("src_start", self.src_start),
            ("dst_start", self.dst_start),
            ("counts", self.counts),
        ] {
            if v.len() != seqs {
                return Err(KernelError::InvalidArguments(format!(
                    "{name} has {} entries for {seqs} sequences",
                    v.len()
                )));
            }
        }
        for s in 0..seqs {
            let n = self.counts[s] as usize;
            if self.src_start[s] as usize + n > self.src_capacity
                || self.dst_start[s] as usize + n > self.dst_capacity
            {
                return Err(KernelError::InvalidArguments(format!(
                    "sequence {s}: copying {n} rows from row {} to row {} exceeds the capacities ({} and {} rows)",
                    self.src_start[s], self.dst_start[s], self.src_capacity, self.dst_capacity
                )));
            }
        }
        Ok(())
    }
}

/// Copies rows of `F` elements from each source to its destination (distinct buffers), the
/// same rows for every pair (one or two pairs: the keys and the values of a cache), in one
/// launch with one upload of the offsets. Nothing is read back.
pub fn copy_rows<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    args: &CopyRowsArgs<'_>,
    pairs: &[(&cubecl::server::Handle, &cubecl::server::Handle)],
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    // A single pair binds small placeholders as the second one (never read: the grid has
    // one layer), so no buffer is bound twice; two pairs (a cache's K and V) need none.
    let placeholder;
    let (&(src_a, dst_a), (src_b, dst_b)) = match pairs {
        [a] => {
            placeholder = (
                crate::upload::placeholder(client, 0),
                crate::upload::placeholder(client, 1),
            );
            (a, (&placeholder.0, &placeholder.1))
        }
        [a, b] => (a, *b),
        _ => {
            return Err(KernelError::InvalidArguments(format!(
                "copy_rows takes one or two (source, destination) pairs, got {}",
                pairs.len()
            )));
        }
    };
    args.validate()?;
    let (seqs, d) = (args.sequences, args.head_dim);
    let streams = seqs * args.kv_heads;
    let es = F::size_bytes();
    for &(src, dst) in pairs {
        check_len("source rows", src, streams * args.src_capacity * d * es)?;
        check_len(
            "destination rows",
            dst,
            streams * args.dst_capacity * d * es,
        )?;
    }
    let max = args.counts.iter().copied().max().unwrap_or(0) as usize;
    if max == 0 || streams == 0 {
        return Ok(());
    }
    let mut vec = (16 / es).max(1);
    while !d.is_multiple_of(vec) {
        vec /= 2;
    }
    let row_vecs = d / vec;
    let offsets = upload_u32(
        client,
        &[args.src_start, args.dst_start, args.counts].concat(),
    );
    let varr = |h: &cubecl::server::Handle| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / (es * vec))
    };
    copy_rows_kernel::launch::<F, R>(
        client,
        CubeCount::Static(
            (max * row_vecs).div_ceil(UNITS) as u32,
            streams as u32,
            pairs.len() as u32,
        ),
        CubeDim::new_1d(UNITS as u32),
        vec,
        varr(src_a),
        varr(dst_a),
        varr(src_b),
        varr(dst_b),
        unsafe { ArrayArg::from_raw_parts(offsets, 3 * seqs) },
        (args.src_capacity * row_vecs) as u32,
        (args.dst_capacity * row_vecs) as u32,
        args.kv_heads as u32,
        row_vecs,
    );
    Ok(())
}
