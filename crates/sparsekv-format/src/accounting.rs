//! Byte accounting: what a cache occupies in the compressed format and what the same tokens
//! would occupy dense. Every byte a stream uses is counted (bitmap words, including the
//! partial last word, and values); allocation slack from capacity rounding is not.

use crate::layout::WORD_BITS;
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

/// `(bitmap, values)` bytes of one stream of `tokens` compressed tokens (whole 32-bit bitmap
/// words, as [`bitmap_words`](crate::layout::bitmap_words) counts them), `None` if a count does
/// not fit in 64 bits.
pub fn stream_bytes(
    tokens: usize,
    head_dim: HeadDim,
    keep: usize,
    value_type: ValueType,
) -> Option<(u64, u64)> {
    let tokens = tokens as u64;
    let bitmap = tokens
        .checked_mul(head_dim.get() as u64)?
        .div_ceil(WORD_BITS as u64)
        .checked_mul(4)?;
    let values = tokens
        .checked_mul(keep as u64)?
        .checked_mul(value_type.size_bytes() as u64)?;
    Some((bitmap, values))
}

/// Bytes of one sequence of a cache (every layer and KV head) with checked arithmetic: `None`
/// if a count does not fit in 64 bits.
fn sequence_bytes(
    shape: &CacheShape,
    seq: &SequenceOccupancy,
    k_keep: usize,
    v_keep: usize,
) -> Option<KvBytes> {
    let streams = (shape.layers as u64).checked_mul(shape.kv_heads as u64)?;
    let row = dense_bytes_per_row(shape.head_dim, shape.value_type) as u64;
    let tokens = (seq.compressed_tokens as u64).checked_add(seq.window_tokens as u64)?;
    let stream = |keep| {
        stream_bytes(
            seq.compressed_tokens,
            shape.head_dim,
            keep,
            shape.value_type,
        )
    };
    let ((k_bitmap, k_values), (v_bitmap, v_values)) = (stream(k_keep)?, stream(v_keep)?);
    let per_stream = |bytes: u64| bytes.checked_mul(streams);
    Some(KvBytes {
        k_bitmap: per_stream(k_bitmap)?,
        k_values: per_stream(k_values)?,
        v_bitmap: per_stream(v_bitmap)?,
        v_values: per_stream(v_values)?,
        window: per_stream((seq.window_tokens as u64).checked_mul(2 * row)?)?,
        dense_equivalent: per_stream(tokens.checked_mul(2 * row)?)?,
    })
}

impl KvBytes {
    /// `self + o`, `None` on overflow.
    pub fn checked_add(self, o: KvBytes) -> Option<KvBytes> {
        Some(KvBytes {
            k_bitmap: self.k_bitmap.checked_add(o.k_bitmap)?,
            k_values: self.k_values.checked_add(o.k_values)?,
            v_bitmap: self.v_bitmap.checked_add(o.v_bitmap)?,
            v_values: self.v_values.checked_add(o.v_values)?,
            window: self.window.checked_add(o.window)?,
            dense_equivalent: self.dense_equivalent.checked_add(o.dense_equivalent)?,
        })
    }

    /// Every count times `n`, `None` on overflow (of a count or of the total).
    pub fn checked_mul(self, n: u64) -> Option<KvBytes> {
        Some(KvBytes {
            k_bitmap: self.k_bitmap.checked_mul(n)?,
            k_values: self.k_values.checked_mul(n)?,
            v_bitmap: self.v_bitmap.checked_mul(n)?,
            v_values: self.v_values.checked_mul(n)?,
            window: self.window.checked_mul(n)?,
            dense_equivalent: self.dense_equivalent.checked_mul(n)?,
        })
        .filter(|b| b.checked_total().is_some())
    }

    /// [`KvBytes::total`], `None` on overflow.
    pub fn checked_total(&self) -> Option<u64> {
        self.k_bitmap
            .checked_add(self.k_values)?
            .checked_add(self.v_bitmap)?
            .checked_add(self.v_values)?
            .checked_add(self.window)
    }
}

/// Bytes of a whole cache: every layer and KV head of every sequence, K pruned at
/// `k_sparsity` and V at `v_sparsity`. For caches that exist in memory; counts that do not fit
/// in 64 bits saturate (use [`uniform_kv_bytes`] to plan a cache, which reports them).
pub fn kv_bytes(
    shape: &CacheShape,
    sequences: &[SequenceOccupancy],
    k_sparsity: Sparsity,
    v_sparsity: Sparsity,
) -> KvBytes {
    let k_keep = keep_count(k_sparsity, shape.head_dim);
    let v_keep = keep_count(v_sparsity, shape.head_dim);
    let saturated = KvBytes {
        k_bitmap: u64::MAX,
        k_values: u64::MAX,
        v_bitmap: u64::MAX,
        v_values: u64::MAX,
        window: u64::MAX,
        dense_equivalent: u64::MAX,
    };
    sequences
        .iter()
        .try_fold(KvBytes::default(), |sum, seq| {
            sum.checked_add(sequence_bytes(shape, seq, k_keep, v_keep)?)
        })
        .unwrap_or(saturated)
}

/// Bytes of a planned cache of `sequences` identical sequences (every layer and KV head), with
/// checked arithmetic and without a per-sequence list, so any batch size can be asked about:
/// an error if a count (the total included) does not fit in 64 bits.
pub fn uniform_kv_bytes(
    shape: &CacheShape,
    sequences: u64,
    occupancy: SequenceOccupancy,
    k_sparsity: Sparsity,
    v_sparsity: Sparsity,
) -> crate::Result<KvBytes> {
    let k_keep = keep_count(k_sparsity, shape.head_dim);
    let v_keep = keep_count(v_sparsity, shape.head_dim);
    sequence_bytes(shape, &occupancy, k_keep, v_keep)
        .and_then(|b| b.checked_mul(sequences))
        .ok_or_else(|| {
            crate::FormatError::InvalidArgument(format!(
                "{sequences} sequence(s) of {} tokens with {} layers x {} KV heads: the byte count does not fit in 64 bits",
                occupancy.compressed_tokens as u128 + occupancy.window_tokens as u128,
                shape.layers,
                shape.kv_heads
            ))
        })
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

    #[test]
    fn uniform_bytes_scale_without_a_list_and_report_overflow() -> crate::Result<()> {
        let shape = CacheShape {
            layers: 32,
            kv_heads: 8,
            head_dim: HeadDim::new(128)?,
            value_type: ValueType::F16,
        };
        let s = Sparsity::new(0.7)?;
        let one = SequenceOccupancy::steady_state(32768, 32);
        let listed = kv_bytes(&shape, &[one; 3], s, s);
        assert_eq!(uniform_kv_bytes(&shape, 3, one, s, s)?, listed);
        // A trillion sequences is only a multiplication (no list is allocated) ...
        let many = uniform_kv_bytes(&shape, 1_000_000, one, s, s)?;
        assert_eq!(
            many.total(),
            1_000_000 * uniform_kv_bytes(&shape, 1, one, s, s)?.total()
        );
        assert!(uniform_kv_bytes(&shape, 1_000_000_000_000, one, s, s).is_err());
        // ... and token counts whose bytes do not fit in 64 bits are an error, not a wrap.
        let huge = SequenceOccupancy::steady_state(1 << 62, 32);
        assert!(uniform_kv_bytes(&shape, 1, huge, s, s).is_err());
        Ok(())
    }
}
