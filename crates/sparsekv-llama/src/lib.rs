//! A Llama-family decoder on Burn that decodes through sparsekv's KV caches: llama2.c
//! checkpoint and tokenizer loaders, the model, and generation.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod model;
pub mod tokenizer;

pub use checkpoint::{LlamaWeights, load_llama2c};
pub use config::{LlamaConfig, RopeStyle};
pub use error::{LlamaError, Result};
pub use generate::{Sampling, generate};
pub use model::Llama;
pub use tokenizer::Llama2cTokenizer;
