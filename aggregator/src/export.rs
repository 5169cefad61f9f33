//! `fedquic-aggregator export`: the global model of any checkpointed round as ONNX,
//! from the state directory alone.
//!
//! A run whose model is `onnx:FILE` keeps a copy of that file as `model.onnx` in its
//! state directory (written at start by [`keep_original`]); export then rewrites that
//! graph's weights, so node, input and output names stay the user's. A spec model
//! (`mlp:`, `cnn:`, `net:`) is exported as a fresh graph from the spec recorded in the
//! checkpoint.

use std::path::{Path, PathBuf};

use fedquic_train::ModelSpec;
use fedquic_train::onnx::{self, OnnxError};
use thiserror::Error;

use crate::checkpoint::{self, CheckpointError, CheckpointStore};

/// The copy of an imported ONNX file in the state directory.
pub const ORIGINAL_ONNX: &str = "model.onnx";

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("no checkpoint in {0}: has a round completed?")]
    NoCheckpoint(PathBuf),
    #[error("no checkpoint of round {round} in {dir} (kept: {kept:?})")]
    NoRound {
        round: u64,
        dir: PathBuf,
        kept: Vec<u64>,
    },
    #[error(
        "{path} describes model {found:?} but the checkpoint holds {expected:?}; \
         was the state directory reused by another run?"
    )]
    OriginalMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("checkpoint model {spec:?} cannot be exported: {reason}")]
    NotAModel { spec: String, reason: String },
    #[error("ONNX: {0}")]
    Onnx(#[from] OnnxError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The round exported and the ONNX bytes of its global model. `checkpoint_dir` defaults
/// to `state_dir/checkpoints`; `round` to the newest valid checkpoint.
pub fn export_from_state(
    state_dir: &Path,
    checkpoint_dir: Option<&Path>,
    round: Option<u64>,
) -> Result<(u64, Vec<u8>), ExportError> {
    let dir = checkpoint_dir.map_or_else(|| state_dir.join("checkpoints"), Path::to_path_buf);
    if !dir.is_dir() {
        return Err(ExportError::NoCheckpoint(dir));
    }
    let store = CheckpointStore::open(&dir, usize::MAX)?;
    let checkpoint = match round {
        Some(round) => {
            let kept = store.list()?;
            let Some((_, path)) = kept.iter().find(|(r, _)| *r == round) else {
                return Err(ExportError::NoRound {
                    round,
                    dir,
                    kept: kept.iter().map(|(r, _)| *r).collect(),
                });
            };
            checkpoint::load(path)?
        }
        None => store
            .latest_valid(
                |path, e| tracing::warn!(path = %path.display(), error = %e, "skipping checkpoint"),
            )?
            .ok_or_else(|| ExportError::NoCheckpoint(dir.clone()))?,
    };
    let expected = checkpoint.header.model_spec.clone();
    let original = state_dir.join(ORIGINAL_ONNX);
    let bytes = if original.is_file() {
        let source = onnx::ModelSource::parse(&format!("onnx:{}", original.display()))?;
        let found = source.layout.to_string();
        if found != expected {
            return Err(ExportError::OriginalMismatch {
                path: original,
                found,
                expected,
            });
        }
        source.export(&checkpoint.model)?
    } else {
        let spec: ModelSpec = expected.parse().map_err(|e| ExportError::NotAModel {
            spec: expected.clone(),
            reason: format!("{e}"),
        })?;
        onnx::export_spec(&spec, &checkpoint.model)?
    };
    Ok((checkpoint.header.round, bytes))
}

/// Keeps (or, for a model that is not ONNX, removes) the state directory's copy of the
/// imported file, atomically.
pub fn keep_original(state_dir: &Path, original: Option<&[u8]>) -> Result<(), ExportError> {
    let path = state_dir.join(ORIGINAL_ONNX);
    let io = |source| ExportError::Io {
        path: path.clone(),
        source,
    };
    match original {
        Some(bytes) => fedquic_net::files::replace_file(&path, bytes).map_err(io),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        },
    }
}

/// Writes `bytes` to `path` atomically ([`fedquic_net::files::replace_file`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    fedquic_net::files::replace_file(path, bytes).map_err(|source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointHeader;
    use crate::engine::EngineState;

    fn header(round: u64, spec: &str) -> CheckpointHeader {
        CheckpointHeader {
            run_id: "export-test".into(),
            round,
            model_spec: spec.into(),
            values: 0,
            unix_time: 0,
            engine: EngineState {
                completed_rounds: round,
                next_task_id: 1,
                selection_seed: 0,
                fit_seed: 0,
                median_update_norm: None,
            },
            strategy: "fedavg".into(),
            strategy_bytes: 0,
            metrics_line: String::new(),
        }
    }

    #[test]
    fn exports_the_requested_round_of_a_spec_model() {
        let state = tempfile::tempdir().unwrap();
        let spec: ModelSpec = "mlp:6-5-3".parse().unwrap();
        let store = CheckpointStore::open(state.path().join("checkpoints"), 5).unwrap();
        let params = |round: u64| vec![round as f32 / 10.0; spec.num_params()];
        for round in 1..=3 {
            store
                .save(&header(round, &spec.to_string()), &params(round), &[])
                .unwrap();
        }
        let (round, bytes) = export_from_state(state.path(), None, None).unwrap();
        assert_eq!(round, 3);
        assert_eq!(onnx::import_bytes(&bytes).unwrap().parameters, params(3));
        let (round, bytes) = export_from_state(state.path(), None, Some(2)).unwrap();
        assert_eq!(round, 2);
        assert_eq!(onnx::import_bytes(&bytes).unwrap().parameters, params(2));
        let error = export_from_state(state.path(), None, Some(9)).unwrap_err();
        assert!(error.to_string().contains("round 9"), "{error}");
        let empty = tempfile::tempdir().unwrap();
        let error = export_from_state(empty.path(), None, None).unwrap_err();
        assert!(matches!(error, ExportError::NoCheckpoint(_)), "{error}");
    }

    #[test]
    fn exports_an_imported_model_with_its_original_names() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/onnx/cnn.onnx");
        let source = onnx::ModelSource::parse(&format!("onnx:{}", fixture.display())).unwrap();
        let state = tempfile::tempdir().unwrap();
        let (bytes, imported) = source.onnx.clone().unwrap();
        keep_original(state.path(), Some(&bytes)).unwrap();
        let store = CheckpointStore::open(state.path().join("checkpoints"), 5).unwrap();
        let trained: Vec<f32> = imported.parameters.iter().map(|v| v * 0.5).collect();
        store
            .save(&header(4, &source.layout.to_string()), &trained, &[])
            .unwrap();
        let (round, exported) = export_from_state(state.path(), None, None).unwrap();
        assert_eq!(round, 4);
        let again = onnx::import_bytes(&exported).unwrap();
        assert_eq!(again.parameters, trained);
        assert_eq!(again.input_name, "input");
        assert_eq!(again.output_name, "output");
        // A spec run in the same directory removes the copy.
        keep_original(state.path(), None).unwrap();
        assert!(!state.path().join(ORIGINAL_ONNX).exists());
    }
}
