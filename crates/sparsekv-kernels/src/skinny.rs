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
//!    run per row; the loads of all its rows are issued before they are used. The activation
//!    vectors of the step (`rows_m` of them, cached in L1, shared by every row) are widened to
//!    f32 once and multiplied into `rows_m × rows_per_plane` f32 accumulators per lane.
//! 2. **Reduce** (`plane_reduce`): the lanes' partial sums of each output are summed over the
//!    plane with plane operations where the device has them, through a shared-memory tree
//!    where it does not (lavapipe), chosen at compile time; the first lane writes the output.
//!
//! More than `MAX_ROWS_M` activation rows are handled in chunks along the grid's second axis:
//! each chunk streams the weights again (from L2 when they fit).

use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::{FloatElement, check_type_supported};

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
/// Units per simulated plane on devices without plane operations (the reduction tree's width).
const FALLBACK_LANES: usize = 32;

/// Tuning knobs of [`skinny_matmul_with`]; [`skinny_matmul`] chooses them from the shape and
/// the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SkinnyTuning {
    /// Output features per plane (1, 2, 4 or 8): more reuse of each activation load, fewer
    /// planes.
    pub rows_per_plane: usize,
    /// Planes per cube (1..=8).
    pub planes: usize,
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
    /// Whether plane operations reduce the lanes' sums.
    use_plane: bool,
}

/// Adds `x[m0 + i, :] · w[n0 + j, :]` over this lane's share of `K` to `acc[i * rows_n + j]`.
/// Rows past `m` or `n` are clamped to the last one (their results are never written), so
/// every load is in bounds.
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate_rows<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    acc: &mut Array<f32>,
    m0: usize,
    n0: usize,
    m: usize,
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
    let mut x_base = Array::<usize>::new(rows_m);
    #[unroll]
    for i in 0..rows_m {
        x_base[i] = min(m0 + i, m - 1) * k_vecs;
    }
    let mut wv = Array::<Vector<F, N>>::new(rows_n);
    let mut xf = Array::<f32>::new(rows_m * vec);
    let mut kv = lane;
    while kv < k_vecs {
        // Every weight load of the step first, so they are in flight together.
        #[unroll]
        for j in 0..rows_n {
            wv[j] = w[w_base[j] + kv];
        }
        #[unroll]
        for i in 0..rows_m {
            let xv = x[x_base[i] + kv];
            #[unroll]
            for e in 0..vec {
                xf[i * vec + e] = f32::cast_from(xv[e]);
            }
        }
        #[unroll]
        for j in 0..rows_n {
            #[unroll]
            for e in 0..vec {
                let we = f32::cast_from(wv[j][e]);
                #[unroll]
                for i in 0..rows_m {
                    acc[i * rows_n + j] += xf[i * vec + e] * we;
                }
            }
        }
        kv += lanes;
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
fn skinny_matmul_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    out: &mut Array<F>,
    m: u32,
    n: u32,
    k_vecs: u32,
    #[comptime] plan: SkinnyPlan,
) {
    let (rows_m, rows_n, lanes) = comptime!((plan.rows_m, plan.rows_n, plan.lanes));
    let red_cap = comptime!(if plan.use_plane {
        1
    } else {
        plan.lanes * plan.planes
    });
    let mut red = SharedMemory::<f32>::new(red_cap);
    let (m, n) = (m as usize, n as usize);
    let lane = UNIT_POS as usize % lanes;
    let plane = UNIT_POS as usize / lanes;
    let n0 = (CUBE_POS_X as usize * comptime!(plan.planes) + plane) * rows_n;
    let m0 = CUBE_POS_Y as usize * rows_m;

    let mut acc = Array::<f32>::new(rows_m * rows_n);
    #[unroll]
    for i in 0..rows_m * rows_n {
        acc[i] = 0.0;
    }
    accumulate_rows::<F, N>(x, w, &mut acc, m0, n0, m, n, k_vecs as usize, lane, plan);

    #[unroll]
    for i in 0..rows_m {
        #[unroll]
        for j in 0..rows_n {
            let sum = plane_reduce(acc[i * rows_n + j], &mut red, lane, plan);
            if lane == 0 && m0 + i < m && n0 + j < n {
                out[(m0 + i) * n + n0 + j] = F::cast_from(sum);
            }
        }
    }
}

/// `out = x · wᵀ` for decoding: `x` holds `[m, k]` elements of `F` (row-major), `w` the weight
/// matrix as `[n, k]` rows (row `j` = the input weights of output feature `j`), and `out`
/// receives `[m, n]`. Accumulates in f32. `m` is 1..=[`MAX_M`]. Nothing is read back.
pub fn skinny_matmul<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    shape: SkinnyShape,
    x: &cubecl::server::Handle,
    w: &cubecl::server::Handle,
    out: &cubecl::server::Handle,
) -> Result<()> {
    skinny_matmul_with::<R, F>(client, shape, x, w, out, None)
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

/// [`skinny_matmul`] with explicit tuning (`None`: chosen from the shape and device).
pub fn skinny_matmul_with<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    shape: SkinnyShape,
    x: &cubecl::server::Handle,
    w: &cubecl::server::Handle,
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
        && (!matches!(t.rows_per_plane, 1 | 2 | 4 | 8) || !(1..=8).contains(&t.planes))
    {
        return Err(KernelError::InvalidArguments(format!(
            "skinny matmul tuning {t:?}: rows_per_plane must be 1, 2, 4 or 8 and planes 1..=8"
        )));
    }
    let es = F::size_bytes();
    check_len("activations", x, m * k * es)?;
    check_len("weights", w, n * k * es)?;
    check_len("output", out, m * n * es)?;
    let cube_limit = client.properties().hardware.max_cube_count;

    let hw = &client.properties().hardware;
    let mut vec = (16 / es).min(hw.max_vector_size as usize).max(1);
    while !k.is_multiple_of(vec) {
        vec /= 2;
    }
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
    let (rows_n, planes) = match tuning {
        Some(t) => (t.rows_per_plane, t.planes.min(max_planes)),
        None => {
            let planes = DEFAULT_PLANES.min(max_planes);
            let sms = hw.num_streaming_multiprocessors.unwrap_or(16) as usize;
            // The most reuse that still gives every SM its share of cubes.
            let rows_n = [4, 2, 1]
                .into_iter()
                .find(|&r| n.div_ceil(r * planes) * m_chunks >= CUBES_PER_SM * sms)
                .unwrap_or(1);
            (rows_n, planes)
        }
    };
    let cubes_n = n.div_ceil(rows_n * planes);
    if cubes_n > cube_limit.0 as usize || m_chunks > cube_limit.1 as usize {
        return Err(KernelError::InvalidArguments(format!(
            "skinny matmul with {n} output features needs {cubes_n} cubes; the device allows {}",
            cube_limit.0
        )));
    }
    let plan = SkinnyPlan {
        rows_m,
        rows_n,
        lanes,
        planes,
        vec,
        use_plane,
    };
    let varr = |h: &cubecl::server::Handle| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size() as usize / (es * vec))
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
            varr(w),
            ArrayArg::from_raw_parts(out.clone(), m * n),
            m as u32,
            n as u32,
            (k / vec) as u32,
            plan,
        );
    }
    Ok(())
}
