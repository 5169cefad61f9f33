//! `fedquic-aggregator plot` as a user runs it, on a metrics file written by hand.

use std::process::{Command, Output};

fn plot(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedquic-aggregator"))
        .arg("plot")
        .args(args)
        .output()
        .unwrap()
}

/// Three rounds as the daemon writes them (fields the plots do not use
/// included); round 2 had no central evaluation.
const METRICS: &str = concat!(
    r#"{"round":1,"attempts":1,"clients_available":4,"clients_selected":4,"clients_answered":4,"test_loss":1.9,"test_accuracy":0.42,"test_examples":100,"bytes_down":812000,"bytes_up":790000,"client_backends":{},"client_traffic":{},"seconds":1.2,"central_eval_seconds":0.01,"checkpoint_seconds":0.002,"elapsed_seconds":1.4}"#,
    "\n",
    r#"{"round":2,"attempts":1,"test_loss":null,"test_accuracy":null,"bytes_down":812000,"bytes_up":790000,"seconds":1.1,"elapsed_seconds":2.6}"#,
    "\n",
    r#"{"round":3,"attempts":2,"test_loss":0.8,"test_accuracy":0.77,"bytes_down":812000,"bytes_up":640000,"seconds":1.3,"elapsed_seconds":4.0}"#,
    "\n",
);

#[test]
fn plot_draws_from_a_state_dir_into_out() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("plots");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("metrics.jsonl"), METRICS).unwrap();
    let result = plot(&[
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    for name in ["accuracy.png", "loss.png", "bytes.png"] {
        let bytes = std::fs::read(out.join(name)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name} is a PNG");
        assert!(stdout.contains(name), "{stdout}");
        assert!(!state.join(name).exists(), "{name} went to --out only");
    }

    // Without --out the plots land in the state directory.
    let result = plot(&["--state-dir".as_ref(), state.as_os_str()]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(state.join("bytes.png").is_file());
}

#[test]
fn plot_refuses_missing_empty_and_broken_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let stderr = |result: Output| {
        assert!(!result.status.success());
        String::from_utf8_lossy(&result.stderr).into_owned()
    };
    let args = ["--state-dir".as_ref(), state.as_os_str()];

    let err = stderr(plot(&args));
    assert!(err.contains("no metrics file at"), "{err}");

    std::fs::write(state.join("metrics.jsonl"), "").unwrap();
    let err = stderr(plot(&args));
    assert!(err.contains("holds no rounds"), "{err}");

    std::fs::write(
        state.join("metrics.jsonl"),
        format!("{METRICS}{{\"round\": 4,\n"),
    )
    .unwrap();
    let err = stderr(plot(&args));
    assert!(
        err.contains("metrics.jsonl, line 4: not a round record"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!state.join("accuracy.png").exists());
}
