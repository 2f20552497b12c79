//! Per-token magnitude pruning and the compressed block, in f64.

use std::cmp::Ordering;

use crate::error::{FormatError, Result};
use crate::layout::{bit_position, bitmap_words};
use crate::params::{HeadDim, Sparsity, keep_count};

/// Orders two elements by pruning priority: `Greater` means `a` ranks above `b`.
///
/// Magnitude `|x|` decides; NaN ranks above every number (including ±Inf) so that a NaN in
/// the cache is kept and shows up in the attention output instead of being silently dropped;
/// all NaNs rank equal. Equal ranks are broken by the caller by lower index.
pub fn magnitude_rank(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.abs().partial_cmp(&b.abs()).unwrap_or(Ordering::Equal),
    }
}

/// The `keep` elements of `scores` that rank highest under `rank`, ties going to the lower
/// index, as a mask. `keep` larger than the row keeps everything.
pub fn top_k_mask(scores: &[f64], keep: usize, rank: impl Fn(f64, f64) -> Ordering) -> Vec<bool> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable sort by descending rank keeps equal ranks in ascending index order.
    order.sort_by(|&i, &j| rank(scores[j], scores[i]));
    let mut mask = vec![false; scores.len()];
    for &i in order.iter().take(keep) {
        mask[i] = true;
    }
    mask
}

/// Which elements of one token row survive per-token magnitude pruning keeping `keep`.
pub fn magnitude_keep_mask(row: &[f64], keep: usize) -> Vec<bool> {
    top_k_mask(row, keep, magnitude_rank)
}

/// A dense `[tokens, head_dim]` block, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseBlock {
    head_dim: HeadDim,
    tokens: usize,
    data: Vec<f64>,
}

impl DenseBlock {
    /// Wraps `data`, which must hold `tokens * head_dim` values.
    pub fn new(data: Vec<f64>, tokens: usize, head_dim: HeadDim) -> Result<Self> {
        let expected = tokens * head_dim.get();
        if data.len() != expected {
            return Err(FormatError::ShapeMismatch {
                what: "dense block",
                expected,
                actual: data.len(),
            });
        }
        Ok(DenseBlock {
            head_dim,
            tokens,
            data,
        })
    }

    /// An empty block (no tokens).
    pub fn empty(head_dim: HeadDim) -> Self {
        DenseBlock {
            head_dim,
            tokens: 0,
            data: Vec::new(),
        }
    }

    /// Elements per row.
    pub fn head_dim(&self) -> HeadDim {
        self.head_dim
    }

    /// Number of token rows.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Row `t` (panics if out of range: callers iterate `0..tokens()`).
    pub fn row(&self, t: usize) -> &[f64] {
        let d = self.head_dim.get();
        &self.data[t * d..(t + 1) * d]
    }

    /// All values, row-major.
    pub fn data(&self) -> &[f64] {
        &self.data
    }

    /// Consumes the block, returning its values.
    pub fn into_data(self) -> Vec<f64> {
        self.data
    }
}

/// A compressed block of tokens: the bitmap bit string and the packed kept values, exactly as
/// one stream of the format stores them (values in f64 here).
#[derive(Debug, Clone, PartialEq)]
pub struct CompressedBlock {
    head_dim: HeadDim,
    keep: usize,
    tokens: usize,
    bitmap: Vec<u32>,
    values: Vec<f64>,
}

impl CompressedBlock {
    /// Checks and wraps parts produced elsewhere (for example read back from a GPU): the
    /// lengths must match, and every token row must have exactly `keep` bits set.
    pub fn from_parts(
        bitmap: Vec<u32>,
        values: Vec<f64>,
        tokens: usize,
        head_dim: HeadDim,
        keep: usize,
    ) -> Result<Self> {
        if keep == 0 || keep > head_dim.get() {
            return Err(FormatError::InvalidArgument(format!(
                "keep count {keep} must be in 1..={}",
                head_dim.get()
            )));
        }
        let words = bitmap_words(tokens, head_dim);
        if bitmap.len() != words {
            return Err(FormatError::ShapeMismatch {
                what: "bitmap words",
                expected: words,
                actual: bitmap.len(),
            });
        }
        if values.len() != tokens * keep {
            return Err(FormatError::ShapeMismatch {
                what: "packed values",
                expected: tokens * keep,
                actual: values.len(),
            });
        }
        let block = CompressedBlock {
            head_dim,
            keep,
            tokens,
            bitmap,
            values,
        };
        for t in 0..tokens {
            let set = (0..head_dim.get()).filter(|&j| block.is_kept(t, j)).count();
            if set != keep {
                return Err(FormatError::InvalidArgument(format!(
                    "token {t} has {set} bitmap bits set, expected {keep}"
                )));
            }
        }
        Ok(block)
    }

    /// Elements per row.
    pub fn head_dim(&self) -> HeadDim {
        self.head_dim
    }

    /// Kept values per row.
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Number of token rows.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The bitmap words.
    pub fn bitmap(&self) -> &[u32] {
        &self.bitmap
    }

    /// The packed values, `keep` per token.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Whether element `j` of token `t` is stored.
    pub fn is_kept(&self, t: usize, j: usize) -> bool {
        let (word, bit) = bit_position(t, j, self.head_dim);
        self.bitmap[word] >> bit & 1 == 1
    }

    /// Token `t`'s stored `(element index, value)` pairs, in index order.
    pub fn row_entries(&self, t: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
        let values = &self.values[t * self.keep..(t + 1) * self.keep];
        (0..self.head_dim.get())
            .filter(move |&j| self.is_kept(t, j))
            .zip(values.iter().copied())
    }

    /// The dense block with pruned elements set to zero.
    pub fn decompress(&self) -> DenseBlock {
        let d = self.head_dim.get();
        let mut data = vec![0.0; self.tokens * d];
        for t in 0..self.tokens {
            for (j, v) in self.row_entries(t) {
                data[t * d + j] = v;
            }
        }
        DenseBlock {
            head_dim: self.head_dim,
            tokens: self.tokens,
            data,
        }
    }
}

/// Prunes every row of `block` by magnitude, keeping `keep_count(sparsity, head_dim)`
/// elements per row, and packs the result.
pub fn compress(block: &DenseBlock, sparsity: Sparsity) -> CompressedBlock {
    compress_keep(block, keep_count(sparsity, block.head_dim))
}

/// [`compress`] with an explicit keep count (clamped to `1..=head_dim`).
pub fn compress_keep(block: &DenseBlock, keep: usize) -> CompressedBlock {
    let d = block.head_dim;
    let keep = keep.clamp(1, d.get());
    let mut bitmap = vec![0u32; bitmap_words(block.tokens, d)];
    let mut values = Vec::with_capacity(block.tokens * keep);
    for t in 0..block.tokens {
        let row = block.row(t);
        for (j, kept) in magnitude_keep_mask(row, keep).into_iter().enumerate() {
            if kept {
                let (word, bit) = bit_position(t, j, d);
                bitmap[word] |= 1 << bit;
                values.push(row[j]);
            }
        }
    }
    CompressedBlock {
        head_dim: d,
        keep,
        tokens: block.tokens,
        bitmap,
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_lower_index_and_nan_is_kept_first() {
        assert_eq!(
            magnitude_keep_mask(&[1.0, -1.0, 1.0, 0.5], 2),
            [true, true, false, false]
        );
        assert_eq!(
            magnitude_keep_mask(&[0.0, f64::NAN, f64::INFINITY, -3.0], 2),
            [false, true, true, false]
        );
        assert_eq!(
            magnitude_keep_mask(&[-0.0, 0.0, 0.0, 0.0], 1),
            [true, false, false, false]
        );
    }

    #[test]
    fn narrow_rows_pack_into_shared_words() -> Result<()> {
        let d = HeadDim::new(8)?;
        let data: Vec<f64> = (0..40).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
        let block = DenseBlock::new(data, 5, d)?;
        let c = compress_keep(&block, 3);
        assert_eq!(c.bitmap().len(), 2);
        assert_eq!(c.values().len(), 15);
        let again = CompressedBlock::from_parts(c.bitmap().to_vec(), c.values().to_vec(), 5, d, 3)?;
        assert_eq!(again, c);
        Ok(())
    }

    #[test]
    fn from_parts_rejects_wrong_bit_counts() -> Result<()> {
        let d = HeadDim::new(8)?;
        let err = CompressedBlock::from_parts(vec![0b111], vec![1.0, 2.0], 1, d, 2);
        assert!(matches!(err, Err(FormatError::InvalidArgument(_))));
        Ok(())
    }
}
