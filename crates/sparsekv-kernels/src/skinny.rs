//! Skinny matmul for decoding: `out[m, n] = Σ_k x[m, k] · w[n, k]` for a few activation rows
//! `x` (`M` = 1..=64, one per sequence of the batch) and a weight matrix stored as `[N, K]`
//! rows (PyTorch's `nn.Linear` layout: one row of `K` input weights per output feature).
//!
//! A decode step is a matrix-vector product in disguise: every weight is read once and used
//! `M` times, so the time is the weight bytes over the memory bandwidth. General matmul kernels
//! tile for reuse that is not there; this one is built to stream the weights:
//!
//! 1. **Stream** (`accumulate_rows`): each plane (warp) owns `rows_per_plane` consecutive
//!    output features. Its lanes walk the `K` axis together, one vector of up to 16 bytes per
//!    lane and weight row per step, so each step of a plane reads one contiguous, coalesced
//!    run per row; the loads of all its rows, for `unroll` steps, are issued before they are
//!    used. The activation vectors of the step (`rows_m` of them, cached in L1, shared by
//!    every row) are widened to f32 once and multiplied into `rows_m × rows_per_plane` f32
//!    accumulators per lane, and the output adds the residual when one is given.
//! 2. **Reduce** (`plane_reduce`): the lanes' partial sums of each output are summed over the
//!    plane with plane operations where the device has them, through a shared-memory tree
//!    where it does not (lavapipe), chosen at compile time; the first lane writes the output.
//!
//! More than `MAX_ROWS_M` activation rows are handled in chunks along the grid's second axis:
//! each chunk streams the weights again (from L2 when they fit). (The fragment kernel below
//! takes up to 32 rows per cube and streams the weights once for them.)
//!
//! On CUDA, from 8 activation rows on, the products run on matrix units instead: with 8 rows
//! the multiply-adds and conversions of the plain kernel need more registers and issue slots
//! than streaming leaves. The fragment kernel (`skinny_fragment_kernel`: 16x8x16 products whose
//! operands are loaded straight into registers, two rounds of loads in flight per plane) where
//! `K` is a multiple of 32, else `skinny_mma_kernel` (8x32x16 tiles, weights staged through
//! shared memory with coalesced loads).

use cubecl::prelude::cmma::MmaDefinition;
use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::norm::rms_factors;
use crate::{FloatElement, MmaApi, check_type_supported, has_mma, vector_size};

/// Activation rows one cube multiplies: its accumulators live in registers, `rows_m` per
/// output feature of each lane.
pub const MAX_ROWS_M: usize = 8;
/// The largest `M` [`skinny_matmul`] takes; larger products belong to a general matmul.
pub const MAX_M: usize = 64;
/// Planes per cube unless tuned otherwise: small cubes, so that narrow matrices still spread
/// over every SM.
const DEFAULT_PLANES: usize = 4;
/// Cubes per streaming multiprocessor to aim for when choosing rows per plane: enough resident
/// planes per SM to keep its share of the bandwidth in flight.
const CUBES_PER_SM: usize = 4;
/// Planes per cube and 16-wide tiles per group of the tensor-core kernel unless tuned
/// otherwise (the best of the H200 sweep in BENCHMARKS.md on the Llama-3-8B shapes): 16 planes
/// staging 4 KB each; from `LONG_K` columns on, 32 planes of 2 KB.
const DEFAULT_MMA_PLANES: usize = 16;
const DEFAULT_MMA_UNROLL: usize = 4;
const LONG_K: usize = 8192;
const LONG_K_MMA_PLANES: usize = 32;
/// Planes per cube and 32-column blocks per load batch of the fragment kernel unless tuned
/// otherwise.
const DEFAULT_FRAGMENT_PLANES: usize = 8;
const DEFAULT_FRAGMENT_UNROLL: usize = 4;
/// The fragment kernel keeps two rounds of loads in flight (prefetch) up to these planes per
/// cube and 16-byte vectors per lane and round (`(2 + chunks) * unroll`: two weight rows and
/// each group's activation row per block): the second round's registers must fit beside the
/// first, and a cube of 32 planes has at most 64 registers a unit.
const PREFETCH_MAX_PLANES: usize = 16;
const PREFETCH_MAX_STAGED: usize = 12;
/// Groups of 8 activation rows one cube of the fragment kernel multiplies at most.
const MAX_FRAGMENT_CHUNKS: usize = 4;
/// Steps along `K` whose weight loads are issued together unless tuned otherwise.
const DEFAULT_UNROLL: usize = 2;
/// Units per simulated plane on devices without plane operations (the reduction tree's width).
const FALLBACK_LANES: usize = 32;

/// Which kernel a skinny matmul runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SkinnyKernel {
    /// Matrix units from 8 activation rows on where they apply ([`SkinnyKernel::Fragments`],
    /// else [`SkinnyKernel::TensorCore`]), else CUDA cores.
    #[default]
    Auto,
    /// Plain multiply-adds (every runtime, type and shape).
    Simt,
    /// 8x32x16 matrix-unit products (CUDA, f16 or bf16, at least 8 activation rows, at least
    /// 32 output features, `K` a multiple of 16); anything else is an error.
    TensorCore,
    /// 16x8x16 matrix-unit products with the weights as the 16-row operand, loaded straight
    /// into registers (CUDA, f16 or bf16, any number of activation rows, at least 16 output
    /// features, `K` a multiple of 32); anything else is an error. `unroll` may be 8 here.
    Fragments,
}

/// Tuning knobs of [`skinny_matmul_with`]; [`skinny_matmul`] chooses them from the shape and
/// the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SkinnyTuning {
    /// The kernel.
    pub kernel: SkinnyKernel,
    /// Output features per plane (1, 2, 4 or 8; the tensor-core kernel always has 32 per
    /// cube): more reuse of each activation load, fewer planes.
    pub rows_per_plane: usize,
    /// Planes per cube (1..=32, at most what the device's cubes hold).
    pub planes: usize,
    /// Steps along `K` whose weight loads are issued together (1, 2 or 4; tiles of 16 for the
    /// tensor-core kernel): more bytes in flight per lane, more registers.
    pub unroll: usize,
}

/// Static launch parameters, chosen on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SkinnyPlan {
    /// Activation rows per cube (1..=MAX_ROWS_M).
    rows_m: usize,
    /// Output features per plane.
    rows_n: usize,
    /// Units per plane.
    lanes: usize,
    /// Planes per cube.
    planes: usize,
    /// Elements per vector load.
    vec: usize,
    /// Steps whose weight loads are issued together.
    unroll: usize,
    /// Whether plane operations reduce the lanes' sums.
    use_plane: bool,
    /// Whether the output adds a residual.
    residual: bool,
    /// What is done to the activations before the product.
    prologue: Prologue,
}

/// What the activation operand of a skinny matmul holds and what the product uses of it; `W`
/// is how the norm's weights are passed (a buffer handle here, a tensor in `sparsekv-burn`).
#[derive(Debug, Clone, Copy)]
pub enum SkinnyInput<W> {
    /// `x` `[m, k]`, used as it is.
    Plain,
    /// `x` `[m, k]`, each row normalised first: `x / sqrt(mean(x²) + eps) · weight` (RMSNorm,
    /// `weight` `k` elements of the same type). The CUDA-core kernel applies it in f32 as it
    /// reads `x` (no launch of its own); the tensor-core kernel (CUDA, 8 rows and more) runs
    /// the RMSNorm kernel into a scratch buffer first.
    RmsNorm {
        /// The norm's weights, `k` elements.
        weight: W,
        /// Added to the mean square (finite, at least 0).
        eps: f32,
    },
    /// `x` `[m, 2k]`, each row the gate then the up projection (a fused gate+up projection's
    /// output); the product uses `silu(gate) · up`: in f32 as `x` is read on the CUDA-core
    /// kernel, by the SwiGLU kernel into a scratch buffer first on the tensor-core one.
    SwiGlu,
}

/// [`SkinnyInput`] as the kernels see it, at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Prologue {
    Plain,
    RmsNorm,
    SwiGlu,
}

impl<W> SkinnyInput<W> {
    fn prologue(&self) -> Prologue {
        match self {
            SkinnyInput::Plain => Prologue::Plain,
            SkinnyInput::RmsNorm { .. } => Prologue::RmsNorm,
            SkinnyInput::SwiGlu => Prologue::SwiGlu,
        }
    }

    /// The same input borrowing the norm's weights.
    pub fn as_ref(&self) -> SkinnyInput<&W> {
        match self {
            SkinnyInput::Plain => SkinnyInput::Plain,
            SkinnyInput::RmsNorm { weight, eps } => SkinnyInput::RmsNorm { weight, eps: *eps },
            SkinnyInput::SwiGlu => SkinnyInput::SwiGlu,
        }
    }

    /// The same input with the norm's weights passed as `f(weight)`.
    pub fn map<V>(self, f: impl FnOnce(W) -> V) -> SkinnyInput<V> {
        match self {
            SkinnyInput::Plain => SkinnyInput::Plain,
            SkinnyInput::RmsNorm { weight, eps } => SkinnyInput::RmsNorm {
                weight: f(weight),
                eps,
            },
            SkinnyInput::SwiGlu => SkinnyInput::SwiGlu,
        }
    }
}

impl Prologue {
    /// Activation elements per row of `x` for a product over `k` input features (`2k` for
    /// SwiGLU: the gate and the up projection).
    fn row_len(self, k: usize) -> usize {
        match self {
            Prologue::SwiGlu => 2 * k,
            _ => k,
        }
    }
}

/// Adds `x[m0 + i, :] · w[n0 + j, :]` over this lane's share of `K` to `acc[i * rows_n + j]`,
/// the activation rows starting at vectors `x_base` (see [`activations`] for `norm_w` and
/// `scale`). Weight rows past `n` are clamped to the last one (their results are never
/// written), so every load is in bounds.
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate_rows<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    x_base: &Array<usize>,
    norm_w: &Array<Vector<F, N>>,
    scale: &Array<f32>,
    w: &Array<Vector<F, N>>,
    acc: &mut Array<f32>,
    n0: usize,
    n: usize,
    k_vecs: usize,
    lane: usize,
    #[comptime] plan: SkinnyPlan,
) {
    let (rows_m, rows_n, lanes, vec) = comptime!((plan.rows_m, plan.rows_n, plan.lanes, plan.vec));
    let mut w_base = Array::<usize>::new(rows_n);
    #[unroll]
    for j in 0..rows_n {
        w_base[j] = min(n0 + j, n - 1) * k_vecs;
    }
    let unroll = comptime!(plan.unroll);
    let mut wv = Array::<Vector<F, N>>::new(rows_n * unroll);
    let mut xf = Array::<f32>::new(rows_m * vec);
    let mut kv = lane;
    // Whole groups of `unroll` steps: every weight load of the group first, so that
    // `unroll * rows_n` loads per lane are in flight together.
    while kv + (unroll - 1) * lanes < k_vecs {
        #[unroll]
        for u in 0..unroll {
            #[unroll]
            for j in 0..rows_n {
                wv[u * rows_n + j] = w[w_base[j] + kv + u * lanes];
            }
        }
        #[unroll]
        for u in 0..unroll {
            activations::<F, N>(
                x,
                x_base,
                norm_w,
                scale,
                &mut xf,
                kv + u * lanes,
                k_vecs,
                plan.rows_m,
                plan.vec,
                plan.prologue,
            );
            multiply_step(&wv, &xf, acc, u * rows_n, plan);
        }
        kv += unroll * lanes;
    }
    // The remaining steps, one at a time.
    while kv < k_vecs {
        #[unroll]
        for j in 0..rows_n {
            wv[j] = w[w_base[j] + kv];
        }
        activations::<F, N>(
            x,
            x_base,
            norm_w,
            scale,
            &mut xf,
            kv,
            k_vecs,
            plan.rows_m,
            plan.vec,
            plan.prologue,
        );
        multiply_step(&wv, &xf, acc, 0usize, plan);
        kv += lanes;
    }
}

/// The activations of `rows` rows at vector `kv` of the product's `K` axis, widened to f32
/// into `xf[i * vec ..]`, row `i` of `x` starting at vector `x_base[i]`: as stored
/// (`Plain`), times the row's RMSNorm factor `scale[i]` and the norm's weights `norm_w[kv]`
/// (`RmsNorm`), or `silu(gate) · up` with the up half `k_vecs` vectors after the gate
/// (`SwiGlu`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn activations<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    x_base: &Array<usize>,
    norm_w: &Array<Vector<F, N>>,
    scale: &Array<f32>,
    xf: &mut Array<f32>,
    kv: usize,
    k_vecs: usize,
    #[comptime] rows: usize,
    #[comptime] vec: usize,
    #[comptime] prologue: Prologue,
) {
    let mut gw = Vector::<F, N>::empty();
    if comptime!(prologue == Prologue::RmsNorm) {
        gw = norm_w[kv];
    }
    #[unroll]
    for i in 0..rows {
        let xv = x[x_base[i] + kv];
        if comptime!(prologue == Prologue::SwiGlu) {
            let uv = x[x_base[i] + k_vecs + kv];
            #[unroll]
            for e in 0..vec {
                let g = f32::cast_from(xv[e]);
                // silu(g) = g / (1 + exp(-g)), as the SwiGLU kernel computes it.
                xf[i * vec + e] = g / (1.0 + Exp::exp(-g)) * f32::cast_from(uv[e]);
            }
        } else if comptime!(prologue == Prologue::RmsNorm) {
            #[unroll]
            for e in 0..vec {
                xf[i * vec + e] = f32::cast_from(xv[e]) * scale[i] * f32::cast_from(gw[e]);
            }
        } else {
            #[unroll]
            for e in 0..vec {
                xf[i * vec + e] = f32::cast_from(xv[e]);
            }
        }
    }
}

/// One step: adds the products of the activations `xf` (see [`activations`]) with the weight
/// vectors `wv[w0 ..][.. rows_n]` to the accumulators.
#[cube]
fn multiply_step<F: Float, N: Size>(
    wv: &Array<Vector<F, N>>,
    xf: &Array<f32>,
    acc: &mut Array<f32>,
    #[comptime] w0: usize,
    #[comptime] plan: SkinnyPlan,
) {
    let (rows_m, rows_n, vec) = comptime!((plan.rows_m, plan.rows_n, plan.vec));
    #[unroll]
    for j in 0..rows_n {
        #[unroll]
        for e in 0..vec {
            let we = f32::cast_from(wv[w0 + j][e]);
            #[unroll]
            for i in 0..rows_m {
                acc[i * rows_n + j] += xf[i * vec + e] * we;
            }
        }
    }
}

/// `sum` plus `residual[at]` when the call adds a residual (the epilogue that saves a separate
/// addition launch in a decoder layer).
#[cube]
fn with_residual<F: Float>(sum: f32, residual: &Array<F>, at: usize, #[comptime] add: bool) -> f32 {
    if comptime!(add) {
        sum + f32::cast_from(residual[at])
    } else {
        sum
    }
}

/// The sum of `value` over the lanes of this unit's plane, valid in lane 0. `red` holds one
/// float per unit of the cube (unused with plane operations).
#[cube]
fn plane_reduce(
    value: f32,
    red: &mut SharedMemory<f32>,
    lane: usize,
    #[comptime] plan: SkinnyPlan,
) -> f32 {
    if comptime!(plan.use_plane) {
        plane_sum(value)
    } else {
        let tid = UNIT_POS as usize;
        red[tid] = value;
        sync_cube();
        let levels = comptime!(plan.lanes.trailing_zeros() as usize);
        for level in 0..levels {
            let stride = comptime!(plan.lanes) >> (level + 1);
            if lane < stride {
                red[tid] = red[tid] + red[tid + stride];
            }
            sync_cube();
        }
        let sum = red[tid];
        // Nobody may overwrite `red` before lane 0 has read it.
        sync_cube();
        sum
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn skinny_matmul_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    norm_w: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    residual: &Array<F>,
    out: &mut Array<F>,
    m: u32,
    features: u32,
    k_vecs: u32,
    eps: f32,
    #[comptime] plan: SkinnyPlan,
) {
    let (rows_m, rows_n, lanes) = comptime!((plan.rows_m, plan.rows_n, plan.lanes));
    let red_cap = comptime!(if plan.use_plane {
        1
    } else {
        plan.lanes * plan.planes
    });
    let mut red = SharedMemory::<f32>::new(red_cap);
    let (m, n, k_vecs) = (m as usize, features as usize, k_vecs as usize);
    let lane = UNIT_POS as usize % lanes;
    let plane = UNIT_POS as usize / lanes;
    let n0 = (CUBE_POS_X as usize * comptime!(plan.planes) + plane) * rows_n;
    let m0 = CUBE_POS_Y as usize * rows_m;

    // Rows past `m` are clamped to the last one (their results are never written).
    let x_row = comptime!(plan.prologue.row_len(1)) * k_vecs;
    let mut x_base = Array::<usize>::new(rows_m);
    #[unroll]
    for i in 0..rows_m {
        x_base[i] = min(m0 + i, m - 1) * x_row;
    }
    let mut scale = Array::<f32>::new(rows_m);
    if comptime!(plan.prologue == Prologue::RmsNorm) {
        let units = comptime!(plan.lanes * plan.planes);
        let mut nred = SharedMemory::<f32>::new(comptime!(if plan.use_plane {
            plan.rows_m * plan.planes
        } else {
            plan.rows_m * plan.lanes * plan.planes
        }));
        let factors = rms_factors::<F, N>(
            x,
            &x_base,
            k_vecs,
            eps,
            &mut nred,
            rows_m,
            plan.vec,
            units,
            plan.use_plane,
        );
        #[unroll]
        for i in 0..rows_m {
            scale[i] = factors[i];
        }
    }

    let mut acc = Array::<f32>::new(rows_m * rows_n);
    #[unroll]
    for i in 0..rows_m * rows_n {
        acc[i] = 0.0;
    }
    accumulate_rows::<F, N>(
        x, &x_base, norm_w, &scale, w, &mut acc, n0, n, k_vecs, lane, plan,
    );

    #[unroll]
    for i in 0..rows_m {
        #[unroll]
        for j in 0..rows_n {
            let sum = plane_reduce(acc[i * rows_n + j], &mut red, lane, plan);
            if lane == 0 && m0 + i < m && n0 + j < n {
                let at = (m0 + i) * n + n0 + j;
                out[at] = F::cast_from(with_residual(sum, residual, at, plan.residual));
            }
        }
    }
}

/// Activation rows, output features and `K` of one matrix-unit product.
const MMA_M: usize = 8;
const MMA_N: usize = 32;
const MMA_K: usize = 16;

/// Static launch parameters of the tensor-core kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MmaPlan {
    /// Planes per cube; they split `K` and sum through shared memory.
    planes: usize,
    /// 16-wide tiles of `K` per group: a plane stages `32 x 16 * unroll` weights at a time.
    unroll: usize,
    /// Elements per vector load of the weights (16 bytes).
    vec: usize,
    /// Whether the output adds a residual.
    residual: bool,
}

/// The tensor-core kernel: each cube computes 8 activation rows by 32 output features; its
/// planes take turns over groups of `16 * unroll` columns of `K`.
///
/// 1. **Stage**: a plane copies its group of the 32 weight rows into its own shared-memory
///    tile with coalesced 16-byte loads (at `unroll` 4 each row's part is a whole 128-byte
///    line), rows padded by 16 bytes against bank conflicts. The loads of the next group are
///    issued before the products of this one, so a group is always in flight.
/// 2. **Multiply**: per 16-wide tile an 8x32x16 product with f32 accumulators: the activations
///    (A, read straight from global memory, where they stay in L1) times the staged weight rows
///    (B, column-major).
/// 3. **Sum**: the planes' accumulators meet in shared memory and the cube writes its outputs.
///
/// Columns past the last whole group go tile by tile with B read from global memory. The last
/// cube along each axis is moved back to end at `m` / `n` (it recomputes a few outputs of its
/// neighbour, with the same values), so no tile reads out of bounds.
#[cube(launch_unchecked)]
fn skinny_mma_kernel<F: Float, N: Size>(
    x: &Array<F>,
    w: &Array<F>,
    w_vecs: &Array<Vector<F, N>>,
    residual: &Array<F>,
    out: &mut Array<F>,
    m: u32,
    features: u32,
    k: u32,
    #[comptime] plan: MmaPlan,
) {
    let (planes, unroll) = comptime!((plan.planes, plan.unroll));
    let tile_out = comptime!(MMA_M * MMA_N);
    let group = comptime!(plan.unroll * MMA_K);
    // Shared row stride of a staged weight row, in elements and in vectors (one vector of
    // padding), and vectors per row per group = vectors each lane stages.
    let (row, row_vecs, per_row) = comptime!((
        plan.unroll * MMA_K + plan.vec,
        plan.unroll * MMA_K / plan.vec + 1,
        plan.unroll * MMA_K / plan.vec
    ));
    let tile_elems = comptime!(MMA_N * (plan.unroll * MMA_K + plan.vec));
    let mut stage = SharedMemory::<F>::new_aligned(comptime!(plan.planes * tile_elems), 32usize);
    let mut sums = SharedMemory::<f32>::new(comptime!(plan.planes * MMA_M * MMA_N));
    let (m, n, k) = (m as usize, features as usize, k as usize);
    let plane = UNIT_POS as usize / 32;
    let lane = UNIT_POS as usize % 32;
    let m0 = min(CUBE_POS_Y as usize * MMA_M, m - MMA_M);
    let n0 = min(CUBE_POS_X as usize * MMA_N, n - MMA_N);
    let acc = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        MMA_M,
        MMA_N,
        MMA_K,
        cmma::MatrixLayout::Undefined,
        0.0,
    );
    let base = plane * tile_elems;
    let mut staged = Array::<Vector<F, N>>::new(per_row);
    let mut k0 = plane * group;
    if k0 + group <= k {
        load_group::<F, N>(w_vecs, &mut staged, n0, k0, k, lane, plan);
    }
    while k0 + group <= k {
        {
            let mut dst = stage
                .slice_mut(base, base + tile_elems)
                .into_vectorized()
                .with_vector_size::<N>();
            #[unroll]
            for i in 0..per_row {
                let v = i * 32 + lane;
                dst[(v / per_row) * row_vecs + v % per_row] = staged[i];
            }
        }
        sync_plane();
        let next = k0 + planes * group;
        if next + group <= k {
            load_group::<F, N>(w_vecs, &mut staged, n0, next, k, lane, plan);
        }
        #[unroll]
        for u in 0..unroll {
            let xa = x_tile(x, m0 * k + k0 + u * MMA_K, k);
            let at = base + u * MMA_K;
            let wb = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::B,
                MMA_M,
                MMA_N,
                MMA_K,
                cmma::MatrixLayout::ColMajor,
                &stage.slice(at, at + (MMA_N - 1) * row + MMA_K),
                row as u32,
            );
            cmma::execute::<F, F, f32, f32>(&xa, &wb, &acc, &acc);
        }
        // The tile is overwritten by the next group only after every lane has read it.
        sync_plane();
        k0 = next;
    }
    // The tiles past the last whole group, one at a time (plane by plane).
    let tail = k - k % group;
    let mut kt = tail + plane * MMA_K;
    while kt < k {
        let xa = x_tile(x, m0 * k + kt, k);
        let wb = w_tile(w, n0 * k + kt, k);
        cmma::execute::<F, F, f32, f32>(&xa, &wb, &acc, &acc);
        kt += planes * MMA_K;
    }
    let at = plane * tile_out;
    let mut dst = sums.slice_mut(at, at + tile_out);
    cmma::store(&mut dst, &acc, MMA_N as u32, cmma::MatrixLayout::RowMajor);
    sync_cube();
    let mut i = UNIT_POS as usize;
    while i < tile_out {
        let mut total = 0.0f32;
        for p in 0..planes {
            total += sums[p * tile_out + i];
        }
        let at = (m0 + i / MMA_N) * n + n0 + i % MMA_N;
        out[at] = F::cast_from(with_residual(total, residual, at, plan.residual));
        i += CUBE_DIM as usize;
    }
}

/// Output features (the A operand's rows), activation rows (B's columns) and `K` of one
/// matrix-unit product of the fragment kernel.
const FRAG_N: usize = 16;
const FRAG_M: usize = 8;
const FRAG_K: usize = 16;
/// Columns of `K` one lane's 16-byte loads cover across the 4 lanes of a weight row: a block.
const FRAG_BLOCK: usize = 32;

/// Static launch parameters of the fragment kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FragmentPlan {
    /// Planes per cube; they split `K` block by block and sum through shared memory.
    planes: usize,
    /// Consecutive 32-column blocks a plane loads before it multiplies (16-byte loads per lane
    /// and row in flight).
    unroll: usize,
    /// Groups of 8 activation rows one cube multiplies (1..=`MAX_FRAGMENT_CHUNKS`): each
    /// weight fragment loaded is used by every group, so the weights are streamed once for up
    /// to `8 * chunks` rows.
    chunks: usize,
    /// Whether the output adds a residual.
    residual: bool,
    /// Whether a plane loads its next round of blocks before multiplying the current one (two
    /// rounds in flight, twice the load registers).
    prefetch: bool,
}

/// The fragment kernel: each cube computes 16 output features by 8 activation rows with
/// `16x8x16` products whose operands come straight from global memory into registers: the
/// weights are the A operand (16 features), the activations B (8 rows), so no product is
/// wasted at `M = 8` and nothing goes through shared memory until the planes' sums.
///
/// `K` is taken in any order the two operands agree on: in each 32-column block, lane `c` of
/// an A-fragment row loads the 8 columns `8c ..` as one 16-byte vector (so the 4 lanes of a
/// row read its 64 bytes together), and gives its first two pairs to one 16-wide product, the
/// other two to the next; its activation row loads the same columns and gives them to B the
/// same way. Each plane takes `unroll` consecutive blocks at a time, every load issued before
/// the products, planes interleaved so that a cube reads long runs of its 16 rows at once; with
/// `prefetch` the loads of a plane's next round are issued before this round's products, so
/// two rounds are in flight (the H200 measured 20-25% less time at M = 8 with it).
/// A cube multiplies `chunks` groups of 8 activation rows, each group with its own B operand
/// and accumulators, all with the same A (weight) fragments.
/// The last cube along the features is moved back to end at `n` (it recomputes a few outputs
/// of its neighbour); activation rows past `m` are clamped to the last one and not written.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn skinny_fragment_kernel<F: Float, N: Size>(
    x: &Array<Vector<u32, N>>,
    w: &Array<Vector<u32, N>>,
    residual: &Array<F>,
    out: &mut Array<F>,
    m: u32,
    features: u32,
    k_vecs: u32,
    #[comptime] plan: FragmentPlan,
) {
    let size!(P) = 2usize;
    let (planes, unroll, chunks) = comptime!((plan.planes, plan.unroll, plan.chunks));
    // Outputs of one group of 8 activation rows, and of the cube.
    let tile_out = comptime!(FRAG_N * FRAG_M);
    let cube_out = comptime!(FRAG_N * FRAG_M * plan.chunks);
    let mut sums = SharedMemory::<f32>::new(comptime!(plan.planes * FRAG_N * FRAG_M * plan.chunks));
    let (m, n, k_vecs) = (m as usize, features as usize, k_vecs as usize);
    let plane = UNIT_POS as usize / 32;
    let lane = UNIT_POS as usize % 32;
    // Fragment coordinates: A rows g and g + 8 (features), B column g (activation row); c,
    // which of a row's four lanes this is (columns 8c .. 8c + 8 of each block, pairs 2c and
    // 2c + 8 of each product's K).
    let g = lane / 4;
    let c = lane % 4;
    let n0 = min(CUBE_POS_X as usize * FRAG_N, n - FRAG_N);
    let m0 = CUBE_POS_Y as usize * FRAG_M * chunks;
    let w_rows = ((n0 + g) * k_vecs + c, (n0 + g + 8) * k_vecs + c);
    let mut x_rows = Array::<usize>::new(chunks);
    #[unroll]
    for ch in 0..chunks {
        x_rows[ch] = min(m0 + ch * FRAG_M + g, m - 1) * k_vecs + c;
    }
    let mut acc = Array::<Vector<f32, P>>::new(comptime!(2 * plan.chunks));
    #[unroll]
    for i in 0..2 * chunks {
        acc[i] = Vector::<f32, P>::zeroed();
    }

    // Rounds of `planes * unroll` blocks, then the blocks left, one per plane at a time.
    let vecs_per_block = comptime!(FRAG_BLOCK / 8);
    let blocks = k_vecs / vecs_per_block;
    let round = comptime!(plan.planes * plan.unroll);
    let whole = blocks - blocks % round;
    let mut block = plane * unroll;
    if comptime!(plan.prefetch) {
        // The next round's loads are issued before this round's products, so a plane has
        // two rounds in flight instead of one.
        let staged_len = comptime!((2 + plan.chunks) * plan.unroll);
        let mut current = Array::<Vector<u32, N>>::new(staged_len);
        let mut next = Array::<Vector<u32, N>>::new(staged_len);
        if block < whole {
            load_blocks::<N>(
                x,
                w,
                w_rows,
                &x_rows,
                block * vecs_per_block,
                &mut current,
                unroll,
                chunks,
            );
        }
        while block < whole {
            let following = block + round;
            if following < whole {
                load_blocks::<N>(
                    x,
                    w,
                    w_rows,
                    &x_rows,
                    following * vecs_per_block,
                    &mut next,
                    unroll,
                    chunks,
                );
            }
            multiply_staged::<F, N, P>(&current, &mut acc, unroll, chunks);
            #[unroll]
            for i in 0..staged_len {
                current[i] = next[i];
            }
            block = following;
        }
    } else {
        while block < whole {
            multiply_blocks::<F, N, P>(
                x,
                w,
                w_rows,
                &x_rows,
                block * vecs_per_block,
                &mut acc,
                unroll,
                chunks,
            );
            block += round;
        }
    }
    block = whole + plane;
    while block < blocks {
        multiply_blocks::<F, N, P>(
            x,
            w,
            w_rows,
            &x_rows,
            block * vecs_per_block,
            &mut acc,
            1usize,
            chunks,
        );
        block += planes;
    }

    // C of group ch: features g and g + 8, activation rows 8 ch + 2c and 8 ch + 2c + 1.
    let at = plane * cube_out;
    #[unroll]
    for ch in 0..chunks {
        #[unroll]
        for half in 0..2usize {
            #[unroll]
            for e in 0..2usize {
                sums[at + ch * tile_out + (2 * c + e) * FRAG_N + g + 8 * half] =
                    acc[2 * ch + half][e];
            }
        }
    }
    sync_cube();
    // A cube may have fewer units than outputs: each unit sums every `CUBE_DIM`-th output.
    let mut i = UNIT_POS as usize;
    while i < cube_out {
        let mut total = 0.0f32;
        #[unroll]
        for p in 0..planes {
            total += sums[p * cube_out + i];
        }
        let row = m0 + i / FRAG_N;
        if row < m {
            let at = row * n + n0 + i % FRAG_N;
            out[at] = F::cast_from(with_residual(total, residual, at, plan.residual));
        }
        i += CUBE_DIM as usize;
    }
}

/// Adds the products of `count` consecutive 32-column blocks from vector `v0` of the rows
/// (two weight rows and `chunks` activation rows, see [`skinny_fragment_kernel`]) to `acc`:
/// every load first, then two 16-wide products per block and group of activation rows.
#[cube]
#[allow(clippy::too_many_arguments)]
fn multiply_blocks<F: Float, N: Size, P: Size>(
    x: &Array<Vector<u32, N>>,
    w: &Array<Vector<u32, N>>,
    w_rows: (usize, usize),
    x_rows: &Array<usize>,
    v0: usize,
    acc: &mut Array<Vector<f32, P>>,
    #[comptime] count: usize,
    #[comptime] chunks: usize,
) {
    let mut staged = Array::<Vector<u32, N>>::new(comptime!((2 + chunks) * count));
    load_blocks::<N>(x, w, w_rows, x_rows, v0, &mut staged, count, chunks);
    multiply_staged::<F, N, P>(&staged, acc, count, chunks);
}

/// Issues the loads of `count` consecutive 32-column blocks from vector `v0` of the rows into
/// `staged`: the first weight row's vectors, then the second's, then each activation row's.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_blocks<N: Size>(
    x: &Array<Vector<u32, N>>,
    w: &Array<Vector<u32, N>>,
    w_rows: (usize, usize),
    x_rows: &Array<usize>,
    v0: usize,
    staged: &mut Array<Vector<u32, N>>,
    #[comptime] count: usize,
    #[comptime] chunks: usize,
) {
    let vecs_per_block = comptime!(FRAG_BLOCK / 8);
    #[unroll]
    for u in 0..count {
        let v = v0 + u * vecs_per_block;
        staged[u] = w[w_rows.0 + v];
        staged[count + u] = w[w_rows.1 + v];
        #[unroll]
        for ch in 0..chunks {
            staged[(2 + ch) * count + u] = x[x_rows[ch] + v];
        }
    }
}

/// Two 16-wide products per block of `staged` (as [`load_blocks`] fills it) and group of
/// activation rows, added to that group's accumulators in `acc`.
#[cube]
fn multiply_staged<F: Float, N: Size, P: Size>(
    staged: &Array<Vector<u32, N>>,
    acc: &mut Array<Vector<f32, P>>,
    #[comptime] count: usize,
    #[comptime] chunks: usize,
) {
    let def = MmaDefinition::<F, F, f32>::new(FRAG_N, FRAG_M, FRAG_K);
    #[unroll]
    for u in 0..count {
        let (wa, wb) = (staged[u], staged[count + u]);
        #[unroll]
        for h in 0..2usize {
            let mut a = Array::<Vector<F, P>>::new(4usize);
            a[0] = Vector::<F, P>::reinterpret(wa[2 * h]);
            a[1] = Vector::<F, P>::reinterpret(wb[2 * h]);
            a[2] = Vector::<F, P>::reinterpret(wa[2 * h + 1]);
            a[3] = Vector::<F, P>::reinterpret(wb[2 * h + 1]);
            #[unroll]
            for ch in 0..chunks {
                let xv = staged[(2 + ch) * count + u];
                let mut b = Array::<Vector<F, P>>::new(2usize);
                b[0] = Vector::<F, P>::reinterpret(xv[2 * h]);
                b[1] = Vector::<F, P>::reinterpret(xv[2 * h + 1]);
                let mut c_frag = Array::<Vector<f32, P>>::new(2usize);
                c_frag[0] = acc[2 * ch];
                c_frag[1] = acc[2 * ch + 1];
                def.execute_inplace(&a, &b, &mut c_frag);
                acc[2 * ch] = c_frag[0];
                acc[2 * ch + 1] = c_frag[1];
            }
        }
    }
}

/// Loads this lane's share of the 32 weight rows from `n0`, columns `k0 .. k0 + 16 * unroll`:
/// vector `i * 32 + lane` of the group, so 8 consecutive lanes read one row's 128 bytes.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_group<F: Float, N: Size>(
    w_vecs: &Array<Vector<F, N>>,
    staged: &mut Array<Vector<F, N>>,
    n0: usize,
    k0: usize,
    k: usize,
    lane: usize,
    #[comptime] plan: MmaPlan,
) {
    let per_row = comptime!(plan.unroll * MMA_K / plan.vec);
    #[unroll]
    for i in 0..per_row {
        let v = i * 32 + lane;
        staged[i] = w_vecs[((n0 + v / per_row) * k + k0) / plan.vec + v % per_row];
    }
}

/// The 8x16 activation tile at `x[at]` (rows `k` apart), as row-major matrix operand A.
#[cube]
fn x_tile<F: Float>(x: &Array<F>, at: usize, k: usize) -> cmma::Matrix<F> {
    global_tile(
        x,
        at,
        k,
        cmma::MatrixIdent::A,
        cmma::MatrixLayout::RowMajor,
        MMA_M,
    )
}

/// The 16x32 tile of transposed weights whose first element is `w[at]` (32 weight rows `k`
/// apart, 16 elements each), as column-major matrix operand B.
#[cube]
fn w_tile<F: Float>(w: &Array<F>, at: usize, k: usize) -> cmma::Matrix<F> {
    global_tile(
        w,
        at,
        k,
        cmma::MatrixIdent::B,
        cmma::MatrixLayout::ColMajor,
        MMA_N,
    )
}

/// An operand of the 8x32x16 product read from global memory: `rows` runs of 16 elements,
/// `k` apart, from `src[at]`.
#[cube]
fn global_tile<F: Float>(
    src: &Array<F>,
    at: usize,
    k: usize,
    #[comptime] ident: cmma::MatrixIdent,
    layout: cmma::MatrixLayout,
    #[comptime] rows: usize,
) -> cmma::Matrix<F> {
    cmma::Matrix::<F>::from_slice(
        ident,
        MMA_M,
        MMA_N,
        MMA_K,
        layout,
        &src.slice(at, at + (rows - 1) * k + MMA_K),
        k as u32,
    )
}

/// `out = x · wᵀ` for decoding: `x` holds `[m, k]` elements of `F` (row-major), `w` the weight
/// matrix as `[n, k]` rows (row `j` = the input weights of output feature `j`), and `out`
/// receives `[m, n]`. Accumulates in f32. `m` is 1..=[`MAX_M`]. Nothing is read back.
/// [`skinny_matmul_with`] also adds a residual and takes tuning.
pub fn skinny_matmul<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    shape: SkinnyShape,
    x: &cubecl::server::Handle,
    w: &cubecl::server::Handle,
    out: &cubecl::server::Handle,
) -> Result<()> {
    skinny_matmul_with::<R, F>(client, shape, SkinnyInput::Plain, x, w, None, out, None)
}

/// The sizes of one [`skinny_matmul`]: `x` is `[m, k]`, the weights `[n, k]`, `out` `[m, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkinnyShape {
    /// Activation rows (1..=[`MAX_M`]).
    pub m: usize,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

/// [`skinny_matmul`] with what `x` holds and what the product uses of it (`input`: plain
/// activations, activations to normalise first, or a gate+up projection's output for SwiGLU;
/// `x` is `[m, 2k]` in that case), plus, when given, a residual `[m, n]` added to the output
/// (`out` must not be the residual's buffer), with explicit tuning (`None`: chosen from the
/// shape and device).
#[allow(clippy::too_many_arguments)]
pub fn skinny_matmul_with<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    shape: SkinnyShape,
    input: SkinnyInput<&cubecl::server::Handle>,
    x: &cubecl::server::Handle,
    w: &cubecl::server::Handle,
    residual: Option<&cubecl::server::Handle>,
    out: &cubecl::server::Handle,
    tuning: Option<SkinnyTuning>,
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    let SkinnyShape { m, n, k } = shape;
    if m == 0 || m > MAX_M || n == 0 || k == 0 {
        return Err(KernelError::InvalidArguments(format!(
            "skinny matmul of [{m}, {k}] by [{n}, {k}]ᵀ: needs 1..={MAX_M} activation rows and non-empty weights"
        )));
    }
    if let Some(t) = tuning
        && (!matches!(t.rows_per_plane, 1 | 2 | 4 | 8)
            || !(1..=32).contains(&t.planes)
            || !(matches!(t.unroll, 1 | 2 | 4)
                || (t.unroll == 8 && t.kernel == SkinnyKernel::Fragments)))
    {
        return Err(KernelError::InvalidArguments(format!(
            "skinny matmul tuning {t:?}: rows_per_plane must be 1, 2, 4 or 8, planes 1..=32 and unroll 1, 2 or 4 (8 too for the fragment kernel)"
        )));
    }
    let es = F::size_bytes();
    let prologue = input.prologue();
    check_len("activations", x, m * prologue.row_len(k) * es)?;
    check_len("weights", w, n * k * es)?;
    let (norm_w, eps) = match input {
        SkinnyInput::RmsNorm { weight, eps } => {
            if !(eps.is_finite() && eps >= 0.0) {
                return Err(KernelError::InvalidArguments(format!(
                    "skinny matmul with RMSNorm: eps {eps} must be finite and at least 0"
                )));
            }
            check_len("RMSNorm weights", weight, k * es)?;
            (weight.clone(), eps)
        }
        _ => (crate::upload::placeholder(client, 1), 0.0),
    };
    check_len("output", out, m * n * es)?;
    if let Some(r) = residual {
        check_len("residual", r, m * n * es)?;
    }
    // Without a residual a small placeholder is bound (never read: the addition is compiled
    // out).
    let placeholder;
    let residual_h = match residual {
        Some(r) => r,
        None => {
            placeholder = crate::upload::placeholder(client, 0);
            &placeholder
        }
    };
    let hw = &client.properties().hardware;
    let cube_limit = hw.max_cube_count;
    let fragments_fit = R::name(client) == "cuda"
        && n >= FRAG_N
        && k.is_multiple_of(FRAG_BLOCK)
        && hw.max_units_per_cube >= 32
        && has_mma::<R, F>(client, MmaApi::Registers, (FRAG_N, FRAG_M, FRAG_K));
    // From 8 activation rows on, the fragment kernel wherever it applies: with its prefetch it
    // beat the `cmma` kernel on every Llama-3-8B projection at M = 8 on the H200 (18.0 against
    // 25.9 us on QKV, 12.7 / 16.8 on the output, 60.7 / 79.1 on gate+up, 32.3 / 43.2 on down:
    // BENCHMARKS.md).
    let kernel = match tuning.map(|t| t.kernel).unwrap_or_default() {
        SkinnyKernel::Auto if fragments_fit && m >= FRAG_M => SkinnyKernel::Fragments,
        other => other,
    };
    let mma_fits = R::name(client) == "cuda"
        && m >= MMA_M
        && n >= MMA_N
        && k.is_multiple_of(MMA_K)
        && hw.max_units_per_cube >= 32
        && has_mma::<R, F>(client, MmaApi::Fragment, (MMA_M, MMA_N, MMA_K));
    match kernel {
        SkinnyKernel::TensorCore if !mma_fits => {
            return Err(KernelError::InvalidArguments(format!(
                "the tensor-core skinny matmul needs CUDA with 8x32x16 {} matrix units, at least {MMA_M} activation rows, at least {MMA_N} output features and K a multiple of {MMA_K} (got {} {}, m {m}, n {n}, k {k})",
                F::name(),
                R::name(client),
                F::name()
            )));
        }
        SkinnyKernel::TensorCore | SkinnyKernel::Auto if mma_fits => {
            let max_planes = (hw.max_units_per_cube as usize / 32).max(1);
            let vec = 16 / es;
            let plan = match tuning {
                Some(t) => MmaPlan {
                    planes: t.planes.min(max_planes),
                    unroll: t.unroll,
                    vec,
                    residual: residual.is_some(),
                },
                // Long rows (the down projection) have few cubes (one per 32 outputs): more
                // planes split each row and keep more bytes in flight (H200 sweep).
                None if k >= LONG_K => MmaPlan {
                    planes: LONG_K_MMA_PLANES.min(max_planes),
                    unroll: 2,
                    vec,
                    residual: residual.is_some(),
                },
                None => MmaPlan {
                    planes: DEFAULT_MMA_PLANES.min(max_planes),
                    unroll: DEFAULT_MMA_UNROLL,
                    vec,
                    residual: residual.is_some(),
                },
            };
            let stage_bytes = plan.planes * MMA_N * (plan.unroll * MMA_K + vec) * es
                + plan.planes * MMA_M * MMA_N * 4;
            if stage_bytes > hw.max_shared_memory_size {
                return Err(KernelError::InvalidArguments(format!(
                    "the tensor-core skinny matmul with {} planes needs {stage_bytes} bytes of shared memory; the device allows {}",
                    plan.planes, hw.max_shared_memory_size
                )));
            }
            let (cubes_n, cubes_m) = (n.div_ceil(MMA_N), m.div_ceil(MMA_M));
            check_cube_count(cubes_n, cubes_m, cube_limit)?;
            let x = activations_for_matrix_units::<R, F>(client, input, m, k, x)?;
            let arr = |h: &cubecl::server::Handle| unsafe {
                ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / es)
            };
            // SAFETY: every tile starts inside `[m, k]` / `[n, k]` (the last cubes are moved
            // back to end at `m` and `n`; `k` is a multiple of the tile width), within the
            // checked sizes.
            unsafe {
                skinny_mma_kernel::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static(cubes_n as u32, cubes_m as u32, 1),
                    CubeDim::new_1d((32 * plan.planes) as u32),
                    vec,
                    arr(&x),
                    arr(w),
                    ArrayArg::from_raw_parts(w.clone(), w.size_in_used() as usize / 16),
                    arr(residual_h),
                    arr(out),
                    m as u32,
                    n as u32,
                    k as u32,
                    plan,
                );
            }
            return Ok(());
        }
        SkinnyKernel::Fragments => {
            if !fragments_fit {
                return Err(KernelError::InvalidArguments(format!(
                    "the fragment skinny matmul needs CUDA with 16x8x16 {} matrix units, at least {FRAG_N} output features and K a multiple of {FRAG_BLOCK} (got {} {}, n {n}, k {k})",
                    F::name(),
                    R::name(client),
                    F::name()
                )));
            }
            let max_planes = (hw.max_units_per_cube as usize / 32).max(1);
            let planes = tuning
                .map_or(DEFAULT_FRAGMENT_PLANES, |t| t.planes)
                .min(max_planes);
            // As many groups of 8 rows per cube as the rows need, the cap and the planes' sums
            // in shared memory allow.
            let sums_per_chunk = planes * FRAG_N * FRAG_M * 4;
            let chunks = m
                .div_ceil(FRAG_M)
                .min(MAX_FRAGMENT_CHUNKS)
                .min((hw.max_shared_memory_size / sums_per_chunk).max(1));
            // Each group's activation vectors take registers beside the weights': fewer
            // blocks per round with more groups, so that the prefetch still fits.
            let unroll = tuning.map_or(
                if chunks == 1 {
                    DEFAULT_FRAGMENT_UNROLL
                } else {
                    DEFAULT_FRAGMENT_UNROLL / 2
                },
                |t| t.unroll,
            );
            let plan = FragmentPlan {
                planes,
                unroll,
                chunks,
                residual: residual.is_some(),
                prefetch: planes <= PREFETCH_MAX_PLANES
                    && (2 + chunks) * unroll <= PREFETCH_MAX_STAGED,
            };
            let (cubes_n, cubes_m) = (n.div_ceil(FRAG_N), m.div_ceil(FRAG_M * chunks));
            check_cube_count(cubes_n, cubes_m, cube_limit)?;
            let x = activations_for_matrix_units::<R, F>(client, input, m, k, x)?;
            let vecs = |h: &cubecl::server::Handle| unsafe {
                ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / 16)
            };
            // SAFETY: every load is inside `[m, k]` / `[n, k]` (the last cube along the
            // features is moved back to end at `n`, activation rows are clamped below `m`,
            // `k` is a whole number of blocks), within the checked sizes.
            unsafe {
                skinny_fragment_kernel::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static(cubes_n as u32, cubes_m as u32, 1),
                    CubeDim::new_1d((32 * plan.planes) as u32),
                    4,
                    vecs(&x),
                    vecs(w),
                    ArrayArg::from_raw_parts(
                        residual_h.clone(),
                        residual_h.size_in_used() as usize / es,
                    ),
                    ArrayArg::from_raw_parts(out.clone(), m * n),
                    m as u32,
                    n as u32,
                    (k / 8) as u32,
                    plan,
                );
            }
            return Ok(());
        }
        _ => {}
    }

    let vec = vector_size(es, hw.max_vector_size, k, &[]);
    // Plane operations only where every plane has the same, known width.
    let use_plane = client
        .features()
        .plane
        .contains(cubecl::features::Plane::Ops)
        && hw.plane_size_min == hw.plane_size_max
        && hw.plane_size_max.is_power_of_two();
    let lanes = if use_plane {
        hw.plane_size_max as usize
    } else {
        FALLBACK_LANES
    };
    let rows_m = m.min(MAX_ROWS_M);
    let m_chunks = m.div_ceil(rows_m);
    let max_planes = (hw.max_units_per_cube as usize / lanes).max(1);
    let (rows_n, planes, unroll) = match tuning {
        Some(t) => (t.rows_per_plane, t.planes.min(max_planes), t.unroll),
        None => {
            let planes = DEFAULT_PLANES.min(max_planes);
            let sms = hw.num_streaming_multiprocessors.unwrap_or(16) as usize;
            // The most reuse that still gives every SM its share of cubes.
            let rows_n = [4, 2, 1]
                .into_iter()
                .find(|&r| n.div_ceil(r * planes) * m_chunks >= CUBES_PER_SM * sms)
                .unwrap_or(1);
            (rows_n, planes, DEFAULT_UNROLL)
        }
    };
    let cubes_n = n.div_ceil(rows_n * planes);
    check_cube_count(cubes_n, m_chunks, cube_limit)?;
    if prologue == Prologue::RmsNorm && !use_plane && !planes.is_power_of_two() {
        // The norm's reduction tree spans the cube.
        return Err(KernelError::InvalidArguments(format!(
            "skinny matmul with RMSNorm on a device without plane operations needs a power of two planes per cube (got {planes})"
        )));
    }
    let plan = SkinnyPlan {
        rows_m,
        rows_n,
        lanes,
        planes,
        vec,
        unroll,
        use_plane,
        residual: residual.is_some(),
        prologue,
    };
    let varr = |h: &cubecl::server::Handle| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / (es * vec))
    };
    // SAFETY: the buffers hold at least the checked sizes, and the kernel clamps every row
    // index below `m` and `n` and every vector index below `k / vec`.
    unsafe {
        skinny_matmul_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(cubes_n as u32, m_chunks as u32, 1),
            CubeDim::new_1d((lanes * planes) as u32),
            vec,
            varr(x),
            varr(&norm_w),
            varr(w),
            ArrayArg::from_raw_parts(residual_h.clone(), residual_h.size_in_used() as usize / es),
            ArrayArg::from_raw_parts(out.clone(), m * n),
            m as u32,
            n as u32,
            (k / vec) as u32,
            eps,
            plan,
        );
    }
    Ok(())
}

/// The activations the matrix-unit kernels read (straight from global memory): `x` itself, or
/// the prologue's result computed by its own launch into a scratch buffer (computing it
/// inside the kernel came with a slower decode step at B = 8: docs/PERF-NOTES.md).
fn activations_for_matrix_units<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    input: SkinnyInput<&cubecl::server::Handle>,
    m: usize,
    k: usize,
    x: &cubecl::server::Handle,
) -> Result<cubecl::server::Handle> {
    let es = F::size_bytes();
    Ok(match input {
        SkinnyInput::Plain => x.clone(),
        SkinnyInput::RmsNorm { weight, eps } => {
            let a = client.empty(m * k * es);
            crate::norm::rms_norm::<R, F>(client, m, k, eps, x, weight, &a)?;
            a
        }
        SkinnyInput::SwiGlu => {
            let a = client.empty(m * k * es);
            crate::activation::swiglu::<R, F>(client, m, k, x, &a)?;
            a
        }
    })
}

/// A typed error if a grid of `x` by `y` cubes passes the device's limits.
fn check_cube_count(x: usize, y: usize, limit: (u32, u32, u32)) -> Result<()> {
    if x > limit.0 as usize || y > limit.1 as usize {
        return Err(KernelError::InvalidArguments(format!(
            "skinny matmul needs {x} x {y} cubes; the device allows {} x {}",
            limit.0, limit.1
        )));
    }
    Ok(())
}
