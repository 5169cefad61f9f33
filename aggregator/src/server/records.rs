//! What each committed round leaves behind: a line in `metrics.jsonl`.

use std::path::PathBuf;

use serde::Serialize;

use super::ServerError;
use crate::engine::{ClientId, RoundOutcome};

/// One line of the metrics file.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRecord {
    #[serde(flatten)]
    pub outcome: RoundOutcome,
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub test_examples: Option<usize>,
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// The training backend (as each client reported it) of every accepted
    /// update: which clients trained on what.
    pub client_backends: std::collections::BTreeMap<ClientId, String>,
    /// Tensor-stream body bytes each client sent (updates) and was sent
    /// (models) during the round, and the codecs its session uses.
    pub client_traffic: std::collections::BTreeMap<ClientId, ClientTraffic>,
    /// Wall time of the round: training, transfers, evaluation, checkpoint.
    pub seconds: f64,
    pub central_eval_seconds: f64,
    pub checkpoint_seconds: f64,
    /// Seconds since the server started.
    pub elapsed_seconds: f64,
}

/// One client's traffic in a round.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ClientTraffic {
    pub uplink: String,
    pub downlink: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

pub(super) fn append_json_line(path: &PathBuf, record: &RoundRecord) -> Result<(), ServerError> {
    use std::io::Write;
    let err = |source| ServerError::Metrics {
        path: path.clone(),
        source,
    };
    let mut line = serde_json::to_vec(record).map_err(|e| err(std::io::Error::other(e)))?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    f.write_all(&line).map_err(err)?;
    f.flush().map_err(err)
}
