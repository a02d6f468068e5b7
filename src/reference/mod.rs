//! The CPU reference of the whole prefill path: plain loops, f32
//! accumulation, no cleverness. Every other implementation (the CUDA kernels)
//! is tested against these functions, so they favour being obviously right
//! over being fast.
//!
//! Stages, in data-flow order:
//! - [`pooling`]: per 64-token block, Q avg-pooled, K pooled `[max|min|avg]`;
//! - [`scores`]: projection, RoPE at block starts, causal block scores and softmax;
//! - [`select`]: threshold / top-k rules turning scores into a [`crate::BlockMask`];
//! - [`attention`]: block-sparse causal attention over the selected blocks;
//! - [`distill`]: training the gate: the max-pooled attention target, the
//!   KL loss of the gate's logits and its gradient in the gate weights.

pub mod attention;
pub mod distill;
pub mod pooling;
pub mod scores;
pub mod select;
