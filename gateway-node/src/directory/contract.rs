//! The [`Directory`] contract as one suite, run against every implementation, so the single-node
//! and the cluster directory cannot drift apart. Each case takes a fresh, empty directory.
//!
//! Waits use short TTLs (50-200 ms) and poll for expiry against a deadline rather than sleeping a
//! fixed time, so a loaded machine makes the suite slower, not flaky.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use strait_schema::AgentName;

use super::{Directory, Presence};

/// One contract case. Boxed so a harness can take any case as a plain `fn`.
pub(crate) type Case = for<'a> fn(&'a dyn Directory) -> BoxFuture<'a, ()>;

/// Generates one `#[tokio::test]` per contract case, each run through `$harness`, an async fn
/// taking a [`Case`] that builds the directory, runs the case and cleans up.
macro_rules! directory_contract_tests {
    ($harness:path) => {
        $crate::directory::contract::directory_contract_tests!(@cases $harness;
            nonce_is_refused_within_its_window_and_accepted_after,
            epochs_grow_with_every_claim_and_across_expiry,
            stale_epoch_cannot_refresh_or_release_the_newer_presence,
            presence_expires_unless_refreshed_and_heartbeats_restore_it,
            node_liveness_follows_heartbeats,
            nodes_list_their_features_with_each_heartbeat,
            pin_is_taken_once_and_guarded_by_its_holder,
            pin_expires_unless_renewed,
            offsets_only_move_forward,
        );
    };
    (@cases $harness:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                $harness($crate::directory::contract::$case).await;
            }
        )*
    };
}
pub(crate) use directory_contract_tests;

const EXPIRY_DEADLINE: Duration = Duration::from_secs(3);

/// Polls `check` until it holds, panicking with `what` after [`EXPIRY_DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + EXPIRY_DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {EXPIRY_DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn agent(name: &str) -> AgentName {
    AgentName::new(name).unwrap()
}

pub(crate) fn nonce_is_refused_within_its_window_and_accepted_after(d: &dyn Directory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let ttl = Duration::from_millis(100);
        assert!(d.remember_nonce("alpha:n1", ttl).await.unwrap());
        assert!(
            !d.remember_nonce("alpha:n1", ttl).await.unwrap(),
            "replay within the window"
        );
        assert!(d.remember_nonce("alpha:n2", ttl).await.unwrap(), "another nonce is new");
        assert!(
            d.remember_nonce("beta:n1", ttl).await.unwrap(),
            "same nonce, other agent"
        );
        // The poll keeps replaying: were a refused replay to extend the window, this would never pass.
        eventually("nonce accepted again after its window", || async {
            d.remember_nonce("alpha:n1", ttl).await.unwrap()
        })
        .await;
        assert!(
            !d.remember_nonce("alpha:n1", ttl).await.unwrap(),
            "re-remembered for a new window"
        );
    })
}

pub(crate) fn epochs_grow_with_every_claim_and_across_expiry(d: &dyn Directory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let a = agent("alpha");
        let long = Duration::from_secs(5);
        let e1 = d.claim_presence(&a, "n1", "i1", long).await.unwrap();
        let e2 = d.claim_presence(&a, "n1", "i1", long).await.unwrap();
        assert!(e2 > e1, "{e2} > {e1}");
        let p = d.presence(&a).await.unwrap().unwrap();
        assert_eq!((p.node_id.as_str(), p.instance_id.as_str(), p.epoch), ("n1", "i1", e2));

        let e3 = d
            .claim_presence(&a, "n2", "i2", Duration::from_millis(50))
            .await
            .unwrap();
        assert!(e3 > e2, "{e3} > {e2}");
        eventually("presence expired", || async { d.presence(&a).await.unwrap().is_none() }).await;
        let e4 = d.claim_presence(&a, "n3", "i3", long).await.unwrap();
        assert!(e4 > e3, "epoch after expiry {e4} > {e3}");
        let p = d.presence(&a).await.unwrap().unwrap();
        assert_eq!((p.node_id.as_str(), p.instance_id.as_str(), p.epoch), ("n3", "i3", e4));

        // Another agent's presence is independent.
        let b = agent("beta");
        assert!(d.presence(&b).await.unwrap().is_none());
        let eb = d.claim_presence(&b, "n1", "i9", long).await.unwrap();
        assert_eq!(d.presence(&b).await.unwrap().unwrap().epoch, eb);
        assert_eq!(d.presence(&a).await.unwrap().unwrap().epoch, e4);
    })
}

fn holder(node: &str, instance: &str, epoch: u64) -> Presence {
    Presence {
        node_id: node.into(),
        instance_id: instance.into(),
        epoch,
    }
}

pub(crate) fn stale_epoch_cannot_refresh_or_release_the_newer_presence(d: &dyn Directory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let a = agent("alpha");
        let ttl = Duration::from_secs(5);
        let old = d.claim_presence(&a, "n1", "i1", ttl).await.unwrap();
        let new = d.claim_presence(&a, "n2", "i2", ttl).await.unwrap();
        assert!(
            !d.refresh_presence(&a, &holder("n1", "i1", old), ttl).await.unwrap(),
            "stale epoch refreshed"
        );
        d.release_presence(&a, old).await.unwrap();
        let p = d.presence(&a).await.unwrap().unwrap();
        assert_eq!(
            (p.node_id.as_str(), p.epoch),
            ("n2", new),
            "stale release removed the newer entry"
        );
        assert!(
            !d.refresh_presence(&a, &holder("n3", "i3", new + 1), ttl).await.unwrap(),
            "future epoch refreshed"
        );
        assert!(d.refresh_presence(&a, &holder("n2", "i2", new), ttl).await.unwrap());

        // Once the entry is gone, only the newest holder may bring it back; the stale one may not.
        d.release_presence(&a, new).await.unwrap();
        assert!(d.presence(&a).await.unwrap().is_none());
        assert!(
            !d.refresh_presence(&a, &holder("n1", "i1", old), ttl).await.unwrap(),
            "stale holder restored itself"
        );
        assert!(d.presence(&a).await.unwrap().is_none());
        // Releasing what is not there is not an error.
        d.release_presence(&a, new).await.unwrap();
        d.release_presence(&agent("nobody"), 1).await.unwrap();
    })
}

pub(crate) fn presence_expires_unless_refreshed_and_heartbeats_restore_it(d: &dyn Directory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let a = agent("alpha");
        let e = d
            .claim_presence(&a, "n1", "i1", Duration::from_millis(100))
            .await
            .unwrap();
        assert!(d
            .refresh_presence(&a, &holder("n1", "i1", e), Duration::from_secs(5))
            .await
            .unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            d.presence(&a).await.unwrap().map(|p| p.epoch),
            Some(e),
            "refresh did not extend"
        );

        assert!(d
            .refresh_presence(&a, &holder("n1", "i1", e), Duration::from_millis(50))
            .await
            .unwrap());
        eventually("presence expired", || async { d.presence(&a).await.unwrap().is_none() }).await;
        // The holder's next heartbeat re-creates it (as after a Redis restart), same epoch.
        assert!(d
            .refresh_presence(&a, &holder("n1", "i1", e), Duration::from_secs(5))
            .await
            .unwrap());
        assert_eq!(d.presence(&a).await.unwrap(), Some(holder("n1", "i1", e)));
        // A later claim still gets a higher epoch than the restored one.
        assert!(d.claim_presence(&a, "n2", "i2", Duration::from_secs(5)).await.unwrap() > e);
    })
}

pub(crate) fn node_liveness_follows_heartbeats(d: &dyn Directory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        assert!(!d.node_alive("n1").await.unwrap(), "never heartbeated");
        d.node_heartbeat("n1", &[], Duration::from_millis(100)).await.unwrap();
        d.node_heartbeat("n2", &[], Duration::from_secs(5)).await.unwrap();
        assert!(d.node_alive("n1").await.unwrap());
        eventually("n1 expired", || async { !d.node_alive("n1").await.unwrap() }).await;
        assert!(d.node_alive("n2").await.unwrap(), "n2's heartbeat is its own");

        d.node_heartbeat("n1", &[], Duration::from_secs(5)).await.unwrap();
        assert!(d.node_alive("n1").await.unwrap(), "a heartbeat revives");
        d.node_gone("n1").await.unwrap();
        assert!(!d.node_alive("n1").await.unwrap(), "gone at once");
        assert!(d.node_alive("n2").await.unwrap());
        d.node_gone("n1").await.unwrap();
    })
}

pub(crate) fn nodes_list_their_features_with_each_heartbeat(d: &dyn Directory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let ttl = Duration::from_secs(5);
        assert_eq!(d.node_features("n1").await.unwrap(), None, "never heartbeated");
        d.node_heartbeat("n1", &["http", "drain"], ttl).await.unwrap();
        d.node_heartbeat("n2", &[], ttl).await.unwrap();
        let listed = |v: &[&str]| Some(v.iter().map(|f| (*f).to_owned()).collect::<Vec<_>>());
        assert_eq!(d.node_features("n1").await.unwrap(), listed(&["http", "drain"]));
        assert_eq!(d.node_features("n2").await.unwrap(), listed(&[]), "alive, listing none");
        // A restart under the same id with another build lists what that build reads.
        d.node_heartbeat("n1", &["http"], ttl).await.unwrap();
        assert_eq!(d.node_features("n1").await.unwrap(), listed(&["http"]));
        d.node_gone("n1").await.unwrap();
        assert_eq!(d.node_features("n1").await.unwrap(), None, "gone");
        d.node_gone("n2").await.unwrap();
    })
}

pub(crate) fn pin_is_taken_once_and_guarded_by_its_holder(d: &dyn Directory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let ttl = Duration::from_secs(5);
        assert_eq!(d.pinned("t1").await.unwrap(), None);
        assert_eq!(d.pin("t1", "n1/i1", ttl).await.unwrap(), None, "free pin taken");
        assert_eq!(d.pin("t1", "n2/i2", ttl).await.unwrap().as_deref(), Some("n1/i1"));
        assert_eq!(d.pinned("t1").await.unwrap().as_deref(), Some("n1/i1"));

        assert!(!d.renew_pin("t1", "n2/i2", ttl).await.unwrap(), "non-holder renewed");
        d.release_pin("t1", "n2/i2").await.unwrap();
        assert_eq!(
            d.pinned("t1").await.unwrap().as_deref(),
            Some("n1/i1"),
            "non-holder released"
        );

        assert!(d.renew_pin("t1", "n1/i1", ttl).await.unwrap());
        assert_eq!(d.pin("t2", "n2/i2", ttl).await.unwrap(), None, "pins are per key");
        d.release_pin("t1", "n1/i1").await.unwrap();
        assert_eq!(d.pinned("t1").await.unwrap(), None);
        assert!(!d.renew_pin("t1", "n1/i1", ttl).await.unwrap(), "released pin renewed");
        assert_eq!(
            d.pin("t1", "n2/i2", ttl).await.unwrap(),
            None,
            "released pin taken again"
        );
        assert_eq!(d.pinned("t2").await.unwrap().as_deref(), Some("n2/i2"));
        d.release_pin("nothing", "n1/i1").await.unwrap();
    })
}

pub(crate) fn pin_expires_unless_renewed(d: &dyn Directory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        assert_eq!(d.pin("t1", "n1/i1", Duration::from_millis(100)).await.unwrap(), None);
        assert!(d.renew_pin("t1", "n1/i1", Duration::from_secs(5)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            d.pinned("t1").await.unwrap().as_deref(),
            Some("n1/i1"),
            "renew did not extend"
        );

        assert!(d.renew_pin("t1", "n1/i1", Duration::from_millis(50)).await.unwrap());
        eventually("pin expired", || async { d.pinned("t1").await.unwrap().is_none() }).await;
        assert!(
            !d.renew_pin("t1", "n1/i1", Duration::from_secs(5)).await.unwrap(),
            "expired pin revived"
        );
        assert_eq!(
            d.pin("t1", "n2/i2", Duration::from_secs(5)).await.unwrap(),
            None,
            "expired pin free"
        );
        assert_eq!(d.pinned("t1").await.unwrap().as_deref(), Some("n2/i2"));
    })
}

pub(crate) fn offsets_only_move_forward(d: &dyn Directory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        assert_eq!(d.load_offset("node-1").await.unwrap(), None);
        d.store_offset("node-1", 5).await.unwrap();
        assert_eq!(d.load_offset("node-1").await.unwrap(), Some(5));
        d.store_offset("node-1", 3).await.unwrap();
        assert_eq!(
            d.load_offset("node-1").await.unwrap(),
            Some(5),
            "an older delivery moved it back"
        );
        d.store_offset("node-1", 5).await.unwrap();
        d.store_offset("node-1", 12).await.unwrap();
        assert_eq!(
            d.load_offset("node-1").await.unwrap(),
            Some(12),
            "9 < 12 as numbers, not text"
        );
        d.store_offset("node-1", 9).await.unwrap();
        assert_eq!(d.load_offset("node-1").await.unwrap(), Some(12));

        // Exact across the whole u64 range (no float rounding on the way).
        d.store_offset("node-2", u64::MAX - 1).await.unwrap();
        d.store_offset("node-2", u64::MAX - 2).await.unwrap();
        assert_eq!(d.load_offset("node-2").await.unwrap(), Some(u64::MAX - 1));
        d.store_offset("node-2", u64::MAX).await.unwrap();
        assert_eq!(d.load_offset("node-2").await.unwrap(), Some(u64::MAX));
        assert_eq!(
            d.load_offset("node-1").await.unwrap(),
            Some(12),
            "streams are independent"
        );

        d.store_offset("node-3", 0).await.unwrap();
        assert_eq!(d.load_offset("node-3").await.unwrap(), Some(0));
    })
}
