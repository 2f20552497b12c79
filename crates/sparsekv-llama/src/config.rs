//! Model hyper-parameters.

pub use sparsekv_burn::RopeStyle;

/// Llama-3's rotary frequency scaling (`rope_scaling` with `rope_type: "llama3"`): wavelengths
/// shorter than `original_max_position / high_freq_factor` are kept, those longer than
/// `original_max_position / low_freq_factor` are divided by `factor`, and the band between is
/// interpolated smoothly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Divisor of the low frequencies.
    pub factor: f64,
    /// Wavelengths above `original_max_position / low_freq_factor` are fully scaled.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position / high_freq_factor` are not scaled.
    pub high_freq_factor: f64,
    /// The context length the model was pre-trained at.
    pub original_max_position: f64,
}

impl Llama3RopeScaling {
    /// The scaled inverse frequency for an unscaled `inv_freq` (radians per position).
    pub fn scale(&self, inv_freq: f64) -> f64 {
        let wavelength = 2.0 * std::f64::consts::PI / inv_freq;
        let low_freq_wavelength = self.original_max_position / self.low_freq_factor;
        let high_freq_wavelength = self.original_max_position / self.high_freq_factor;
        if wavelength < high_freq_wavelength {
            inv_freq
        } else if wavelength > low_freq_wavelength {
            inv_freq / self.factor
        } else {
            let smooth = (self.original_max_position / wavelength - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

/// The shape and constants of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Hidden size.
    pub dim: usize,
    /// Feed-forward size.
    pub hidden_dim: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    pub max_seq: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE channel pairing.
    pub rope_style: RopeStyle,
    /// Llama-3 frequency scaling, when the model uses it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
}

impl LlamaConfig {
    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// The inverse frequency (radians per position) of rotary pair `i` of `head_dim / 2`,
    /// after any frequency scaling.
    pub fn rope_inv_freq(&self, i: usize) -> f64 {
        let inv_freq = 1.0 / (self.rope_theta as f64).powf(2.0 * i as f64 / self.head_dim() as f64);
        match &self.rope_scaling {
            Some(s) => s.scale(inv_freq),
            None => inv_freq,
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    /// Llama-3.1's published scaling (factor 8, low 1, high 4, 8192 positions) on head_dim
    /// 128, theta 500000, checked at the three regimes against values worked out by hand.
    #[test]
    fn llama3_scaling_keeps_high_scales_low_and_blends_between() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        };
        // Wavelength 2*pi < 2048: unchanged.
        assert_eq!(s.scale(1.0), 1.0);
        // Wavelength 2*pi*10000 > 8192: divided by 8.
        assert_eq!(s.scale(1e-4), 1e-4 / 8.0);
        // Wavelength 4096 (between 2048 and 8192): smooth = (8192/4096 - 1)/3 = 1/3.
        let f = 2.0 * std::f64::consts::PI / 4096.0;
        let expected = (2.0 / 3.0) * f / 8.0 + (1.0 / 3.0) * f;
        assert!((s.scale(f) - expected).abs() < 1e-15 * f);
    }
}
