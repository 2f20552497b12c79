//! sparsekv: MUSTAFAR-style unstructured sparse KV caches for LLM decoding, in pure Rust on
//! Burn and CubeCL.
//!
//! This crate re-exports the member crates:
//! - [`format`]: the compressed KV format, byte accounting and the f64 CPU oracle;
//! - [`kernels`]: the CubeCL kernels (prune+compress, sparse and dense decode attention);
//! - [`cache`]: the Burn backend extension and the sparse and dense KV caches;
//! - [`llama`]: a Llama decoder, loaders, tokenizer and generation.

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
