//! Byte accounting: what a cache occupies in the compressed format and what the same tokens
//! would occupy dense. Every byte a stream uses is counted (bitmap words, including the
//! partial last word, and values); allocation slack from capacity rounding is not.

use crate::layout::bitmap_words;
use crate::params::{HeadDim, Sparsity, ValueType, keep_count};

/// The model-side shape of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Decoder layers.
    pub layers: usize,
    /// KV heads per layer (before GQA expansion).
    pub kv_heads: usize,
    /// Elements per token row.
    pub head_dim: HeadDim,
    /// Stored value type (used for both the compressed values and the dense window).
    pub value_type: ValueType,
}

/// How one sequence's tokens are split between the compressed segment and the dense window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SequenceOccupancy {
    /// Tokens stored compressed.
    pub compressed_tokens: usize,
    /// Recent tokens stored dense.
    pub window_tokens: usize,
}

impl SequenceOccupancy {
    /// `tokens` tokens of which the newest `window` (or all, if fewer) stay dense.
    pub fn steady_state(tokens: usize, window: usize) -> Self {
        let window_tokens = tokens.min(window);
        SequenceOccupancy {
            compressed_tokens: tokens - window_tokens,
            window_tokens,
        }
    }
}

/// Bytes of a cache, split by where they live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvBytes {
    /// Bitmap bytes of the compressed K streams.
    pub k_bitmap: u64,
    /// Value bytes of the compressed K streams.
    pub k_values: u64,
    /// Bitmap bytes of the compressed V streams.
    pub v_bitmap: u64,
    /// Value bytes of the compressed V streams.
    pub v_values: u64,
    /// Bytes of the dense windows (K and V).
    pub window: u64,
    /// Bytes the same tokens would take in a dense cache (K and V).
    pub dense_equivalent: u64,
}

impl KvBytes {
    /// All bytes in use: compressed streams plus dense windows.
    pub fn total(&self) -> u64 {
        self.k_bitmap + self.k_values + self.v_bitmap + self.v_values + self.window
    }

    /// `total / dense_equivalent` (1.0 for an empty cache).
    pub fn fraction_of_dense(&self) -> f64 {
        if self.dense_equivalent == 0 {
            1.0
        } else {
            self.total() as f64 / self.dense_equivalent as f64
        }
    }
}

impl std::ops::Add for KvBytes {
    type Output = KvBytes;

    fn add(self, o: KvBytes) -> KvBytes {
        KvBytes {
            k_bitmap: self.k_bitmap + o.k_bitmap,
            k_values: self.k_values + o.k_values,
            v_bitmap: self.v_bitmap + o.v_bitmap,
            v_values: self.v_values + o.v_values,
            window: self.window + o.window,
            dense_equivalent: self.dense_equivalent + o.dense_equivalent,
        }
    }
}

/// Bytes per compressed token row in the long run: `head_dim / 8` bitmap bytes plus `keep`
/// values. (A stream rounds its bitmap up to whole words once, not per token.)
pub fn compressed_bytes_per_row(head_dim: HeadDim, keep: usize, value_type: ValueType) -> f64 {
    head_dim.get() as f64 / 8.0 + (keep * value_type.size_bytes()) as f64
}

/// Bytes per dense token row.
pub fn dense_bytes_per_row(head_dim: HeadDim, value_type: ValueType) -> usize {
    head_dim.get() * value_type.size_bytes()
}

/// `(bitmap, values)` bytes of one stream of `tokens` compressed tokens.
pub fn stream_bytes(
    tokens: usize,
    head_dim: HeadDim,
    keep: usize,
    value_type: ValueType,
) -> (u64, u64) {
    let bitmap = (bitmap_words(tokens, head_dim) * 4) as u64;
    let values = (tokens * keep * value_type.size_bytes()) as u64;
    (bitmap, values)
}

/// Bytes of a whole cache: every layer and KV head of every sequence, K pruned at
/// `k_sparsity` and V at `v_sparsity`.
pub fn kv_bytes(
    shape: &CacheShape,
    sequences: &[SequenceOccupancy],
    k_sparsity: Sparsity,
    v_sparsity: Sparsity,
) -> KvBytes {
    let streams = (shape.layers * shape.kv_heads) as u64;
    let k_keep = keep_count(k_sparsity, shape.head_dim);
    let v_keep = keep_count(v_sparsity, shape.head_dim);
    let row = dense_bytes_per_row(shape.head_dim, shape.value_type) as u64;
    let mut bytes = KvBytes::default();
    for seq in sequences {
        let (kb, kv) = stream_bytes(
            seq.compressed_tokens,
            shape.head_dim,
            k_keep,
            shape.value_type,
        );
        let (vb, vv) = stream_bytes(
            seq.compressed_tokens,
            shape.head_dim,
            v_keep,
            shape.value_type,
        );
        let tokens = (seq.compressed_tokens + seq.window_tokens) as u64;
        bytes = bytes
            + KvBytes {
                k_bitmap: kb * streams,
                k_values: kv * streams,
                v_bitmap: vb * streams,
                v_values: vv * streams,
                window: 2 * seq.window_tokens as u64 * row * streams,
                dense_equivalent: 2 * tokens * row * streams,
            };
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_head_dim_128() -> crate::Result<()> {
        let d = HeadDim::new(128)?;
        let f16 = ValueType::F16;
        assert_eq!(compressed_bytes_per_row(d, 38, f16), 92.0);
        assert_eq!(compressed_bytes_per_row(d, 64, f16), 144.0);
        assert_eq!(dense_bytes_per_row(d, f16), 256);
        Ok(())
    }

    #[test]
    fn cache_totals_add_up() -> crate::Result<()> {
        let shape = CacheShape {
            layers: 2,
            kv_heads: 3,
            head_dim: HeadDim::new(8)?,
            value_type: ValueType::F32,
        };
        let seqs = [
            SequenceOccupancy::steady_state(10, 4),
            SequenceOccupancy::steady_state(3, 4),
        ];
        let s = Sparsity::new(0.7)?; // keep 2 of 8
        let b = kv_bytes(&shape, &seqs, s, Sparsity::DENSE);
        // Sequence 0: 6 compressed tokens -> 48 bits -> 2 words = 8 bytes per stream.
        assert_eq!(b.k_bitmap, 8 * 6);
        assert_eq!(b.k_values, 6 * 2 * 4 * 6);
        assert_eq!(b.v_values, 6 * 8 * 4 * 6);
        assert_eq!(b.window, 2 * (4 + 3) * 32 * 6);
        assert_eq!(b.dense_equivalent, 2 * 13 * 32 * 6);
        Ok(())
    }
}
