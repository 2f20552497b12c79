//! Helpers shared by the integration tests: the runtime the features select, the run's seed,
//! standard normal samples, and the relative error that never lets NaN pass.

#![allow(dead_code)] // each test binary uses its own subset

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use rand::rngs::StdRng;

/// The runtime under test: CUDA with the `cuda` feature, else wgpu (lavapipe in CI).
#[cfg(feature = "cuda")]
pub type Rt = sparsekv::kernels::cubecl::cuda::CudaRuntime;
/// The runtime under test: CUDA with the `cuda` feature, else wgpu (lavapipe in CI).
#[cfg(not(feature = "cuda"))]
pub type Rt = sparsekv::kernels::cubecl::wgpu::WgpuRuntime;

/// Burn's own backend alias for the runtime under test, as Burn's default features make it
/// (`Fusion<CubeBackend<..>>`): what a Burn user's model runs on.
#[cfg(feature = "cuda")]
pub type Fused = sparsekv::cache::burn::backend::Cuda<f32, i32>;
/// Burn's own backend alias for the runtime under test, as Burn's default features make it
/// (`Fusion<CubeBackend<..>>`): what a Burn user's model runs on.
#[cfg(not(feature = "cuda"))]
pub type Fused = sparsekv::cache::burn::backend::Wgpu<f32, i32, u32>;

/// `SPARSEKV_SEED` if set (to replay a failure), else a fresh seed from the clock.
pub fn seed() -> u64 {
    std::env::var("SPARSEKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        })
}

/// One standard normal sample (Box-Muller).
pub fn standard_normal(rng: &mut StdRng) -> f64 {
    let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// ‖out − reference‖ / ‖reference‖; infinite if `out` holds NaN (poison) or infinities.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    if out.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Runs the test `name` of this test binary again in a child process with `env_var` set (for
/// tests whose subject is process-wide: panic hooks, a failed device thread), returning its
/// output; the test itself does the child's work when it finds `env_var` set.
pub fn rerun_as_child(name: &str, env_var: &str) -> std::process::Output {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no test binary path: {e}"));
    std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture"])
        .env(env_var, "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot rerun the test binary: {e}"))
}
