//! The checked-in C header must be exactly what cbindgen generates from the
//! current source, with the crate version from Cargo.toml. Run with
//! `SEERATTN_BLESS=1` to rewrite it after changing the C API.

use std::path::PathBuf;

fn generate() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&root)
        .with_config(config)
        .generate()
        .expect("cbindgen failed to parse the crate")
        .write(&mut out);
    String::from_utf8(out).unwrap().replace("@VERSION@", env!("CARGO_PKG_VERSION"))
}

#[test]
fn header_is_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include/seerattn.h");
    let fresh = generate();
    if std::env::var_os("SEERATTN_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == fresh,
        "include/seerattn.h is stale: regenerate it with `SEERATTN_BLESS=1 cargo test --test header`"
    );
}

#[test]
fn header_declares_the_whole_v1_api() {
    let h = generate();
    for name in [
        "seer_version",
        "seer_abi_version",
        "seer_last_error_message",
        "seer_status_name",
        "seer_gate_config_default",
        "seer_gate_create",
        "seer_gate_load",
        "seer_gate_set_layer_weights",
        "seer_gate_get_config",
        "seer_gate_has_layer",
        "seer_gate_destroy",
        "seer_mask_params_default",
        "seer_gate_compute_mask",
        "seer_mask_sizes",
        "seer_prefill_workspace_size",
        "seer_gate_workspace_size",
        "seer_gate_upload",
        "seer_kblock_cache_size",
        "seer_kblock_cache_update",
        "maybe_kblock_caches",
        "num_kblock_caches",
        "seer_mask_from_dense",
        "seer_mask_to_dense",
        "seer_prefill_params_default",
        "seer_sparse_prefill",
        "seer_gate_attention",
        "seer_cuda_device_info",
        "seer_train_params_default",
        "seer_trainer_create",
        "seer_trainer_create_random",
        "seer_trainer_destroy",
        "seer_train_feed_params_default",
        "seer_trainer_accumulate",
        "seer_trainer_step",
        "seer_trainer_layer_losses",
        "seer_trainer_get_step",
        "seer_trainer_save_gate_dir",
        "seer_trainer_save_optimizer_state",
        "seer_trainer_load_optimizer_state",
        "typedef struct SeerGate SeerGate",
        "typedef struct SeerTrainer SeerTrainer",
        "SEER_ABI_VERSION 1",
    ] {
        assert!(h.contains(name), "header lacks {name}");
    }
}
