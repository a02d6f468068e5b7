//! Test support, not for production use: synchronous copies, private
//! streams and whole-context synchronization, which the library itself never
//! does (it works on the caller's buffers and stream). The GPU tests
//! (`tests/cuda.rs`, run by `scripts/gpu-test.sh`) use these to set up
//! inputs and read results back.

use super::context::Ctx;
use super::memory::{sync_legacy_stream, DeviceBuffer};
use super::{check, driver};
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};

/// `len` bytes of device memory in `ctx`, zeroed.
pub fn alloc_zeroed(ctx: &Ctx, len: usize) -> Result<DeviceBuffer> {
    let buffer = DeviceBuffer::alloc(ctx, len)?;
    fill(ctx, buffer.ptr(), 0, len)?;
    Ok(buffer)
}

/// Set `len` bytes at device address `dst` to `byte`, complete on return
/// (0xff poisons: NaN in bf16, f16 and f32, -1 in the mask's integers).
pub fn fill(ctx: &Ctx, dst: CUdeviceptr, byte: u8, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    driver()?;
    let _current = ctx.make_current()?;
    // SAFETY: the caller names a device range of `len` bytes; the driver
    // refuses addresses it does not know.
    check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(dst, byte, len) })?;
    // The memset is ordered on the legacy stream, asynchronously.
    sync_legacy_stream()
}

/// Copy `src` to device address `dst`, complete on return. cuMemcpyHtoD
/// from pageable memory may return once the bytes are staged, before the DMA
/// lands, and work on a non-blocking stream does not wait for it: the legacy
/// stream is synchronized so that the next kernel on any stream sees the bytes.
pub fn copy_to_device(ctx: &Ctx, dst: CUdeviceptr, src: &[u8]) -> Result<()> {
    driver()?;
    let _current = ctx.make_current()?;
    // SAFETY: the caller names a device range of at least src.len() bytes;
    // the driver refuses addresses it does not know.
    check("cuMemcpyHtoD", unsafe { sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len()) })?;
    sync_legacy_stream()
}

/// Enqueue a copy of `src` to device address `dst` on `stream`, as an
/// engine writes a step's new inputs before replaying a graph. From
/// pageable memory the driver stages the bytes before it returns (so `src`
/// may be dropped then); the copy is ordered before later work on `stream`.
pub fn copy_to_device_async(stream: &Stream, dst: CUdeviceptr, src: &[u8]) -> Result<()> {
    driver()?;
    let _current = stream.ctx.make_current()?;
    // SAFETY: `src` is a live slice; the caller names a device range of at
    // least src.len() bytes, which the driver checks it knows.
    check("cuMemcpyHtoDAsync", unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), stream.raw) })
}

/// Copy `dst.len()` bytes from device address `src` (synchronous with
/// respect to the legacy default stream; synchronize other streams first).
pub fn copy_to_host(ctx: &Ctx, dst: &mut [u8], src: CUdeviceptr) -> Result<()> {
    driver()?;
    let _current = ctx.make_current()?;
    // SAFETY: `dst` is a live, writable slice; the driver checks `src`.
    check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()) })
}

/// A non-blocking stream of one context, destroyed on drop.
pub struct Stream {
    ctx: Ctx,
    raw: CUstream,
}

// SAFETY: a stream handle may be used from any thread (driver handles are
// thread-agnostic); the tests launch on one stream per thread.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl Stream {
    /// A new stream that does not synchronize with the legacy default stream.
    pub fn new(ctx: &Ctx) -> Result<Stream> {
        driver()?;
        let _current = ctx.make_current()?;
        let mut raw: CUstream = std::ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: valid out-pointer.
        check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut raw, flags) })?;
        if raw.is_null() {
            return Err(Error::Cuda("cuStreamCreate returned a NULL stream".into()));
        }
        Ok(Stream { ctx: *ctx, raw })
    }
    /// The raw handle, as an engine would pass it.
    pub fn raw(&self) -> CUstream {
        self.raw
    }
    /// Wait for the work queued on this stream.
    pub fn synchronize(&self) -> Result<()> {
        let _current = self.ctx.make_current()?;
        // SAFETY: a live stream of this context.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(self.raw) })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(_current) = self.ctx.make_current() {
            // SAFETY: destroys the stream this value created, once.
            let _ = unsafe { sys::cuStreamDestroy_v2(self.raw) };
        }
    }
}

/// An instantiated CUDA graph, destroyed on drop.
pub struct Graph {
    ctx: Ctx,
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

/// Which calls fail a capture: those the driver deems unsafe during one (an
/// allocation, a synchronous copy, a synchronization) made...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// ...on the capturing thread; other threads (other tests running in
    /// parallel) stay unaffected.
    ThreadLocal,
    /// ...on any thread of the process (CUDA's default mode): a capture that
    /// succeeds proves that nothing anywhere allocated, copied synchronously
    /// or synchronized while the work was enqueued. Nothing else in the
    /// process may use CUDA meanwhile, or its calls fail.
    Global,
}

/// Capture the work `enqueue` puts on `stream` into a graph, in thread-local
/// capture mode (see [`capture_with`]).
///
/// # Safety
/// `enqueue` must only enqueue work on `stream`.
pub unsafe fn capture(stream: &Stream, enqueue: impl FnOnce() -> Result<()>) -> Result<Graph> {
    capture_with(stream, CaptureMode::ThreadLocal, enqueue)
}

/// Capture the work `enqueue` puts on `stream` into a graph in `mode`: a call
/// illegal during capture that `mode` covers fails the capture (an error
/// here, from `enqueue` or from ending the capture).
///
/// # Safety
/// `enqueue` must only enqueue work on `stream`.
pub unsafe fn capture_with(stream: &Stream, mode: CaptureMode, enqueue: impl FnOnce() -> Result<()>) -> Result<Graph> {
    let _current = stream.ctx.make_current()?;
    let mode = match mode {
        CaptureMode::ThreadLocal => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        CaptureMode::Global => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
    };
    check("cuStreamBeginCapture", sys::cuStreamBeginCapture_v2(stream.raw, mode))?;
    let enqueued = enqueue();
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    let ended = check("cuStreamEndCapture", sys::cuStreamEndCapture(stream.raw, &mut graph));
    enqueued?;
    ended?;
    let mut exec: sys::CUgraphExec = std::ptr::null_mut();
    if let Err(e) = check("cuGraphInstantiate", sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0)) {
        sys::cuGraphDestroy(graph);
        return Err(e);
    }
    Ok(Graph { ctx: stream.ctx, graph, exec })
}

impl Graph {
    /// Replay the graph on `stream`.
    pub fn launch(&self, stream: &Stream) -> Result<()> {
        let _current = self.ctx.make_current()?;
        // SAFETY: a live executable graph of this context.
        check("cuGraphLaunch", unsafe { sys::cuGraphLaunch(self.exec, stream.raw) })
    }

    /// The kind of every node the capture recorded, in the driver's order:
    /// `"kernel"`, `"memcpy"`, `"memset"`, `"host"`, `"mem_alloc"`,
    /// `"mem_free"`, ... (`"type N"` for a kind not named here). Work that
    /// copies, sets or allocates memory on the stream shows as such nodes.
    pub fn node_kinds(&self) -> Result<Vec<String>> {
        const NAMES: [&str; 14] = [
            "kernel",
            "memcpy",
            "memset",
            "host",
            "child graph",
            "empty",
            "event wait",
            "event record",
            "semaphore signal",
            "semaphore wait",
            "mem_alloc",
            "mem_free",
            "batch mem op",
            "conditional",
        ];
        let _current = self.ctx.make_current()?;
        let mut count = 0usize;
        // SAFETY: a live graph; a NULL node array asks for the count only.
        check("cuGraphGetNodes", unsafe { sys::cuGraphGetNodes(self.graph, std::ptr::null_mut(), &mut count) })?;
        let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
        // SAFETY: room for `count` nodes.
        check("cuGraphGetNodes", unsafe { sys::cuGraphGetNodes(self.graph, nodes.as_mut_ptr(), &mut count) })?;
        nodes.truncate(count);
        nodes
            .iter()
            .map(|&node| {
                // Read as a plain u32: a kind newer than the bindings' enum
                // must not become an invalid enum value.
                let mut kind = 0u32;
                // SAFETY: a node of this graph; the driver writes one 32-bit enum.
                check("cuGraphNodeGetType", unsafe { sys::cuGraphNodeGetType(node, (&mut kind as *mut u32).cast()) })?;
                Ok(NAMES.get(kind as usize).map_or_else(|| format!("type {kind}"), |n| n.to_string()))
            })
            .collect()
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if let Ok(_current) = self.ctx.make_current() {
            // SAFETY: destroys what `capture` created, once.
            unsafe {
                let _ = sys::cuGraphExecDestroy(self.exec);
                let _ = sys::cuGraphDestroy(self.graph);
            }
        }
    }
}

/// Time `reps` runs of `enqueue` on `stream` with device events, after
/// `warmup` untimed runs; returns each run's milliseconds.
pub fn time_ms(
    stream: &Stream,
    warmup: usize,
    reps: usize,
    mut enqueue: impl FnMut() -> Result<()>,
) -> Result<Vec<f32>> {
    let _current = stream.ctx.make_current()?;
    for _ in 0..warmup {
        enqueue()?;
    }
    stream.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    // SAFETY: events are created, recorded on a live stream, waited on and destroyed here.
    unsafe {
        let (mut start, mut stop): (sys::CUevent, sys::CUevent) = (std::ptr::null_mut(), std::ptr::null_mut());
        check("cuEventCreate", sys::cuEventCreate(&mut start, 0))?;
        check("cuEventCreate", sys::cuEventCreate(&mut stop, 0))?;
        let result = (|| {
            for _ in 0..reps {
                check("cuEventRecord", sys::cuEventRecord(start, stream.raw))?;
                enqueue()?;
                check("cuEventRecord", sys::cuEventRecord(stop, stream.raw))?;
                check("cuEventSynchronize", sys::cuEventSynchronize(stop))?;
                let mut ms = 0f32;
                check("cuEventElapsedTime", sys::cuEventElapsedTime_v2(&mut ms, start, stop))?;
                times.push(ms);
            }
            Ok(())
        })();
        sys::cuEventDestroy_v2(start);
        sys::cuEventDestroy_v2(stop);
        result?;
    }
    Ok(times)
}

/// Enqueue a device-to-device copy of `len` bytes on `stream`.
pub fn copy_async(stream: &Stream, dst: CUdeviceptr, src: CUdeviceptr, len: usize) -> Result<()> {
    let _current = stream.ctx.make_current()?;
    // SAFETY: the caller names two device ranges of `len` bytes.
    check("cuMemcpyDtoDAsync", unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, len, stream.raw) })
}
