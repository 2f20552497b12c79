//! Validated parameters: sparsity, head dimension, value type, and the keep-count rule.

use crate::error::{FormatError, Result};

/// Fraction of each row's elements that pruning drops, validated to lie in `[0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Sparsity(f64);

impl Sparsity {
    /// No pruning at all: every element is kept.
    pub const DENSE: Sparsity = Sparsity(0.0);

    /// Validates `s`: it must be finite and in `[0, 1)`.
    pub fn new(s: f64) -> Result<Self> {
        if s.is_finite() && (0.0..1.0).contains(&s) {
            Ok(Sparsity(s))
        } else {
            Err(FormatError::InvalidSparsity(s))
        }
    }

    /// The fraction as a number.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// A head dimension the format supports: a power of two from 8 to 256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeadDim(usize);

impl HeadDim {
    /// Smallest supported head dimension.
    pub const MIN: usize = 8;
    /// Largest supported head dimension.
    pub const MAX: usize = 256;

    /// Validates `d`.
    pub fn new(d: usize) -> Result<Self> {
        if d.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&d) {
            Ok(HeadDim(d))
        } else {
            Err(FormatError::UnsupportedHeadDim(d))
        }
    }

    /// The dimension as a number.
    pub fn get(self) -> usize {
        self.0
    }
}

/// The shape of a prompt's causal self-attention (prefill), validated: `batch` sequences of
/// `tokens` query tokens each, `q_heads` query heads served by `kv_heads` KV heads,
/// `q_heads / kv_heads` consecutive query heads per KV head (grouped-query attention).
/// The keys are the `past` tokens before the queries (a chunk of a prompt that goes in
/// piece by piece sees everything before it) and the query tokens themselves: `context =
/// past + tokens` per sequence, query token `t` seeing keys `0..=past + t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PromptShape {
    batch: usize,
    tokens: usize,
    past: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: HeadDim,
}

impl PromptShape {
    /// Validates the shape: at least one sequence, token and KV head, and query heads a
    /// multiple of KV heads.
    pub fn new(
        batch: usize,
        tokens: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: HeadDim,
    ) -> Result<Self> {
        if batch == 0
            || tokens == 0
            || q_heads == 0
            || kv_heads == 0
            || !q_heads.is_multiple_of(kv_heads)
        {
            return Err(FormatError::InvalidArgument(format!(
                "{batch} prompts of {tokens} tokens with {q_heads} query heads over {kv_heads} KV heads: need prompts, tokens, and query heads a non-zero multiple of KV heads"
            )));
        }
        Ok(PromptShape {
            batch,
            tokens,
            past: 0,
            q_heads,
            kv_heads,
            head_dim,
        })
    }

    /// Sequences.
    pub fn batch(self) -> usize {
        self.batch
    }

    /// The same shape with `past` tokens before the queries (0 for a whole prompt); an error
    /// when `past + tokens` does not fit a `usize`.
    pub fn with_past(self, past: usize) -> Result<Self> {
        if past.checked_add(self.tokens).is_none() {
            return Err(FormatError::InvalidArgument(format!(
                "{past} past tokens before {} queries overflow a usize",
                self.tokens
            )));
        }
        Ok(PromptShape { past, ..self })
    }

    /// Query tokens per sequence.
    pub fn tokens(self) -> usize {
        self.tokens
    }

    /// Tokens before the queries that they also see.
    pub fn past(self) -> usize {
        self.past
    }

    /// Key (and value) tokens per sequence: `past + tokens`.
    pub fn context(self) -> usize {
        self.past + self.tokens
    }

    /// Query heads.
    pub fn q_heads(self) -> usize {
        self.q_heads
    }

    /// KV heads.
    pub fn kv_heads(self) -> usize {
        self.kv_heads
    }

    /// Query heads per KV head.
    pub fn group(self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// Elements per head.
    pub fn head_dim(self) -> HeadDim {
        self.head_dim
    }
}

/// Element type of the stored values (the bitmap is always `u32` words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl ValueType {
    /// Bytes per stored value.
    pub fn size_bytes(self) -> usize {
        match self {
            ValueType::F32 => 4,
            ValueType::F16 | ValueType::BF16 => 2,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            ValueType::F32 => "f32",
            ValueType::F16 => "f16",
            ValueType::BF16 => "bf16",
        }
    }
}

impl std::str::FromStr for ValueType {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(ValueType::F32),
            "f16" | "float16" | "half" => Ok(ValueType::F16),
            "bf16" | "bfloat16" => Ok(ValueType::BF16),
            other => Err(FormatError::InvalidArgument(format!(
                "unknown value type '{other}': expected f32, f16 or bf16"
            ))),
        }
    }
}

/// How many of `n` elements survive pruning at sparsity `s`: `round((1 - s) * n)` (halves
/// away from zero, computed in f64), clamped to `[1, n]`. `n` must be at least 1.
///
/// This is the rule for a whole row (`n = head_dim`) and, in the per-channel strategies, for
/// a group of tokens. At least one element always survives, so no row is ever empty.
pub fn keep_count_of(s: Sparsity, n: usize) -> usize {
    let k = ((1.0 - s.get()) * n as f64).round() as usize;
    k.clamp(1, n.max(1))
}

/// Kept elements per row: [`keep_count_of`] applied to the head dimension.
pub fn keep_count(s: Sparsity, head_dim: HeadDim) -> usize {
    keep_count_of(s, head_dim.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_counts_of_the_worked_examples() -> Result<()> {
        let d128 = HeadDim::new(128)?;
        assert_eq!(keep_count(Sparsity::new(0.7)?, d128), 38);
        assert_eq!(keep_count(Sparsity::new(0.5)?, d128), 64);
        assert_eq!(keep_count(Sparsity::DENSE, d128), 128);
        assert_eq!(keep_count(Sparsity::new(0.7)?, HeadDim::new(8)?), 2);
        assert_eq!(keep_count(Sparsity::new(0.7)?, HeadDim::new(16)?), 5);
        assert_eq!(keep_count(Sparsity::new(0.99)?, HeadDim::new(8)?), 1);
        Ok(())
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        for s in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                Sparsity::new(s),
                Err(FormatError::InvalidSparsity(_))
            ));
        }
        for d in [0, 4, 12, 96, 512] {
            assert_eq!(HeadDim::new(d), Err(FormatError::UnsupportedHeadDim(d)));
        }
    }

    #[test]
    fn prompt_shapes_are_validated() -> Result<()> {
        let d = HeadDim::new(128)?;
        let shape = PromptShape::new(2, 100, 32, 8, d)?;
        assert_eq!(
            (
                shape.batch(),
                shape.tokens(),
                shape.q_heads(),
                shape.kv_heads()
            ),
            (2, 100, 32, 8)
        );
        assert_eq!((shape.group(), shape.head_dim()), (4, d));
        assert_eq!((shape.past(), shape.context()), (0, 100));
        let chunk = shape.with_past(28)?;
        assert!(shape.with_past(usize::MAX).is_err());
        assert_eq!(
            (chunk.tokens(), chunk.past(), chunk.context()),
            (100, 28, 128)
        );
        // No prompts, no tokens, no heads, or query heads that KV heads do not divide.
        for (b, n, q, kv) in [
            (0, 1, 4, 2),
            (1, 0, 4, 2),
            (1, 1, 0, 2),
            (1, 1, 4, 0),
            (1, 1, 6, 4),
        ] {
            assert!(
                matches!(
                    PromptShape::new(b, n, q, kv, d),
                    Err(FormatError::InvalidArgument(_))
                ),
                "{b} x {n}, {q} / {kv} heads"
            );
        }
        Ok(())
    }
}
