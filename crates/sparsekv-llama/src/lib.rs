//! A Llama-family decoder on Burn that decodes through sparsekv's KV caches: loaders for
//! Hugging Face directories (safetensors, `tokenizer.json`, chat templates) and llama2.c
//! checkpoints, the model, and batched generation.

pub mod args;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod generate;
pub mod hf;
#[cfg(feature = "hub")]
pub mod hub;
pub mod model;
pub mod pretrained;
pub mod text;
pub mod tokenizer;

pub use chat::{BuiltinTemplate, ChatTemplate, Message};
pub use checkpoint::{LlamaWeights, load_llama2c};
pub use config::{Llama3RopeScaling, LlamaConfig, RopeStyle};
pub use error::{LlamaError, Result};
pub use eval::{
    CacheKind, EvalCase, PromptPrefill, Scores, Target, evaluate, sweep, teacher_force,
    text_windows,
};
pub use generate::{Sampling, generate, generate_batch};
pub use hf::{load_hf, load_hf_config};
pub use model::Llama;
pub use pretrained::Pretrained;
pub use text::{StreamDecoder, Tokenizer};
pub use tokenizer::Llama2cTokenizer;
