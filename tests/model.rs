//! The Llama decoder against llama2.c's own output, through both caches, plus malformed
//! inputs. The models are read from `$SPARSEKV_SHARED/models` (default `../shared`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;

use proptest::prelude::*;
use sparsekv::cache::burn_cubecl::CubeBackend;
use sparsekv::cache::{DenseKvCache, KvCache, KvCacheConfig, SparseKvCache};
use sparsekv::llama::tokenizer::{BOS, Llama2cTokenizer};
use sparsekv::llama::{Llama, LlamaError, Sampling, generate, load_llama2c};

mod common;

use common::Rt;
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

fn stories() -> (Llama<B>, Llama2cTokenizer) {
    let dir = shared().join("models/stories260K");
    let weights = load_llama2c(dir.join("stories260K.bin")).expect("checkpoint");
    let tok = Llama2cTokenizer::load(dir.join("tok512.bin"), weights.config.vocab_size)
        .expect("tokenizer");
    (
        Llama::new(&weights, &Default::default()).expect("model"),
        tok,
    )
}

fn config(model: &Llama<B>, sparsity: f64) -> KvCacheConfig {
    let c = model.config();
    KvCacheConfig::new(1, c.n_kv_heads, c.head_dim(), c.max_seq).with_sparsity(sparsity, sparsity)
}

fn run<C: KvCache<B>>(model: &Llama<B>, caches: &mut [C], prompt: &[u32]) -> Vec<u32> {
    generate(
        model,
        caches,
        prompt,
        65,
        None,
        &Sampling::default(),
        |_| {},
    )
    .expect("generate")
}

#[test]
fn stories260k_reproduces_llama2c_with_both_caches() {
    let (model, tok) = stories();
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

#[test]
fn tokenizer_round_trips() {
    let (_, tok) = stories();
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
}
