//! Where each bit and value of a compressed stream lives.
//!
//! A *stream* holds the compressed tokens of one (sequence, KV head) for K or for V. Its bitmap
//! is one contiguous bit string in `u32` words: element `j` of token `t` is bit
//! `(t * head_dim + j) % 32` of word `(t * head_dim + j) / 32`. For `head_dim >= 32` a token
//! owns `head_dim / 32` whole words (bit `j % 32` of word `j / 32` of its row); narrower rows
//! share a word (four tokens per word at `head_dim = 8`, two at 16), with no padding. Its
//! values are the kept elements of each token in index order, token after token, exactly
//! `keep` per token, so token `t`'s values start at `t * keep`. See docs/FORMAT.md.

use crate::params::HeadDim;

/// Bits in one bitmap word.
pub const WORD_BITS: usize = 32;

/// Stream capacities (in tokens) are rounded up to a multiple of this, so that every stream
/// of a pooled buffer starts on a 16-byte boundary for 2-byte values (32 bytes for f32) and
/// on a whole bitmap word. Vectorised loads need that alignment; it costs no bytes per token.
pub const STREAM_TOKEN_ALIGNMENT: usize = 8;

/// Bitmap words that `tokens` compressed tokens occupy.
pub fn bitmap_words(tokens: usize, head_dim: HeadDim) -> usize {
    (tokens * head_dim.get()).div_ceil(WORD_BITS)
}

/// `(word, bit)` of element `j` of token `t`.
pub fn bit_position(token: usize, element: usize, head_dim: HeadDim) -> (usize, u32) {
    let bit = token * head_dim.get() + element;
    (bit / WORD_BITS, (bit % WORD_BITS) as u32)
}

/// Index of the first value of token `t` in its stream.
pub fn value_offset(token: usize, keep: usize) -> usize {
    token * keep
}

/// A capacity of at least `tokens`, rounded up to [`STREAM_TOKEN_ALIGNMENT`].
pub fn aligned_capacity(tokens: usize) -> usize {
    tokens.div_ceil(STREAM_TOKEN_ALIGNMENT) * STREAM_TOKEN_ALIGNMENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_rows_share_words_and_wide_rows_own_them() -> crate::Result<()> {
        let d8 = HeadDim::new(8)?;
        assert_eq!(bit_position(0, 7, d8), (0, 7));
        assert_eq!(bit_position(3, 0, d8), (0, 24));
        assert_eq!(bit_position(4, 0, d8), (1, 0));
        assert_eq!(bitmap_words(5, d8), 2);
        let d128 = HeadDim::new(128)?;
        assert_eq!(bit_position(2, 33, d128), (9, 1));
        assert_eq!(bitmap_words(3, d128), 12);
        assert_eq!(aligned_capacity(9), 16);
        assert_eq!(aligned_capacity(0), 0);
        Ok(())
    }
}
