//! Single-query (decode) attention in f64: over a compressed segment plus a dense window, and
//! plain dense attention to check it against.
//!
//! Shapes: queries `[batch, q_heads, head_dim]` row-major; per sequence one cache entry per KV
//! head; query head `h` attends to KV head `h / (q_heads / kv_heads)` (grouped-query
//! attention); scores are scaled by `1 / sqrt(head_dim)`; the softmax runs over the segment's
//! tokens followed by the window's. Output `[batch, q_heads, head_dim]`.

use crate::error::{FormatError, Result};
use crate::oracle::prune::{CompressedBlock, DenseBlock};
use crate::params::{HeadDim, PromptShape};

/// One KV head of one sequence: compressed K and V segments of equal length, then dense K and
/// V windows of equal length (either part may be empty, not both).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadCache {
    /// Compressed keys (older tokens).
    pub k_segment: CompressedBlock,
    /// Compressed values, same tokens as `k_segment`.
    pub v_segment: CompressedBlock,
    /// Dense keys (recent tokens).
    pub k_window: DenseBlock,
    /// Dense values, same tokens as `k_window`.
    pub v_window: DenseBlock,
}

/// Checks the query/cache shapes and returns `(batch, kv_heads, head_dim)`.
fn check_shapes(
    queries: &[f64],
    q_heads: usize,
    kv_heads_per_seq: impl Iterator<Item = usize>,
    head_dims: impl Iterator<Item = HeadDim>,
) -> Result<(usize, usize, HeadDim)> {
    let counts: Vec<usize> = kv_heads_per_seq.collect();
    let batch = counts.len();
    if batch == 0 {
        return Err(FormatError::Empty("batch of sequences"));
    }
    let kv_heads = counts[0];
    if kv_heads == 0 {
        return Err(FormatError::Empty("KV heads of a sequence"));
    }
    if let Some(&bad) = counts.iter().find(|&&c| c != kv_heads) {
        return Err(FormatError::InvalidArgument(format!(
            "sequences disagree on the number of KV heads ({kv_heads} vs {bad})"
        )));
    }
    if q_heads == 0 || !q_heads.is_multiple_of(kv_heads) {
        return Err(FormatError::InvalidArgument(format!(
            "{q_heads} query heads is not a positive multiple of {kv_heads} KV heads"
        )));
    }
    let mut dims = head_dims;
    let Some(d) = dims.next() else {
        return Err(FormatError::Empty("cache"));
    };
    if let Some(other) = dims.find(|&x| x != d) {
        return Err(FormatError::InvalidArgument(format!(
            "cache parts disagree on head_dim ({} vs {})",
            d.get(),
            other.get()
        )));
    }
    let expected = batch * q_heads * d.get();
    if queries.len() != expected {
        return Err(FormatError::ShapeMismatch {
            what: "queries",
            expected,
            actual: queries.len(),
        });
    }
    Ok((batch, kv_heads, d))
}

/// `softmax(scores) · rows`, where `rows(i)` yields row `i` of the values as (index, value)
/// pairs (all elements for dense rows, the kept ones for compressed rows).
fn softmax_weighted_sum<'a, I>(
    scores: &[f64],
    head_dim: usize,
    rows: impl Fn(usize) -> I,
) -> Vec<f64>
where
    I: Iterator<Item = (usize, f64)> + 'a,
{
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0; head_dim];
    for (i, w) in weights.iter().enumerate() {
        for (j, v) in rows(i) {
            out[j] += w / total * v;
        }
    }
    out
}

/// Decode attention over compressed segments plus dense windows, computed straight from the
/// bitmaps and packed values.
pub fn sparse_decode_attention(
    queries: &[f64],
    q_heads: usize,
    cache: &[Vec<HeadCache>],
) -> Result<Vec<f64>> {
    let dims = cache.iter().flatten().flat_map(|h| {
        [
            h.k_segment.head_dim(),
            h.v_segment.head_dim(),
            h.k_window.head_dim(),
            h.v_window.head_dim(),
        ]
    });
    let (_, kv_heads, head_dim) = check_shapes(queries, q_heads, cache.iter().map(Vec::len), dims)?;
    for (b, seq) in cache.iter().enumerate() {
        for (h, head) in seq.iter().enumerate() {
            if head.k_segment.tokens() != head.v_segment.tokens()
                || head.k_window.tokens() != head.v_window.tokens()
            {
                return Err(FormatError::InvalidArgument(format!(
                    "sequence {b}, KV head {h}: K and V hold different numbers of tokens"
                )));
            }
            if head.k_segment.tokens() + head.k_window.tokens() == 0 {
                return Err(FormatError::Empty(
                    "cache of a sequence (attention needs a token)",
                ));
            }
        }
    }
    let d = head_dim.get();
    let group = q_heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Vec::with_capacity(queries.len());
    for (b, seq) in cache.iter().enumerate() {
        for qh in 0..q_heads {
            let head = &seq[qh / group];
            let q = &queries[(b * q_heads + qh) * d..][..d];
            let compressed = head.k_segment.tokens();
            let mut scores = Vec::with_capacity(compressed + head.k_window.tokens());
            for t in 0..compressed {
                scores.push(
                    head.k_segment
                        .row_entries(t)
                        .map(|(j, k)| q[j] * k)
                        .sum::<f64>()
                        * scale,
                );
            }
            for t in 0..head.k_window.tokens() {
                let k = head.k_window.row(t);
                scores.push(q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale);
            }
            let rows = |i: usize| -> Box<dyn Iterator<Item = (usize, f64)> + '_> {
                if i < compressed {
                    Box::new(head.v_segment.row_entries(i))
                } else {
                    Box::new(
                        head.v_window
                            .row(i - compressed)
                            .iter()
                            .copied()
                            .enumerate(),
                    )
                }
            };
            out.extend(softmax_weighted_sum(&scores, d, rows));
        }
    }
    Ok(out)
}

/// Plain decode attention over dense keys and values, `keys[b][h]` / `values[b][h]` being the
/// whole cache of sequence `b`, KV head `h`.
pub fn dense_decode_attention(
    queries: &[f64],
    q_heads: usize,
    keys: &[Vec<DenseBlock>],
    values: &[Vec<DenseBlock>],
) -> Result<Vec<f64>> {
    if keys.len() != values.len() {
        return Err(FormatError::InvalidArgument(format!(
            "{} key sequences but {} value sequences",
            keys.len(),
            values.len()
        )));
    }
    let dims = keys
        .iter()
        .chain(values)
        .flatten()
        .map(DenseBlock::head_dim);
    let (_, kv_heads, head_dim) = check_shapes(queries, q_heads, keys.iter().map(Vec::len), dims)?;
    for (b, (ks, vs)) in keys.iter().zip(values).enumerate() {
        if vs.len() != kv_heads {
            return Err(FormatError::InvalidArgument(format!(
                "sequence {b} has {kv_heads} key heads but {} value heads",
                vs.len()
            )));
        }
        for (k, v) in ks.iter().zip(vs) {
            if k.tokens() != v.tokens() {
                return Err(FormatError::InvalidArgument(format!(
                    "sequence {b}: keys hold {} tokens but values {}",
                    k.tokens(),
                    v.tokens()
                )));
            }
            if k.tokens() == 0 {
                return Err(FormatError::Empty(
                    "cache of a sequence (attention needs a token)",
                ));
            }
        }
    }
    let d = head_dim.get();
    let group = q_heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Vec::with_capacity(queries.len());
    for b in 0..keys.len() {
        for qh in 0..q_heads {
            let (k, v) = (&keys[b][qh / group], &values[b][qh / group]);
            let q = &queries[(b * q_heads + qh) * d..][..d];
            let scores: Vec<f64> = (0..k.tokens())
                .map(|t| q.iter().zip(k.row(t)).map(|(a, b)| a * b).sum::<f64>() * scale)
                .collect();
            out.extend(softmax_weighted_sum(&scores, d, |i| {
                v.row(i).iter().copied().enumerate()
            }));
        }
    }
    Ok(out)
}

/// Concatenates blocks of equal head_dim (segment then window) into one dense block.
pub fn concat_blocks(first: &DenseBlock, second: &DenseBlock) -> Result<DenseBlock> {
    if first.head_dim() != second.head_dim() {
        return Err(FormatError::InvalidArgument(
            "blocks disagree on head_dim".into(),
        ));
    }
    let mut data = first.data().to_vec();
    data.extend_from_slice(second.data());
    DenseBlock::new(data, first.tokens() + second.tokens(), first.head_dim())
}

/// Causal self-attention of prompts (or of a prompt's chunk after `shape.past()` earlier
/// tokens), as prefill computes it: `queries` `[batch, tokens, q_heads, head_dim]`, `keys` and
/// `values` `[batch, kv_heads, context, head_dim]`; query token `t` sees keys
/// `0..=past + t`, scores scaled by `1 / sqrt(head_dim)`. Returns `[batch, tokens, q_heads,
/// head_dim]`.
pub fn causal_attention(
    shape: PromptShape,
    queries: &[f64],
    keys: &[f64],
    values: &[f64],
) -> Result<Vec<f64>> {
    let (batch, tokens, q_heads, kv_heads) = (
        shape.batch(),
        shape.tokens(),
        shape.q_heads(),
        shape.kv_heads(),
    );
    let (d, past, context) = (shape.head_dim().get(), shape.past(), shape.context());
    for (what, data, rows) in [
        ("queries", queries, tokens * q_heads),
        ("keys", keys, context * kv_heads),
        ("values", values, context * kv_heads),
    ] {
        let expected = batch * rows * d;
        if data.len() != expected {
            return Err(FormatError::ShapeMismatch {
                what,
                expected,
                actual: data.len(),
            });
        }
    }
    let group = shape.group();
    let scale = 1.0 / (d as f64).sqrt();
    let kv_row = |b: usize, h: usize, t: usize| ((b * kv_heads + h) * context + t) * d;
    let mut out = Vec::with_capacity(queries.len());
    for b in 0..batch {
        for t in 0..tokens {
            for qh in 0..q_heads {
                let kvh = qh / group;
                let q = &queries[((b * tokens + t) * q_heads + qh) * d..][..d];
                let scores: Vec<f64> = (0..=past + t)
                    .map(|j| {
                        let k = &keys[kv_row(b, kvh, j)..][..d];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                out.extend(softmax_weighted_sum(&scores, d, |j| {
                    values[kv_row(b, kvh, j)..][..d].iter().copied().enumerate()
                }));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token 0 sees only itself (its output is its value row); token 1 weighs both values by
    /// the softmax of its two scaled scores; each KV head serves its group of query heads.
    #[test]
    fn causal_attention_by_hand() -> Result<()> {
        let d = HeadDim::new(8)?;
        let shape = PromptShape::new(1, 2, 2, 1, d)?;
        let unit = |i: usize| (0..8).map(move |c| if c == i { 1.0 } else { 0.0 });
        // q [1, 2 tokens, 2 heads, 8]: token 1, head 1 aligns with key 1 (score 2 / sqrt 8).
        let mut q: Vec<f64> = Vec::new();
        q.extend(unit(0));
        q.extend(unit(0));
        q.extend(unit(0));
        q.extend(unit(1).map(|x| 2.0 * x));
        let k: Vec<f64> = unit(0).chain(unit(1)).collect();
        let v: Vec<f64> = (0..16).map(|i| i as f64).collect();
        let out = causal_attention(shape, &q, &k, &v)?;
        // Token 0, both heads: value row 0.
        assert_eq!(&out[..8], &v[..8]);
        assert_eq!(&out[8..16], &v[..8]);
        // Token 1, head 0: scores (1, 0) / sqrt 8; head 1: (0, 2) / sqrt 8.
        for (head, scores) in [(0, [1.0f64, 0.0]), (1, [0.0, 2.0])] {
            let s = scores.map(|x| (x / 8f64.sqrt()).exp());
            let w = [s[0] / (s[0] + s[1]), s[1] / (s[0] + s[1])];
            for c in 0..8 {
                let expect = w[0] * v[c] + w[1] * v[8 + c];
                assert!((out[16 + head * 8 + c] - expect).abs() < 1e-12);
            }
        }
        Ok(())
    }

    /// A chunk after `past` tokens equals the same rows of the whole prompt's attention.
    #[test]
    fn a_chunk_after_past_tokens_matches_the_whole_prompt() -> Result<()> {
        let d = HeadDim::new(8)?;
        let (n, past, heads) = (7, 4, 2);
        let whole = PromptShape::new(1, n, heads, 1, d)?;
        let chunk = PromptShape::new(1, n - past, heads, 1, d)?.with_past(past)?;
        let x = |i: usize| ((i * 37 % 101) as f64 / 50.0) - 1.0;
        let q: Vec<f64> = (0..n * heads * 8).map(x).collect();
        let k: Vec<f64> = (0..n * 8).map(|i| x(i + 5)).collect();
        let v: Vec<f64> = (0..n * 8).map(|i| x(i + 11)).collect();
        let all = causal_attention(whole, &q, &k, &v)?;
        let part = causal_attention(chunk, &q[past * heads * 8..], &k, &v)?;
        assert_eq!(part, all[past * heads * 8..].to_vec());
        Ok(())
    }

    #[test]
    fn causal_attention_checks_lengths() -> Result<()> {
        let shape = PromptShape::new(1, 2, 2, 1, HeadDim::new(8)?)?;
        let (q, kv) = (vec![0.0; 32], vec![0.0; 16]);
        assert!(causal_attention(shape, &q, &kv, &kv).is_ok());
        for (q, k, v) in [
            (&q[1..], &kv[..], &kv[..]),
            (&q[..], &kv[1..], &kv[..]),
            (&q[..], &kv[..], &kv[..8]),
        ] {
            assert!(matches!(
                causal_attention(shape, q, k, v),
                Err(FormatError::ShapeMismatch { .. })
            ));
        }
        Ok(())
    }
}
