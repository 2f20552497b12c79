//! sparsekv: MUSTAFAR-style unstructured sparse KV caches for LLM decoding, in pure Rust on
//! Burn and CubeCL.
//!
//! ```
//! # #[cfg(feature = "wgpu")] fn main() -> Result<(), sparsekv::cache::KvCacheError> {
//! use sparsekv::cache::burn::{backend::Wgpu, tensor::Tensor};
//! use sparsekv::cache::{KvCache, KvCacheConfig, SparseKvCache};
//! let (device, config) = (Default::default(), KvCacheConfig::new(1, 2, 64, 512).with_sparsity(0.7, 0.7));
//! let mut cache = SparseKvCache::<Wgpu>::new(&config, &device)?; // Burn's own backend type
//! cache.append(Tensor::ones([1, 2, 100, 64], &device), Tensor::ones([1, 2, 100, 64], &device))?;
//! let out = cache.attend(Tensor::ones([1, 8, 64], &device))?; // [batch, q_heads, head_dim]
//! # assert_eq!(out.dims(), [1, 8, 64]);
//! # Ok(()) }
//! # #[cfg(not(feature = "wgpu"))] fn main() {}
//! ```
//!
//! Keys and values (`[batch, kv_heads, tokens, head_dim]`, after RoPE) go in with `append`; the
//! newest tokens stay dense, older ones are pruned per token by magnitude and compressed; a
//! query per sequence comes out attended over all of them. `examples/burn_attention.rs` shows
//! the change to an attention layer written the usual Burn way.
//!
//! This crate re-exports the member crates:
//! - [`format`](mod@format): the compressed KV format, byte accounting and the f64 CPU oracle;
//! - [`kernels`]: the CubeCL kernels (prune+compress, sparse and dense decode attention, and
//!   the fused operations of a decode step);
//! - [`cache`]: the Burn backend extension and the sparse and dense KV caches;
//! - [`llama`]: a Llama decoder, loaders, tokenizer and generation;
//!
//! and adds [`backends`], which picks a Burn backend type from run-time options (runtime,
//! float type, Burn's fusion on or off) for programs such as the examples.

pub mod backends;

pub use sparsekv_burn as cache;
pub use sparsekv_format as format;
pub use sparsekv_kernels as kernels;
pub use sparsekv_llama as llama;

/// Makes a panic on any thread other than `main` end the process with exit status 101, after
/// the usual panic message and a line saying why. A GPU runtime runs its device work on its own
/// thread; if that thread panics (an allocation or launch failure nobody foresaw), the main
/// thread must not go on computing with dead buffers and print a wrong answer with exit
/// status 0. Call it first thing in `main` of programs that drive a device (the examples do).
pub fn exit_on_any_thread_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        if thread.name() != Some("main") {
            eprintln!(
                "error: thread {} failed (see above); stopping instead of going on with its work undone",
                thread.name().unwrap_or("<unnamed>")
            );
            std::process::exit(101);
        }
    }));
}

/// Points `XDG_RUNTIME_DIR` at a private temporary directory when it is unset, so that the
/// Vulkan loader (lavapipe, the software driver CI uses) does not print errors that read like
/// failures on every run.
///
/// # Safety
///
/// It sets an environment variable: call it first thing in `main`, before any other thread
/// exists (the examples do).
pub unsafe fn quiet_vulkan_loader() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sparsekv-runtime-{}", std::process::id()));
    let made = std::fs::create_dir_all(&dir).and_then(|()| private(&dir));
    if made.is_ok() {
        // SAFETY: the caller guarantees that no other thread exists yet.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    }
}

/// Makes `dir` readable by its owner only (the runtime directory's required mode).
#[cfg(unix)]
fn private(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(not(unix))]
fn private(_dir: &std::path::Path) -> std::io::Result<()> {
    Ok(())
}
