//! The f64 CPU oracle: the reference every kernel is tested against. It favours being
//! obviously right over being fast.

pub mod attention;
pub mod prune;
pub mod strategies;

pub use attention::{
    HeadCache, causal_attention, concat_blocks, dense_decode_attention, sparse_decode_attention,
};
pub use prune::{
    CompressedBlock, DenseBlock, compress, compress_keep, magnitude_keep_mask, magnitude_rank,
};
