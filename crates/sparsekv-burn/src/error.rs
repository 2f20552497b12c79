//! Errors of the Burn extension and the caches.

use thiserror::Error;

/// Why a cache or backend operation was refused.
#[derive(Debug, Error)]
pub enum KvCacheError {
    /// A kernel launch was refused (bad arguments, unsupported type on this device).
    #[error(transparent)]
    Kernel(#[from] sparsekv_kernels::KernelError),
    /// A format parameter is invalid (sparsity, head_dim).
    #[error(transparent)]
    Format(#[from] sparsekv_format::FormatError),
    /// A tensor whose shape does not fit the cache.
    #[error("{what}: expected shape {expected:?}, got {actual:?}")]
    Shape {
        /// Which tensor.
        what: &'static str,
        /// The shape the cache needs (`0` where any size is accepted).
        expected: Vec<usize>,
        /// The tensor's shape.
        actual: Vec<usize>,
    },
    /// A tensor of another float type than the cache's.
    #[error("{what} is {actual:?} but the cache stores {expected}")]
    DType {
        /// Which tensor.
        what: &'static str,
        /// The cache's value type.
        expected: &'static str,
        /// The tensor's type.
        actual: burn::tensor::DType,
    },
    /// A tensor on another device than the cache's.
    #[error("{0} is on another device than the cache")]
    Device(&'static str),
    /// Appending would pass the cache's `max_seq`.
    #[error("sequence {sequence} would hold {needed} tokens, more than max_seq = {max_seq}")]
    Capacity {
        /// The sequence.
        sequence: usize,
        /// Tokens it would hold.
        needed: usize,
        /// The cache's limit.
        max_seq: usize,
    },
    /// A cache buffer larger than the device allocates in one piece.
    #[error(
        "a cache buffer of {bytes} bytes is larger than the largest buffer this device allocates ({limit} bytes): lower the batch, KV heads or max_seq, or split the cache"
    )]
    Allocation {
        /// Bytes the buffer needs.
        bytes: usize,
        /// The device's largest buffer.
        limit: u64,
    },
    /// The device has too little free memory for the caches asked for. Checked before
    /// anything is allocated, from the bytes docs/FORMAT.md's formulas give, so nothing is
    /// left half-allocated.
    #[error(
        "{what} needs {needed} bytes ({needed_gib:.2} GiB) but the device has {available} bytes ({available_gib:.2} GiB) available of {total} bytes: lower the batch, max_seq or layers, raise the sparsity, or use a device with more memory",
        needed_gib = *.needed as f64 / GIB,
        available_gib = *.available as f64 / GIB
    )]
    DeviceMemory {
        /// What was to be allocated (e.g. "32 sparse caches of ...").
        what: String,
        /// Bytes it needs.
        needed: u64,
        /// Bytes the device can still give: its free memory plus what the runtime's memory
        /// pools hold unused.
        available: u64,
        /// The device's total memory.
        total: u64,
    },
    /// A GPU runtime's device thread panicked earlier in this process (see
    /// [`crate::runtime`]): its buffers are gone, so nothing computed on that device can be
    /// trusted. The program should stop.
    #[error("the device runtime failed ({0}); no further work can be trusted on this device")]
    DeviceThread(String),
    /// An operation queued on a fused backend's stream failed when it ran, after its call had
    /// returned (see [`crate::backend::fusion`]): what it should have written is missing, so
    /// nothing computed later on that device can be trusted.
    #[error(
        "a queued operation failed when it ran ({0}); no further work can be trusted on this device"
    )]
    QueuedOperation(String),
    /// Any other invalid argument or configuration.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, KvCacheError>;
