//! Embedded store: one SQLite file in the data dir, so a single node keeps its agents across
//! restarts with nothing to install. rusqlite is blocking, so every call runs on tokio's blocking
//! pool and never on an actor thread.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use strait_schema::{AgentName, Secret};

use super::{AgentRecord, Route, Store, MIGRATIONS};
use crate::error::Error;

/// SQLite-file implementation of [`Store`]. WAL mode with a busy timeout, so the CLI
/// (`agent add`) and a running node can use the same file at once.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) `<dir>/strait.db` and applies pending migrations.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Store(format!("create {}: {e}", dir.display())))?;
        let mut conn = Connection::open(dir.join("strait.db"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(|e| Error::Store(format!("store task failed: {e}")))?
    }
}

/// Applies every migration not yet recorded, each in its own `BEGIN IMMEDIATE` transaction so two
/// processes starting at once do not both apply it. A changed migration file is refused.
fn migrate(conn: &mut Connection) -> Result<(), Error> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)",
    )?;
    for (version, name, sql) in MIGRATIONS {
        let sum = checksum(sql);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let applied: Option<String> = tx
            .query_row(
                "SELECT checksum FROM schema_migrations WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()?;
        match applied {
            Some(s) if s == sum => {}
            Some(_) => {
                return Err(Error::Store(format!(
                    "migration {version} ({name}) changed after it was applied"
                )))
            }
            None => {
                tx.execute_batch(sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_at_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![version, name, sum, super::now_ms() as i64],
                )?;
            }
        }
        tx.commit()?;
    }
    Ok(())
}

/// FNV-1a of the migration text: detects edits to an applied migration (not a security check).
pub(crate) fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// An `agents` row as SQLite returns it: name, key id, secret, created, revoked.
type AgentRow = (String, String, Vec<u8>, i64, Option<i64>);

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn to_record(
    (name, key_id, secret, created, revoked): (String, String, Vec<u8>, i64, Option<i64>),
) -> Result<AgentRecord, Error> {
    Ok(AgentRecord {
        name: AgentName::new(&name).ok_or_else(|| Error::Store(format!("stored agent name {name:?} is invalid")))?,
        key_id,
        secret: Secret::new(secret),
        created_at_ms: created as u64,
        revoked_at_ms: revoked.map(|v| v as u64),
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_agent(&self, rec: AgentRecord) -> Result<(), Error> {
        self.with(move |c| {
            let n = c.execute(
                "INSERT INTO agents (name, key_id, secret, created_at_ms, revoked_at_ms) VALUES (?1, ?2, ?3, ?4, NULL)
                 ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, secret = excluded.secret,
                   created_at_ms = excluded.created_at_ms, revoked_at_ms = NULL
                 WHERE agents.revoked_at_ms IS NOT NULL",
                params![
                    rec.name.as_str(),
                    rec.key_id,
                    rec.secret.expose(),
                    rec.created_at_ms as i64
                ],
            )?;
            if n == 0 {
                return Err(Error::AgentExists(rec.name.to_string()));
            }
            Ok(())
        })
        .await
    }

    async fn agent(&self, name: &AgentName) -> Result<Option<AgentRecord>, Error> {
        let name = name.as_str().to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT name, key_id, secret, created_at_ms, revoked_at_ms FROM agents WHERE name = ?1",
                [name],
                row_to_record,
            )
            .optional()?
            .map(to_record)
            .transpose()
        })
        .await
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, Error> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT name, key_id, secret, created_at_ms, revoked_at_ms FROM agents ORDER BY name")?;
            let rows = st.query_map([], row_to_record)?;
            rows.map(|r| to_record(r?)).collect()
        })
        .await
    }

    async fn revoke_agent(&self, name: &AgentName, at_ms: u64) -> Result<(), Error> {
        let name = name.as_str().to_owned();
        self.with(move |c| {
            let n = c.execute(
                "UPDATE agents SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE name = ?1",
                params![name, at_ms as i64],
            )?;
            if n == 0 {
                return Err(Error::NoSuchAgent(name));
            }
            Ok(())
        })
        .await
    }

    async fn revoked_since(&self, since_ms: u64) -> Result<Vec<(AgentName, u64)>, Error> {
        self.with(move |c| {
            let mut st = c.prepare("SELECT name, revoked_at_ms FROM agents WHERE revoked_at_ms >= ?1")?;
            let rows = st.query_map([since_ms as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for r in rows {
                let (name, at) = r?;
                if let Some(name) = AgentName::new(&name) {
                    out.push((name, at as u64));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn add_route(&self, r: Route) -> Result<(), Error> {
        self.with(move |c| {
            let n = c.execute(
                "INSERT INTO routes (listen, agent, service, created_at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (listen) DO NOTHING",
                params![
                    r.listen.to_string(),
                    r.agent.as_str(),
                    r.service,
                    super::now_ms() as i64
                ],
            )?;
            if n == 0 {
                return Err(Error::RouteExists(r.listen.to_string()));
            }
            Ok(())
        })
        .await
    }

    async fn list_routes(&self) -> Result<Vec<Route>, Error> {
        self.with(|c| {
            let mut st = c.prepare("SELECT listen, agent, service FROM routes ORDER BY listen")?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })?;
            let mut out = Vec::new();
            for r in rows {
                out.push(super::route_from_row(r?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn remove_route(&self, listen: std::net::SocketAddr) -> Result<(), Error> {
        self.with(move |c| {
            let n = c.execute("DELETE FROM routes WHERE listen = ?1", [listen.to_string()])?;
            if n == 0 {
                return Err(Error::NoSuchRoute(listen.to_string()));
            }
            Ok(())
        })
        .await
    }

    async fn ping(&self) -> Result<(), Error> {
        self.with(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).map(|_| ())?))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::now_ms;

    fn rec(name: &str) -> AgentRecord {
        AgentRecord {
            name: AgentName::new(name).unwrap(),
            key_id: "k1".into(),
            secret: Secret::generate(),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        }
    }

    #[tokio::test]
    async fn agents_survive_reopen_and_revocation_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let r = rec("alpha");
        {
            let s = SqliteStore::open(dir.path()).unwrap();
            s.create_agent(r.clone()).await.unwrap();
            assert!(matches!(s.create_agent(rec("alpha")).await, Err(Error::AgentExists(_))));
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let got = s.agent(&r.name).await.unwrap().unwrap();
        assert_eq!(got.secret, r.secret);
        assert_eq!(got.key_id, "k1");
        s.revoke_agent(&r.name, 1234).await.unwrap();
        assert_eq!(s.agent(&r.name).await.unwrap().unwrap().revoked_at_ms, Some(1234));
        assert_eq!(s.revoked_since(1000).await.unwrap(), vec![(r.name.clone(), 1234)]);
        assert!(s.revoked_since(2000).await.unwrap().is_empty());
        // A revoked name can be issued again, with a new key.
        s.create_agent(rec("alpha")).await.unwrap();
        assert_eq!(s.agent(&r.name).await.unwrap().unwrap().revoked_at_ms, None);
        assert!(matches!(
            s.revoke_agent(&AgentName::new("nobody").unwrap(), 1).await,
            Err(Error::NoSuchAgent(_))
        ));
    }

    #[tokio::test]
    async fn routes_are_added_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let r = Route {
            listen: "127.0.0.1:2222".parse().unwrap(),
            agent: AgentName::new("alpha").unwrap(),
            service: "ssh".into(),
        };
        s.add_route(r.clone()).await.unwrap();
        assert!(matches!(s.add_route(r.clone()).await, Err(Error::RouteExists(_))));
        assert_eq!(s.list_routes().await.unwrap(), vec![r.clone()]);
        s.remove_route(r.listen).await.unwrap();
        assert!(s.list_routes().await.unwrap().is_empty());
        assert!(matches!(s.remove_route(r.listen).await, Err(Error::NoSuchRoute(_))));
    }

    #[test]
    fn a_changed_migration_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join("strait.db")).unwrap();
        c.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1", [])
            .unwrap();
        drop(c);
        assert!(matches!(SqliteStore::open(dir.path()), Err(Error::Store(m)) if m.contains("changed")));
    }
}
