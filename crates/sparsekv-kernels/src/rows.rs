//! Copies token rows between dense stream buffers at per-sequence offsets: appending new
//! tokens to a cache's dense storage, and compacting a dense window after its oldest tokens
//! were compressed. One launch for every stream of the batch, ragged counts included.

use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::{FloatElement, check_type_supported};

/// Units per cube.
const UNITS: usize = 256;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn copy_rows_kernel<F: Float, N: Size>(
    src: &Array<Vector<F, N>>,
    dst: &mut Array<Vector<F, N>>,
    src_start: &Array<u32>,
    dst_start: &Array<u32>,
    counts: &Array<u32>,
    src_stride: u32,
    dst_stride: u32,
    kv_heads: u32,
    #[comptime] row_vecs: usize,
) {
    let stream = CUBE_POS_Y as usize;
    let seq = stream / kv_heads as usize;
    let i = ABSOLUTE_POS_X as usize;
    let row = i / row_vecs;
    let part = i % row_vecs;
    if row < counts[seq] as usize {
        let s = stream * src_stride as usize + (src_start[seq] as usize + row) * row_vecs + part;
        let d = stream * dst_stride as usize + (dst_start[seq] as usize + row) * row_vecs + part;
        dst[d] = src[s];
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

/// Copies rows of `F` elements from `src` to `dst` (distinct buffers) on the device.
pub fn copy_rows<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    args: &CopyRowsArgs<'_>,
    src: &cubecl::server::Handle,
    dst: &cubecl::server::Handle,
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    let (seqs, d) = (args.sequences, args.head_dim);
    for (name, v) in [
        ("src_start", args.src_start),
        ("dst_start", args.dst_start),
        ("counts", args.counts),
    ] {
        if v.len() != seqs {
            return Err(KernelError::InvalidArguments(format!(
                "{name} has {} entries for {seqs} sequences",
                v.len()
            )));
        }
    }
    for s in 0..seqs {
        let n = args.counts[s] as usize;
        if args.src_start[s] as usize + n > args.src_capacity
            || args.dst_start[s] as usize + n > args.dst_capacity
        {
            return Err(KernelError::InvalidArguments(format!(
                "sequence {s}: copying {n} rows from row {} to row {} exceeds the capacities ({} and {} rows)",
                args.src_start[s], args.dst_start[s], args.src_capacity, args.dst_capacity
            )));
        }
    }
    let streams = seqs * args.kv_heads;
    let es = F::size_bytes();
    check_len("source rows", src, streams * args.src_capacity * d * es)?;
    check_len(
        "destination rows",
        dst,
        streams * args.dst_capacity * d * es,
    )?;
    let max = args.counts.iter().copied().max().unwrap_or(0) as usize;
    if max == 0 || streams == 0 {
        return Ok(());
    }
    let mut vec = (16 / es).max(1);
    while !d.is_multiple_of(vec) {
        vec /= 2;
    }
    let row_vecs = d / vec;
    let upload = |v: &[u32]| client.create_from_slice(u32::as_bytes(v));
    let (ss, ds, cs) = (
        upload(args.src_start),
        upload(args.dst_start),
        upload(args.counts),
    );
    let varr = |h: &cubecl::server::Handle| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size() as usize / (es * vec))
    };
    let arr = |h: &cubecl::server::Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), seqs) };
    copy_rows_kernel::launch::<F, R>(
        client,
        CubeCount::Static((max * row_vecs).div_ceil(UNITS) as u32, streams as u32, 1),
        CubeDim::new_1d(UNITS as u32),
        vec,
        varr(src),
        varr(dst),
        arr(&ss),
        arr(&ds),
        arr(&cs),
        (args.src_capacity * row_vecs) as u32,
        (args.dst_capacity * row_vecs) as u32,
        args.kv_heads as u32,
        row_vecs,
    );
    Ok(())
}
