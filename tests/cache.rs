//! The KV caches through the Burn extension, against the f64 oracle: random ragged prefill
//! (0..300 tokens) and 1..200 decode steps, every step's attention output compared with the
//! oracle run on the same pruned data; sparsity 0 against the dense cache; memory statistics
//! against the FORMAT.md formula; bad input. Runtime: `cuda` if enabled, else wgpu.
//! `SPARSEKV_SEED` replays a run (failures print it).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::needless_range_loop)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sparsekv::cache::burn::tensor::{Tensor, TensorData, TensorPrimitive};
use sparsekv::cache::burn_cubecl::CubeBackend;
use sparsekv::cache::{
    DenseKvCache, KvCache, KvCacheConfig, KvCacheError, LayerCaches, RopeHeads, RopeStyle,
    RopeTables, SparseKvBackend, SparseKvCache,
};
use sparsekv::format::oracle::{self, DenseBlock, HeadCache};
use sparsekv::format::{HeadDim, Sparsity, keep_count};

mod common;

use common::{Fused, Rt, rel_err, seed, standard_normal};

/// The bare backend: CubeCL kernels launched at once.
type B = CubeBackend<Rt, f32, i32, u32>;

fn normals(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| standard_normal(rng) as f32).collect()
}

/// The host copy of everything appended: `tokens[s][h]` is sequence `s`, KV head `h`, one
/// `head_dim` row per token.
struct History {
    k: Vec<Vec<Vec<f64>>>,
    v: Vec<Vec<Vec<f64>>>,
}

struct Scenario {
    batch: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    window: usize,
    chunk: usize,
    ks: f64,
    vs: f64,
    prefill: Vec<usize>,
    steps: usize,
}

fn random_scenario(rng: &mut StdRng) -> Scenario {
    let batch = rng.random_range(1..=3);
    Scenario {
        batch,
        kv_heads: rng.random_range(1..=2),
        group: [1, 2, 4][rng.random_range(0..3)],
        head_dim: [8, 16, 64, 128][rng.random_range(0..4)],
        window: [4, 32][rng.random_range(0..2)],
        chunk: [8, 64][rng.random_range(0..2)],
        ks: [0.0, 0.5, 0.7][rng.random_range(0..3)],
        vs: [0.0, 0.5, 0.7][rng.random_range(0..3)],
        prefill: (0..batch)
            .map(|_| {
                if rng.random_bool(0.2) {
                    0
                } else {
                    rng.random_range(1..300)
                }
            })
            .collect(),
        steps: rng.random_range(1..=200),
    }
}

/// Appends `counts[s]` random rows per sequence (padded to the largest count) to the cache and
/// the history.
fn append<B: SparseKvBackend>(
    rng: &mut StdRng,
    sc: &Scenario,
    cache: &mut dyn KvCache<B>,
    hist: &mut History,
    counts: &[usize],
) -> Result<(), String> {
    let n = counts.iter().copied().max().unwrap_or(0).max(1);
    let d = sc.head_dim;
    let device = Default::default();
    let k = normals(rng, sc.batch * sc.kv_heads * n * d);
    let v = normals(rng, sc.batch * sc.kv_heads * n * d);
    for s in 0..sc.batch {
        for h in 0..sc.kv_heads {
            for t in 0..counts[s] {
                let at = ((s * sc.kv_heads + h) * n + t) * d;
                hist.k[s][h].extend(k[at..at + d].iter().map(|&x| x as f64));
                hist.v[s][h].extend(v[at..at + d].iter().map(|&x| x as f64));
            }
        }
    }
    let shape = [sc.batch, sc.kv_heads, n, d];
    let kt = Tensor::<B, 4>::from_data(TensorData::new(k, shape), &device);
    let vt = Tensor::<B, 4>::from_data(TensorData::new(v, shape), &device);
    cache
        .append_ragged(kt, vt, counts)
        .map_err(|e| e.to_string())
}

/// The oracle's output for the history split as the cache split it.
fn oracle_output(sc: &Scenario, hist: &History, q: &[f64], compressed: &[usize]) -> Vec<f64> {
    let hd = HeadDim::new(sc.head_dim).expect("valid");
    let d = sc.head_dim;
    let (ks, vs) = (
        Sparsity::new(sc.ks).expect("valid"),
        Sparsity::new(sc.vs).expect("valid"),
    );
    let cache: Vec<Vec<HeadCache>> = (0..sc.batch)
        .map(|s| {
            (0..sc.kv_heads)
                .map(|h| {
                    let (kr, vr) = (&hist.k[s][h], &hist.v[s][h]);
                    let total = kr.len() / d;
                    let c = compressed[s];
                    let block = |rows: &[f64], from: usize, to: usize| {
                        DenseBlock::new(rows[from * d..to * d].to_vec(), to - from, hd)
                            .expect("sized")
                    };
                    HeadCache {
                        k_segment: oracle::compress(&block(kr, 0, c), ks),
                        v_segment: oracle::compress(&block(vr, 0, c), vs),
                        k_window: block(kr, c, total),
                        v_window: block(vr, c, total),
                    }
                })
                .collect()
        })
        .collect();
    oracle::sparse_decode_attention(q, sc.kv_heads * sc.group, &cache).expect("oracle")
}

fn attend<B: SparseKvBackend>(
    rng: &mut StdRng,
    sc: &Scenario,
    cache: &dyn KvCache<B>,
) -> (Vec<f64>, Result<Vec<f64>, String>) {
    let q_heads = sc.kv_heads * sc.group;
    let q = normals(rng, sc.batch * q_heads * sc.head_dim);
    let qt = Tensor::<B, 3>::from_data(
        TensorData::new(q.clone(), [sc.batch, q_heads, sc.head_dim]),
        &Default::default(),
    );
    let out = cache.attend(qt).map_err(|e| e.to_string()).and_then(|t| {
        t.into_data()
            .to_vec::<f32>()
            .map(|v| v.into_iter().map(|x| x as f64).collect())
            .map_err(|e| format!("{e:?}"))
    });
    (q.into_iter().map(|x| x as f64).collect(), out)
}

/// The bytes FORMAT.md gives for a split, written out: per stream, whole bitmap words and
/// `keep` values per compressed token for K and for V, and `2 * head_dim` values per dense token.
fn formula_bytes(sc: &Scenario, comp: &[usize], win: &[usize]) -> (u64, u64) {
    let hd = HeadDim::new(sc.head_dim).expect("valid");
    let d = sc.head_dim;
    let kk = keep_count(Sparsity::new(sc.ks).expect("ok"), hd);
    let kv = keep_count(Sparsity::new(sc.vs).expect("ok"), hd);
    let mut total = 0;
    let mut dense = 0;
    for s in 0..sc.batch {
        let words = (comp[s] * d).div_ceil(32);
        total += sc.kv_heads * (2 * words * 4 + comp[s] * (kk + kv) * 4 + 2 * win[s] * d * 4);
        dense += sc.kv_heads * 2 * (comp[s] + win[s]) * d * 4;
    }
    (total as u64, dense as u64)
}

fn run_scenario<B: SparseKvBackend>(rng: &mut StdRng, sc: &Scenario) -> Result<(), String> {
    let device = Default::default();
    let max_seq = sc.prefill.iter().max().copied().unwrap_or(0) + sc.steps + 8;
    let config = KvCacheConfig::new(sc.batch, sc.kv_heads, sc.head_dim, max_seq)
        .with_window(sc.window)
        .with_chunk(sc.chunk)
        .with_sparsity(sc.ks, sc.vs);
    let mut cache = SparseKvCache::<B>::new(&config, &device).map_err(|e| e.to_string())?;
    let empty = || vec![vec![Vec::new(); sc.kv_heads]; sc.batch];
    let mut hist = History {
        k: empty(),
        v: empty(),
    };
    for i in 0..=sc.steps {
        let (counts, label) = if i == 0 {
            (sc.prefill.clone(), "prefill".to_string())
        } else {
            (vec![1; sc.batch], format!("decode step {i}"))
        };
        append(rng, sc, &mut cache, &mut hist, &counts)?;
        let comp = cache.compressed_lengths().to_vec();
        let win = cache.window_lengths().to_vec();
        for s in 0..sc.batch {
            let len = hist.k[s][0].len() / sc.head_dim;
            if comp[s] + win[s] != len || win[s] > sc.window + sc.chunk {
                return Err(format!(
                    "{label}: sequence {s} split {}+{} of {len} tokens",
                    comp[s], win[s]
                ));
            }
            if counts[s] > 1 && win[s] != len.min(sc.window) {
                return Err(format!(
                    "{label}: after a prefill sequence {s} keeps {} dense, not {}",
                    win[s],
                    len.min(sc.window)
                ));
            }
        }
        let memory = cache.memory();
        if (memory.total(), memory.dense_equivalent) != formula_bytes(sc, &comp, &win) {
            return Err(format!(
                "{label}: memory {memory:?} is not the formula's {:?}",
                formula_bytes(sc, &comp, &win)
            ));
        }
        if cache.lengths().contains(&0) {
            continue; // attention needs a token in every sequence
        }
        let (q, out) = attend(rng, sc, &cache);
        let expect = oracle_output(sc, &hist, &q, &comp);
        let err = rel_err(&out?, &expect);
        if err > 1e-5 {
            return Err(format!("{label}: rel err {err:e} (split {comp:?}+{win:?})"));
        }
    }
    Ok(())
}

fn describe(sc: &Scenario) -> String {
    format!(
        "batch {} kv {} group {} d {} window {} chunk {} ks {} vs {} prefill {:?} steps {}",
        sc.batch,
        sc.kv_heads,
        sc.group,
        sc.head_dim,
        sc.window,
        sc.chunk,
        sc.ks,
        sc.vs,
        sc.prefill,
        sc.steps
    )
}

/// `scenarios` random scenarios through caches of backend `B`.
fn oracle_scenarios<B: SparseKvBackend>(scenarios: usize) {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..scenarios {
        let sc = random_scenario(&mut rng);
        if let Err(e) = run_scenario::<B>(&mut rng, &sc) {
            panic!(
                "scenario {i} ({}), SPARSEKV_SEED={seed}: {e}",
                describe(&sc)
            );
        }
    }
}

#[test]
fn sparse_cache_matches_the_oracle_through_prefill_and_decode() {
    oracle_scenarios::<B>(4);
}

/// The same through Burn's fused backend (`burn::backend::Wgpu` / `Cuda` with Burn's default
/// features), where every cache operation is queued on the fusion stream.
#[test]
fn fused_backend_cache_matches_the_oracle_through_prefill_and_decode() {
    oracle_scenarios::<Fused>(3);
}

/// The oracle's output for query `q` (one row: `q_heads` heads) of sequence `s`, seeing its
/// first `seen` tokens, the first `compressed` of them compressed.
fn oracle_row(
    sc: &Scenario,
    hist: &History,
    s: usize,
    seen: usize,
    compressed: usize,
    q: &[f64],
) -> Vec<f64> {
    let one = Scenario {
        batch: 1,
        prefill: vec![],
        ..*sc
    };
    let prefix = |rows: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        rows.iter()
            .map(|r| r[..seen * sc.head_dim].to_vec())
            .collect()
    };
    let single = History {
        k: vec![prefix(&hist.k[s])],
        v: vec![prefix(&hist.v[s])],
    };
    oracle_output(&one, &single, q, &[compressed.min(seen)])
}

/// Appends random ragged chunks (as a streaming prefill does) and after each one attends with
/// the queries of every sequence's newest tokens; every real row must equal the oracle over the
/// tokens up to its own, as they are cached then.
fn newest_queries_scenario<B: SparseKvBackend>(
    rng: &mut StdRng,
    sc: &Scenario,
) -> Result<(), String> {
    let device = Default::default();
    let chunks: Vec<Vec<usize>> = (0..rng.random_range(1..=4))
        .map(|_| (0..sc.batch).map(|_| rng.random_range(1..=40)).collect())
        .collect();
    let max_seq = chunks
        .iter()
        .map(|c| c.iter().max().copied().unwrap_or(0))
        .sum::<usize>()
        + 8;
    let config = KvCacheConfig::new(sc.batch, sc.kv_heads, sc.head_dim, max_seq)
        .with_window(sc.window)
        .with_chunk(sc.chunk)
        .with_sparsity(sc.ks, sc.vs);
    let mut cache = SparseKvCache::<B>::new(&config, &device).map_err(|e| e.to_string())?;
    let empty = || vec![vec![Vec::new(); sc.kv_heads]; sc.batch];
    let mut hist = History {
        k: empty(),
        v: empty(),
    };
    let (q_heads, d) = (sc.kv_heads * sc.group, sc.head_dim);
    for (step, counts) in chunks.iter().enumerate() {
        append(rng, sc, &mut cache, &mut hist, counts)?;
        let n = counts.iter().copied().max().unwrap_or(1);
        let q = normals(rng, sc.batch * n * q_heads * d);
        let qt = Tensor::<B, 4>::from_data(
            TensorData::new(q.clone(), [sc.batch, n, q_heads, d]),
            &device,
        );
        let out: Vec<f64> = cache
            .attend_newest(qt, counts)
            .map_err(|e| e.to_string())?
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?
            .into_iter()
            .map(f64::from)
            .collect();
        let comp = cache.compressed_lengths().to_vec();
        for s in 0..sc.batch {
            let len = hist.k[s][0].len() / d;
            for i in 0..counts[s] {
                let at = (s * n + i) * q_heads * d;
                let row: Vec<f64> = q[at..at + q_heads * d].iter().map(|&x| x as f64).collect();
                let seen = len - counts[s] + i + 1;
                let expect = oracle_row(sc, &hist, s, seen, comp[s], &row);
                let err = rel_err(&out[at..at + q_heads * d], &expect);
                if err > 1e-5 {
                    return Err(format!(
                        "chunk {step} {counts:?}: sequence {s} row {i} (token {} of {len}, {} compressed): rel err {err:e}",
                        seen - 1,
                        comp[s]
                    ));
                }
            }
        }
    }
    Ok(())
}

fn newest_queries<B: SparseKvBackend>(scenarios: usize) {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..scenarios {
        let sc = random_scenario(&mut rng);
        if let Err(e) = newest_queries_scenario::<B>(&mut rng, &sc) {
            panic!(
                "scenario {i} ({}), SPARSEKV_SEED={seed}: {e}",
                describe(&sc)
            );
        }
    }
}

/// The queries of a prompt chunk (a streaming prefill) attend causally through the cache.
#[test]
fn newest_token_queries_match_the_oracle() {
    newest_queries::<B>(4);
}

#[test]
fn fused_backend_newest_token_queries_match_the_oracle() {
    newest_queries::<Fused>(2);
}

#[test]
fn sparsity_zero_matches_the_dense_cache() {
    sparse_at_zero_equals_dense::<B>();
}

#[test]
fn fused_backend_sparsity_zero_matches_the_dense_cache() {
    sparse_at_zero_equals_dense::<Fused>();
}

fn sparse_at_zero_equals_dense<B: SparseKvBackend>() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sc = random_scenario(&mut rng);
    (sc.ks, sc.vs, sc.steps) = (0.0, 0.0, sc.steps.min(80));
    sc.prefill.iter_mut().for_each(|p| *p = (*p).max(1));
    let device = Default::default();
    let config = KvCacheConfig::new(sc.batch, sc.kv_heads, sc.head_dim, 400)
        .with_window(sc.window)
        .with_chunk(sc.chunk);
    let mut sparse = SparseKvCache::<B>::new(&config, &device).expect("cache");
    let mut dense = DenseKvCache::<B>::new(&config, &device).expect("cache");
    let empty = || vec![vec![Vec::new(); sc.kv_heads]; sc.batch];
    let (mut h1, mut h2) = (
        History {
            k: empty(),
            v: empty(),
        },
        History {
            k: empty(),
            v: empty(),
        },
    );
    for i in 0..=sc.steps {
        let counts = if i == 0 {
            sc.prefill.clone()
        } else {
            vec![1; sc.batch]
        };
        let step_seed: u64 = rng.random();
        append(
            &mut StdRng::seed_from_u64(step_seed),
            &sc,
            &mut sparse,
            &mut h1,
            &counts,
        )
        .expect("append");
        append(
            &mut StdRng::seed_from_u64(step_seed),
            &sc,
            &mut dense,
            &mut h2,
            &counts,
        )
        .expect("append");
        let q_seed: u64 = rng.random();
        let (_, a) = attend(&mut StdRng::seed_from_u64(q_seed), &sc, &sparse);
        let (_, b) = attend(&mut StdRng::seed_from_u64(q_seed), &sc, &dense);
        let err = rel_err(&a.expect("sparse"), &b.expect("dense"));
        assert!(
            err < 1e-5,
            "step {i} ({}), SPARSEKV_SEED={seed}: rel err {err:e}",
            describe(&sc)
        );
        assert_eq!(dense.memory().total(), dense.memory().dense_equivalent);
    }
}

/// Appends the same random rows (drawn once from `rng`) to two caches.
fn append_both<B: SparseKvBackend>(
    rng: &mut StdRng,
    sc: &Scenario,
    a: &mut dyn KvCache<B>,
    b: &mut dyn KvCache<B>,
    hist: &mut History,
    counts: &[usize],
) -> Result<(), String> {
    let seed: u64 = rng.random();
    append(&mut StdRng::seed_from_u64(seed), sc, a, hist, counts)?;
    append(&mut StdRng::seed_from_u64(seed), sc, b, hist, counts)
}

#[test]
fn rotating_keys_into_the_cache_matches_split_then_append() {
    qkv_append_equals_split::<B>();
}

#[test]
fn fused_backend_rotating_keys_into_the_cache_matches_split_then_append() {
    qkv_append_equals_split::<Fused>();
}

fn to_f64<B: SparseKvBackend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    let v = t.into_data().to_vec::<f32>().expect("f32 data");
    v.into_iter().map(f64::from).collect()
}

/// `KvCache::append_qkv` (a decode step's keys rotated straight into the dense rows, one
/// launch; a sparse cache's prompt through the RoPE split) against the RoPE split followed by
/// `append_ragged`, on sparse and dense caches fed the same fused QKV rows through prompts,
/// window overflows and steps where some sequences add nothing: the same queries and the same
/// attention output at every step.
fn qkv_append_equals_split<B: SparseKvBackend>() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sc = random_scenario(&mut rng);
    sc.steps = sc.steps.min(80);
    let (q_heads, d) = (sc.kv_heads * sc.group, sc.head_dim);
    let (positions, half) = (400, sc.head_dim / 2);
    let device = Default::default();
    let table = |f: fn(f64) -> f64| {
        let v: Vec<f32> = (0..positions * half)
            .map(|i| f((i / half) as f64 * 10f64.powf(-((i % half) as f64) / half as f64)) as f32)
            .collect();
        Tensor::<B, 2>::from_data(TensorData::new(v, [positions, half]), &device)
    };
    let rope = RopeTables {
        cos: table(f64::cos),
        sin: table(f64::sin),
        heads: RopeHeads {
            q_heads,
            kv_heads: sc.kv_heads,
            style: [RopeStyle::Interleaved, RopeStyle::RotateHalf][rng.random_range(0..2)],
        },
    };
    let config = KvCacheConfig::new(sc.batch, sc.kv_heads, d, positions)
        .with_sparsity(sc.ks, sc.vs)
        .with_window(sc.window)
        .with_chunk(sc.chunk);
    for kind in ["sparse", "dense"] {
        let make = || -> Box<dyn KvCache<B>> {
            if kind == "sparse" {
                Box::new(SparseKvCache::<B>::new(&config, &device).expect("cache"))
            } else {
                Box::new(DenseKvCache::<B>::new(&config, &device).expect("cache"))
            }
        };
        let (mut fused, mut split) = (make(), make());
        for i in 0..=sc.steps {
            let counts: Vec<usize> = if i == 0 {
                sc.prefill.clone()
            } else {
                (0..sc.batch)
                    .map(|_| usize::from(rng.random_bool(0.9)))
                    .collect()
            };
            let n = counts.iter().copied().max().unwrap_or(0).max(1);
            let width = (q_heads + 2 * sc.kv_heads) * d;
            let qkv = Tensor::<B, 3>::from_data(
                TensorData::new(
                    normals(&mut rng, sc.batch * n * width),
                    [sc.batch, n, width],
                ),
                &device,
            );
            let q_fused = fused
                .append_qkv(qkv.clone(), &rope, &counts)
                .expect("append_qkv");
            let [q, k, v] = B::rope_split(
                qkv.into_primitive().tensor(),
                rope.cos.clone().into_primitive().tensor(),
                rope.sin.clone().into_primitive().tensor(),
                &split.lengths(),
                rope.heads,
            )
            .expect("rope_split");
            let float = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
            split
                .append_ragged(float(k), float(v), &counts)
                .expect("append_ragged");
            let step = format!(
                "{kind} cache, step {i} ({}), SPARSEKV_SEED={seed}",
                describe(&sc)
            );
            assert_eq!(fused.lengths(), split.lengths(), "{step}");
            let err = rel_err(&to_f64(q_fused), &to_f64(float(q)));
            assert!(err < 1e-6, "{step}: queries differ, rel err {err:e}");
            if fused.lengths().contains(&0) {
                continue; // Attention needs a token in every sequence.
            }
            let q_seed: u64 = rng.random();
            let (_, a) = attend(&mut StdRng::seed_from_u64(q_seed), &sc, fused.as_ref());
            let (_, b) = attend(&mut StdRng::seed_from_u64(q_seed), &sc, split.as_ref());
            let err = rel_err(&a.expect("attend"), &b.expect("attend"));
            assert!(err < 1e-6, "{step}: attention differs, rel err {err:e}");
        }
    }
}

#[test]
fn layer_groups_match_independent_caches() {
    grouped_equals_independent::<B>();
}

#[test]
fn fused_backend_layer_groups_match_independent_caches() {
    grouped_equals_independent::<Fused>();
}

/// `LayerCaches::sparse` (layers sharing group buffers, each compression of the window run for
/// every layer of a group by whichever layer gets there first) against independent caches fed
/// the same rows: every attention output equal, bit for bit. The layers are driven in a
/// random order each step, and now and then one layer runs ahead of the others for a few
/// steps (out of step, it must compress alone) before they catch up.
fn grouped_equals_independent<B: SparseKvBackend>() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sc = random_scenario(&mut rng);
    (sc.window, sc.chunk, sc.steps) = (4, 8, 60);
    let layers = rng.random_range(2..=4);
    // Steps run ahead by one layer (and caught up by the others) come on top of `steps`.
    const AHEAD: usize = 100;
    let max_seq = sc.prefill.iter().max().copied().unwrap_or(0) + sc.steps + AHEAD + 8;
    let config = KvCacheConfig::new(sc.batch, sc.kv_heads, sc.head_dim, max_seq)
        .with_window(sc.window)
        .with_chunk(sc.chunk)
        .with_sparsity(sc.ks, sc.vs);
    let device = Default::default();
    let mut grouped = LayerCaches::<SparseKvCache<B>>::sparse(layers, &config, &device)
        .expect("caches")
        .into_layers();
    let mut alone: Vec<SparseKvCache<B>> = (0..layers)
        .map(|_| SparseKvCache::<B>::new(&config, &device).expect("cache"))
        .collect();
    let context = || format!("{layers} layers ({}), SPARSEKV_SEED={seed}", describe(&sc));
    let empty = || vec![vec![Vec::new(); sc.kv_heads]; sc.batch];
    let mut hist = History {
        k: empty(),
        v: empty(),
    };
    // One layer and a number of steps it runs ahead of the others.
    let mut ahead: Option<(usize, usize)> = None;
    let mut ahead_steps = 0;
    let mut step = 0;
    while step <= sc.steps {
        let counts = if step == 0 {
            sc.prefill.clone()
        } else {
            vec![1; sc.batch]
        };
        if ahead.is_none() && step > 0 && ahead_steps + 10 <= AHEAD && rng.random_bool(0.1) {
            let n = rng.random_range(1..=10);
            ahead_steps += n;
            ahead = Some((rng.random_range(0..layers), n));
        }
        let mut order: Vec<usize> = (0..layers).collect();
        if rng.random_bool(0.5) {
            order.reverse();
        }
        if let Some((runner, _)) = ahead {
            order = vec![runner];
        }
        for &l in &order {
            append_both(
                &mut rng,
                &sc,
                &mut grouped[l],
                &mut alone[l],
                &mut hist,
                &counts,
            )
            .unwrap_or_else(|e| panic!("step {step}, layer {l}, {}: {e}", context()));
            assert_eq!(
                grouped[l].lengths(),
                alone[l].lengths(),
                "step {step}, layer {l}, {}",
                context()
            );
            assert_eq!(
                grouped[l].compressed_lengths(),
                alone[l].compressed_lengths(),
                "step {step}, layer {l}, {}",
                context()
            );
            if grouped[l].lengths().contains(&0) {
                continue;
            }
            let q_seed: u64 = rng.random();
            let (_, a) = attend(&mut StdRng::seed_from_u64(q_seed), &sc, &grouped[l]);
            let (_, b) = attend(&mut StdRng::seed_from_u64(q_seed), &sc, &alone[l]);
            let (a, b) = (a.expect("grouped"), b.expect("alone"));
            assert!(
                a.iter().all(|x| x.is_finite()) && a == b,
                "step {step}, layer {l}, {}: grouped and independent caches differ",
                context()
            );
        }
        match ahead {
            Some((runner, 1)) => {
                // The others catch up with the runner, one step at a time, below.
                ahead = None;
                let behind = grouped[(runner + 1) % layers].lengths();
                let lead = grouped[runner].lengths();
                let extra = lead.iter().zip(&behind).map(|(a, b)| a - b).max();
                for _ in 0..extra.unwrap_or(0) {
                    for l in (0..layers).filter(|&l| l != runner) {
                        let one = vec![1; sc.batch];
                        append_both(
                            &mut rng,
                            &sc,
                            &mut grouped[l],
                            &mut alone[l],
                            &mut hist,
                            &one,
                        )
                        .unwrap_or_else(|e| panic!("catching up, {}: {e}", context()));
                    }
                }
                step += 1;
            }
            Some((runner, n)) => ahead = Some((runner, n - 1)),
            None => step += 1,
        }
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let device = Default::default();
    let config = KvCacheConfig::new(2, 2, 16, 10);
    assert!(matches!(
        SparseKvCache::<B>::new(&config.clone().with_sparsity(1.0, 0.0), &device),
        Err(KvCacheError::Format(_))
    ));
    assert!(matches!(
        SparseKvCache::<B>::new(&KvCacheConfig::new(2, 2, 12, 10), &device),
        Err(KvCacheError::Format(_))
    ));
    let mut cache = SparseKvCache::<B>::new(&config, &device).expect("cache");
    let rows = |n: usize, d: usize| Tensor::<B, 4>::zeros([2, 2, n, d], &device);
    let err = cache.append(rows(3, 8), rows(3, 8));
    assert!(matches!(err, Err(KvCacheError::Shape { .. })), "{err:?}");
    let err = cache.append(rows(11, 16), rows(11, 16));
    assert!(matches!(err, Err(KvCacheError::Capacity { .. })), "{err:?}");
    let q = Tensor::<B, 3>::zeros([2, 4, 16], &device);
    let err = cache.attend(q.clone());
    assert!(
        matches!(err, Err(KvCacheError::Invalid(_))),
        "empty cache: {err:?}"
    );
    cache.append(rows(2, 16), rows(2, 16)).expect("append");
    let err = cache.attend(Tensor::<B, 3>::zeros([2, 3, 16], &device));
    assert!(
        matches!(err, Err(KvCacheError::Shape { .. })),
        "3 query heads over 2 KV heads: {err:?}"
    );
    let err = cache.append_ragged(rows(2, 16), rows(2, 16), &[1]);
    assert!(matches!(err, Err(KvCacheError::Invalid(_))), "{err:?}");
    let half_rows = Tensor::<B, 4>::zeros([2, 2, 1, 16], &device)
        .cast(sparsekv::cache::burn::tensor::DType::F16);
    let err = cache.append(half_rows.clone(), half_rows);
    assert!(matches!(err, Err(KvCacheError::DType { .. })), "{err:?}");
    assert!(cache.attend(q).is_ok());
}

/// A window larger than the cache (`--window 600000` in the chat example) must neither
/// overflow nor size the dense buffers past `max_seq`; sizes past the address space are a
/// typed error, not an allocator panic.
#[test]
fn huge_windows_and_sizes_are_capped_or_refused() {
    let device = Default::default();
    let mut cache = SparseKvCache::<B>::new(
        &KvCacheConfig::new(1, 1, 16, 40)
            .with_window(usize::MAX)
            .with_sparsity(0.5, 0.5),
        &device,
    )
    .expect("a window past max_seq is capped at max_seq");
    let rows = |n: usize| Tensor::<B, 4>::ones([1, 1, n, 16], &device);
    cache
        .append(rows(40), rows(40))
        .expect("max_seq tokens fit");
    assert_eq!(cache.lengths(), vec![40]);
    assert_eq!(
        cache.compressed_counts(),
        vec![0],
        "all dense: the window is larger"
    );
    let out = cache
        .attend(Tensor::<B, 3>::ones([1, 2, 16], &device))
        .expect("attend");
    let values = out.into_data().to_vec::<f32>().expect("f32");
    assert!(values.iter().all(|&v| (v - 1.0).abs() < 1e-5), "{values:?}");
    let err = SparseKvCache::<B>::new(&KvCacheConfig::new(usize::MAX / 2, 4, 16, 8), &device);
    assert!(
        matches!(&err, Err(KvCacheError::Invalid(m)) if m.contains("more bytes than")),
        "{err:?}"
    );
}

/// A cache whose buffers are larger than the device allocates in one piece is refused with a
/// typed error at construction (not a panic or a failed launch later), and the same
/// configuration shrunk to fit is accepted.
#[test]
fn caches_larger_than_the_device_allocates_are_typed_errors() {
    let device = Default::default();
    // 64 sequences x 8 KV heads x 2^22 tokens x 128 x 4 bytes: 1 TiB per K buffer (dense) and
    // hundreds of GB compressed, past any device's largest buffer, without overflowing usize.
    let config = KvCacheConfig::new(64, 8, 128, 1 << 22);
    let dense = DenseKvCache::<B>::new(&config, &device);
    assert!(
        matches!(&dense, Err(KvCacheError::Allocation { bytes, limit }) if *bytes as u64 > *limit),
        "{dense:?}"
    );
    let sparse = SparseKvCache::<B>::new(&config.clone().with_sparsity(0.7, 0.7), &device);
    assert!(
        matches!(&sparse, Err(KvCacheError::Allocation { .. })),
        "{sparse:?}"
    );
    let message = sparse.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("largest buffer"), "{message}");
    assert!(DenseKvCache::<B>::new(&KvCacheConfig::new(1, 8, 128, 1024), &device).is_ok());
}

/// Capacity planning: the bytes a configuration plans are the bytes its caches allocate, and
/// a model's caches that the device cannot hold are refused together, before any of them is
/// allocated, with a typed error naming the sizes. The device check needs a runtime that
/// reports its memory (CUDA); on wgpu (lavapipe) only the planned bytes are checked.
#[test]
fn caches_are_planned_before_they_are_allocated() {
    let device = Default::default();
    let config = KvCacheConfig::new(2, 4, 64, 1000)
        .with_sparsity(0.7, 0.5)
        .with_window(40);
    let sparse_bytes = config.sparse_cache_bytes().expect("valid");
    let dense_bytes = config.dense_cache_bytes().expect("valid");
    let sparse = LayerCaches::<SparseKvCache<B>>::sparse(3, &config, &device).expect("fits");
    let dense = LayerCaches::<DenseKvCache<Fused>>::dense(2, &config, &device).expect("fits");
    assert_eq!(sparse.layers().len(), 3);
    assert_eq!(dense.layers().len(), 2);
    for cache in sparse.layers() {
        assert_eq!(cache.allocated_bytes() as u64, sparse_bytes);
    }
    for cache in dense.layers() {
        assert_eq!(cache.allocated_bytes() as u64, dense_bytes);
    }
    // 8 streams (2 sequences x 4 KV heads), 1000 tokens, head_dim 64, f32 (FORMAT.md).
    let streams = 2 * 4;
    assert_eq!(dense_bytes, 2 * streams * 1000 * 64 * 4, "K and V");
    let bitmaps = 2 * streams * (1000 * 64 / 32) * 4;
    let values = streams * 1000 * (19 + 32) * 4; // K keeps 19 of 64, V 32
    let windows = 4 * streams * 104 * 64 * 4; // double-buffered K and V, window + chunk
    assert_eq!(sparse_bytes, bitmaps + values + windows);
    let bad = config.clone().with_sparsity(1.5, 0.5).sparse_cache_bytes();
    assert!(matches!(bad, Err(KvCacheError::Format(_))), "{bad:?}");

    let Some(memory) = B::device_memory(&device) else {
        eprintln!("this runtime does not report device memory: the device check runs on CUDA");
        return;
    };
    assert!(
        memory.available <= memory.total && memory.total > 0,
        "{memory:?}"
    );
    // Sixteen dense layers of an eighth of the device each: every buffer fits in one piece,
    // all of them together need twice the device.
    let tokens = (memory.total / 8 / (2 * 8 * 128 * 4)) as usize;
    let big = KvCacheConfig::new(1, 8, 128, tokens);
    let err = LayerCaches::<DenseKvCache<B>>::dense(16, &big, &device);
    match &err {
        Err(KvCacheError::DeviceMemory {
            needed, available, ..
        }) => assert!(needed > available, "{err:?}"),
        other => panic!("expected a device-memory error, got {other:?}"),
    }
    let message = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("16 dense cache(s)"), "{message}");
    let after = B::device_memory(&device).expect("reported before");
    // Nothing was allocated: what the device can give has not shrunk (by more than other
    // processes' noise of 256 MiB).
    assert!(
        after.available + (256 << 20) >= memory.available,
        "{memory:?} -> {after:?}"
    );
    // The same caches at s = 0.7 in a quarter of the layers fit.
    let sparse_big = big.clone().with_sparsity(0.7, 0.7);
    let needed = 4 * sparse_big.sparse_cache_bytes().expect("valid");
    assert!(needed < memory.available, "{needed} vs {memory:?}");
    let fits = LayerCaches::<SparseKvCache<B>>::sparse(4, &sparse_big, &device);
    assert!(fits.is_ok(), "{fits:?}");
}

/// The backend types Burn users write implement the extension: Burn's own aliases (fused, as
/// Burn's default features make them) and the bare `CubeBackend`.
#[test]
fn burns_own_backend_aliases_implement_the_extension() {
    fn implements<B: SparseKvBackend>() {}
    // With Burn's default features (its `fusion` feature; this crate turns it on too) the
    // aliases are the fused backend, so the `Fused` tests run the fusion path.
    let fused = std::any::type_name::<Fused>();
    assert!(fused.contains("Fusion<"), "{fused}");
    #[cfg(not(feature = "cuda"))]
    implements::<sparsekv::cache::burn::backend::Wgpu>();
    #[cfg(feature = "cuda")]
    implements::<sparsekv::cache::burn::backend::Cuda>();
    implements::<CubeBackend<Rt, half::f16, i32, u32>>();
}

/// After a GPU runtime's device thread panics, cache operations are typed errors instead of
/// work on dead buffers. The test runs itself again as a child process (the failure is
/// process-wide), where a thread named as CubeCL 0.10 names its device threads panics after
/// a cache has been created and used.
#[test]
fn a_failed_device_thread_makes_cache_operations_errors() {
    if std::env::var_os("SPARSEKV_DEVICE_PANIC_CHILD").is_some() {
        let device = Default::default();
        let config = KvCacheConfig::new(1, 1, 16, 64).with_sparsity(0.5, 0.5);
        let mut cache = SparseKvCache::<B>::new(&config, &device).expect("cache");
        let rows = |n: usize| Tensor::<B, 4>::ones([1, 1, n, 16], &device);
        cache
            .append(rows(4), rows(4))
            .expect("append before the failure");
        let failed = std::thread::Builder::new()
            .name("DSU-0-0".into())
            .spawn(|| panic!("simulated allocation failure"))
            .map(|t| t.join().is_err());
        assert_eq!(
            failed.ok(),
            Some(true),
            "the simulated device thread must panic"
        );
        let append = cache.append(rows(1), rows(1));
        let attend = cache.attend(Tensor::<B, 3>::ones([1, 2, 16], &device));
        let fresh = DenseKvCache::<B>::new(&config, &device);
        for (what, err) in [
            ("append", append.err()),
            ("attend", attend.err()),
            ("new", fresh.err()),
        ] {
            match err {
                Some(KvCacheError::DeviceThread(m))
                    if m.contains("simulated allocation failure") =>
                {
                    println!("device-thread error from {what}: {m}");
                }
                other => panic!("{what}: expected the device-thread error, got {other:?}"),
            }
        }
        return;
    }
    child_reports(
        "a_failed_device_thread_makes_cache_operations_errors",
        "SPARSEKV_DEVICE_PANIC_CHILD",
        "device-thread error from",
        &["append", "attend", "new"],
    );
}

/// Reruns the test `name` as a child (see [`common::rerun_as_child`]) and checks that it
/// succeeded and printed `"{prefix} {what}"` for every operation in `whats`.
fn child_reports(name: &str, env_var: &str, prefix: &str, whats: &[&str]) {
    let out = common::rerun_as_child(name, env_var);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stdout}\n{stderr}");
    for what in whats {
        assert!(
            stdout.contains(&format!("{prefix} {what}")),
            "{stdout}\n{stderr}"
        );
    }
}

/// On the fused backend an operation runs after its call returned: one that fails then (here a
/// row copy past its buffers, which only the kernel launcher checks) is recorded, and the
/// caches' next operations return it. The bare backend refuses the same call at once. Runs as
/// a child process (the record is process-wide).
#[test]
fn a_queued_operation_that_fails_makes_cache_operations_errors() {
    use sparsekv::cache::backend::RowCopy;
    use sparsekv::cache::burn::tensor::backend::Backend;
    use sparsekv::format::ValueType;
    if std::env::var_os("SPARSEKV_QUEUED_FAILURE_CHILD").is_some() {
        let device = Default::default();
        let config = KvCacheConfig::new(1, 1, 16, 64).with_sparsity(0.5, 0.5);
        let mut cache = SparseKvCache::<Fused>::new(&config, &device).expect("cache");
        let rows = |n: usize| Tensor::<Fused, 4>::ones([1, 1, n, 16], &device);
        cache.append(rows(4), rows(4)).expect("append before");
        // 100 rows of 16 f32 between buffers of 64 bytes.
        let copy = RowCopy {
            sequences: 1,
            kv_heads: 1,
            head_dim: HeadDim::new(16).expect("valid"),
            src_capacity: 100,
            dst_capacity: 100,
            src_start: vec![0],
            dst_start: vec![0],
            counts: vec![100],
        };
        let small = || Fused::kv_alloc(&device, 64).expect("buffer");
        let (src, dst) = (small(), small());
        let bare = B::kv_copy_rows(
            &device,
            &[(src.inner(), dst.inner())],
            ValueType::F32,
            &copy,
        );
        assert!(bare.is_err(), "the bare backend must refuse at once");
        Fused::kv_copy_rows(&device, &[(&src, &dst)], ValueType::F32, &copy)
            .expect("queued: checked only when it runs");
        Fused::sync(&device).expect("sync");
        let append = cache.append(rows(1), rows(1));
        let attend = cache.attend(Tensor::<Fused, 3>::ones([1, 2, 16], &device));
        for (what, err) in [("append", append.err()), ("attend", attend.err())] {
            match err {
                Some(KvCacheError::QueuedOperation(m)) if m.contains("sparsekv_copy_rows") => {
                    println!("queued-operation error from {what}: {m}");
                }
                other => panic!("{what}: expected the queued-operation error, got {other:?}"),
            }
        }
        return;
    }
    child_reports(
        "a_queued_operation_that_fails_makes_cache_operations_errors",
        "SPARSEKV_QUEUED_FAILURE_CHILD",
        "queued-operation error from",
        &["append", "attend"],
    );
}

/// `SparseKvBackend::kv_expand_context` (what a streaming chunk's attention reads on CUDA)
/// through the backend extension on both backend types: compressed streams and windows
/// filled by the extension's own operations, then expanded, must equal the oracle's
/// decompressed rows, then the window's rows, then zeros. On the fused backend this is the
/// queued operation with two outputs and six ordered buffers.
fn expanded_context_matches_the_oracle<B: SparseKvBackend>() {
    use sparsekv::cache::backend::{CompressedStreams, ContextLayout, DenseRows, RowCopy, Segment};
    use sparsekv::format::{ValueType, layout};
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let device: B::Device = Default::default();
    for case in 0..3 {
        let (b, kv_heads) = (rng.random_range(1..=2), rng.random_range(1..=2));
        let d = [16, 64][rng.random_range(0..2)];
        let hd = HeadDim::new(d).expect("head_dim");
        let (ks, vs) = (
            Sparsity::new([0.0, 0.5, 0.7][rng.random_range(0..3)]).expect("sparsity"),
            Sparsity::new([0.0, 0.5, 0.7][rng.random_range(0..3)]).expect("sparsity"),
        );
        let n = 40;
        let compressed: Vec<u32> = (0..b).map(|_| rng.random_range(0..=30)).collect();
        let window: Vec<u32> = compressed
            .iter()
            .map(|&c| rng.random_range(0..=(n as u32 - c).min(10)))
            .collect();
        let context = n + 3;
        let (capacity, window_capacity) = (layout::aligned_capacity(n), 16);
        let streams = b * kv_heads;
        // The rows each stream's tokens come from: [b, kv_heads, n, d] per K and V.
        let rows: Vec<Vec<f32>> = (0..2).map(|_| normals(&mut rng, streams * n * d)).collect();
        let tensor = |x: &[f32]| {
            Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), [b, kv_heads, n, d]), &device)
                .into_primitive()
                .tensor()
        };
        let alloc = |bytes: usize| B::kv_alloc(&device, bytes).expect("alloc");
        let bitmap_bytes = streams * layout::bitmap_words(capacity, hd) * 4;
        let dest = |s: Sparsity| CompressedStreams::<B> {
            bitmap: alloc(bitmap_bytes),
            values: alloc(streams * capacity * keep_count(s, hd) * 4),
            sparsity: s,
        };
        let (k_dest, v_dest) = (dest(ks), dest(vs));
        let win = DenseRows::<B> {
            k: alloc(streams * window_capacity * d * 4),
            v: alloc(streams * window_capacity * d * 4),
            capacity: window_capacity,
        };
        let copy = |dst_capacity, src_start: Vec<u32>, counts: Vec<u32>| RowCopy {
            sequences: b,
            kv_heads,
            head_dim: hd,
            src_capacity: n,
            dst_capacity,
            src_start,
            dst_start: vec![0; b],
            counts,
        };
        // The oldest `compressed[s]` rows compressed, the next `window[s]` into the window.
        B::kv_compress_rows(
            vec![
                (tensor(&rows[0]), k_dest.clone()),
                (tensor(&rows[1]), v_dest.clone()),
            ],
            ValueType::F32,
            &copy(capacity, vec![0; b], compressed.clone()),
        )
        .expect("compress");
        B::kv_write_rows(
            &[(tensor(&rows[0]), &win.k), (tensor(&rows[1]), &win.v)],
            ValueType::F32,
            &copy(window_capacity, compressed.clone(), window.clone()),
        )
        .expect("window rows");
        let segment = Segment::<B> {
            k_bitmap: k_dest.bitmap.clone(),
            k_values: k_dest.values.clone(),
            v_bitmap: v_dest.bitmap.clone(),
            v_values: v_dest.values.clone(),
            capacity,
            k_sparsity: ks,
            v_sparsity: vs,
        };
        let layout = ContextLayout {
            kv_heads,
            head_dim: hd,
            value_type: ValueType::F32,
            compressed_lens: compressed.clone(),
            dense_lens: window.clone(),
            context,
        };
        let expanded = B::kv_expand_context(&device, &segment, &win, &layout).expect("expand");
        for (kind, (out, s)) in expanded.into_iter().zip([ks, vs]).enumerate() {
            let got: Vec<f32> = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(out))
                .into_data()
                .to_vec::<f32>()
                .expect("f32");
            assert_eq!(got.len(), streams * context * d);
            for st in 0..streams {
                let (tc, tw) = (
                    compressed[st / kv_heads] as usize,
                    window[st / kv_heads] as usize,
                );
                let src: Vec<f64> = rows[kind][st * n * d..(st + 1) * n * d]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                let old = DenseBlock::new(src[..tc * d].to_vec(), tc, hd).expect("block");
                let mut expect = oracle::compress(&old, s).decompress().data().to_vec();
                expect.extend_from_slice(&src[tc * d..(tc + tw) * d]);
                expect.resize(context * d, 0.0);
                let stream: Vec<f64> = got[st * context * d..(st + 1) * context * d]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                assert_eq!(
                    stream,
                    expect,
                    "case {case}, {} stream {st} ({tc} compressed, {tw} window, head_dim {d}), SPARSEKV_SEED={seed}",
                    ["keys", "values"][kind]
                );
            }
        }
    }
}

#[test]
fn expanded_context_matches_the_oracle_on_both_backends() {
    expanded_context_matches_the_oracle::<B>();
    expanded_context_matches_the_oracle::<Fused>();
}
