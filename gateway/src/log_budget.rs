//! A budget of log lines: a flood of failures (connections refused at the door, requests
//! answered 5xx) must not become a flood of log lines that fills the operator's disk. Each
//! window allows a burst of lines; past it, lines are counted, and the next line logged says how
//! many were left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines allowed per window, shared by every task that logs the same kind of line.
#[derive(Debug)]
pub struct LogBudget {
    window: Duration,
    burst: u32,
    spent: Mutex<Spent>,
}

#[derive(Debug)]
struct Spent {
    since: Option<Instant>,
    lines: u32,
    left_out: u64,
}

impl LogBudget {
    /// `burst` lines per `window`.
    pub const fn new(window: Duration, burst: u32) -> Self {
        Self {
            window,
            burst,
            spent: Mutex::new(Spent {
                since: None,
                lines: 0,
                left_out: 0,
            }),
        }
    }

    /// Whether one more line may be logged now: `Some(n)` with the lines left out since the
    /// last one logged, `None` when this one is to be left out (and counted).
    pub fn take(&self) -> Option<u64> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Option<u64> {
        // A panic elsewhere while holding the lock leaves counters that are still consistent.
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        if spent
            .since
            .is_none_or(|since| now.duration_since(since) >= self.window)
        {
            spent.since = Some(now);
            spent.lines = 0;
        }
        if spent.lines < self.burst {
            spent.lines += 1;
            Some(std::mem::take(&mut spent.left_out))
        } else {
            spent.left_out += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_left_out() {
        let budget = LogBudget::new(Duration::from_secs(1), 2);
        let start = Instant::now();
        assert_eq!(budget.take_at(start), Some(0));
        assert_eq!(budget.take_at(start), Some(0));
        for _ in 0..5 {
            assert_eq!(budget.take_at(start + Duration::from_millis(500)), None);
        }
        let next = start + Duration::from_secs(1);
        assert_eq!(
            budget.take_at(next),
            Some(5),
            "the next line says 5 were left out"
        );
        assert_eq!(budget.take_at(next), Some(0));
        assert_eq!(budget.take_at(next), None);
    }
}
