//! Generates text with a Llama model decoding through sparsekv's KV cache, streaming tokens
//! as they come, then prints tokens/s and the cache's size against a dense cache.
//!
//! One shot:
//!     cargo run --release --example chat -- --model ../shared/models/stories260K/stories260K.bin \
//!         --tokenizer ../shared/models/stories260K/tok512.bin --prompt "Once upon a time"
//! Without `--prompt` it reads prompts line by line from standard input (a REPL).
//!
//! Models: llama2.c checkpoints (`.bin` with a llama2.c `tokenizer.bin`). Hugging Face model
//! directories are the next loader (see the model issue).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use sparsekv::cache::burn_cubecl::CubeBackend;
use sparsekv::cache::{DenseKvCache, KvCache, KvCacheConfig, SparseKvBackend, SparseKvCache};
use sparsekv::format::KvBytes;
use sparsekv::llama::tokenizer::{BOS, EOS};
use sparsekv::llama::{Llama, Llama2cTokenizer, LlamaError, Sampling, generate, load_llama2c};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum BackendName {
    /// wgpu (Vulkan, Metal, DX12).
    Wgpu,
    /// CUDA (needs the `cuda` feature).
    Cuda,
}

#[derive(Parser, Debug)]
#[command(about = "Generate with a Llama model through a sparse KV cache")]
struct Args {
    /// llama2.c checkpoint (.bin).
    #[arg(long)]
    model: PathBuf,
    /// llama2.c tokenizer (tokenizer.bin).
    #[arg(long)]
    tokenizer: PathBuf,
    /// One prompt; without it, prompts are read from standard input, one per line.
    #[arg(long)]
    prompt: Option<String>,
    /// Backend (default: cuda when built with the `cuda` feature, else wgpu).
    #[arg(long, value_enum)]
    backend: Option<BackendName>,
    /// Fraction of each key row pruned, in [0, 1); 0 with --v-sparsity 0 uses the dense cache.
    #[arg(long, default_value_t = 0.7)]
    k_sparsity: f64,
    /// Fraction of each value row pruned, in [0, 1).
    #[arg(long, default_value_t = 0.7)]
    v_sparsity: f64,
    /// Recent tokens kept dense.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Most tokens in all, prompt included.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn answer<B: SparseKvBackend, C: KvCache<B>>(
    model: &Llama<B>,
    tok: &Llama2cTokenizer,
    mut caches: Vec<C>,
    prompt: &str,
    args: &Args,
) -> Result<(), LlamaError> {
    let ids = tok.encode(prompt, true)?;
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", tok.decode(&ids));
    let mut prev = *ids.last().unwrap_or(&BOS);
    let start = Instant::now();
    let mut first_token_at = None;
    let tokens = generate(
        model,
        &mut caches,
        &ids,
        args.max_tokens,
        Some(EOS),
        &sampling,
        |t| {
            first_token_at.get_or_insert_with(Instant::now);
            let _ = out.write_all(&tok.decode_piece(prev, t));
            let _ = out.flush();
            prev = t;
        },
    )?;
    let generated = tokens.len() - ids.len();
    let elapsed = start.elapsed().as_secs_f64();
    let decode_time = first_token_at
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    let bytes = caches
        .iter()
        .map(|c| c.memory())
        .fold(KvBytes::default(), |a, b| a + b);
    println!();
    println!(
        "[{generated} tokens in {elapsed:.2} s: {:.1} tokens/s overall, {:.1} tokens/s decoding; prompt {} tokens]",
        generated as f64 / elapsed.max(1e-9),
        (generated.saturating_sub(1)) as f64 / decode_time.max(1e-9),
        ids.len()
    );
    println!(
        "[KV cache: {:.3} MiB in use vs {:.3} MiB dense ({:.1}%); {} of {} tokens compressed per layer]",
        mib(bytes.total()),
        mib(bytes.dense_equivalent),
        100.0 * bytes.fraction_of_dense(),
        caches
            .first()
            .map(|c| c.compressed_counts()[0])
            .unwrap_or(0),
        tokens.len()
    );
    Ok(())
}

fn run<B: SparseKvBackend>(args: &Args, device: B::Device) -> Result<(), LlamaError> {
    let weights = load_llama2c(&args.model)?;
    let tok = Llama2cTokenizer::load(&args.tokenizer, weights.config.vocab_size)?;
    let model = Llama::<B>::new(&weights, &device)?;
    let c = model.config().clone();
    let config = KvCacheConfig::new(1, c.n_kv_heads, c.head_dim(), c.max_seq)
        .with_window(args.window)
        .with_sparsity(args.k_sparsity, args.v_sparsity);
    let dense = args.k_sparsity == 0.0 && args.v_sparsity == 0.0;
    let one = |prompt: &str| -> Result<(), LlamaError> {
        if dense {
            let caches = (0..c.n_layers)
                .map(|_| DenseKvCache::<B>::new(&config, &device))
                .collect::<Result<Vec<_>, _>>()?;
            answer(&model, &tok, caches, prompt, args)
        } else {
            let caches = (0..c.n_layers)
                .map(|_| SparseKvCache::<B>::new(&config, &device))
                .collect::<Result<Vec<_>, _>>()?;
            answer(&model, &tok, caches, prompt, args)
        }
    };
    match &args.prompt {
        Some(p) => one(p),
        None => {
            eprintln!("Enter a prompt per line (Ctrl-D to quit).");
            for line in std::io::stdin().lock().lines() {
                let line =
                    line.map_err(|e| LlamaError::Invalid(format!("reading standard input: {e}")))?;
                if !line.trim().is_empty() {
                    one(line.trim())?;
                }
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let backend = args.backend.unwrap_or(if cfg!(feature = "cuda") {
        BackendName::Cuda
    } else {
        BackendName::Wgpu
    });
    let result = match backend {
        #[cfg(feature = "wgpu")]
        BackendName::Wgpu => run::<
            CubeBackend<sparsekv::kernels::cubecl::wgpu::WgpuRuntime, f32, i32, u32>,
        >(&args, Default::default()),
        #[cfg(feature = "cuda")]
        BackendName::Cuda => run::<
            CubeBackend<sparsekv::kernels::cubecl::cuda::CudaRuntime, f32, i32, u8>,
        >(&args, Default::default()),
        #[allow(unreachable_patterns)]
        other => Err(LlamaError::Invalid(format!(
            "this build has no {other:?} backend: rebuild with --features {}",
            format!("{other:?}").to_lowercase()
        ))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
