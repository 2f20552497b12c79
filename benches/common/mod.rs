//! Shared by the benches: the runtime the features select, device-side random data, device
//! synchronisation, the copy-bandwidth ceiling and a median timer.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use sparsekv::kernels::FloatElement;
use sparsekv::kernels::cubecl;
use sparsekv::kernels::cubecl::prelude::*;
use sparsekv::kernels::cubecl::server::Handle;

#[cfg(feature = "cuda")]
pub type Rt = sparsekv::kernels::cubecl::cuda::CudaRuntime;
#[cfg(not(feature = "cuda"))]
pub type Rt = sparsekv::kernels::cubecl::wgpu::WgpuRuntime;

/// The backend's name, for the tables.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "CUDA"
    } else {
        "wgpu"
    }
}

/// Whether `SPARSEKV_BENCH_QUICK` asks for the small shapes only (a software adapter).
pub fn quick() -> bool {
    std::env::var_os("SPARSEKV_BENCH_QUICK").is_some()
}

/// Cubes of the grid-stride kernels: enough to fill any GPU, within every API's limits.
const GRID: u32 = 4096;
const UNITS: u32 = 256;

/// Uniform values in [-1, 1) from a hash of the index and the seed.
#[cube(launch)]
fn fill_uniform_kernel<F: Float>(out: &mut Array<F>, seed: u32) {
    let n = out.len();
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    while i < n {
        let mut x = u32::cast_from(i) ^ seed;
        x ^= x >> 16;
        x *= 0x7feb_352du32;
        x ^= x >> 15;
        x *= 0x846c_a68bu32;
        x ^= x >> 16;
        out[i] = F::cast_from(x >> 8) * F::new(1.0 / 8_388_608.0) - F::new(1.0);
        i += stride;
    }
}

/// Copies `src` to `dst` in vectors of `N`.
#[cube(launch)]
fn copy_kernel<N: Size>(src: &Array<Vector<f32, N>>, dst: &mut Array<Vector<f32, N>>) {
    let n = src.len();
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    while i < n {
        dst[i] = src[i];
        i += stride;
    }
}

/// A device buffer of `n` random `F` in [-1, 1), filled on the device.
pub fn random_handle<F: FloatElement>(client: &ComputeClient<Rt>, n: usize, seed: u32) -> Handle {
    let handle = client.empty(n * F::size_bytes());
    unsafe {
        fill_uniform_kernel::launch::<F, Rt>(
            client,
            CubeCount::Static(GRID, 1, 1),
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(handle.clone(), n),
            seed.wrapping_mul(0x9e37_79b9) ^ 0x5bd1_e995,
        );
    }
    handle
}

/// Waits for the device to finish everything queued.
pub fn sync(client: &ComputeClient<Rt>) {
    cubecl::future::block_on(client.sync()).expect("device sync");
}

/// Median per-call time of `call(i)` over 15 batches of 20 calls (call `i` of a batch gets
/// `i`), after 10 warm-up calls, with the device synchronised around each batch.
pub fn median_call_time(client: &ComputeClient<Rt>, mut call: impl FnMut(usize)) -> Duration {
    for i in 0..10 {
        call(i);
    }
    sync(client);
    let mut per_call: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for i in 0..20 {
                call(i);
            }
            sync(client);
            t.elapsed() / 20
        })
        .collect();
    per_call.sort();
    per_call[per_call.len() / 2]
}

/// Device-to-device copy bandwidth in bytes per second (read + written), copying `bytes`
/// bytes with 16-byte loads and stores: the ceiling the attention kernels are held to.
pub fn copy_bandwidth(client: &ComputeClient<Rt>, bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = random_handle::<f32>(client, n, 7);
    let dst = client.empty(n * 4);
    let t = median_call_time(client, |_| unsafe {
        copy_kernel::launch::<Rt>(
            client,
            CubeCount::Static(GRID, 1, 1),
            CubeDim::new_1d(UNITS),
            4,
            ArrayArg::from_raw_parts(src.clone(), n / 4),
            ArrayArg::from_raw_parts(dst.clone(), n / 4),
        );
    });
    2.0 * (n * 4) as f64 / t.as_secs_f64()
}
