//! RMSNorm in one launch: `out = x / sqrt(mean(x²) + eps) · w` over the last axis of `x`.
//!
//! One cube per row (grid-stride over rows), three short passes over the row, which stays in
//! L1 after the first: the largest magnitude and the mean square of the row divided by it
//! (`rms_factors`, which the skinny matmul's RMSNorm prologue shares), then the scaled write.

use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::reduce::cube_reduce;
use crate::{FloatElement, check_type_supported, vector_size};

/// Most units per cube (a row of Llama-3-8B's 4096 f16 values is 512 vectors).
const MAX_UNITS: usize = 256;
/// Fewest units per cube: one plane on the GPUs this targets.
const MIN_UNITS: usize = 32;
/// Most cubes: rows beyond this are walked grid-stride.
const MAX_CUBES: usize = 65_535;

/// Static launch parameters, chosen on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NormPlan {
    /// Vectors per row.
    dim_vecs: usize,
    /// Elements per vector.
    vec: usize,
    /// Units per cube (a power of two).
    units: usize,
    /// Whether plane operations reduce.
    use_plane: bool,
}

/// The RMSNorm factor `1 / sqrt(mean(x²) + eps)` of each of `rows` rows of `dim_vecs` vectors
/// of `vec` elements, row `i` starting at vector `bases[i]` of `x`; every unit of the cube gets
/// them (all units must call it). Two short passes over the rows, each unit taking every
/// `units`-th vector: the largest magnitude, then the mean square of the row divided by it
/// (`cube_reduce` each). Dividing first keeps the squares finite in f32 for every input type
/// (a bf16 row can hold values whose square overflows f32), and the factor is the same.
/// `red` holds `rows * units` floats (`rows * planes` with plane operations).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_factors<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    bases: &Array<usize>,
    dim_vecs: usize,
    eps: f32,
    red: &mut SharedMemory<f32>,
    #[comptime] rows: usize,
    #[comptime] vec: usize,
    #[comptime] units: usize,
    #[comptime] use_plane: bool,
) -> Array<f32> {
    let mut part = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        let mut amax = 0.0f32;
        let mut i = UNIT_POS as usize;
        while i < dim_vecs {
            let v = x[bases[r] + i];
            #[unroll]
            for e in 0..vec {
                amax = max(amax, Abs::abs(f32::cast_from(v[e])));
            }
            i += units;
        }
        part[r] = amax;
    }
    let amax = cube_reduce(&part, red, rows, units, true, use_plane);
    let mut inv = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        // An all-zero row stays zero: inv is finite, the squares are zero and eps · inv² is
        // large, so the factor is (close to) zero.
        inv[r] = 1.0f32 / max(amax[r], f32::new(1.0e-30));
        let mut sum = 0.0f32;
        let mut i = UNIT_POS as usize;
        while i < dim_vecs {
            let v = x[bases[r] + i];
            #[unroll]
            for e in 0..vec {
                let s = f32::cast_from(v[e]) * inv[r];
                sum += s * s;
            }
            i += units;
        }
        part[r] = sum;
    }
    let sums = cube_reduce(&part, red, rows, units, false, use_plane);
    let dim = f32::cast_from(dim_vecs * vec);
    let mut factors = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        // x / sqrt(mean(x²) + eps) = (x · inv) / sqrt(mean((x · inv)²) + eps · inv²); inv² is
        // capped so that eps = 0 never meets infinity, and a zero row with eps = 0 gives 0.
        let denom = sums[r] / dim + eps * min(inv[r] * inv[r], f32::new(3.0e38));
        factors[r] = if denom > 0.0 {
            inv[r] / Sqrt::sqrt(denom)
        } else {
            f32::new(0.0)
        };
    }
    factors
}

#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    rows: u32,
    eps: f32,
    #[comptime] plan: NormPlan,
) {
    let mut red = SharedMemory::<f32>::new(plan.units);
    let mut bases = Array::<usize>::new(1usize);
    let mut row = CUBE_POS_X as usize;
    while row < rows as usize {
        let base = row * plan.dim_vecs;
        bases[0] = base;
        let factor = rms_factors::<F, N>(
            x,
            &bases,
            plan.dim_vecs,
            eps,
            &mut red,
            1usize,
            plan.vec,
            plan.units,
            plan.use_plane,
        )[0];
        let mut i = UNIT_POS as usize;
        while i < plan.dim_vecs {
            let v = x[base + i];
            let wv = w[i];
            let mut o = Vector::<F, N>::empty();
            #[unroll]
            for e in 0..plan.vec {
                o[e] = F::cast_from(f32::cast_from(v[e]) * factor * f32::cast_from(wv[e]));
            }
            out[base + i] = o;
            i += plan.units;
        }
        row += CUBE_COUNT_X as usize;
    }
}

/// RMSNorm of `rows` rows of `dim` elements of `F` (`x`, row-major) with weights `w` (`dim`
/// elements) into `out` (same shape as `x`), computed in f32. Nothing is read back.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    rows: usize,
    dim: usize,
    eps: f32,
    x: &cubecl::server::Handle,
    w: &cubecl::server::Handle,
    out: &cubecl::server::Handle,
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    if dim == 0 || !(eps.is_finite() && eps >= 0.0) {
        return Err(KernelError::InvalidArguments(format!(
            "RMSNorm over rows of {dim} elements with eps {eps}: needs non-empty rows and a finite eps >= 0"
        )));
    }
    let es = F::size_bytes();
    check_len("RMSNorm input", x, rows * dim * es)?;
    check_len("RMSNorm weights", w, dim * es)?;
    check_len("RMSNorm output", out, rows * dim * es)?;
    if rows == 0 {
        return Ok(());
    }
    let hw = &client.properties().hardware;
    let vec = vector_size(es, hw.max_vector_size, dim, &[]);
    let dim_vecs = dim / vec;
    let use_plane = client
        .features()
        .plane
        .contains(cubecl::features::Plane::Ops)
        && hw.plane_size_min == hw.plane_size_max;
    let min_units = if use_plane {
        (hw.plane_size_max as usize).max(MIN_UNITS)
    } else {
        MIN_UNITS
    };
    let units = dim_vecs.next_power_of_two().clamp(
        min_units,
        MAX_UNITS.max(min_units).min(hw.max_units_per_cube as usize),
    );
    let plan = NormPlan {
        dim_vecs,
        vec,
        units,
        use_plane,
    };
    let varr = |h: &cubecl::server::Handle| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / (es * vec))
    };
    // SAFETY: rows below `rows` of `dim_vecs` vectors, within the checked sizes.
    unsafe {
        rms_norm_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(rows.min(MAX_CUBES) as u32, 1, 1),
            CubeDim::new_1d(units as u32),
            vec,
            varr(x),
            varr(w),
            varr(out),
            rows as u32,
            eps,
            plan,
        );
    }
    Ok(())
}
