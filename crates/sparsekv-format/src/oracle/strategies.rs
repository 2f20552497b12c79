//! The pruning strategies the paper compared, as masks over dense `[tokens, head_dim]` blocks.
//!
//! Only per-token magnitude has a compressed representation (the format); the others are
//! simulations: the accuracy harness zeroes the pruned elements and attends densely. Every
//! strategy ranks elements by a score (NaN first, ties to the lower index, as in
//! [`magnitude_rank`]) and keeps the top ones within a row, a channel group or a channel set:
//!
//! | strategy | score of element (t, c) | kept |
//! |---|---|---|
//! | per-token magnitude | `abs(x[t,c])` | top `keep_count(s, d)` of each row |
//! | per-token output-aware, keys | `abs(q̄_c · K[t,c])` | top `keep_count(s, d)` of each row |
//! | per-token output-aware, values | `a_t · abs(V[t,c])` | top `keep_count(s, d)` of each row |
//! | per-channel magnitude | `abs(x[t,c])` | per channel, per group of `g` tokens, top `keep_count(s, g)` |
//! | per-channel output-aware | as the per-token output-aware scores | as per-channel magnitude |
//! | ThinK (keys) | channel score `mean_q(q_c²) · mean_t(K[t,c]²)` | top `d − floor(s·d)` channels, all tokens |
//!
//! `q̄_c` = Σ over the GQA group's query heads of the mean `|q_c|` over recent queries
//! ([`key_channel_weights`]); `a_t` = attention mass token `t` received from recent queries
//! ([`attention_mass`]). Two consequences follow from the formulas and hold in the code: per
//! token, `a_t` is one positive factor for the whole row, so output-aware value pruning keeps
//! the same set as magnitude pruning (unless `a_t = 0`); per channel, `q̄_c` is one factor for
//! the whole channel, so per-channel output-aware key pruning equals per-channel magnitude.

use crate::error::{FormatError, Result};
use crate::oracle::prune::{DenseBlock, magnitude_rank, top_k_mask};
use crate::params::{Sparsity, keep_count, keep_count_of};

/// Which elements of a `[tokens, head_dim]` block a strategy keeps, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    tokens: usize,
    head_dim: usize,
    kept: Vec<bool>,
}

impl Mask {
    /// Whether element `c` of token `t` is kept.
    pub fn is_kept(&self, t: usize, c: usize) -> bool {
        self.kept[t * self.head_dim + c]
    }

    /// The mask, row-major.
    pub fn as_slice(&self) -> &[bool] {
        &self.kept
    }

    /// Kept elements in all.
    pub fn kept_count(&self) -> usize {
        self.kept.iter().filter(|&&k| k).count()
    }

    /// `block` with the pruned elements set to zero.
    pub fn apply(&self, block: &DenseBlock) -> Result<DenseBlock> {
        if block.tokens() != self.tokens || block.head_dim().get() != self.head_dim {
            return Err(FormatError::InvalidArgument(format!(
                "mask is [{}, {}] but block is [{}, {}]",
                self.tokens,
                self.head_dim,
                block.tokens(),
                block.head_dim().get()
            )));
        }
        let data = block
            .data()
            .iter()
            .zip(&self.kept)
            .map(|(&x, &k)| if k { x } else { 0.0 })
            .collect();
        DenseBlock::new(data, self.tokens, block.head_dim())
    }
}

/// Score of every element of `block` under `score(t, c, x)`.
fn scores(block: &DenseBlock, score: impl Fn(usize, usize, f64) -> f64) -> Vec<f64> {
    let d = block.head_dim().get();
    block
        .data()
        .iter()
        .enumerate()
        .map(|(i, &x)| score(i / d, i % d, x))
        .collect()
}

/// Keeps the top `keep` of each row.
fn per_row(block: &DenseBlock, scores: &[f64], keep: usize) -> Mask {
    let d = block.head_dim().get();
    let kept = scores
        .chunks(d)
        .flat_map(|row| top_k_mask(row, keep, magnitude_rank))
        .collect();
    Mask {
        tokens: block.tokens(),
        head_dim: d,
        kept,
    }
}

/// Within consecutive groups of `group` tokens (the last may be shorter), keeps the top
/// `keep_count(s, group length)` tokens of each channel.
fn per_channel(block: &DenseBlock, scores: &[f64], s: Sparsity, group: usize) -> Result<Mask> {
    if group == 0 {
        return Err(FormatError::InvalidArgument(
            "channel group size must be at least 1".into(),
        ));
    }
    let (tokens, d) = (block.tokens(), block.head_dim().get());
    let mut kept = vec![false; tokens * d];
    for start in (0..tokens).step_by(group) {
        let len = group.min(tokens - start);
        let keep = keep_count_of(s, len);
        for c in 0..d {
            let column: Vec<f64> = (start..start + len).map(|t| scores[t * d + c]).collect();
            for (i, k) in top_k_mask(&column, keep, magnitude_rank)
                .into_iter()
                .enumerate()
            {
                kept[(start + i) * d + c] = k;
            }
        }
    }
    Ok(Mask {
        tokens,
        head_dim: d,
        kept,
    })
}

fn check_len(what: &'static str, v: &[f64], expected: usize) -> Result<()> {
    if v.len() == expected {
        Ok(())
    } else {
        Err(FormatError::ShapeMismatch {
            what,
            expected,
            actual: v.len(),
        })
    }
}

/// `q̄_c`: for queries `[recent, group, head_dim]` (row-major), the sum over the group's heads
/// of the mean `|q_c|` over the recent steps.
pub fn key_channel_weights(
    queries: &[f64],
    recent: usize,
    group: usize,
    head_dim: usize,
) -> Result<Vec<f64>> {
    if recent == 0 || group == 0 || head_dim == 0 {
        return Err(FormatError::Empty("recent queries"));
    }
    check_len("recent queries", queries, recent * group * head_dim)?;
    let mut w = vec![0.0; head_dim];
    for (i, q) in queries.iter().enumerate() {
        w[i % head_dim] += q.abs() / recent as f64;
    }
    Ok(w)
}

/// `a_t`: the attention mass each token of `keys` receives, summed over the query rows
/// `queries` (`[rows, head_dim]`, each row one query of the group at one recent step), with
/// the softmax scale `1 / sqrt(head_dim)`.
pub fn attention_mass(queries: &[f64], keys: &DenseBlock) -> Result<Vec<f64>> {
    let d = keys.head_dim().get();
    if queries.is_empty() || !queries.len().is_multiple_of(d) {
        return Err(FormatError::InvalidArgument(format!(
            "queries must be a non-empty multiple of head_dim {d}, got {} values",
            queries.len()
        )));
    }
    let scale = 1.0 / (d as f64).sqrt();
    let mut mass = vec![0.0; keys.tokens()];
    for q in queries.chunks(d) {
        let s: Vec<f64> = (0..keys.tokens())
            .map(|t| q.iter().zip(keys.row(t)).map(|(a, b)| a * b).sum::<f64>() * scale)
            .collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = e.iter().sum();
        for (m, x) in mass.iter_mut().zip(e) {
            *m += x / total;
        }
    }
    Ok(mass)
}

/// Per-token magnitude: the format's own rule, as a mask.
pub fn per_token_magnitude(block: &DenseBlock, s: Sparsity) -> Mask {
    per_row(
        block,
        &scores(block, |_, _, x| x),
        keep_count(s, block.head_dim()),
    )
}

/// Per-token output-aware keys: each row keeps its top `|q̄_c · K[t,c]|`.
pub fn per_token_output_aware_keys(keys: &DenseBlock, q_bar: &[f64], s: Sparsity) -> Result<Mask> {
    check_len("key channel weights", q_bar, keys.head_dim().get())?;
    let sc = scores(keys, |_, c, x| (q_bar[c] * x).abs());
    Ok(per_row(keys, &sc, keep_count(s, keys.head_dim())))
}

/// Per-token output-aware values: each row keeps its top `a_t · |V[t,c]|`.
pub fn per_token_output_aware_values(
    values: &DenseBlock,
    mass: &[f64],
    s: Sparsity,
) -> Result<Mask> {
    check_len("attention mass", mass, values.tokens())?;
    let sc = scores(values, |t, _, x| mass[t] * x.abs());
    Ok(per_row(values, &sc, keep_count(s, values.head_dim())))
}

/// Per-channel magnitude over groups of `group` tokens.
pub fn per_channel_magnitude(block: &DenseBlock, s: Sparsity, group: usize) -> Result<Mask> {
    per_channel(block, &scores(block, |_, _, x| x), s, group)
}

/// Per-channel output-aware keys (score `|q̄_c · K[t,c]|`) over groups of `group` tokens.
pub fn per_channel_output_aware_keys(
    keys: &DenseBlock,
    q_bar: &[f64],
    s: Sparsity,
    group: usize,
) -> Result<Mask> {
    check_len("key channel weights", q_bar, keys.head_dim().get())?;
    per_channel(
        keys,
        &scores(keys, |_, c, x| (q_bar[c] * x).abs()),
        s,
        group,
    )
}

/// Per-channel output-aware values (score `a_t · |V[t,c]|`) over groups of `group` tokens.
pub fn per_channel_output_aware_values(
    values: &DenseBlock,
    mass: &[f64],
    s: Sparsity,
    group: usize,
) -> Result<Mask> {
    check_len("attention mass", mass, values.tokens())?;
    per_channel(
        values,
        &scores(values, |t, _, x| mass[t] * x.abs()),
        s,
        group,
    )
}

/// ThinK-style structured key pruning: drops the `floor(s · d)` channels with the lowest
/// `mean(q_c²) · mean_t(K[t,c]²)` (queries `[rows, head_dim]`), for every token.
pub fn think_keys(keys: &DenseBlock, queries: &[f64], s: Sparsity) -> Result<Mask> {
    let (tokens, d) = (keys.tokens(), keys.head_dim().get());
    if queries.is_empty() || !queries.len().is_multiple_of(d) {
        return Err(FormatError::InvalidArgument(format!(
            "queries must be a non-empty multiple of head_dim {d}, got {} values",
            queries.len()
        )));
    }
    if tokens == 0 {
        return Ok(Mask {
            tokens,
            head_dim: d,
            kept: Vec::new(),
        });
    }
    let rows = (queries.len() / d) as f64;
    let channel_score: Vec<f64> = (0..d)
        .map(|c| {
            let q2 = queries
                .iter()
                .skip(c)
                .step_by(d)
                .map(|q| q * q)
                .sum::<f64>()
                / rows;
            let k2 = (0..tokens).map(|t| keys.row(t)[c].powi(2)).sum::<f64>() / tokens as f64;
            q2 * k2
        })
        .collect();
    let drop = (s.get() * d as f64).floor() as usize;
    let channels = top_k_mask(&channel_score, d - drop.min(d - 1), magnitude_rank);
    let kept = (0..tokens).flat_map(|_| channels.iter().copied()).collect();
    Ok(Mask {
        tokens,
        head_dim: d,
        kept,
    })
}
