//! Block-sparse causal attention (prefill): the public entry (in progress).
