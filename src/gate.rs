//! A gate: its [`GateConfig`] and the learned projection weights of each layer.
//!
//! Weights are held as f32 (bf16 and f16 convert exactly), in upstream's
//! layout `[heads, in, hidden]`, row-major. A gate is created from a config
//! and filled layer by layer ([`Gate::set_layer_weights`]), or loaded whole
//! from a checkpoint directory ([`Gate::load_dir`]).

use crate::batch::Batch;
use crate::config::{GateConfig, MaskParams};
use crate::error::{Error, Result};
use crate::mask::BlockMask;
use crate::reference::{scores::GateScores, select::select_blocks};
use crate::tensor::{load_f32, DType, Tensor3};
use std::path::Path;

/// A contiguous, row-major weight tensor in host memory.
#[derive(Clone, Copy, Debug)]
pub struct WeightRef<'a> {
    pub dtype: DType,
    pub shape: [usize; 3],
    /// Little-endian elements, exactly `shape.product() * dtype.size()` bytes.
    pub bytes: &'a [u8],
}

/// One layer's gate projections, f32, `[heads, in, hidden]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    /// `mask_linear_k.weight`: `[k_proj_heads, k_in, gate_hidden]`.
    pub k_proj: Vec<f32>,
    /// `mask_linear_q.weight` when the gate type has one: `[num_q_heads, q_in, gate_hidden]`.
    pub q_proj: Option<Vec<f32>>,
}

/// A gate for every layer of one model.
#[derive(Clone, Debug)]
pub struct Gate {
    config: GateConfig,
    layers: Vec<Option<LayerWeights>>,
}

impl Gate {
    /// A gate with no weights yet. Validates the config.
    pub fn new(config: GateConfig) -> Result<Self> {
        config.validate()?;
        let layers = vec![None; config.num_layers];
        Ok(Gate { config, layers })
    }

    /// Load `config.json` and the weights (`attn_gate_weights.pth` or
    /// `*.safetensors`) of a gate directory as released upstream.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        crate::checkpoint::load_gate_dir(dir)
    }

    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    /// Set layer `layer`'s projections. `k` must have the shape
    /// [`GateConfig::k_weight_shape`]; `q` must be present exactly when the
    /// gate type has a Q projection ([`GateConfig::q_weight_shape`]).
    pub fn set_layer_weights(&mut self, layer: usize, k: WeightRef<'_>, q: Option<WeightRef<'_>>) -> Result<()> {
        if layer >= self.config.num_layers {
            return Err(Error::invalid(format!(
                "layer {layer} out of range (the gate has {} layers)",
                self.config.num_layers
            )));
        }
        let k_proj = convert_weight(&format!("layer {layer} mask_linear_k"), k, self.config.k_weight_shape())?;
        let q_proj = match (self.config.q_weight_shape(), q) {
            (None, None) => None,
            (Some(shape), Some(q)) => Some(convert_weight(&format!("layer {layer} mask_linear_q"), q, shape)?),
            (None, Some(_)) => {
                return Err(Error::invalid(format!(
                    "layer {layer}: gate type {} with gate_hidden = head_dim has no mask_linear_q, but one was given",
                    self.config.gate_type.name()
                )))
            }
            (Some(shape), None) => {
                return Err(Error::invalid(format!(
                    "layer {layer}: gate type {} needs mask_linear_q of shape {shape:?}",
                    self.config.gate_type.name()
                )))
            }
        };
        self.layers[layer] = Some(LayerWeights { k_proj, q_proj });
        Ok(())
    }

    /// Layer `layer`'s weights, or an error naming the layer if it has none.
    pub fn layer(&self, layer: usize) -> Result<&LayerWeights> {
        match self.layers.get(layer) {
            None => Err(Error::invalid(format!(
                "layer {layer} out of range (the gate has {} layers)",
                self.config.num_layers
            ))),
            Some(None) => Err(Error::invalid(format!("layer {layer} has no weights loaded"))),
            Some(Some(w)) => Ok(w),
        }
    }

    /// Layer `layer`'s weights for in-place updates (the trainer's optimizer
    /// step), or an error naming the layer if it has none.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerWeights> {
        self.layer(layer)?;
        Ok(self.layers[layer].as_mut().expect("checked by layer()"))
    }

    /// Gate logits and probabilities of layer `layer` for a batch, from
    /// pre-RoPE `q_nope: [total_q, num_q_heads, head_dim]` and
    /// `k_nope: [total_k, num_kv_heads, head_dim]` (bf16 or f16; f32 is
    /// first rounded to bf16, to nearest even, as the CUDA path does).
    pub fn scores(&self, layer: usize, q_nope: &Tensor3, k_nope: &Tensor3, batch: &Batch) -> Result<GateScores> {
        let weights = self.layer(layer)?;
        self.check_inputs(q_nope, k_nope, batch)?;
        let (q_bytes, k_bytes, q16, k16);
        let q_nope = if q_nope.dtype() == DType::F32 {
            q_bytes = crate::gpu::convert::round_host(q_nope, DType::BF16);
            q16 = packed_bf16("q_nope", &q_bytes, q_nope.shape())?;
            &q16
        } else {
            q_nope
        };
        let k_nope = if k_nope.dtype() == DType::F32 {
            k_bytes = crate::gpu::convert::round_host(k_nope, DType::BF16);
            k16 = packed_bf16("k_nope", &k_bytes, k_nope.shape())?;
            &k16
        } else {
            k_nope
        };
        Ok(crate::reference::scores::gate_scores(&self.config, weights, q_nope, k_nope, batch))
    }

    /// The block mask of layer `layer` for a batch: pooling, scores and the
    /// selection rule of `params` (see [`MaskParams::from_config`]).
    pub fn compute_block_mask(
        &self,
        layer: usize,
        q_nope: &Tensor3,
        k_nope: &Tensor3,
        batch: &Batch,
        params: &MaskParams,
    ) -> Result<BlockMask> {
        params.validate()?;
        let scores = self.scores(layer, q_nope, k_nope, batch)?;
        Ok(select_blocks(params, &scores))
    }

    /// Check the gate's pre-RoPE inputs against the config and the batch:
    /// bf16 or f16, `[tokens, heads, head_dim]`.
    pub(crate) fn check_inputs(&self, q_nope: &Tensor3, k_nope: &Tensor3, batch: &Batch) -> Result<()> {
        let c = &self.config;
        for (name, t, tokens, heads) in
            [("q_nope", q_nope, batch.total_q(), c.num_q_heads), ("k_nope", k_nope, batch.total_k(), c.num_kv_heads)]
        {
            let want = [tokens, heads, c.head_dim];
            if t.shape() != want {
                return Err(Error::invalid(format!(
                    "{name}: shape {:?}, expected {want:?} ([tokens, heads, head_dim] for this batch and gate)",
                    t.shape()
                )));
            }
        }
        Ok(())
    }

    /// Whether layer `layer` has weights.
    pub fn has_layer(&self, layer: usize) -> bool {
        matches!(self.layers.get(layer), Some(Some(_)))
    }
}

/// A packed bf16 `[tokens, heads, dim]` view of `bytes`.
fn packed_bf16<'a>(name: &str, bytes: &'a [u8], [t, h, d]: [usize; 3]) -> Result<Tensor3<'a>> {
    Tensor3::new(name, bytes, DType::BF16, crate::tensor::Layout3::contiguous(t, h, d))
}

fn convert_weight(name: &str, w: WeightRef<'_>, want: [usize; 3]) -> Result<Vec<f32>> {
    if w.shape != want {
        return Err(Error::invalid(format!("{name}: shape {:?}, expected {want:?}", w.shape)));
    }
    let n = want.iter().product::<usize>();
    if w.bytes.len() != n * w.dtype.size() {
        return Err(Error::invalid(format!(
            "{name}: {} bytes for {n} {} elements (expected {})",
            w.bytes.len(),
            w.dtype.name(),
            n * w.dtype.size()
        )));
    }
    let out: Vec<f32> = (0..n).map(|i| load_f32(w.bytes, w.dtype, i)).collect();
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid(format!("{name}: element {i} is not finite ({})", out[i])));
    }
    Ok(out)
}
