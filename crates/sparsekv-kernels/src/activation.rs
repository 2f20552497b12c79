//! SwiGLU in one launch: `out = silu(gate) · up`, where each row of the input holds the gate
//! half then the up half (the output of a fused gate+up projection). Computed in f32.

use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::{FloatElement, check_type_supported, vector_size};

/// Units per cube.
const UNITS: usize = 256;
/// Most cubes; larger inputs are walked grid-stride.
const MAX_CUBES: usize = 65_535;

#[cube(launch_unchecked)]
fn swiglu_kernel<F: Float, N: Size>(
    gate_up: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    half_vecs: u32,
    total_vecs: u32,
    #[comptime] vec: usize,
) {
    let half = half_vecs as usize;
    let mut i = ABSOLUTE_POS;
    while i < total_vecs as usize {
        let row = i / half;
        let col = i % half;
        let g = gate_up[row * 2 * half + col];
        let u = gate_up[row * 2 * half + half + col];
        let mut o = Vector::<F, N>::empty();
        #[unroll]
        for e in 0..vec {
            let gf = f32::cast_from(g[e]);
            // silu(g) = g / (1 + exp(-g)): exp overflows to infinity for very negative g and
            // the quotient is then -0, the limit.
            let silu = gf / (1.0 + Exp::exp(-gf));
            o[e] = F::cast_from(silu * f32::cast_from(u[e]));
        }
        out[i] = o;
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// SwiGLU of `rows` rows: `gate_up` holds `rows` rows of `2 * hidden` elements of `F` (gate,
/// then up), `out` receives `rows` rows of `hidden`. Nothing is read back.
pub fn swiglu<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    rows: usize,
    hidden: usize,
    gate_up: &cubecl::server::Handle,
    out: &cubecl::server::Handle,
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    let es = F::size_bytes();
    check_len("gate and up", gate_up, rows * 2 * hidden * es)?;
    check_len("SwiGLU output", out, rows * hidden * es)?;
    let total = rows * hidden;
    if total == 0 {
        return Ok(());
    }
    let hw = &client.properties().hardware;
    let vec = vector_size(es, hw.max_vector_size, hidden, &[]);
    let total_vecs = total / vec;
    if total_vecs > u32::MAX as usize {
        return Err(KernelError::InvalidArguments(format!(
            "SwiGLU over {total} elements: more than 32-bit indices reach"
        )));
    }
    let varr = |h: &cubecl::server::Handle| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / (es * vec))
    };
    // SAFETY: indices below `rows * 2 * hidden / vec` and `rows * hidden / vec`, as checked.
    unsafe {
        swiglu_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(total_vecs.div_ceil(UNITS).min(MAX_CUBES) as u32, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            vec,
            varr(gate_up),
            varr(out),
            (hidden / vec) as u32,
            total_vecs as u32,
            vec,
        );
    }
    Ok(())
}
