//! Receive windows that grow for streams whose reader keeps up. The gateway uses them for what
//! agents send to its callers; the agent's own receive windows stay fixed (growing them halved
//! eight parallel uploads on one node, docs/benchmarks.md, eleventh round).
//!
//! A stream moves at most one window per round trip of its credit, so a fixed window caps one
//! download at `window / RTT`: 1 MiB over a 50 ms link is 20 MiB/s, whatever the link can do.
//! A bigger window for every stream would raise what a slow reader can make the receiver buffer.
//! So each stream starts at the configured window and doubles it, up to [`GROWTH`] times, each
//! time a quarter window was consumed with nothing left waiting for the reader (the reader keeps
//! up, so the window is what holds the stream back). The bytes a window grows by are lent from
//! one pool per process, so all grown windows together never hold more than the pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How many times its configured window a stream's window may grow to. Agents clamp the credit
/// they hold to four windows, so a larger factor would be credit they drop.
pub const GROWTH: u32 = 4;

/// One process's budget for grown windows.
pub struct WindowPool {
    size: u64,
    free: AtomicU64,
    grown: AtomicU64,
}

impl WindowPool {
    /// A pool of `bytes` (0 turns growth off).
    pub fn new(bytes: u64) -> Self {
        WindowPool {
            size: bytes,
            free: AtomicU64::new(bytes),
            grown: AtomicU64::new(0),
        }
    }

    /// Lends `n` bytes if the pool still has them.
    fn take(&self, n: u64) -> bool {
        let ok = self
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| f.checked_sub(n))
            .is_ok();
        if ok {
            self.grown.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn give(&self, n: u64) {
        if n > 0 {
            self.free.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Bytes lent to windows now.
    pub fn lent(&self) -> u64 {
        self.size - self.free.load(Ordering::Acquire)
    }

    /// Times a window grew, since start.
    pub fn grown(&self) -> u64 {
        self.grown.load(Ordering::Relaxed)
    }
}

/// One stream's receive window: how big it is now, and what it borrowed to get there.
pub struct Window {
    pool: Arc<WindowPool>,
    size: u32,
    max: u32,
    borrowed: u64,
}

impl Window {
    /// Starts at `initial` bytes.
    pub fn new(pool: Arc<WindowPool>, initial: u32) -> Self {
        Window {
            pool,
            size: initial,
            max: initial.saturating_mul(GROWTH),
            borrowed: 0,
        }
    }

    /// The window now.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Called as a batch of credit goes back. If the reader kept up, doubles the window (within
    /// the pool) and returns the bytes to grant on top of the batch; otherwise 0.
    pub fn grow_if(&mut self, caught_up: bool) -> u32 {
        if !caught_up || self.size >= self.max {
            return 0;
        }
        let by = (self.max - self.size).min(self.size);
        if !self.pool.take(u64::from(by)) {
            return 0;
        }
        self.borrowed += u64::from(by);
        self.size += by;
        by
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.pool.give(self.borrowed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(bytes: u64) -> Arc<WindowPool> {
        Arc::new(WindowPool::new(bytes))
    }

    #[test]
    fn a_window_doubles_while_its_reader_keeps_up_and_stops_at_four_times() {
        let p = pool(u64::MAX / 2);
        let mut w = Window::new(p.clone(), 1000);
        assert_eq!(
            w.grow_if(false),
            0,
            "a reader with bytes waiting does not grow its window"
        );
        assert_eq!(w.grow_if(true), 1000);
        assert_eq!(w.grow_if(true), 2000);
        assert_eq!(w.size(), 4000);
        assert_eq!(w.grow_if(true), 0, "capped at four times the configured window");
        assert_eq!(p.lent(), 3000);
        drop(w);
        assert_eq!(p.lent(), 0);
        assert_eq!(p.grown(), 2);
    }

    #[test]
    fn the_pool_bounds_all_grown_windows_and_gets_them_back() {
        let p = pool(1500);
        let mut a = Window::new(p.clone(), 1000);
        let mut b = Window::new(p.clone(), 1000);
        assert_eq!(a.grow_if(true), 1000);
        assert_eq!(b.grow_if(true), 0, "only 500 bytes left in the pool");
        assert_eq!(b.size(), 1000);
        assert_eq!(p.lent(), 1000);
        drop(a);
        assert_eq!(p.lent(), 0);
        assert_eq!(b.grow_if(true), 1000);
    }

    #[test]
    fn an_empty_pool_turns_growth_off() {
        let p = pool(0);
        let mut w = Window::new(p, 1 << 20);
        assert_eq!(w.grow_if(true), 0);
        assert_eq!(w.size(), 1 << 20);
    }
}
