//! sparsekv: MUSTAFAR-style unstructured sparse KV caches for LLM decoding, in pure Rust on
//! Burn and CubeCL.
//!
//! This crate re-exports the member crates:
//! - [`format`]: the compressed KV format, byte accounting and the f64 CPU oracle;
//! - [`kernels`]: the CubeCL kernels (prune+compress, sparse and dense decode attention);
//! - [`cache`]: the Burn backend extension and the sparse and dense KV caches;
//! - [`llama`]: a Llama decoder, loaders, tokenizer and generation.

pub use sparsekv_burn as cache;
pub use sparsekv_format as format;
pub use sparsekv_kernels as kernels;
pub use sparsekv_llama as llama;
