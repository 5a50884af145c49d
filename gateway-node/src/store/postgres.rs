//! Cluster store: one Postgres database shared by every node of a deployment, behind a
//! deadpool-postgres pool. Same migrations and same semantics as the embedded [`super::SqliteStore`]
//! (the `store::contract` suite runs against both), so a node behaves alike in either mode.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use strait_schema::{AgentName, Secret};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use super::{checksum, AgentRecord, Route, Store, MIGRATIONS, SCHEMA_MIGRATIONS_TABLE};
use crate::error::Error;

/// Key of the transaction-scoped advisory lock that serializes migrations between nodes starting at
/// once: "STRAIT" in ASCII, then 1. Any constant works as long as every node uses the same one.
const MIGRATION_LOCK: i64 = 0x5354_5241_4954_0001;

/// Connections per node. Store calls are short (one statement each), so a few cover a busy node.
const POOL_SIZE: usize = 16;

/// Bound on connecting, waiting for a pooled connection and recycling one, so a dead database makes
/// `/readyz` and the CLI fail in seconds rather than hang.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The `agents` query that every lookup extends, in the column order [`to_record`] reads.
const AGENT_COLUMNS: &str = "SELECT name, key_id, secret, created_at_ms, revoked_at_ms FROM agents";

/// Postgres implementation of [`Store`]. Cheap to clone: clones share one pool. NoTls, because the
/// database sits on the cluster's private network (as the broker and Redis do).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/db`) and applies pending migrations
    /// before returning, so a node never serves against an older schema. Several nodes may call
    /// this at once: migrations are serialized by an advisory lock and each is applied once.
    /// Errors name the server (user, host, port, database) but never the password.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        // tokio-postgres parse errors name the offending option, never its value.
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Store(format!("invalid Postgres URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(TIMEOUT);
        }
        let target = describe(&config);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(TIMEOUT))
            .create_timeout(Some(TIMEOUT))
            .recycle_timeout(Some(TIMEOUT))
            .build()
            .map_err(|e| Error::Store(format!("Postgres pool: {e}")))?;
        let store = PgStore { pool };
        store.migrate().await.map_err(|e| match e {
            Error::Store(m) => Error::Store(format!("{m} (Postgres at {target})")),
            other => other,
        })?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, Error> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::Store(format!("Postgres pool: {e}")))
    }

    /// Applies every migration not yet recorded, each in its own transaction holding
    /// [`MIGRATION_LOCK`], so nodes starting together apply each one exactly once and a node that
    /// waited sees the other's row. A changed migration file is refused.
    async fn migrate(&self) -> Result<(), Error> {
        let mut client = self.client().await?;
        // Concurrent `CREATE TABLE IF NOT EXISTS` can still collide in the catalog, hence the lock.
        let tx = client.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        tx.batch_execute(SCHEMA_MIGRATIONS_TABLE).await.map_err(db)?;
        tx.commit().await.map_err(db)?;

        for (version, name, sql) in MIGRATIONS {
            let sum = checksum(sql);
            let version_col = i32::try_from(*version)
                .map_err(|_| Error::Store(format!("migration version {version} does not fit a column")))?;
            let tx = client.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(db)?;
            let applied = tx
                .query_opt(
                    "SELECT checksum FROM schema_migrations WHERE version = $1",
                    &[&version_col],
                )
                .await
                .map_err(db)?;
            match applied {
                Some(row) if row.try_get::<_, String>(0).map_err(db)? == sum => {}
                Some(_) => {
                    return Err(Error::Store(format!(
                        "migration {version} ({name}) changed after it was applied"
                    )))
                }
                None => {
                    tx.batch_execute(sql)
                        .await
                        .map_err(|e| Error::Store(format!("migration {version} ({name}): {e}")))?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version, name, checksum, applied_at_ms) VALUES ($1, $2, $3, $4)",
                        &[&version_col, name, &sum, &(super::now_ms() as i64)],
                    )
                    .await
                    .map_err(db)?;
                }
            }
            tx.commit().await.map_err(db)?;
        }
        Ok(())
    }
}

/// `user@host:port/db` for error messages: enough to find the server, without the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "{}@{}:{}/{}",
        config.get_user().unwrap_or("?"),
        hosts.join(","),
        if ports.is_empty() {
            "5432".to_owned()
        } else {
            ports.join(",")
        },
        config.get_dbname().unwrap_or("?"),
    )
}

/// Wraps a driver error. Its text carries the server's message (and for a unique violation the key
/// value: names and addresses only, never a secret), not the connection URL.
fn db(e: tokio_postgres::Error) -> Error {
    Error::Store(format!("Postgres: {e}"))
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn to_record(row: &Row) -> Result<AgentRecord, Error> {
    let name: String = row.try_get(0).map_err(db)?;
    Ok(AgentRecord {
        name: AgentName::new(&name).ok_or_else(|| Error::Store(format!("stored agent name {name:?} is invalid")))?,
        key_id: row.try_get(1).map_err(db)?,
        secret: Secret::new(row.try_get(2).map_err(db)?),
        created_at_ms: row.try_get::<_, i64>(3).map_err(db)? as u64,
        revoked_at_ms: row.try_get::<_, Option<i64>>(4).map_err(db)?.map(|v| v as u64),
    })
}

#[async_trait]
impl Store for PgStore {
    async fn create_agent(&self, rec: AgentRecord) -> Result<(), Error> {
        let c = self.client().await?;
        // Re-issuing a revoked name replaces its row; an active name matches no row to update.
        let st = c
            .prepare_cached(
                "INSERT INTO agents (name, key_id, secret, created_at_ms, revoked_at_ms) VALUES ($1, $2, $3, $4, NULL)
                 ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, secret = excluded.secret,
                   created_at_ms = excluded.created_at_ms, revoked_at_ms = NULL
                 WHERE agents.revoked_at_ms IS NOT NULL",
            )
            .await
            .map_err(db)?;
        let n = c
            .execute(
                &st,
                &[
                    &rec.name.as_str(),
                    &rec.key_id,
                    &rec.secret.expose(),
                    &(rec.created_at_ms as i64),
                ],
            )
            .await
            .map_err(db)?;
        if n == 0 {
            return Err(Error::AgentExists(rec.name.to_string()));
        }
        Ok(())
    }

    async fn agent(&self, name: &AgentName) -> Result<Option<AgentRecord>, Error> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!("{AGENT_COLUMNS} WHERE name = $1"))
            .await
            .map_err(db)?;
        c.query_opt(&st, &[&name.as_str()])
            .await
            .map_err(db)?
            .as_ref()
            .map(to_record)
            .transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, Error> {
        let c = self.client().await?;
        let st = c
            // `COLLATE "C"` orders by bytes whatever the database's collation, as SQLite's `BINARY`
            // does, so both stores list in the same order.
            .prepare_cached(&format!("{AGENT_COLUMNS} ORDER BY name COLLATE \"C\""))
            .await
            .map_err(db)?;
        c.query(&st, &[]).await.map_err(db)?.iter().map(to_record).collect()
    }

    async fn revoke_agent(&self, name: &AgentName, at_ms: u64) -> Result<(), Error> {
        let c = self.client().await?;
        // COALESCE keeps the first revocation time: revoking twice does not move it.
        let st = c
            .prepare_cached("UPDATE agents SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE name = $1")
            .await
            .map_err(db)?;
        let n = c.execute(&st, &[&name.as_str(), &(at_ms as i64)]).await.map_err(db)?;
        if n == 0 {
            return Err(Error::NoSuchAgent(name.to_string()));
        }
        Ok(())
    }

    async fn revoked_since(&self, since_ms: u64) -> Result<Vec<(AgentName, u64)>, Error> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT name, revoked_at_ms FROM agents WHERE revoked_at_ms >= $1 ORDER BY name COLLATE \"C\"",
            )
            .await
            .map_err(db)?;
        let mut out = Vec::new();
        for row in c.query(&st, &[&(since_ms as i64)]).await.map_err(db)? {
            let name: String = row.try_get(0).map_err(db)?;
            let at: i64 = row.try_get(1).map_err(db)?;
            // As in SqliteStore: a row no node could have admitted needs no dropping.
            if let Some(name) = AgentName::new(&name) {
                out.push((name, at as u64));
            }
        }
        Ok(out)
    }

    async fn add_route(&self, r: Route) -> Result<(), Error> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO routes (listen, agent, service, created_at_ms, node) VALUES ($1, $2, $3, $4, $5)",
            )
            .await
            .map_err(db)?;
        let listen = r.listen.to_string();
        match c
            .execute(
                &st,
                &[
                    &listen,
                    &r.agent.as_str(),
                    &r.service,
                    &(super::now_ms() as i64),
                    &r.node,
                ],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(Error::RouteExists(listen)),
            Err(e) => Err(db(e)),
        }
    }

    async fn list_routes(&self) -> Result<Vec<Route>, Error> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT listen, agent, service, node FROM routes ORDER BY listen COLLATE \"C\"")
            .await
            .map_err(db)?;
        let mut out = Vec::new();
        for row in c.query(&st, &[]).await.map_err(db)? {
            out.push(super::route_from_row((
                row.try_get(0).map_err(db)?,
                row.try_get(1).map_err(db)?,
                row.try_get(2).map_err(db)?,
                row.try_get(3).map_err(db)?,
            ))?);
        }
        Ok(out)
    }

    async fn remove_route(&self, listen: std::net::SocketAddr) -> Result<(), Error> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("DELETE FROM routes WHERE listen = $1")
            .await
            .map_err(db)?;
        let listen = listen.to_string();
        if c.execute(&st, &[&listen]).await.map_err(db)? == 0 {
            return Err(Error::NoSuchRoute(listen));
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), Error> {
        // Through the pool, so a database that went away fails here rather than on the next request.
        self.client().await?.simple_query("SELECT 1").await.map_err(db)?;
        Ok(())
    }
}

/// Throwaway Postgres databases, for tests and tooling (the store's own tests, the gateway's
/// end-to-end tests, load tests): each run gets a fresh, empty database of its own, so runs can
/// share one server in parallel and leave nothing behind. Not meant for production code paths:
/// [`testing::TempDatabase::create`] panics when the server cannot be reached, because a test that
/// needs Postgres should fail loudly rather than skip.
pub mod testing {
    use std::future::Future;
    use std::panic::AssertUnwindSafe;

    use futures_util::FutureExt;
    use tokio_postgres::NoTls;

    use crate::error::Error;

    /// A database named `strait_test_<random hex>` created on a server reached through an admin
    /// URL. Drop it with [`TempDatabase::drop_now`] (or use [`TempDatabase::with`], which drops it
    /// even when the work panics): Rust's `Drop` cannot wait for the server.
    #[derive(Debug)]
    pub struct TempDatabase {
        /// URL of the new database: the admin URL with its database name replaced.
        pub url: String,
        name: String,
        admin_url: String,
    }

    impl TempDatabase {
        /// Creates a fresh database through `admin_url` (a `postgres://` URL of a user allowed to
        /// `CREATE DATABASE`, such as `postgres://postgres@127.0.0.1:5432/postgres`).
        ///
        /// # Panics
        /// When the server cannot be reached or refuses, with a message saying so.
        pub async fn create(admin_url: &str) -> Self {
            match Self::try_create(admin_url).await {
                Ok(db) => db,
                Err(e) => panic!(
                    "a Postgres server is needed here (admin URL {}): {e}",
                    redacted(admin_url)
                ),
            }
        }

        /// Drops the database, closing whatever connections still use it (`WITH (FORCE)`, PG 13+).
        ///
        /// # Panics
        /// When the server refuses, so a leaked database does not go unnoticed.
        pub async fn drop_now(self) {
            if let Err(e) = self.try_drop().await {
                panic!("could not drop test database {}: {e}", self.name);
            }
        }

        /// Runs `work` with the URL of a fresh database, then drops the database whether `work`
        /// returned or panicked (the panic is then resumed), so a failed assertion leaks nothing.
        pub async fn with<F, Fut, T>(admin_url: &str, work: F) -> T
        where
            F: FnOnce(String) -> Fut,
            Fut: Future<Output = T>,
        {
            let db = Self::create(admin_url).await;
            let outcome = AssertUnwindSafe(work(db.url.clone())).catch_unwind().await;
            match outcome {
                Ok(value) => {
                    db.drop_now().await;
                    value
                }
                Err(panic) => {
                    // Report a failed drop, but keep the original failure as the test's outcome.
                    if let Err(e) = db.try_drop().await {
                        eprintln!("could not drop test database {}: {e}", db.name);
                    }
                    std::panic::resume_unwind(panic)
                }
            }
        }

        async fn try_create(admin_url: &str) -> Result<Self, Error> {
            let name = format!("strait_test_{:016x}", rand::random::<u64>());
            let url = with_database(admin_url, &name)?;
            admin(admin_url, &format!("CREATE DATABASE {name}")).await?;
            Ok(TempDatabase {
                url,
                name,
                admin_url: admin_url.to_owned(),
            })
        }

        async fn try_drop(&self) -> Result<(), Error> {
            admin(
                &self.admin_url,
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            )
            .await
        }
    }

    /// Runs one statement on a short-lived admin connection (`CREATE`/`DROP DATABASE` cannot run
    /// inside a transaction, and keeping no admin connection open leaves nothing to clean up).
    async fn admin(admin_url: &str, statement: &str) -> Result<(), Error> {
        let (client, connection) = tokio_postgres::connect(admin_url, NoTls)
            .await
            .map_err(|e| Error::Store(format!("Postgres: {e}")))?;
        let driver = tokio::spawn(connection);
        let result = client
            .batch_execute(statement)
            .await
            .map_err(|e| Error::Store(format!("Postgres: {e}")));
        drop(client);
        let _ = driver.await;
        result
    }

    /// `url` with its database name replaced by `name`, query string kept.
    pub(super) fn with_database(url: &str, name: &str) -> Result<String, Error> {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (url, None),
        };
        let authority = base
            .find("://")
            .map(|i| i + 3)
            .ok_or_else(|| Error::Store("the admin URL must look like postgres://user@host:port/db".into()))?;
        let end = base[authority..].find('/').map_or(base.len(), |i| authority + i);
        let mut out = format!("{}/{name}", &base[..end]);
        if let Some(query) = query {
            out.push('?');
            out.push_str(query);
        }
        Ok(out)
    }

    /// `url` with any password replaced by `***`, for messages.
    pub(super) fn redacted(url: &str) -> String {
        let Some(start) = url.find("://").map(|i| i + 3) else {
            return "<unparsable URL>".into();
        };
        let end = url[start..].find(['/', '?']).map_or(url.len(), |i| start + i);
        let authority = &url[start..end];
        match authority.rfind('@') {
            Some(at) => match authority[..at].split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..start], &url[start + at..]),
                None => url.to_owned(),
            },
            None => url.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::testing::{redacted, with_database, TempDatabase};
    use super::*;
    use crate::store::contract::{self, Case, Reopen, ReopenCase};

    /// The local server CI runs (trust auth on 127.0.0.1). Every test makes its own database there.
    const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    async fn connect(url: &str) -> PgStore {
        match PgStore::connect(url).await {
            Ok(s) => s,
            Err(e) => panic!("PgStore::connect on a fresh test database failed: {e}"),
        }
    }

    /// Runs a case on a store over its own fresh database, dropped afterwards even if it panicked.
    async fn with_pg(case: Case) {
        TempDatabase::with(ADMIN_URL, |url| async move {
            let store = connect(&url).await;
            case(&store).await;
        })
        .await;
    }

    /// Reopens [`PgStore`]s on one database, and edits its bookkeeping behind the store's back.
    struct PgReopen {
        url: String,
    }

    impl PgReopen {
        async fn raw(&self) -> tokio_postgres::Client {
            let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
            tokio::spawn(connection);
            client
        }
    }

    #[async_trait]
    impl Reopen for PgReopen {
        async fn open(&self) -> Result<Box<dyn Store>, Error> {
            Ok(Box::new(PgStore::connect(&self.url).await?))
        }

        async fn set_checksum(&self, version: u32, checksum: &str) {
            let n = self
                .raw()
                .await
                .execute(
                    "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                    &[&(version as i32), &checksum],
                )
                .await
                .unwrap();
            assert_eq!(n, 1, "migration {version} is recorded");
        }

        async fn applied_migrations(&self) -> Vec<(u32, String, String)> {
            let rows = self
                .raw()
                .await
                .query(
                    "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
                    &[],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| (r.get::<_, i32>(0) as u32, r.get(1), r.get(2)))
                .collect()
        }
    }

    async fn with_pg_reopen(case: ReopenCase) {
        TempDatabase::with(ADMIN_URL, |url| async move { case(&PgReopen { url }).await }).await;
    }

    contract::store_contract_tests!(with_pg, with_pg_reopen);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_connecting_at_once_to_a_fresh_database_all_succeed() {
        TempDatabase::with(ADMIN_URL, |url| async move {
            let starts: Vec<_> = (0..4)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move { PgStore::connect(&url).await.map(|_| ()) })
                })
                .collect();
            for start in starts {
                start.await.unwrap().unwrap();
            }
            let applied = PgReopen { url }.applied_migrations().await;
            assert_eq!(applied.len(), MIGRATIONS.len(), "each migration recorded once");
        })
        .await;
    }

    #[tokio::test]
    async fn unreachable_server_is_an_error_without_the_password() {
        // Port 1 on loopback: nothing listens, so the connection is refused at once.
        let Err(e) = PgStore::connect("postgres://strait:hunter2@127.0.0.1:1/strait").await else {
            panic!("connected to nothing");
        };
        let message = e.to_string();
        assert!(
            message.contains("strait@127.0.0.1:1/strait"),
            "names the server: {message}"
        );
        assert!(!message.contains("hunter2"), "no password: {message}");
    }

    #[tokio::test]
    async fn malformed_url_is_an_error_without_the_password() {
        let Err(e) = PgStore::connect("postgres://strait:hunter2@127.0.0.1:notaport/strait").await else {
            panic!("accepted a malformed URL");
        };
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[tokio::test]
    #[should_panic(
        expected = "a Postgres server is needed here (admin URL postgres://postgres:***@127.0.0.1:1/postgres)"
    )]
    async fn temp_database_without_a_server_fails_loudly() {
        TempDatabase::create("postgres://postgres:hunter2@127.0.0.1:1/postgres").await;
    }

    #[test]
    fn temp_database_url_replaces_only_the_database_name() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1").unwrap(),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@db:5432?sslmode=disable", "t1").unwrap(),
            "postgres://u:p@db:5432/t1?sslmode=disable"
        );
        assert!(with_database("host=db user=u", "t1").is_err());
    }

    #[test]
    fn redacted_url_hides_only_the_password() {
        assert_eq!(
            redacted("postgres://u:secret@db:5432/x?a=b"),
            "postgres://u:***@db:5432/x?a=b"
        );
        assert_eq!(redacted("postgres://u@db/x"), "postgres://u@db/x");
    }
}
