//! The Burn side of sparsekv: a backend extension ([`SparseKvBackend`]) and KV caches
//! ([`SparseKvCache`], [`DenseKvCache`]) that a Burn model puts into its attention layers.

pub mod backend;
pub mod cache;
pub mod error;

pub use backend::{CubeKvBuffer, SparseKvBackend};
pub use cache::{DenseKvCache, KvCache, KvCacheConfig, LayerCaches, SparseKvCache};
pub use error::{KvCacheError, Result};

/// The Burn version this crate is built with.
pub use burn;
/// Burn's CubeCL backend crate (`CubeBackend`), for naming backend types.
pub use burn_cubecl;
