//! A model with everything needed to talk to it: weights, tokenizer, stop tokens and chat
//! template, from a Hugging Face directory or a llama2.c checkpoint.

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::checkpoint::{LlamaWeights, load_llama2c};
use crate::error::{LlamaError, Result, read_json};
use crate::hf::load_hf;
use crate::text::Tokenizer;
use crate::tokenizer::{self, Llama2cTokenizer};

/// Weights, tokenizer, stop tokens and chat template of one model.
#[derive(Debug, Clone)]
pub struct Pretrained {
    /// Host weights and hyper-parameters.
    pub weights: LlamaWeights,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// Tokens that end generation.
    pub eos: Vec<u32>,
    /// The model's own chat template, if its files carry one.
    pub chat_template: Option<ChatTemplate>,
}

/// `eos_token_id` of a JSON config: a number or a list of numbers.
fn eos_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl Pretrained {
    /// Loads what a command line names: a Hugging Face model directory, or a llama2.c
    /// checkpoint with its `tokenizer.bin`. A path that does not exist is an error saying so
    /// (not a guess at what kind of model it was meant to be).
    pub fn load(model: impl AsRef<Path>, tokenizer: Option<&Path>) -> Result<Self> {
        let model = model.as_ref();
        crate::args::existing_path("model", model)?;
        if let Some(t) = tokenizer {
            crate::args::existing_path("tokenizer", t)?;
        }
        if model.is_dir() {
            return Self::load_dir(model);
        }
        let tokenizer = tokenizer.ok_or_else(|| {
            LlamaError::Invalid(format!(
                "{} is a llama2.c checkpoint: pass its tokenizer.bin with --tokenizer",
                model.display()
            ))
        })?;
        Self::load_llama2c(model, tokenizer)
    }

    /// Loads a Hugging Face model directory: `config.json`, safetensors weights,
    /// `tokenizer.json`, and when present `generation_config.json` (stop tokens) and the chat
    /// template (`tokenizer_config.json` or `chat_template.jinja`).
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let weights = load_hf(dir)?;
        let tokenizer = Tokenizer::from_hf_file(dir.join("tokenizer.json"))?;
        if tokenizer.vocab_size() > weights.config.vocab_size {
            return Err(LlamaError::Invalid(format!(
                "tokenizer.json has {} tokens, the model's vocabulary {}",
                tokenizer.vocab_size(),
                weights.config.vocab_size
            )));
        }
        // Stop tokens: generation_config.json, else config.json (Llama-3 instruct lists
        // several, <|eot_id|> among them).
        let mut eos = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            if let Some(json) = read_json(&dir.join(file))? {
                eos = eos_ids(json.get("eos_token_id"));
            }
            if !eos.is_empty() {
                break;
            }
        }
        Ok(Pretrained {
            weights,
            tokenizer,
            eos,
            chat_template: ChatTemplate::from_model_dir(dir)?,
        })
    }

    /// Loads a llama2.c checkpoint and its `tokenizer.bin` (no chat template). Generation stops
    /// at EOS (token 2) and, as llama2.c's `run.c` does, at BOS (token 1), which these models
    /// emit where one story ends and the next would begin.
    pub fn load_llama2c(checkpoint: impl AsRef<Path>, tokenizer: impl AsRef<Path>) -> Result<Self> {
        let weights = load_llama2c(checkpoint)?;
        let tok = Llama2cTokenizer::load(tokenizer, weights.config.vocab_size)?;
        Ok(Pretrained {
            weights,
            tokenizer: Tokenizer::Llama2c(tok),
            eos: vec![tokenizer::EOS, tokenizer::BOS],
            chat_template: None,
        })
    }
}
