//! The GPU implementations, one module per `kernels/*.cu` file: host-side
//! planning (grids, scratch layout, parameter structs), validation of device
//! buffers, and launches through [`crate::cuda`]. Each is tested on a GPU
//! against the CPU reference ([`crate::reference`]).

pub mod gate;
