//! Rotary position embedding fused with the split of a fused QKV projection: one launch takes
//! the projection's output `[sequences, tokens, (q_heads + 2 kv_heads) · head_dim]` and writes
//! the rotated queries `[sequences, tokens, q_heads, head_dim]` and the rotated keys and the
//! values as rows of the caches' streams: either tensors of their own
//! `[sequences, kv_heads, tokens, head_dim]`, or straight into a cache's dense rows at each
//! sequence's next free row (a decode step: no copy and no launch of its own for the append).
//!
//! One unit per channel pair of every head of every token, computed in f32. The angles come
//! from the model's tables (`cos`/`sin`, `[positions, head_dim / 2]`, one row per position):
//! token `t` of sequence `s` takes row `starts[s] + t`, so a decode step passes each sequence's
//! position and no per-step slice of the tables is launched.

use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::rows::CopyRowsArgs;
use crate::{FloatElement, check_type_supported};

/// Units per cube.
const UNITS: usize = 256;
/// Most cubes; larger inputs are walked grid-stride.
const MAX_CUBES: usize = 65_535;

/// How rotary position embeddings pair up the channels of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// llama2.c: adjacent pairs `(2i, 2i + 1)`.
    Interleaved,
    /// Hugging Face `rotate_half`: pairs `(i, i + head_dim / 2)`.
    RotateHalf,
}

/// The shape of one [`rope_split`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    /// Sequences.
    pub sequences: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key and value heads.
    pub kv_heads: usize,
    /// Elements per head (even).
    pub head_dim: usize,
    /// Rows (positions) of the angle tables.
    pub positions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RopePlan {
    head_dim: usize,
    q_heads: usize,
    kv_heads: usize,
    style: RopeStyle,
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rope_split_kernel<F: Float>(
    qkv: &Array<F>,
    cos: &Array<F>,
    sin: &Array<F>,
    offsets: &Array<u32>,
    q: &mut Array<F>,
    k: &mut Array<F>,
    v: &mut Array<F>,
    sequences: u32,
    tokens: u32,
    kv_capacity: u32,
    pairs_total: u32,
    #[comptime] plan: RopePlan,
) {
    let (d, hq, hkv) = comptime!((plan.head_dim, plan.q_heads, plan.kv_heads));
    let half = comptime!(plan.head_dim / 2);
    let heads = comptime!(plan.q_heads + 2 * plan.kv_heads);
    let n = tokens as usize;
    let mut idx = ABSOLUTE_POS;
    while idx < pairs_total as usize {
        let i = idx % half;
        let rest = idx / half;
        let head = rest % heads;
        let row = rest / heads;
        let (c0, c1) = if comptime!(plan.style == RopeStyle::Interleaved) {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let base = row * heads * d + head * d;
        let x0 = f32::cast_from(qkv[base + c0]);
        let x1 = f32::cast_from(qkv[base + c1]);
        let seq = row / n;
        let t = row % n;
        // offsets: positions of the first tokens, then where the K/V rows go (source start
        // tokens, destination start rows, counts), one per sequence each.
        let seqs = sequences as usize;
        let kv_first = offsets[seqs + seq] as usize;
        // Whether this token's key and value are written, and to which row of its streams.
        let writes_kv = t >= kv_first && t < kv_first + offsets[3 * seqs + seq] as usize;
        let kv_row = offsets[2 * seqs + seq] as usize + (t - min(t, kv_first));
        if head < hq + hkv {
            let angle_row = offsets[seq] as usize + t;
            let cs = f32::cast_from(cos[angle_row * half + i]);
            let sn = f32::cast_from(sin[angle_row * half + i]);
            let o0 = F::cast_from(x0 * cs - x1 * sn);
            let o1 = F::cast_from(x0 * sn + x1 * cs);
            if head < hq {
                let out = (row * hq + head) * d;
                q[out + c0] = o0;
                q[out + c1] = o1;
            } else if writes_kv {
                let out = ((seq * hkv + head - hq) * kv_capacity as usize + kv_row) * d;
                k[out + c0] = o0;
                k[out + c1] = o1;
            }
        } else if writes_kv {
            let out = ((seq * hkv + head - hq - hkv) * kv_capacity as usize + kv_row) * d;
            v[out + c0] = F::cast_from(x0);
            v[out + c1] = F::cast_from(x1);
        }
        idx += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// Splits `qkv` into rotated queries (`q`), rotated keys (`k`) and values (`v`), token `t` of
/// sequence `s` at position `starts[s] + t` of the angle tables `cos`, `sin`; see the module
/// docs for the layouts. `kv_rows` says where keys and values go: `k` and `v` are
/// `sequences · kv_heads` streams of `kv_rows.dst_capacity` rows, and sequence `s` writes its
/// tokens `kv_rows.src_start[s] ..` (`kv_rows.counts[s]` of them) at rows
/// `kv_rows.dst_start[s] ..` of its streams (a capacity of `tokens`, starts 0 and counts
/// `tokens` write every token into tensors of their own). Its sequences, KV heads and
/// head_dim are the shape's, and its source capacity the shape's tokens. All buffers hold
/// `F`. Nothing is read back.
#[allow(clippy::too_many_arguments)]
pub fn rope_split<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    shape: RopeShape,
    style: RopeStyle,
    qkv: &cubecl::server::Handle,
    cos: &cubecl::server::Handle,
    sin: &cubecl::server::Handle,
    starts: &[u32],
    q: &cubecl::server::Handle,
    [k, v]: [&cubecl::server::Handle; 2],
    kv_rows: &CopyRowsArgs<'_>,
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    let RopeShape {
        sequences,
        tokens,
        q_heads,
        kv_heads,
        head_dim,
        positions,
    } = shape;
    if starts.len() != sequences {
        return Err(KernelError::InvalidArguments(format!(
            "RoPE of {sequences} sequences with {} start positions",
            starts.len()
        )));
    }
    if let Some(s) = starts.iter().find(|&&s| s as usize + tokens > positions) {
        return Err(KernelError::InvalidArguments(format!(
            "RoPE of {tokens} tokens from position {s}: the angle tables hold {positions} positions"
        )));
    }
    if head_dim == 0 || !head_dim.is_multiple_of(2) || q_heads == 0 || kv_heads == 0 {
        return Err(KernelError::InvalidArguments(format!(
            "RoPE over {q_heads} query and {kv_heads} KV heads of {head_dim}: needs heads and an even, non-zero head_dim"
        )));
    }
    if (
        kv_rows.sequences,
        kv_rows.kv_heads,
        kv_rows.head_dim,
        kv_rows.src_capacity,
    ) != (sequences, kv_heads, head_dim, tokens)
    {
        return Err(KernelError::InvalidArguments(format!(
            "RoPE of {sequences} sequences of {tokens} tokens, {kv_heads} KV heads of {head_dim}: the K/V rows are given for {} sequences of {} tokens, {} KV heads of {}",
            kv_rows.sequences, kv_rows.src_capacity, kv_rows.kv_heads, kv_rows.head_dim
        )));
    }
    kv_rows.validate()?;
    let rows = sequences * tokens;
    let es = F::size_bytes();
    check_len(
        "fused QKV",
        qkv,
        rows * (q_heads + 2 * kv_heads) * head_dim * es,
    )?;
    check_len("RoPE cos", cos, positions * head_dim / 2 * es)?;
    check_len("RoPE sin", sin, positions * head_dim / 2 * es)?;
    check_len("queries", q, rows * q_heads * head_dim * es)?;
    let kv_len = sequences * kv_heads * kv_rows.dst_capacity * head_dim * es;
    check_len("keys", k, kv_len)?;
    check_len("values", v, kv_len)?;
    let pairs_total = rows * (q_heads + 2 * kv_heads) * head_dim / 2;
    if pairs_total == 0 {
        return Ok(());
    }
    if pairs_total > u32::MAX as usize || kv_len / es > u32::MAX as usize {
        return Err(KernelError::InvalidArguments(format!(
            "RoPE over {pairs_total} channel pairs into {} K/V elements: more than 32-bit indices reach",
            kv_len / es
        )));
    }
    let plan = RopePlan {
        head_dim,
        q_heads,
        kv_heads,
        style,
    };
    let offsets = crate::upload::upload_u32(
        client,
        &[starts, kv_rows.src_start, kv_rows.dst_start, kv_rows.counts].concat(),
    );
    let arr = |h: &cubecl::server::Handle| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / es)
    };
    // SAFETY: every index is below the sizes checked above (rows of the given shape, K/V rows
    // within the destination's capacity).
    unsafe {
        rope_split_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(pairs_total.div_ceil(UNITS).min(MAX_CUBES) as u32, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            arr(qkv),
            arr(cos),
            arr(sin),
            ArrayArg::from_raw_parts(offsets, 4 * sequences),
            arr(q),
            arr(k),
            arr(v),
            sequences as u32,
            tokens as u32,
            kv_rows.dst_capacity as u32,
            pairs_total as u32,
            plan,
        );
    }
    Ok(())
}
