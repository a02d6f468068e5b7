//! `seerattn`: a small command line over the library: the end-to-end demo,
//! training a gate by self-distillation, and looking at gate checkpoints
//! without Python. Arguments are parsed by hand (a dependency
//! would outweigh a few subcommands); each subcommand is one arm of the `match`
//! in `main`, so adding one means adding an arm and a line of help.

mod demo;
mod distill;

use std::path::Path;
use std::process::ExitCode;

const HELP_HEAD: &str = "\
seerattn - SeerAttention block-sparse attention

usage:
  seerattn demo [gate_dir] [--layer L] [--seq N]
      gate + block mask + sparse prefill on the CPU reference: loads the gate
      (default: the bundled upstream test gate and its recorded inputs; other
      gates get N random tokens, default 1024), prints mask density, error
      against dense causal attention, and the time of each stage
";

const HELP_TAIL: &str = "\
  seerattn inspect <gate_dir>
      print the config, gate type and per-tensor shapes and weight statistics
      of a gate directory (config.json + attn_gate_weights.pth or *.safetensors)
  seerattn convert <attn_gate_weights.pth> <out.safetensors>
      rewrite a torch.save archive as safetensors, bytes and dtypes unchanged
  seerattn export-pth <gate_dir> <out_dir> [--dtype bf16|f16|f32] [--base-model NAME]
                     [--model-config MODEL_CONFIG_JSON]
      write a gate directory (e.g. a trained one with attn_gate_weights.safetensors)
      as upstream releases gates: out_dir/attn_gate_weights.pth (a torch.save
      archive) and config.json with base_model, the model upstream loads the gate
      onto (kept from the source config unless given). Upstream builds the model
      from that config.json: --model-config adds the base model's own fields to a
      gate saved without them. Weights keep their dtype unless --dtype is given
      (bf16 is upstream's release format)
  seerattn help
      print this help
";

/// Exit status for every error: bad usage and failed commands alike.
const FAILURE: u8 = 2;

/// `export-pth`: the options after the two directories, then the export.
fn export_pth(dir: &Path, out: &Path, options: &[&str]) -> seerattn::Result<()> {
    let mut export = seerattn::checkpoint::PthExport::default();
    let mut rest = options;
    while let [flag, value, tail @ ..] = rest {
        match *flag {
            "--dtype" => {
                export.dtype = Some(match *value {
                    "bf16" => seerattn::DType::BF16,
                    "f16" => seerattn::DType::F16,
                    "f32" => seerattn::DType::F32,
                    other => {
                        return Err(seerattn::Error::InvalidArgument(format!("--dtype {other}: bf16, f16 or f32")))
                    }
                })
            }
            "--base-model" => export.base_model = Some(value.to_string()),
            "--model-config" => {
                let path = Path::new(value);
                let text = std::fs::read_to_string(path)
                    .map_err(|source| seerattn::Error::Io { path: path.to_path_buf(), source })?;
                export.model_config = Some(text);
            }
            other => return Err(seerattn::Error::InvalidArgument(format!("export-pth: unknown option {other}"))),
        }
        rest = tail;
    }
    if let [dangling] = rest {
        return Err(seerattn::Error::InvalidArgument(format!("export-pth: option {dangling} needs a value")));
    }
    let done = seerattn::checkpoint::export_gate_dir_to_pth(dir, out, &export)?;
    println!(
        "wrote {} ({} tensors) and {}",
        out.join("attn_gate_weights.pth").display(),
        done.tensors,
        out.join("config.json").display()
    );
    if !done.missing_model_fields.is_empty() {
        println!(
            "note: config.json has no {}; upstream builds the model from it, so this looks like a gate-only config \
             (give --model-config with the base model's config.json)",
            done.missing_model_fields.join(", ")
        );
    }
    Ok(())
}

fn help() -> String {
    format!("{HELP_HEAD}{}{HELP_TAIL}", distill::HELP)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match argv.as_slice() {
        [] | ["help" | "-h" | "--help"] => {
            print!("{}", help());
            Ok(())
        }
        ["demo", ..] => demo::run(&args[1..]),
        ["distill", ..] => distill::run(&args[1..]),
        ["inspect", dir] => seerattn::checkpoint::describe_gate_dir(Path::new(dir)).map(|s| print!("{s}")),
        ["convert", src, dst] => seerattn::checkpoint::convert_pth_to_safetensors(Path::new(src), Path::new(dst))
            .map(|()| println!("wrote {dst}")),
        ["export-pth", dir, out, rest @ ..] => export_pth(Path::new(dir), Path::new(out), rest),
        _ => {
            eprintln!("seerattn: unrecognized arguments: {}\n\n{}", argv.join(" "), help());
            return ExitCode::from(FAILURE);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seerattn: {e}");
            ExitCode::from(FAILURE)
        }
    }
}
