//! The C ABI. Every `extern "C"` function of the library lives in this module
//! tree and nowhere else; each one is a thin translation over the Rust API:
//!
//! - its body runs inside [`ffi_call!`], which catches panics (a panic never
//!   unwinds into C: it becomes `SEER_PANIC`), maps every [`crate::Error`] to
//!   a [`SeerStatus`], and records the message for `seer_last_error_message`;
//! - pointers are taken through the checking helpers of [`args`] (NULL,
//!   alignment, struct sizes, tensor spans, aliasing between outputs and
//!   inputs) before any slice is formed;
//! - out-parameters are written only on success.
//!
//! Submodules follow the C-visible concepts: [`status`] (codes, messages,
//! versions), [`gate`] (the gate handle), [`mask`] (mask sizes and dense
//! conversion), [`attention`] (sparse prefill), [`cuda`] (device queries),
//! [`distill`] (the trainer handle: gate self-distillation).

//! # Safety
//! Every entry point is `unsafe` for one reason, stated once here: the
//! library cannot verify that a non-NULL pointer refers to memory of the
//! documented size that stays valid for the call. Everything it can verify
//! (NULL, alignment, sizes against lengths, overlap, handle liveness, enum
//! values) it does, and reports as a status.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

#[macro_use]
pub mod status;
pub mod args;
pub mod attention;
pub mod cuda;
pub mod distill;
pub mod gate;
pub mod mask;
