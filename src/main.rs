//! The `sparsekv` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sparsekv::format::{
    CacheShape, FormatError, HeadDim, KvBytes, SequenceOccupancy, Sparsity, ValueType, keep_count,
    uniform_kv_bytes,
};

#[derive(Parser)]
#[command(
    name = "sparsekv",
    version,
    about = "Sparse KV caches for LLM decoding"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the KV cache size of a model shape, compressed vs dense, and with --memory-gib
    /// whether each fits the device.
    KvSize(KvSizeArgs),
}

/// Model shapes of well-known checkpoints (layers, KV heads, head_dim).
#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// Llama-3-8B: 32 layers, 8 KV heads, head_dim 128.
    Llama3_8b,
    /// Llama-2-7B: 32 layers, 32 KV heads, head_dim 128.
    Llama2_7b,
    /// Mistral-7B: 32 layers, 8 KV heads, head_dim 128.
    Mistral7b,
    /// Llama-3.2-1B: 16 layers, 8 KV heads, head_dim 64.
    Llama3_2_1b,
    /// TinyLlama-1.1B: 22 layers, 4 KV heads, head_dim 64.
    Tinyllama1_1b,
    /// stories260K (llama2.c): 5 layers, 4 KV heads, head_dim 8.
    Stories260k,
    /// TinyStories-656K: 2 layers, 4 KV heads, head_dim 16.
    Tinystories656k,
}

impl Preset {
    fn shape(self) -> (usize, usize, usize) {
        match self {
            Preset::Llama3_8b | Preset::Mistral7b => (32, 8, 128),
            Preset::Llama2_7b => (32, 32, 128),
            Preset::Llama3_2_1b => (16, 8, 64),
            Preset::Tinyllama1_1b => (22, 4, 64),
            Preset::Stories260k => (5, 4, 8),
            Preset::Tinystories656k => (2, 4, 16),
        }
    }
}

#[derive(clap::Args)]
struct KvSizeArgs {
    /// A known model shape; --layers/--kv-heads/--head-dim override its fields.
    #[arg(long, value_enum, default_value = "llama3-8b")]
    preset: Preset,
    /// Decoder layers.
    #[arg(long)]
    layers: Option<usize>,
    /// KV heads per layer.
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Elements per head (a power of two from 8 to 256).
    #[arg(long)]
    head_dim: Option<usize>,
    /// Value type: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    dtype: ValueType,
    /// Sequences in the batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 32768)]
    tokens: usize,
    /// Recent tokens kept dense.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Fraction of each key row pruned, in [0, 1).
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    k_sparsity: f64,
    /// Fraction of each value row pruned, in [0, 1) (defaults to --k-sparsity).
    #[arg(long, allow_negative_numbers = true)]
    v_sparsity: Option<f64>,
    /// Device memory, in GiB: also say whether the dense and the compressed cache fit in it.
    #[arg(long, allow_negative_numbers = true)]
    memory_gib: Option<f64>,
    /// Memory the model's weights (and anything else) take from --memory-gib, in GiB.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weights_gib: f64,
}

/// Bytes in `gib` GiB, for a finite, non-negative `gib` given with `flag`.
fn gib_bytes(flag: &str, gib: f64) -> Result<u64, FormatError> {
    if !(gib.is_finite() && gib >= 0.0 && gib * 1024.0 * 1024.0 * 1024.0 < u64::MAX as f64) {
        return Err(FormatError::InvalidArgument(format!(
            "{flag} {gib}: must be a finite number of GiB, at least 0"
        )));
    }
    Ok((gib * 1024.0 * 1024.0 * 1024.0) as u64)
}

/// `--memory-gib` and the room it leaves for the cache after `--weights-gib`, in bytes.
fn memory_room(args: &KvSizeArgs) -> Result<Option<(u64, u64)>, FormatError> {
    let Some(memory_gib) = args.memory_gib else {
        return Ok(None);
    };
    let memory = gib_bytes("--memory-gib", memory_gib)?;
    let weights = gib_bytes("--weights-gib", args.weights_gib)?;
    let room = memory.checked_sub(weights).ok_or_else(|| {
        FormatError::InvalidArgument(format!(
            "--weights-gib {} is more than --memory-gib {memory_gib}",
            args.weights_gib
        ))
    })?;
    Ok(Some((memory, room)))
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn kv_size(args: &KvSizeArgs) -> Result<(), FormatError> {
    let (layers, kv_heads, head_dim) = args.preset.shape();
    let shape = CacheShape {
        layers: args.layers.unwrap_or(layers),
        kv_heads: args.kv_heads.unwrap_or(kv_heads),
        head_dim: HeadDim::new(args.head_dim.unwrap_or(head_dim))?,
        value_type: args.dtype,
    };
    let named = |flag: &str, e: FormatError| FormatError::InvalidArgument(format!("{flag}: {e}"));
    let ks = Sparsity::new(args.k_sparsity).map_err(|e| named("--k-sparsity", e))?;
    let vs = Sparsity::new(args.v_sparsity.unwrap_or(args.k_sparsity))
        .map_err(|e| named("--v-sparsity", e))?;
    let memory = memory_room(args)?;
    let occupancy = SequenceOccupancy::steady_state(args.tokens, args.window);
    let b: KvBytes = uniform_kv_bytes(&shape, args.batch as u64, occupancy, ks, vs)?;
    let d = shape.head_dim.get();
    println!(
        "shape: {} layers x {} KV heads x head_dim {d}, {}; {} sequence(s) x {} tokens, window {}",
        shape.layers,
        shape.kv_heads,
        shape.value_type.name(),
        args.batch,
        args.tokens,
        args.window
    );
    println!(
        "kept per row: K {} of {d} (s = {}), V {} of {d} (s = {})",
        keep_count(ks, shape.head_dim),
        ks.get(),
        keep_count(vs, shape.head_dim),
        vs.get()
    );
    println!("| part | bytes | size |");
    println!("|---|---:|---:|");
    for (name, v) in [
        ("K bitmaps", b.k_bitmap),
        ("K values", b.k_values),
        ("V bitmaps", b.v_bitmap),
        ("V values", b.v_values),
        ("dense window (K+V)", b.window),
        ("total", b.total()),
        ("dense equivalent", b.dense_equivalent),
    ] {
        println!("| {name} | {v} | {} |", mib(v));
    }
    println!(
        "compressed cache = {:.1}% of dense",
        100.0 * b.fraction_of_dense()
    );
    if let Some((memory, room)) = memory {
        let fits = |bytes: u64| {
            if bytes <= room {
                "fits"
            } else {
                "does not fit"
            }
        };
        println!(
            "memory: {} less {} of weights leaves {} for the cache: dense cache {} {}; compressed cache {} {}",
            gib(memory),
            gib(memory - room),
            gib(room),
            gib(b.dense_equivalent),
            fits(b.dense_equivalent),
            gib(b.total()),
            fits(b.total())
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::KvSize(args) => kv_size(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
