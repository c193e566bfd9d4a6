//! A small, strict subset of HTTP/1.1, enough for the Docker volume-plugin protocol: a server
//! over Unix sockets (any byte stream, really) and a client over Unix or TCP sockets.
//!
//! What is understood: a request line or status line, header fields, bodies framed by
//! `Content-Length` or `Transfer-Encoding: chunked` (Go's client sends chunked bodies when it
//! does not know the length up front), keep-alive and pipelined requests, `Expect:
//! 100-continue`. What is not: other transfer codings (501), HTTP/2 or 0.9 (505), obsolete
//! header line folding, bare-LF line ends, absolute-form request targets (all 400).
//!
//! Every read is bounded ([`Limits`]): the header section, the body, the time from a request's
//! first byte to its last, the idle time between kept-alive requests and the time to write a
//! response. Input that breaks a rule gets a response naming the rule and the connection is
//! closed, since its framing can no longer be trusted. No input panics.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;

/// The request line or status line plus all header fields, including the blank line.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// A message body after chunked decoding.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Header fields in one message.
pub const MAX_HEADER_COUNT: usize = 100;
/// From the first byte of a request to its last.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a kept-alive connection may wait for its next request. Go's client keeps idle
/// connections for 90 s and reconnects transparently when the server closed one first.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Writing one response to a peer that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 128;
/// After an error response, how long the server keeps reading (and discarding) what the
/// client still sends, so that closing does not reset the connection before the client has
/// read the response.
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
/// One chunk-size line of a chunked body (`1a2b;ext=value`).
const MAX_CHUNK_LINE_BYTES: usize = 1024;
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Empty lines skipped before a request line.
const MAX_LEADING_EMPTY_LINES: usize = 4;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: MAX_HEADER_BYTES,
            max_body_bytes: MAX_BODY_BYTES,
            request_timeout: REQUEST_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
    #[error("header section larger than {0} bytes")]
    HeaderTooLarge(usize),
    #[error("body larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("transfer coding {0:?} not supported (only \"chunked\")")]
    UnsupportedTransferEncoding(String),
    #[error("HTTP version {0:?} not supported (only HTTP/1.0 and HTTP/1.1)")]
    UnsupportedVersion(String),
    #[error("expectation {0:?} not supported (only \"100-continue\")")]
    UnsupportedExpectation(String),
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The peer closed the connection before the first byte of a message.
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("bad address {address:?}: {reason}")]
    BadAddress { address: String, reason: String },
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl HttpError {
    /// The status a server answers this error with; `None` when the connection is gone.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Malformed(_) | HttpError::Truncated => Some(400),
            HttpError::HeaderTooLarge(_) => Some(431),
            HttpError::BodyTooLarge(_) => Some(413),
            HttpError::UnsupportedTransferEncoding(_) => Some(501),
            HttpError::UnsupportedVersion(_) => Some(505),
            HttpError::UnsupportedExpectation(_) => Some(417),
            HttpError::Timeout(_) => Some(408),
            HttpError::Closed | HttpError::BadAddress { .. } | HttpError::Connect { .. } | HttpError::Io(_) => None,
        }
    }
}

fn malformed(what: impl Into<String>) -> HttpError {
    HttpError::Malformed(what.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    fn parse(text: &str) -> Result<Version, HttpError> {
        match text {
            "HTTP/1.1" => Ok(Version::Http11),
            "HTTP/1.0" => Ok(Version::Http10),
            _ if text.starts_with("HTTP/") => Err(HttpError::UnsupportedVersion(text.to_string())),
            _ => Err(malformed(format!("bad protocol version {text:?}"))),
        }
    }
}

/// Header fields in arrival order. Names compare case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first field named `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_all(name).next()
    }

    pub fn get_all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.0.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated field such as `Connection` holds `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.get_all(name).flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The origin-form target, e.g. `/VolumeDriver.Mount`.
    pub target: String,
    pub version: Version,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Request {
    /// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 closes unless told
    /// `keep-alive`.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.headers.has_token("connection", "close"),
            Version::Http10 => self.headers.has_token("connection", "keep-alive"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response { status, headers: Headers(vec![("Content-Type".to_string(), content_type.to_string())]), body }
    }

    pub fn text(status: u16, text: impl Into<String>) -> Response {
        let mut body = text.into().into_bytes();
        body.push(b'\n');
        Response::new(status, "text/plain; charset=utf-8", body)
    }
}

/// The reason phrase for the statuses this module and its users send.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing (pure functions over a complete header section)

/// A parsed request line and header fields.
#[derive(Debug)]
struct RequestHead {
    method: String,
    target: String,
    version: Version,
    headers: Headers,
}

#[derive(Debug)]
struct StatusHead {
    status: u16,
    headers: Headers,
}

fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// Splits a header section (ending in CRLF CRLF) into its first line and field lines.
fn split_head(head: &[u8]) -> Result<(&str, Vec<&str>), HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| malformed("header section is not UTF-8"))?;
    let text = text.strip_suffix("\r\n\r\n").ok_or_else(|| malformed("header section does not end in CRLF CRLF"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let fields: Vec<&str> = lines.collect();
    for line in std::iter::once(first).chain(fields.iter().copied()) {
        // CRs and LFs can only be left here unpaired: CRLF was the separator.
        if line.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(malformed("bare CR or LF in header section (lines must end in CRLF)"));
        }
    }
    Ok((first, fields))
}

fn parse_fields(lines: &[&str]) -> Result<Headers, HttpError> {
    if lines.len() > MAX_HEADER_COUNT {
        return Err(malformed(format!("more than {MAX_HEADER_COUNT} header fields")));
    }
    let mut headers = Vec::with_capacity(lines.len());
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(malformed("obsolete header line folding"));
        }
        let (name, value) =
            line.split_once(':').ok_or_else(|| malformed(format!("header line without ':': {line:?}")))?;
        if !is_token(name) {
            return Err(malformed(format!("bad header name {name:?}")));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.chars().any(|c| (c.is_control() && c != '\t') || c == '\u{7f}') {
            return Err(malformed(format!("control character in header {name:?}")));
        }
        headers.push((name.to_string(), value.to_string()));
    }
    Ok(Headers(headers))
}

fn parse_request_head(head: &[u8]) -> Result<RequestHead, HttpError> {
    let (line, fields) = split_head(head)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed(format!("request line is not \"METHOD /target HTTP/1.1\": {line:?}")));
    };
    if !is_token(method) {
        return Err(malformed(format!("bad method {method:?}")));
    }
    if !target.starts_with('/') || target.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(malformed(format!("request target must be an absolute path: {target:?}")));
    }
    let version = Version::parse(version)?;
    let headers = parse_fields(&fields)?;
    Ok(RequestHead { method: method.to_string(), target: target.to_string(), version, headers })
}

fn parse_status_head(head: &[u8]) -> Result<StatusHead, HttpError> {
    let (line, fields) = split_head(head)?;
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(malformed(format!("bad status line {line:?}")));
    };
    Version::parse(version)?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(format!("bad status code {code:?}")));
    }
    let status = code.parse().map_err(|_| malformed(format!("bad status code {code:?}")))?;
    Ok(StatusHead { status, headers: parse_fields(&fields)? })
}

#[derive(Debug, PartialEq, Eq)]
enum BodyFraming {
    None,
    Length(usize),
    Chunked,
    /// Responses only: the body runs to the end of the connection.
    UntilClose,
}

/// How a message's body is delimited. Both `Content-Length` and `Transfer-Encoding`, or
/// disagreeing lengths, are refused: they are how requests get smuggled past proxies.
fn body_framing(headers: &Headers, max_body_bytes: usize, is_request: bool) -> Result<BodyFraming, HttpError> {
    let codings: Vec<&str> = headers.get_all("transfer-encoding").collect();
    let lengths: Vec<&str> = headers.get_all("content-length").flat_map(|v| v.split(',')).map(str::trim).collect();
    if !codings.is_empty() {
        if !lengths.is_empty() {
            return Err(malformed("both Transfer-Encoding and Content-Length"));
        }
        let joined = codings.join(", ");
        if !joined.trim().eq_ignore_ascii_case("chunked") {
            return Err(HttpError::UnsupportedTransferEncoding(joined));
        }
        return Ok(BodyFraming::Chunked);
    }
    let Some(first) = lengths.first() else {
        return Ok(if is_request { BodyFraming::None } else { BodyFraming::UntilClose });
    };
    if lengths.iter().any(|l| l != first) {
        return Err(malformed("conflicting Content-Length values"));
    }
    if first.is_empty() || first.len() > 19 || !first.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(format!("bad Content-Length {first:?}")));
    }
    let length: u64 = first.parse().map_err(|_| malformed(format!("bad Content-Length {first:?}")))?;
    if length > max_body_bytes as u64 {
        return Err(HttpError::BodyTooLarge(max_body_bytes));
    }
    Ok(if length == 0 { BodyFraming::None } else { BodyFraming::Length(length as usize) })
}

/// The size in a chunk-size line, `hex[;extensions]`.
fn parse_chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let text = std::str::from_utf8(line).map_err(|_| malformed("chunk-size line is not UTF-8"))?;
    let size = text.split(';').next().unwrap_or_default().trim_end_matches([' ', '\t']);
    if size.is_empty() || size.len() > 15 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed(format!("bad chunk size {size:?}")));
    }
    u64::from_str_radix(size, 16).map_err(|_| malformed(format!("bad chunk size {size:?}")))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Connections

/// A byte stream with a read buffer; what is read past one message stays for the next
/// (pipelined requests, kept-alive connections).
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S) -> Conn<S> {
        Conn { stream, buf: Vec::new() }
    }

    /// Reads more bytes into the buffer; 0 at end of stream.
    async fn fill(&mut self) -> Result<usize, HttpError> {
        let mut chunk = [0u8; READ_BUFFER_BYTES];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Waits until at least one byte of a next message is buffered.
    async fn wait_for_data(&mut self) -> Result<(), HttpError> {
        while self.buf.is_empty() {
            if self.fill().await? == 0 {
                return Err(HttpError::Closed);
            }
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let rest = self.buf.split_off(n);
        std::mem::replace(&mut self.buf, rest)
    }

    /// The header section up to and including CRLF CRLF.
    async fn read_head(&mut self, max_header_bytes: usize) -> Result<Vec<u8>, HttpError> {
        let mut searched = 0;
        loop {
            if let Some(pos) = find(&self.buf[searched..], b"\r\n\r\n") {
                let end = searched + pos + 4;
                if end > max_header_bytes {
                    return Err(HttpError::HeaderTooLarge(max_header_bytes));
                }
                return Ok(self.take(end));
            }
            if self.buf.len() >= max_header_bytes {
                return Err(HttpError::HeaderTooLarge(max_header_bytes));
            }
            searched = self.buf.len().saturating_sub(3);
            if self.fill().await? == 0 {
                return Err(if self.buf.is_empty() { HttpError::Closed } else { HttpError::Truncated });
            }
        }
    }

    async fn read_exact_bytes(&mut self, n: usize) -> Result<Vec<u8>, HttpError> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(HttpError::Truncated);
            }
        }
        Ok(self.take(n))
    }

    /// One CRLF-terminated line, without the CRLF.
    async fn read_line(&mut self, max_bytes: usize, what: &str) -> Result<Vec<u8>, HttpError> {
        let mut searched = 0;
        loop {
            if let Some(pos) = find(&self.buf[searched..], b"\r\n") {
                let end = searched + pos;
                if end > max_bytes {
                    return Err(malformed(format!("{what} longer than {max_bytes} bytes")));
                }
                let mut line = self.take(end + 2);
                line.truncate(end);
                return Ok(line);
            }
            if self.buf.len() > max_bytes {
                return Err(malformed(format!("{what} longer than {max_bytes} bytes")));
            }
            searched = self.buf.len().saturating_sub(1);
            if self.fill().await? == 0 {
                return Err(HttpError::Truncated);
            }
        }
    }

    async fn read_chunked(&mut self, limits: &Limits) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(MAX_CHUNK_LINE_BYTES, "chunk-size line").await?;
            let size = parse_chunk_size(&line)?;
            if size == 0 {
                break;
            }
            if body.len() as u64 + size > limits.max_body_bytes as u64 {
                return Err(HttpError::BodyTooLarge(limits.max_body_bytes));
            }
            body.extend_from_slice(&self.read_exact_bytes(size as usize).await?);
            if self.read_exact_bytes(2).await? != b"\r\n" {
                return Err(malformed("chunk data not followed by CRLF"));
            }
        }
        // Trailer fields are read and dropped; they count against the header limit.
        let mut trailer_bytes = 0;
        loop {
            let line = self.read_line(limits.max_header_bytes, "trailer field").await?;
            if line.is_empty() {
                return Ok(body);
            }
            trailer_bytes += line.len() + 2;
            if trailer_bytes > limits.max_header_bytes {
                return Err(HttpError::HeaderTooLarge(limits.max_header_bytes));
            }
        }
    }

    async fn read_body(&mut self, framing: BodyFraming, limits: &Limits) -> Result<Vec<u8>, HttpError> {
        match framing {
            BodyFraming::None => Ok(Vec::new()),
            BodyFraming::Length(n) => self.read_exact_bytes(n).await,
            BodyFraming::Chunked => self.read_chunked(limits).await,
            BodyFraming::UntilClose => {
                while self.fill().await? > 0 {
                    if self.buf.len() > limits.max_body_bytes {
                        return Err(HttpError::BodyTooLarge(limits.max_body_bytes));
                    }
                }
                Ok(std::mem::take(&mut self.buf))
            }
        }
    }

    /// Reads one request. Answers `Expect: 100-continue` before reading the body.
    async fn read_request(&mut self, limits: &Limits) -> Result<Request, HttpError> {
        // A server should ignore empty lines before a request line (RFC 9112, 2.2); a few.
        for _ in 0..MAX_LEADING_EMPTY_LINES {
            if !self.buf.starts_with(b"\r\n") {
                break;
            }
            self.take(2);
            self.wait_for_data().await.map_err(|_| HttpError::Truncated)?;
        }
        let head = parse_request_head(&self.read_head(limits.max_header_bytes).await?)?;
        let framing = body_framing(&head.headers, limits.max_body_bytes, true)?;
        if let Some(expect) = head.headers.get("expect") {
            if !expect.eq_ignore_ascii_case("100-continue") {
                return Err(HttpError::UnsupportedExpectation(expect.to_string()));
            }
            if framing != BodyFraming::None && head.version == Version::Http11 && self.buf.is_empty() {
                self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                self.stream.flush().await?;
            }
        }
        let body = self.read_body(framing, limits).await?;
        Ok(Request { method: head.method, target: head.target, version: head.version, headers: head.headers, body })
    }

    async fn write_response(&mut self, response: &Response, keep_alive: bool) -> Result<(), HttpError> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, reason_phrase(response.status));
        for (name, value) in &response.headers.0 {
            let framing = name.eq_ignore_ascii_case("content-length")
                || name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("transfer-encoding");
            if !framing && is_token(name) && !value.contains(['\r', '\n']) {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        out.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
        out.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&response.body);
        self.stream.write_all(&bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Half-closes and reads what the peer still sends for a short while, so the peer sees
    /// the response rather than a reset.
    async fn linger_close(&mut self) {
        let _ = self.stream.shutdown().await;
        let drain = async {
            let mut scratch = [0u8; READ_BUFFER_BYTES];
            let mut total = 0;
            while total < MAX_BODY_BYTES {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = timeout(LINGER_TIMEOUT, drain).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// What a server does with requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;

    /// The response to a request that could not be read: malformed, too large or too slow.
    fn reject(&self, error: &HttpError) -> Response {
        Response::text(error.status().unwrap_or(400), error.to_string())
    }
}

/// Serves requests on one connection until the peer closes it, asks to close it, stays idle
/// for `limits.idle_timeout` or sends something unreadable (which gets an error response).
///
/// A handler call is never cancelled because the peer went away: a half-done mount would
/// leave the volume service's state behind the node's.
pub async fn serve_connection<S, H>(stream: S, handler: &H, limits: &Limits)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let mut conn = Conn::new(stream);
    loop {
        match timeout(limits.idle_timeout, conn.wait_for_data()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        let request = match timeout(limits.request_timeout, conn.read_request(limits)).await {
            Ok(Ok(request)) => request,
            Ok(Err(error)) => return reject(&mut conn, handler, limits, error).await,
            Err(_) => return reject(&mut conn, handler, limits, HttpError::Timeout("reading the request")).await,
        };
        let keep_alive = request.keep_alive();
        let response = handler.handle(request).await;
        match timeout(limits.write_timeout, conn.write_response(&response, keep_alive)).await {
            Ok(Ok(())) if keep_alive => {}
            Ok(Ok(())) => return conn.linger_close().await,
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

async fn reject<S, H>(conn: &mut Conn<S>, handler: &H, limits: &Limits, error: HttpError)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    if error.status().is_none() {
        return;
    }
    tracing::debug!(%error, "rejecting HTTP request");
    let response = handler.reject(&error);
    if let Ok(Ok(())) = timeout(limits.write_timeout, conn.write_response(&response, false)).await {
        conn.linger_close().await;
    }
}

/// Accepts connections on `listener` forever, at most `limits.max_connections` at a time,
/// each served by [`serve_connection`] in its own task.
pub async fn serve_unix<H: Handler>(listener: UnixListener, handler: Arc<H>, limits: Limits) {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and the like: wait for connections to finish instead of spinning.
                tracing::warn!(%error, "accepting a plugin connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            serve_connection(stream, handler.as_ref(), &limits).await;
            drop(slot);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// Where a server listens: `unix:///path/to.sock`, `tcp://host:port` (or `http://host:port`,
/// as Docker accepts it in `.spec` files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(String),
}

impl Address {
    pub fn parse(url: &str) -> Result<Address, HttpError> {
        let bad = |reason: &str| HttpError::BadAddress { address: url.to_string(), reason: reason.to_string() };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected unix://PATH or tcp://HOST:PORT"))?;
        match scheme {
            "unix" if rest.starts_with('/') => Ok(Address::Unix(PathBuf::from(rest))),
            "unix" => Err(bad("the socket path must be absolute (unix:///path)")),
            "tcp" | "http" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("expected HOST:PORT"))?;
                if host.is_empty() || host.contains('/') || port.parse::<u16>().is_err() {
                    return Err(bad("expected HOST:PORT"));
                }
                Ok(Address::Tcp(rest.to_string()))
            }
            "https" => Err(bad("TLS plugin addresses are not supported")),
            _ => Err(bad("unknown scheme (expected unix or tcp)")),
        }
    }

    fn host_header(&self) -> &str {
        match self {
            Address::Unix(_) => "localhost",
            Address::Tcp(host_port) => host_port,
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix://{}", path.display()),
            Address::Tcp(host_port) => write!(f, "tcp://{host_port}"),
        }
    }
}

/// A client connection's transport.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An HTTP client for one server. Keeps one idle connection for the next call.
pub struct Client {
    address: Address,
    limits: Limits,
    idle: tokio::sync::Mutex<Option<Conn<Stream>>>,
}

impl Client {
    pub fn new(address: Address) -> Client {
        Client { address, limits: Limits::default(), idle: tokio::sync::Mutex::new(None) }
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    /// One connection attempt.
    async fn connect(&self) -> Result<Conn<Stream>, HttpError> {
        let connect_error = |source| HttpError::Connect { address: self.address.to_string(), source };
        let stream = match &self.address {
            Address::Unix(path) => Stream::Unix(UnixStream::connect(path).await.map_err(connect_error)?),
            Address::Tcp(host_port) => {
                Stream::Tcp(TcpStream::connect(host_port.as_str()).await.map_err(connect_error)?)
            }
        };
        Ok(Conn::new(stream))
    }

    /// POSTs `body` to `target` and returns the response, whatever its status, within
    /// `call_timeout`. Failing to connect is [`HttpError::Connect`], safe to retry: nothing
    /// was sent.
    pub async fn post(
        &self,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        call_timeout: Duration,
    ) -> Result<Response, HttpError> {
        let request = self.encode_request(target, headers, body)?;
        timeout(call_timeout, self.exchange(&request))
            .await
            .map_err(|_| HttpError::Timeout("waiting for the response"))?
    }

    fn encode_request(&self, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Vec<u8>, HttpError> {
        if !target.starts_with('/') || target.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(malformed(format!("bad request target {target:?}")));
        }
        let mut out = format!("POST {target} HTTP/1.1\r\nHost: {}\r\n", self.address.host_header());
        for (name, value) in headers {
            if !is_token(name) || value.contains(['\r', '\n']) {
                return Err(malformed(format!("bad header {name:?}")));
            }
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        Ok(bytes)
    }

    async fn exchange(&self, request: &[u8]) -> Result<Response, HttpError> {
        let reused = self.idle.lock().await.take();
        if let Some(mut conn) = reused {
            match self.send_on(&mut conn, request).await {
                // The server closed the idle connection before reading the request (its idle
                // timeout): nothing was processed, so sending again on a new one is safe.
                Err(HttpError::Closed) => {}
                Err(HttpError::Io(e))
                    if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {}
                result => return self.keep(conn, result).await,
            }
        }
        let mut conn = self.connect().await?;
        let result = self.send_on(&mut conn, request).await;
        self.keep(conn, result).await
    }

    async fn keep(
        &self,
        conn: Conn<Stream>,
        result: Result<(Response, bool), HttpError>,
    ) -> Result<Response, HttpError> {
        let (response, reusable) = result?;
        if reusable {
            *self.idle.lock().await = Some(conn);
        }
        Ok(response)
    }

    /// Sends one request and reads its response; the flag says whether the connection may
    /// carry another.
    async fn send_on(&self, conn: &mut Conn<Stream>, request: &[u8]) -> Result<(Response, bool), HttpError> {
        conn.stream.write_all(request).await?;
        conn.stream.flush().await?;
        loop {
            let head = parse_status_head(&conn.read_head(self.limits.max_header_bytes).await?)?;
            if (100..200).contains(&head.status) {
                continue; // interim responses carry no body
            }
            let framing = if head.status == 204 || head.status == 304 {
                BodyFraming::None
            } else {
                body_framing(&head.headers, self.limits.max_body_bytes, false)?
            };
            let reusable = framing != BodyFraming::UntilClose && !head.headers.has_token("connection", "close");
            let body = conn.read_body(framing, &self.limits).await?;
            return Ok((Response { status: head.status, headers: head.headers, body }, reusable));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<RequestHead, HttpError> {
        parse_request_head(text.as_bytes())
    }

    #[test]
    fn parses_a_request_head() {
        let head = request("POST /VolumeDriver.Mount HTTP/1.1\r\nHost: x\r\nContent-Length:  12 \r\n\r\n").unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/VolumeDriver.Mount");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.headers.get("content-length"), Some("12"));
    }

    #[test]
    fn refuses_malformed_heads() {
        for text in [
            "POST /x HTTP/1.1\r\n\r\n\r\n",
            "POST /x HTTP/1.1\n\r\n\r\n",
            "POST  /x HTTP/1.1\r\n\r\n",
            "POST /x HTTP/1.1 \r\n\r\n",
            "POST x HTTP/1.1\r\n\r\n",
            "POST http://h/x HTTP/1.1\r\n\r\n",
            "PO(ST /x HTTP/1.1\r\n\r\n",
            "POST /x HTTX/1.1\r\n\r\n",
            "POST /x HTTP/1.1\r\nNo-Colon\r\n\r\n",
            "POST /x HTTP/1.1\r\nBad Name: v\r\n\r\n",
            "POST /x HTTP/1.1\r\nName : v\r\n\r\n",
            "POST /x HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            "POST /x HTTP/1.1\r\nA: b\x01c\r\n\r\n",
            "\r\n\r\n",
        ] {
            assert!(matches!(request(text), Err(HttpError::Malformed(_))), "{text:?}");
        }
        assert!(matches!(request("POST /x HTTP/2.0\r\n\r\n"), Err(HttpError::UnsupportedVersion(_))));
        assert!(matches!(parse_request_head(b"POST /\xff HTTP/1.1\r\n\r\n"), Err(HttpError::Malformed(_))));
    }

    #[test]
    fn framing_refuses_smuggling_and_oversize() {
        let headers =
            |fields: &[(&str, &str)]| Headers(fields.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect());
        let framing = |fields: &[(&str, &str)]| body_framing(&headers(fields), 100, true);
        assert_eq!(framing(&[]).unwrap(), BodyFraming::None);
        assert_eq!(framing(&[("Content-Length", "5")]).unwrap(), BodyFraming::Length(5));
        assert_eq!(framing(&[("Content-Length", "5, 5")]).unwrap(), BodyFraming::Length(5));
        assert_eq!(framing(&[("Transfer-Encoding", "Chunked")]).unwrap(), BodyFraming::Chunked);
        assert!(matches!(framing(&[("Content-Length", "5"), ("Content-Length", "6")]), Err(HttpError::Malformed(_))));
        assert!(matches!(framing(&[("Content-Length", "-1")]), Err(HttpError::Malformed(_))));
        assert!(matches!(framing(&[("Content-Length", "+5")]), Err(HttpError::Malformed(_))));
        assert!(matches!(framing(&[("Content-Length", "99999999999999999999999")]), Err(HttpError::Malformed(_))));
        assert!(matches!(framing(&[("Content-Length", "101")]), Err(HttpError::BodyTooLarge(100))));
        assert!(matches!(
            framing(&[("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            framing(&[("Transfer-Encoding", "gzip, chunked")]),
            Err(HttpError::UnsupportedTransferEncoding(_))
        ));
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a").unwrap(), 26);
        assert_eq!(parse_chunk_size(b"0;name=value").unwrap(), 0);
        for bad in [&b""[..], b"g", b" 1", b"-1", b"ffffffffffffffffffff", b"\xff"] {
            assert!(parse_chunk_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(Address::parse("unix:///run/x.sock").unwrap(), Address::Unix("/run/x.sock".into()));
        assert_eq!(Address::parse("tcp://127.0.0.1:8080").unwrap(), Address::Tcp("127.0.0.1:8080".into()));
        assert_eq!(Address::parse("http://[::1]:80").unwrap(), Address::Tcp("[::1]:80".into()));
        for bad in
            ["", "/run/x.sock", "unix://relative.sock", "tcp://host", "tcp://:80", "tcp://h:99999", "https://h:1"]
        {
            assert!(Address::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// Random bytes and every cut of a valid message: parsing returns, never panics.
    #[test]
    fn parsers_never_panic() {
        let valid = b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n";
        for cut in 0..=valid.len() {
            let _ = parse_request_head(&valid[..cut]);
            let _ = parse_status_head(&valid[..cut]);
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            let len = (state % 64) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(b"PST /H1.:\r\n \t0aZ\x00\xff"[(state % 17) as usize]);
            }
            bytes.extend_from_slice(b"\r\n\r\n");
            let _ = parse_request_head(&bytes);
            let _ = parse_status_head(&bytes);
            let _ = parse_chunk_size(&bytes);
        }
    }
}
