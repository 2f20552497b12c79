//! Errors of model loading, tokenization and generation.

use std::path::PathBuf;

use thiserror::Error;

/// Why a model, tokenizer or generation step failed.
#[derive(Debug, Error)]
pub enum LlamaError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A file is truncated or malformed.
    #[error("{path}: {problem}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A KV cache refused an operation.
    #[error(transparent)]
    Cache(#[from] sparsekv_burn::KvCacheError),
    /// A model could not be fetched from the Hugging Face Hub.
    #[error("{0}")]
    Download(String),
    /// A model buffer larger than the device allocates in one piece.
    #[error(
        "{what} needs {bytes} bytes, more than the largest buffer this device allocates ({limit} bytes)"
    )]
    TooLarge {
        /// Which buffer, and the config fields that size it.
        what: String,
        /// Bytes it needs (`u64::MAX` when the size does not even fit in 64 bits).
        bytes: u64,
        /// The device's largest buffer.
        limit: u64,
    },
    /// Any other invalid argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, LlamaError>;

/// A reader over a file's bytes that turns running out of bytes into a typed error.
pub(crate) struct ByteReader<'a> {
    path: &'a std::path::Path,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> ByteReader<'a> {
    pub(crate) fn new(path: &'a std::path::Path, bytes: &'a [u8]) -> Self {
        ByteReader { path, bytes, at: 0 }
    }

    pub(crate) fn malformed(&self, problem: impl Into<String>) -> LlamaError {
        LlamaError::Malformed {
            path: self.path.to_path_buf(),
            problem: problem.into(),
        }
    }

    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                self.malformed(format!(
                    "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                    self.at,
                    self.bytes.len()
                ))
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    pub(crate) fn i32(&mut self, what: &str) -> Result<i32> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn f32(&mut self, what: &str) -> Result<f32> {
        let b = self.take(4, what)?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// `n` little-endian f32 values.
    pub(crate) fn f32s(&mut self, n: usize, what: &str) -> Result<Vec<f32>> {
        let bytes = self.take(
            n.checked_mul(4)
                .ok_or_else(|| self.malformed(format!("{what}: size overflows")))?,
            what,
        )?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
}

/// Reads a whole file.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| LlamaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub(crate) fn read_json(path: &std::path::Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    serde_json::from_slice(&read_file(path)?)
        .map(Some)
        .map_err(|e| LlamaError::Malformed {
            path: path.to_path_buf(),
            problem: format!("not JSON: {e}"),
        })
}
