//! Logging what clients send without letting them forge or flood the log:
//! their strings are escaped and truncated, and each client gets a budget of
//! log lines per minute.

use std::time::{Duration, Instant};

/// Longest client-supplied string that reaches a log line, in characters.
pub const MAX_LOGGED_CHARS: usize = 200;

/// `text` with control characters, newlines and quotes escaped, cut to
/// `max_chars` characters (marked with `...`): safe to put in one log line.
pub fn sanitize(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 2));
    for (i, c) in text.chars().enumerate() {
        if i == max_chars {
            out.push_str("...");
            break;
        }
        if c == '=' {
            out.push_str("\\=");
        } else if c.is_control() || c == '"' || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A token bucket of log lines: `per_minute` lines, refilled continuously.
#[derive(Debug)]
pub struct LogBudget {
    per_minute: f64,
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl LogBudget {
    pub fn new(per_minute: u32, now: Instant) -> Self {
        LogBudget {
            per_minute: per_minute.max(1) as f64,
            tokens: per_minute.max(1) as f64,
            last: now,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now. When it may, returns how many lines
    /// were suppressed since the last one (to say so in that line).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens =
            (self.tokens + elapsed.as_secs_f64() * self.per_minute / 60.0).min(self.per_minute);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// How long the bucket takes to earn one line back.
pub fn refill_interval(per_minute: u32) -> Duration {
    Duration::from_secs_f64(60.0 / per_minute.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_log_lines_are_escaped_and_truncated() {
        let forged = "oops\n2026-01-01T00:00:00Z  INFO client connected client=admin";
        let clean = sanitize(forged, MAX_LOGGED_CHARS);
        assert!(!clean.contains('\n'));
        assert!(clean.contains("\\n"));
        assert!(clean.contains("client\\=admin"));
        let long = "x".repeat(70_000);
        assert_eq!(sanitize(&long, 10), "xxxxxxxxxx...");
        assert_eq!(sanitize("plain reason", 100), "plain reason");
    }

    #[test]
    fn budget_allows_a_burst_then_refills() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(3, t0);
        assert_eq!(b.allow(t0), Some(0));
        assert_eq!(b.allow(t0), Some(0));
        assert_eq!(b.allow(t0), Some(0));
        assert_eq!(b.allow(t0), None);
        assert_eq!(b.allow(t0), None);
        assert_eq!(b.allow(t0 + refill_interval(3)), Some(2));
        assert_eq!(b.allow(t0 + refill_interval(3)), None);
    }
}
