//! The error type shared by the format, the accounting and the oracle.

use thiserror::Error;

/// Everything that can be wrong with an input to this crate.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum FormatError {
    /// A sparsity (fraction of each row that is dropped) outside `[0, 1)`, or not finite.
    #[error("sparsity {0} is out of range: it must be a finite number in [0, 1)")]
    InvalidSparsity(f64),
    /// A head dimension the format does not support.
    #[error("head_dim {0} is not supported: it must be a power of two from 8 to 256")]
    UnsupportedHeadDim(usize),
    /// A buffer whose length does not match the shape it is declared with.
    #[error("{what}: expected {expected} elements, got {actual}")]
    ShapeMismatch {
        /// Which input is wrong.
        what: &'static str,
        /// The length its shape implies.
        expected: usize,
        /// Its actual length.
        actual: usize,
    },
    /// An input that must not be empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// Any other inconsistent argument, with a sentence saying what is wrong.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, FormatError>;
