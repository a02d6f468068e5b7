// seerattn: definitions shared by the CUDA kernels in kernels/*.cu
// (included with -Ikernels by build.rs).
#pragma once
