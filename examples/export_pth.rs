//! A gate saved as the trainer saves it, and its exports in upstream's
//! release format, for `scripts/check_pth_with_torch.py` to load with
//! PyTorch on a machine that has it:
//!
//! ```text
//! cargo run --release --example export_pth -- <out_dir>
//! ```
//!
//! writes `<out_dir>/saved` (`checkpoint::save_gate_dir`: F32
//! `attn_gate_weights.safetensors`, a Q and a K projection in each of 32
//! layers, so 64 tensors and a pickle memo past index 255),
//! `<out_dir>/export_f32` (`export_gate_dir_to_pth`, dtypes kept) and
//! `<out_dir>/export_bf16` (weights rounded to bf16, upstream's release
//! dtype). The weights are `distill::init_gate`'s random initialisation:
//! the file format, not training, is what the check is about.

use seerattn::checkpoint::{config_json::parse_config, export_gate_dir_to_pth, save_gate_dir, PthExport};
use seerattn::distill::init_gate;
use seerattn::{DType, Result};
use std::path::PathBuf;

/// A small Llama-style model config with a gate that has a Q projection
/// (two Q poolings); `base_model` names the model upstream would load.
const MODEL_CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "base_model": "example/llama-small",
  "hidden_size": 256,
  "intermediate_size": 688,
  "vocab_size": 32000,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 64,
  "num_hidden_layers": 32,
  "rms_norm_eps": 1e-05,
  "max_position_embeddings": 131072,
  "rope_theta": 500000.0,
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192},
  "torch_dtype": "bfloat16",
  "seerattn_gate_type": "Qmaxavg_Kmaxminavg",
  "seerattn_gate_block_size": 64,
  "seerattn_gate_hidden_size": 64,
  "seerattn_sparsity_method": "threshold",
  "seerattn_threshold": 0.002,
  "seerattn_last_block_dense": true
}"#;

fn main() -> Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/pth-export".into()));
    let config = parse_config("model config", MODEL_CONFIG)?;
    let gate = init_gate(config, 2026)?;
    let saved = out.join("saved");
    save_gate_dir(&gate, &saved, DType::F32, Some(MODEL_CONFIG))?;
    for (name, dtype) in [("export_f32", None), ("export_bf16", Some(DType::BF16))] {
        let done = export_gate_dir_to_pth(&saved, &out.join(name), &PthExport { dtype, ..PthExport::default() })?;
        println!("{}: {} tensors", out.join(name).display(), done.tensors);
    }
    println!("source: {}", saved.join("attn_gate_weights.safetensors").display());
    Ok(())
}
