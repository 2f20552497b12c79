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
//! [`SparseKvBackend`] is implemented for `CubeBackend<R, F, I, BT>` over every CubeCL
//! runtime, which is what `burn::backend::Wgpu` and `burn::backend::Cuda` are when Burn's
//! `fusion` feature is off (this crate never enables it). With `fusion` on (Burn's default
//! features turn it on), those aliases are `Fusion<CubeBackend<..>>`, which does not implement
//! the extension yet; name the inner type for the model instead, with the same device type:
//!
//! ```ignore
//! // wgpu (Burn's own `Wgpu` without fusion is exactly this type):
//! type B = sparsekv_burn::burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
//! // CUDA (Burn's own `Cuda` without fusion):
//! type B = sparsekv_burn::burn_cubecl::CubeBackend<sparsekv_kernels::cubecl::cuda::CudaRuntime, f32, i32, u8>;
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

pub use backend::{CubeKvBuffer, RopeHeads, SKINNY_MAX_ROWS, SparseKvBackend};
pub use cache::{DenseKvCache, KvCache, KvCacheConfig, LayerCaches, SparseKvCache};
pub use error::{KvCacheError, Result};
pub use masked::{MaskedKvCache, PruneStrategy};
pub use runtime::{check_device_threads, watch_device_threads};
pub use sparsekv_kernels::RopeStyle;

/// The Burn version this crate is built with.
pub use burn;
/// Burn's CubeCL backend crate (`CubeBackend`), for naming backend types.
pub use burn_cubecl;
