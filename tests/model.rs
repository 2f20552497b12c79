//! The Llama decoder against llama2.c's own output, through both caches, plus malformed
//! inputs. The models are read from `$SPARSEKV_SHARED/models` (default `../shared`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;

use proptest::prelude::*;
use sparsekv::cache::burn::tensor::Tensor;
use sparsekv::cache::burn_cubecl::CubeBackend;
use sparsekv::cache::{
    DenseKvCache, KvCache, KvCacheConfig, LayerCaches, PrefillPolicy, PruneStrategy,
    SparseKvBackend, SparseKvCache,
};
use sparsekv::format::ValueType;
use sparsekv::llama::tokenizer::{BOS, Llama2cTokenizer};
use sparsekv::llama::{
    CacheKind, EvalCase, Llama, LlamaError, Pretrained, Sampling, Target, evaluate, generate,
    generate_batch, load_hf, load_llama2c, text_windows,
};

mod common;

use common::{Fused, Rt};
/// The bare backend: CubeCL kernels launched at once.
type B = CubeBackend<Rt, f32, i32, u32>;

/// llama2.c's `run.c`, temperature 0, 64 steps, prompt "Once upon a time" (shared/models/README.md).
const REFERENCE: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily";

fn shared() -> PathBuf {
    let dir =
        PathBuf::from(std::env::var("SPARSEKV_SHARED").unwrap_or_else(|_| "../shared".into()));
    let probe = dir.join("models/stories260K/stories260K.bin");
    assert!(
        probe.exists(),
        "test data not found at {}: set SPARSEKV_SHARED to the folder holding models/ and data/",
        probe.display()
    );
    dir
}

fn stories<B: SparseKvBackend>() -> (Llama<B>, Llama2cTokenizer) {
    let dir = shared().join("models/stories260K");
    let weights = load_llama2c(dir.join("stories260K.bin")).expect("checkpoint");
    let tok = Llama2cTokenizer::load(dir.join("tok512.bin"), weights.config.vocab_size)
        .expect("tokenizer");
    (
        Llama::new(&weights, &Default::default()).expect("model"),
        tok,
    )
}

fn config<B: SparseKvBackend>(model: &Llama<B>, sparsity: f64) -> KvCacheConfig {
    let c = model.config();
    KvCacheConfig::new(1, c.n_kv_heads, c.head_dim(), c.max_seq).with_sparsity(sparsity, sparsity)
}

fn run<B: SparseKvBackend, C: KvCache<B>>(
    model: &Llama<B>,
    caches: &mut [C],
    prompt: &[u32],
) -> Vec<u32> {
    generate(model, caches, prompt, 65, &[], &Sampling::default(), |_| {}).expect("generate")
}

#[test]
fn stories260k_reproduces_llama2c_with_both_caches() {
    stories260k_reference::<B>();
}

/// The same through Burn's fused backend (`burn::backend::Wgpu` / `Cuda` as Burn's default
/// features make them).
#[test]
fn fused_backend_stories260k_reproduces_llama2c_with_both_caches() {
    stories260k_reference::<Fused>();
}

fn stories260k_reference<B: SparseKvBackend>() {
    let (model, tok) = stories::<B>();
    let prompt = tok.encode("Once upon a time", true).expect("encode");
    assert_eq!(prompt, [1, 403, 407, 261, 378]);
    let layers = model.config().n_layers;
    let device = Default::default();

    let mut dense: Vec<DenseKvCache<B>> = (0..layers)
        .map(|_| DenseKvCache::new(&config(&model, 0.0), &device).expect("cache"))
        .collect();
    let dense_tokens = run(&model, &mut dense, &prompt);
    assert_eq!(tok.decode(&dense_tokens), REFERENCE, "dense cache");

    // A small window, so that most of the context is compressed (losslessly at sparsity 0).
    let small = config(&model, 0.0).with_window(8).with_chunk(16);
    let mut sparse: Vec<SparseKvCache<B>> = (0..layers)
        .map(|_| SparseKvCache::new(&small, &device).expect("cache"))
        .collect();
    let sparse_tokens = run(&model, &mut sparse, &prompt);
    assert_eq!(
        tok.decode(&sparse_tokens),
        REFERENCE,
        "sparse cache at sparsity 0"
    );
    assert!(
        sparse[0].compressed_lengths()[0] >= 40,
        "most of the run must be compressed: {:?}",
        sparse[0].compressed_lengths()
    );

    for s in [0.5, 0.7] {
        let mut caches: Vec<SparseKvCache<B>> = (0..layers)
            .map(|_| SparseKvCache::new(&config(&model, s), &device).expect("cache"))
            .collect();
        let tokens = run(&model, &mut caches, &prompt);
        assert_eq!(tokens.len(), 65);
        // While the whole context fits the dense window nothing is pruned: the next token
        // (chosen from a context of at most `window` tokens) is the dense run's.
        let window = config(&model, s).window;
        assert_eq!(tokens[..=window], dense_tokens[..=window], "sparsity {s}");
    }
}

/// llama2.c checkpoints stop at BOS as well as EOS, as `run.c` does (a BOS starts the next
/// story).
#[test]
fn llama2c_checkpoints_stop_at_bos_and_eos() {
    let dir = shared().join("models/stories260K");
    let pre = Pretrained::load_llama2c(dir.join("stories260K.bin"), dir.join("tok512.bin"))
        .expect("llama2.c model");
    assert!(
        pre.eos.contains(&BOS) && pre.eos.contains(&2),
        "{:?}",
        pre.eos
    );
}

#[test]
fn tokenizer_round_trips() {
    let (_, tok) = stories::<B>();
    for text in [
        "Once upon a time",
        "Hello, world! 123",
        "naïve café ☕",
        "a\nb",
    ] {
        let ids = tok.encode(text, true).expect("encode");
        assert_eq!(ids[0], BOS);
        assert_eq!(tok.decode(&ids), text);
    }
}

/// Greedy ids of tinystories-656K for "Once upon a time", 64 tokens counting the prompt, from
/// `scripts/hf_reference.py` (an independent float64 NumPy implementation of Hugging Face's
/// Llama with the Python `tokenizers` package; its smallest top-1/top-2 logit gap on the way
/// is 0.0048, far above f32 rounding). EOS never comes within the 64 tokens.
const TINYSTORIES_GOLDEN: [u32; 64] = [
    1, 80, 147, 201, 282, 57, 313, 598, 303, 1049, 1468, 267, 628, 333, 94, 1210, 263, 251, 604,
    94, 1030, 94, 1030, 94, 436, 220, 1053, 615, 303, 328, 552, 319, 1269, 163, 1945, 897, 645,
    1188, 108, 319, 135, 448, 563, 1799, 1380, 1067, 163, 1855, 325, 825, 1896, 274, 108, 521,
    1858, 204, 1803, 94, 1252, 444, 666, 309, 448, 825,
];

fn tinystories<B: SparseKvBackend>() -> (Llama<B>, Pretrained) {
    let pre = Pretrained::load_dir(shared().join("models/tinystories-656K")).expect("load");
    (
        Llama::new(&pre.weights, &Default::default()).expect("model"),
        pre,
    )
}

#[test]
fn tinystories_656k_matches_the_reference_with_both_caches() {
    tinystories_reference::<B>();
}

/// The same through Burn's fused backend.
#[test]
fn fused_backend_tinystories_656k_matches_the_reference_with_both_caches() {
    tinystories_reference::<Fused>();
}

fn tinystories_reference<B: SparseKvBackend>() {
    let (model, pre) = tinystories::<B>();
    let c = model.config();
    assert_eq!((c.dim, c.n_layers, c.head_dim()), (128, 2, 16));
    assert_eq!(pre.eos, [2]);
    assert!(pre.chat_template.is_none());
    let prompt = pre
        .tokenizer
        .encode("Once upon a time", true)
        .expect("encode");
    assert_eq!(prompt, TINYSTORIES_GOLDEN[..6]);
    let device = Default::default();
    let layers = c.n_layers;
    let run_sparse = |caches: &mut Vec<SparseKvCache<B>>| {
        generate(
            &model,
            caches,
            &prompt,
            64,
            &pre.eos,
            &Sampling::default(),
            |_| {},
        )
        .expect("generate")
    };
    let mut dense: Vec<DenseKvCache<B>> = (0..layers)
        .map(|_| DenseKvCache::new(&config(&model, 0.0), &device).expect("cache"))
        .collect();
    let dense_tokens = generate(
        &model,
        &mut dense,
        &prompt,
        64,
        &pre.eos,
        &Sampling::default(),
        |_| {},
    )
    .expect("generate");
    assert_eq!(dense_tokens, TINYSTORIES_GOLDEN, "dense cache");
    assert!(
        pre.tokenizer
            .decode(&dense_tokens)
            .expect("decode")
            .contains("a little girl named Lily lived in a small house")
    );

    let small = config(&model, 0.0).with_window(8).with_chunk(16);
    let mut sparse: Vec<SparseKvCache<B>> = (0..layers)
        .map(|_| SparseKvCache::new(&small, &device).expect("cache"))
        .collect();
    assert_eq!(
        run_sparse(&mut sparse),
        TINYSTORIES_GOLDEN,
        "sparse cache at sparsity 0"
    );
    for s in [0.5, 0.7] {
        let cfg = config(&model, s);
        let mut caches: Vec<SparseKvCache<B>> = (0..layers)
            .map(|_| SparseKvCache::new(&cfg, &device).expect("cache"))
            .collect();
        let tokens = run_sparse(&mut caches);
        assert_eq!(tokens.len(), 64);
        assert_eq!(
            tokens[..=cfg.window],
            dense_tokens[..=cfg.window],
            "sparsity {s}"
        );
    }
}

#[test]
fn hf_tokenizer_round_trips_and_streams() {
    let (_, pre) = tinystories::<B>();
    let tok = &pre.tokenizer;
    for text in [
        "Once upon a time",
        "Hello, world! 123",
        "a\nb",
        "Tom said, \"No.\"",
    ] {
        let ids = tok.encode(text, false).expect("encode");
        assert_ne!(ids.first(), Some(&1), "no BOS without special tokens");
        assert_eq!(tok.decode(&ids).expect("decode"), text);
        let with_bos = tok.encode(text, true).expect("encode");
        assert_eq!(with_bos[0], 1);
        assert_eq!(with_bos[1..], ids[..]);
        // Streaming after a prompt gives the same text as decoding at once.
        let (head, tail) = ids.split_at(ids.len() / 2);
        let mut stream = tok.stream(head).expect("stream");
        let streamed: String = tail
            .iter()
            .map(|&t| stream.step(t).expect("step"))
            .collect();
        let whole = tok.decode(&ids).expect("decode");
        let first = tok.decode(head).expect("decode");
        assert_eq!(format!("{first}{streamed}"), whole, "{text:?}");
    }
    // Characters outside the 2048-token vocabulary become <unk> (id 0).
    assert!(tok.encode("café", false).expect("encode").contains(&0));
}

#[test]
fn batched_ragged_generation_equals_one_prompt_at_a_time() {
    let (model, tok) = stories::<B>();
    let prompts: Vec<Vec<u32>> = [
        "Once upon a time",
        "The dog",
        "Lily and Tom went to the park",
    ]
    .iter()
    .map(|p| tok.encode(p, true).expect("encode"))
    .collect();
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let c = model.config();
    let device = Default::default();
    let sampling = Sampling {
        temperature: 0.8,
        top_p: 0.9,
        seed: 5,
    };
    for s in [0.0, 0.7] {
        let cfg = |batch| {
            KvCacheConfig::new(batch, c.n_kv_heads, c.head_dim(), 80)
                .with_sparsity(s, s)
                .with_window(8)
                .with_chunk(16)
        };
        let mut caches: Vec<SparseKvCache<B>> = (0..c.n_layers)
            .map(|_| SparseKvCache::new(&cfg(3), &device).expect("cache"))
            .collect();
        let mut streamed = vec![Vec::new(); 3];
        let batch = generate_batch(&model, &mut caches, &refs, 60, &[], &sampling, |seq, t| {
            streamed[seq].push(t)
        })
        .expect("batch");
        for (i, p) in refs.iter().enumerate() {
            let mut one: Vec<SparseKvCache<B>> = (0..c.n_layers)
                .map(|_| SparseKvCache::new(&cfg(1), &device).expect("cache"))
                .collect();
            let alone = Sampling {
                seed: sampling.seed + i as u64,
                ..sampling.clone()
            };
            let single = generate(&model, &mut one, p, 60, &[], &alone, |_| {}).expect("generate");
            assert_eq!(batch[i], single, "sequence {i}, sparsity {s}");
            assert_eq!(batch[i][p.len()..], streamed[i][..]);
            assert_eq!(batch[i].len(), 60);
        }
    }
}

#[test]
fn malformed_hf_directories_are_errors() {
    let src = shared().join("models/tinystories-656K");
    let dir = std::env::temp_dir().join(format!("sparsekv-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let config = std::fs::read_to_string(src.join("config.json")).expect("read");
    let weights = std::fs::read(src.join("model.safetensors")).expect("read");
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).expect("write");

    // Missing weights, then truncated weights.
    write("config.json", config.as_bytes());
    assert!(matches!(load_hf(&dir), Err(LlamaError::Invalid(_))));
    write("model.safetensors", &weights[..weights.len() / 2]);
    assert!(matches!(load_hf(&dir), Err(LlamaError::Malformed { .. })));
    // A header length far past the file's end.
    let mut huge = weights.clone();
    huge[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    write("model.safetensors", &huge);
    assert!(matches!(load_hf(&dir), Err(LlamaError::Malformed { .. })));
    // Well-formed weights whose shapes disagree with the config.
    write("model.safetensors", &weights);
    assert!(load_hf(&dir).is_ok());
    write(
        "config.json",
        config
            .replace("\"intermediate_size\": 384", "\"intermediate_size\": 512")
            .as_bytes(),
    );
    let err = load_hf(&dir).expect_err("shape mismatch");
    assert!(err.to_string().contains("shape"), "{err}");
    // Configs that are not JSON, or describe something else.
    write("config.json", b"{\"hidden_size\": ");
    assert!(matches!(load_hf(&dir), Err(LlamaError::Malformed { .. })));
    write(
        "config.json",
        config.replace("\"llama\"", "\"gpt2\"").as_bytes(),
    );
    assert!(matches!(load_hf(&dir), Err(LlamaError::Malformed { .. })));
    // A shard index that points outside the directory.
    std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
    write("config.json", config.as_bytes());
    write(
        "model.safetensors.index.json",
        br#"{"weight_map": {"lm_head.weight": "../model.safetensors"}}"#,
    );
    assert!(matches!(load_hf(&dir), Err(LlamaError::Malformed { .. })));
    // A broken tokenizer.json.
    write("tokenizer.json", b"{\"version\": \"1.0\", \"model\": 3}");
    assert!(matches!(
        sparsekv::llama::Tokenizer::from_hf_file(dir.join("tokenizer.json")),
        Err(LlamaError::Malformed { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same weights as shards with an index, and converted to f16 and bf16, load to the
/// values the single f32 file gives (after the conversion's rounding).
#[test]
fn sharded_and_half_precision_weights_load() {
    use safetensors::tensor::{Dtype, SafeTensors, TensorView, serialize_to_file};
    let src = shared().join("models/tinystories-656K");
    let reference = load_hf(&src).expect("load");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let dir = std::env::temp_dir().join(format!("sparsekv-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).expect("copy");

    // Two f32 shards and their index.
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = Vec::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let views: Vec<(String, TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).expect("tensor")))
            .collect();
        serialize_to_file(views, None, &dir.join(file)).expect("write shard");
        map.extend(part.iter().map(|n| format!("\"{n}\": \"{file}\"")));
    }
    let index = format!("{{\"weight_map\": {{{}}}}}", map.join(", "));
    std::fs::write(dir.join("model.safetensors.index.json"), index).expect("write index");
    let sharded = load_hf(&dir).expect("sharded");
    assert_eq!(sharded.embedding, reference.embedding);
    assert_eq!(sharded.layers[1].w2, reference.layers[1].w2);
    assert_eq!(sharded.final_norm, reference.final_norm);

    // One f16 file and one bf16 file.
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ] {
        std::fs::remove_file(dir.join(f)).expect("rm");
    }
    for dtype in [Dtype::F16, Dtype::BF16] {
        let round = |x: f32| match dtype {
            Dtype::F16 => half::f16::from_f32(x).to_f32(),
            _ => half::bf16::from_f32(x).to_f32(),
        };
        let converted: Vec<(String, Vec<u8>, Vec<usize>)> = names
            .iter()
            .map(|n| {
                let t = st.tensor(n).expect("tensor");
                let data = t
                    .data()
                    .chunks_exact(4)
                    .flat_map(|b| {
                        let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        match dtype {
                            Dtype::F16 => half::f16::from_f32(x).to_le_bytes(),
                            _ => half::bf16::from_f32(x).to_le_bytes(),
                        }
                    })
                    .collect();
                (n.clone(), data, t.shape().to_vec())
            })
            .collect();
        let views: Vec<(String, TensorView)> = converted
            .iter()
            .map(|(n, d, s)| {
                (
                    n.clone(),
                    TensorView::new(dtype, s.clone(), d).expect("view"),
                )
            })
            .collect();
        serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write");
        let size = std::fs::metadata(dir.join("model.safetensors"))
            .expect("stat")
            .len();
        assert!(
            size < bytes.len() as u64 * 6 / 10,
            "{dtype:?} file of {size} bytes"
        );
        let loaded = load_hf(&dir).expect("half");
        for (got, want) in [
            (&loaded.layers[0].wq, &reference.layers[0].wq),
            (&loaded.embedding, &reference.embedding),
        ] {
            let rounded: Vec<f32> = want.iter().map(|&x| round(x)).collect();
            assert!(
                *got == rounded,
                "{dtype:?} weights differ from the rounded f32 ones"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("sparsekv-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

#[test]
fn malformed_checkpoints_and_tokenizers_are_errors() {
    let dir = shared().join("models/stories260K");
    let bin = std::fs::read(dir.join("stories260K.bin")).expect("read");
    let truncated = temp_file("truncated.bin", &bin[..bin.len() / 2]);
    assert!(matches!(
        load_llama2c(&truncated),
        Err(LlamaError::Malformed { .. })
    ));
    let mut huge = bin.clone();
    huge[0..4].copy_from_slice(&(1i32 << 30).to_le_bytes());
    assert!(matches!(
        load_llama2c(temp_file("huge.bin", &huge)),
        Err(LlamaError::Malformed { .. })
    ));
    assert!(matches!(
        load_llama2c(temp_file("empty.bin", &[])),
        Err(LlamaError::Malformed { .. })
    ));
    assert!(matches!(
        load_llama2c(dir.join("missing.bin")),
        Err(LlamaError::Io { .. })
    ));
    let tok = std::fs::read(dir.join("tok512.bin")).expect("read");
    assert!(matches!(
        Llama2cTokenizer::load(temp_file("tok.bin", &tok[..tok.len() - 7]), 512),
        Err(LlamaError::Malformed { .. })
    ));
    let mut bad_len = tok.clone();
    bad_len[8..12].copy_from_slice(&(-5i32).to_le_bytes());
    assert!(matches!(
        Llama2cTokenizer::load(temp_file("badlen.bin", &bad_len), 512),
        Err(LlamaError::Malformed { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Corrupting or cutting the files never panics: it loads or gives a typed error.
    #[test]
    fn parsers_never_panic(cut in 0usize..7000, flips in prop::collection::vec((0usize..64, any::<u8>()), 0..6)) {
        let dir = shared().join("models/stories260K");
        let mut tok = std::fs::read(dir.join("tok512.bin")).expect("read");
        tok.truncate(cut.min(tok.len()));
        let mut bin = std::fs::read(dir.join("stories260K.bin")).expect("read");
        for &(at, byte) in &flips {
            if at < tok.len() { tok[at] = byte; }
            bin[at % 28] = byte;
        }
        let _ = Llama2cTokenizer::load(temp_file("prop-tok.bin", &tok), 512);
        let _ = load_llama2c(temp_file("prop.bin", &bin));
    }

    /// Corrupting the safetensors header or cutting the file never panics either.
    #[test]
    fn safetensors_loader_never_panics(cut in 0usize..3_000_000, flips in prop::collection::vec((0usize..4096, any::<u8>()), 0..6)) {
        let src = shared().join("models/tinystories-656K");
        let dir = std::env::temp_dir().join(format!("sparsekv-prop-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(src.join("config.json"), dir.join("config.json")).expect("copy");
        let mut weights = std::fs::read(src.join("model.safetensors")).expect("read");
        for &(at, byte) in &flips {
            weights[at] = byte;
        }
        weights.truncate(cut.min(weights.len()));
        std::fs::write(dir.join("model.safetensors"), &weights).expect("write");
        let _ = load_hf(&dir);
    }
}

/// A small slice of the TinyStories validation text, cut into evaluation windows.
fn eval_windows(pre: &Pretrained, windows: usize, seq_len: usize) -> Vec<Vec<u32>> {
    let path = shared().join("data/tinystories_val.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (set SPARSEKV_SHARED)", path.display()));
    let w = text_windows(&pre.tokenizer, &text, seq_len, windows * (seq_len - 1)).expect("windows");
    assert_eq!(w.len(), windows);
    assert!(w.iter().all(|x| x.len() == seq_len && x[0] == 1));
    w
}

fn eval_case(cache: CacheKind, target: Target, sparsity: f64, window: usize) -> EvalCase {
    EvalCase {
        cache,
        target,
        sparsity,
        window,
        prompt: None,
    }
}

#[test]
fn evaluation_at_sparsity_zero_reproduces_dense_for_every_strategy() {
    let (model, pre) = tinystories::<B>();
    let windows = eval_windows(&pre, 2, 40);
    let device = Default::default();
    let score = |case: EvalCase, chunk: usize| {
        evaluate(
            &model,
            &windows,
            &case,
            chunk,
            ValueType::F32,
            &device,
            || {},
        )
        .expect("eval")
    };
    let dense = score(eval_case(CacheKind::Dense, Target::Both, 0.0, 0), 8);
    assert_eq!(dense.tokens(), 2 * 39);
    assert!(dense.mean_nll().is_finite() && dense.mean_nll() > 0.0);
    // The dense run really scores the text: its perplexity is far below the vocabulary's.
    assert!(
        dense.perplexity() < 200.0,
        "dense perplexity {}",
        dense.perplexity()
    );
    for strategy in PruneStrategy::ALL {
        for window in [0, 4] {
            let masked = score(
                eval_case(CacheKind::Masked(strategy), Target::Keys, 0.0, window),
                8,
            );
            // Nothing is pruned, the same dense kernel runs: bit for bit the dense numbers.
            assert_eq!(masked, dense, "{} window {window}", strategy.name());
        }
    }
    let compressed = score(eval_case(CacheKind::Compressed, Target::Both, 0.0, 0), 8);
    assert_eq!(compressed.top1, dense.top1);
    let rel = (compressed.mean_nll() - dense.mean_nll()).abs() / dense.mean_nll();
    assert!(
        rel < 1e-6,
        "compressed cache at sparsity 0: relative NLL difference {rel:e}"
    );
}

#[test]
fn mask_simulation_of_per_token_magnitude_equals_the_compressed_cache() {
    let (model, pre) = tinystories::<B>();
    let windows = eval_windows(&pre, 2, 48);
    let device = Default::default();
    let score = |case: EvalCase| {
        evaluate(&model, &windows, &case, 8, ValueType::F32, &device, || {}).expect("eval")
    };
    let dense = score(eval_case(CacheKind::Dense, Target::Both, 0.0, 0));
    for (target, sparsity, window) in [(Target::Both, 0.7, 0), (Target::Keys, 0.5, 4)] {
        let compressed = score(eval_case(CacheKind::Compressed, target, sparsity, window));
        let masked = score(eval_case(
            CacheKind::Masked(PruneStrategy::PerTokenMagnitude),
            target,
            sparsity,
            window,
        ));
        let rel = (compressed.mean_nll() - masked.mean_nll()).abs() / masked.mean_nll();
        assert!(
            rel < 1e-5,
            "{target:?} s={sparsity}: relative NLL difference {rel:e}"
        );
        assert!(compressed.agreement(&masked).expect("same shape") > 0.99);
        // Pruning happened: the numbers moved away from dense.
        assert_ne!(
            compressed.nll, dense.nll,
            "{target:?} s={sparsity} left the model unchanged"
        );
    }
    // Every simulated strategy prunes: at 0.7 none reproduces the dense scores.
    for strategy in PruneStrategy::ALL {
        let masked = score(eval_case(CacheKind::Masked(strategy), Target::Keys, 0.7, 0));
        assert_ne!(masked.nll, dense.nll, "{} pruned nothing", strategy.name());
        assert!(masked.mean_nll().is_finite());
    }
}

#[test]
fn evaluation_rejects_bad_arguments() {
    let (model, pre) = tinystories::<B>();
    let device = Default::default();
    assert!(text_windows(&pre.tokenizer, "Once upon a time.", 64, 100).is_err());
    assert!(text_windows(&pre.tokenizer, "Once upon a time.", 1, 100).is_err());
    // --max-tokens is an upper bound: 50 tokens with windows of 16 (15 scored) is 3 windows,
    // and fewer than one window's worth is an error.
    let text =
        "Once upon a time there was a little girl who loved to play in the park. ".repeat(20);
    let w = text_windows(&pre.tokenizer, &text, 16, 50).expect("windows");
    assert_eq!(w.len(), 3);
    assert!(text_windows(&pre.tokenizer, &text, 16, 14).is_err());
    let windows = eval_windows(&pre, 1, 16);
    // ThinK prunes keys only.
    let think_values = eval_case(
        CacheKind::Masked(PruneStrategy::ThinkKeys),
        Target::Both,
        0.5,
        0,
    );
    assert!(
        evaluate(
            &model,
            &windows,
            &think_values,
            8,
            ValueType::F32,
            &device,
            || {}
        )
        .is_err()
    );
    // Ragged windows and windows past the model's context are refused.
    let ragged = vec![windows[0].clone(), windows[0][..8].to_vec()];
    let dense = eval_case(CacheKind::Dense, Target::Both, 0.0, 0);
    assert!(evaluate(&model, &ragged, &dense, 8, ValueType::F32, &device, || {}).is_err());
    let long = vec![vec![1u32; model.config().max_seq + 1]];
    assert!(evaluate(&model, &long, &dense, 8, ValueType::F32, &device, || {}).is_err());
}

/// Prefill attention runs in blocks of queries (memory O(block x prompt), not O(prompt²)):
/// blocks of 5 and 1 queries give the logits of one block for the whole prompt, on both shared
/// models (tinystories-656K has grouped KV heads), for a ragged batch.
#[test]
fn blockwise_prefill_matches_one_block() {
    let (stories_model, tok) = stories::<B>();
    let (tiny_model, _) = tinystories::<B>();
    let prompt = tok
        .encode(
            "Once upon a time, there was a little girl named Lily. She loved",
            true,
        )
        .expect("encode");
    let short = &prompt[..7];
    for mut model in [stories_model, tiny_model] {
        let c = model.config().clone();
        let logits = |model: &Llama<B>| {
            let mut caches: Vec<DenseKvCache<B>> = (0..c.n_layers)
                .map(|_| {
                    let cfg = KvCacheConfig::new(2, c.n_kv_heads, c.head_dim(), 64);
                    DenseKvCache::new(&cfg, &Default::default()).expect("cache")
                })
                .collect();
            model
                .prefill_batch(&[&prompt, short], &mut caches)
                .expect("prefill")
                .into_data()
                .to_vec::<f32>()
                .expect("f32")
        };
        let whole = logits(&model);
        for block in [5, 1] {
            model.set_prefill_block(Some(block));
            let blocked = logits(&model);
            let worst = whole
                .iter()
                .zip(&blocked)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4 && blocked.iter().all(|x| x.is_finite()),
                "block {block}: max difference {worst}"
            );
        }
        assert!(prompt.len() > 10, "the prompt must span several blocks");
    }
}

/// A prompt's per-token blocks (QKV projection with RoPE, feed-forward) in chunks of rows
/// (what keeps a long prompt's transients small) give the logits of one piece, for a ragged
/// batch on stories260K.
#[test]
fn prompt_blocks_in_chunks_match_one_piece() {
    let (mut model, tok) = stories::<B>();
    let c = model.config().clone();
    let device = Default::default();
    let long = tok
        .encode(
            "Once upon a time, there was a little girl named Lily who loved to play",
            true,
        )
        .expect("encode");
    let short = &long[..5];
    let mut logits = |rows: usize| {
        model.set_prompt_rows(rows);
        let cfg = KvCacheConfig::new(2, c.n_kv_heads, c.head_dim(), c.max_seq);
        let mut caches = LayerCaches::<DenseKvCache<B>>::dense(c.n_layers, &cfg, &device)
            .expect("caches")
            .into_layers();
        model
            .prefill_batch(&[&long, short], &mut caches)
            .expect("prefill")
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
    };
    let whole = logits(usize::MAX);
    let chunked = logits(7);
    let largest = whole.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = whole
        .iter()
        .zip(&chunked)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        largest > 0.0 && chunked.iter().all(|x| x.is_finite()) && worst <= 1e-4 * largest,
        "max difference {worst} (largest logit {largest})"
    );
}

/// A decode step runs at the position its caches hold (the caches are the one record of
/// positions): prefilling a prompt and decoding one more token gives that token the logits a
/// prefill of the longer prompt gives it; caches whose layers hold different tokens are
/// refused with a typed error.
#[test]
fn decode_positions_come_from_the_caches() {
    let (model, _) = stories::<B>();
    let c = model.config().clone();
    let device = Default::default();
    let cfg = config(&model, 0.0);
    let prompt = [BOS, 403, 407, 261, 378];
    let caches = || {
        LayerCaches::<DenseKvCache<B>>::dense(c.n_layers, &cfg, &device)
            .expect("caches")
            .into_layers()
    };
    let mut short = caches();
    model.prefill(&prompt[..4], &mut short).expect("prefill");
    let stepped = model.decode(prompt[4], &mut short).expect("decode");
    let whole = model.prefill(&prompt, &mut caches()).expect("prefill");
    let (a, b) = (
        stepped.into_data().to_vec::<f32>().expect("f32"),
        whole.into_data().to_vec::<f32>().expect("f32"),
    );
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    // The prefill's projections run on the prompt matmul (Burn's for f32, TF32 on CUDA), the
    // decode step's on the f32 skinny matmul: the tolerance follows the measured precision
    // of Burn's matmul here, as in the streaming test below.
    let largest = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let tolerance = 1e-4 + 10.0 * burn_matmul_error(&mut rng, c.dim) * largest;
    assert!(
        diff < tolerance,
        "max logit difference {diff} (tolerance {tolerance})"
    );

    // One layer one token ahead of the others.
    let kv = |n| Tensor::<B, 4>::zeros([1, c.n_kv_heads, n, c.head_dim()], &device);
    short[2].append(kv(1), kv(1)).expect("append");
    let err = model.decode(7, &mut short);
    assert!(
        matches!(&err, Err(LlamaError::Invalid(m)) if m.contains("layer 2")),
        "{err:?}"
    );
}

/// The streaming prefill (chunks through the caches) against the exact one, for random ragged
/// prompts on both shared models: at sparsity 0 (compression is lossless) the last tokens'
/// logits and those of the decode steps that follow agree; at 0.7 the streaming run only has
/// to stay finite and keep every sequence's length.
#[test]
fn streaming_prefill_matches_exact_at_sparsity_zero() {
    use rand::{Rng, SeedableRng};
    let seed = common::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (stories_model, _) = stories::<B>();
    let (tiny_model, _) = tinystories::<B>();
    for model in [stories_model, tiny_model] {
        let c = model.config().clone();
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|_| {
                let len = rng.random_range(1..=70);
                (0..len)
                    .map(|_| rng.random_range(1..c.vocab_size as u32))
                    .collect()
            })
            .collect();
        let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let chunk = rng.random_range(1..=24);
        let run = |policy: PrefillPolicy, sparsity: f64| -> Vec<f32> {
            let cfg = KvCacheConfig::new(3, c.n_kv_heads, c.head_dim(), 96)
                .with_window(8)
                .with_chunk(16)
                .with_sparsity(sparsity, sparsity)
                .with_prefill(policy);
            let mut caches: Vec<SparseKvCache<B>> = (0..c.n_layers)
                .map(|_| SparseKvCache::new(&cfg, &Default::default()).expect("cache"))
                .collect();
            let mut out = model
                .prefill_batch(&refs, &mut caches)
                .expect("prefill")
                .into_data()
                .to_vec::<f32>()
                .expect("f32");
            let lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
            assert_eq!(caches[0].lengths(), lengths, "{policy:?}");
            for _ in 0..3 {
                let logits = model
                    .decode_batch(&[5, 6, 7], &[true; 3], &mut caches)
                    .expect("decode");
                out.extend(logits.into_data().to_vec::<f32>().expect("f32"));
            }
            out
        };
        let exact = run(PrefillPolicy::Exact, 0.0);
        let streaming = run(PrefillPolicy::Streaming { chunk }, 0.0);
        let worst = exact
            .iter()
            .zip(&streaming)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // The two policies multiply in different kernels: a whole prompt's projections go
        // through the prompt matmul, for f32 Burn's matmul, which on CUDA computes f32
        // products in TF32 (cubek's accelerated matmul, 10-bit mantissas); a chunk's rows
        // through the f32 skinny matmul. So the tolerance follows the measured precision of Burn's matmul here.
        let largest = exact.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let tolerance = 1e-4 + 10.0 * burn_matmul_error(&mut rng, c.dim) * largest;
        assert!(
            worst < tolerance && streaming.iter().all(|x| x.is_finite()),
            "chunk {chunk}, prompts of {:?} tokens, SPARSEKV_SEED={seed}: max difference {worst} (tolerance {tolerance})",
            prompts.iter().map(|p| p.len()).collect::<Vec<_>>()
        );
        let pruned = run(PrefillPolicy::Streaming { chunk }, 0.7);
        assert!(pruned.iter().all(|x| x.is_finite()), "SPARSEKV_SEED={seed}");
    }
}

/// The largest error of Burn's f32 matmul on this backend relative to the largest product,
/// against f64 on the CPU, at a prompt projection's shape (`[96, dim] x [dim, dim]`).
fn burn_matmul_error(rng: &mut rand::rngs::StdRng, dim: usize) -> f32 {
    use rand::Rng;
    use sparsekv::cache::burn::tensor::TensorData;
    let rows = 96;
    let mut uniform =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let (x, w) = (uniform(rows * dim), uniform(dim * dim));
    let device = Default::default();
    let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [rows, dim]), &device);
    let wt = Tensor::<B, 2>::from_data(TensorData::new(w.clone(), [dim, dim]), &device);
    let got = xt.matmul(wt).into_data().to_vec::<f32>().expect("f32");
    let (mut worst, mut largest) = (0.0f64, 0.0f64);
    for r in 0..rows {
        for c in 0..dim {
            let exact: f64 = (0..dim)
                .map(|k| x[r * dim + k] as f64 * w[k * dim + c] as f64)
                .sum();
            worst = worst.max((got[r * dim + c] as f64 - exact).abs());
            largest = largest.max(exact.abs());
        }
    }
    (worst / largest) as f32
}

/// Long prompts through the fused backend (every cache operation queued on Burn's fusion
/// stream, whose optimiser may reorder operations that share no tensor) give the bare
/// backend's logits: prefill under both policies and the decode steps after it, with a
/// small window so that the prompt's appends compress many times.
#[test]
fn fused_backend_long_prompts_match_the_bare_backend() {
    fn logits<B: SparseKvBackend>(policy: PrefillPolicy, prompts: &[&[u32]]) -> Vec<f32> {
        let (model, _) = stories::<B>();
        let c = model.config().clone();
        let cfg = KvCacheConfig::new(prompts.len(), c.n_kv_heads, c.head_dim(), 256)
            .with_window(8)
            .with_chunk(16)
            .with_sparsity(0.5, 0.5)
            .with_prefill(policy);
        let mut caches: Vec<SparseKvCache<B>> = (0..c.n_layers)
            .map(|_| SparseKvCache::new(&cfg, &Default::default()).expect("cache"))
            .collect();
        let mut out = model
            .prefill_batch(prompts, &mut caches)
            .expect("prefill")
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        for _ in 0..4 {
            let tokens: Vec<u32> = (0..prompts.len() as u32).map(|i| 10 + i).collect();
            let active = vec![true; prompts.len()];
            let step_logits = model
                .decode_batch(&tokens, &active, &mut caches)
                .expect("decode");
            out.extend(step_logits.into_data().to_vec::<f32>().expect("f32"));
        }
        out
    }
    let prompts: Vec<Vec<u32>> = [190usize, 97, 150, 33]
        .iter()
        .map(|&n| (0..n).map(|i| 1 + ((i * 37 + n) % 500) as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    for policy in [PrefillPolicy::Exact, PrefillPolicy::Streaming { chunk: 24 }] {
        let bare = logits::<B>(policy, &refs);
        let fused = logits::<Fused>(policy, &refs);
        let worst = bare
            .iter()
            .zip(&fused)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-4 && fused.iter().all(|x| x.is_finite()),
            "{policy:?}: max difference {worst}"
        );
    }
}

/// A model whose buffers the device cannot hold is refused before anything is allocated,
/// with the sizes and the config fields that set them: here RoPE tables for a context of
/// 2^40 tokens (which would also have been a terabyte of host memory).
#[test]
fn models_larger_than_the_device_allocates_are_typed_errors() {
    let dir = shared().join("models/stories260K");
    let mut weights = load_llama2c(dir.join("stories260K.bin")).expect("checkpoint");
    weights.config.max_seq = 1 << 40;
    match Llama::<B>::new(&weights, &Default::default()) {
        Err(LlamaError::TooLarge { what, bytes, limit }) => {
            assert!(what.contains("max_seq"), "{what}");
            assert!(bytes > limit, "{bytes} <= {limit}");
        }
        other => panic!("expected the too-large error, got {other:?}"),
    }
}
