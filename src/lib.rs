//! seerattn: SeerAttention's learned block-sparse attention for native
//! inference engines.
//!
//! The data flow of one attention layer, one module per stage:
//!
//! ```text
//!  pre-RoPE Q, K ──► pooling ──► gate scores ──► block mask ──► sparse attention ◄── post-RoPE Q, K, V
//!                 (reference::   (reference::    (reference::   (reference::
//!                  pooling)       scores)         select → mask) attention)
//! ```
//!
//! Training the gate is the stage after: [`distill`] (CPU reference in
//! `reference::distill`) distils each layer's gate from the model's own
//! attention map and saves a gate directory this library loads.
//!
//! [`Gate`] holds a layer-indexed gate (config + weights, loaded from a
//! released checkpoint by [`checkpoint`]); [`Gate::compute_block_mask`] runs
//! the first three stages and [`attention::sparse_prefill`] the last, on
//! strided host tensors ([`tensor`]) of variable-length batches ([`batch`]).
//! The C ABI over all of it lives in `ffi` (header: `include/seerattn.h`);
//! [`cuda`] owns the CUDA driver (kernel loading, contexts, launches).

pub mod attention;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod distill;
pub mod error;
pub mod gate;
pub mod gpu;
pub mod mask;
pub mod reference;
pub mod tensor;

/// The C ABI (`include/seerattn.h`); Rust callers use the modules above.
pub mod ffi;

pub use batch::Batch;
pub use config::{
    EmptyRowPolicy, GateConfig, GateType, MaskParams, Pool, RopeConfig, RopeScaling, SparsityMethod, ThresholdCompare,
};
pub use error::{Error, Result};
pub use gate::{Gate, LayerWeights, WeightRef};
pub use mask::{BlockMask, BlockMaskRef, MaskLayout};
pub use tensor::{DType, Layout3, Tensor3, Tensor3Mut};

/// The crate version, from Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
