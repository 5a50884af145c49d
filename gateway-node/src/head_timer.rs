//! The timer behind the ingress's `--caller-timeout`, for hyper's HTTP/1 server (and, as
//! [`LazySleep`], behind the carried relay's head deadlines).
//!
//! hyper makes a fresh sleep for every request head it waits for, and drops it once the head
//! is in. With `hyper_util`'s `TokioTimer` that puts each request through tokio's timer wheel
//! twice: a registration and a removal, both under the time driver's lock. That cost about 5% of
//! the gateway's CPU per small keep-alive request (docs/benchmarks.md, twenty-second round).
//!
//! [`HeadTimer`] keeps one tokio sleep per connection instead and arms it lazily. A new head's
//! deadline only replaces a number. The sleep fires at the deadline it was armed for, which is
//! never later than the current one, and is re-armed then if the current deadline is still
//! ahead. Under keep-alive load that is one re-arm per timeout period, not two wheel
//! operations per request. A head still times out at exactly its own deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};
use parking_lot::Mutex;

/// One tokio sleep that waits for successive deadlines of one connection, moved only when it
/// fires early (the deadline waited for is later than the one it was armed for) or a nearer
/// deadline comes. Shared by [`HeadTimer`] and the carried relay's head deadlines.
pub struct LazySleep {
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl LazySleep {
    /// A sleep first armed for `deadline`.
    pub fn new(deadline: tokio::time::Instant) -> Self {
        LazySleep {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Ready once `deadline` has passed.
    pub fn poll_until(&mut self, deadline: tokio::time::Instant, cx: &mut Context<'_>) -> Poll<()> {
        // Armed for later than this deadline (a shorter timeout than before): too late.
        if self.sleep.deadline() > deadline {
            self.sleep.as_mut().reset(deadline);
        }
        loop {
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if tokio::time::Instant::now() >= deadline => return Poll::Ready(()),
                // It fired for an earlier deadline: wait on for this one.
                Poll::Ready(()) => self.sleep.as_mut().reset(deadline),
            }
        }
    }

    /// Resolves once `deadline` has passed.
    pub async fn wait(&mut self, deadline: tokio::time::Instant) {
        std::future::poll_fn(|cx| self.poll_until(deadline, cx)).await
    }
}

/// One caller connection's header-read timer. hyper's HTTP/1 server waits for one head at a
/// time, so all its sleeps share one [`LazySleep`] (and one waker).
#[derive(Clone, Default)]
pub struct HeadTimer {
    armed: Arc<Mutex<Option<LazySleep>>>,
}

impl HeadTimer {
    /// A timer for one connection.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(HeadDeadline {
            deadline,
            armed: self.armed.clone(),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadDeadline>() {
            Some(mine) => mine.get_mut().deadline = new_deadline,
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    /// tokio's clock, so tests with paused time see the same time as the sleep.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// What hyper holds while it waits for one head: a deadline, and the connection's shared sleep.
struct HeadDeadline {
    deadline: Instant,
    armed: Arc<Mutex<Option<LazySleep>>>,
}

impl Sleep for HeadDeadline {}

impl Future for HeadDeadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let mut armed = self.armed.lock();
        armed
            .get_or_insert_with(|| LazySleep::new(deadline))
            .poll_until(deadline, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// True when `sleep` completes within `within` (paused time moves on by itself).
    async fn fires_within(sleep: &mut Pin<Box<dyn Sleep>>, within: Duration) -> bool {
        tokio::time::timeout(within, sleep.as_mut()).await.is_ok()
    }

    /// Asserts that `sleep` fires `after` from now, to the millisecond.
    async fn assert_fires_in(sleep: &mut Pin<Box<dyn Sleep>>, after: Duration) {
        assert!(!fires_within(sleep, after - ms(1)).await, "fired early");
        assert!(fires_within(sleep, ms(2)).await, "did not fire on time");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_times_out_at_its_deadline_not_before() {
        let timer = HeadTimer::new();
        let mut s = timer.sleep(T);
        assert_fires_in(&mut s, T).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_head_is_not_cut_short_by_the_sleep_armed_for_an_earlier_one() {
        let timer = HeadTimer::new();
        let mut first = timer.sleep(T);
        assert!(!fires_within(&mut first, ms(1000)).await);
        // The first head came in at 1 s; the next one starts waiting at 3 s.
        drop(first);
        tokio::time::advance(ms(2000)).await;
        let mut next = timer.sleep(T);
        // The shared sleep, armed for 5 s, fires on the way; this head's deadline is 8 s.
        assert_fires_in(&mut next, T).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_deadline_than_the_armed_one_fires_on_time() {
        let timer = HeadTimer::new();
        let mut long = timer.sleep(T * 4);
        assert!(!fires_within(&mut long, ms(10)).await);
        drop(long);
        let mut short = timer.sleep(ms(500));
        assert_fires_in(&mut short, ms(500)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn reset_moves_the_deadline_of_a_sleep_in_place() {
        let timer = HeadTimer::new();
        let mut s = timer.sleep(T);
        assert!(!fires_within(&mut s, ms(1000)).await);
        let later = timer.now() + T;
        timer.reset(&mut s, later);
        assert_fires_in(&mut s, T).await;
    }

    /// Each wait ends exactly at its own deadline: a later one after an earlier one (the sleep
    /// fires early and is moved), and a nearer one after a later one (moved at once).
    #[tokio::test(start_paused = true)]
    async fn each_wait_ends_at_its_own_deadline() {
        let mut timer = LazySleep::new(tokio::time::Instant::now());
        let t0 = tokio::time::Instant::now();
        for (after, wait) in [(5, 5), (30, 30), (5, 5), (1, 1)] {
            let start = tokio::time::Instant::now();
            timer.wait(start + Duration::from_secs(after)).await;
            assert_eq!(
                tokio::time::Instant::now() - start,
                Duration::from_secs(wait),
                "after {after} s"
            );
        }
        assert_eq!(tokio::time::Instant::now() - t0, Duration::from_secs(41));
        // A wait given up (the read won) leaves the timer usable for a later, longer one.
        let start = tokio::time::Instant::now();
        let cut = tokio::time::timeout(Duration::from_secs(2), timer.wait(start + Duration::from_secs(5))).await;
        assert!(cut.is_err());
        let start = tokio::time::Instant::now();
        timer.wait(start + Duration::from_secs(10)).await;
        assert_eq!(tokio::time::Instant::now() - start, Duration::from_secs(10));
        // A nearer deadline after a longer wait was given up moves the sleep nearer.
        let cut = tokio::time::timeout(
            Duration::from_secs(1),
            timer.wait(tokio::time::Instant::now() + Duration::from_secs(30)),
        )
        .await;
        assert!(cut.is_err());
        let start = tokio::time::Instant::now();
        timer.wait(start + Duration::from_secs(5)).await;
        assert_eq!(tokio::time::Instant::now() - start, Duration::from_secs(5));
    }
}
