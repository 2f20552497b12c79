//! Chats with (or completes text for) a Llama model decoding through sparsekv's KV cache,
//! streaming tokens as they come, then prints tokens/s and the cache's size against a dense
//! cache.
//!
//! One shot, a Hugging Face model directory:
//!     cargo run --release --example chat -- --model ../shared/models/tinystories-656K \
//!         --prompt "Once upon a time"
//! A llama2.c checkpoint with its tokenizer:
//!     cargo run --release --example chat -- --model ../shared/models/stories260K/stories260K.bin \
//!         --tokenizer ../shared/models/stories260K/tok512.bin --prompt "Once upon a time"
//! Without `--model` the model comes from the Hub (`--hf-repo`, TinyLlama-1.1B-Chat by
//! default). Without `--prompt` it is a REPL: a chat model keeps the conversation, a plain
//! language model completes each line on its own.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use sparsekv::backends::{FloatName, FusionChoice, OnBackend, RuntimeName, run_on};
use sparsekv::cache::{
    DenseKvCache, KvCache, KvCacheConfig, LayerCaches, PrefillPolicy, SparseKvBackend,
    SparseKvCache,
};
use sparsekv::format::{KvBytes, ValueType};
use sparsekv::llama::{
    BuiltinTemplate, ChatTemplate, Llama, LlamaError, Message, Pretrained, Sampling, generate,
};

#[derive(Parser, Debug)]
#[command(about = "Chat with a Llama model through a sparse KV cache")]
struct Args {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer.json) or a
    /// llama2.c checkpoint (.bin, with --tokenizer).
    #[arg(long)]
    model: Option<PathBuf>,
    /// llama2.c tokenizer (tokenizer.bin), for a .bin checkpoint.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Hugging Face Hub model, fetched (or taken from the local cache) when --model is not given.
    #[arg(long, default_value = "TinyLlama/TinyLlama-1.1B-Chat-v1.0")]
    hf_repo: String,
    /// One prompt; without it, prompts are read from standard input, one per line.
    #[arg(long)]
    prompt: Option<String>,
    /// Chat template: the model's own (auto), none (plain completion), or a built-in one.
    #[arg(long, default_value = "auto")]
    chat_template: String,
    /// System message for chat models.
    #[arg(long)]
    system: Option<String>,
    /// Backend (default: cuda when built with the `cuda` feature, else wgpu).
    #[arg(long, value_enum)]
    backend: Option<RuntimeName>,
    /// Burn's operation fusion: off (the bare `CubeBackend`, the default: the model's work is
    /// already in sparsekv's own fused kernels, and registering every operation on a fusion
    /// stream doubles the host's time per step, which a small model's step is made of:
    /// stories260K decodes at about half the tokens/s with it) or on (Burn's own
    /// `Wgpu`/`Cuda` as its default features make them).
    #[arg(long, value_enum, default_value = "off")]
    fusion: FusionChoice,
    /// Float type of the weights, activations and cache.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: FloatName,
    /// Fraction of each key row pruned, in [0, 1); 0 with --v-sparsity 0 uses the dense cache.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    k_sparsity: f64,
    /// Fraction of each value row pruned, in [0, 1).
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    v_sparsity: f64,
    /// Recent tokens kept dense.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Tokens compressed at once when the dense part reaches window + chunk (the caches'
    /// default; eval uses the same).
    #[arg(long, default_value_t = sparsekv::cache::cache::DEFAULT_CHUNK)]
    chunk: usize,
    /// Put the prompt in this many tokens at a time through the cache (the streaming prefill
    /// policy: the dense part stays within window + chunk, later prompt tokens see pruned
    /// earlier ones) instead of attending densely over the whole prompt first (exact, the
    /// default).
    #[arg(long)]
    streaming_prefill: Option<usize>,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Generates one answer to `ids` with fresh caches, streaming it; returns the new text.
fn answer<B: SparseKvBackend, C: KvCache<B>>(
    model: &Llama<B>,
    pre: &Pretrained,
    mut caches: Vec<C>,
    ids: &[u32],
    args: &Args,
) -> Result<String, LlamaError> {
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut out = std::io::stdout().lock();
    let mut stream = pre.tokenizer.stream(ids)?;
    let mut text = String::new();
    let mut stream_error = None;
    let start = Instant::now();
    let mut first_token_at = None;
    let tokens = generate(
        model,
        &mut caches,
        ids,
        ids.len().saturating_add(args.max_tokens),
        &pre.eos,
        &sampling,
        |t| {
            first_token_at.get_or_insert_with(Instant::now);
            if pre.eos.contains(&t) {
                return; // a stop token ends the answer; it is not part of the text
            }
            match stream.step(t) {
                Ok(piece) => {
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                    text.push_str(&piece);
                }
                Err(e) => stream_error = Some(e),
            }
        },
    )?;
    if let Some(e) = stream_error {
        return Err(e);
    }
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
    Ok(text)
}

/// The chat template to use, or `None` for plain completion.
fn template(pre: &Pretrained, args: &Args) -> Result<Option<ChatTemplate>, LlamaError> {
    let special = |names: &[&str]| {
        names
            .iter()
            .find(|n| pre.tokenizer.token_id(n).is_some())
            .map(|n| n.to_string())
            .unwrap_or_default()
    };
    match args.chat_template.as_str() {
        "none" => Ok(None),
        "auto" => Ok(pre.chat_template.clone()),
        name => {
            let which = BuiltinTemplate::from_name(name).ok_or_else(|| {
                LlamaError::Invalid(format!(
                    "--chat-template {name}: expected auto, none, llama2, zephyr or llama3"
                ))
            })?;
            let bos = special(&["<|begin_of_text|>", "<s>"]);
            let eos = special(&["<|eot_id|>", "</s>"]);
            Ok(Some(ChatTemplate::builtin(which, &bos, &eos)))
        }
    }
}

fn run<B: SparseKvBackend>(
    args: &Args,
    pre: &Pretrained,
    value_type: ValueType,
    device: B::Device,
) -> Result<(), LlamaError> {
    let model = Llama::<B>::new(&pre.weights, &device)?;
    let c = model.config().clone();
    let template = template(pre, args)?;
    let mut history: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let system_turns = history.len();
    let mut one = |prompt: &str| -> Result<(), LlamaError> {
        let ids = match &template {
            Some(t) => {
                history.push(Message::new("user", prompt));
                let mut ids = pre.tokenizer.encode(&t.render(&history, true)?, false)?;
                // The conversation must leave room for at least one new token: drop the oldest
                // turns (never the system message or this prompt) and say so.
                while ids.len() >= c.max_seq && history.len() > system_turns + 1 {
                    history.remove(system_turns);
                    ids = pre.tokenizer.encode(&t.render(&history, true)?, false)?;
                    eprintln!(
                        "[dropped the oldest turn to fit the model's context of {} tokens]",
                        c.max_seq
                    );
                }
                ids
            }
            None => pre.tokenizer.encode(prompt, true)?,
        };
        if ids.len() >= c.max_seq {
            return Err(LlamaError::Invalid(format!(
                "the prompt is {} tokens but the model's context is {} tokens (room is needed for at least one new token)",
                ids.len(),
                c.max_seq
            )));
        }
        if template.is_none() {
            // Plain completion: the answer continues the prompt on the same line.
            print!("{prompt}");
        }
        let wanted = ids.len().saturating_add(args.max_tokens);
        if wanted > c.max_seq {
            eprintln!(
                "[--max-tokens {} capped at {}: the model's context is {} tokens]",
                args.max_tokens,
                c.max_seq - ids.len(),
                c.max_seq
            );
        }
        // Caches hold this answer's context only, not the model's whole context length.
        let max_seq = wanted.min(c.max_seq);
        let config = KvCacheConfig::new(1, c.n_kv_heads, c.head_dim(), max_seq)
            .with_window(args.window)
            .with_chunk(args.chunk)
            .with_sparsity(args.k_sparsity, args.v_sparsity)
            .with_value_type(value_type)
            .with_prefill(match args.streaming_prefill {
                Some(chunk) => PrefillPolicy::Streaming { chunk },
                None => PrefillPolicy::Exact,
            });
        // Every layer's cache is checked against the device's memory before any is allocated.
        let text = if args.k_sparsity == 0.0 && args.v_sparsity == 0.0 {
            let caches = LayerCaches::<DenseKvCache<B>>::dense(c.n_layers, &config, &device)?;
            answer(&model, pre, caches.into_layers(), &ids, args)?
        } else {
            let caches = LayerCaches::<SparseKvCache<B>>::sparse(c.n_layers, &config, &device)?;
            answer(&model, pre, caches.into_layers(), &ids, args)?
        };
        if template.is_some() {
            history.push(Message::new("assistant", text.trim()));
        }
        Ok(())
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

/// Checks every numeric argument before anything is loaded, naming the flag.
fn validate(args: &Args) -> Result<(), LlamaError> {
    for (flag, s) in [
        ("--k-sparsity", args.k_sparsity),
        ("--v-sparsity", args.v_sparsity),
    ] {
        sparsekv::llama::args::sparsity(flag, s)?;
    }
    if args.chunk == 0 {
        return Err(LlamaError::Invalid(
            "--chunk 0: at least one token must be compressed at a time".into(),
        ));
    }
    if args.streaming_prefill == Some(0) {
        return Err(LlamaError::Invalid(
            "--streaming-prefill 0: the prompt goes in at least one token at a time".into(),
        ));
    }
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        return Err(LlamaError::Invalid(format!(
            "--temperature {}: must be a finite number >= 0 (0 is greedy)",
            args.temperature
        )));
    }
    if !(args.top_p.is_finite() && args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(LlamaError::Invalid(format!(
            "--top-p {}: must be in (0, 1]",
            args.top_p
        )));
    }
    for (flag, path) in [("--model", &args.model), ("--tokenizer", &args.tokenizer)] {
        if let Some(p) = path {
            sparsekv::llama::args::existing_path(flag, p)?;
        }
    }
    Ok(())
}

fn load(args: &Args) -> Result<Pretrained, LlamaError> {
    match &args.model {
        Some(path) => Pretrained::load(path, args.tokenizer.as_deref()),
        None => fetch(args),
    }
}

#[cfg(feature = "hub")]
fn fetch(args: &Args) -> Result<Pretrained, LlamaError> {
    use sparsekv::llama::hub::{HubOptions, fetch_model};
    eprintln!(
        "Fetching {} (pass --model DIR to use local files)",
        args.hf_repo
    );
    let options = HubOptions {
        progress: true,
        ..HubOptions::default()
    };
    Pretrained::load_dir(fetch_model(&args.hf_repo, &options)?)
}

#[cfg(not(feature = "hub"))]
fn fetch(args: &Args) -> Result<Pretrained, LlamaError> {
    Err(LlamaError::Invalid(format!(
        "this build has no Hub access (feature `hub`) to fetch {}: pass --model DIR",
        args.hf_repo
    )))
}

/// Initialises the default wgpu device (as Burn's `init_setup` does) and says which adapter it
/// is, so that numbers from a software rasteriser are not read as a GPU's.
#[cfg(feature = "wgpu")]
fn announce_wgpu_device() {
    use sparsekv::kernels::cubecl::wgpu::{
        AutoGraphicsApi, RuntimeOptions, WgpuDevice, init_setup,
    };
    let setup =
        init_setup::<AutoGraphicsApi>(&WgpuDevice::DefaultDevice, RuntimeOptions::default());
    let info = setup.adapter.get_info();
    let kind = format!("{:?}", info.device_type);
    eprintln!("[device: {} ({:?}, {kind})]", info.name, info.backend);
    if kind == "Cpu" {
        eprintln!(
            "[this is a software rasteriser on the CPU (lavapipe): it computes the same results, \
             but its tokens/s say nothing about a GPU]"
        );
    }
}

/// The chat, generic over the backend type the options pick.
struct Chat<'a> {
    args: &'a Args,
    pre: &'a Pretrained,
}

impl OnBackend for Chat<'_> {
    type Output = Result<(), LlamaError>;
    fn run<B: SparseKvBackend>(self, device: B::Device, value_type: ValueType) -> Self::Output {
        run::<B>(self.args, self.pre, value_type, device)
    }
}

fn dispatch(args: &Args, pre: &Pretrained) -> Result<(), LlamaError> {
    let runtime = args.backend.unwrap_or_else(RuntimeName::build_default);
    match runtime {
        #[cfg(feature = "wgpu")]
        RuntimeName::Wgpu => announce_wgpu_device(),
        RuntimeName::Cuda => eprintln!("[device: CUDA device 0]"),
        #[allow(unreachable_patterns)]
        _ => {}
    }
    run_on(runtime, args.dtype, args.fusion, Chat { args, pre })
        .map_err(|e| LlamaError::Invalid(e.to_string()))?
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { sparsekv::quiet_vulkan_loader() };
    sparsekv::exit_on_any_thread_panic();
    let args = Args::parse();
    match validate(&args)
        .and_then(|()| load(&args))
        .and_then(|pre| dispatch(&args, &pre))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
