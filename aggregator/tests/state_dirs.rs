//! State directories belong to one run: a new run never mixes with an old
//! one, `--resume` never silently starts over, and metrics agree with the
//! checkpoints. Real files, real checkpoints, the same setup the daemon runs.

use std::fs;
use std::path::Path;

use fedquic_aggregator::checkpoint::{CheckpointHeader, CheckpointStore};
use fedquic_aggregator::engine::EngineState;
use fedquic_aggregator::{AggregatorConfig, SetupError, StartMode, setup_from_config};
use fedquic_net::pki::{CA_CERT_FILE, CertAuthority, SERVER_CERT_FILE, SERVER_KEY_FILE};

const SPEC: &str = "logreg:4-2";
const VALUES: usize = 4 * 2 + 2;

fn config(dir: &Path) -> AggregatorConfig {
    let certs = dir.join("certs");
    fs::create_dir_all(&certs).unwrap();
    let ca = CertAuthority::generate("state CA").unwrap();
    let server = ca.issue_server(&["localhost".into()]).unwrap();
    fs::write(certs.join(CA_CERT_FILE), ca.cert_pem()).unwrap();
    fs::write(certs.join(SERVER_CERT_FILE), &server.cert_pem).unwrap();
    fs::write(certs.join(SERVER_KEY_FILE), &server.key_pem).unwrap();
    let mut c = AggregatorConfig::default();
    c.certs.dir = certs;
    c.state.dir = dir.join("state");
    c.model.spec = SPEC.into();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c
}

fn checkpoint(c: &AggregatorConfig, run: &str, round: u64) {
    let store = CheckpointStore::open(c.checkpoint_dir(), 5).unwrap();
    let header = CheckpointHeader {
        run_id: run.into(),
        round,
        model_spec: SPEC.into(),
        values: VALUES as u64,
        unix_time: 0,
        engine: EngineState {
            completed_rounds: round,
            next_task_id: 7 * round,
            selection_seed: 11,
            fit_seed: 12,
            median_update_norm: Some(3.0),
        },
        strategy: "fedavg".into(),
        strategy_bytes: 0,
        metrics_line: format!("{{\"round\":{round},\"from\":\"checkpoint\"}}"),
    };
    store.save(&header, &[round as f32; VALUES], &[]).unwrap();
}

fn message(e: SetupError) -> String {
    e.to_string()
}

#[test]
fn a_new_run_refuses_a_state_directory_that_holds_another() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    checkpoint(&c, "old-run", 4);
    let e = message(setup_from_config(&c, StartMode::New).err().unwrap());
    assert!(
        e.contains("--resume") && e.contains("--fresh") && e.contains("1 checkpoint"),
        "{e}"
    );

    // Metrics alone count too.
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    fs::create_dir_all(&c.state.dir).unwrap();
    fs::write(c.metrics_path(), "{\"round\":1}\n").unwrap();
    let e = message(setup_from_config(&c, StartMode::New).err().unwrap());
    assert!(e.contains("metrics"), "{e}");
}

#[test]
fn fresh_archives_the_old_run_and_gets_a_new_run_id() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    checkpoint(&c, "old-run", 4);
    checkpoint(&c, "old-run", 5);
    fs::write(c.metrics_path(), "{\"round\":4}\n{\"round\":5}\n").unwrap();
    let setup = setup_from_config(&c, StartMode::Fresh).unwrap();
    assert!(setup.resume.is_none());
    assert_ne!(setup.run_id, "old-run");
    assert!(!c.metrics_path().exists());
    assert_eq!(fs::read_dir(c.checkpoint_dir()).unwrap().count(), 0);
    let archive = c.state.dir.join("archive");
    let runs: Vec<_> = fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        fs::read_dir(runs[0].join("checkpoints")).unwrap().count(),
        2
    );
    assert!(
        fs::read_to_string(runs[0].join("metrics.jsonl"))
            .unwrap()
            .contains("\"round\":5")
    );
}

#[test]
fn resume_fails_when_no_checkpoint_is_valid_and_names_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    checkpoint(&c, "run", 1);
    checkpoint(&c, "run", 2);
    for round in [1, 2] {
        let path = c.checkpoint_dir().join(format!("round-{round:06}.ckpt"));
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        fs::write(&path, bytes).unwrap();
    }
    let e = message(setup_from_config(&c, StartMode::Resume).err().unwrap());
    assert!(e.contains("no valid checkpoint"), "{e}");
    assert!(
        e.contains("round-000001.ckpt") && e.contains("round-000002.ckpt"),
        "{e}"
    );
    assert!(e.contains("checksum"), "{e}");
}

#[test]
fn resume_restores_engine_state_and_brings_metrics_in_line() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    checkpoint(&c, "the-run", 2);
    checkpoint(&c, "the-run", 3);
    // The crash came after round 3's checkpoint but before its metrics line;
    // round 2's line was written twice (a retried append), and a line from a
    // round past the checkpoint is there too.
    fs::write(
        c.metrics_path(),
        "{\"round\":1}\n{\"round\":2}\n{\"round\":2}\n{\"round\":4}\n",
    )
    .unwrap();
    let setup = setup_from_config(&c, StartMode::Resume).unwrap();
    assert_eq!(setup.run_id, "the-run");
    let state = setup.resume.unwrap();
    assert_eq!((state.completed_rounds, state.next_task_id), (3, 21));
    assert_eq!((state.selection_seed, state.fit_seed), (11, 12));
    assert_eq!(state.median_update_norm, Some(3.0));
    assert_eq!(setup.initial_model, vec![3.0; VALUES]);
    let lines: Vec<String> = fs::read_to_string(c.metrics_path())
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        lines,
        vec![
            "{\"round\":1}",
            "{\"round\":2}",
            "{\"round\":3,\"from\":\"checkpoint\"}"
        ]
    );
    // The original file is kept beside it.
    assert!(c.state.dir.join("metrics.jsonl.before-resume-3").exists());
}
