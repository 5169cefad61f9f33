//! The GPU backend: the [`Backend`] operations as WGSL compute shaders run through wgpu
//! (Vulkan).
//!
//! # Execution model
//!
//! A [`WgpuDevice`] owns the wgpu device and queue, the compiled pipelines (one shader
//! module, created once per device) and a cache of bind groups. A [`WgpuBackend`] is one
//! training thread's recorder on a device: each operation appends a dispatch (or an
//! upload) to a pending list, and [`Backend::flush`] encodes the list into one command
//! buffer and submits it without waiting (once a few steps have been recorded). Several backends on one device (the simulator's
//! client threads) share its queue: wgpu's `Queue` is internally synchronised, and each
//! backend submits its own command buffers, so their work interleaves safely.
//!
//! Nothing is allocated per training step:
//! - per-dispatch parameters go into slots of one uniform buffer (dynamic offsets);
//! - host data (batches, labels) is staged in one upload arena buffer and copied into
//!   place by commands recorded in order with the dispatches, so an upload never forces
//!   a submission;
//! - every kernel binds whole buffers and addresses ranges by element offsets, so a bind
//!   group depends only on which buffers a dispatch uses; bind groups are created the
//!   first time a combination is used (the first training step) and reused after that,
//!   and dropped with their buffers;
//! - the scratch buffers (split-K partials, a batch's im2col matrix, a gradient in
//!   channel-major order) and the read-back buffer grow on first use and are kept.
//!
//! Only [`Backend::download`] waits for the device.
//!
//! # Kernels
//!
//! Every product runs through one tiled GEMM (see kernels.wgsl): 4 x 4 register blocks
//! per invocation, operands staged through workgroup memory one K step ahead, operand
//! layouts as pipeline constants, and K split over more workgroups when the tiles alone
//! would leave a large GPU idle ([`gemm_plan`]). A convolution writes the whole batch's
//! im2col matrix to a scratch buffer and runs one plain product over it (backward: the
//! output gradient transposed to channel-major, a product, and `col2im`); measured on an
//! H200 this beat decoding im2col indices inside the product's loads several times over
//! (BENCHMARKS.md). `FEDQUIC_WGPU_PROFILE=FILE` times every dispatch (profile.rs).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{AdamStep, Backend, ConvGeometry, Gemm, PoolGeometry, SgdStep};
use crate::error::{Result, TrainError};

mod profile;
use profile::Profiler;

const SHADER: &str = include_str!("kernels.wgsl");

/// Invocations per workgroup of the 1-D kernels.
const GROUP: usize = 256;
/// Workgroups per grid dimension (WebGPU's guaranteed minimum).
const MAX_GROUPS: usize = 65_535;
/// Storage buffers per dispatch.
const SLOTS: usize = 5;
/// Uniform slots per submission; a longer run of dispatches is split into submissions.
const UNIFORM_SLOTS: usize = 2048;
/// Upload arena size in floats (4 MiB: a batch of 256 MNIST images is 0.8 MiB); larger uploads go straight through the queue.
const ARENA_FLOATS: usize = 1 << 20;
/// Pending commands from which [`Backend::flush`] submits (a few training steps).
const FLUSH_COMMANDS: usize = 96;
/// Submissions allowed in flight before the host waits for the oldest one, so the host
/// cannot run arbitrarily far ahead of the device.
const MAX_IN_FLIGHT: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kernel {
    Relu,
    ReluBackward,
    Mul,
    Copy,
    DropoutMask,
    FillRows,
    FillChannels,
    SumRows,
    SumChannels,
    /// The tiled product with 64 x 64 tiles (`big`) or 32 x 32.
    Gemm {
        big: bool,
        modes: GemmModes,
    },
    /// The split-K sum, writing C as `conv_output` says (MODE_C 1) or row-major.
    GemmReduce {
        conv_output: bool,
    },
    Im2col,
    Col2im,
    ToChannelMajor,
    MaxPool,
    MaxPoolBackward,
    SoftmaxCrossEntropy,
    SgdStep,
    AdamStep,
}

impl Kernel {
    /// Every pipeline a device creates: the GEMM in each tile size and operand layout it
    /// is used with (the convolution output layout only with plain A and B).
    fn all() -> Vec<Kernel> {
        let mut all = vec![
            Kernel::Relu,
            Kernel::ReluBackward,
            Kernel::Mul,
            Kernel::Copy,
            Kernel::DropoutMask,
            Kernel::FillRows,
            Kernel::FillChannels,
            Kernel::SumRows,
            Kernel::SumChannels,
            Kernel::GemmReduce { conv_output: false },
            Kernel::GemmReduce { conv_output: true },
            Kernel::Im2col,
            Kernel::Col2im,
            Kernel::ToChannelMajor,
            Kernel::MaxPool,
            Kernel::MaxPoolBackward,
            Kernel::SoftmaxCrossEntropy,
            Kernel::SgdStep,
            Kernel::AdamStep,
        ];
        for big in [true, false] {
            for (a, b) in [(false, false), (false, true), (true, false), (true, true)] {
                let plain = GemmModes {
                    trans_a: a,
                    trans_b: b,
                    conv_output: false,
                };
                all.push(Kernel::Gemm { big, modes: plain });
            }
            let conv = GemmModes {
                trans_a: false,
                trans_b: false,
                conv_output: true,
            };
            all.push(Kernel::Gemm { big, modes: conv });
        }
        all
    }

    /// Values of the shader's pipeline constants for this kernel.
    fn constants(self) -> Vec<(&'static str, f64)> {
        let flag = |on: bool| if on { 1.0 } else { 0.0 };
        match self {
            Kernel::Gemm { modes, .. } => vec![
                ("MODE_A", flag(modes.trans_a)),
                ("MODE_B", flag(modes.trans_b)),
                ("MODE_C", flag(modes.conv_output)),
            ],
            Kernel::GemmReduce { conv_output } => vec![("MODE_C", flag(conv_output))],
            _ => Vec::new(),
        }
    }

    fn entry_point(self) -> &'static str {
        match self {
            Kernel::Relu => "relu",
            Kernel::ReluBackward => "relu_backward",
            Kernel::Mul => "mul",
            Kernel::Copy => "copy",
            Kernel::DropoutMask => "dropout_mask",
            Kernel::FillRows => "fill_rows",
            Kernel::FillChannels => "fill_channels",
            Kernel::SumRows => "sum_rows",
            Kernel::SumChannels => "sum_channels",
            Kernel::Gemm { .. } => "gemm",
            Kernel::GemmReduce { .. } => "gemm_reduce",
            Kernel::Im2col => "im2col",
            Kernel::Col2im => "col2im",
            Kernel::ToChannelMajor => "to_channel_major",
            Kernel::MaxPool => "max_pool",
            Kernel::MaxPoolBackward => "max_pool_backward",
            Kernel::SoftmaxCrossEntropy => "softmax_cross_entropy",
            Kernel::SgdStep => "sgd_step",
            Kernel::AdamStep => "adam_step",
        }
    }
}

/// The shader source for a GEMM tile of `tile x tile` (64 or 32): `tile / 4` squared
/// invocations, each computing a 4 x 4 block and loading 4 values of each operand per
/// K step.
fn shader_source(tile: u32) -> String {
    let side = tile / 4;
    let threads = side * side;
    let consts = format!(
        "const TILE_M: u32 = {tile}u;\nconst TILE_N: u32 = {tile}u;\n\
         const TILE_K: u32 = {}u;\nconst SIDE: u32 = {side}u;\nconst THREADS: u32 = {threads}u;\n",
        4 * threads / tile
    );
    format!("{consts}{SHADER}")
}

/// Which adapter a device runs on, for logs and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    /// `Vulkan`, ...
    pub api: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `Cpu` (a software rasteriser such as lavapipe), ...
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    /// Whether it is a real (discrete or integrated) GPU.
    pub is_gpu: bool,
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {}, driver {} {})",
            self.name, self.api, self.device_type, self.driver, self.driver_info
        )
    }
}

/// A wgpu device with the training pipelines, shared by every [`WgpuBackend`] on it.
pub struct WgpuDevice {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: AdapterSummary,
    layout: wgpu::BindGroupLayout,
    pipelines: HashMap<Kernel, wgpu::ComputePipeline>,
    uniform_stride: u64,
    max_binding: u64,
    /// Bind groups by the ids of the buffers they bind (0 is the dummy buffer).
    bind_groups: Mutex<HashMap<[u64; SLOTS + 1], wgpu::BindGroup>>,
    next_id: AtomicU64,
    /// The first uncaptured wgpu error (validation, out of memory), reported by the next
    /// flush or download instead of the default handler's panic.
    error: Arc<Mutex<Option<String>>>,
    dummy: wgpu::Buffer,
    /// Per-dispatch timing, when `FEDQUIC_WGPU_PROFILE` asks for it (see profile.rs).
    profiler: Option<Mutex<Profiler>>,
}

impl fmt::Debug for WgpuDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgpuDevice")
            .field("adapter", &self.adapter)
            .finish()
    }
}

fn gpu_error(what: impl fmt::Display) -> TrainError {
    TrainError::Gpu(what.to_string())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl WgpuDevice {
    /// Opens the first adapter wgpu offers through Vulkan (a GPU ahead of a software
    /// device when `prefer_gpu`), or an error saying why none could be opened.
    pub fn open(prefer_gpu: bool) -> Result<Arc<WgpuDevice>> {
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        descriptor.backends = wgpu::Backends::VULKAN;
        let instance = wgpu::Instance::new(descriptor);
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
        let rank = |adapter: &wgpu::Adapter| match adapter.get_info().device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 3,
            wgpu::DeviceType::Cpu => 4,
        };
        let adapter = if prefer_gpu {
            adapters.into_iter().min_by_key(rank)
        } else {
            adapters.into_iter().next()
        };
        let adapter = adapter.ok_or_else(|| {
            gpu_error(
                "no Vulkan adapter found (install a GPU driver, or mesa-vulkan-drivers for \
                 the software one, and libvulkan1)",
            )
        })?;
        WgpuDevice::with_adapter(adapter)
    }

    fn with_adapter(adapter: wgpu::Adapter) -> Result<Arc<WgpuDevice>> {
        let info = adapter.get_info();
        let summary = AdapterSummary {
            name: info.name.clone(),
            api: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            is_gpu: matches!(
                info.device_type,
                wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
            ),
        };
        let limits = adapter.limits();
        let profile_path = Profiler::requested(adapter.features());
        let required_features = if profile_path.is_some() {
            wgpu::Features::TIMESTAMP_QUERY
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("fedquic-train"),
            required_features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|error| gpu_error(format!("cannot open {}: {error}", summary.name)))?;
        let error = Arc::new(Mutex::new(None::<String>));
        let sink = Arc::clone(&error);
        device.on_uncaptured_error(Arc::new(move |failure: wgpu::Error| {
            tracing::error!(%failure, "wgpu error");
            lock(&sink).get_or_insert_with(|| failure.to_string());
        }));

        let storage = |binding: u32| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only: false },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: wgpu::BufferSize::new(64),
            },
            count: None,
        }];
        entries.extend((1..=SLOTS as u32).map(storage));
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("kernels"),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("kernels"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = |tile: u32| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("kernels"),
                source: wgpu::ShaderSource::Wgsl(shader_source(tile).into()),
            })
        };
        let (module64, module32) = (module(64), module(32));
        let pipelines = Kernel::all()
            .into_iter()
            .map(|kernel| {
                let module = if matches!(kernel, Kernel::Gemm { big: false, .. }) {
                    &module32
                } else {
                    &module64
                };
                let constants = kernel.constants();
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.entry_point()),
                    layout: Some(&pipeline_layout),
                    module,
                    entry_point: Some(kernel.entry_point()),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        // Every kernel writes its workgroup memory before reading it.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
                (kernel, pipeline)
            })
            .collect();
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dummy"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let profiler = profile_path.map(|path| Mutex::new(Profiler::new(&device, &queue, path)));
        let shared = WgpuDevice {
            profiler,
            uniform_stride: u64::from(limits.min_uniform_buffer_offset_alignment).max(64),
            max_binding: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
            device,
            queue,
            adapter: summary,
            layout,
            pipelines,
            bind_groups: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            error,
            dummy,
        };
        shared.check_error()?;
        Ok(Arc::new(shared))
    }

    /// The adapter this device runs on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    fn check_error(&self) -> Result<()> {
        match lock(&self.error).clone() {
            Some(message) => Err(gpu_error(message)),
            None => Ok(()),
        }
    }

    fn forget_buffer(&self, id: u64) {
        lock(&self.bind_groups).retain(|ids, _| !ids.contains(&id));
    }
}

/// A device buffer of `f32`s.
pub struct GpuBuffer {
    id: u64,
    len: usize,
    buffer: wgpu::Buffer,
    device: Arc<WgpuDevice>,
}

impl fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuBuffer({} floats)", self.len)
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        self.device.forget_buffer(self.id);
    }
}

/// A range of a [`GpuBuffer`], for reading.
#[derive(Clone, Copy, Debug)]
pub struct GpuSlice<'a> {
    buffer: &'a GpuBuffer,
    offset: usize,
    len: usize,
}

/// A range of a [`GpuBuffer`], for writing.
#[derive(Debug)]
pub struct GpuSliceMut<'a>(GpuSlice<'a>);

/// A buffer bound by a dispatch: its id (0 for the dummy) and handle.
#[derive(Clone)]
struct Binding {
    id: u64,
    buffer: wgpu::Buffer,
}

enum Command {
    Dispatch {
        kernel: Kernel,
        bindings: [Option<Binding>; SLOTS],
        uniform_slot: u32,
        groups: (u32, u32, u32),
    },
    Upload {
        arena_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        bytes: u64,
    },
}

/// One recorder's pending work and its reusable buffers.
struct Recorder {
    commands: Vec<Command>,
    uniforms: Vec<u8>,
    uniform_buffer: wgpu::Buffer,
    arena: Vec<f32>,
    arena_buffer: wgpu::Buffer,
    in_flight: VecDeque<wgpu::SubmissionIndex>,
    readback: Option<wgpu::Buffer>,
    /// Scratch buffers by [`Scratch`] kind.
    scratch: [Option<Arc<GpuBuffer>>; 3],
}

/// One thread's handle on a [`WgpuDevice`]: records operations and submits them.
pub struct WgpuBackend {
    device: Arc<WgpuDevice>,
    recorder: Mutex<Recorder>,
    /// Part of every bind group key: bind groups bind this recorder's uniform buffer.
    recorder_id: u64,
    /// The most floats of a batched convolution's im2col matrix ([`COLUMN_LIMIT`]; tests
    /// lower it to exercise the per-chunk passes).
    column_limit: usize,
}

impl Drop for WgpuBackend {
    fn drop(&mut self) {
        self.device.forget_buffer(self.recorder_id);
    }
}

impl fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("adapter", &self.device.adapter)
            .finish()
    }
}

/// Parameters of one dispatch: 16 words, floats as bits.
#[derive(Clone, Copy, Default)]
struct Params([u32; 16]);

impl Params {
    fn new(words: &[u32]) -> Params {
        let mut params = Params::default();
        for (slot, &word) in params.0.iter_mut().zip(words) {
            *slot = word;
        }
        params
    }

    fn set(mut self, index: usize, word: u32) -> Params {
        self.0[index] = word;
        self
    }
}

/// `value` as a shader word, or an error if it does not fit in 32 bits.
fn word(value: usize) -> Result<u32> {
    u32::try_from(value)
        .map_err(|_| gpu_error(format!("size {value} exceeds the GPU's 32-bit indices")))
}

fn packed(low: usize, high: usize) -> Result<u32> {
    if low > 0xffff || high > 0xffff {
        return Err(gpu_error(format!(
            "convolution size {low}x{high} exceeds 65535"
        )));
    }
    Ok(low as u32 | (high as u32) << 16)
}

fn check(slice: &GpuSlice<'_>, len: usize) -> Result<()> {
    if slice.len == len {
        Ok(())
    } else {
        Err(gpu_error(format!(
            "range of {} values where {len} were expected (bug)",
            slice.len
        )))
    }
}

/// The (x, y) grid of workgroups covering `groups` workgroups.
fn grid(groups: usize) -> Result<(u32, u32, u32)> {
    let x = groups.clamp(1, MAX_GROUPS);
    let y = groups.div_ceil(x).max(1);
    if y > MAX_GROUPS {
        return Err(gpu_error(format!(
            "{groups} workgroups exceed the dispatch limit"
        )));
    }
    Ok((x as u32, y as u32, 1))
}

/// Invocations that share the sum of one column of `rows` rows in `sum_rows` and
/// `gemm_reduce`: a power of two up to 16, no more than there are rows.
fn reduce_lanes(rows: usize) -> usize {
    rows.clamp(1, 16).next_power_of_two().min(16)
}

/// The most floats of a batched convolution's im2col matrix (256 MiB); larger batches
/// run in several passes.
const COLUMN_LIMIT: usize = 1 << 26;

/// Values of one channel a workgroup of `sum_channels` sums.
const SUM_PART: usize = 4096;

/// Invocations a product should spread over to hide a large GPU's memory latency.
const GEMM_TARGET_THREADS: usize = 64 * 1024;
/// The least K a split-K part runs over.
const GEMM_MIN_SPLIT_K: usize = 64;
/// The most floats of split-K partial products.
const GEMM_MAX_PARTIALS: usize = 1 << 24;

/// How the GEMM kernel covers an `m x n x k` product: (64 x 64 tiles, else 32 x 32;
/// K splits; K per split, a multiple of both tiles' K step). 64 tiles reuse each load
/// more but need both sides to be large; K is split when the tiles alone give too few
/// invocations.
fn gemm_plan(m: usize, n: usize, k: usize) -> (bool, usize, usize) {
    let big = m >= 48 && n >= 48;
    let (tile, threads) = if big { (64, 256) } else { (32, 64) };
    let tiles = m.div_ceil(tile) * n.div_ceil(tile);
    let wanted = GEMM_TARGET_THREADS.div_ceil(tiles * threads);
    let splits = wanted
        .min(k / GEMM_MIN_SPLIT_K)
        .min(GEMM_MAX_PARTIALS / (m * n).max(1))
        .max(1);
    let k_per_split = k.div_ceil(splits).div_ceil(16).max(1) * 16;
    (big, k.div_ceil(k_per_split).max(1), k_per_split)
}

/// The parameters of `im2col` / `col2im` over `batch` examples (see kernels.wgsl).
fn conv_params(
    geometry: &ConvGeometry,
    len: usize,
    src: usize,
    dst: usize,
    batch: usize,
) -> Result<Params> {
    Ok(
        Params::new(&[word(len)?, word(src)?, word(dst)?, word(batch)?])
            .set(10, word(geometry.in_channels)?)
            .set(12, packed(geometry.in_height, geometry.in_width)?)
            .set(13, packed(geometry.kernel, geometry.stride)?)
            .set(14, word(geometry.padding)?)
            .set(15, packed(geometry.out_height, geometry.out_width)?),
    )
}

/// Operand layouts of the GEMM kernel (pipeline constants; see kernels.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GemmModes {
    /// A stored k x m.
    trans_a: bool,
    /// B stored n x k.
    trans_b: bool,
    /// C written as a convolution output [e, oc, q] from (oc, (e, q)).
    conv_output: bool,
}

/// Which of a recorder's scratch buffers (each grows on first use and is kept).
#[derive(Clone, Copy)]
enum Scratch {
    /// Split-K partial products.
    SplitK,
    /// A batch's im2col matrix (or its gradient).
    Columns,
    /// An output gradient in channel-major order.
    ChannelMajor,
}

impl WgpuBackend {
    /// A recorder on `device`.
    pub fn new(device: Arc<WgpuDevice>) -> WgpuBackend {
        let uniform_buffer = device.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("uniforms"),
            size: device.uniform_stride * UNIFORM_SLOTS as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let arena_buffer = device.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("upload arena"),
            size: (ARENA_FLOATS * 4) as u64,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        WgpuBackend {
            recorder: Mutex::new(Recorder {
                commands: Vec::with_capacity(UNIFORM_SLOTS),
                uniforms: Vec::with_capacity(UNIFORM_SLOTS * device.uniform_stride as usize),
                uniform_buffer,
                arena: Vec::with_capacity(ARENA_FLOATS),
                arena_buffer,
                in_flight: VecDeque::new(),
                readback: None,
                scratch: Default::default(),
            }),
            recorder_id: device.next_id.fetch_add(1, Ordering::Relaxed),
            column_limit: COLUMN_LIMIT,
            device,
        }
    }

    /// This backend with batched convolutions split into passes of at most `floats`
    /// im2col values.
    #[cfg(test)]
    fn with_column_limit(mut self, floats: usize) -> WgpuBackend {
        self.column_limit = floats;
        self
    }

    /// Opens a device ([`WgpuDevice::open`]) and a recorder on it.
    pub fn open(prefer_gpu: bool) -> Result<WgpuBackend> {
        Ok(WgpuBackend::new(WgpuDevice::open(prefer_gpu)?))
    }

    /// The shared device (to make more recorders on it).
    pub fn device(&self) -> &Arc<WgpuDevice> {
        &self.device
    }

    /// The adapter this backend runs on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.device.adapter
    }

    fn buffer(&self, len: usize, label: &str) -> GpuBuffer {
        // At least one float: zero-sized buffers cannot be bound.
        let size = (len.max(1) * 4) as u64;
        let buffer = self.device.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            // wgpu zero-initialises buffers.
            mapped_at_creation: false,
        });
        GpuBuffer {
            id: self.device.next_id.fetch_add(1, Ordering::Relaxed),
            len,
            buffer,
            device: Arc::clone(&self.device),
        }
    }

    /// Records one dispatch of `kernel` over `buffers` with `params`.
    fn dispatch(
        &self,
        kernel: Kernel,
        buffers: &[&GpuBuffer],
        params: Params,
        groups: (u32, u32, u32),
    ) -> Result<()> {
        for buffer in buffers {
            if (buffer.len.max(1) * 4) as u64 > self.device.max_binding {
                return Err(gpu_error(format!(
                    "a buffer of {} floats exceeds the device's binding limit of {} bytes",
                    buffer.len, self.device.max_binding
                )));
            }
        }
        let mut recorder = lock(&self.recorder);
        if recorder.commands.len() >= UNIFORM_SLOTS
            || recorder.uniforms.len() / self.device.uniform_stride as usize >= UNIFORM_SLOTS
        {
            self.submit(&mut recorder)?;
        }
        let stride = self.device.uniform_stride as usize;
        let slot = recorder.uniforms.len() / stride;
        for value in params.0 {
            recorder.uniforms.extend_from_slice(&value.to_le_bytes());
        }
        let padded = (slot + 1) * stride;
        recorder.uniforms.resize(padded, 0);
        let mut bindings: [Option<Binding>; SLOTS] = Default::default();
        for (binding, buffer) in bindings.iter_mut().zip(buffers) {
            *binding = Some(Binding {
                id: buffer.id,
                buffer: buffer.buffer.clone(),
            });
        }
        recorder.commands.push(Command::Dispatch {
            kernel,
            bindings,
            uniform_slot: slot as u32,
            groups,
        });
        Ok(())
    }

    /// A 1-D dispatch over `len` invocations.
    fn dispatch_1d(
        &self,
        kernel: Kernel,
        buffers: &[&GpuBuffer],
        params: Params,
        len: usize,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.dispatch(kernel, buffers, params, grid(len.div_ceil(GROUP))?)
    }

    /// Encodes and submits the pending work; waits only when too much is in flight.
    fn submit(&self, recorder: &mut Recorder) -> Result<()> {
        self.device.check_error()?;
        if recorder.commands.is_empty() {
            return Ok(());
        }
        let device = &self.device;
        if !recorder.uniforms.is_empty() {
            device
                .queue
                .write_buffer(&recorder.uniform_buffer, 0, &recorder.uniforms);
        }
        if !recorder.arena.is_empty() {
            device
                .queue
                .write_buffer(&recorder.arena_buffer, 0, floats_as_bytes(&recorder.arena));
        }
        let mut encoder = device
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            });
        let mut profiler = device.profiler.as_ref().map(lock);
        let mut profiled = Vec::new();
        {
            let mut cache = lock(&device.bind_groups);
            let mut pass: Option<wgpu::ComputePass<'_>> = None;
            for command in &recorder.commands {
                match command {
                    Command::Upload {
                        arena_offset,
                        dst,
                        dst_offset,
                        bytes,
                    } => {
                        drop(pass.take());
                        encoder.copy_buffer_to_buffer(
                            &recorder.arena_buffer,
                            *arena_offset,
                            dst,
                            *dst_offset,
                            *bytes,
                        );
                    }
                    Command::Dispatch {
                        kernel,
                        bindings,
                        uniform_slot,
                        groups,
                    } => {
                        let mut key = [self.recorder_id; SLOTS + 1];
                        for (id, binding) in key.iter_mut().zip(bindings) {
                            *id = binding.as_ref().map_or(0, |binding| binding.id);
                        }
                        let bind_group = cache
                            .entry(key)
                            .or_insert_with(|| self.create_bind_group(recorder, bindings));
                        if let Some(profiler) = &profiler {
                            // Its own pass, timestamped at both ends.
                            drop(pass.take());
                            let index = 2 * profiled.len() as u32;
                            pass = Some(
                                encoder
                                    .begin_compute_pass(&wgpu::ComputePassDescriptor {
                                        label: None,
                                        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                                            query_set: &profiler.query_set,
                                            beginning_of_pass_write_index: Some(index),
                                            end_of_pass_write_index: Some(index + 1),
                                        }),
                                    })
                                    .forget_lifetime(),
                            );
                            let at = *uniform_slot as usize * device.uniform_stride as usize;
                            profiled.push((*kernel, params_at(&recorder.uniforms, at), *groups));
                        } else if pass.is_none() {
                            pass = Some(
                                encoder
                                    .begin_compute_pass(&wgpu::ComputePassDescriptor {
                                        label: None,
                                        timestamp_writes: None,
                                    })
                                    .forget_lifetime(),
                            );
                        }
                        let Some(pass) = pass.as_mut() else {
                            return Err(gpu_error("compute pass"));
                        };
                        let pipeline = device
                            .pipelines
                            .get(kernel)
                            .ok_or_else(|| gpu_error("missing pipeline"))?;
                        pass.set_pipeline(pipeline);
                        let offset = u64::from(*uniform_slot) * device.uniform_stride;
                        pass.set_bind_group(0, &*bind_group, &[offset as u32]);
                        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
                    }
                }
            }
            drop(pass);
        }
        let queries = 2 * profiled.len() as u64;
        if let Some(profiler) = &profiler
            && queries > 0
        {
            encoder.resolve_query_set(&profiler.query_set, 0..queries as u32, &profiler.resolve, 0);
            encoder.copy_buffer_to_buffer(&profiler.resolve, 0, &profiler.readback, 0, queries * 8);
        }
        let index = device.queue.submit([encoder.finish()]);
        if let Some(profiler) = profiler.as_mut()
            && queries > 0
        {
            let ticks = read_back_u64s(device, &profiler.readback, index.clone(), queries)?;
            profiler.record(&profiled, &ticks);
        }
        recorder.commands.clear();
        recorder.uniforms.clear();
        recorder.arena.clear();
        recorder.in_flight.push_back(index);
        while recorder.in_flight.len() > MAX_IN_FLIGHT {
            if let Some(oldest) = recorder.in_flight.pop_front() {
                device
                    .device
                    .poll(wgpu::PollType::Wait {
                        submission_index: Some(oldest),
                        timeout: None,
                    })
                    .map_err(gpu_error)?;
            }
        }
        device.check_error()
    }

    fn create_bind_group(
        &self,
        recorder: &Recorder,
        bindings: &[Option<Binding>; SLOTS],
    ) -> wgpu::BindGroup {
        let device = &self.device;
        let mut entries = Vec::with_capacity(SLOTS + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &recorder.uniform_buffer,
                offset: 0,
                size: wgpu::BufferSize::new(64),
            }),
        });
        for (index, binding) in bindings.iter().enumerate() {
            let buffer = binding
                .as_ref()
                .map_or(&device.dummy, |binding| &binding.buffer);
            entries.push(wgpu::BindGroupEntry {
                binding: index as u32 + 1,
                resource: buffer.as_entire_binding(),
            });
        }
        device.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &device.layout,
            entries: &entries,
        })
    }

    /// Records a copy of host values into `dst` through the upload arena.
    fn upload_values(
        &self,
        values: impl ExactSizeIterator<Item = f32>,
        dst: &GpuSlice<'_>,
    ) -> Result<()> {
        let len = values.len();
        if len == 0 {
            return Ok(());
        }
        let mut recorder = lock(&self.recorder);
        if len > ARENA_FLOATS {
            // Too big to stage: submit what is pending, then write directly (the queue
            // orders the write before later submissions).
            self.submit(&mut recorder)?;
            let host: Vec<f32> = values.collect();
            self.device.queue.write_buffer(
                &dst.buffer.buffer,
                (dst.offset * 4) as u64,
                floats_as_bytes(&host),
            );
            return Ok(());
        }
        if recorder.arena.len() + len > ARENA_FLOATS || recorder.commands.len() >= UNIFORM_SLOTS {
            self.submit(&mut recorder)?;
        }
        let arena_offset = (recorder.arena.len() * 4) as u64;
        recorder.arena.extend(values);
        recorder.commands.push(Command::Upload {
            arena_offset,
            dst: dst.buffer.buffer.clone(),
            dst_offset: (dst.offset * 4) as u64,
            bytes: (len * 4) as u64,
        });
        Ok(())
    }

    /// Scratch buffer `kind`, grown to at least `len` floats. Dispatches run in order,
    /// so one buffer serves every operation of a recorder.
    fn scratch(&self, kind: Scratch, len: usize) -> Arc<GpuBuffer> {
        let mut recorder = lock(&self.recorder);
        let slot = &mut recorder.scratch[kind as usize];
        if let Some(scratch) = slot
            && scratch.len >= len
        {
            return Arc::clone(scratch);
        }
        // Pending work may still use the old buffer; it stays alive through the
        // commands' handles.
        let scratch = Arc::new(self.buffer(len.next_power_of_two(), "scratch"));
        *slot = Some(Arc::clone(&scratch));
        scratch
    }

    /// Examples per pass of a batched convolution, so that its im2col matrix stays
    /// within one binding and [`COLUMN_LIMIT`].
    fn conv_chunk(&self, geometry: &ConvGeometry, batch: usize) -> usize {
        let limit = (self.device.max_binding as usize / 4).min(self.column_limit);
        let per_example = (geometry.col_rows() * geometry.col_cols()).max(1);
        (limit / per_example).clamp(1, batch.max(1))
    }

    /// `dst` (a scratch buffer) = `src` (`batch` maps of `channels x plane`) as a
    /// `channels x (batch * plane)` matrix.
    fn to_channel_major(
        &self,
        src: &GpuSlice<'_>,
        channels: usize,
        batch: usize,
        plane: usize,
    ) -> Result<Arc<GpuBuffer>> {
        let len = channels * batch * plane;
        check(src, len)?;
        let dst = self.scratch(Scratch::ChannelMajor, len);
        let params = Params::new(&[word(len)?, word(src.offset)?, 0, word(plane)?])
            .set(4, word(channels)?)
            .set(5, word(batch)?);
        self.dispatch_1d(Kernel::ToChannelMajor, &[src.buffer, &dst], params, len)?;
        Ok(dst)
    }

    /// The im2col matrix of `batch` examples of `input` into a scratch buffer.
    fn im2col_batch(
        &self,
        geometry: &ConvGeometry,
        input: &GpuSlice<'_>,
        batch: usize,
    ) -> Result<Arc<GpuBuffer>> {
        check(input, batch * geometry.input_len())?;
        let len = geometry.col_rows() * geometry.col_cols() * batch;
        let cols = self.scratch(Scratch::Columns, len);
        let dst = self.src(&cols, 0..len)?;
        self.dispatch_im2col(geometry, input, &dst, batch)?;
        Ok(cols)
    }

    /// Records `im2col` of `batch` examples of `input` into `cols`.
    fn dispatch_im2col(
        &self,
        geometry: &ConvGeometry,
        input: &GpuSlice<'_>,
        cols: &GpuSlice<'_>,
        batch: usize,
    ) -> Result<()> {
        let (rows, columns) = (geometry.col_rows(), geometry.col_cols() * batch);
        if rows == 0 || columns == 0 {
            return Ok(());
        }
        if rows > MAX_GROUPS {
            return Err(gpu_error(format!(
                "{rows} im2col rows exceed the dispatch limit"
            )));
        }
        let params = conv_params(geometry, rows * columns, input.offset, cols.offset, batch)?;
        let (x, y, _) = grid(columns.div_ceil(GROUP))?;
        self.dispatch(
            Kernel::Im2col,
            &[input.buffer, cols.buffer],
            params,
            (x, y, rows as u32),
        )
    }

    /// `C = alpha * A B + beta * C` with the given operand layouts; `plane` is the
    /// output pixels per channel of a convolution output (`modes.conv_output`).
    #[allow(clippy::too_many_arguments)]
    fn gemm_modes(
        &self,
        (m, n, k): (usize, usize, usize),
        modes: GemmModes,
        a: &GpuSlice<'_>,
        b: &GpuSlice<'_>,
        c: &GpuSlice<'_>,
        alpha: f32,
        beta: f32,
        plane: usize,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (big, splits, k_per_split) = gemm_plan(m, n, k);
        let tile = if big { 64 } else { 32 };
        let params = Params::new(&[
            word(m)?,
            word(n)?,
            word(k)?,
            0,
            word(a.offset)?,
            word(b.offset)?,
            word(c.offset)?,
            word(k_per_split)?,
            alpha.to_bits(),
            beta.to_bits(),
            0,
            0,
            word(plane)?,
            reduce_lanes(splits) as u32,
        ]);
        let groups_x = n.div_ceil(tile);
        let groups_y = m.div_ceil(tile);
        if groups_x > MAX_GROUPS || groups_y > MAX_GROUPS {
            return Err(gpu_error(format!("matrix product {m}x{n} is too large")));
        }
        let groups = (groups_x as u32, groups_y as u32, splits as u32);
        let kernel = Kernel::Gemm { big, modes };
        if splits == 1 {
            return self.dispatch(kernel, &[a.buffer, b.buffer, c.buffer], params, groups);
        }
        let scratch = self.scratch(Scratch::SplitK, splits * m * n);
        self.dispatch(
            kernel,
            &[a.buffer, b.buffer, c.buffer, &scratch],
            params,
            groups,
        )?;
        self.dispatch(
            Kernel::GemmReduce {
                conv_output: modes.conv_output,
            },
            &[a.buffer, b.buffer, c.buffer, &scratch],
            params,
            grid((m * n).div_ceil(GROUP / reduce_lanes(splits)))?,
        )
    }

    /// `dst = alpha * (sum of the rows of src) + beta * dst`.
    fn sum_rows_of(
        &self,
        src: &GpuSlice<'_>,
        rows: usize,
        alpha: f32,
        beta: f32,
        dst: &GpuSlice<'_>,
    ) -> Result<()> {
        let lanes = reduce_lanes(rows);
        let params = Params::new(&[
            word(dst.len)?,
            word(src.offset)?,
            word(dst.offset)?,
            word(rows)?,
            alpha.to_bits(),
            beta.to_bits(),
            lanes as u32,
        ]);
        self.dispatch(
            Kernel::SumRows,
            &[src.buffer, dst.buffer],
            params,
            grid(dst.len.div_ceil(GROUP / lanes))?,
        )
    }

    fn readback(&self, recorder: &mut Recorder, bytes: u64) -> wgpu::Buffer {
        if let Some(buffer) = &recorder.readback
            && buffer.size() >= bytes
        {
            return buffer.clone();
        }
        let buffer = self.device.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.next_power_of_two().max(256),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        recorder.readback = Some(buffer.clone());
        buffer
    }
}

/// The parameters recorded at byte `at` of a recorder's uniform data.
fn params_at(uniforms: &[u8], at: usize) -> Params {
    let mut params = Params::default();
    for (index, word) in params.0.iter_mut().enumerate() {
        let start = at + 4 * index;
        if let Some(bytes) = uniforms.get(start..start + 4) {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
    }
    params
}

/// Waits for submission `index` and reads `count` u64s from the start of `buffer`
/// (mappable for reading).
fn read_back_u64s(
    device: &WgpuDevice,
    buffer: &wgpu::Buffer,
    index: wgpu::SubmissionIndex,
    count: u64,
) -> Result<Vec<u64>> {
    let bytes = count * 8;
    let (sender, receiver) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, 0..bytes, move |result| {
        let _ = sender.send(result);
    });
    device
        .device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        })
        .map_err(gpu_error)?;
    receiver
        .recv()
        .map_err(|_| gpu_error("read-back callback never ran"))?
        .map_err(gpu_error)?;
    let values = {
        let view = buffer.get_mapped_range(0..bytes).map_err(gpu_error)?;
        view.chunks_exact(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                u64::from_le_bytes(word)
            })
            .collect()
    };
    buffer.unmap();
    Ok(values)
}

fn floats_as_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8; the slice covers
    // exactly the floats' memory, and u8's alignment (1) divides f32's. Tested by every
    // upload in the parity tests (values round-trip through the device).
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

impl Backend for WgpuBackend {
    type Buffer = GpuBuffer;
    type Src<'a> = GpuSlice<'a>;
    type Dst<'a> = GpuSliceMut<'a>;

    fn zeros(&self, len: usize) -> GpuBuffer {
        self.buffer(len, "tensor")
    }

    fn src<'a>(&self, buffer: &'a GpuBuffer, range: Range<usize>) -> Result<GpuSlice<'a>> {
        if range.start > range.end || range.end > buffer.len {
            return Err(gpu_error(format!(
                "range {range:?} outside a buffer of {} values (bug)",
                buffer.len
            )));
        }
        Ok(GpuSlice {
            buffer,
            offset: range.start,
            len: range.end - range.start,
        })
    }

    fn dst<'a>(&self, buffer: &'a mut GpuBuffer, range: Range<usize>) -> Result<GpuSliceMut<'a>> {
        let buffer: &'a GpuBuffer = buffer;
        Ok(GpuSliceMut(self.src(buffer, range)?))
    }

    fn dst_len(&self, dst: &GpuSliceMut<'_>) -> usize {
        dst.0.len
    }

    fn upload(&self, src: &[f32], dst: GpuSliceMut<'_>) -> Result<()> {
        if src.len() != dst.0.len {
            return Err(gpu_error("upload length mismatch (bug)"));
        }
        self.upload_values(src.iter().copied(), &dst.0)
    }

    fn download(&self, src: GpuSlice<'_>, dst: &mut [f32]) -> Result<()> {
        check(&src, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let bytes = (dst.len() * 4) as u64;
        let mut recorder = lock(&self.recorder);
        self.submit(&mut recorder)?;
        let readback = self.readback(&mut recorder, bytes);
        let mut encoder =
            self.device
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("download"),
                });
        encoder.copy_buffer_to_buffer(
            &src.buffer.buffer,
            (src.offset * 4) as u64,
            &readback,
            0,
            bytes,
        );
        let index = self.device.queue.submit([encoder.finish()]);
        let (sender, receiver) = std::sync::mpsc::channel();
        readback.map_async(wgpu::MapMode::Read, 0..bytes, move |result| {
            let _ = sender.send(result);
        });
        self.device
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: None,
            })
            .map_err(gpu_error)?;
        recorder.in_flight.clear();
        receiver
            .recv()
            .map_err(|_| gpu_error("read-back callback never ran"))?
            .map_err(gpu_error)?;
        {
            let view = readback.get_mapped_range(0..bytes).map_err(gpu_error)?;
            for (value, chunk) in dst.iter_mut().zip(view.chunks_exact(4)) {
                *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        readback.unmap();
        self.device.check_error()
    }

    fn gather_rows(
        &self,
        data: &[f32],
        dim: usize,
        rows: &[usize],
        dst: GpuSliceMut<'_>,
    ) -> Result<()> {
        if rows.len() * dim != dst.0.len {
            return Err(gpu_error("gather length mismatch (bug)"));
        }
        for &row in rows {
            if (row + 1) * dim > data.len() {
                return Err(TrainError::IndexOutOfRange {
                    index: row,
                    len: data.len() / dim.max(1),
                });
            }
        }
        let values = rows
            .iter()
            .flat_map(|&row| data[row * dim..(row + 1) * dim].iter().copied());
        self.upload_values(ExactLen(values, rows.len() * dim), &dst.0)
    }

    fn copy(&self, src: GpuSlice<'_>, dst: GpuSliceMut<'_>) -> Result<()> {
        check(&src, dst.0.len)?;
        let params = Params::new(&[word(src.len)?, word(src.offset)?, word(dst.0.offset)?]);
        self.dispatch_1d(Kernel::Copy, &[src.buffer, dst.0.buffer], params, src.len)
    }

    fn gemm(&self, gemm: Gemm, a: GpuSlice<'_>, b: GpuSlice<'_>, c: GpuSliceMut<'_>) -> Result<()> {
        check(&a, gemm.m * gemm.k)?;
        check(&b, gemm.k * gemm.n)?;
        check(&c.0, gemm.m * gemm.n)?;
        let modes = GemmModes {
            trans_a: gemm.trans_a,
            trans_b: gemm.trans_b,
            conv_output: false,
        };
        self.gemm_modes(
            (gemm.m, gemm.n, gemm.k),
            modes,
            &a,
            &b,
            &c.0,
            gemm.alpha,
            gemm.beta,
            0,
        )
    }

    fn fill_rows(&self, bias: GpuSlice<'_>, rows: usize, dst: GpuSliceMut<'_>) -> Result<()> {
        check(&dst.0, rows * bias.len)?;
        if bias.len == 0 {
            return Ok(());
        }
        let params = Params::new(&[
            word(dst.0.len)?,
            word(bias.offset)?,
            word(dst.0.offset)?,
            word(bias.len)?,
        ]);
        self.dispatch_1d(
            Kernel::FillRows,
            &[bias.buffer, dst.0.buffer],
            params,
            dst.0.len,
        )
    }

    fn fill_channels(
        &self,
        bias: GpuSlice<'_>,
        batch: usize,
        plane: usize,
        dst: GpuSliceMut<'_>,
    ) -> Result<()> {
        check(&dst.0, batch * bias.len * plane)?;
        if plane == 0 || bias.len == 0 {
            return Ok(());
        }
        let params = Params::new(&[
            word(dst.0.len)?,
            word(bias.offset)?,
            word(dst.0.offset)?,
            word(plane)?,
            word(bias.len)?,
        ]);
        self.dispatch_1d(
            Kernel::FillChannels,
            &[bias.buffer, dst.0.buffer],
            params,
            dst.0.len,
        )
    }

    fn sum_rows(
        &self,
        src: GpuSlice<'_>,
        rows: usize,
        alpha: f32,
        beta: f32,
        dst: GpuSliceMut<'_>,
    ) -> Result<()> {
        check(&src, rows * dst.0.len)?;
        self.sum_rows_of(&src, rows, alpha, beta, &dst.0)
    }

    fn sum_channels(
        &self,
        src: GpuSlice<'_>,
        batch: usize,
        plane: usize,
        alpha: f32,
        beta: f32,
        dst: GpuSliceMut<'_>,
    ) -> Result<()> {
        let channels = dst.0.len;
        check(&src, batch * channels * plane)?;
        if channels == 0 {
            return Ok(());
        }
        if channels > MAX_GROUPS {
            return Err(gpu_error(format!(
                "{channels} channels exceed the dispatch limit"
            )));
        }
        let parts = (batch * plane).div_ceil(SUM_PART).clamp(1, MAX_GROUPS);
        let part_len = (batch * plane).div_ceil(parts).max(1);
        let params = Params::new(&[
            word(channels)?,
            word(src.offset)?,
            word(dst.0.offset)?,
            word(plane)?,
            word(batch)?,
            alpha.to_bits(),
            beta.to_bits(),
            word(part_len)?,
        ]);
        let groups = (channels as u32, parts as u32, 1);
        if parts == 1 {
            return self.dispatch(
                Kernel::SumChannels,
                &[src.buffer, dst.0.buffer],
                params,
                groups,
            );
        }
        let partials = self.scratch(Scratch::SplitK, parts * channels);
        self.dispatch(
            Kernel::SumChannels,
            &[src.buffer, dst.0.buffer, &partials],
            params,
            groups,
        )?;
        let partials = self.src(&partials, 0..parts * channels)?;
        self.sum_rows_of(&partials, parts, alpha, beta, &dst.0)
    }

    fn relu(&self, x: GpuSliceMut<'_>) -> Result<()> {
        let params = Params::new(&[word(x.0.len)?, word(x.0.offset)?]);
        self.dispatch_1d(Kernel::Relu, &[x.0.buffer], params, x.0.len)
    }

    fn relu_backward(&self, y: GpuSlice<'_>, dy: GpuSliceMut<'_>) -> Result<()> {
        check(&y, dy.0.len)?;
        let params = Params::new(&[word(y.len)?, word(y.offset)?, word(dy.0.offset)?]);
        self.dispatch_1d(
            Kernel::ReluBackward,
            &[y.buffer, dy.0.buffer],
            params,
            y.len,
        )
    }

    fn mul(&self, x: GpuSliceMut<'_>, mask: GpuSlice<'_>) -> Result<()> {
        check(&mask, x.0.len)?;
        let params = Params::new(&[word(x.0.len)?, word(x.0.offset)?, word(mask.offset)?]);
        self.dispatch_1d(Kernel::Mul, &[x.0.buffer, mask.buffer], params, x.0.len)
    }

    fn dropout_mask(&self, seed: u64, rate: f32, mask: GpuSliceMut<'_>) -> Result<()> {
        let keep_scale = 1.0 / (1.0 - rate);
        let params = Params::new(&[
            word(mask.0.len)?,
            word(mask.0.offset)?,
            0,
            0,
            seed as u32,
            (seed >> 32) as u32,
            rate.to_bits(),
            keep_scale.to_bits(),
        ]);
        self.dispatch_1d(Kernel::DropoutMask, &[mask.0.buffer], params, mask.0.len)
    }

    fn flush(&self) -> Result<()> {
        // Submitting costs host time per command buffer; a few steps per submission keep
        // the device busy (up to MAX_IN_FLIGHT are queued) at a fraction of the cost.
        let mut recorder = lock(&self.recorder);
        if recorder.commands.len() >= FLUSH_COMMANDS || recorder.arena.len() >= ARENA_FLOATS / 2 {
            self.submit(&mut recorder)?;
        }
        Ok(())
    }

    fn im2col(
        &self,
        geometry: &ConvGeometry,
        input: GpuSlice<'_>,
        cols: GpuSliceMut<'_>,
    ) -> Result<()> {
        check(&input, geometry.input_len())?;
        check(&cols.0, geometry.col_rows() * geometry.col_cols())?;
        self.dispatch_im2col(geometry, &input, &cols.0, 1)
    }

    fn col2im(
        &self,
        geometry: &ConvGeometry,
        cols: GpuSlice<'_>,
        input_grad: GpuSliceMut<'_>,
    ) -> Result<()> {
        check(&cols, geometry.col_rows() * geometry.col_cols())?;
        let len = geometry.input_len();
        check(&input_grad.0, len)?;
        let params = conv_params(geometry, len, cols.offset, input_grad.0.offset, 1)?;
        self.dispatch_1d(
            Kernel::Col2im,
            &[cols.buffer, input_grad.0.buffer],
            params,
            len,
        )
    }

    fn conv_forward_direct(
        &self,
        geometry: &ConvGeometry,
        out_channels: usize,
        batch: usize,
        bias: GpuSlice<'_>,
        weight: GpuSlice<'_>,
        input: GpuSlice<'_>,
        output: GpuSliceMut<'_>,
    ) -> Result<bool> {
        let (rows, plane, in_len) = (
            geometry.col_rows(),
            geometry.col_cols(),
            geometry.input_len(),
        );
        check(&bias, out_channels)?;
        check(&weight, out_channels * rows)?;
        check(&input, batch * in_len)?;
        check(&output.0, batch * out_channels * plane)?;
        // The implicit GEMM below adds to the output.
        self.fill_channels(bias, batch, plane, GpuSliceMut(output.0))?;
        let modes = GemmModes {
            trans_a: false,
            trans_b: false,
            conv_output: true,
        };
        let chunk = self.conv_chunk(geometry, batch);
        for first in (0..batch).step_by(chunk) {
            let examples = chunk.min(batch - first);
            // output[e, oc, q] += W [oc, rows] . cols [rows, (e, q)]
            let x = sub(&input, first * in_len, examples * in_len);
            let cols = self.im2col_batch(geometry, &x, examples)?;
            let cols = self.src(&cols, 0..rows * examples * plane)?;
            let out_len = out_channels * plane;
            let y = sub(&output.0, first * out_len, examples * out_len);
            self.gemm_modes(
                (out_channels, examples * plane, rows),
                modes,
                &weight,
                &cols,
                &y,
                1.0,
                1.0,
                plane,
            )?;
        }
        Ok(true)
    }

    fn conv_input_grad_sparse(
        &self,
        geometry: &ConvGeometry,
        out_channels: usize,
        batch: usize,
        weight: GpuSlice<'_>,
        output_grad: GpuSlice<'_>,
        input_grad: GpuSliceMut<'_>,
    ) -> Result<bool> {
        let (rows, plane, in_len) = (
            geometry.col_rows(),
            geometry.col_cols(),
            geometry.input_len(),
        );
        check(&weight, out_channels * rows)?;
        check(&output_grad, batch * out_channels * plane)?;
        check(&input_grad.0, batch * in_len)?;
        let modes = GemmModes {
            trans_a: true,
            trans_b: false,
            conv_output: false,
        };
        let chunk = self.conv_chunk(geometry, batch);
        for first in (0..batch).step_by(chunk) {
            let examples = chunk.min(batch - first);
            // dcols [rows, (e, q)] = W^T [rows, oc] . dy [oc, (e, q)], then col2im.
            let out_len = out_channels * plane;
            let dy = sub(&output_grad, first * out_len, examples * out_len);
            let dy = self.to_channel_major(&dy, out_channels, examples, plane)?;
            let dy = self.src(&dy, 0..examples * out_len)?;
            let cols_len = rows * examples * plane;
            let dcols = self.scratch(Scratch::Columns, cols_len);
            let dcols = self.src(&dcols, 0..cols_len)?;
            self.gemm_modes(
                (rows, examples * plane, out_channels),
                modes,
                &weight,
                &dy,
                &dcols,
                1.0,
                0.0,
                0,
            )?;
            let dx = sub(&input_grad.0, first * in_len, examples * in_len);
            let params = conv_params(geometry, examples * in_len, 0, dx.offset, examples)?;
            self.dispatch_1d(
                Kernel::Col2im,
                &[dcols.buffer, dx.buffer],
                params,
                examples * in_len,
            )?;
        }
        Ok(true)
    }

    fn conv_weight_grad_sparse(
        &self,
        geometry: &ConvGeometry,
        out_channels: usize,
        batch: usize,
        input: GpuSlice<'_>,
        output_grad: GpuSlice<'_>,
        alpha: f32,
        beta: f32,
        weight_grad: GpuSliceMut<'_>,
    ) -> Result<bool> {
        let (rows, plane, in_len) = (
            geometry.col_rows(),
            geometry.col_cols(),
            geometry.input_len(),
        );
        check(&weight_grad.0, out_channels * rows)?;
        check(&output_grad, batch * out_channels * plane)?;
        check(&input, batch * in_len)?;
        let modes = GemmModes {
            trans_a: false,
            trans_b: true,
            conv_output: false,
        };
        let chunk = self.conv_chunk(geometry, batch);
        for first in (0..batch).step_by(chunk) {
            let examples = chunk.min(batch - first);
            // dW [oc, rows] = dy [oc, (e, q)] . cols^T [(e, q), rows], accumulated over
            // the chunks.
            let out_len = out_channels * plane;
            let dy = sub(&output_grad, first * out_len, examples * out_len);
            let dy = self.to_channel_major(&dy, out_channels, examples, plane)?;
            let dy = self.src(&dy, 0..examples * out_len)?;
            let x = sub(&input, first * in_len, examples * in_len);
            let cols = self.im2col_batch(geometry, &x, examples)?;
            let cols = self.src(&cols, 0..rows * examples * plane)?;
            self.gemm_modes(
                (out_channels, rows, examples * plane),
                modes,
                &dy,
                &cols,
                &weight_grad.0,
                alpha,
                if first == 0 { beta } else { 1.0 },
                0,
            )?;
        }
        Ok(true)
    }

    fn max_pool(
        &self,
        geometry: &PoolGeometry,
        input: GpuSlice<'_>,
        output: GpuSliceMut<'_>,
    ) -> Result<()> {
        check(&input, geometry.input_len())?;
        check(&output.0, geometry.output_len())?;
        let params = pool_params(
            geometry,
            geometry.output_len(),
            input.offset,
            output.0.offset,
            0,
        )?;
        self.dispatch_1d(
            Kernel::MaxPool,
            &[input.buffer, output.0.buffer],
            params,
            geometry.output_len(),
        )
    }

    fn max_pool_backward(
        &self,
        geometry: &PoolGeometry,
        input: GpuSlice<'_>,
        output_grad: GpuSlice<'_>,
        input_grad: GpuSliceMut<'_>,
    ) -> Result<()> {
        check(&input, geometry.input_len())?;
        check(&input_grad.0, geometry.input_len())?;
        check(&output_grad, geometry.output_len())?;
        let params = pool_params(
            geometry,
            geometry.input_len(),
            input.offset,
            input_grad.0.offset,
            output_grad.offset,
        )?;
        self.dispatch_1d(
            Kernel::MaxPoolBackward,
            &[input.buffer, input_grad.0.buffer, output_grad.buffer],
            params,
            geometry.input_len(),
        )
    }

    fn softmax_cross_entropy(
        &self,
        logits: GpuSlice<'_>,
        labels: GpuSlice<'_>,
        classes: usize,
        grad: Option<(f32, GpuSliceMut<'_>)>,
        stats: GpuSliceMut<'_>,
    ) -> Result<()> {
        check(&logits, labels.len * classes)?;
        check(&stats.0, 2)?;
        if classes == 0 {
            return Err(gpu_error("softmax over zero classes"));
        }
        let (scale, grad_slice) = match &grad {
            Some((scale, dst)) => {
                check(&dst.0, logits.len)?;
                (*scale, Some(dst.0))
            }
            None => (0.0, None),
        };
        let params = Params::new(&[
            word(labels.len)?,
            word(classes)?,
            word(logits.offset)?,
            word(labels.offset)?,
            word(grad_slice.map_or(0, |slice| slice.offset))?,
            word(stats.0.offset)?,
            u32::from(grad_slice.is_some()),
            0,
            scale.to_bits(),
        ]);
        let grad_buffer = grad_slice.map_or(stats.0.buffer, |slice| slice.buffer);
        self.dispatch(
            Kernel::SoftmaxCrossEntropy,
            &[logits.buffer, labels.buffer, grad_buffer, stats.0.buffer],
            params,
            (1, 1, 1),
        )
    }

    fn sgd_step(
        &self,
        step: &SgdStep,
        params: GpuSliceMut<'_>,
        grads: GpuSlice<'_>,
        velocity: Option<GpuSliceMut<'_>>,
        anchor: Option<GpuSlice<'_>>,
    ) -> Result<()> {
        let len = params.0.len;
        check(&grads, len)?;
        let velocity = velocity.map(|velocity| velocity.0);
        if step.momentum != 0.0 && velocity.is_none() {
            return Err(gpu_error("SGD with momentum needs a velocity buffer (bug)"));
        }
        if let Some(velocity) = &velocity {
            check(velocity, len)?;
        }
        let anchor = anchor.filter(|_| step.proximal_mu != 0.0);
        if let Some(anchor) = &anchor {
            check(anchor, len)?;
        }
        let flags = u32::from(velocity.is_some() && step.momentum != 0.0)
            | u32::from(anchor.is_some()) << 1
            | u32::from(step.nesterov) << 2;
        let words = Params::new(&[
            word(len)?,
            word(params.0.offset)?,
            word(grads.offset)?,
            word(velocity.map_or(0, |velocity| velocity.offset))?,
            word(anchor.map_or(0, |anchor| anchor.offset))?,
            flags,
            0,
            0,
            step.learning_rate.to_bits(),
            step.momentum.to_bits(),
            step.weight_decay.to_bits(),
            step.proximal_mu.to_bits(),
        ]);
        let velocity_buffer = velocity.map_or(params.0.buffer, |velocity| velocity.buffer);
        let anchor_buffer = anchor.map_or(params.0.buffer, |anchor| anchor.buffer);
        self.dispatch_1d(
            Kernel::SgdStep,
            &[
                params.0.buffer,
                grads.buffer,
                velocity_buffer,
                anchor_buffer,
            ],
            words,
            len,
        )
    }

    fn adam_step(
        &self,
        step: &AdamStep,
        params: GpuSliceMut<'_>,
        grads: GpuSlice<'_>,
        moment1: GpuSliceMut<'_>,
        moment2: GpuSliceMut<'_>,
        anchor: Option<GpuSlice<'_>>,
    ) -> Result<()> {
        let len = params.0.len;
        check(&grads, len)?;
        check(&moment1.0, len)?;
        check(&moment2.0, len)?;
        let anchor = anchor.filter(|_| step.proximal_mu != 0.0);
        if let Some(anchor) = &anchor {
            check(anchor, len)?;
        }
        let step_size = step.learning_rate / step.bias_correction1;
        let words = Params::new(&[
            word(len)?,
            word(params.0.offset)?,
            word(grads.offset)?,
            word(moment1.0.offset)?,
            word(moment2.0.offset)?,
            word(anchor.map_or(0, |anchor| anchor.offset))?,
            u32::from(anchor.is_some()),
            0,
            step_size.to_bits(),
            step.beta1.to_bits(),
            step.beta2.to_bits(),
            step.epsilon.to_bits(),
            step.weight_decay.to_bits(),
            step.proximal_mu.to_bits(),
            step.bias_correction2_sqrt.to_bits(),
        ]);
        let anchor_buffer = anchor.map_or(params.0.buffer, |anchor| anchor.buffer);
        self.dispatch_1d(
            Kernel::AdamStep,
            &[
                params.0.buffer,
                grads.buffer,
                moment1.0.buffer,
                moment2.0.buffer,
                anchor_buffer,
            ],
            words,
            len,
        )
    }
}

fn pool_params(
    geometry: &PoolGeometry,
    len: usize,
    first: usize,
    second: usize,
    third: usize,
) -> Result<Params> {
    Ok(Params::new(&[
        word(len)?,
        word(first)?,
        word(second)?,
        word(third)?,
        word(geometry.in_height)?,
        word(geometry.in_width)?,
        word(geometry.size)?,
        word(geometry.stride)?,
        word(geometry.out_height)?,
        word(geometry.out_width)?,
    ]))
}

/// `len` values of `slice` from `start` (within it: the callers' checks ensure it).
fn sub<'a>(slice: &GpuSlice<'a>, start: usize, len: usize) -> GpuSlice<'a> {
    GpuSlice {
        buffer: slice.buffer,
        offset: slice.offset + start,
        len,
    }
}

/// An iterator with a known length (`flat_map` does not report one).
struct ExactLen<I>(I, usize);

impl<I: Iterator<Item = f32>> Iterator for ExactLen<I> {
    type Item = f32;
    fn next(&mut self) -> Option<f32> {
        let item = self.0.next();
        if item.is_some() {
            self.1 = self.1.saturating_sub(1);
        }
        item
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.1, Some(self.1))
    }
}

impl<I: Iterator<Item = f32>> ExactSizeIterator for ExactLen<I> {}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
