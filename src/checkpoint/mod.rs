//! Reading released gate checkpoints natively, without Python.
//!
//! A released gate directory holds `config.json` and `attn_gate_weights.pth`
//! (a `torch.save` archive of bf16 tensors named
//! `model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight`, plus
//! `mask_linear_q` for gate types with a Q projection). Loading Python
//! pickles natively would normally mean trusting them; here the archive is
//! read by a bounds-checked ZIP reader (`zip`) and a restricted pickle
//! interpreter (`pickle`) that can only build tensor records, so a hostile
//! file yields an error, never code execution. `.safetensors` weights are
//! read and written through the `safetensors` crate.
//!
//! Writing goes the other way for upstream: [`write_pth`] produces the
//! archive `torch.save` would (`pth_write`, `zip_write`), and
//! [`export_gate_dir_to_pth`] turns any gate directory (a trained one saved by
//! [`save_gate_dir`] included) into a released-format directory upstream's
//! `SeerAttn*ForCausalLM.from_pretrained` loads.
//!
//! Choices made for gate directories ([`load_gate_dir`]):
//! - when `attn_gate_weights.pth` exists it is used, even if `.safetensors`
//!   files sit next to it: it is the released original, and a converted copy
//!   is bit-identical anyway. Without it, exactly one `*.safetensors` file
//!   must be present (several are ambiguous and refused);
//! - every tensor must be a gate projection of a layer the config declares;
//!   unknown extra tensors are refused rather than ignored, since a file
//!   carrying weights this loader does not understand (biases, another gate
//!   layout) would otherwise load as a silently different gate.

pub mod config_json;
mod pickle;
mod pth;
mod pth_write;
mod safetensors_io;
mod zip;
mod zip_write;

use crate::config::{GateConfig, SparsityMethod};
use crate::error::{Error, Result};
use crate::gate::{Gate, WeightRef};
use crate::tensor::DType;
use half::{bf16, f16};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use config_json::{config_to_json, read_config};

/// File name of the weights in a released gate directory.
pub const PTH_WEIGHTS_FILE: &str = "attn_gate_weights.pth";
/// File name of the config in a gate directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights [`save_gate_dir`] writes.
pub const SAFETENSORS_WEIGHTS_FILE: &str = "attn_gate_weights.safetensors";

/// A named tensor as stored in a checkpoint: contiguous, row-major,
/// little-endian bytes of `dtype`.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Exactly `shape.product() * dtype.size()` bytes.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Elements as f32 (exact for bf16 and f16).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::BF16 => self.data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F16 => self.data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F32 => self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// Every tensor of a `torch.save` archive, in the order it was saved.
pub fn read_pth(path: &Path) -> Result<Vec<RawTensor>> {
    parse_pth(&path.display().to_string(), read_file(path)?)
}

/// As [`read_pth`], for an archive already in memory; `name` labels it in errors.
pub fn parse_pth(name: &str, bytes: Vec<u8>) -> Result<Vec<RawTensor>> {
    pth::read_pth_bytes(name, bytes)
}

/// Write `tensors` (in that order) as the `torch.save` archive of the dict
/// `{t.name: t}`: `torch.load(path, weights_only=True)` gives them back, and
/// the bytes are those torch 2.x writes for such a dict of CPU tensors. The
/// records live under the file name without its extension, as torch names
/// them (`archive` for a name that is not ASCII). BF16, F16 and F32; each
/// tensor gets its own storage. Archives of 4 GiB or more are refused.
pub fn write_pth(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // torch's basename(): after the last '/' or '\\', up to the last '.'.
    let name = name.rsplit(['/', '\\']).next().unwrap_or("");
    let stem = match name.rfind('.') {
        Some(dot) => &name[..dot],
        None => name,
    };
    let archive = if stem.is_empty() || !stem.is_ascii() { "archive" } else { stem };
    let bytes = pth_bytes(archive, tensors)?;
    std::fs::write(path, bytes).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// As [`write_pth`], in memory, with the records under `archive_name/`.
pub fn pth_bytes(archive_name: &str, tensors: &[RawTensor]) -> Result<Vec<u8>> {
    pth_write::pth_bytes(archive_name, tensors)
}

/// Every tensor of a `.safetensors` file, in file order.
pub fn read_safetensors(path: &Path) -> Result<Vec<RawTensor>> {
    parse_safetensors(&path.display().to_string(), &read_file(path)?)
}

/// As [`read_safetensors`], for a file already in memory; `name` labels it in errors.
pub fn parse_safetensors(name: &str, bytes: &[u8]) -> Result<Vec<RawTensor>> {
    safetensors_io::read_safetensors_bytes(name, bytes)
}

/// Write `tensors` to a `.safetensors` file (metadata `{"format": "pt"}`).
pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let bytes = safetensors_io::safetensors_bytes(tensors)?;
    std::fs::write(path, bytes).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// As [`write_safetensors`], with `metadata` added to the header (the key
/// `format` is reserved).
pub fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[RawTensor],
    metadata: &std::collections::HashMap<String, String>,
) -> Result<()> {
    let bytes = safetensors_io::safetensors_bytes_with_metadata(tensors, metadata)?;
    std::fs::write(path, bytes).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// Every tensor of a `.safetensors` file and its header's `__metadata__` map.
pub fn read_safetensors_with_metadata(
    path: &Path,
) -> Result<(Vec<RawTensor>, std::collections::HashMap<String, String>)> {
    safetensors_io::read_safetensors_with_metadata(&path.display().to_string(), &read_file(path)?)
}

/// Write a gate directory that [`load_gate_dir`] loads back as the same gate:
/// `config.json` ([`config_to_json`], over `base_config`, the model's own
/// config text, when given) and [`SAFETENSORS_WEIGHTS_FILE`] holding every
/// layer's projections under upstream's tensor names, in `dtype`. F32 keeps
/// trained weights exactly; BF16 is upstream's release format (rounded to
/// nearest even; what `torch.save` of the bf16 model would hold).
///
/// Creates `dir` when missing and replaces the two files. Refuses a gate with
/// a layer that has no weights, and a `dir` that holds `attn_gate_weights.pth`
/// or another `*.safetensors` file: the loader would read the `.pth` instead,
/// or refuse the ambiguity.
pub fn save_gate_dir(gate: &Gate, dir: &Path, dtype: DType, base_config: Option<&str>) -> Result<()> {
    let c = gate.config();
    let mut tensors = Vec::with_capacity(2 * c.num_layers);
    for layer in 0..c.num_layers {
        let w = gate.layer(layer)?;
        tensors.push(weight_tensor(gate_name(layer, Proj::K), c.k_weight_shape(), &w.k_proj, dtype));
        if let (Some(q), Some(shape)) = (&w.q_proj, c.q_weight_shape()) {
            tensors.push(weight_tensor(gate_name(layer, Proj::Q), shape, q, dtype));
        }
    }
    let config_text = config_to_json(c, base_config)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if dir.join(PTH_WEIGHTS_FILE).exists() {
        return Err(Error::invalid(format!(
            "{}: holds {PTH_WEIGHTS_FILE}, which the loader would read instead of the saved weights",
            dir.display()
        )));
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = entry.map_err(io(dir))?.path();
        if p.extension().is_some_and(|e| e == "safetensors") && p.file_name() != Some(SAFETENSORS_WEIGHTS_FILE.as_ref())
        {
            return Err(Error::invalid(format!(
                "{}: holds another weights file {}; the loader needs exactly one",
                dir.display(),
                p.display()
            )));
        }
    }
    write_safetensors(&dir.join(SAFETENSORS_WEIGHTS_FILE), &tensors)?;
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(&config_path, config_text).map_err(io(&config_path))
}

/// A weight tensor of `values` (f32, row-major) rounded to `dtype`.
fn weight_tensor(name: String, shape: [usize; 3], values: &[f32], dtype: DType) -> RawTensor {
    let mut data = vec![0u8; values.len() * dtype.size()];
    for (i, &v) in values.iter().enumerate() {
        crate::tensor::store_f32(&mut data, dtype, i, v);
    }
    RawTensor { name, dtype, shape: shape.to_vec(), data }
}

/// Convert a `torch.save` archive to `.safetensors`, bytes and dtypes unchanged.
pub fn convert_pth_to_safetensors(src: &Path, dst: &Path) -> Result<()> {
    write_safetensors(dst, &read_pth(src)?)
}

/// How [`export_gate_dir_to_pth`] writes a gate.
#[derive(Clone, Debug, Default)]
pub struct PthExport {
    /// Store every weight in this dtype: `Some(BF16)` is upstream's release
    /// format (rounded to nearest even, as `tensor.to(torch.bfloat16)`).
    /// `None` keeps each tensor's stored dtype, so the exported gate is the
    /// same gate bit for bit (an F32 checkpoint loads into upstream's bf16
    /// model through `load_state_dict`, which rounds the same way).
    pub dtype: Option<DType>,
    /// The `base_model` written to `config.json`: the model upstream's
    /// `from_pretrained` loads before adding the gate. `None` keeps the
    /// source config's; a config with neither is refused.
    pub base_model: Option<String>,
    /// The text of the base model's own `config.json`, for a gate directory
    /// saved without it: its fields are added under the gate's. It must
    /// describe the gate's geometry and RoPE.
    pub model_config: Option<String>,
}

/// What [`export_gate_dir_to_pth`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct PthExported {
    /// Tensors in `attn_gate_weights.pth`.
    pub tensors: usize,
    /// Fields of [`MODEL_FIELDS`] the written `config.json` lacks. Upstream
    /// builds the whole model from that file (its config class's defaults,
    /// Llama-7B's, fill what is missing), so a gate meant for upstream should
    /// have none missing: save it with the model's config or give
    /// [`PthExport::model_config`].
    pub missing_model_fields: Vec<&'static str>,
}

/// A heuristic for a `config.json` that holds only the gate's fields, not the
/// model's: fields every model config has, whose defaults in upstream's
/// config class would build another model. A full model config has them
/// (and more that this does not check, such as `rms_norm_eps`).
pub const MODEL_FIELDS: [&str; 3] = ["hidden_size", "intermediate_size", "vocab_size"];

/// Export the gate directory `dir` (any format [`load_gate_dir`] reads) as
/// upstream releases gates: `out_dir/attn_gate_weights.pth` ([`write_pth`];
/// per layer `mask_linear_q` before `mask_linear_k`, the order of upstream's
/// state dict) and `out_dir/config.json`: the source config's fields as they
/// are, over the base model's ([`PthExport::model_config`]) when given, with
/// `base_model` set.
///
/// The source must load as a gate: what fails [`load_gate_dir`] fails here.
/// `out_dir` is created when missing and must not be `dir` itself. The
/// written directory is read back before returning: the weights must come
/// back bit for bit and the directory must load as a gate of the source's
/// config.
pub fn export_gate_dir_to_pth(dir: &Path, out_dir: &Path, options: &PthExport) -> Result<PthExported> {
    use serde_json::{Map, Value};
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let parts = GateParts::read(dir)?;
    let gate = parts.gate()?;
    let config_name = parts.config_path.display().to_string();
    let config_text = std::fs::read_to_string(&parts.config_path).map_err(io(&parts.config_path))?;
    let object = |name: &str, text: &str| match serde_json::from_str(text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(Error::format(name, "top level is not a JSON object")),
        Err(e) => Err(Error::format(name, format!("invalid JSON: {e}"))),
    };
    let source: Map<String, Value> = object(&config_name, &config_text)?;

    let mut config = Map::new();
    if let Some(text) = &options.model_config {
        let model = object("model config", text)?;
        // The model's geometry and RoPE with the gate's seerattn_* fields
        // must read as the gate's own config.
        let mut check = model.clone();
        check.extend(source.iter().filter(|(k, _)| k.starts_with("seerattn_")).map(|(k, v)| (k.clone(), v.clone())));
        let as_gate = config_json::parse_config("model config", &Value::Object(check).to_string())?;
        if &as_gate != gate.config() {
            return Err(Error::invalid(format!(
                "model config: describes {as_gate:?}, but the gate's {config_name} describes {:?}",
                gate.config()
            )));
        }
        config = model;
    }
    config.extend(source);
    match (&options.base_model, config.get("base_model")) {
        (Some(name), _) if !name.is_empty() => {
            config.insert("base_model".into(), Value::String(name.clone()));
        }
        (Some(_), _) => return Err(Error::invalid("base_model: an empty name")),
        (None, Some(Value::String(name))) if !name.is_empty() => {}
        (None, _) => {
            return Err(Error::invalid(format!(
                "{config_name}: no base_model (a string naming the model); upstream's from_pretrained loads the \
                 model it names before adding the gate, so give one"
            )))
        }
    }
    let missing_model_fields = MODEL_FIELDS.into_iter().filter(|f| !config.contains_key(*f)).collect();
    let out_config = serde_json::to_string_pretty(&Value::Object(config)).expect("a JSON value serializes");

    let mut tensors: Vec<RawTensor> = Vec::with_capacity(parts.tensors.len());
    for layer in 0..gate.config().num_layers {
        for proj in [Proj::Q, Proj::K] {
            let Some(t) = parts.tensors.iter().find(|t| parse_gate_name(&t.name) == Some((layer, proj))) else {
                continue;
            };
            tensors.push(match options.dtype {
                Some(dtype) if dtype != t.dtype => {
                    let shape: [usize; 3] = t.shape.as_slice().try_into().expect("checked 3-d by GateParts::gate");
                    weight_tensor(t.name.clone(), shape, &t.to_f32(), dtype)
                }
                _ => t.clone(),
            });
        }
    }

    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    if std::fs::canonicalize(dir).map_err(io(dir))? == std::fs::canonicalize(out_dir).map_err(io(out_dir))? {
        return Err(Error::invalid(format!("{}: export into another directory than the source", out_dir.display())));
    }
    let pth_path = out_dir.join(PTH_WEIGHTS_FILE);
    write_pth(&pth_path, &tensors)?;
    let config_path = out_dir.join(CONFIG_FILE);
    std::fs::write(&config_path, out_config).map_err(io(&config_path))?;

    if read_pth(&pth_path)? != tensors {
        return Err(Error::invalid(format!("{}: the written weights read back differently", pth_path.display())));
    }
    if load_gate_dir(out_dir)?.config() != gate.config() {
        return Err(Error::invalid(format!("{}: the written config reads back differently", config_path.display())));
    }
    Ok(PthExported { tensors: tensors.len(), missing_model_fields })
}

/// Load a gate directory: `config.json` plus its weights (see the module
/// docs for which weights file is used).
pub fn load_gate_dir(dir: &Path) -> Result<Gate> {
    let parts = GateParts::read(dir)?;
    parts.gate()
}

/// The bytes of a gate's weights file, by format.
#[derive(Clone, Copy, Debug)]
pub enum WeightsBytes<'a> {
    /// A `torch.save` archive (`attn_gate_weights.pth`).
    Pth(&'a [u8]),
    /// A `.safetensors` file.
    Safetensors(&'a [u8]),
}

/// As [`load_gate_dir`], for a gate whose files are already in memory: the
/// text of its `config.json` and the bytes of its weights file. The names
/// label the two in errors. Every check of the directory loader applies.
pub fn load_gate_bytes(
    config_name: &str,
    config_text: &str,
    weights_name: &str,
    weights: WeightsBytes<'_>,
) -> Result<Gate> {
    let config = config_json::parse_config(config_name, config_text)?;
    let tensors = match weights {
        WeightsBytes::Pth(bytes) => parse_pth(weights_name, bytes.to_vec())?,
        WeightsBytes::Safetensors(bytes) => parse_safetensors(weights_name, bytes)?,
    };
    let parts = GateParts {
        config,
        config_path: PathBuf::from(config_name),
        weights_path: PathBuf::from(weights_name),
        tensors,
    };
    parts.gate()
}

/// A human-readable summary of a gate directory: config, gate type, and per
/// tensor its name, dtype, shape and weight statistics. Fails exactly when
/// [`load_gate_dir`] would.
pub fn describe_gate_dir(dir: &Path) -> Result<String> {
    let parts = GateParts::read(dir)?;
    let gate = parts.gate()?;
    let c = gate.config();
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(s, "gate directory: {}", dir.display());
    let _ = writeln!(s, "config: {}", parts.config_path.display());
    let _ = writeln!(
        s,
        "  layers {}, query heads {}, kv heads {} (group size {}), head_dim {}",
        c.num_layers,
        c.num_q_heads,
        c.num_kv_heads,
        c.group_size(),
        c.head_dim
    );
    let _ = writeln!(
        s,
        "  gate type {}, block size {}, gate hidden {}, force_double {}, Q projection {}",
        c.gate_type.name(),
        c.block_size,
        c.gate_hidden,
        c.force_double,
        if c.has_q_proj() { "yes" } else { "no" }
    );
    let _ = writeln!(s, "  mask_linear_k shape {:?}, mask_linear_q shape {:?}", c.k_weight_shape(), c.q_weight_shape());
    let _ = writeln!(s, "  rope theta {}, scaling {:?}", c.rope.theta, c.rope.scaling);
    let method = match c.sparsity_method {
        SparsityMethod::Threshold => "threshold",
        SparsityMethod::NzRatio => "nz_ratio",
    };
    let _ = writeln!(
        s,
        "  sparsity {method} (threshold {}, nz_ratio {}), last_block_dense {}",
        c.threshold, c.nz_ratio, c.last_block_dense
    );
    let _ = writeln!(s, "weights: {} ({} tensors)", parts.weights_path.display(), parts.tensors.len());
    for t in &parts.tensors {
        let v = t.to_f32();
        let n = v.len().max(1) as f64;
        let mean_abs = v.iter().map(|x| f64::from(x.abs())).sum::<f64>() / n;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let max_abs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let _ = writeln!(
            s,
            "  {}: {} {:?}  mean {mean:.6}  mean|w| {mean_abs:.6}  max|w| {max_abs:.6}",
            t.name,
            t.dtype.name(),
            t.shape
        );
    }
    Ok(s)
}

/// Which projection of a layer's gate a tensor holds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Proj {
    K,
    Q,
}

/// `model.layers.{i}.self_attn.attn_gate.mask_linear_{k,q}.weight` → (i, proj).
fn parse_gate_name(name: &str) -> Option<(usize, Proj)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    // Canonical decimal only, so "01" and "1" cannot both claim layer 1.
    if index.is_empty()
        || index.len() > 6
        || !index.bytes().all(|b| b.is_ascii_digit())
        || (index.len() > 1 && index.starts_with('0'))
    {
        return None;
    }
    let proj = match rest {
        "self_attn.attn_gate.mask_linear_k.weight" => Proj::K,
        "self_attn.attn_gate.mask_linear_q.weight" => Proj::Q,
        _ => return None,
    };
    Some((index.parse().ok()?, proj))
}

fn gate_name(layer: usize, proj: Proj) -> String {
    let p = if proj == Proj::K { "k" } else { "q" };
    format!("model.layers.{layer}.self_attn.attn_gate.mask_linear_{p}.weight")
}

/// A gate directory's config and weight tensors, read but not yet matched.
struct GateParts {
    config: GateConfig,
    config_path: PathBuf,
    weights_path: PathBuf,
    tensors: Vec<RawTensor>,
}

impl GateParts {
    fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config = read_config(&config_path)?;
        let weights_path = weights_file(dir)?;
        let tensors = if weights_path.extension().is_some_and(|e| e == "pth") {
            read_pth(&weights_path)?
        } else {
            read_safetensors(&weights_path)?
        };
        Ok(GateParts { config, config_path, weights_path, tensors })
    }

    /// Match tensors to layers, check them against the config, build the gate.
    fn gate(&self) -> Result<Gate> {
        let file = self.weights_path.display().to_string();
        let fmt = |m: String| Error::format(file.clone(), m);
        let c = &self.config;
        let mut slots: Vec<[Option<&RawTensor>; 2]> = vec![[None, None]; c.num_layers];
        for t in &self.tensors {
            let (layer, proj) = parse_gate_name(&t.name).ok_or_else(|| {
                fmt(format!(
                    "unexpected tensor '{}' (a gate file holds only model.layers.{{i}}.self_attn.attn_gate.mask_linear_{{k,q}}.weight)",
                    t.name
                ))
            })?;
            let slot = slots.get_mut(layer).ok_or_else(|| {
                fmt(format!("tensor '{}' is for layer {layer}, but the config has {} layers", t.name, c.num_layers))
            })?;
            let want = match proj {
                Proj::K => c.k_weight_shape(),
                Proj::Q => c.q_weight_shape().ok_or_else(|| {
                    fmt(format!(
                        "tensor '{}': gate type {} with gate_hidden = head_dim and no force_double has no mask_linear_q",
                        t.name,
                        c.gate_type.name()
                    ))
                })?,
            };
            if t.shape != want {
                return Err(fmt(format!("tensor '{}' has shape {:?}, config.json implies {want:?}", t.name, t.shape)));
            }
            let cell = &mut slot[proj as usize];
            if cell.is_some() {
                return Err(fmt(format!("tensor '{}' appears twice", t.name)));
            }
            *cell = Some(t);
        }
        let mut gate = Gate::new(c.clone())?; // validated by read_config
        for (layer, [k, q]) in slots.iter().enumerate() {
            let k = k.ok_or_else(|| fmt(format!("missing tensor '{}'", gate_name(layer, Proj::K))))?;
            if q.is_none() && c.has_q_proj() {
                return Err(fmt(format!("missing tensor '{}'", gate_name(layer, Proj::Q))));
            }
            let view = |t| weight_view(t, &file);
            let q = q.map(view).transpose()?;
            // Non-finite weights surface here; they are a fault of the file.
            gate.set_layer_weights(layer, view(k)?, q).map_err(|e| match e {
                Error::InvalidArgument(m) => fmt(m),
                other => other,
            })?;
        }
        Ok(gate)
    }
}

/// `t` as a weight view (its shape was already checked to be 3-d).
fn weight_view<'t>(t: &'t RawTensor, file: &str) -> Result<WeightRef<'t>> {
    let shape: [usize; 3] =
        t.shape.as_slice().try_into().map_err(|_| Error::format(file, format!("tensor '{}' is not 3-d", t.name)))?;
    Ok(WeightRef { dtype: t.dtype, shape, bytes: &t.data })
}

/// The weights file of a gate directory (see the module docs for the rule).
fn weights_file(dir: &Path) -> Result<PathBuf> {
    let pth = dir.join(PTH_WEIGHTS_FILE);
    if pth.is_file() {
        return Ok(pth);
    }
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.is_file() && p.extension().is_some_and(|e| e == "safetensors") {
            found.push(p);
        }
    }
    found.sort();
    let dir_s = dir.display().to_string();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::format(dir_s, format!("no {PTH_WEIGHTS_FILE} and no *.safetensors weights file"))),
        _ => Err(Error::format(
            dir_s,
            format!(
                "no {PTH_WEIGHTS_FILE} and several *.safetensors files ({}); keep exactly one",
                found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_names() {
        assert_eq!(parse_gate_name("model.layers.0.self_attn.attn_gate.mask_linear_k.weight"), Some((0, Proj::K)));
        assert_eq!(parse_gate_name("model.layers.31.self_attn.attn_gate.mask_linear_q.weight"), Some((31, Proj::Q)));
        for bad in [
            "model.layers.01.self_attn.attn_gate.mask_linear_k.weight",
            "model.layers.-1.self_attn.attn_gate.mask_linear_k.weight",
            "model.layers..self_attn.attn_gate.mask_linear_k.weight",
            "model.layers.1.self_attn.attn_gate.mask_linear_k.bias",
            "model.layers.99999999999999999999.self_attn.attn_gate.mask_linear_k.weight",
            "layers.1.self_attn.attn_gate.mask_linear_k.weight",
        ] {
            assert_eq!(parse_gate_name(bad), None, "{bad}");
        }
        assert_eq!(gate_name(3, Proj::Q), "model.layers.3.self_attn.attn_gate.mask_linear_q.weight");
    }
}
