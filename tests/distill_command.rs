//! `seerattn distill`, the built binary run end to end: a planted data set
//! written by `--make-planted`, trained from random weights (the loss falls,
//! the saved gate loads and finds the planted blocks), stopped and resumed
//! (bit for bit the uninterrupted run), and bad flags refused with a message.
//! `--device cuda` is refused cleanly where it cannot run (no GPU here, a
//! gate the GPU trainer does not take); its training runs on the GPU
//! machine, which has no `seerattn` program: gpu_distill runs the same loop
//! there through the library (`gpu_distill::gpu_dataset_run_*`).

use seerattn::checkpoint;
use seerattn::distill::{init_gate, GateTrainer, TrainConfig};
use seerattn::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn seerattn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_seerattn")).args(args).output().expect("the seerattn binary runs")
}

/// Run and require success; stdout.
fn ok(args: &[&str]) -> String {
    let out = seerattn(args);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "seerattn {}: {}\n{stdout}\n{stderr}", args.join(" "), out.status);
    stdout.into_owned()
}

/// Run and require failure with status 2; stderr.
fn fails(args: &[&str]) -> String {
    let out = seerattn(args);
    assert_eq!(out.status.code(), Some(2), "seerattn {} should fail", args.join(" "));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seerattn-distill-cmd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The per-layer losses of each `step` line of the command's output.
fn step_losses(stdout: &str) -> Vec<Vec<f64>> {
    stdout
        .lines()
        .filter(|l| l.starts_with("step "))
        .map(|l| {
            let after = l.split("  loss ").nth(1).expect("a loss field");
            let fields: Vec<&str> = after.split_whitespace().collect();
            assert!(fields.last() == Some(&"tok/s"), "{l}");
            fields[..fields.len() - 2].iter().map(|x| x.parse().expect("a loss")).collect()
        })
        .collect()
}

/// The planted blocks per layer and head, as `--make-planted` prints them.
fn planted_blocks(stdout: &str) -> Vec<Vec<usize>> {
    stdout
        .lines()
        .filter_map(|l| l.split_once("and to blocks [").map(|(_, r)| r))
        .map(|r| r.split(']').next().unwrap().split(", ").map(|x| x.parse().unwrap()).collect())
        .collect()
}

/// Layer `layer`'s pre-RoPE q and k of a data file, as bf16 bytes.
fn layer_inputs(file: &Path, layer: usize) -> (Vec<u8>, Vec<u8>, [usize; 3], [usize; 3]) {
    let tensors = checkpoint::read_safetensors(file).unwrap();
    let get = |name: String| tensors.iter().find(|t| t.name == name).unwrap();
    let (q, k) = (get(format!("layers.{layer}.q_nope")), get(format!("layers.{layer}.k_nope")));
    let shape = |t: &checkpoint::RawTensor| [t.shape[0], t.shape[1], t.shape[2]];
    (q.data.clone(), k.data.clone(), shape(q), shape(k))
}

/// Recall of the planted (row, block) pairs in the top-2 mask of each layer
/// (block 0 and the head's planted block, where causal), over the data file.
fn planted_recall(gate: &Gate, file: &Path, planted: &[Vec<usize>]) -> f64 {
    let (mut found, mut total) = (0, 0);
    for (layer, blocks) in planted.iter().enumerate() {
        let (q, k, qs, ks) = layer_inputs(file, layer);
        let view = |b, s: [usize; 3]| Tensor3::new("x", b, DType::BF16, Layout3::contiguous(s[0], s[1], s[2])).unwrap();
        let batch = Batch::single(qs[0]).unwrap();
        let nb = qs[0].div_ceil(64);
        let params = MaskParams {
            method: SparsityMethod::NzRatio,
            nz_ratio: 1.0 - (1.0 - 2.0 / nb as f32).powi(2) + 1e-4, // two blocks a row
            last_block_dense: false,
            ..MaskParams::from_config(gate.config())
        };
        let mask = gate.compute_block_mask(layer, &view(&q, qs), &view(&k, ks), &batch, &params).unwrap();
        let layout = MaskLayout::new(&batch, qs[1], 64).unwrap();
        for r in 0..layout.rows() {
            let id = layout.row_id(r);
            for b in [0, blocks[id.head]] {
                if b <= id.q_block && id.q_block > 0 {
                    total += 1;
                    found += mask.as_ref().row(r).contains(&(b as i32)) as usize;
                }
            }
        }
    }
    found as f64 / total as f64
}

#[test]
fn planted_set_trains_end_to_end_and_the_gate_loads() {
    let root = temp_dir("e2e");
    let (data, out, state) = (root.join("data"), root.join("gate"), root.join("optimizer.safetensors"));
    let made = ok(&["distill", "--make-planted", s(&data), "--tokens", "384", "--seqs", "2", "--seed", "3"]);
    let planted = planted_blocks(&made);
    assert_eq!(planted.len(), 2, "{made}");
    let model_config = data.join("model_config.json");
    let stdout = ok(&[
        "distill",
        "--data",
        s(&data),
        "--model-config",
        s(&model_config),
        "--out",
        s(&out),
        "--state",
        s(&state),
        "--steps",
        "20",
        "--lr",
        "2e-2",
        "--warmup",
        "2",
    ]);
    println!("{stdout}");
    let losses = step_losses(&stdout);
    assert_eq!(losses.len(), 20, "one line per step");
    for (layer, (&first, &last)) in losses[0].iter().zip(&losses[19]).enumerate() {
        assert!(first > 0.0 && last < 0.3 * first, "layer {layer}: loss {first} -> {last}");
    }

    // The saved gate loads, with the model's config and fields.
    let gate = Gate::load_dir(&out).unwrap();
    let config = checkpoint::read_config(&model_config).unwrap();
    assert_eq!(gate.config(), &config);
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(text.contains("\"model_type\": \"planted\""), "{text}");
    // It finds the planted blocks, which the random gate it started from does not.
    let file = data.join("seq0000.safetensors");
    let trained = planted_recall(&gate, &file, &planted);
    let initial = planted_recall(&init_gate(config.clone(), 0).unwrap(), &file, &planted);
    println!("planted recall at two blocks a row: random gate {initial:.3}, trained {trained:.3}");
    assert!(trained >= 0.9 && initial < 0.8, "recall: random {initial}, trained {trained}");
    // The optimizer state is at the last step and loads into a trainer of this gate.
    let mut trainer = GateTrainer::new(gate, TrainConfig::upstream(20)).unwrap();
    trainer.load_optimizer_state(&state).unwrap();
    assert_eq!(trainer.steps_taken(), 20);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn stopped_and_resumed_run_matches_the_uninterrupted_run() {
    let root = temp_dir("resume");
    let data = root.join("data");
    ok(&["distill", "--make-planted", s(&data), "--tokens", "256", "--seqs", "3", "--layers", "1"]);
    let run = |out: &Path, state: &Path, extra: &[&str]| {
        let mut args =
            vec!["distill", "--data", s(&data), "--out", s(out), "--state", s(state), "--steps", "6", "--warmup", "2"];
        args.extend_from_slice(extra);
        ok(&args)
    };
    let (a, b) = (root.join("a"), root.join("b"));
    let heads = ["--heads", "4:2", "--rope-theta", "500000", "--batch", "2"];
    let full = run(&a, &root.join("a.safetensors"), &heads);
    let first = run(&b, &root.join("b.safetensors"), &[&heads[..], &["--stop-at", "3"]].concat());
    assert_eq!(step_losses(&first).len(), 3);
    let resumed = run(&b, &root.join("b.safetensors"), &["--resume", "--batch", "2"]);
    let resumed_steps: Vec<&str> = resumed.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(resumed_steps.len(), 3);
    assert!(resumed_steps[0].starts_with("step     4/6"), "{resumed}");
    assert_eq!(step_losses(&full)[3..], step_losses(&resumed)[..]);
    let weights = |d: &Path| std::fs::read(d.join("attn_gate_weights.safetensors")).unwrap();
    assert_eq!(weights(&a), weights(&b), "the resumed run's weights differ from the uninterrupted run's");
    // Nothing left to do is an error, not a silent success.
    let msg = fails(&[
        "distill",
        "--data",
        s(&data),
        "--out",
        s(&b),
        "--state",
        s(&root.join("b.safetensors")),
        "--steps",
        "6",
        "--resume",
    ]);
    assert!(msg.contains("nothing to do"), "{msg}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_flags_and_data_exit_2_with_a_message() {
    let root = temp_dir("bad");
    let data = root.join("data");
    ok(&["distill", "--make-planted", s(&data), "--tokens", "128", "--seqs", "1", "--layers", "1"]);
    let (out, planted) = (root.join("gate"), root.join("p"));
    let (d, o) = (s(&data), s(&out));
    let cases: [(&[&str], &str); 12] = [
        (&["distill", "--out", o, "--heads", "4:2"], "needs --data"),
        (&["distill", "--data", d, "--out", o], "needs the gate to start from"),
        (&["distill", "--data", d, "--out", o, "--heads", "4"], "expected Q_HEADS:KV_HEADS"),
        (&["distill", "--data", d, "--out", o, "--heads", "8:2"], "but the data has"),
        (&["distill", "--data", d, "--out", o, "--heads", "4:2", "--gate", o], "one of --gate"),
        (&["distill", "--data", d, "--out", o, "--resume"], "--resume continues"),
        (&["distill", "--data", d, "--out", o, "--heads", "4:2", "--steps", "0"], "at least 1"),
        (&["distill", "--data", d, "--out", o, "--heads", "4:2", "--lr", "fast"], "not a valid number"),
        (&["distill", "--data", d, "--out", o, "--heads", "4:2", "--frobnicate"], "unexpected argument"),
        (&["distill", "--data", s(&root), "--out", o, "--heads", "4:2"], "no .safetensors files"),
        (&["distill", "--data", d, "--out", o, "--heads", "4:2", "--device", "tpu"], "expected cpu or cuda"),
        (&["distill", "--make-planted", s(&planted), "--head-dim", "7"], "an even --head-dim >= 4"),
    ];
    for (args, words) in cases {
        let msg = fails(args);
        assert!(msg.contains(words), "seerattn {}: '{msg}' lacks '{words}'", args.join(" "));
    }
    // A data file missing a tensor names it.
    let tensors: Vec<_> = checkpoint::read_safetensors(&data.join("seq0000.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|t| t.name != "layers.0.k")
        .collect();
    checkpoint::write_safetensors(&data.join("seq0000.safetensors"), &tensors).unwrap();
    let msg = fails(&["distill", "--data", d, "--out", o, "--heads", "4:2"]);
    assert!(msg.contains("missing tensor 'layers.0.k'"), "{msg}");
    assert!(!out.exists(), "a refused run wrote a gate");
    std::fs::remove_dir_all(&root).unwrap();
}

/// `--make-planted --head-dim 64` writes the planted model at a head_dim
/// the GPU trainer takes (the CPU learns it too), and `--device cuda` is
/// refused with the reason where it cannot run: a head_dim-16 gate or one
/// with a Q projection (whatever the machine), no CUDA driver (here; on a
/// machine with a GPU the run trains instead).
#[test]
fn planted_set_at_head_dim_64_and_device_cuda_refusals() {
    let root = temp_dir("cuda");
    let (data, data16, out) = (root.join("data64"), root.join("data16"), root.join("gate"));
    ok(&["distill", "--make-planted", s(&data), "--tokens", "256", "--seqs", "2", "--layers", "1", "--head-dim", "64"]);
    let config = checkpoint::read_config(&data.join("model_config.json")).unwrap();
    assert_eq!((config.head_dim, config.gate_hidden, config.num_q_heads), (64, 64, 4));
    let tensors = checkpoint::read_safetensors(&data.join("seq0001.safetensors")).unwrap();
    assert!(tensors.iter().all(|t| t.shape[2] == 64 && t.shape[0] == 256), "shapes");
    let model = data.join("model_config.json");
    let train = |device: &'static str| {
        vec![
            "distill",
            "--data",
            s(&data),
            "--model-config",
            s(&model),
            "--out",
            s(&out),
            "--steps",
            "12",
            "--lr",
            "2e-2",
            "--warmup",
            "2",
            "--device",
            device,
        ]
    };
    let stdout = ok(&train("cpu"));
    let losses = step_losses(&stdout);
    assert_eq!(losses.len(), 12);
    assert!(losses[11][0] < 0.5 * losses[0][0], "head_dim 64 on the CPU: loss {:?}", losses);
    assert!(stdout.contains("; CPU reference"), "{stdout}");

    ok(&["distill", "--make-planted", s(&data16), "--tokens", "128", "--seqs", "1", "--layers", "1"]);
    let msg = fails(&["distill", "--data", s(&data16), "--heads", "4:2", "--out", s(&out), "--device", "cuda"]);
    assert!(msg.contains("unsupported") && msg.contains("not 16"), "{msg}");
    let q_proj = ["distill", "--data", s(&data), "--heads", "4:2", "--gate-hidden", "32", "--out", s(&out)];
    let msg = fails(&[&q_proj[..], &["--device", "cuda"]].concat());
    assert!(msg.contains("without a Q projection"), "{msg}");
    if seerattn::cuda::driver().is_ok() {
        // A GPU machine: the run trains on device 0.
        let stdout = ok(&train("cuda"));
        assert!(stdout.contains("; CUDA on "), "{stdout}");
        assert_eq!(step_losses(&stdout).len(), 12);
    } else {
        let msg = fails(&train("cuda"));
        let why = if seerattn::cuda::cuda_enabled() { "no CUDA device" } else { "no CUDA kernels" };
        assert!(msg.contains(why), "{msg}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
