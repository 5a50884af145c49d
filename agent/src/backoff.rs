//! Reconnect delays: full-jitter exponential backoff, so a fleet that lost its gateway at the
//! same moment does not come back at the same moment.

use std::time::Duration;

use rand::Rng;

/// A connection that replaced one told to go away, lost sooner than this, is the handover
/// failing: the agent reconnects at once rather than leave its callers with no node for a
/// backoff delay. Longer-lived connections back off as usual.
pub(crate) const HANDOVER_GRACE: Duration = Duration::from_secs(5);

/// First backoff ceiling; doubles per failed attempt up to the configured cap.
pub(crate) const BASE: Duration = Duration::from_millis(500);

/// Delay generator. `next_delay` is uniform in `[0, min(cap, BASE * 2^attempt)]`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(cap: Duration) -> Self {
        Backoff {
            cap: cap.max(Duration::from_millis(1)),
            attempt: 0,
        }
    }

    /// Back to the first step; called after a `Welcome`.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Upper bound of the next delay.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        BASE.saturating_mul(factor).min(self.cap)
    }

    /// The configured cap, used directly after a final refusal.
    pub(crate) fn cap(&self) -> Duration {
        self.cap
    }

    /// The delay after losing a connection that lived `lived`. `replaced_go_away` says it was
    /// the replacement dialled after a `GoAway`: while the old connection is still retiring,
    /// every moment without a new one is a moment no node can reach the agent, so such a loss
    /// within [`HANDOVER_GRACE`] retries at once. Only the replacement gets that: its own
    /// replacement backs off, so a node that keeps dropping new connections costs one quick retry.
    pub(crate) fn after_loss(&mut self, lived: Duration, replaced_go_away: bool) -> Duration {
        if replaced_go_away && lived < HANDOVER_GRACE {
            Duration::ZERO
        } else {
            self.next_delay()
        }
    }

    /// A random delay below the current ceiling; moves one step up.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_from_base_up_to_cap() {
        let mut b = Backoff::new(Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay();
        }
        assert_eq!(
            ceilings,
            vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn delays_stay_within_bounds_and_vary() {
        let cap = Duration::from_secs(4);
        let mut b = Backoff::new(cap);
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d <= ceiling && d <= cap, "attempt {i}: {d:?} > {ceiling:?}");
            seen.insert(d.as_millis());
        }
        assert!(seen.len() > 100, "full jitter should spread delays");
    }

    #[test]
    fn a_handover_replacement_lost_early_retries_at_once_and_only_that() {
        let mut b = Backoff::new(Duration::from_secs(30));
        assert_eq!(b.after_loss(Duration::from_millis(3), true), Duration::ZERO);
        assert_eq!(b.ceiling(), BASE, "a quick retry takes no backoff step");
        // Lived past the grace: an ordinary loss, jittered like any other.
        b.after_loss(HANDOVER_GRACE, true);
        assert_eq!(b.ceiling(), BASE * 2);
        b.after_loss(Duration::from_millis(3), false);
        assert_eq!(b.ceiling(), BASE * 4);
    }

    #[test]
    fn reset_returns_to_base_and_many_attempts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(30));
        for _ in 0..1000 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.ceiling(), BASE);
    }
}
