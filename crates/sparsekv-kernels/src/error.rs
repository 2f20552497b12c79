//! Errors of the kernel launchers.

use thiserror::Error;

/// Why a kernel could not be launched.
#[derive(Debug, Error)]
pub enum KernelError {
    /// A format parameter (sparsity, head_dim, a block shape) is invalid.
    #[error(transparent)]
    Format(#[from] sparsekv_format::FormatError),
    /// The runtime cannot store or compute with the requested float type.
    #[error("the {runtime} runtime on this device does not support {dtype} kernels")]
    UnsupportedType {
        /// Runtime name.
        runtime: String,
        /// The float type asked for.
        dtype: &'static str,
    },
    /// The kernel does not run on this device or for this shape (a sentence says why); the
    /// caller computes the result another way.
    #[error("unsupported here: {0}")]
    Unsupported(String),
    /// Inconsistent launch arguments, with a sentence saying what is wrong.
    #[error("invalid kernel arguments: {0}")]
    InvalidArguments(String),
    /// The runtime reported an error.
    #[error("runtime error: {0}")]
    Runtime(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;
