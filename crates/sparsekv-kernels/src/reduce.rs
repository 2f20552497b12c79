//! Reductions over a cube, shared by the kernels: plane (warp) operations where the device
//! has them, a shared-memory tree where it does not (lavapipe), chosen at compile time.

use cubecl::prelude::*;

/// The maximum (`is_max`) or sum over the cube of one value per unit, for each of `group`
/// values; every unit gets the results. With plane operations: a plane reduction, then one
/// value per plane through shared memory. Without (lavapipe): a shared-memory tree.
/// `red` holds at least `group * units` floats; `units` is the cube size, a power of two.
#[cube]
pub(crate) fn cube_reduce(
    values: &Array<f32>,
    red: &mut SharedMemory<f32>,
    #[comptime] group: usize,
    #[comptime] units: usize,
    #[comptime] is_max: bool,
    #[comptime] use_plane: bool,
) -> Array<f32> {
    let tid = UNIT_POS as usize;
    let mut out = Array::<f32>::new(group);
    if comptime!(use_plane) {
        #[unroll]
        for g in 0..group {
            let r = if comptime!(is_max) {
                plane_max(values[g])
            } else {
                plane_sum(values[g])
            };
            if UNIT_POS_PLANE == 0 {
                red[PLANE_POS as usize * group + g] = r;
            }
        }
        sync_cube();
        let planes = (CUBE_DIM / PLANE_DIM) as usize;
        #[unroll]
        for g in 0..group {
            let mut r = red[g];
            for p in 1..planes {
                let x = red[p * group + g];
                if comptime!(is_max) {
                    r = max(r, x);
                } else {
                    r += x;
                }
            }
            out[g] = r;
        }
    } else {
        #[unroll]
        for g in 0..group {
            red[g * units + tid] = values[g];
        }
        sync_cube();
        let levels = comptime!(units.trailing_zeros() as usize);
        for level in 0..levels {
            let stride = units >> (level + 1);
            if tid < stride {
                #[unroll]
                for g in 0..group {
                    let a = red[g * units + tid];
                    let b = red[g * units + tid + stride];
                    red[g * units + tid] = if comptime!(is_max) { max(a, b) } else { a + b };
                }
            }
            sync_cube();
        }
        #[unroll]
        for g in 0..group {
            out[g] = red[g * units];
        }
    }
    // Nobody may overwrite `red` before every unit has read it.
    sync_cube();
    out
}
