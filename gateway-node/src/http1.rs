//! HTTP/1.1 framing for a caller's connection carried as bytes (`--http-relay connection`): the
//! gateway reads each request head to route it and writes it anew for the local service, then
//! follows both bodies and the answer's head only far enough to know where each exchange ends.
//! Body bytes pass as they came, never copied into a message or re-chunked.
//!
//! Strict on purpose: a message whose length two parsers could read differently (both
//! `content-length` and `transfer-encoding`, two lengths, a bare LF in chunked framing) is
//! refused, because the bytes after it are forwarded as the next request.

use std::net::IpAddr;

use bytes::{BufMut, BytesMut};
use http::Method;

use crate::error::Error;

/// Most bytes of one request head (and of one response head) taken; more is answered 431.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Most header lines in one head (nginx takes ~100 in its default 8 KiB buffers).
const MAX_HEADERS: usize = 128;

/// Longest chunk-size line (extensions included) or trailer line.
const MAX_LINE: usize = 4096;

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `transfer-encoding: chunked`: up to the last chunk and its trailers.
    Chunked,
    /// Until the sender closes (a response without a length only).
    UntilClose,
}

/// What the gateway needs of a caller's request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Bytes of the head, up to and including its blank line.
    pub head_len: usize,
    /// The method.
    pub method: Method,
    /// The minor version: `HTTP/1.0` or `HTTP/1.1`. The service is asked in the same version, so
    /// it never answers a 1.0 caller in a framing the caller cannot read (chunked).
    pub version: u8,
    /// The host it is for: an absolute-form target's authority, else `Host` (RFC 9112 §3.2.2).
    pub host: Option<String>,
    /// Its body.
    pub body: BodyLength,
    /// It asks to switch protocols (`Upgrade` and the `upgrade` connection option).
    pub upgrade: bool,
    /// The caller may send another request on this connection afterwards.
    pub keep_alive: bool,
}

/// What the gateway needs of a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// Bytes of the head, up to and including its blank line.
    pub head_len: usize,
    /// The status code.
    pub status: u16,
    /// Its body (none for 1xx, 204, 304 and answers to HEAD).
    pub body: BodyLength,
    /// The service will close the connection after it.
    pub close: bool,
}

fn malformed(why: &'static str) -> Error {
    Error::BadMessage { status: 400, why }
}

fn too_large(why: &'static str) -> Error {
    Error::BadMessage { status: 431, why }
}

/// The comma-separated tokens of every `name` header, lowercased.
fn tokens<'a>(headers: &'a [httparse::Header<'a>], name: &'a str) -> impl Iterator<Item = String> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| std::str::from_utf8(h.value).unwrap_or("").split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// The body framing both directions share: `transfer-encoding` (whose last coding must be
/// chunked on a request) or one `content-length`, never both.
fn framing(headers: &[httparse::Header<'_>], request: bool) -> Result<Option<BodyLength>, Error> {
    let codings: Vec<String> = tokens(headers, "transfer-encoding").collect();
    let mut length: Option<u64> = None;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length")) {
        for v in std::str::from_utf8(h.value).unwrap_or("x").split(',') {
            let v = v.trim();
            if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(malformed("invalid content-length"));
            }
            let n: u64 = v.parse().map_err(|_| malformed("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    if !codings.is_empty() {
        if length.is_some() {
            return Err(malformed("both content-length and transfer-encoding"));
        }
        return match codings.last().map(String::as_str) {
            Some("chunked") if codings.iter().filter(|c| *c == "chunked").count() == 1 => Ok(Some(BodyLength::Chunked)),
            _ if request => Err(malformed("request transfer-encoding must end with chunked")),
            _ => Ok(Some(BodyLength::UntilClose)),
        };
    }
    Ok(length.map(|n| {
        if n == 0 {
            BodyLength::Empty
        } else {
            BodyLength::Length(n)
        }
    }))
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => return Err(too_large("request head too large")),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(too_large("request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(too_large("too many request headers")),
        Err(_) => return Err(malformed("malformed request head")),
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| malformed("invalid method"))?;
    let target = req.path.unwrap_or("");
    let version = req.version.unwrap_or(1);
    let headers = req.headers;
    let authority = if target.starts_with('/') || target == "*" {
        None
    } else {
        let uri: http::Uri = target.parse().map_err(|_| malformed("invalid request target"))?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(a)) => Some(a.as_str().to_owned()),
            _ if method == Method::CONNECT => return Err(malformed("CONNECT is not served")),
            _ => return Err(malformed("invalid request target")),
        }
    };
    let mut hosts = headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(malformed("more than one host header"));
    }
    let host = match authority {
        Some(a) => Some(a),
        None => host_header
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned),
    };
    let body = match framing(headers, true)? {
        Some(BodyLength::Chunked) if version == 0 => return Err(malformed("chunked request in HTTP/1.0")),
        Some(b) => b,
        None => BodyLength::Empty,
    };
    let connection: Vec<String> = tokens(headers, "connection").collect();
    let upgrade = connection.iter().any(|t| t == "upgrade")
        && headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade") && !h.value.is_empty());
    let keep_alive = if version == 0 {
        connection.iter().any(|t| t == "keep-alive")
    } else {
        !connection.iter().any(|t| t == "close")
    };
    Ok(Some(Request {
        head_len,
        method,
        version,
        host,
        body,
        upgrade,
        keep_alive,
    }))
}

/// Headers that describe one connection, not the message; a proxy never forwards them (RFC 9110
/// §7.6.1), nor any the `Connection` header names. `transfer-encoding` is one too, but not here:
/// a carried body goes on exactly as the caller framed it (the request relay re-frames it, and
/// adds it: `ingress::is_hop_by_hop`).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Where a rewritten request head goes, and who it is from.
pub struct Rewrite<'a> {
    /// The local service's authority (its `Host`).
    pub authority: &'a str,
    /// Put in front of every request target.
    pub path_prefix: &'a str,
    /// The caller's address, appended to `x-forwarded-for`.
    pub peer: Option<IpAddr>,
}

/// Writes the request head `parsed` came from (`head`, as [`parse_request`] took it) for the
/// local service into `out`: the caller's version, origin-form target under the path prefix, the
/// service's `Host`, hop-by-hop headers dropped, `X-Forwarded-For/Proto/Host` set by us alone,
/// and the caller's choice to keep the connection or not.
pub fn rewrite_request(head: &[u8], parsed: &Request, to: &Rewrite<'_>, out: &mut BytesMut) -> Result<(), Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return Err(malformed("malformed request head"));
    }
    let target = req.path.unwrap_or("/");
    let target = match target.find("://") {
        // Absolute form: the path and query after the authority.
        Some(i) if !target.starts_with('/') => {
            let rest = &target[i + 3..];
            rest.find(['/', '?']).map_or("/", |j| &rest[j..])
        }
        _ => target,
    };
    let target = if target.starts_with('?') {
        format!("/{target}")
    } else {
        target.to_owned()
    };
    if target == "*" && !to.path_prefix.is_empty() {
        return Err(malformed("an asterisk target cannot go under a path prefix"));
    }
    let connection: Vec<String> = tokens(req.headers, "connection").collect();
    out.reserve(head.len() + to.authority.len() + 96);
    out.put_slice(parsed.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(to.path_prefix.as_bytes());
    out.put_slice(target.as_bytes());
    out.put_slice(if parsed.version == 0 {
        b" HTTP/1.0\r\nhost: "
    } else {
        b" HTTP/1.1\r\nhost: "
    });
    out.put_slice(to.authority.as_bytes());
    out.put_slice(b"\r\n");
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    let mut upgrade_to: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let name = h.name;
        let lower = |n: &str| name.eq_ignore_ascii_case(n);
        if lower("x-forwarded-for") {
            forwarded_for.push(h.value);
            continue;
        }
        if lower("upgrade") {
            upgrade_to = Some(h.value);
        }
        // The body's framing goes on whatever `Connection` names: dropping it would have the
        // service read the body as the next request.
        let framing = lower("content-length") || lower("transfer-encoding");
        if lower("host")
            || lower("x-forwarded-proto")
            || lower("x-forwarded-host")
            || HOP_BY_HOP.iter().any(|n| lower(n))
            || (!framing && connection.iter().any(|t| lower(t)))
        {
            continue;
        }
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(h.value);
        out.put_slice(b"\r\n");
    }
    match (parsed.upgrade, upgrade_to) {
        (true, Some(proto)) => {
            out.put_slice(b"connection: upgrade\r\nupgrade: ");
            out.put_slice(proto);
            out.put_slice(b"\r\n");
        }
        _ if parsed.version == 0 && parsed.keep_alive => out.put_slice(b"connection: keep-alive\r\n"),
        _ if parsed.version == 1 && !parsed.keep_alive => out.put_slice(b"connection: close\r\n"),
        _ => {}
    }
    if !forwarded_for.is_empty() || to.peer.is_some() {
        out.put_slice(b"x-forwarded-for: ");
        let mut first = true;
        for v in forwarded_for {
            if !first {
                out.put_slice(b", ");
            }
            out.put_slice(v);
            first = false;
        }
        if let Some(ip) = to.peer {
            if !first {
                out.put_slice(b", ");
            }
            out.put_slice(ip.to_string().as_bytes());
        }
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"x-forwarded-proto: http\r\nx-forwarded-host: ");
    out.put_slice(parsed.host.as_deref().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n\r\n");
    Ok(())
}

/// Parses the response head at the start of `buf` (the answer to a `method` request):
/// `Ok(None)` while it is incomplete. A malformed answer is the service's fault: status 502.
pub fn parse_response(buf: &[u8], method: &Method) -> Result<Option<Response>, Error> {
    let bad = |why| Error::BadMessage { status: 502, why };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD_BYTES => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(bad("response head from the service is too large")),
        Err(_) => return Err(bad("malformed response head from the service")),
    };
    let status = res.code.unwrap_or(0);
    if !(100..=599).contains(&status) {
        return Err(bad("invalid status from the service"));
    }
    let connection: Vec<String> = tokens(res.headers, "connection").collect();
    let close = if res.version == Some(0) {
        !connection.iter().any(|t| t == "keep-alive")
    } else {
        connection.iter().any(|t| t == "close")
    };
    let bodyless = status < 200 || status == 204 || status == 304 || *method == Method::HEAD;
    let body = if bodyless {
        BodyLength::Empty
    } else {
        match framing(res.headers, false).map_err(|_| bad("invalid body framing from the service"))? {
            Some(b) => b,
            None => BodyLength::UntilClose,
        }
    };
    Ok(Some(Response {
        head_len,
        status,
        body,
        close,
    }))
}

/// Follows one body through the bytes that carry it, so the next message's first byte is known.
/// Never needs bytes twice: chunk-size and trailer lines are read a byte at a time, so whatever
/// arrived can be passed on at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyCursor {
    state: Cursor,
    /// Bytes of the chunk-size or trailer line being read.
    line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cursor {
    Length(u64),
    /// Hex digits of a chunk size (the value so far).
    Size(u64, bool),
    /// A chunk extension, up to its CR.
    Extension(u64),
    /// The LF after a chunk size's CR.
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// The start of a trailer line, or of the blank line that ends the body.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    UntilClose,
    Done,
}

impl BodyCursor {
    /// A cursor at the start of a body framed as `len`.
    pub fn new(len: BodyLength) -> Self {
        let state = match len {
            BodyLength::Empty | BodyLength::Length(0) => Cursor::Done,
            BodyLength::Length(n) => Cursor::Length(n),
            BodyLength::Chunked => Cursor::Size(0, false),
            BodyLength::UntilClose => Cursor::UntilClose,
        };
        BodyCursor { state, line: 0 }
    }

    /// The body is complete: bytes after it belong to the next message.
    pub fn done(&self) -> bool {
        self.state == Cursor::Done
    }

    /// The body lasts until its sender closes.
    pub fn until_close(&self) -> bool {
        self.state == Cursor::UntilClose
    }

    /// Takes the body's bytes at the start of `buf`; returns how many there were. Fewer than
    /// `buf.len()` only once [`done`](Self::done).
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, Error> {
        let bad = |why| Error::BadMessage { status: 400, why };
        let mut i = 0;
        while i < buf.len() {
            match self.state {
                Cursor::Done => break,
                Cursor::UntilClose => return Ok(buf.len()),
                Cursor::Length(n) | Cursor::Data(n) => {
                    let take = n.min((buf.len() - i) as u64);
                    i += take as usize;
                    let left = n - take;
                    self.state = match (self.state, left) {
                        (Cursor::Length(_), 0) => Cursor::Done,
                        (Cursor::Length(_), l) => Cursor::Length(l),
                        (_, 0) => Cursor::DataCr,
                        (_, l) => Cursor::Data(l),
                    };
                    continue;
                }
                _ => {}
            }
            let b = buf[i];
            i += 1;
            self.line += 1;
            if self.line > MAX_LINE {
                return Err(bad("chunk-size or trailer line too long"));
            }
            self.state = match (self.state, b) {
                (Cursor::Size(n, _), b) if b.is_ascii_hexdigit() => {
                    if n >> 60 != 0 {
                        return Err(bad("chunk size too large"));
                    }
                    Cursor::Size(n << 4 | u64::from((b as char).to_digit(16).unwrap_or(0)), true)
                }
                (Cursor::Size(n, true), b';' | b' ' | b'\t') => Cursor::Extension(n),
                (Cursor::Size(n, true) | Cursor::Extension(n), b'\r') => Cursor::SizeLf(n),
                (Cursor::Extension(n), b) if b != b'\n' => Cursor::Extension(n),
                (Cursor::SizeLf(0), b'\n') => {
                    self.line = 0;
                    Cursor::TrailerStart
                }
                (Cursor::SizeLf(n), b'\n') => {
                    self.line = 0;
                    Cursor::Data(n)
                }
                (Cursor::DataCr, b'\r') => Cursor::DataLf,
                (Cursor::DataLf, b'\n') => {
                    self.line = 0;
                    Cursor::Size(0, false)
                }
                (Cursor::TrailerStart, b'\r') => Cursor::EndLf,
                (Cursor::EndLf, b'\n') => Cursor::Done,
                (Cursor::Trailer, b'\r') => Cursor::TrailerLf,
                (Cursor::TrailerStart | Cursor::Trailer, b) if b != b'\n' => Cursor::Trailer,
                (Cursor::TrailerLf, b'\n') => {
                    self.line = 0;
                    Cursor::TrailerStart
                }
                _ => return Err(bad("malformed chunked body")),
            };
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<Option<Request>, Error> {
        parse_request(s.as_bytes())
    }

    fn status_of(e: Error) -> u16 {
        match e {
            Error::BadMessage { status, .. } => status,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn a_request_head_is_parsed_once_complete() {
        assert_eq!(req("GET / HTTP/1.1\r\nHost: a.localhost\r\n").unwrap(), None);
        let r = req("GET /x?y HTTP/1.1\r\nHost: a.localhost:8080\r\n\r\nNEXT")
            .unwrap()
            .unwrap();
        assert_eq!(r.head_len, "GET /x?y HTTP/1.1\r\nHost: a.localhost:8080\r\n\r\n".len());
        assert_eq!(r.host.as_deref(), Some("a.localhost:8080"));
        assert_eq!((r.body, r.upgrade, r.keep_alive), (BodyLength::Empty, false, true));
        let r = req("GET http://b.localhost/p HTTP/1.1\r\nHost: a.localhost\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.host.as_deref(), Some("b.localhost"), "absolute form wins over Host");
        let r = req("POST / HTTP/1.0\r\nhost: a\r\ncontent-length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.body, r.keep_alive), (BodyLength::Length(5), false));
        let r = req("GET / HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.keep_alive);
        let r = req("POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.body, r.keep_alive), (BodyLength::Chunked, false));
        let r = req("GET /ws HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, Upgrade\r\nupgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.upgrade);
        let r = req("GET /ws HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.upgrade, "upgrade without the connection option is not one");
    }

    #[test]
    fn ambiguous_or_oversized_requests_are_refused() {
        for bad in [
            "GET / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\ncontent-length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\ncontent-length: +5\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nhost: a\r\n\r\n",
            "GET / HTTP/2.0\r\nhost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nho st: a\r\n\r\n",
        ] {
            assert_eq!(status_of(req(bad).unwrap_err()), 400, "{bad:?}");
        }
        let r = req("GET / HTTP/1.1\r\nhost: a\r\ncontent-length: 5, 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyLength::Length(5), "a repeated equal length is one length");
        let big = format!("GET / HTTP/1.1\r\nhost: a\r\nx: {}\r\n\r\n", "v".repeat(MAX_HEAD_BYTES));
        assert_eq!(status_of(req(&big).unwrap_err()), 431);
        assert_eq!(
            status_of(req(&big[..MAX_HEAD_BYTES]).unwrap_err()),
            431,
            "even before it ends"
        );
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "x: y\r\n".repeat(MAX_HEADERS + 1));
        assert_eq!(status_of(req(&many).unwrap_err()), 431);
    }

    #[test]
    fn the_head_is_rewritten_for_the_local_service() {
        let head = "POST http://a.localhost/p/q?r=1 HTTP/1.0\r\nHost: a.localhost\r\nConnection: x-private\r\n\
                    X-Private: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: evil\r\n\
                    Content-Length: 3\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\nx-forwarded-for: 10.0.0.2\r\n\r\n";
        let parsed = req(head).unwrap().unwrap();
        let mut out = BytesMut::new();
        let to = Rewrite {
            authority: "127.0.0.1:3000",
            path_prefix: "/base",
            peer: Some("127.0.0.9".parse().unwrap()),
        };
        rewrite_request(head.as_bytes(), &parsed, &to, &mut out).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "POST /base/p/q?r=1 HTTP/1.0\r\nhost: 127.0.0.1:3000\r\nContent-Length: 3\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.9\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: a.localhost\r\n\r\n"
        );
        let head =
            "GET /ws HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: k\r\n\r\n";
        let parsed = req(head).unwrap().unwrap();
        let mut out = BytesMut::new();
        let to = Rewrite {
            authority: "svc",
            path_prefix: "",
            peer: None,
        };
        rewrite_request(head.as_bytes(), &parsed, &to, &mut out).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "GET /ws HTTP/1.1\r\nhost: svc\r\nsec-websocket-key: k\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: a\r\n\r\n"
        );
    }

    /// A `Connection` header cannot take the body's framing away from the service.
    #[test]
    fn connection_cannot_name_the_framing_away() {
        let to = Rewrite {
            authority: "svc",
            path_prefix: "",
            peer: None,
        };
        for (framing, header) in [
            (BodyLength::Chunked, "transfer-encoding: chunked"),
            (BodyLength::Length(4), "content-length: 4"),
        ] {
            let head = format!(
                "POST / HTTP/1.1\r\nhost: a\r\nconnection: transfer-encoding, content-length\r\n{header}\r\n\r\n"
            );
            let parsed = req(&head).unwrap().unwrap();
            let mut out = BytesMut::new();
            rewrite_request(head.as_bytes(), &parsed, &to, &mut out).unwrap();
            assert_eq!(parse_request(&out).unwrap().unwrap().body, framing);
        }
    }

    #[test]
    fn response_framing_follows_status_method_and_headers() {
        let get = Method::GET;
        let r = |s: &str, m: &Method| parse_response(s.as_bytes(), m);
        assert_eq!(r("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n", &get).unwrap(), None);
        let ok = r("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", &get)
            .unwrap()
            .unwrap();
        assert_eq!((ok.status, ok.body, ok.close), (200, BodyLength::Length(2), false));
        assert_eq!(ok.head_len, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n".len());
        let head = r("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", &Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(head.body, BodyLength::Empty);
        for s in [
            "HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\n",
        ] {
            assert_eq!(r(s, &get).unwrap().unwrap().body, BodyLength::Empty, "{s:?}");
        }
        let chunked = r("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", &get)
            .unwrap()
            .unwrap();
        assert_eq!(chunked.body, BodyLength::Chunked);
        let open = r("HTTP/1.0 200 OK\r\n\r\n", &get).unwrap().unwrap();
        assert_eq!((open.body, open.close), (BodyLength::UntilClose, true));
        let close = r(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            &get,
        )
        .unwrap()
        .unwrap();
        assert_eq!((close.body, close.close), (BodyLength::Empty, true));
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTP/1.1 200\r\n\r\n",
        ] {
            assert_eq!(status_of(r(bad, &get).unwrap_err()), 502, "{bad:?}");
        }
    }

    fn walk(len: BodyLength, bytes: &[u8], step: usize) -> Result<(usize, bool), Error> {
        let mut c = BodyCursor::new(len);
        let mut at = 0;
        for piece in bytes.chunks(step) {
            let n = c.advance(piece)?;
            at += n;
            if n < piece.len() {
                break;
            }
        }
        Ok((at, c.done()))
    }

    #[test]
    fn chunked_bodies_end_at_the_same_byte_however_they_are_split() {
        let body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n";
        let mut with_next = body.to_vec();
        with_next.extend_from_slice(b"GET / HTTP/1.1\r\n");
        for step in 1..=with_next.len() {
            assert_eq!(
                walk(BodyLength::Chunked, &with_next, step).unwrap(),
                (body.len(), true),
                "step {step}"
            );
        }
        assert_eq!(walk(BodyLength::Chunked, b"0\r\n\r\n", 1).unwrap(), (5, true));
        assert_eq!(walk(BodyLength::Chunked, b"5\r\nhel", 2).unwrap(), (6, false));
        assert_eq!(walk(BodyLength::Length(3), b"abcdef", 2).unwrap(), (3, true));
        assert_eq!(walk(BodyLength::UntilClose, b"abcdef", 4).unwrap(), (6, false));
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"\r\n",
            b"g\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"11111111111111111\r\n",
        ] {
            assert_eq!(
                status_of(walk(BodyLength::Chunked, bad, 1).unwrap_err()),
                400,
                "{bad:?}"
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_LINE));
        assert!(walk(BodyLength::Chunked, long.as_bytes(), 7).is_err());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn token() -> impl Strategy<Value = String> {
            "h-[a-z0-9-]{0,12}"
        }

        /// A well-formed request head: method, target, headers (some hop-by-hop, some forwarded),
        /// and at most one of the two body framings.
        fn request() -> impl Strategy<Value = (String, BodyLength)> {
            let framing = prop_oneof![
                Just(BodyLength::Empty),
                (1u64..1 << 40).prop_map(BodyLength::Length),
                Just(BodyLength::Chunked)
            ];
            let header = prop_oneof![
                (token(), "[ -~&&[^ ]][ -~]{0,20}").prop_map(|(n, v)| format!("{n}: {v}")),
                Just("Connection: close".to_owned()),
                Just("Connection: keep-alive, x-drop".to_owned()),
                Just("X-Drop: 1".to_owned()),
                Just("X-Forwarded-Host: evil.example".to_owned()),
                Just("Upgrade: websocket".to_owned()),
                Just("TE: trailers".to_owned())
            ];
            (
                prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("HEAD"), Just("DELETE")],
                "/[a-z0-9/._-]{0,20}(\\?[a-z0-9=&]{0,10})?",
                any::<bool>(),
                prop::collection::vec(header, 0..8),
                framing,
            )
                .prop_map(|(method, target, v10, headers, framing)| {
                    let mut head = format!(
                        "{method} {target} HTTP/1.{}\r\nHost: a.localhost\r\n",
                        if v10 { 0 } else { 1 }
                    );
                    for h in headers {
                        head.push_str(&h);
                        head.push_str("\r\n");
                    }
                    let framing = match framing {
                        BodyLength::Chunked if v10 => BodyLength::Empty,
                        f => f,
                    };
                    match framing {
                        BodyLength::Length(n) => head.push_str(&format!("Content-Length: {n}\r\n")),
                        BodyLength::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
                        _ => {}
                    }
                    head.push_str("\r\n");
                    (head, framing)
                })
        }

        proptest! {
            /// The head the service gets frames the body exactly as the caller's did, for the same
            /// method and connection choice, and carries none of the caller's forwarded headers
            /// or anything its `Connection` named.
            #[test]
            fn a_rewritten_head_parses_to_the_same_message((head, framing) in request()) {
                let parsed = parse_request(head.as_bytes()).unwrap().unwrap();
                prop_assert_eq!(parsed.body, framing);
                let mut out = BytesMut::new();
                let to = Rewrite { authority: "127.0.0.1:9", path_prefix: "/p", peer: None };
                rewrite_request(head.as_bytes(), &parsed, &to, &mut out).unwrap();
                let again = parse_request(&out).unwrap().unwrap();
                prop_assert_eq!(again.head_len, out.len());
                prop_assert_eq!(&again.method, &parsed.method);
                prop_assert_eq!(again.body, parsed.body);
                prop_assert_eq!(again.keep_alive, parsed.keep_alive);
                prop_assert_eq!(again.upgrade, parsed.upgrade);
                prop_assert_eq!(again.host.as_deref(), Some("127.0.0.1:9"));
                let text = String::from_utf8(out.to_vec()).unwrap().to_ascii_lowercase();
                prop_assert!(!text.contains("evil.example") && !text.contains("\r\nte:"));
                if head.contains("x-drop\r\n") {
                    prop_assert!(!text.contains("x-drop"), "a header `Connection` named went on");
                }
            }

            /// However a body's bytes are split, it ends at the same byte or fails the same way.
            #[test]
            fn a_cursor_does_not_depend_on_how_bytes_arrive(
                bytes in prop::collection::vec(prop_oneof![Just(b'0'), Just(b'5'), Just(b'a'), Just(b';'), Just(b'\r'), Just(b'\n'), any::<u8>()], 0..64),
                step in 1usize..9,
            ) {
                let whole = {
                    let mut c = BodyCursor::new(BodyLength::Chunked);
                    c.advance(&bytes).map(|n| (n, c.done()))
                };
                let split = {
                    let mut c = BodyCursor::new(BodyLength::Chunked);
                    let mut at = 0;
                    let mut res = Ok((0, false));
                    for piece in bytes.chunks(step) {
                        match c.advance(piece) {
                            Ok(n) => {
                                at += n;
                                res = Ok((at, c.done()));
                                if n < piece.len() {
                                    break;
                                }
                            }
                            Err(e) => {
                                res = Err(e);
                                break;
                            }
                        }
                    }
                    res
                };
                match (whole, split) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                    (Err(_), Err(_)) => {}
                    (a, b) => prop_assert!(false, "whole {:?} vs split {:?}", a, b),
                }
            }

            /// Anything at all: an answer or a refusal, never a panic.
            #[test]
            fn any_bytes_are_parsed_or_refused(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                let _ = parse_request(&bytes);
                let _ = parse_response(&bytes, &Method::GET);
                let _ = BodyCursor::new(BodyLength::Chunked).advance(&bytes);
            }
        }
    }
}
