//! Agent configuration, parsed once into types: where to dial, who we are, what we expose.
//!
//! Three sources feed it, highest first: command-line flags, their `STRAIT_*` environment twins
//! (both handled by clap in `main.rs`), then an optional TOML file read with
//! [`Settings::from_toml`]. The file uses the flags' names:
//!
//! ```toml
//! gateway = ["wss://gw1.example.com", "wss://gw2.example.com"]  # or one string
//! token = "st1.alpha.k1.c2VjcmV0..."
//! instance-id = "web-1"        # optional; random per process otherwise
//! max-backoff = 30             # seconds, optional
//! drain-timeout = 30           # seconds, optional
//! threads = 1                  # runtime threads, optional
//! expose = ["http://127.0.0.1:3000", "ssh=tcp://127.0.0.1:22"]
//! ```
//!
//! A list given on the command line or in the environment (`gateway`, `expose`) replaces the
//! file's list rather than adding to it, so a flag always says exactly what runs.

use std::collections::HashSet;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use serde::Deserialize;
use strait_schema::{is_short_id, AgentToken, ServiceDecl, ServiceKind};

use crate::Error;

/// Path used when a gateway URL names none: the gateway's agent endpoint.
pub const DEFAULT_CONNECT_PATH: &str = "/v1/connect";

/// Reconnect delay ceiling when none is configured.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long a shutdown waits for in-flight streams when none is configured.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Most runtime threads accepted: beyond this a typo, not a machine.
pub const MAX_THREADS: usize = 256;

/// A gateway endpoint, normalised to `ws://` or `wss://` with a non-root path, so operators can
/// paste the gateway's plain `https://` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUrl(String);

impl GatewayUrl {
    /// Accepts `ws`, `wss`, `http` (as `ws`) and `https` (as `wss`); an empty or `/` path becomes
    /// [`DEFAULT_CONNECT_PATH`].
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |why| Error::GatewayUrl { url: s.to_owned(), why };
        let uri: Uri = s.trim().parse().map_err(|_| bad("not a URL"))?;
        let scheme = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("ws" | "http") => "ws",
            Some("wss" | "https") => "wss",
            Some(_) => return Err(bad("scheme must be ws, wss, http or https")),
            None => return Err(bad("missing scheme (ws://, wss://, http:// or https://)")),
        };
        let authority = uri.authority().ok_or_else(|| bad("missing host"))?;
        if authority.host().is_empty() {
            return Err(bad("missing host"));
        }
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        let path_and_query = match uri.path_and_query() {
            Some(pq) if !(pq.path().is_empty() || pq.path() == "/") => pq.as_str().to_owned(),
            Some(pq) => match pq.query() {
                Some(q) => format!("{DEFAULT_CONNECT_PATH}?{q}"),
                None => DEFAULT_CONNECT_PATH.to_owned(),
            },
            None => DEFAULT_CONNECT_PATH.to_owned(),
        };
        Ok(GatewayUrl(format!("{scheme}://{authority}{path_and_query}")))
    }

    /// The normalised URL.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for GatewayUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an HTTP service lives: scheme, authority (also sent as `Host`), and a path prefix that
/// is put in front of every forwarded request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host[:port]` of the local service.
    pub authority: Authority,
    /// Path prefix without a trailing `/` (empty for none).
    pub path_prefix: String,
}

/// Where a raw TCP service lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTarget {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl TcpTarget {
    /// `host:port`, for dialling and for reasons shown to callers.
    pub fn addr(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The local endpoint behind a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceTarget {
    /// Forwarded HTTP exchanges.
    Http(HttpTarget),
    /// Forwarded byte streams.
    Tcp(TcpTarget),
}

/// One exposed service. The agent dials nothing but these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Name announced to the gateway; `""` is the default HTTP service.
    pub name: String,
    /// Where requests for it go.
    pub target: ServiceTarget,
}

impl Service {
    /// Parses `[NAME=]URL`: `http://` / `https://` URLs are HTTP services, `tcp://host:port`
    /// is a byte-stream service. Without `NAME=` it is the default (HTTP) service.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Expose {
            spec: spec.to_owned(),
            why: why.to_owned(),
        };
        let spec_t = spec.trim();
        // `NAME=` only when what precedes the first `=` cannot be part of a URL's scheme part,
        // so `http://host/?a=b` stays one URL.
        let (name, url) = match spec_t.split_once('=') {
            Some((n, u)) if !n.contains("://") && !n.contains('/') => (n.trim(), u.trim()),
            _ => ("", spec_t),
        };
        if spec_t.starts_with('=') {
            return Err(bad("empty name; leave out `NAME=` for the default service"));
        }
        if !name.is_empty() && !is_short_id(name) {
            return Err(bad("name must be 1-64 characters of [A-Za-z0-9._-]"));
        }
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let authority = uri.authority().cloned().ok_or_else(|| bad("missing host"))?;
        if authority.host().is_empty() {
            return Err(bad("missing host"));
        }
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        let target = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some(s @ ("http" | "https")) => {
                if uri.query().is_some() {
                    return Err(bad("a service URL cannot carry a query"));
                }
                let path_prefix = uri.path().trim_end_matches('/').to_owned();
                let scheme = if s == "https" { Scheme::HTTPS } else { Scheme::HTTP };
                ServiceTarget::Http(HttpTarget {
                    scheme,
                    authority,
                    path_prefix,
                })
            }
            Some("tcp") => {
                if !(uri.path().is_empty() || uri.path() == "/") || uri.query().is_some() {
                    return Err(bad("a tcp:// URL is only host:port"));
                }
                let port = authority.port_u16().ok_or_else(|| bad("tcp:// needs a port"))?;
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                ServiceTarget::Tcp(TcpTarget { host, port })
            }
            _ => return Err(bad("scheme must be http, https or tcp")),
        };
        if name.is_empty() && matches!(target, ServiceTarget::Tcp(_)) {
            return Err(bad("the default (unnamed) service must be HTTP; name tcp services"));
        }
        Ok(Service {
            name: name.to_owned(),
            target,
        })
    }

    /// HTTP or byte stream.
    pub fn kind(&self) -> ServiceKind {
        match self.target {
            ServiceTarget::Http(_) => ServiceKind::Http,
            ServiceTarget::Tcp(_) => ServiceKind::Tcp,
        }
    }

    /// How the service is announced in `Hello`.
    pub fn decl(&self) -> ServiceDecl {
        ServiceDecl {
            name: self.name.clone(),
            kind: self.kind(),
        }
    }
}

/// Everything the agent needs to run. Build it with [`AgentConfig::new`] and
/// [`AgentConfig::expose`], or field by field; [`AgentConfig::validate`] runs before use.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Gateway endpoints, tried in turn: each failed attempt moves to the next one.
    pub gateways: Vec<GatewayUrl>,
    /// Name, key id and secret (never logged).
    pub token: AgentToken,
    /// Identifies this agent process to the cluster; stable across its reconnects.
    pub instance_id: String,
    /// Services announced in `Hello`; at most one default (unnamed) HTTP service.
    pub services: Vec<Service>,
    /// Ceiling of the reconnect backoff.
    pub max_backoff: Duration,
    /// How long a shutdown (or a connection told to go away) waits for in-flight streams.
    pub drain_timeout: Duration,
    /// Threads of the runtime the agent builds for itself ([`crate::runtime`]). One by default:
    /// a request then never hops between threads, which costs more CPU than the relay itself on
    /// a small machine; raise it for an agent that carries many busy streams on a big one.
    pub threads: usize,
}

impl AgentConfig {
    /// A config for one gateway with no services yet, a random instance id and default timings.
    pub fn new(gateway: &str, token: AgentToken) -> Result<Self, Error> {
        Ok(AgentConfig {
            gateways: vec![GatewayUrl::parse(gateway)?],
            token,
            instance_id: random_instance_id(),
            services: Vec::new(),
            max_backoff: DEFAULT_MAX_BACKOFF,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            threads: 1,
        })
    }

    /// Adds a service given as `[NAME=]URL` (see [`Service::parse`]).
    pub fn expose(mut self, spec: &str) -> Result<Self, Error> {
        self.services.push(Service::parse(spec)?);
        self.validate()?;
        Ok(self)
    }

    /// Checks what a single field cannot: at least one gateway, unique service names, a valid
    /// instance id.
    pub fn validate(&self) -> Result<(), Error> {
        if self.gateways.is_empty() {
            return Err(Error::Config(
                "no gateway URL given (--gateway / STRAIT_GATEWAY)".into(),
            ));
        }
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(Error::Config(format!("threads must be 1-{MAX_THREADS}")));
        }
        if !is_short_id(&self.instance_id) {
            return Err(Error::Config(
                "instance id must be 1-64 characters of [A-Za-z0-9._-]".into(),
            ));
        }
        let mut seen = HashSet::new();
        for s in &self.services {
            if !seen.insert(s.name.as_str()) {
                return Err(Error::Config(if s.name.is_empty() {
                    "more than one default (unnamed) service".to_owned()
                } else {
                    format!("service {:?} exposed twice", s.name)
                }));
            }
            if s.name.is_empty() && s.kind() != ServiceKind::Http {
                return Err(Error::Config("the default (unnamed) service must be HTTP".into()));
            }
        }
        Ok(())
    }
}

/// A fresh instance id, so two processes sharing a token are told apart.
pub fn random_instance_id() -> String {
    format!("i-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// One layer of settings (file, or flags plus environment) before defaults are applied.
/// `main.rs` fills one from clap, one from the file, and merges them with [`Settings::over`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Gateway URLs (raw).
    pub gateway: Vec<String>,
    /// Token string (raw; never printed).
    pub token: Option<String>,
    /// Instance id.
    pub instance_id: Option<String>,
    /// `[NAME=]URL` service specs.
    pub expose: Vec<String>,
    /// Backoff ceiling, seconds.
    pub max_backoff: Option<f64>,
    /// Drain timeout, seconds.
    pub drain_timeout: Option<f64>,
    /// Runtime threads.
    pub threads: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileSettings {
    gateway: Option<OneOrMany>,
    token: Option<String>,
    instance_id: Option<String>,
    expose: Option<Vec<String>>,
    max_backoff: Option<f64>,
    drain_timeout: Option<f64>,
    threads: Option<usize>,
}

impl Settings {
    /// Reads the TOML file format described in the module docs. Unknown keys are errors, so a
    /// typo does not silently fall back to a default.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let f: FileSettings =
            toml::from_str(text).map_err(|e| Error::Config(format!("config file: {}", e.message())))?;
        Ok(Settings {
            gateway: match f.gateway {
                None => Vec::new(),
                Some(OneOrMany::One(s)) => vec![s],
                Some(OneOrMany::Many(v)) => v,
            },
            token: f.token,
            instance_id: f.instance_id,
            expose: f.expose.unwrap_or_default(),
            max_backoff: f.max_backoff,
            drain_timeout: f.drain_timeout,
            threads: f.threads,
        })
    }

    /// `self` layered over `lower`: scalars from `self` win when set; a non-empty list in `self`
    /// replaces `lower`'s list.
    pub fn over(self, lower: Settings) -> Settings {
        Settings {
            gateway: if self.gateway.is_empty() {
                lower.gateway
            } else {
                self.gateway
            },
            token: self.token.or(lower.token),
            instance_id: self.instance_id.or(lower.instance_id),
            expose: if self.expose.is_empty() {
                lower.expose
            } else {
                self.expose
            },
            max_backoff: self.max_backoff.or(lower.max_backoff),
            drain_timeout: self.drain_timeout.or(lower.drain_timeout),
            threads: self.threads.or(lower.threads),
        }
    }

    /// Applies defaults and parses every value into an [`AgentConfig`].
    pub fn into_config(self) -> Result<AgentConfig, Error> {
        let token = self
            .token
            .ok_or_else(|| Error::Config("no token given (--token / STRAIT_TOKEN)".into()))?;
        let token = AgentToken::parse(&token)?;
        let gateways = self
            .gateway
            .iter()
            .map(|g| GatewayUrl::parse(g))
            .collect::<Result<Vec<_>, _>>()?;
        let services = self
            .expose
            .iter()
            .map(|s| Service::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let cfg = AgentConfig {
            gateways,
            token,
            instance_id: self.instance_id.unwrap_or_else(random_instance_id),
            services,
            max_backoff: seconds("max-backoff", self.max_backoff)?.unwrap_or(DEFAULT_MAX_BACKOFF),
            drain_timeout: seconds("drain-timeout", self.drain_timeout)?.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            threads: self.threads.unwrap_or(1),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn seconds(what: &str, v: Option<f64>) -> Result<Option<Duration>, Error> {
    match v {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(_) => Err(Error::Config(format!(
            "{what} must be a number of seconds in (0, 86400]"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> String {
        "st1.alpha.k1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_owned()
    }

    #[test]
    fn gateway_url_maps_http_schemes_to_websocket() {
        assert_eq!(
            GatewayUrl::parse("http://gw:7070").unwrap().as_str(),
            "ws://gw:7070/v1/connect"
        );
        assert_eq!(
            GatewayUrl::parse("https://gw.example.com/").unwrap().as_str(),
            "wss://gw.example.com/v1/connect"
        );
        assert_eq!(
            GatewayUrl::parse("ws://127.0.0.1:1/").unwrap().as_str(),
            "ws://127.0.0.1:1/v1/connect"
        );
        assert_eq!(
            GatewayUrl::parse("WSS://gw/custom/path").unwrap().as_str(),
            "wss://gw/custom/path"
        );
        assert_eq!(
            GatewayUrl::parse("wss://gw/?region=eu").unwrap().as_str(),
            "wss://gw/v1/connect?region=eu"
        );
    }

    #[test]
    fn gateway_url_refuses_other_schemes_and_missing_hosts() {
        assert!(GatewayUrl::parse("ftp://gw").is_err());
        assert!(GatewayUrl::parse("gw:7070").is_err());
        assert!(GatewayUrl::parse("/v1/connect").is_err());
        assert!(GatewayUrl::parse("wss://user:pw@gw/").is_err());
        assert!(GatewayUrl::parse("").is_err());
    }

    #[test]
    fn expose_parses_default_named_and_tcp_services() {
        let s = Service::parse("http://127.0.0.1:3000").unwrap();
        assert_eq!(s.name, "");
        assert_eq!(s.kind(), ServiceKind::Http);
        let ServiceTarget::Http(t) = &s.target else { panic!() };
        assert_eq!(t.authority.as_str(), "127.0.0.1:3000");
        assert_eq!(t.path_prefix, "");

        let s = Service::parse("api=https://localhost:8443/base/").unwrap();
        assert_eq!(s.name, "api");
        let ServiceTarget::Http(t) = &s.target else { panic!() };
        assert_eq!(t.scheme, Scheme::HTTPS);
        assert_eq!(t.path_prefix, "/base");

        let s = Service::parse("ssh=tcp://127.0.0.1:22").unwrap();
        assert_eq!(s.kind(), ServiceKind::Tcp);
        assert_eq!(
            s.target,
            ServiceTarget::Tcp(TcpTarget {
                host: "127.0.0.1".into(),
                port: 22
            })
        );

        let s = Service::parse("db=tcp://[::1]:5432").unwrap();
        let ServiceTarget::Tcp(t) = &s.target else { panic!() };
        assert_eq!(t.addr(), "[::1]:5432");
    }

    #[test]
    fn expose_refuses_bad_specs() {
        assert!(Service::parse("tcp://127.0.0.1:22").is_err(), "default must be http");
        assert!(Service::parse("ssh=tcp://127.0.0.1").is_err(), "tcp needs a port");
        assert!(Service::parse("x=ftp://h").is_err());
        assert!(Service::parse("bad name=http://h").is_err());
        assert!(Service::parse("=http://h").is_err());
        assert!(Service::parse("web=").is_err());
        assert!(Service::parse("web=http://h/?q=1").is_err());
        assert!(Service::parse("web=127.0.0.1:80").is_err());
    }

    #[test]
    fn config_refuses_duplicate_services() {
        let cfg = AgentConfig::new("ws://gw", AgentToken::parse(&token()).unwrap()).unwrap();
        let cfg = cfg.expose("http://127.0.0.1:1").unwrap();
        assert!(cfg.clone().expose("http://127.0.0.1:2").is_err());
        let cfg = cfg.expose("a=http://127.0.0.1:2").unwrap();
        assert!(cfg.expose("a=tcp://127.0.0.1:3").is_err());
    }

    #[test]
    fn toml_file_parses_both_gateway_forms() {
        let s = Settings::from_toml(&format!(
            "gateway = \"https://gw\"\ntoken = \"{}\"\nexpose = [\"http://127.0.0.1:3000\", \"ssh=tcp://127.0.0.1:22\"]\nmax-backoff = 2.5\n",
            token()
        ))
        .unwrap();
        assert_eq!(s.gateway, vec!["https://gw".to_owned()]);
        assert_eq!(s.max_backoff, Some(2.5));
        let cfg = s.into_config().unwrap();
        assert_eq!(cfg.gateways[0].as_str(), "wss://gw/v1/connect");
        assert_eq!(cfg.services.len(), 2);
        assert_eq!(cfg.max_backoff, Duration::from_millis(2500));
        assert_eq!(cfg.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert!(cfg.instance_id.starts_with("i-"));

        let s = Settings::from_toml("gateway = [\"ws://a\", \"ws://b\"]\ninstance-id = \"web-1\"").unwrap();
        assert_eq!(s.gateway.len(), 2);
        assert_eq!(s.instance_id.as_deref(), Some("web-1"));
    }

    #[test]
    fn threads_default_to_one_and_are_bounded() {
        let parse = |extra: &str| {
            Settings::from_toml(&format!("gateway = \"ws://a\"\ntoken = \"{}\"\n{extra}", token()))
                .unwrap()
                .into_config()
        };
        assert_eq!(parse("").unwrap().threads, 1);
        assert_eq!(parse("threads = 4").unwrap().threads, 4);
        for bad in ["threads = 0", "threads = 257"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("threads must be 1-256"), "{bad}: {e}");
        }
        let flags = Settings {
            threads: Some(2),
            ..Settings::default()
        };
        let file = Settings {
            threads: Some(8),
            ..Settings::default()
        };
        assert_eq!(flags.over(file).threads, Some(2));
    }

    #[test]
    fn toml_file_refuses_unknown_keys() {
        assert!(Settings::from_toml("gatewey = \"ws://a\"").is_err());
    }

    #[test]
    fn flags_override_file_and_lists_replace() {
        let file = Settings {
            gateway: vec!["ws://file".into()],
            token: Some(token()),
            expose: vec!["http://127.0.0.1:1".into()],
            drain_timeout: Some(5.0),
            ..Settings::default()
        };
        let flags = Settings {
            gateway: vec!["ws://flag".into()],
            max_backoff: Some(1.0),
            ..Settings::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.gateway, vec!["ws://flag".to_owned()]);
        assert_eq!(merged.expose, vec!["http://127.0.0.1:1".to_owned()]);
        assert_eq!(merged.max_backoff, Some(1.0));
        assert_eq!(merged.drain_timeout, Some(5.0));
        assert!(merged.token.is_some());
    }

    #[test]
    fn settings_require_token_and_gateway_and_sane_seconds() {
        let base = Settings {
            gateway: vec!["ws://a".into()],
            token: Some(token()),
            ..Settings::default()
        };
        assert!(base.clone().into_config().is_ok());
        assert!(Settings {
            token: None,
            ..base.clone()
        }
        .into_config()
        .is_err());
        assert!(Settings {
            gateway: vec![],
            ..base.clone()
        }
        .into_config()
        .is_err());
        assert!(Settings {
            max_backoff: Some(-1.0),
            ..base.clone()
        }
        .into_config()
        .is_err());
        assert!(Settings {
            drain_timeout: Some(f64::NAN),
            ..base.clone()
        }
        .into_config()
        .is_err());
        assert!(Settings {
            token: Some("st1.nope".into()),
            ..base
        }
        .into_config()
        .is_err());
    }
}
