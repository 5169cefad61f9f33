//! `fedquic-sim sweep` as a user runs it: a small grid with seeds, the
//! ranked table and best command line, and a resumed sweep that reruns
//! nothing.

use std::process::Command;

#[test]
fn a_grid_sweep_ranks_its_configurations_and_resumes_without_rerunning() {
    let out = tempfile::tempdir().unwrap();
    let sweep = || {
        Command::new(env!("CARGO_BIN_EXE_fedquic-sim"))
            .args(["sweep", "--grid", "lr=0.02,0.2", "--seeds", "2", "--out"])
            .arg(out.path())
            .args([
                "--",
                "--clients",
                "4",
                "--rounds",
                "2",
                "--model",
                "mlp:784-16-10",
                "--data",
                "synthetic:400/100",
            ])
            .output()
            .unwrap()
    };
    let first = sweep();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let table = std::fs::read_to_string(out.path().join("sweep.md")).unwrap();
    assert_eq!(
        table.lines().count(),
        4,
        "header, rule, two configurations:\n{table}"
    );
    assert!(table.contains("lr=0.02") && table.contains("lr=0.2"));
    assert!(table.contains(" ± "), "{table}");
    let plot = std::fs::read(out.path().join("sweep.png")).unwrap();
    assert_eq!(
        &plot[..8],
        b"\x89PNG\r\n\x1a\n",
        "the comparison plot is a PNG"
    );
    let best = std::fs::read_to_string(out.path().join("best.txt")).unwrap();
    assert!(best.contains("fedquic-sim --clients 4"), "{best}");
    let csv = std::fs::read_to_string(out.path().join("sweep.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        5,
        "header + 2 configurations x 2 seeds"
    );
    // The recorded command reproduces the run.
    let command = std::fs::read_to_string(out.path().join("lr=0.2/seed1/command.txt")).unwrap();
    assert!(
        command.contains("--lr 0.2") && command.contains("--seed 1"),
        "{command}"
    );
    let stamp = std::fs::metadata(out.path().join("lr=0.2/seed1/results.json"))
        .unwrap()
        .modified()
        .unwrap();
    let again = sweep();
    assert!(again.status.success());
    assert_eq!(
        std::fs::metadata(out.path().join("lr=0.2/seed1/results.json"))
            .unwrap()
            .modified()
            .unwrap(),
        stamp,
        "a finished run is not run again"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("sweep.md")).unwrap(),
        table
    );
    // A key the sweep owns is refused.
    let bad = Command::new(env!("CARGO_BIN_EXE_fedquic-sim"))
        .args(["sweep", "--grid", "seed=1,2", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--seed"));
}
