//! `seerattn`: a small command line over the library: the end-to-end demo,
//! and looking at gate checkpoints without Python. Arguments are parsed by hand (a dependency
//! would outweigh three subcommands); each subcommand is one arm of the `match`
//! in `main`, so adding one means adding an arm and a line of help.

mod demo;

use std::path::Path;
use std::process::ExitCode;

const HELP: &str = "\
seerattn - SeerAttention block-sparse attention

usage:
  seerattn demo [gate_dir] [--layer L] [--seq N]
      gate + block mask + sparse prefill on the CPU reference: loads the gate
      (default: the bundled upstream test gate and its recorded inputs; other
      gates get N random tokens, default 1024), prints mask density, error
      against dense causal attention, and the time of each stage
  seerattn inspect <gate_dir>
      print the config, gate type and per-tensor shapes and weight statistics
      of a gate directory (config.json + attn_gate_weights.pth or *.safetensors)
  seerattn convert <attn_gate_weights.pth> <out.safetensors>
      rewrite a torch.save archive as safetensors, bytes and dtypes unchanged
  seerattn help
      print this help
";

/// Exit status for every error: bad usage and failed commands alike.
const FAILURE: u8 = 2;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match argv.as_slice() {
        [] | ["help" | "-h" | "--help"] => {
            print!("{HELP}");
            Ok(())
        }
        ["demo", ..] => demo::run(&args[1..]),
        ["inspect", dir] => seerattn::checkpoint::describe_gate_dir(Path::new(dir)).map(|s| print!("{s}")),
        ["convert", src, dst] => seerattn::checkpoint::convert_pth_to_safetensors(Path::new(src), Path::new(dst))
            .map(|()| println!("wrote {dst}")),
        _ => {
            eprintln!("seerattn: unrecognized arguments: {}\n\n{HELP}", argv.join(" "));
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
