//! The Burn side of sparsekv: a backend extension ([`SparseKvBackend`]) and KV caches
//! ([`SparseKvCache`], [`DenseKvCache`]) that a Burn model puts into its attention layers.
//! [`cache`] shows a cache inside an attention layer.
//!
//! # One cache for the whole model
//!
//! A model with `n` attention layers takes its caches from [`LayerCaches::sparse`] (or
//! [`LayerCaches::dense`]): one call checks the whole model's memory before allocating any of
//! it, and the sparse caches it makes share work across layers.
//!
//! - **Buffers in layer groups.** The layers' bitmaps, packed values and windows live in a few
//!   shared buffers (as many layers per buffer as the device allocates in one piece, within
//!   2 GiB), each layer's cache holding views of its part ([`SparseKvBackend::kv_view`]).
//! - **One window policy per step.** Every layer appends the same tokens, so every layer's
//!   window overflows on the same step. The first layer to get there compresses the oldest
//!   chunk of every layer of its group in one launch (keys and values together) and compacts
//!   every window in one more; the other layers find it done. Pruning is per token, so which
//!   layer triggers it changes no bit. Layers driven out of step (one layer ahead of the
//!   others) compress alone, as independent caches would: the result is the same either way.
//! - **One upload per step.** The attention lengths and the row offsets of an append are the
//!   same for every layer of a step; the kernels keep such small arrays on the device by
//!   content, so only the first layer of a step uploads them.
//! - **Positions from the caches, RoPE on the way in.** A token's position is the length of
//!   its sequence in the caches ([`KvCache::lengths`]), never a counter the caller keeps
//!   beside them. [`KvCache::append_qkv`] takes a layer's fused QKV projection and the model's
//!   [`RopeTables`], rotates queries and keys at those positions and, in a decode step, writes
//!   the keys and values straight into the cache's dense rows (one launch, no key and value
//!   tensors); it returns the queries for [`KvCache::attend`]. A model that rotates its keys
//!   itself appends them with [`KvCache::append`].
//!
//! Each layer still sees a plain [`KvCache`], so a model's layer loop stays as it was:
//!
//! ```no_run
//! # #[cfg(feature = "wgpu")] {
//! use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
//! use burn::tensor::{Distribution, Tensor};
//! use sparsekv_burn::{
//!     KvCache, KvCacheConfig, LayerCaches, RopeHeads, RopeStyle, RopeTables, SparseKvCache,
//! };
//!
//! type B = CubeBackend<WgpuRuntime, f32, i32, u32>;
//! let device = Default::default();
//! let (layers, batch, q_heads, kv_heads, head_dim) = (4, 2, 8, 4, 64);
//! let config = KvCacheConfig::new(batch, kv_heads, head_dim, 4096).with_sparsity(0.7, 0.7);
//! // Every layer's cache, checked against the device's memory before anything is allocated.
//! let mut caches = LayerCaches::<SparseKvCache<B>>::sparse(layers, &config, &device)?;
//! // The model's RoPE: cos and sin of every position's angles, [positions, head_dim / 2].
//! let rope = RopeTables {
//!     cos: Tensor::<B, 2>::ones([4096, head_dim / 2], &device),
//!     sin: Tensor::<B, 2>::zeros([4096, head_dim / 2], &device),
//!     heads: RopeHeads { q_heads, kv_heads, style: RopeStyle::RotateHalf },
//! };
//! let width = (q_heads + 2 * kv_heads) * head_dim;
//! for _step in 0..100 {
//!     // One decode step: each layer puts its new token's keys and values in (rotated at the
//!     // position the cache holds), then attends with the rotated queries.
//!     for cache in caches.layers_mut() {
//!         let qkv = Tensor::<B, 3>::random([batch, 1, width], Distribution::Default, &device);
//!         let q = cache.append_qkv(qkv, &rope, &[1, 1])?; // [batch, 1, q_heads, head_dim]
//!         let _out: Tensor<B, 3> = cache.attend(q.reshape([batch, q_heads, head_dim]))?;
//!     }
//! }
//! println!("{:.1}% of dense", 100.0 * caches.memory::<B>().fraction_of_dense());
//! # }
//! # Ok::<(), sparsekv_burn::KvCacheError>(())
//! ```
//!
//! `sparsekv_llama`'s model takes `caches.layers_mut()` in its prefill and decode.
//!
//! # Decode-step operations
//!
//! Besides the caches' own operations, [`SparseKvBackend`] carries the fused operations a
//! decoder layer needs to make a decode step bandwidth-bound, each one launch:
//! [`SparseKvBackend::skinny_matmul`] (a projection of a few rows, `x · wᵀ` with the weights as
//! `[out, in]` rows, optionally adding the residual, and applying the RMSNorm before it or the
//! SwiGLU of a gate+up output as it reads `x`: [`SkinnyInput`]), [`SparseKvBackend::rms_norm`],
//! [`SparseKvBackend::rope_split`] (RoPE fused with the split of a fused QKV projection into
//! queries and cache-layout keys and values, the angles read from the model's tables at each
//! sequence's position) and [`SparseKvBackend::swiglu`]. `sparsekv_llama`'s model is written
//! with them: a decode step's layer is six launches where the projections run on CUDA cores
//! (QKV with its norm, RoPE with the cache's row write ([`SparseKvBackend::rope_append`]),
//! attention, the output projection, gate+up with its norm, the down projection with SwiGLU),
//! plus a merge where attention splits its rows; on matrix units (CUDA, 8 sequences and more)
//! the norms and SwiGLU keep launches of their own.
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
pub use cache::{
    DenseKvCache, KvCache, KvCacheConfig, LayerCaches, PrefillPolicy, RopeTables, SparseKvCache,
};
pub use error::{KvCacheError, Result};
pub use masked::{MaskedKvCache, PruneStrategy};
pub use runtime::{check_device_threads, watch_device_threads};
pub use sparsekv_kernels::{RopeStyle, SkinnyInput};

/// The Burn version this crate is built with.
pub use burn;
/// Burn's CubeCL backend crate (`CubeBackend`), for naming backend types.
pub use burn_cubecl;
/// Burn's fusion crate (`Fusion<B>`), for naming fused backend types.
pub use burn_fusion;
