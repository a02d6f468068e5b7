//! Reading released gate checkpoints (placeholder while in progress).
use crate::{error::Result, Gate};
use std::path::Path;
pub fn load_gate_dir(dir: &Path) -> Result<Gate> {
    Err(crate::Error::unsupported(format!("{}: loading not yet built", dir.display())))
}
