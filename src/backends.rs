//! Picking a Burn backend type from run-time options: the runtime (wgpu or CUDA, as the build's
//! features allow), the float type, and whether Burn's operation fusion runs. A program writes
//! its work once, generic over the backend ([`OnBackend`]), and [`run_on`] calls it with the
//! type the options name: `Fusion<CubeBackend<..>>` (Burn's own `Wgpu` / `Cuda`, as Burn's
//! default features make them) or the bare `CubeBackend<..>`.

use clap::ValueEnum;
use sparsekv_burn::SparseKvBackend;
use sparsekv_burn::burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement};
use sparsekv_burn::burn_fusion::Fusion;
use sparsekv_format::ValueType;
use thiserror::Error;

/// A GPU runtime.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum RuntimeName {
    /// wgpu (Vulkan, Metal, DX12; needs the `wgpu` feature).
    Wgpu,
    /// CUDA (needs the `cuda` feature).
    Cuda,
}

impl RuntimeName {
    /// CUDA when the build has the `cuda` feature, else wgpu.
    pub fn build_default() -> Self {
        if cfg!(feature = "cuda") {
            RuntimeName::Cuda
        } else {
            RuntimeName::Wgpu
        }
    }
}

/// The float type of weights, activations and cache.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum FloatName {
    /// 32-bit floats.
    F32,
    /// 16-bit floats (IEEE half).
    F16,
    /// bfloat16 (CUDA only).
    Bf16,
}

/// Whether Burn's operation fusion runs (`Fusion<CubeBackend>`) or not (`CubeBackend`).
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum FusionChoice {
    /// Burn's fused backend, what `burn::backend::Wgpu` / `Cuda` are by default.
    On,
    /// The bare `CubeBackend`: every operation launched when it is called.
    Off,
}

/// Work generic over the backend type, run by [`run_on`].
pub trait OnBackend {
    /// What the work returns.
    type Output;
    /// Runs the work on backend `B` (its default device), whose float type is `value_type`.
    fn run<B: SparseKvBackend>(self, device: B::Device, value_type: ValueType) -> Self::Output;
}

/// The options name a backend this build does not have.
#[derive(Debug, Error)]
#[error(
    "this build cannot run {float:?} on {runtime:?} (bf16 needs CUDA; a runtime needs its cargo feature: --features cuda or wgpu)"
)]
pub struct UnsupportedBackend {
    /// The runtime asked for.
    pub runtime: RuntimeName,
    /// The float type asked for.
    pub float: FloatName,
}

/// Runs `work` on the backend type the options name, or says why this build cannot.
pub fn run_on<W: OnBackend>(
    runtime: RuntimeName,
    float: FloatName,
    fusion: FusionChoice,
    work: W,
) -> Result<W::Output, UnsupportedBackend> {
    match (runtime, float) {
        #[cfg(feature = "wgpu")]
        (RuntimeName::Wgpu, FloatName::F32) => Ok(with_fusion::<
            sparsekv_kernels::cubecl::wgpu::WgpuRuntime,
            f32,
            u32,
            W,
        >(fusion, ValueType::F32, work)),
        #[cfg(feature = "wgpu")]
        (RuntimeName::Wgpu, FloatName::F16) => Ok(with_fusion::<
            sparsekv_kernels::cubecl::wgpu::WgpuRuntime,
            half::f16,
            u32,
            W,
        >(fusion, ValueType::F16, work)),
        #[cfg(feature = "cuda")]
        (RuntimeName::Cuda, FloatName::F32) => Ok(with_fusion::<
            sparsekv_kernels::cubecl::cuda::CudaRuntime,
            f32,
            u8,
            W,
        >(fusion, ValueType::F32, work)),
        #[cfg(feature = "cuda")]
        (RuntimeName::Cuda, FloatName::F16) => Ok(with_fusion::<
            sparsekv_kernels::cubecl::cuda::CudaRuntime,
            half::f16,
            u8,
            W,
        >(fusion, ValueType::F16, work)),
        #[cfg(feature = "cuda")]
        (RuntimeName::Cuda, FloatName::Bf16) => Ok(with_fusion::<
            sparsekv_kernels::cubecl::cuda::CudaRuntime,
            half::bf16,
            u8,
            W,
        >(fusion, ValueType::BF16, work)),
        #[allow(unreachable_patterns)]
        (runtime, float) => Err(UnsupportedBackend { runtime, float }),
    }
}

/// `work` on `CubeBackend<R, F, i32, BT>`, fused or bare. (Burn's aliases use `u32` booleans
/// on wgpu and `u8` on CUDA; so do these.)
fn with_fusion<R: CubeRuntime, F: FloatElement, BT: BoolElement, W: OnBackend>(
    fusion: FusionChoice,
    value_type: ValueType,
    work: W,
) -> W::Output {
    match fusion {
        FusionChoice::On => {
            work.run::<Fusion<CubeBackend<R, F, i32, BT>>>(Default::default(), value_type)
        }
        FusionChoice::Off => work.run::<CubeBackend<R, F, i32, BT>>(Default::default(), value_type),
    }
}
