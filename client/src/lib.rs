//! fedquic edge client: the [`Trainer`] trait and the built-in trainer, and
//! the QUIC session that receives global models, trains, and streams back
//! updates, reconnecting with jittered backoff while the aggregator is away.

pub mod backoff;
pub mod data;
pub mod limits;
pub mod predict;
pub mod secagg;
pub mod session;
pub mod state;
pub mod trainer;

pub use backoff::Backoff;
pub use data::{ClientData, PartitionSpec};
pub use limits::{ClientLimits, LimitError};
pub use session::{
    ClientError, ClientOptions, ClientReport, CodecOptions, DEFAULT_HANDSHAKE_TIMEOUT, run_client,
    run_client_with_store, scaffold_control,
};
pub use state::{StateStore, StateStoreError, StateVector};
pub use trainer::{EvalOutcome, FitOutcome, LocalTrainer, Trainer, TrainerError};
