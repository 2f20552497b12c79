//! llama2.c's `tokenizer.bin` and its encoding, reproduced exactly: BOS, a dummy-prefix
//! space, one token per UTF-8 character (bytes not in the vocabulary fall back to `<0xXX>`,
//! ids 3..258), then greedy merges of the adjacent pair whose merged string has the highest
//! score, first such pair on ties.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{ByteReader, LlamaError, Result, read_file};

/// Token id of BOS in llama2.c vocabularies.
pub const BOS: u32 = 1;
/// Token id of EOS in llama2.c vocabularies.
pub const EOS: u32 = 2;

/// A llama2.c tokenizer.
#[derive(Debug, Clone)]
pub struct Llama2cTokenizer {
    vocab: Vec<Vec<u8>>,
    scores: Vec<f32>,
    lookup: HashMap<Vec<u8>, u32>,
}

impl Llama2cTokenizer {
    /// Loads `tokenizer.bin` for a vocabulary of `vocab_size` tokens.
    pub fn load(path: impl AsRef<Path>, vocab_size: usize) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let mut r = ByteReader::new(path, &bytes);
        let max_len = r.i32("max_token_length")?;
        if max_len <= 0 {
            return Err(r.malformed(format!("max_token_length {max_len} is not positive")));
        }
        // Every entry takes at least 8 bytes: refuse a vocabulary the file cannot hold.
        if vocab_size.saturating_mul(8) > r.remaining() {
            return Err(r.malformed(format!(
                "truncated: {vocab_size} tokens cannot fit in {} bytes",
                r.remaining()
            )));
        }
        let (mut vocab, mut scores, mut lookup) = (
            Vec::with_capacity(vocab_size),
            Vec::with_capacity(vocab_size),
            HashMap::new(),
        );
        for id in 0..vocab_size {
            let score = r.f32("token score")?;
            let len = r.i32("token length")?;
            if len < 0 || len > max_len {
                return Err(r.malformed(format!(
                    "token {id} has length {len}, outside 0..={max_len}"
                )));
            }
            let piece = r.take(len as usize, "token bytes")?.to_vec();
            lookup.entry(piece.clone()).or_insert(id as u32);
            vocab.push(piece);
            scores.push(score);
        }
        Ok(Llama2cTokenizer {
            vocab,
            scores,
            lookup,
        })
    }

    /// Id of the token whose bytes are `piece`.
    pub fn token_id(&self, piece: &[u8]) -> Option<u32> {
        self.lookup.get(piece).copied()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Encodes `text`, with BOS first when `bos`.
    pub fn encode(&self, text: &str, bos: bool) -> Result<Vec<u32>> {
        let mut tokens = Vec::new();
        if bos {
            tokens.push(BOS);
        }
        if !text.is_empty() {
            let space = self
                .lookup
                .get(b" ".as_slice())
                .ok_or_else(|| LlamaError::Invalid("vocabulary has no ' ' token".into()))?;
            tokens.push(*space);
        }
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            let s = ch.encode_utf8(&mut buf).as_bytes();
            match self.lookup.get(s) {
                Some(&id) => tokens.push(id),
                None => tokens.extend(s.iter().map(|&b| b as u32 + 3)),
            }
        }
        loop {
            let mut best: Option<(f32, usize, u32)> = None;
            for i in 0..tokens.len().saturating_sub(1) {
                let (a, b) = (tokens[i] as usize, tokens[i + 1] as usize);
                let (Some(pa), Some(pb)) = (self.vocab.get(a), self.vocab.get(b)) else {
                    continue;
                };
                let merged = [pa.as_slice(), pb.as_slice()].concat();
                if let Some(&id) = self.lookup.get(&merged) {
                    let score = self.scores[id as usize];
                    if best.is_none_or(|(s, _, _)| score > s) {
                        best = Some((score, i, id));
                    }
                }
            }
            let Some((_, i, id)) = best else { break };
            tokens[i] = id;
            tokens.remove(i + 1);
        }
        Ok(tokens)
    }

    /// The bytes token `token` prints as after `prev`, as llama2.c prints them: the leading
    /// space after BOS is dropped, `<0xXX>` is the raw byte.
    pub fn decode_piece(&self, prev: u32, token: u32) -> Vec<u8> {
        let Some(piece) = self.vocab.get(token as usize) else {
            return Vec::new();
        };
        let piece = if prev == BOS && piece.first() == Some(&b' ') {
            &piece[1..]
        } else {
            &piece[..]
        };
        if piece.len() == 6
            && piece.starts_with(b"<0x")
            && piece.ends_with(b">")
            && let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&piece[3..5]), 16)
        {
            return vec![b];
        }
        piece.to_vec()
    }

    /// Decodes `tokens` (BOS, if first, prints nothing) to text (invalid UTF-8 replaced).
    pub fn decode(&self, tokens: &[u32]) -> String {
        let mut out = Vec::new();
        let mut prev = BOS;
        for &t in tokens {
            if t != BOS {
                out.extend(self.decode_piece(prev, t));
            }
            prev = t;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
