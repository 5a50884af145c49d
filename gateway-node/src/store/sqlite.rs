//! Embedded store: one SQLite file in the data dir, so a single node keeps its agents across
//! restarts with nothing to install. rusqlite is blocking, so every call runs on tokio's blocking
//! pool and never on an actor thread.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use strait_schema::{AgentName, Secret};

use super::{checksum, AgentRecord, Route, Store, MIGRATIONS, SCHEMA_MIGRATIONS_TABLE};
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
    conn.execute_batch(SCHEMA_MIGRATIONS_TABLE)?;
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
                "INSERT INTO routes (listen, agent, service, created_at_ms, node) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (listen) DO NOTHING",
                params![
                    r.listen.to_string(),
                    r.agent.as_str(),
                    r.service,
                    super::now_ms() as i64,
                    r.node
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
            let mut st = c.prepare("SELECT listen, agent, service, node FROM routes ORDER BY listen")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
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
    use async_trait::async_trait;

    use super::*;
    use crate::store::contract::{self, Case, Reopen, ReopenCase};

    async fn with_sqlite(case: Case) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        case(&store).await;
    }

    /// Reopens [`SqliteStore`]s on one directory, and edits the file behind the store's back.
    struct SqliteReopen {
        dir: tempfile::TempDir,
    }

    impl SqliteReopen {
        fn raw(&self) -> Connection {
            Connection::open(self.dir.path().join("strait.db")).unwrap()
        }
    }

    #[async_trait]
    impl Reopen for SqliteReopen {
        async fn open(&self) -> Result<Box<dyn Store>, Error> {
            Ok(Box::new(SqliteStore::open(self.dir.path())?))
        }

        async fn set_checksum(&self, version: u32, checksum: &str) {
            let n = self
                .raw()
                .execute(
                    "UPDATE schema_migrations SET checksum = ?2 WHERE version = ?1",
                    params![version, checksum],
                )
                .unwrap();
            assert_eq!(n, 1, "migration {version} is recorded");
        }

        async fn applied_migrations(&self) -> Vec<(u32, String, String)> {
            let c = self.raw();
            let mut st = c
                .prepare("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
                .unwrap();
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
    }

    async fn with_sqlite_reopen(case: ReopenCase) {
        let reopen = SqliteReopen {
            dir: tempfile::tempdir().unwrap(),
        };
        case(&reopen).await;
    }

    contract::store_contract_tests!(with_sqlite, with_sqlite_reopen);

    /// The shared migration declares `secret BYTEA`, which SQLite gives NUMERIC affinity: check the
    /// value is still kept as a blob (no conversion to a number or text), byte for byte.
    #[tokio::test]
    async fn secret_is_stored_as_a_blob_despite_the_bytea_column() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        for (name, bytes) in [("alpha", b"12345".to_vec()), ("beta", vec![0x00, 0xFF, b'1', 0x00])] {
            s.create_agent(AgentRecord {
                name: AgentName::new(name).unwrap(),
                key_id: "k1".into(),
                secret: Secret::new(bytes),
                created_at_ms: 1000,
                revoked_at_ms: None,
            })
            .await
            .unwrap();
        }
        let c = Connection::open(dir.path().join("strait.db")).unwrap();
        let mut st = c
            .prepare("SELECT typeof(secret), hex(secret) FROM agents ORDER BY name")
            .unwrap();
        let stored: Vec<(String, String)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            stored,
            [("blob".into(), "3132333435".into()), ("blob".into(), "00FF3100".into())]
        );
    }
}
