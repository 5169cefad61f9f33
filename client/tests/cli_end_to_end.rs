//! The deployment quickstart as a user runs it: `certs init`, the
//! aggregator daemon and three client processes, each a separate binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn client_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fedquic-client"))
}

/// The aggregator binary. The client's package cannot name another
/// package's binary, so use the one `cargo test --workspace` built next to
/// ours, and build it with cargo (as tools such as escargot do) only when it
/// is missing or older than the sources it is made from.
fn aggregator_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let path = client_bin().with_file_name(format!(
                "fedquic-aggregator{}",
                std::env::consts::EXE_SUFFIX
            ));
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            let stale = built.is_none_or(|built| {
                ["aggregator", "net", "protocol", "train"]
                    .iter()
                    .any(|c| newer_than(&root.join(c), built))
            });
            if stale {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let out = Command::new(cargo)
                    .current_dir(&root)
                    .args([
                        "build",
                        "--quiet",
                        "--profile",
                        "test",
                        "-p",
                        "fedquic-aggregator",
                        "--bin",
                        "fedquic-aggregator",
                    ])
                    .output()
                    .expect("running cargo build");
                assert!(
                    out.status.success(),
                    "building fedquic-aggregator failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(path.exists(), "{} was not built", path.display());
            path
        })
        .clone()
}

/// Whether any source file (or manifest) under `dir` changed after `time`.
fn newer_than(dir: &Path, time: std::time::SystemTime) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            return p.file_name().is_some_and(|n| n != "target") && newer_than(&p, time);
        }
        let relevant = p.extension().is_some_and(|x| x == "rs" || x == "toml");
        relevant
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > time)
    })
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_with_timeout(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `count` client processes, client-001.., each with its share of the
/// synthetic data.
fn spawn_clients(
    certs: &Path,
    port: u16,
    count: usize,
    max_attempts: u32,
    max_backoff: &str,
) -> Vec<Child> {
    (1..=count)
        .map(|i| {
            Command::new(client_bin())
                .args([
                    "--server",
                    &format!("127.0.0.1:{port}"),
                    "--server-name",
                    "localhost",
                    "--certs",
                ])
                // Exactly what the device receives: its own bundle.
                .arg(certs.join("clients").join(format!("client-{i:03}")))
                .args([
                    "--name",
                    &format!("client-{i:03}"),
                    "--data",
                    "synthetic:600/200",
                ])
                .args([
                    "--partition",
                    &format!("{i}/{count}"),
                    "--max-attempts",
                    &max_attempts.to_string(),
                ])
                .args(["--max-backoff", max_backoff])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn run_aggregator(dir: &Path, port: u16, extra: &[&str]) -> Child {
    Command::new(aggregator_bin())
        .args(["run", "--config"])
        .arg(dir.join("aggregator.toml"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--certs"])
        .arg(dir.join("certs"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn quickstart_with_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new(aggregator_bin())
        .args(["certs", "init", "--dir"])
        .arg(&certs)
        .args(["--clients", "3"])
        .output()
        .unwrap();
    assert_success(&out, "certs init");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(certs.join("clients/client-002/client-002.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "private keys are owner-only");
    }

    std::fs::write(
        dir.path().join("aggregator.toml"),
        r#"
[model]
spec = "mlp:784-16-10"
[rounds]
count = 2
fraction_fit = 1.0
min_fit_clients = 3
min_available_clients = 3
deadline_secs = 60
[fit]
epochs = 1
batch_size = 10
learning_rate = 0.1
[evaluate]
test_data = "synthetic:600/200"
"#,
    )
    .unwrap();
    let port = free_udp_port();
    let aggregator = run_aggregator(dir.path(), port, &[]);
    let clients = spawn_clients(&certs, port, 3, 40, "1");
    let agg_out = wait_with_timeout(aggregator, Duration::from_secs(120), "aggregator");
    assert_success(&agg_out, "aggregator");
    assert!(String::from_utf8_lossy(&agg_out.stdout).contains("run complete: 2 rounds"));
    for (i, c) in clients.into_iter().enumerate() {
        let out = wait_with_timeout(c, Duration::from_secs(30), "client");
        assert_success(&out, &format!("client {}", i + 1));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("2 fit tasks"),
            "client {} trained twice",
            i + 1
        );
    }

    let metrics = std::fs::read_to_string(dir.path().join("state/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["round"], i as u64 + 1);
        assert_eq!(l["clients_answered"], 3);
        assert!(l["test_accuracy"].as_f64().unwrap() > 0.0);
        assert!(l["bytes_up"].as_u64().unwrap() > 0);
    }
    for round in 1..=2 {
        assert!(
            dir.path()
                .join(format!("state/checkpoints/round-{round:06}.ckpt"))
                .exists()
        );
    }

    // What a user does with the result: export a checkpointed round as ONNX, then run
    // it on a device with `fedquic-client predict` on the same test data the
    // aggregator evaluated on; both must report the same accuracy.
    let onnx = dir.path().join("round-2.onnx");
    let out = Command::new(aggregator_bin())
        .args(["export", "--state-dir"])
        .arg(dir.path().join("state"))
        .args(["--round", "2", "--onnx"])
        .arg(&onnx)
        .output()
        .unwrap();
    assert_success(&out, "aggregator export");
    assert!(String::from_utf8_lossy(&out.stdout).contains("exported round 2"));
    let out = Command::new(client_bin())
        .args(["predict", "--model"])
        .arg(&onnx)
        .args(["--data", "synthetic:600/200", "--show", "3"])
        .output()
        .unwrap();
    assert_success(&out, "client predict");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("example ").count(), 3, "{stdout}");
    let predicted: f64 = stdout
        .split("accuracy ")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {stdout}"));
    let reported = 100.0 * lines[1]["test_accuracy"].as_f64().unwrap();
    // tract and our engine may round differently: at most one of 200 examples apart.
    assert!(
        (predicted - reported).abs() <= 0.51,
        "predict says {predicted}%, the aggregator reported {reported}%"
    );
    // A round that was never checkpointed, and a file that is not ONNX, are clear errors.
    let out = Command::new(aggregator_bin())
        .args(["export", "--state-dir"])
        .arg(dir.path().join("state"))
        .args(["--round", "7", "--onnx"])
        .arg(dir.path().join("nope.onnx"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains('7'), "{err}");
    assert!(!dir.path().join("nope.onnx").exists());
    let out = Command::new(client_bin())
        .args(["predict", "--model"])
        .arg(dir.path().join("aggregator.toml"))
        .args(["--data", "synthetic:600/200"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());

    // Resuming a finished run has nothing left to do, and says so.
    let resumed = wait_with_timeout(
        run_aggregator(dir.path(), free_udp_port(), &["--resume"]),
        Duration::from_secs(30),
        "resume",
    );
    assert_success(&resumed, "aggregator --resume");
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("run complete: 2 rounds"));

    // A second `certs init` must not overwrite the PKI.
    let again = Command::new(aggregator_bin())
        .args(["certs", "init", "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!again.status.success());
}

/// The daemon runs secure aggregation with distributed DP from its config
/// file, with client processes: each round's metrics show the SecAgg
/// phases and the epsilon spent.
#[test]
fn daemon_runs_secure_aggregation_and_dp_from_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new(aggregator_bin())
        .args(["certs", "init", "--dir"])
        .arg(&certs)
        .args(["--clients", "4"])
        .output()
        .unwrap();
    assert_success(&out, "certs init");
    std::fs::write(
        dir.path().join("aggregator.toml"),
        r#"
[model]
spec = "mlp:784-16-10"
[rounds]
count = 2
fraction_fit = 1.0
min_fit_clients = 4
min_available_clients = 4
deadline_secs = 60
[fit]
epochs = 1
batch_size = 10
learning_rate = 0.1
[evaluate]
test_data = "synthetic:600/200"
[secure_aggregation]
enabled = true
phase_timeout_secs = 20.0
[differential_privacy]
enabled = true
mode = "distributed"
clip_norm = 5.0
noise_multiplier = 0.01
population = 40
"#,
    )
    .unwrap();
    let port = free_udp_port();
    let aggregator = run_aggregator(dir.path(), port, &[]);
    let clients = spawn_clients(&certs, port, 4, 40, "1");
    let agg_out = wait_with_timeout(aggregator, Duration::from_secs(120), "aggregator");
    assert_success(&agg_out, "aggregator");
    for (i, c) in clients.into_iter().enumerate() {
        let out = wait_with_timeout(c, Duration::from_secs(30), "client");
        assert_success(&out, &format!("client {}", i + 1));
        assert!(String::from_utf8_lossy(&out.stdout).contains("2 fit tasks"));
    }
    let metrics = std::fs::read_to_string(dir.path().join("state/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let mut last = 0.0;
    for l in &lines {
        assert_eq!(l["secagg"]["masked"], 4, "{l}");
        assert_eq!(l["privacy"]["mode"], "distributed");
        let epsilon = l["privacy"]["epsilon"].as_f64().unwrap();
        assert!(epsilon > last, "{l}");
        last = epsilon;
        assert!(l["test_accuracy"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bad_arguments_get_clear_errors() {
    let out = Command::new(client_bin())
        .args(["--server", "127.0.0.1:1", "--data", "synthetic"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--certs DIR --name NAME"));
    let out = Command::new(client_bin())
        .args([
            "--server",
            "127.0.0.1:1",
            "--certs",
            "/nonexistent",
            "--name",
            "x",
            "--data",
            "mnist:/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mnist"), "{err}");

    // Timeouts: bounded, the handshake's within the attempt's; a short
    // --connect-timeout alone lowers the handshake default with it (the run
    // then stops at the missing certificates, past the timeout checks).
    for (args, expected) in [
        (
            &["--connect-timeout", "10", "--handshake-timeout", "20"][..],
            "must not exceed --connect-timeout",
        ),
        (&["--connect-timeout", "0"][..], "between 0.1 and 3600"),
        (&["--handshake-timeout", "nan"][..], "between 0.1 and 3600"),
        (&["--connect-timeout", "5"][..], "--certs DIR --name NAME"),
    ] {
        let out = Command::new(client_bin())
            .args(["--server", "127.0.0.1:1", "--data", "synthetic"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

#[test]
fn backend_flag_and_config_are_checked() {
    let base = ["--server", "127.0.0.1:1", "--data", "synthetic"];
    let out = Command::new(client_bin())
        .args(base)
        .args(["--backend", "tpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cpu") && err.contains("wgpu") && err.contains("auto"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("client.toml");
    std::fs::write(&config, "backend = \"tpu\"\n").unwrap();
    let out = Command::new(client_bin())
        .args(base)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown backend \"tpu\""), "{err}");

    std::fs::write(&config, "backends = \"cpu\"\n").unwrap();
    let out = Command::new(client_bin())
        .args(base)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client.toml"), "{err}");
}

fn metrics_rounds(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["round"].as_u64())
        .collect()
}

#[test]
fn sigkill_mid_run_then_resume_loses_no_completed_round() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    assert_success(
        &Command::new(aggregator_bin())
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .args(["--clients", "3"])
            .output()
            .unwrap(),
        "certs init",
    );
    const ROUNDS: u64 = 30;
    std::fs::write(
        dir.path().join("aggregator.toml"),
        format!(
            r#"
[model]
spec = "mlp:784-16-10"
[rounds]
count = {ROUNDS}
min_fit_clients = 3
min_available_clients = 3
deadline_secs = 30
[fit]
epochs = 2
[evaluate]
test_data = "synthetic:600/200"
# The default idle timeout (60 s) stays: clients learn of the crash from the
# restarted aggregator's stateless reset at their next keep-alive.
"#
        ),
    )
    .unwrap();
    let metrics = dir.path().join("state/metrics.jsonl");
    let port = free_udp_port();
    let mut aggregator = run_aggregator(dir.path(), port, &[]);
    let clients = spawn_clients(&certs, port, 3, 200, "0.5");

    // Let a few rounds complete, then kill the aggregator without warning.
    let start = Instant::now();
    while metrics_rounds(&metrics).len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no progress before the kill"
        );
        assert!(
            aggregator.try_wait().unwrap().is_none(),
            "aggregator exited early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    aggregator.kill().unwrap(); // SIGKILL on Unix
    aggregator.wait().unwrap();
    let before = metrics_rounds(&metrics);
    let last_before = *before.iter().max().unwrap();
    assert!(last_before < ROUNDS, "the kill must land mid-run");

    // Restart with --resume on the same address; the clients find it by themselves.
    let resumed = run_aggregator(dir.path(), port, &["--resume"]);
    // Well under the 60 s idle timeout: clients must learn of the crash from
    // the stateless reset, not by timing out.
    let out = wait_with_timeout(resumed, Duration::from_secs(45), "resumed aggregator");
    assert_success(&out, "resumed aggregator");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("run complete: {ROUNDS} rounds")),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    for c in clients {
        let out = wait_with_timeout(c, Duration::from_secs(30), "client");
        assert_success(&out, "client");
    }

    // metrics.jsonl agrees with the checkpoints: every round once, in order,
    // even if the kill landed between a checkpoint and its metrics line.
    let all = metrics_rounds(&metrics);
    assert_eq!(
        all,
        (1..=ROUNDS).collect::<Vec<_>>(),
        "one line per committed round, no gaps, no duplicates"
    );
    assert!(
        before.iter().all(|r| all.contains(r)),
        "no completed round is lost"
    );
}

#[test]
fn sigterm_stops_cleanly_state_dirs_are_never_mixed_and_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    assert_success(
        &Command::new(aggregator_bin())
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .args(["--clients", "2"])
            .output()
            .unwrap(),
        "certs init",
    );
    const ROUNDS: u64 = 12;
    std::fs::write(
        dir.path().join("aggregator.toml"),
        format!(
            r#"
[model]
spec = "mlp:784-16-10"
[rounds]
count = {ROUNDS}
min_fit_clients = 2
min_available_clients = 2
deadline_secs = 30
[fit]
epochs = 2
"#
        ),
    )
    .unwrap();
    let metrics = dir.path().join("state/metrics.jsonl");
    let port = free_udp_port();
    let aggregator = run_aggregator(dir.path(), port, &[]);
    let clients = spawn_clients(&certs, port, 2, 200, "0.5");
    let start = Instant::now();
    while metrics_rounds(&metrics).len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    // systemd and Kubernetes stop services with SIGTERM.
    let term = Command::new("kill")
        .args(["-TERM", &aggregator.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = wait_with_timeout(
        aggregator,
        Duration::from_secs(20),
        "aggregator after SIGTERM",
    );
    assert_success(&out, "aggregator after SIGTERM");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("stopped after"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGTERM"));
    let done = metrics_rounds(&metrics);
    assert!((done.len() as u64) < ROUNDS);

    // A new run in the same state directory is refused: it would mix with
    // this one.
    let refused = wait_with_timeout(
        run_aggregator(dir.path(), free_udp_port(), &[]),
        Duration::from_secs(20),
        "second run",
    );
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--resume") && err.contains("--fresh"), "{err}");

    // The clients were told to come back (not that the run was over): they
    // rejoin the resumed run, which finishes it.
    let resumed = run_aggregator(dir.path(), port, &["--resume"]);
    let out = wait_with_timeout(resumed, Duration::from_secs(60), "resumed aggregator");
    assert_success(&out, "resumed aggregator");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("run complete: {ROUNDS} rounds"))
    );
    for c in clients {
        let out = wait_with_timeout(c, Duration::from_secs(30), "client");
        assert_success(&out, "client");
    }
    assert_eq!(metrics_rounds(&metrics), (1..=ROUNDS).collect::<Vec<_>>());

    // --fresh archives the finished run (nothing is deleted) and starts anew.
    let fresh = run_aggregator(dir.path(), free_udp_port(), &["--fresh"]);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-TERM", &fresh.id().to_string()])
        .status();
    let out = wait_with_timeout(fresh, Duration::from_secs(20), "fresh aggregator");
    assert_success(&out, "fresh aggregator");
    let archive = dir.path().join("state/archive");
    let archived: Vec<_> = std::fs::read_dir(&archive).unwrap().collect();
    assert_eq!(archived.len(), 1);
    let old = archived[0].as_ref().unwrap().path();
    assert_eq!(
        metrics_rounds(&old.join("metrics.jsonl")).len() as u64,
        ROUNDS
    );
    assert!(old.join("checkpoints").read_dir().unwrap().count() > 0);
    assert!(metrics_rounds(&metrics).is_empty());
}

/// `--version` says which CPU kernels training runs on, and honours
/// FEDQUIC_KERNEL.
#[test]
fn version_names_the_kernel_path() {
    let out = Command::new(client_bin())
        .arg("--version")
        .env("FEDQUIC_KERNEL", "portable")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    assert!(
        text.contains("CPU kernels: portable (FEDQUIC_KERNEL=portable; best on this CPU:"),
        "{text}"
    );
}
