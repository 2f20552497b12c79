//! Checks of command-line values shared by the programs built on this crate (the `chat` and
//! `eval` examples): each error names the flag, and every check runs before a model loads.

use std::path::Path;

use sparsekv_format::Sparsity;

use crate::error::{LlamaError, Result};

/// `path`, given with `flag`, must exist.
pub fn existing_path(flag: &str, path: &Path) -> Result<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(LlamaError::Invalid(format!(
            "{flag} {}: no such file or directory",
            path.display()
        )))
    }
}

/// `value`, given with `flag`, as a sparsity (in `[0, 1)`; NaN refused).
pub fn sparsity(flag: &str, value: f64) -> Result<Sparsity> {
    Sparsity::new(value).map_err(|e| LlamaError::Invalid(format!("{flag}: {e}")))
}
