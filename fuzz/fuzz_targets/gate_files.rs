//! The gate loader: `config.json` text with `.pth` or `.safetensors` weights.
//! The body lives in `tests/fuzzing/`, shared with the stable replay of the
//! committed seeds (`tests/fuzz_replay.rs`).
#![no_main]

#[path = "../../tests/fuzzing/mod.rs"]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::gate_files(data));
