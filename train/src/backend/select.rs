//! Choosing a backend at run time: `--backend cpu|wgpu|auto` in the binaries.

use std::fmt;
use std::str::FromStr;

use super::CpuBackend;
#[cfg(feature = "wgpu")]
use super::wgpu::{WgpuBackend, WgpuDevice};
use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::model::{EvalStats, FitConfig, FitStats, Model};

/// Which backend to train on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// The SIMD CPU backend.
    #[default]
    Cpu,
    /// wgpu (Vulkan) on the best adapter found, a software one (lavapipe) included; an
    /// error if there is none.
    Wgpu,
    /// wgpu on a discrete or integrated GPU when there is one, the CPU otherwise.
    Auto,
}

impl BackendKind {
    pub const NAMES: [&'static str; 3] = ["cpu", "wgpu", "auto"];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Auto => "auto",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = TrainError;

    fn from_str(text: &str) -> Result<BackendKind> {
        match text {
            "cpu" => Ok(BackendKind::Cpu),
            "wgpu" => Ok(BackendKind::Wgpu),
            "auto" => Ok(BackendKind::Auto),
            other => Err(TrainError::InvalidConfig(format!(
                "unknown backend {other:?}: expected cpu, wgpu or auto"
            ))),
        }
    }
}

/// A backend chosen at run time; trains and evaluates a [`Model`] on it.
#[derive(Debug)]
pub enum Engine {
    Cpu(CpuBackend),
    #[cfg(feature = "wgpu")]
    Wgpu(Box<WgpuBackend>),
}

impl Engine {
    /// The engine for `kind`. `Auto` falls back to the CPU (logging why) when no GPU is
    /// found; `Wgpu` is an error without an adapter, or when built without the `wgpu`
    /// feature.
    pub fn select(kind: BackendKind) -> Result<Engine> {
        match kind {
            BackendKind::Cpu => Ok(Engine::Cpu(CpuBackend)),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(Engine::Wgpu(Box::new(WgpuBackend::open(true)?))),
            #[cfg(feature = "wgpu")]
            BackendKind::Auto => match WgpuDevice::open(true) {
                Ok(device) if device.adapter().is_gpu => {
                    Ok(Engine::Wgpu(Box::new(WgpuBackend::new(device))))
                }
                Ok(device) => {
                    tracing::info!(
                        adapter = %device.adapter(),
                        "backend auto: the only Vulkan adapter is not a GPU; training on the CPU"
                    );
                    Ok(Engine::Cpu(CpuBackend))
                }
                Err(error) => {
                    tracing::info!(%error, "backend auto: no GPU; training on the CPU");
                    Ok(Engine::Cpu(CpuBackend))
                }
            },
            #[cfg(not(feature = "wgpu"))]
            BackendKind::Wgpu => Err(TrainError::Gpu(
                "this build has no wgpu backend (cargo feature `wgpu` of fedquic-train)"
                    .to_string(),
            )),
            #[cfg(not(feature = "wgpu"))]
            BackendKind::Auto => Ok(Engine::Cpu(CpuBackend)),
        }
    }

    /// Another engine on the same device (one per training thread): the CPU again, or a
    /// new wgpu recorder sharing this one's device and queue.
    pub fn share(&self) -> Engine {
        match self {
            Engine::Cpu(_) => Engine::Cpu(CpuBackend),
            #[cfg(feature = "wgpu")]
            Engine::Wgpu(backend) => {
                Engine::Wgpu(Box::new(WgpuBackend::new(backend.device().clone())))
            }
        }
    }

    /// `cpu` or `wgpu`: what the client reports in its Hello.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Cpu(_) => "cpu",
            #[cfg(feature = "wgpu")]
            Engine::Wgpu(_) => "wgpu",
        }
    }

    /// A line for logs: the backend and, on wgpu, the adapter (name, API, type, driver).
    pub fn describe(&self) -> String {
        match self {
            Engine::Cpu(_) => "cpu".to_string(),
            #[cfg(feature = "wgpu")]
            Engine::Wgpu(backend) => format!("wgpu on {}", backend.adapter()),
        }
    }

    /// [`Model::fit_on`] on this engine.
    pub fn fit(
        &self,
        model: &mut Model,
        data: &Dataset,
        indices: &[usize],
        cfg: &FitConfig,
    ) -> Result<FitStats> {
        match self {
            Engine::Cpu(backend) => model.fit_on(backend, data, indices, cfg),
            #[cfg(feature = "wgpu")]
            Engine::Wgpu(backend) => model.fit_on(backend.as_ref(), data, indices, cfg),
        }
    }

    /// [`Model::evaluate_batched_on`] on this engine.
    pub fn evaluate_batched(
        &self,
        model: &Model,
        data: &Dataset,
        indices: &[usize],
        batch_size: usize,
    ) -> Result<EvalStats> {
        match self {
            Engine::Cpu(backend) => model.evaluate_batched_on(backend, data, indices, batch_size),
            #[cfg(feature = "wgpu")]
            Engine::Wgpu(backend) => {
                model.evaluate_batched_on(backend.as_ref(), data, indices, batch_size)
            }
        }
    }

    /// [`Model::evaluate_on`] on this engine.
    pub fn evaluate(&self, model: &Model, data: &Dataset, indices: &[usize]) -> Result<EvalStats> {
        match self {
            Engine::Cpu(backend) => model.evaluate_on(backend, data, indices),
            #[cfg(feature = "wgpu")]
            Engine::Wgpu(backend) => model.evaluate_on(backend.as_ref(), data, indices),
        }
    }
}
