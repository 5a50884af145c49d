//! Durable state: agents and their keys (later: routes, sessions, grants, audit). Behind the
//! [`Store`] trait so a single node runs on an embedded SQLite file and a cluster on Postgres,
//! with the same numbered migrations.

#[cfg(test)]
mod contract;
pub mod postgres;
mod sqlite;

use async_trait::async_trait;
use strait_schema::{AgentName, Secret};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::error::Error;

/// Numbered migrations, applied in order at start by every store. One set of files for SQLite and
/// Postgres, so each is written in the SQL both accept (`BYTEA`, `BIGINT`, `IF NOT EXISTS`).
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "agents", include_str!("migrations/0001_agents.sql")),
    (2, "routes", include_str!("migrations/0002_routes.sql")),
    (3, "route_node", include_str!("migrations/0003_route_node.sql")),
];

/// The table where every store records which migrations it applied, and with which checksum.
const SCHEMA_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)";

/// FNV-1a of the migration text: detects edits to an applied migration (not a security check).
fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A gateway TCP port mapped to an agent's named service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Where the gateway listens (`127.0.0.1:2222`).
    pub listen: std::net::SocketAddr,
    /// Agent that serves it.
    pub agent: AgentName,
    /// The agent's TCP service name.
    pub service: String,
    /// Only this node listens for the route (`None`: every node does).
    pub node: Option<String>,
}

impl Route {
    /// Whether node `node_id` should listen for this route.
    pub fn served_by(&self, node_id: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == node_id)
    }
}

/// One agent identity as stored.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    /// Agent name.
    pub name: AgentName,
    /// Id of the agent's current key.
    pub key_id: String,
    /// HMAC key for handshakes.
    pub secret: Secret,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<u64>,
}

/// Durable state shared by every node of a deployment.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates an agent, or re-creates a revoked one with a fresh key. Refuses an active name.
    async fn create_agent(&self, record: AgentRecord) -> Result<(), Error>;
    /// Looks an agent up by name (revoked ones included, so the refusal can say "revoked").
    async fn agent(&self, name: &AgentName) -> Result<Option<AgentRecord>, Error>;
    /// Every agent, by name.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, Error>;
    /// Marks an agent revoked at `at_ms`. Errors if no such agent.
    async fn revoke_agent(&self, name: &AgentName, at_ms: u64) -> Result<(), Error>;
    /// Agents revoked at or after `since_ms`, with when; nodes poll this to drop connected agents.
    async fn revoked_since(&self, since_ms: u64) -> Result<Vec<(AgentName, u64)>, Error>;
    /// Adds a TCP route. Refuses a listen address that is already routed.
    async fn add_route(&self, route: Route) -> Result<(), Error>;
    /// Every TCP route, by listen address.
    async fn list_routes(&self) -> Result<Vec<Route>, Error>;
    /// Removes the route on `listen`. Errors if there is none.
    async fn remove_route(&self, listen: std::net::SocketAddr) -> Result<(), Error>;
    /// Cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), Error>;
}

/// Checks a stored route row; a row a newer or broken writer left behind is an error, not a panic.
fn route_from_row((listen, agent, service, node): (String, String, String, Option<String>)) -> Result<Route, Error> {
    Ok(Route {
        listen: listen
            .parse()
            .map_err(|_| Error::Store(format!("stored route address {listen:?} is invalid")))?,
        agent: AgentName::new(&agent)
            .ok_or_else(|| Error::Store(format!("stored route agent {agent:?} is invalid")))?,
        service,
        node,
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
