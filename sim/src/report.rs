//! Simulation outputs: the per-round table, `rounds.csv`, `results.json` and
//! the PNG plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use fedquic_aggregator::plot::{self, PlotReport, Series};
use fedquic_aggregator::server::RoundRecord;

use crate::faults::FaultEvent;
use crate::simulate::SimResult;

pub const TABLE_HEADER: &str =
    "round  clients  train loss  test loss  test acc  MB down   MB up  seconds";

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

pub fn table_row(r: &RoundRecord) -> String {
    let o = &r.outcome;
    format!(
        "{:>5}  {:>7}  {:>10}  {:>9}  {:>8}  {:>7.2}  {:>6.2}  {:>7.2}",
        o.round,
        format!("{}/{}", o.clients_answered, o.clients_selected),
        opt(o.client_reported_train_loss, 4),
        opt(r.test_loss, 4),
        opt(r.test_accuracy.map(|a| a * 100.0), 2),
        r.bytes_down as f64 / 1e6,
        r.bytes_up as f64 / 1e6,
        r.seconds,
    )
}

/// The faults of one round: counts and `;`-separated client ids per kind.
fn fault_columns(round: u64, faults: &[FaultEvent]) -> String {
    let mut cols = Vec::new();
    let mut ids = Vec::new();
    for kind in ["dropout", "straggler", "byzantine"] {
        let who: Vec<String> = faults
            .iter()
            .filter(|f| f.round == round && f.fault == kind)
            .map(|f| f.client.to_string())
            .collect();
        cols.push(who.len().to_string());
        ids.push(who.join(";"));
    }
    cols.extend(ids);
    cols.join(",")
}

/// `round,client,fault,detail`: one line per injected fault.
pub fn faults_csv(faults: &[FaultEvent]) -> String {
    let mut out = String::from("round,client,fault,detail\n");
    for f in faults {
        let _ = writeln!(out, "{},{},{},{}", f.round, f.client, f.fault, f.detail);
    }
    out
}

pub fn rounds_csv(records: &[RoundRecord], faults: &[FaultEvent]) -> String {
    let mut out = String::from(
        "round,attempts,clients_selected,clients_answered,clients_dropped,updates_rejected,examples,weight_used,updates_clipped,client_reported_train_loss,client_reported_train_accuracy,test_loss,test_accuracy,federated_loss,federated_accuracy,bytes_down,bytes_up,seconds,elapsed_seconds,faults_dropout,faults_straggler,faults_byzantine,dropout_clients,straggler_clients,byzantine_clients,epsilon,delta,dp_clip_norm,dp_noise_std,secagg_masked\n",
    );
    let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for r in records {
        let o = &r.outcome;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.6},{:.6},{},{},{},{},{},{}",
            o.round,
            o.attempts,
            o.clients_selected,
            o.clients_answered,
            o.clients_dropped,
            o.updates_rejected,
            o.examples,
            o.weight_used,
            o.updates_clipped,
            f(o.client_reported_train_loss),
            f(o.client_reported_train_accuracy),
            f(r.test_loss),
            f(r.test_accuracy),
            f(o.federated_eval.as_ref().map(|e| e.loss)),
            f(o.federated_eval.as_ref().map(|e| e.accuracy)),
            r.bytes_down,
            r.bytes_up,
            r.seconds,
            r.elapsed_seconds,
            fault_columns(o.round, faults),
            f(o.privacy.as_ref().map(|p| p.epsilon)),
            f(o.privacy.as_ref().map(|p| p.delta)),
            f(o.privacy.as_ref().map(|p| p.clip_norm)),
            f(o.privacy.as_ref().map(|p| p.noise_std)),
            o.secagg
                .as_ref()
                .map(|s| s.masked.to_string())
                .unwrap_or_default(),
        );
    }
    out
}

/// Writes the tables and the plots (see [`fedquic_aggregator::plot`]) into `dir`;
/// returns what the plotting did, for the caller to print.
pub fn write_outputs(dir: &Path, result: &SimResult) -> anyhow::Result<PlotReport> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let csv = dir.join("rounds.csv");
    std::fs::write(&csv, rounds_csv(&result.rounds, &result.faults))
        .with_context(|| format!("writing {}", csv.display()))?;
    let faults = dir.join("faults.csv");
    std::fs::write(&faults, faults_csv(&result.faults))
        .with_context(|| format!("writing {}", faults.display()))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(result)?;
    std::fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
    Ok(plot::write_plots(
        &Series::from_records(&result.rounds),
        dir,
    )?)
}
