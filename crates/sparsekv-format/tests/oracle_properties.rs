//! Property tests of the oracle: random shapes, sparsities and values (with deliberate ties).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::needless_range_loop)]

use proptest::prelude::*;
use sparsekv_format::oracle::strategies;
use sparsekv_format::oracle::{
    CompressedBlock, DenseBlock, HeadCache, compress, concat_blocks, dense_decode_attention,
    magnitude_rank, sparse_decode_attention,
};
use sparsekv_format::{
    CacheShape, HeadDim, SequenceOccupancy, Sparsity, ValueType, keep_count, kv_bytes,
};

fn head_dim() -> impl Strategy<Value = HeadDim> {
    prop::sample::select(vec![8usize, 16, 32, 64, 128, 256])
        .prop_map(|d| HeadDim::new(d).expect("listed dims are valid"))
}

fn sparsity() -> impl Strategy<Value = Sparsity> {
    prop_oneof![
        prop::sample::select(vec![0.0, 0.3, 0.5, 0.7, 0.9]),
        0.0f64..0.99
    ]
    .prop_map(|s| Sparsity::new(s).expect("in range"))
}

/// Values on a coarse grid half the time, so equal magnitudes (ties) are common.
fn values(n: usize) -> impl Strategy<Value = Vec<f64>> {
    prop_oneof![
        prop::collection::vec(-4.0f64..4.0, n),
        prop::collection::vec((-8i32..=8).prop_map(|i| i as f64 * 0.5), n),
    ]
}

fn block(max_tokens: usize) -> impl Strategy<Value = DenseBlock> {
    (head_dim(), 0..max_tokens).prop_flat_map(|(d, t)| {
        values(t * d.get()).prop_map(move |v| DenseBlock::new(v, t, d).expect("sized"))
    })
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-300);
    num / den
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn compression_keeps_exactly_the_largest_with_lower_index_ties(b in block(24), s in sparsity()) {
        let d = b.head_dim().get();
        let keep = keep_count(s, b.head_dim());
        let c = compress(&b, s);
        let dense = c.decompress();
        for t in 0..b.tokens() {
            let row = b.row(t);
            let kept: Vec<usize> = (0..d).filter(|&j| c.is_kept(t, j)).collect();
            prop_assert_eq!(kept.len(), keep);
            for j in 0..d {
                let expect = if c.is_kept(t, j) { row[j] } else { 0.0 };
                prop_assert_eq!(dense.row(t)[j], expect);
            }
            // Every kept element ranks at least as high as every dropped one, and a dropped
            // element that ties a kept one has a higher index.
            for &i in &kept {
                for j in (0..d).filter(|&j| !c.is_kept(t, j)) {
                    let ord = magnitude_rank(row[i], row[j]);
                    prop_assert!(ord.is_gt() || (ord.is_eq() && i < j), "row {t}: kept {i}, dropped {j}");
                }
            }
        }
        // The parts survive a round trip through the checked constructor.
        let again = CompressedBlock::from_parts(
            c.bitmap().to_vec(), c.values().to_vec(), c.tokens(), c.head_dim(), c.keep())?;
        prop_assert_eq!(&again, &c);
        // And the per-token magnitude strategy is the same rule.
        let mask = strategies::per_token_magnitude(&b, s);
        for t in 0..b.tokens() {
            for j in 0..d {
                prop_assert_eq!(mask.is_kept(t, j), c.is_kept(t, j));
            }
        }
    }

    #[test]
    fn sparsity_zero_is_lossless(b in block(16)) {
        let c = compress(&b, Sparsity::DENSE);
        prop_assert_eq!(c.decompress(), b);
    }

    #[test]
    fn sparse_attention_equals_dense_attention_over_the_decompressed_cache(
        d in head_dim(),
        batch in 1usize..4,
        kv_heads in 1usize..3,
        group in prop::sample::select(vec![1usize, 2, 4, 8]),
        ks in sparsity(),
        vs in sparsity(),
        lens in prop::collection::vec((0usize..40, 0usize..12), 4),
        seed in any::<u64>(),
    ) {
        let dd = d.get();
        let q_heads = kv_heads * group;
        let mut rng = SplitMix(seed);
        let mut cache = Vec::new();
        let (mut keys, mut vals) = (Vec::new(), Vec::new());
        for &(tc, tw0) in lens.iter().take(batch) {
            let tw = if tc + tw0 == 0 { 1 } else { tw0 };
            let (mut seq, mut kseq, mut vseq) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..kv_heads {
                let mk = |t: usize, rng: &mut SplitMix| DenseBlock::new(rng.normals(t * dd), t, d).expect("sized");
                let (kc, vc, kw, vw) = (mk(tc, &mut rng), mk(tc, &mut rng), mk(tw, &mut rng), mk(tw, &mut rng));
                let head = HeadCache { k_segment: compress(&kc, ks), v_segment: compress(&vc, vs), k_window: kw, v_window: vw };
                kseq.push(concat_blocks(&head.k_segment.decompress(), &head.k_window)?);
                vseq.push(concat_blocks(&head.v_segment.decompress(), &head.v_window)?);
                seq.push(head);
            }
            cache.push(seq);
            keys.push(kseq);
            vals.push(vseq);
        }
        let q = rng.normals(batch * q_heads * dd);
        let sparse = sparse_decode_attention(&q, q_heads, &cache)?;
        let dense = dense_decode_attention(&q, q_heads, &keys, &vals)?;
        prop_assert_eq!(sparse.len(), batch * q_heads * dd);
        prop_assert!(sparse.iter().all(|x| x.is_finite()));
        prop_assert!(rel_err(&sparse, &dense) < 1e-12, "rel err {}", rel_err(&sparse, &dense));
    }

    #[test]
    fn accounting_matches_the_streams_compress_produces(
        d in head_dim(), ks in sparsity(), vs in sparsity(),
        tokens in prop::collection::vec(0usize..100, 1..4), window in 0usize..40,
    ) {
        let shape = CacheShape { layers: 3, kv_heads: 2, head_dim: d, value_type: ValueType::F16 };
        let occ: Vec<SequenceOccupancy> = tokens.iter().map(|&t| SequenceOccupancy::steady_state(t, window)).collect();
        let bytes = kv_bytes(&shape, &occ, ks, vs);
        let (mut kbit, mut kval, mut vbit, mut vval) = (0u64, 0u64, 0u64, 0u64);
        for o in &occ {
            let zeros = DenseBlock::new(vec![1.0; o.compressed_tokens * d.get()], o.compressed_tokens, d)?;
            let (kc, vc) = (compress(&zeros, ks), compress(&zeros, vs));
            kbit += kc.bitmap().len() as u64 * 4;
            vbit += vc.bitmap().len() as u64 * 4;
            kval += kc.values().len() as u64 * 2;
            vval += vc.values().len() as u64 * 2;
        }
        prop_assert_eq!(bytes.k_bitmap, kbit * 6);
        prop_assert_eq!(bytes.v_bitmap, vbit * 6);
        prop_assert_eq!(bytes.k_values, kval * 6);
        prop_assert_eq!(bytes.v_values, vval * 6);
        let total_tokens: usize = tokens.iter().sum();
        prop_assert_eq!(bytes.dense_equivalent, (total_tokens * 2 * d.get() * 2 * 6) as u64);
        let window_tokens: usize = occ.iter().map(|o| o.window_tokens).sum();
        prop_assert_eq!(bytes.window, (window_tokens * 2 * d.get() * 2 * 6) as u64);
        prop_assert_eq!(bytes.total(), 6 * (kbit + kval + vbit + vval) + bytes.window);
    }

    #[test]
    fn every_strategy_keeps_everything_at_sparsity_zero(b in block(40), seed in any::<u64>()) {
        let d = b.head_dim().get();
        let mut rng = SplitMix(seed);
        let q = rng.normals(3 * d);
        let mass: Vec<f64> = (0..b.tokens()).map(|_| rng.uniform() + 0.01).collect();
        let qbar = strategies::key_channel_weights(&q, 3, 1, d)?;
        let s = Sparsity::DENSE;
        let all = b.tokens() * d;
        prop_assert_eq!(strategies::per_token_magnitude(&b, s).kept_count(), all);
        prop_assert_eq!(strategies::per_token_output_aware_keys(&b, &qbar, s)?.kept_count(), all);
        prop_assert_eq!(strategies::per_token_output_aware_values(&b, &mass, s)?.kept_count(), all);
        prop_assert_eq!(strategies::per_channel_magnitude(&b, s, 32)?.kept_count(), all);
        prop_assert_eq!(strategies::per_channel_output_aware_keys(&b, &qbar, s, 32)?.kept_count(), all);
        prop_assert_eq!(strategies::per_channel_output_aware_values(&b, &mass, s, 32)?.kept_count(), all);
        prop_assert_eq!(strategies::think_keys(&b, &q, s)?.kept_count(), all);
    }

    #[test]
    fn strategies_keep_the_counts_their_formulas_give(b in block(70), s in sparsity(), seed in any::<u64>()) {
        let (t, d) = (b.tokens(), b.head_dim().get());
        let mut rng = SplitMix(seed);
        let q = rng.normals(2 * d);
        let mass = strategies::attention_mass(&q, &b)?;
        prop_assert_eq!(mass.len(), t);
        if t > 0 {
            prop_assert!((mass.iter().sum::<f64>() - 2.0).abs() < 1e-9, "mass of 2 query rows sums to 2");
        }
        let per_row = keep_count(s, b.head_dim());
        let m = strategies::per_token_output_aware_values(&b, &mass, s)?;
        prop_assert_eq!(m.kept_count(), t * per_row);
        // Per token, a positive a_t does not change the ranking within a row.
        prop_assert_eq!(m, strategies::per_token_magnitude(&b, s));
        let group = 32;
        let expected: usize = (0..t).step_by(group)
            .map(|start| sparsekv_format::keep_count_of(s, group.min(t - start)) * d).sum();
        prop_assert_eq!(strategies::per_channel_magnitude(&b, s, group)?.kept_count(), expected);
        let qbar = strategies::key_channel_weights(&q, 2, 1, d)?;
        prop_assert_eq!(strategies::per_channel_output_aware_keys(&b, &qbar, s, group)?.kept_count(), expected);
        let think = strategies::think_keys(&b, &q, s)?;
        let dropped = ((s.get() * d as f64).floor() as usize).min(d - 1);
        prop_assert_eq!(think.kept_count(), t * (d - dropped));
    }
}

#[test]
fn think_drops_the_channels_with_the_lowest_score() -> sparsekv_format::Result<()> {
    let d = HeadDim::new(8)?;
    // Channel c of every key is c + 1; queries are 1 everywhere but channel 0 where they are 10.
    let keys = DenseBlock::new((0..16).map(|i| (i % 8 + 1) as f64).collect(), 2, d)?;
    let mut q = vec![1.0; 8];
    q[0] = 10.0; // score_0 = 100 * 1 beats channels 1..=8 (score (c+1)^2 up to 64)
    let m = strategies::think_keys(&keys, &q, Sparsity::new(0.5)?)?;
    let kept: Vec<usize> = (0..8).filter(|&c| m.is_kept(0, c)).collect();
    assert_eq!(kept, vec![0, 5, 6, 7]);
    Ok(())
}

#[test]
fn output_aware_keys_follow_the_query_weights() -> sparsekv_format::Result<()> {
    let d = HeadDim::new(8)?;
    let keys = DenseBlock::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 1, d)?;
    let qbar = [100.0, 50.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0];
    let m = strategies::per_token_output_aware_keys(&keys, &qbar, Sparsity::new(0.75)?)?;
    assert_eq!(
        (0..8).filter(|&c| m.is_kept(0, c)).collect::<Vec<_>>(),
        vec![0, 1]
    );
    Ok(())
}

#[test]
fn bad_shapes_are_typed_errors() -> sparsekv_format::Result<()> {
    let d = HeadDim::new(8)?;
    assert!(DenseBlock::new(vec![0.0; 7], 1, d).is_err());
    let head = HeadCache {
        k_segment: compress(&DenseBlock::empty(d), Sparsity::DENSE),
        v_segment: compress(&DenseBlock::empty(d), Sparsity::DENSE),
        k_window: DenseBlock::empty(d),
        v_window: DenseBlock::empty(d),
    };
    // No tokens at all: attention is undefined.
    assert!(sparse_decode_attention(&[0.0; 8], 1, &[vec![head.clone()]]).is_err());
    // Query heads not a multiple of KV heads.
    assert!(sparse_decode_attention(&[0.0; 24], 3, &[vec![head.clone(), head]]).is_err());
    assert!(sparse_decode_attention(&[], 1, &[]).is_err());
    Ok(())
}

/// A small deterministic generator (the seed comes from proptest, so every case is fresh).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normals(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let (u, v) = (self.uniform().max(1e-300), self.uniform());
                (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
            })
            .collect()
    }
}
