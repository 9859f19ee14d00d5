//! Time for the engine: real for `kiln run`, virtual in tests, so a one-hour Wait or a long
//! backoff costs no real time.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    fn sleep(&self, d: Duration) -> BoxFuture<'_, ()>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealClock;

impl Clock for RealClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that jumps: sleeping advances it at once.
#[derive(Debug)]
pub struct VirtualClock {
    now: Mutex<DateTime<Utc>>,
}

impl VirtualClock {
    pub fn starting_at(t: DateTime<Utc>) -> Self {
        VirtualClock { now: Mutex::new(t) }
    }
}

impl Default for VirtualClock {
    fn default() -> Self {
        VirtualClock::starting_at(Utc::now())
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> DateTime<Utc> {
        *self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'_, ()> {
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *now += chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        Box::pin(async {})
    }
}

/// Tokio's clock, read as wall time from `start`: virtual when the runtime's time is paused (it
/// then jumps to the next timer whenever every task waits, so concurrent branches wait side by
/// side, as in AWS), real otherwise. Make it inside the runtime.
#[derive(Debug)]
pub struct TokioClock {
    start: DateTime<Utc>,
    origin: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        TokioClock {
            start,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now() - self.origin;
        self.start + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}
