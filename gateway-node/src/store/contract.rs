//! The [`Store`] contract as one suite, run against every implementation, so the embedded and the
//! cluster store cannot drift apart. Each case takes a fresh, empty store; the migration cases take
//! a [`Reopen`], which opens stores again on the same data.

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use strait_schema::{AgentName, Secret};

use super::{checksum, AgentRecord, Route, Store, MIGRATIONS};
use crate::error::Error;

/// One contract case on a fresh store. Boxed so a harness can take any case as a plain `fn`.
pub(crate) type Case = for<'a> fn(&'a dyn Store) -> BoxFuture<'a, ()>;

/// One migration case, on data a harness can reopen.
pub(crate) type ReopenCase = for<'a> fn(&'a dyn Reopen) -> BoxFuture<'a, ()>;

/// One store's data (a directory, a database) that can be opened again, and inspected and edited
/// behind the store's back, as an operator or a newer node would.
#[async_trait]
pub(crate) trait Reopen: Send + Sync {
    /// Opens a store on the data, applying migrations as a starting node does.
    async fn open(&self) -> Result<Box<dyn Store>, Error>;
    /// Overwrites the checksum recorded for migration `version`, as if its file had been edited.
    async fn set_checksum(&self, version: u32, checksum: &str);
    /// `schema_migrations` as (version, name, checksum), by version.
    async fn applied_migrations(&self) -> Vec<(u32, String, String)>;
}

/// Generates one `#[tokio::test]` per contract case: `$harness` (an async fn taking a [`Case`])
/// builds a fresh store, runs the case and cleans up; `$reopen` does the same for a [`ReopenCase`].
macro_rules! store_contract_tests {
    ($harness:path, $reopen:path) => {
        $crate::store::contract::store_contract_tests!(@cases $harness;
            agent_is_created_and_read_back,
            active_agent_name_is_refused_and_keeps_its_key,
            revoked_agent_keeps_its_row_and_can_be_created_again,
            revoking_again_keeps_the_first_time,
            revoking_an_unknown_agent_is_refused,
            unknown_agent_is_none,
            agents_are_listed_in_byte_order_of_name,
            revoked_since_lists_revocations_at_or_after_the_time,
            secret_bytes_round_trip_exactly,
            routes_are_added_listed_and_removed,
            duplicate_route_is_refused_and_keeps_the_first,
            removing_a_missing_route_is_refused,
            routes_are_listed_in_byte_order_of_address,
            ping_answers,
        );
        $crate::store::contract::store_contract_tests!(@cases $reopen;
            migrations_are_recorded_once_and_reopening_keeps_data,
            a_changed_migration_is_refused,
        );
    };
    (@cases $harness:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                $harness($crate::store::contract::$case).await;
            }
        )*
    };
}
pub(crate) use store_contract_tests;

fn name(n: &str) -> AgentName {
    AgentName::new(n).unwrap()
}

fn agent(n: &str, key_id: &str, created_at_ms: u64) -> AgentRecord {
    AgentRecord {
        name: name(n),
        key_id: key_id.into(),
        secret: Secret::generate(),
        created_at_ms,
        revoked_at_ms: None,
    }
}

fn route(listen: &str, agent: &str, service: &str) -> Route {
    Route {
        listen: listen.parse().unwrap(),
        agent: name(agent),
        service: service.into(),
        node: if service == "db" { Some("node-b".into()) } else { None },
    }
}

fn assert_same_agent(got: &AgentRecord, want: &AgentRecord) {
    assert_eq!(got.name, want.name);
    assert_eq!(got.key_id, want.key_id);
    assert_eq!(got.secret, want.secret, "secret of {}", want.name);
    assert_eq!(got.created_at_ms, want.created_at_ms);
    assert_eq!(got.revoked_at_ms, want.revoked_at_ms);
}

pub(crate) fn agent_is_created_and_read_back(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let a = agent("alpha", "k1", 1_700_000_000_123);
        s.create_agent(a.clone()).await.unwrap();
        assert_same_agent(&s.agent(&a.name).await.unwrap().unwrap(), &a);
    })
}

pub(crate) fn active_agent_name_is_refused_and_keeps_its_key(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let a = agent("alpha", "k1", 1000);
        s.create_agent(a.clone()).await.unwrap();
        let again = s.create_agent(agent("alpha", "k2", 2000)).await;
        assert!(
            matches!(again, Err(Error::AgentExists(ref n)) if n == "alpha"),
            "{again:?}"
        );
        assert_same_agent(&s.agent(&a.name).await.unwrap().unwrap(), &a);
    })
}

pub(crate) fn revoked_agent_keeps_its_row_and_can_be_created_again(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let a = agent("alpha", "k1", 1000);
        s.create_agent(a.clone()).await.unwrap();
        s.revoke_agent(&a.name, 1234).await.unwrap();
        let revoked = s.agent(&a.name).await.unwrap().unwrap();
        assert_eq!(revoked.revoked_at_ms, Some(1234), "the row stays, marked revoked");
        assert_eq!(revoked.secret, a.secret);

        let fresh = agent("alpha", "k2", 2000);
        s.create_agent(fresh.clone()).await.unwrap();
        assert_same_agent(&s.agent(&a.name).await.unwrap().unwrap(), &fresh);
        assert_eq!(s.list_agents().await.unwrap().len(), 1, "re-created in place");
        assert!(matches!(
            s.create_agent(agent("alpha", "k3", 3000)).await,
            Err(Error::AgentExists(_))
        ));
    })
}

pub(crate) fn revoking_again_keeps_the_first_time(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        s.create_agent(agent("alpha", "k1", 1000)).await.unwrap();
        s.revoke_agent(&name("alpha"), 1234).await.unwrap();
        s.revoke_agent(&name("alpha"), 5678).await.unwrap();
        assert_eq!(
            s.agent(&name("alpha")).await.unwrap().unwrap().revoked_at_ms,
            Some(1234)
        );
    })
}

pub(crate) fn revoking_an_unknown_agent_is_refused(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let r = s.revoke_agent(&name("nobody"), 1).await;
        assert!(matches!(r, Err(Error::NoSuchAgent(ref n)) if n == "nobody"), "{r:?}");
    })
}

pub(crate) fn unknown_agent_is_none(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        assert!(s.agent(&name("nobody")).await.unwrap().is_none());
        assert!(s.list_agents().await.unwrap().is_empty());
    })
}

pub(crate) fn agents_are_listed_in_byte_order_of_name(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        // "a-b" before "ab" by bytes ('-' < 'b'); a linguistic collation would ignore the '-'.
        let created: Vec<AgentRecord> = ["beta", "ab", "alpha", "a-b"]
            .iter()
            .enumerate()
            .map(|(i, n)| agent(n, "k1", 1000 + i as u64))
            .collect();
        for a in &created {
            s.create_agent(a.clone()).await.unwrap();
        }
        s.revoke_agent(&name("beta"), 5000).await.unwrap();
        let listed = s.list_agents().await.unwrap();
        let names: Vec<&str> = listed.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["a-b", "ab", "alpha", "beta"]);
        for got in &listed {
            let mut want = created.iter().find(|a| a.name == got.name).unwrap().clone();
            if want.name.as_str() == "beta" {
                want.revoked_at_ms = Some(5000);
            }
            assert_same_agent(got, &want);
        }
    })
}

pub(crate) fn revoked_since_lists_revocations_at_or_after_the_time(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        for n in ["alpha", "beta", "gamma", "delta"] {
            s.create_agent(agent(n, "k1", 1000)).await.unwrap();
        }
        s.revoke_agent(&name("alpha"), 1000).await.unwrap();
        s.revoke_agent(&name("beta"), 2000).await.unwrap();
        s.revoke_agent(&name("gamma"), 3000).await.unwrap();
        let since = |t| async move {
            let mut v = s.revoked_since(t).await.unwrap();
            v.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            v
        };
        assert_eq!(
            since(2000).await,
            [(name("beta"), 2000), (name("gamma"), 3000)],
            "inclusive"
        );
        assert_eq!(since(0).await.len(), 3, "never-revoked delta is not listed");
        assert!(since(3001).await.is_empty());
        // Re-creating a revoked agent clears its revocation.
        s.create_agent(agent("gamma", "k2", 4000)).await.unwrap();
        assert_eq!(since(2000).await, [(name("beta"), 2000)]);
    })
}

pub(crate) fn secret_bytes_round_trip_exactly(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        // Every byte value, NUL and 0xFF at both ends, and bytes that are not UTF-8 or look like
        // a number, so neither a text conversion nor SQLite's NUMERIC affinity can go unnoticed.
        let mut bytes = vec![0x00, 0xFF, 0x00];
        bytes.extend(0..=255u8);
        bytes.extend(b"12345");
        bytes.extend([0xFF, 0x00, 0xFF]);
        let mut a = agent("alpha", "k1", 1000);
        a.secret = Secret::new(bytes.clone());
        s.create_agent(a.clone()).await.unwrap();
        let numeric = AgentRecord {
            secret: Secret::new(b"12345".to_vec()),
            ..agent("beta", "k1", 1000)
        };
        s.create_agent(numeric.clone()).await.unwrap();

        assert_eq!(s.agent(&a.name).await.unwrap().unwrap().secret.expose(), &bytes[..]);
        assert_eq!(s.agent(&numeric.name).await.unwrap().unwrap().secret.expose(), b"12345");
        let listed = s.list_agents().await.unwrap();
        assert_eq!(listed[0].secret.expose(), &bytes[..]);
        assert_eq!(listed[1].secret.expose(), b"12345");
    })
}

pub(crate) fn routes_are_added_listed_and_removed(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let ssh = route("127.0.0.1:2222", "alpha", "ssh");
        let db = route("[::1]:5433", "beta", "db");
        s.add_route(ssh.clone()).await.unwrap();
        s.add_route(db.clone()).await.unwrap();
        assert_eq!(s.list_routes().await.unwrap(), [ssh.clone(), db.clone()]);
        s.remove_route(ssh.listen).await.unwrap();
        let db_listen = db.listen;
        assert_eq!(s.list_routes().await.unwrap(), [db]);
        s.remove_route(db_listen).await.unwrap();
        assert!(s.list_routes().await.unwrap().is_empty());
    })
}

pub(crate) fn duplicate_route_is_refused_and_keeps_the_first(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let first = route("127.0.0.1:2222", "alpha", "ssh");
        s.add_route(first.clone()).await.unwrap();
        let again = s.add_route(route("127.0.0.1:2222", "beta", "other")).await;
        assert!(
            matches!(again, Err(Error::RouteExists(ref l)) if l == "127.0.0.1:2222"),
            "{again:?}"
        );
        assert_eq!(s.list_routes().await.unwrap(), [first]);
    })
}

pub(crate) fn removing_a_missing_route_is_refused(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let r = s.remove_route("127.0.0.1:2222".parse().unwrap()).await;
        assert!(
            matches!(r, Err(Error::NoSuchRoute(ref l)) if l == "127.0.0.1:2222"),
            "{r:?}"
        );
        s.add_route(route("127.0.0.1:2222", "alpha", "ssh")).await.unwrap();
        assert!(matches!(
            s.remove_route("127.0.0.1:2223".parse().unwrap()).await,
            Err(Error::NoSuchRoute(_))
        ));
        assert_eq!(s.list_routes().await.unwrap().len(), 1);
    })
}

pub(crate) fn routes_are_listed_in_byte_order_of_address(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        // By bytes "127.0.0.10:80" < "127.0.0.1:2222" ('0' < ':'); a linguistic collation that
        // skips punctuation would put them the other way round.
        let listens = ["127.0.0.1:2222", "[::1]:22", "127.0.0.10:80", "0.0.0.0:9000"];
        for l in listens {
            s.add_route(route(l, "alpha", "svc")).await.unwrap();
        }
        let listed: Vec<String> = s
            .list_routes()
            .await
            .unwrap()
            .iter()
            .map(|r| r.listen.to_string())
            .collect();
        assert_eq!(listed, ["0.0.0.0:9000", "127.0.0.10:80", "127.0.0.1:2222", "[::1]:22"]);
    })
}

pub(crate) fn ping_answers(s: &dyn Store) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        s.ping().await.unwrap();
    })
}

fn expected_migrations() -> Vec<(u32, String, String)> {
    MIGRATIONS
        .iter()
        .map(|(v, n, sql)| (*v, n.to_string(), checksum(sql)))
        .collect()
}

pub(crate) fn migrations_are_recorded_once_and_reopening_keeps_data(r: &dyn Reopen) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let a = agent("alpha", "k1", 1000);
        {
            let s = r.open().await.unwrap();
            s.create_agent(a.clone()).await.unwrap();
            s.add_route(route("127.0.0.1:2222", "alpha", "ssh")).await.unwrap();
        }
        assert_eq!(r.applied_migrations().await, expected_migrations());
        for _ in 0..2 {
            let s = r.open().await.unwrap();
            assert_same_agent(&s.agent(&a.name).await.unwrap().unwrap(), &a);
            assert_eq!(s.list_routes().await.unwrap().len(), 1);
        }
        assert_eq!(
            r.applied_migrations().await,
            expected_migrations(),
            "reopening applies nothing"
        );
    })
}

pub(crate) fn a_changed_migration_is_refused(r: &dyn Reopen) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        drop(r.open().await.unwrap());
        r.set_checksum(1, "0000000000000000").await;
        match r.open().await {
            Err(Error::Store(m)) => assert!(m.contains("migration 1 (agents) changed"), "{m}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened despite a changed migration"),
        }
    })
}
