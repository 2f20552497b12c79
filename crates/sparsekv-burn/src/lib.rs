//! The Burn side of sparsekv: a backend extension ([`SparseKvBackend`]) and KV caches
//! ([`SparseKvCache`], [`DenseKvCache`]) that a Burn model puts into its attention layers.
//! [`cache`] shows a cache inside an attention layer.
//!
//! # Decode-step operations
//!
//! Besides the caches' own operations, [`SparseKvBackend`] carries the fused operations a
//! decoder layer needs to make a decode step bandwidth-bound, each one launch:
//! [`SparseKvBackend::skinny_matmul`] (a projection of a few rows, `x · wᵀ` with the weights as
//! `[out, in]` rows, optionally adding the residual), [`SparseKvBackend::rms_norm`],
//! [`SparseKvBackend::rope_split`] (RoPE fused with the split of a fused QKV projection into
//! queries and cache-layout keys and values) and [`SparseKvBackend::swiglu`].
//! `sparsekv_llama`'s model is written with them.
//!
//! # Which backend type
//!
//! [`SparseKvBackend`] is implemented for `CubeBackend<R, F, I, BT>` over every CubeCL runtime
//! and for Burn's `Fusion<B>` over any such backend, so Burn's own aliases work as they are:
//! `burn::backend::Wgpu` and `burn::backend::Cuda` are `Fusion<CubeBackend<..>>` with Burn's
//! default features (its `fusion` feature, which this crate turns on too) and the bare
//! `CubeBackend` without it. Under fusion every operation of the extension is queued on the
//! fusion stream in call order ([`backend::fusion`]); nothing waits for the device.
//!
//! ```ignore
//! type B = burn::backend::Wgpu<f32>;             // fused: Fusion<CubeBackend<WgpuRuntime, ..>>
//! type B = burn::backend::Cuda<half::f16>;       // fused, CUDA
//! // The bare backend, without Burn's operation fusion:
//! type B = sparsekv_burn::burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
//! ```
//!
//! The float element type of the backend is its default; the caches store the
//! [`KvCacheConfig::value_type`] and accept keys, values and queries of that type (f32, f16,
//! bf16 where the device supports it).
//!
//! # When the GPU runtime fails
//!
//! If one of CubeCL's device threads panics (an allocation or launch failure nobody
//! foresaw), every later cache operation returns [`KvCacheError::DeviceThread`] instead of
//! computing with dead buffers ([`runtime`]).

pub mod backend;
pub mod cache;
pub mod error;
pub mod masked;
pub mod runtime;

pub use backend::{CubeKvBuffer, DeviceMemory, RopeHeads, SKINNY_MAX_ROWS, SparseKvBackend};
pub use cache::{DenseKvCache, KvCache, KvCacheConfig, LayerCaches, PrefillPolicy, SparseKvCache};
pub use error::{KvCacheError, Result};
pub use masked::{MaskedKvCache, PruneStrategy};
pub use runtime::{check_device_threads, watch_device_threads};
pub use sparsekv_kernels::RopeStyle;

/// The Burn version this crate is built with.
pub use burn;
/// Burn's CubeCL backend crate (`CubeBackend`), for naming backend types.
pub use burn_cubecl;
/// Burn's fusion crate (`Fusion<B>`), for naming fused backend types.
pub use burn_fusion;
