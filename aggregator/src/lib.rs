//! fedquic aggregator: the round engine (a pure state machine), the FedAvg
//! strategy, the checkpoint store, and the QUIC server that drives them.

pub mod checkpoint;
pub mod config;
pub mod coordinator;
pub mod engine;
pub mod export;
pub mod fedbuff;
pub mod logging;
pub mod metrics;
pub mod plot;
pub mod privacy;
pub mod secagg;
pub mod server;
pub mod setup;
pub mod strategy;

#[cfg(test)]
mod engine_tests;

pub use config::AggregatorConfig;
pub use coordinator::{Coordinator, ReceivedUpdate};
pub use engine::{Action, EngineConfig, RoundEngine, RoundOutcome, StalenessSummary, Waiting};
pub use fedbuff::{FedBuff, FedBuffSettings, Staleness};
pub use metrics::{Metrics, MetricsEndpoint};
pub use secagg::{SecAggEngine, SecAggSettings};
pub use server::{CentralEval, RoundRecord, RunSummary, Server, ServerError, ServerSetup};
pub use setup::{CrlReload, SetupError, StartMode, setup_from_config, setup_with_crl_reload};
