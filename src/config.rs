//! What a gate is: the model's attention geometry, the gate's pooling and
//! projection shapes, its RoPE, and the rule that turns scores into a mask.
//! A [`GateConfig`] comes from a checkpoint's `config.json`
//! (`checkpoint::config_json`) or is filled in by the caller.

use crate::error::{Error, Result};

/// A pooling function applied over each block of tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pool {
    Max,
    Min,
    Avg,
}

impl Pool {
    pub fn name(self) -> &'static str {
        match self {
            Pool::Max => "max",
            Pool::Min => "min",
            Pool::Avg => "avg",
        }
    }
}

/// Which pooled features feed the gate, as upstream names them
/// (`Q{pools}_K{pools}`, pools a non-empty subsequence of `max, min, avg` in
/// that order). The released gates are `Qavg_Kmaxminavg`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GateType {
    pub q_pools: Vec<Pool>,
    pub k_pools: Vec<Pool>,
}

impl GateType {
    /// The gate type of the released SeerAttention checkpoints.
    pub fn released() -> Self {
        GateType { q_pools: vec![Pool::Avg], k_pools: vec![Pool::Max, Pool::Min, Pool::Avg] }
    }

    /// Parse an upstream name such as `Qavg_Kmaxminavg`.
    pub fn parse(name: &str) -> Result<Self> {
        let bad = || {
            Error::unsupported(format!(
                "gate type '{name}': expected Q<pools>_K<pools> with pools drawn in order from max, min, avg (e.g. Qavg_Kmaxminavg)"
            ))
        };
        let rest = name.strip_prefix('Q').ok_or_else(bad)?;
        let (q, k) = rest.split_once("_K").ok_or_else(bad)?;
        let q_pools = parse_pools(q).ok_or_else(bad)?;
        let k_pools = parse_pools(k).ok_or_else(bad)?;
        Ok(GateType { q_pools, k_pools })
    }

    /// The upstream name of this gate type.
    pub fn name(&self) -> String {
        let join = |p: &[Pool]| p.iter().map(|p| p.name()).collect::<String>();
        format!("Q{}_K{}", join(&self.q_pools), join(&self.k_pools))
    }
}

fn parse_pools(s: &str) -> Option<Vec<Pool>> {
    let mut out = Vec::new();
    let mut rest = s;
    for p in [Pool::Max, Pool::Min, Pool::Avg] {
        if let Some(r) = rest.strip_prefix(p.name()) {
            out.push(p);
            rest = r;
        }
    }
    (rest.is_empty() && !out.is_empty()).then_some(out)
}

/// RoPE frequency scaling, as in Hugging Face `rope_scaling`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_scaling` absent, or `rope_type: "default"`).
    None,
    /// `rope_type: "linear"`: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// `rope_type: "llama3"`: low frequencies divided by `factor`, a smooth
    /// ramp between `low_freq_factor` and `high_freq_factor`.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// RoPE as applied to the gate's pooled Q and projected K (NeoX half-split).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Inverse frequencies for a rotary dimension `dim` (even), f64, after scaling.
    pub fn inv_freq(&self, dim: usize) -> Vec<f64> {
        let half = dim / 2;
        (0..half)
            .map(|i| {
                let base = 1.0 / self.theta.powf((2 * i) as f64 / dim as f64);
                match self.scaling {
                    RopeScaling::None => base,
                    RopeScaling::Linear { factor } => base / factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let low_freq_wavelen = original_max_position_embeddings / low_freq_factor;
                        let high_freq_wavelen = original_max_position_embeddings / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / base;
                        if wavelen < high_freq_wavelen {
                            base
                        } else if wavelen > low_freq_wavelen {
                            base / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * base / factor + smooth * base
                        }
                    }
                }
            })
            .collect()
    }
}

/// How gate scores become a block mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SparsityMethod {
    /// Keep key blocks whose gate probability exceeds the threshold.
    Threshold,
    /// Keep the top `max(1, floor((1 - sqrt(1 - nz_ratio)) * k_blocks))` key blocks of each row.
    NzRatio,
}

/// Everything that defines a gate, independent of its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct GateConfig {
    /// Decoder layers, one gate per layer.
    pub num_layers: usize,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    /// Attention head dimension (the width of Q and K rows).
    pub head_dim: usize,
    /// Width of the gate's projected Q and K (`seerattn_gate_hidden_size`).
    pub gate_hidden: usize,
    /// Tokens per block (`seerattn_gate_block_size`); this build supports 64.
    pub block_size: usize,
    pub gate_type: GateType,
    /// Upstream's `seerattn_gate_force_double`: a Q projection even when the
    /// gate could do without one.
    pub force_double: bool,
    pub rope: RopeConfig,
    pub sparsity_method: SparsityMethod,
    pub threshold: f32,
    pub nz_ratio: f32,
    /// Make the last two query-block rows dense (`seerattn_last_block_dense`).
    pub last_block_dense: bool,
}

/// Block size the kernels and the reference are built for.
pub const SUPPORTED_BLOCK_SIZE: usize = 64;

impl GateConfig {
    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_q_heads / self.num_kv_heads
    }

    /// Whether this gate has a Q projection (`mask_linear_q`), following
    /// upstream's rule: more than one Q pooling, or hidden != head_dim, or forced.
    pub fn has_q_proj(&self) -> bool {
        self.gate_type.q_pools.len() > 1 || self.gate_hidden != self.head_dim || self.force_double
    }

    /// Input width of the K projection: one `head_dim` per K pooling.
    pub fn k_in(&self) -> usize {
        self.head_dim * self.gate_type.k_pools.len()
    }

    /// Input width of the Q projection (or of pooled Q when there is none).
    pub fn q_in(&self) -> usize {
        self.head_dim * self.gate_type.q_pools.len()
    }

    /// Heads of the K projection weight: per query head without a Q
    /// projection (the released layout), per KV head with one (upstream).
    pub fn k_proj_heads(&self) -> usize {
        if self.has_q_proj() {
            self.num_kv_heads
        } else {
            self.num_q_heads
        }
    }

    /// Shape of `mask_linear_k.weight`: `[k_proj_heads, k_in, gate_hidden]`.
    pub fn k_weight_shape(&self) -> [usize; 3] {
        [self.k_proj_heads(), self.k_in(), self.gate_hidden]
    }

    /// Shape of `mask_linear_q.weight` when the gate has one: `[num_q_heads, q_in, gate_hidden]`.
    pub fn q_weight_shape(&self) -> Option<[usize; 3]> {
        self.has_q_proj().then(|| [self.num_q_heads, self.q_in(), self.gate_hidden])
    }

    /// Check every field for consistency; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let field = |name: &str, why: String| Err(Error::invalid(format!("gate config: {name} {why}")));
        if self.num_layers == 0 || self.num_layers > 4096 {
            return field("num_layers", format!("= {} must be in 1..=4096", self.num_layers));
        }
        if self.num_q_heads == 0 || self.num_q_heads > 1024 {
            return field("num_q_heads", format!("= {} must be in 1..=1024", self.num_q_heads));
        }
        if self.num_kv_heads == 0 || self.num_q_heads % self.num_kv_heads != 0 {
            return field(
                "num_kv_heads",
                format!("= {} must be positive and divide num_q_heads = {}", self.num_kv_heads, self.num_q_heads),
            );
        }
        if self.head_dim == 0 || self.head_dim > 1024 || self.head_dim % 2 != 0 {
            return field("head_dim", format!("= {} must be even and in 2..=1024", self.head_dim));
        }
        if self.gate_hidden == 0 || self.gate_hidden > 4096 || self.gate_hidden % 2 != 0 {
            return field("gate_hidden", format!("= {} must be even and in 2..=4096", self.gate_hidden));
        }
        if self.block_size != SUPPORTED_BLOCK_SIZE {
            return Err(Error::unsupported(format!(
                "gate config: block_size = {} (this build supports {SUPPORTED_BLOCK_SIZE})",
                self.block_size
            )));
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 1.0) {
            return field("rope_theta", format!("= {} must be finite and > 1", self.rope.theta));
        }
        match self.rope.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return field("rope_scaling.factor", format!("= {factor} must be finite and > 0"));
                }
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let ok = |x: f64| x.is_finite() && x > 0.0;
                if !(ok(factor) && ok(low_freq_factor) && ok(high_freq_factor) && ok(original_max_position_embeddings))
                    || high_freq_factor <= low_freq_factor
                {
                    return field(
                        "rope_scaling",
                        format!(
                            "llama3 factors must be finite and positive with high_freq_factor > low_freq_factor \
                             (factor {factor}, low {low_freq_factor}, high {high_freq_factor}, original {original_max_position_embeddings})"
                        ),
                    );
                }
            }
        }
        if !(self.threshold.is_finite() && (0.0..=1.0).contains(&self.threshold)) {
            return field("threshold", format!("= {} must be in [0, 1]", self.threshold));
        }
        if !(self.nz_ratio.is_finite() && self.nz_ratio > 0.0 && self.nz_ratio <= 1.0) {
            return field("nz_ratio", format!("= {} must be in (0, 1]", self.nz_ratio));
        }
        Ok(())
    }
}

/// What to do with a query-block row whose rule selects no key block (a
/// threshold above every probability of the row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmptyRowPolicy {
    /// Select the row's diagonal block, so every query attends at least to
    /// its causal neighbourhood (the default).
    KeepDiagonal,
    /// Leave the row empty, as upstream does; the attention then writes zeros
    /// (log-sum-exp `-inf`) for those queries, never NaN.
    Empty,
}

/// Precision of the threshold comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThresholdCompare {
    /// `prob > threshold` in f32 (the default).
    F32,
    /// Upstream's comparison: the probability and the threshold both rounded
    /// to bf16 first (torch compares a bf16 tensor with a Python float in bf16).
    Bf16,
}

/// The rule that turns gate scores into a block mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskParams {
    pub method: SparsityMethod,
    /// Keep blocks with probability strictly above this (threshold method).
    pub threshold: f32,
    /// Fraction of causal blocks to keep (nz_ratio method).
    pub nz_ratio: f32,
    /// Make the last two query-block rows of each sequence dense.
    pub last_block_dense: bool,
    pub empty_rows: EmptyRowPolicy,
    pub threshold_compare: ThresholdCompare,
}

impl MaskParams {
    /// The rule a gate's config names, with the default policies.
    pub fn from_config(config: &GateConfig) -> Self {
        MaskParams {
            method: config.sparsity_method,
            threshold: config.threshold,
            nz_ratio: config.nz_ratio,
            last_block_dense: config.last_block_dense,
            empty_rows: EmptyRowPolicy::KeepDiagonal,
            threshold_compare: ThresholdCompare::F32,
        }
    }

    /// Check the numbers; errors name the field.
    pub fn validate(&self) -> Result<()> {
        match self.method {
            SparsityMethod::Threshold if !(self.threshold.is_finite() && (0.0..=1.0).contains(&self.threshold)) => {
                Err(Error::invalid(format!("mask params: threshold = {} must be in [0, 1]", self.threshold)))
            }
            SparsityMethod::NzRatio if !(self.nz_ratio.is_finite() && self.nz_ratio > 0.0 && self.nz_ratio <= 1.0) => {
                Err(Error::invalid(format!("mask params: nz_ratio = {} must be in (0, 1]", self.nz_ratio)))
            }
            _ => Ok(()),
        }
    }

    /// Blocks a top-k row keeps out of `k_blocks`:
    /// `max(1, floor((1 - sqrt(1 - nz_ratio)) * k_blocks))`, computed in f64
    /// as upstream does in Python. The square root makes `nz_ratio` the kept
    /// fraction of the causal triangle rather than of a full row.
    pub fn top_k(&self, k_blocks: usize) -> usize {
        let ratio = 1.0 - (1.0 - self.nz_ratio as f64).sqrt();
        ((ratio * k_blocks as f64) as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_type_names() {
        let t = GateType::parse("Qavg_Kmaxminavg").unwrap();
        assert_eq!(t, GateType::released());
        assert_eq!(t.name(), "Qavg_Kmaxminavg");
        assert_eq!(GateType::parse("Qmaxmin_Kavg").unwrap().name(), "Qmaxmin_Kavg");
        for bad in ["", "Qavg", "Q_Kavg", "Qavg_K", "Qminmax_Kavg", "Qavgavg_Kmax", "qavg_kmax", "Qavg_Kmean"] {
            assert!(matches!(GateType::parse(bad), Err(Error::Unsupported(_))), "{bad}");
        }
    }

    #[test]
    fn llama3_inv_freq_matches_hf_rule() {
        let rope = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let f = rope.inv_freq(128);
        let plain = RopeConfig { theta: 500000.0, scaling: RopeScaling::None }.inv_freq(128);
        // Highest frequencies (short wavelengths) are untouched, lowest are divided by the factor.
        assert_eq!(f[0], plain[0]);
        assert!((f[63] - plain[63] / 8.0).abs() < 1e-18);
        // The ramp lies between the two.
        for i in 0..64 {
            assert!(f[i] <= plain[i] && f[i] >= plain[i] / 8.0 - 1e-18);
        }
    }
}
