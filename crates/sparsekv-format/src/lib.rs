//! The sparsekv compressed KV format, its byte accounting, and the f64 CPU oracle.
//!
//! Per token and KV head, a row of `head_dim` values is pruned by magnitude to exactly
//! [`keep_count`] values and stored as a bitmap (one bit per element) plus the kept values
//! packed in index order. docs/FORMAT.md is the specification; [`layout`] is its code.
//! This crate has no GPU dependencies.
//!
//! ```
//! use sparsekv_format::{HeadDim, Sparsity, keep_count, oracle};
//! # fn main() -> sparsekv_format::Result<()> {
//! let d = HeadDim::new(8)?;
//! let block = oracle::DenseBlock::new(vec![0.5, -2.0, 0.1, 3.0, 0.0, 1.0, -0.2, 0.3], 1, d)?;
//! let c = oracle::compress(&block, Sparsity::new(0.75)?);
//! assert_eq!(keep_count(Sparsity::new(0.75)?, d), 2);
//! assert_eq!(c.values(), &[-2.0, 3.0]);
//! assert_eq!(c.bitmap(), &[0b1010]);
//! # Ok(())
//! # }
//! ```

pub mod accounting;
pub mod error;
pub mod layout;
pub mod oracle;
pub mod params;

pub use accounting::{CacheShape, KvBytes, SequenceOccupancy, kv_bytes, uniform_kv_bytes};
pub use error::{FormatError, Result};
pub use params::{HeadDim, PromptShape, Sparsity, ValueType, keep_count, keep_count_of};
