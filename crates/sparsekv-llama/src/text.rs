//! One tokenizer interface over llama2.c's `tokenizer.bin` and Hugging Face's
//! `tokenizer.json` (through the `tokenizers` crate), with streaming decoding.

use std::path::Path;

use tokenizers::{
    DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
};

use crate::error::{LlamaError, Result};
use crate::tokenizer::{self, Llama2cTokenizer};

/// A text tokenizer of either supported kind.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// llama2.c's `tokenizer.bin`.
    Llama2c(Llama2cTokenizer),
    /// Hugging Face's `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(LlamaError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let tok = tokenizers::Tokenizer::from_file(path).map_err(|e| LlamaError::Malformed {
            path: path.to_path_buf(),
            problem: format!("not a tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer::Hf(Box::new(tok)))
    }

    /// Token id of `piece` (for example `"<|eot_id|>"`), if the vocabulary has it.
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        match self {
            Tokenizer::Llama2c(t) => t.token_id(piece.as_bytes()),
            Tokenizer::Hf(t) => t.token_to_id(piece),
        }
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Llama2c(t) => t.vocab_size(),
            Tokenizer::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// Encodes `text`. With `special_tokens` the tokenizer adds what it adds to a plain
    /// prompt (BOS for Llama models); a prompt rendered by a chat template already holds its
    /// special tokens as text and is encoded without.
    pub fn encode(&self, text: &str, special_tokens: bool) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Llama2c(t) => t.encode(text, special_tokens),
            Tokenizer::Hf(t) => t
                .encode(text, special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| LlamaError::Invalid(format!("tokenizing: {e}"))),
        }
    }

    /// Decodes `tokens` to text; special tokens (BOS, EOS) print nothing.
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Llama2c(t) => Ok(t.decode(tokens)),
            Tokenizer::Hf(t) => t
                .decode(tokens, true)
                .map_err(|e| LlamaError::Invalid(format!("decoding: {e}"))),
        }
    }

    /// A decoder that turns tokens following `context` into text as they come, so that
    /// spaces and multi-byte characters split across tokens print correctly.
    pub fn stream(&self, context: &[u32]) -> Result<StreamDecoder<'_>> {
        let mut stream = match self {
            Tokenizer::Llama2c(t) => StreamDecoder::Llama2c {
                tok: t,
                prev: tokenizer::BOS,
                pending: Vec::new(),
            },
            Tokenizer::Hf(t) => StreamDecoder::Hf(t.decode_stream(true)),
        };
        for &t in context {
            stream.step(t)?;
        }
        Ok(stream)
    }
}

type HfDecodeStream<'a> = tokenizers::DecodeStream<
    'a,
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Incremental decoding; see [`Tokenizer::stream`].
pub enum StreamDecoder<'a> {
    /// llama2.c: pieces after the previous token, raw bytes held until they form UTF-8.
    Llama2c {
        /// The tokenizer.
        tok: &'a Llama2cTokenizer,
        /// The previous token.
        prev: u32,
        /// Bytes of an incomplete UTF-8 character.
        pending: Vec<u8>,
    },
    /// Hugging Face's own decode stream.
    Hf(HfDecodeStream<'a>),
}

impl std::fmt::Debug for StreamDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamDecoder::Llama2c { .. } => "StreamDecoder::Llama2c",
            StreamDecoder::Hf(_) => "StreamDecoder::Hf",
        })
    }
}

impl StreamDecoder<'_> {
    /// The text that `token` completes (possibly empty).
    pub fn step(&mut self, token: u32) -> Result<String> {
        match self {
            StreamDecoder::Llama2c { tok, prev, pending } => {
                if token != tokenizer::BOS {
                    pending.extend(tok.decode_piece(*prev, token));
                }
                *prev = token;
                Ok(take_complete_utf8(pending))
            }
            StreamDecoder::Hf(s) => s
                .step(token)
                .map(Option::unwrap_or_default)
                .map_err(|e| LlamaError::Invalid(format!("decoding: {e}"))),
        }
    }
}

/// Removes and returns the longest prefix of `bytes` that does not end inside a UTF-8
/// character (invalid sequences come out as U+FFFD).
fn take_complete_utf8(bytes: &mut Vec<u8>) -> String {
    let cut = match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => bytes.len(),
    };
    let out = String::from_utf8_lossy(&bytes[..cut]).into_owned();
    bytes.drain(..cut);
    out
}
