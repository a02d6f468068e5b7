//! `config.json` of a released gate (a Hugging Face model config extended
//! with `seerattn_*` fields) to a validated [`GateConfig`].
//!
//! Defaults follow upstream's `SeerAttn*Config` constructors and Hugging
//! Face's model configs, so a config that relies on a default means here what
//! it means upstream. A wrong JSON type, a missing required field or an
//! inconsistent value is a [`Error::Format`] naming the file and the field; a
//! well-formed choice this build does not implement (RoPE types other than
//! default/linear/llama3, unknown gate types, block sizes other than 64) is
//! [`Error::Unsupported`].

use crate::config::{GateConfig, GateType, RopeConfig, RopeScaling, SparsityMethod};
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Read and parse the `config.json` at `path`.
pub fn read_config(path: &Path) -> Result<GateConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    parse_config(&path.display().to_string(), &text)
}

/// Parse `config.json` text; `path` names the file in errors.
pub fn parse_config(path: &str, text: &str) -> Result<GateConfig> {
    let root: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = root else {
        return Err(Error::format(path, "top level is not a JSON object"));
    };
    let f = Fields { path, obj: &obj, prefix: "" };

    let num_q_heads = f.usize_req("num_attention_heads")?;
    let num_kv_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_q_heads);
    let head_dim = match f.usize_opt("head_dim")? {
        Some(d) => d,
        None => {
            let hidden = f.usize_req("hidden_size")?;
            if num_q_heads == 0 || hidden % num_q_heads != 0 {
                return Err(
                    f.bad("hidden_size", format!("{hidden} is not a multiple of num_attention_heads = {num_q_heads}"))
                );
            }
            hidden / num_q_heads
        }
    };
    let gate_type = match f.str_opt("seerattn_gate_type")? {
        Some(name) => GateType::parse(name).map_err(|e| with_path(path, e))?,
        None => GateType::released(),
    };
    let sparsity_method = match f.str_opt("seerattn_sparsity_method")? {
        None | Some("threshold") => SparsityMethod::Threshold,
        Some("nz_ratio") => SparsityMethod::NzRatio,
        Some(other) => {
            return Err(Error::unsupported(format!(
                "{path}: seerattn_sparsity_method '{other}' (supported: threshold, nz_ratio)"
            )))
        }
    };
    let config = GateConfig {
        num_layers: f.usize_req("num_hidden_layers")?,
        num_q_heads,
        num_kv_heads,
        head_dim,
        // Upstream's default is the literal 128, whatever head_dim is.
        gate_hidden: f.usize_opt("seerattn_gate_hidden_size")?.unwrap_or(128),
        block_size: f.usize_opt("seerattn_gate_block_size")?.unwrap_or(64),
        gate_type,
        force_double: f.bool_opt("seerattn_gate_force_double")?.unwrap_or(false),
        rope: RopeConfig { theta: f.f64_opt("rope_theta")?.unwrap_or(10000.0), scaling: rope_scaling(&f)? },
        sparsity_method,
        threshold: f.f64_opt("seerattn_threshold")?.unwrap_or(0.0) as f32,
        nz_ratio: f.f64_opt("seerattn_nz_ratio")?.unwrap_or(1.0) as f32,
        last_block_dense: f.bool_opt("seerattn_last_block_dense")?.unwrap_or(true),
    };
    // An inconsistent config file is a malformed file, not a bad call argument.
    config.validate().map_err(|e| with_path(path, e))?;
    Ok(config)
}

/// The `config.json` text of `config`: the attention geometry, RoPE and
/// every `seerattn_*` field [`parse_config`] reads, so that parsing the text
/// gives `config` back exactly. Upstream saves the base model's whole config
/// with the gate's fields added; pass that model config's text as `base` to do
/// the same (its fields are kept, the ones written here replace theirs, and
/// `hidden_size` stays consistent because `head_dim` is always written).
/// `base` must be a JSON object.
pub fn config_to_json(config: &GateConfig, base: Option<&str>) -> Result<String> {
    let mut obj = match base {
        None => Map::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return Err(Error::invalid("base config: top level is not a JSON object")),
            Err(e) => return Err(Error::invalid(format!("base config: invalid JSON: {e}"))),
        },
    };
    // f32 fields are written in their shortest decimal form ("0.1", not
    // 0.10000000149011612): the f64 read back rounds to the same f32.
    let f32_value = |x: f32| -> Value {
        let shortest: f64 = x.to_string().parse().expect("an f32's Display parses as f64");
        serde_json::Number::from_f64(shortest).map_or(Value::Null, Value::Number)
    };
    let f64_value = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    let rope_scaling = match config.rope.scaling {
        RopeScaling::None => Value::Null,
        RopeScaling::Linear { factor } => serde_json::json!({ "rope_type": "linear", "factor": f64_value(factor) }),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            serde_json::json!({
                "rope_type": "llama3",
                "factor": f64_value(factor),
                "low_freq_factor": f64_value(low_freq_factor),
                "high_freq_factor": f64_value(high_freq_factor),
                "original_max_position_embeddings": f64_value(original_max_position_embeddings),
            })
        }
    };
    let method = match config.sparsity_method {
        SparsityMethod::Threshold => "threshold",
        SparsityMethod::NzRatio => "nz_ratio",
    };
    let fields = [
        ("num_hidden_layers", Value::from(config.num_layers)),
        ("num_attention_heads", Value::from(config.num_q_heads)),
        ("num_key_value_heads", Value::from(config.num_kv_heads)),
        ("head_dim", Value::from(config.head_dim)),
        ("rope_theta", f64_value(config.rope.theta)),
        ("rope_scaling", rope_scaling),
        ("seerattn_gate_type", Value::from(config.gate_type.name())),
        ("seerattn_gate_block_size", Value::from(config.block_size)),
        ("seerattn_gate_hidden_size", Value::from(config.gate_hidden)),
        ("seerattn_gate_force_double", Value::from(config.force_double)),
        ("seerattn_sparsity_method", Value::from(method)),
        ("seerattn_threshold", f32_value(config.threshold)),
        ("seerattn_nz_ratio", f32_value(config.nz_ratio)),
        ("seerattn_last_block_dense", Value::from(config.last_block_dense)),
    ];
    for (key, value) in fields {
        obj.insert(key.to_string(), value);
    }
    Ok(serde_json::to_string_pretty(&Value::Object(obj)).expect("a JSON value serializes"))
}

/// Attach the file to errors that lack it.
fn with_path(path: &str, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::format(path, m),
        Error::Unsupported(m) => Error::unsupported(format!("{path}: {m}")),
        other => other,
    }
}

fn rope_scaling(f: &Fields<'_>) -> Result<RopeScaling> {
    let obj = match f.obj.get("rope_scaling") {
        None | Some(Value::Null) => return Ok(RopeScaling::None),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(f.bad("rope_scaling", format!("expected an object or null, found {}", type_name(other))))
        }
    };
    let s = Fields { path: f.path, obj, prefix: "rope_scaling." };
    // Hugging Face renamed `type` to `rope_type`; both still appear.
    let kind = match s.str_opt("rope_type")? {
        Some(k) => k,
        None => {
            s.str_opt("type")?.ok_or_else(|| s.bad("rope_type", "missing (neither rope_type nor type given)".into()))?
        }
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: s.f64_req("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: s.f64_req("factor")?,
            low_freq_factor: s.f64_req("low_freq_factor")?,
            high_freq_factor: s.f64_req("high_freq_factor")?,
            original_max_position_embeddings: s.f64_req("original_max_position_embeddings")?,
        }),
        other => Err(Error::unsupported(format!(
            "{}: rope_scaling type '{other}' (supported: default, linear, llama3)",
            f.path
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to one JSON object's fields, with errors naming file and field.
struct Fields<'a> {
    path: &'a str,
    obj: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn bad(&self, key: &str, why: String) -> Error {
        Error::format(self.path, format!("field '{}{key}': {why}", self.prefix))
    }

    /// The field's value; absent and `null` both count as missing.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.bad(key, format!("expected a non-negative integer, found {v}")))
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.bad(key, "missing".into()))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_f64().map(Some).ok_or_else(|| self.bad(key, format!("expected a number, found {}", type_name(v))))
    }

    fn f64_req(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?.ok_or_else(|| self.bad(key, "missing".into()))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_bool().map(Some).ok_or_else(|| self.bad(key, format!("expected true or false, found {}", type_name(v))))
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_str().map(Some).ok_or_else(|| self.bad(key, format!("expected a string, found {}", type_name(v))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"num_attention_heads": 32, "num_hidden_layers": 4, "hidden_size": 4096}"#;

    fn with(extra: &str) -> String {
        format!(
            r#"{{"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 2, {extra}}}"#
        )
    }

    fn format_msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::Format { path, message }) => {
                assert_eq!(path, "cfg.json");
                message
            }
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_upstream() {
        let c = parse_config("cfg.json", MINIMAL).unwrap();
        assert_eq!((c.num_q_heads, c.num_kv_heads, c.head_dim, c.num_layers), (32, 32, 128, 4));
        assert_eq!((c.gate_hidden, c.block_size), (128, 64));
        assert_eq!(c.gate_type, GateType::released());
        assert_eq!(c.rope, RopeConfig { theta: 10000.0, scaling: RopeScaling::None });
        assert_eq!(c.sparsity_method, SparsityMethod::Threshold);
        assert_eq!((c.threshold, c.nz_ratio, c.last_block_dense, c.force_double), (0.0, 1.0, true, false));
    }

    #[test]
    fn rope_scaling_variants() {
        let rope =
            |s: &str| parse_config("cfg.json", &with(&format!(r#""rope_scaling": {s}"#))).map(|c| c.rope.scaling);
        assert_eq!(rope("null").unwrap(), RopeScaling::None);
        assert_eq!(rope(r#"{"rope_type": "default"}"#).unwrap(), RopeScaling::None);
        assert_eq!(rope(r#"{"type": "linear", "factor": 2}"#).unwrap(), RopeScaling::Linear { factor: 2.0 });
        assert!(matches!(
            rope(r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192}"#),
            Ok(RopeScaling::Llama3 { factor, .. }) if factor == 8.0
        ));
        for t in ["yarn", "dynamic", "longrope"] {
            match rope(&format!(r#"{{"rope_type": "{t}", "factor": 4}}"#)) {
                Err(Error::Unsupported(m)) => assert!(m.contains(t) && m.contains("cfg.json"), "{m}"),
                other => panic!("{t}: {other:?}"),
            }
        }
        assert!(format_msg(rope(r#"{"rope_type": "llama3", "factor": 8}"#)).contains("rope_scaling.low_freq_factor"));
        assert!(format_msg(rope(r#"{"factor": 8}"#)).contains("rope_type"));
        assert!(format_msg(rope("[1]")).contains("rope_scaling"));
    }

    #[test]
    fn errors_name_the_field() {
        assert!(format_msg(parse_config("cfg.json", "{\"num_attention_heads\": 8,")).contains("invalid JSON"));
        assert!(format_msg(parse_config("cfg.json", "[]")).contains("not a JSON object"));
        assert!(format_msg(parse_config("cfg.json", r#"{"num_attention_heads": 8, "head_dim": 64}"#))
            .contains("'num_hidden_layers': missing"));
        assert!(format_msg(parse_config("cfg.json", r#"{"num_attention_heads": 8, "num_hidden_layers": 1}"#))
            .contains("'hidden_size'"));
        assert!(format_msg(parse_config("cfg.json", &with(r#""seerattn_threshold": "0.1""#)))
            .contains("'seerattn_threshold': expected a number"));
        assert!(format_msg(parse_config("cfg.json", &with(r#""seerattn_last_block_dense": 1"#)))
            .contains("seerattn_last_block_dense"));
        assert!(format_msg(parse_config("cfg.json", &with(r#""seerattn_gate_block_size": -64"#)))
            .contains("seerattn_gate_block_size"));
        assert!(
            format_msg(parse_config("cfg.json", &with(r#""seerattn_gate_type": 3"#))).contains("seerattn_gate_type")
        );
        let kv = parse_config(
            "cfg.json",
            r#"{"num_attention_heads": 8, "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 1}"#,
        );
        assert!(format_msg(kv).contains("num_kv_heads"));
    }

    #[test]
    fn written_configs_parse_back_identical() {
        let mut c = parse_config("cfg.json", &with(r#""seerattn_threshold": 0.1, "seerattn_nz_ratio": 0.3"#)).unwrap();
        let text = config_to_json(&c, None).unwrap();
        assert_eq!(parse_config("cfg.json", &text).unwrap(), c);
        // The shortest form of the f32, not its f64 expansion 0.10000000149011612.
        assert!(text.contains("\"seerattn_threshold\": 0.1") && !text.contains("0.1000"), "{text}");
        c.rope.scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        c.gate_type = GateType::parse("Qmaxavg_Kmin").unwrap();
        c.sparsity_method = SparsityMethod::NzRatio;
        c.last_block_dense = false;
        assert_eq!(parse_config("cfg.json", &config_to_json(&c, None).unwrap()).unwrap(), c);
        c.rope.scaling = RopeScaling::Linear { factor: 2.0 };
        // A base model config keeps its own fields; ours replace its gate fields.
        let base =
            r#"{"model_type": "llama", "hidden_size": 1024, "num_attention_heads": 99, "seerattn_threshold": 0.5}"#;
        let text = config_to_json(&c, Some(base)).unwrap();
        assert_eq!(parse_config("cfg.json", &text).unwrap(), c);
        assert!(text.contains("\"model_type\": \"llama\""));
        assert!(config_to_json(&c, Some("[1]")).is_err());
    }

    #[test]
    fn unsupported_choices() {
        for (extra, want) in [
            (r#""seerattn_gate_type": "Qavg_Kmean""#, "Qavg_Kmean"),
            (r#""seerattn_gate_block_size": 128"#, "block_size"),
            (r#""seerattn_sparsity_method": "token_budget""#, "token_budget"),
        ] {
            match parse_config("cfg.json", &with(extra)) {
                Err(Error::Unsupported(m)) => assert!(m.contains(want) && m.contains("cfg.json"), "{m}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
        let nz =
            parse_config("cfg.json", &with(r#""seerattn_sparsity_method": "nz_ratio", "seerattn_nz_ratio": 0.25"#))
                .unwrap();
        assert_eq!((nz.sparsity_method, nz.nz_ratio), (SparsityMethod::NzRatio, 0.25));
    }
}
