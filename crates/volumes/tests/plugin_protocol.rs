//! The Docker volume plugin over a real Unix socket, driven with raw HTTP bytes: the
//! protocol as Docker and dvdcli speak it, and everything else a client could send. The
//! volume service behind it is an in-memory fake (`FakeApi`): the service is not under test
//! here, the protocol is.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TempDir;
use serde_json::{json, Value};
use tessera_volumes::api::{ApiError, Opts, VolumeApi, VolumeInfo};
use tessera_volumes::http::{Limits, MAX_BODY_BYTES, MAX_HEADER_BYTES};
use tessera_volumes::plugin::{self, PluginError, CONTENT_TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;

// ---------------------------------------------------------------------------------------------
// The fake volume service

struct FakeApi {
    state: Mutex<FakeState>,
    /// Where volumes are "mounted": `<mount_root>/<name>`. Created on mount when
    /// `create_mount_dirs` is set (for a real Docker engine, which checks the path).
    mount_root: PathBuf,
    create_mount_dirs: bool,
}

impl Default for FakeApi {
    fn default() -> FakeApi {
        FakeApi { state: Mutex::default(), mount_root: PathBuf::from("/fake/mnt"), create_mount_dirs: false }
    }
}

#[derive(Default)]
struct FakeState {
    volumes: BTreeMap<String, FakeVolume>,
    calls: Vec<String>,
}

#[derive(Default)]
struct FakeVolume {
    opts: Opts,
    /// Mount count per caller id; mounted while any is left.
    mounts: BTreeMap<String, u32>,
}

impl FakeApi {
    fn mountpoint(&self, name: &str) -> String {
        self.mount_root.join(name).display().to_string()
    }

    fn info(&self, name: &str, volume: &FakeVolume) -> VolumeInfo {
        let mounted = !volume.mounts.is_empty();
        let status = BTreeMap::from([("size_gib".to_string(), json!(8))]);
        VolumeInfo { name: name.to_string(), mountpoint: mounted.then(|| self.mountpoint(name)), status }
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    fn opts(&self, name: &str) -> Option<Opts> {
        self.state.lock().unwrap().volumes.get(name).map(|v| v.opts.clone())
    }

    fn record(&self, call: String) -> std::sync::MutexGuard<'_, FakeState> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(call);
        state
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.contains('/') {
        return Err(ApiError::Invalid(format!("bad volume name {name:?}")));
    }
    Ok(())
}

impl VolumeApi for FakeApi {
    async fn create(&self, name: &str, opts: &Opts) -> Result<(), ApiError> {
        let opts_text: Vec<String> = opts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut state = self.record(format!("create {name} {}", opts_text.join(",")));
        check_name(name)?;
        state
            .volumes
            .entry(name.to_string())
            .or_insert_with(|| FakeVolume { opts: opts.clone(), ..Default::default() });
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), ApiError> {
        let mut state = self.record(format!("remove {name}"));
        match state.volumes.get(name) {
            None => Err(ApiError::NotFound(name.to_string())),
            Some(v) if !v.mounts.is_empty() => Err(ApiError::Failed(format!("volume {name:?} is mounted"))),
            Some(_) => {
                state.volumes.remove(name);
                Ok(())
            }
        }
    }

    async fn mount(&self, name: &str, caller_id: &str) -> Result<String, ApiError> {
        let mut state = self.record(format!("mount {name} {caller_id:?}"));
        let volume = state.volumes.get_mut(name).ok_or_else(|| ApiError::NotFound(name.to_string()))?;
        *volume.mounts.entry(caller_id.to_string()).or_default() += 1;
        let path = self.mountpoint(name);
        if self.create_mount_dirs {
            std::fs::create_dir_all(&path).map_err(|e| ApiError::Failed(e.to_string()))?;
        }
        Ok(path)
    }

    async fn unmount(&self, name: &str, caller_id: &str) -> Result<(), ApiError> {
        let mut state = self.record(format!("unmount {name} {caller_id:?}"));
        let volume = state.volumes.get_mut(name).ok_or_else(|| ApiError::NotFound(name.to_string()))?;
        let count = volume
            .mounts
            .get_mut(caller_id)
            .ok_or_else(|| ApiError::Invalid(format!("{caller_id:?} has not mounted {name:?}")))?;
        *count -= 1;
        if *count == 0 {
            volume.mounts.remove(caller_id);
        }
        Ok(())
    }

    async fn path(&self, name: &str) -> Result<Option<String>, ApiError> {
        let state = self.record(format!("path {name}"));
        let volume = state.volumes.get(name).ok_or_else(|| ApiError::NotFound(name.to_string()))?;
        Ok((!volume.mounts.is_empty()).then(|| self.mountpoint(name)))
    }

    async fn get(&self, name: &str) -> Result<VolumeInfo, ApiError> {
        let state = self.record(format!("get {name}"));
        let volume = state.volumes.get(name).ok_or_else(|| ApiError::NotFound(name.to_string()))?;
        Ok(self.info(name, volume))
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, ApiError> {
        let state = self.record("list".to_string());
        Ok(state.volumes.iter().map(|(name, v)| self.info(name, v)).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Server {
    _dir: TempDir,
    socket: PathBuf,
    api: Arc<FakeApi>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> Server {
    start_with(Limits::default()).await
}

async fn start_with(limits: Limits) -> Server {
    let dir = TempDir::new("plugin");
    let socket = dir.0.join("plugins").join("tessera.sock");
    let api = Arc::new(FakeApi::default());
    let listener = plugin::bind(&socket).unwrap();
    let task = tokio::spawn(plugin::serve_listener(listener, api.clone(), limits));
    Server { _dir: dir, socket, api, task }
}

const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `bytes` on a new connection, half-closes it, and returns everything the server
/// wrote until it closed. Write errors are ignored: the server may reject a request and
/// close before reading all of it.
async fn raw(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    read_until_closed(&mut stream).await
}

async fn read_until_closed(stream: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    let read_all = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    timeout(ANSWER_TIMEOUT, read_all).await.expect("the server answers and closes");
    out
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The `Err` of an error reply, checking how errors must look.
    fn err(&self) -> String {
        assert_ne!(self.status, 200, "{self:?}");
        assert_eq!(self.header("content-type"), Some(CONTENT_TYPE));
        let body = self.json();
        let message = body["Err"].as_str().unwrap_or_else(|| panic!("no Err in {body}")).to_string();
        assert!(!message.is_empty());
        message
    }
}

/// Splits what a server wrote into responses (the server always sends Content-Length).
fn parse_replies(mut bytes: &[u8]) -> Vec<Reply> {
    let mut replies = Vec::new();
    while !bytes.is_empty() {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("complete head") + 4;
        let head = std::str::from_utf8(&bytes[..end]).unwrap();
        let mut lines = head.trim_end().split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status: u16 = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_string(), v.trim().to_string())
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        replies.push(Reply { status, headers, body: bytes[end..end + length].to_vec() });
        bytes = &bytes[end + length..];
    }
    replies
}

fn one_reply(bytes: &[u8]) -> Reply {
    let mut replies = parse_replies(bytes);
    assert_eq!(replies.len(), 1, "{:?}", String::from_utf8_lossy(bytes));
    replies.remove(0)
}

fn request(endpoint: &str, body: &str) -> Vec<u8> {
    format!("POST {endpoint} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// A well-formed POST on its own connection.
async fn post(socket: &Path, endpoint: &str, body: &str) -> Reply {
    one_reply(&raw(socket, &request(endpoint, body)).await)
}

async fn ok(socket: &Path, endpoint: &str, body: Value) -> Value {
    let reply = post(socket, endpoint, &body.to_string()).await;
    assert_eq!(reply.status, 200, "{endpoint} {body}: {:?}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.header("content-type"), Some(CONTENT_TYPE));
    let json = reply.json();
    assert_eq!(json.get("Err").and_then(Value::as_str).unwrap_or_default(), "", "{json}");
    json
}

async fn assert_alive(socket: &Path) {
    let reply = post(socket, "/Plugin.Activate", "").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"Implements": ["VolumeDriver"]}));
}

// ---------------------------------------------------------------------------------------------
// The protocol

#[tokio::test]
async fn activate_reports_volume_driver() {
    let server = start().await;
    let reply = post(&server.socket, "/Plugin.Activate", "").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some(CONTENT_TYPE));
    assert_eq!(reply.json(), json!({"Implements": ["VolumeDriver"]}));
    // Docker 1.11 sends `null`.
    assert_eq!(post(&server.socket, "/Plugin.Activate", "null\n").await.json()["Implements"][0], "VolumeDriver");
}

#[tokio::test]
async fn capabilities_scope_is_global() {
    let server = start().await;
    let reply = ok(&server.socket, "/VolumeDriver.Capabilities", json!({})).await;
    assert_eq!(reply, json!({"Capabilities": {"Scope": "global"}}));
}

#[tokio::test]
async fn volume_lifecycle_over_the_plugin_protocol() {
    let server = start().await;
    let s = &server.socket;
    ok(s, "/VolumeDriver.Create", json!({"Name": "data", "Opts": {"size": "8Gi", "fs": "xfs"}})).await;
    assert_eq!(
        server.api.opts("data").unwrap(),
        Opts::from([("fs".into(), "xfs".into()), ("size".into(), "8Gi".into())])
    );

    let got = ok(s, "/VolumeDriver.Get", json!({"Name": "data"})).await;
    assert_eq!(got["Volume"], json!({"Name": "data", "Mountpoint": "", "Status": {"size_gib": 8}}));
    assert_eq!(ok(s, "/VolumeDriver.Path", json!({"Name": "data"})).await["Mountpoint"], "");

    let mounted = ok(s, "/VolumeDriver.Mount", json!({"Name": "data", "ID": "c1"})).await;
    assert_eq!(mounted["Mountpoint"], "/fake/mnt/data");
    ok(s, "/VolumeDriver.Mount", json!({"Name": "data", "ID": "c2"})).await;
    assert_eq!(ok(s, "/VolumeDriver.Path", json!({"Name": "data"})).await["Mountpoint"], "/fake/mnt/data");
    let listed = ok(s, "/VolumeDriver.List", json!({})).await;
    assert_eq!(listed["Volumes"], json!([{"Name": "data", "Mountpoint": "/fake/mnt/data"}]));

    // Each caller unmounts its own mount; the volume stays mounted until the last one.
    ok(s, "/VolumeDriver.Unmount", json!({"Name": "data", "ID": "c1"})).await;
    assert_eq!(ok(s, "/VolumeDriver.Get", json!({"Name": "data"})).await["Volume"]["Mountpoint"], "/fake/mnt/data");
    let err = post(s, "/VolumeDriver.Remove", r#"{"Name":"data"}"#).await.err();
    assert!(err.contains("mounted"), "{err}");
    ok(s, "/VolumeDriver.Unmount", json!({"Name": "data", "ID": "c2"})).await;
    ok(s, "/VolumeDriver.Remove", json!({"Name": "data"})).await;
    assert_eq!(ok(s, "/VolumeDriver.List", json!({})).await["Volumes"], json!([]));

    assert_eq!(
        server.api.calls(),
        [
            "create data fs=xfs,size=8Gi",
            "get data",
            "path data",
            "mount data \"c1\"",
            "mount data \"c2\"",
            "path data",
            "list",
            "unmount data \"c1\"",
            "get data",
            "remove data",
            "unmount data \"c2\"",
            "remove data",
            "list",
        ]
    );
}

#[tokio::test]
async fn mount_without_id_counts_under_the_empty_caller() {
    let server = start().await;
    let s = &server.socket;
    ok(s, "/VolumeDriver.Create", json!({"Name": "v"})).await;
    ok(s, "/VolumeDriver.Mount", json!({"Name": "v"})).await;
    ok(s, "/VolumeDriver.Mount", json!({"Name": "v", "ID": null})).await;
    ok(s, "/VolumeDriver.Unmount", json!({"Name": "v"})).await;
    assert_eq!(server.api.calls()[1..], ["mount v \"\"", "mount v \"\"", "unmount v \"\""]);
}

#[tokio::test]
async fn create_tolerates_missing_and_null_opts() {
    let server = start().await;
    let s = &server.socket;
    ok(s, "/VolumeDriver.Create", json!({"Name": "a"})).await;
    ok(s, "/VolumeDriver.Create", json!({"Name": "b", "Opts": null})).await;
    ok(s, "/VolumeDriver.Create", json!({"Name": "c", "Opts": {}})).await;
    // Go reads a null string as "", and unknown fields are ignored.
    ok(s, "/VolumeDriver.Create", json!({"Name": "d", "Opts": {"k": null}, "Extra": [1, 2]})).await;
    assert_eq!(server.api.opts("d").unwrap(), Opts::from([("k".into(), String::new())]));
    assert_eq!(server.api.calls(), ["create a ", "create b ", "create c ", "create d k="]);
}

#[tokio::test]
async fn field_names_match_case_insensitively_like_go() {
    let server = start().await;
    ok(&server.socket, "/VolumeDriver.Create", json!({"name": "lower", "opts": {"a": "b"}})).await;
    assert_eq!(server.api.opts("lower").unwrap(), Opts::from([("a".into(), "b".into())]));
    ok(&server.socket, "/VolumeDriver.Mount", json!({"NAME": "lower", "id": "x"})).await;
    assert_eq!(server.api.calls()[1], "mount lower \"x\"");
}

#[tokio::test]
async fn api_errors_are_500_with_err() {
    let server = start().await;
    let s = &server.socket;
    for (endpoint, body) in [
        ("/VolumeDriver.Get", r#"{"Name":"nope"}"#),
        ("/VolumeDriver.Mount", r#"{"Name":"nope","ID":"x"}"#),
        ("/VolumeDriver.Unmount", r#"{"Name":"nope","ID":"x"}"#),
        ("/VolumeDriver.Path", r#"{"Name":"nope"}"#),
        ("/VolumeDriver.Remove", r#"{"Name":"nope"}"#),
    ] {
        let reply = post(s, endpoint, body).await;
        assert_eq!(reply.status, 500, "{endpoint}");
        assert_eq!(reply.err(), "volume \"nope\" not found", "{endpoint}");
    }
    // Names are the API's to judge: the plugin passes them through.
    let reply = post(s, "/VolumeDriver.Create", r#"{"Name":"a/b"}"#).await;
    assert_eq!((reply.status, reply.err()), (500, "bad volume name \"a/b\"".to_string()));
    let reply = post(s, "/VolumeDriver.Create", r#"{"Name":""}"#).await;
    assert_eq!(reply.status, 500);
}

#[tokio::test]
async fn unknown_endpoint_is_404_with_err() {
    let server = start().await;
    for endpoint in ["/VolumeDriver.Snapshot", "/NetworkDriver.CreateNetwork", "/", "/Plugin.Activate/x"] {
        let reply = post(&server.socket, endpoint, "{}").await;
        assert_eq!(reply.status, 404, "{endpoint}");
        assert!(reply.err().contains(endpoint), "{endpoint}");
    }
}

#[tokio::test]
async fn methods_other_than_post_are_405() {
    let server = start().await;
    let bytes = raw(&server.socket, b"GET /VolumeDriver.List HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let reply = one_reply(&bytes);
    assert_eq!(reply.status, 405);
    assert!(reply.err().contains("POST"));
}

#[tokio::test]
async fn malformed_json_is_a_bad_request() {
    let server = start().await;
    for body in [
        "{",
        "[]",
        "\"data\"",
        "42",
        "{\"Name\":5}",
        "{\"Name\":\"v\",\"Opts\":[\"a=b\"]}",
        "{\"Name\":\"v\",\"Opts\":{\"size\":8}}",
        "{\"Name\":\"v\",\"Opts\":{\"k\":{\"x\":1}}}",
        "{}",
        "{\"Name\":\"v\"} trailing",
        "\u{feff}{\"Name\":\"v\"}",
    ] {
        let reply = post(&server.socket, "/VolumeDriver.Create", body).await;
        assert_eq!(reply.status, 400, "{body}");
        assert!(reply.err().starts_with("bad request: "), "{body}: {}", reply.err());
    }
    let reply = post(&server.socket, "/VolumeDriver.Mount", r#"{"Name":"v","ID":7}"#).await;
    assert_eq!((reply.status, reply.err()), (400, "bad request: ID must be a string, not a number".to_string()));
    let mut invalid_utf8 = request("/VolumeDriver.Get", "{\"Name\":\"\u{e9}\"}");
    let at = invalid_utf8.len() - 3;
    invalid_utf8[at] = 0xff;
    let reply = one_reply(&raw(&server.socket, &invalid_utf8).await);
    assert_eq!(reply.status, 400);
    assert!(reply.err().starts_with("bad request: invalid JSON"));
    assert!(server.api.calls().is_empty(), "{:?}", server.api.calls());
}

// ---------------------------------------------------------------------------------------------
// HTTP framing

#[tokio::test]
async fn chunked_request_bodies_are_accepted() {
    let server = start().await;
    let request = b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\n{\"Nam\r\n\
        A;ext=1\r\ne\":\"chunky\r\n\
        0e\r\n\",\"Opts\":{\"k\":\r\n\
        4\r\n\"v\"}\r\n\
        1\r\n}\r\n\
        0\r\nTrailer-Field: ignored\r\n\r\n";
    let reply = one_reply(&raw(&server.socket, request).await);
    assert_eq!(reply.status, 200, "{:?}", String::from_utf8_lossy(&reply.body));
    assert_eq!(server.api.opts("chunky").unwrap(), Opts::from([("k".into(), "v".into())]));
}

#[tokio::test]
async fn kept_alive_connection_serves_pipelined_requests_in_order() {
    let server = start().await;
    let mut bytes = request("/VolumeDriver.Create", r#"{"Name":"p"}"#);
    bytes.extend(request("/VolumeDriver.Mount", r#"{"Name":"p","ID":"1"}"#));
    bytes.extend(b"\r\n"); // an empty line before a request line is ignored
    bytes.extend(request("/VolumeDriver.Get", r#"{"Name":"p"}"#));
    let replies = parse_replies(&raw(&server.socket, &bytes).await);
    assert_eq!(replies.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 200]);
    assert_eq!(replies[0].header("connection"), Some("keep-alive"));
    assert_eq!(replies[1].json()["Mountpoint"], "/fake/mnt/p");
    assert_eq!(replies[2].json()["Volume"]["Mountpoint"], "/fake/mnt/p");
}

#[tokio::test]
async fn connection_close_and_http_1_0_close_after_the_response() {
    let server = start().await;
    for head in
        ["POST /Plugin.Activate HTTP/1.1\r\nConnection: close\r\n\r\n", "POST /Plugin.Activate HTTP/1.0\r\n\r\n"]
    {
        // No half-close from the client: the server must close by itself.
        let mut stream = UnixStream::connect(&server.socket).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let reply = one_reply(&read_until_closed(&mut stream).await);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("connection"), Some("close"));
    }
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let server = start().await;
    let body = r#"{"Name":"later"}"#;
    let mut stream = UnixStream::connect(&server.socket).await.unwrap();
    let head =
        format!("POST /VolumeDriver.Create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    timeout(ANSWER_TIMEOUT, stream.read_exact(&mut interim)).await.unwrap().unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(one_reply(&read_until_closed(&mut stream).await).status, 200);
    assert!(server.api.opts("later").is_some());

    let reply = post_raw_head(&server.socket, "Expect: something-else\r\n").await;
    assert_eq!(reply.status, 417);
}

async fn post_raw_head(socket: &Path, extra_headers: &str) -> Reply {
    let head = format!("POST /VolumeDriver.List HTTP/1.1\r\nHost: x\r\n{extra_headers}Content-Length: 2\r\n\r\n{{}}");
    one_reply(&raw(socket, head.as_bytes()).await)
}

#[tokio::test]
async fn malformed_requests_get_a_clear_error_and_the_server_lives_on() {
    let server = start().await;
    let cases: &[(&[u8], u16, &str)] = &[
        (b"GARBAGE\r\n\r\n", 400, "request line"),
        (b"POST\r\n\r\n", 400, "request line"),
        (b"POST /Plugin.Activate\r\n\r\n", 400, "request line"),
        (b"POST /Plugin.Activate HTTP/1.1 extra\r\n\r\n", 400, "request line"),
        (b"POST  /Plugin.Activate HTTP/1.1\r\n\r\n", 400, "request line"),
        (b"POST Plugin.Activate HTTP/1.1\r\n\r\n", 400, "absolute path"),
        (b"POST http://x/Plugin.Activate HTTP/1.1\r\n\r\n", 400, "absolute path"),
        (b"POST /Plugin.Activate HTTP/2.0\r\n\r\n", 505, "HTTP/2.0"),
        (b"POST /Plugin.Activate SPDY/3\r\n\r\n", 400, "protocol version"),
        (b"POST /Plugin.Activate HTTP/1.1\n\n", 400, "connection closed"),
        (b"POST /Plugin.Activate HTTP/1.1\nHost: x\r\n\r\n", 400, "bare CR or LF"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nNoColon\r\n\r\n", 400, "without ':'"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nHost : x\r\n\r\n", 400, "header name"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400, "folding"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nA: \x00\r\n\r\n", 400, "control character"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nA: \xff\xfe\r\n\r\n", 400, "UTF-8"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, "Content-Length"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, "conflicting"),
        (
            b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "both",
        ),
        (b"POST /Plugin.Activate HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "gzip"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunk size"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", 400, "CRLF"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 400, "middle"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 400, "middle"),
        (b"POST /Plugin.Activate HTTP/1.1\r\nHost: x", 400, "middle"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "middle"), // a TLS ClientHello
        (b"\x00\x00\x00\x00\r\n\r\n", 400, "request line"),
    ];
    for (bytes, status, needle) in cases {
        let reply = one_reply(&raw(&server.socket, bytes).await);
        let shown = String::from_utf8_lossy(bytes);
        assert_eq!(reply.status, *status, "{shown:?}");
        assert_eq!(reply.header("connection"), Some("close"), "{shown:?}");
        let err = reply.err();
        assert!(err.starts_with("bad request: ") && err.contains(needle), "{shown:?}: {err}");
    }
    assert_alive(&server.socket).await;
    assert!(server.api.calls().is_empty());
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let server = start().await;
    let big = "x".repeat(MAX_HEADER_BYTES);
    let reply = post_raw_head(&server.socket, &format!("X-Big: {big}\r\n")).await;
    assert_eq!(reply.status, 431);
    assert!(reply.err().contains("16384"));
    // Many small fields.
    let many: String = (0..200).map(|i| format!("X-{i}: y\r\n")).collect();
    assert_eq!(post_raw_head(&server.socket, &many).await.status, 400);
    // Just under the limit is fine.
    let head = "POST /VolumeDriver.List HTTP/1.1\r\nHost: x\r\nX-Pad: \r\nContent-Length: 2\r\n\r\n";
    let pad = "p".repeat(MAX_HEADER_BYTES - head.len());
    let reply = post_raw_head(&server.socket, &format!("X-Pad: {pad}\r\n")).await;
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_alive(&server.socket).await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let server = start().await;
    let s = &server.socket;
    // Refused on the declared length alone, before any body is read.
    let too_long = format!("Content-Length: {}\r\n", MAX_BODY_BYTES + 1);
    let head = format!("POST /VolumeDriver.Create HTTP/1.1\r\n{too_long}\r\n");
    assert_eq!(one_reply(&raw(s, head.as_bytes()).await).status, 413);
    let head = "POST /VolumeDriver.Create HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n";
    assert_eq!(one_reply(&raw(s, head.as_bytes()).await).status, 400);
    // A chunk bigger than the limit.
    let head = "POST /VolumeDriver.Create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n100001\r\n";
    assert_eq!(one_reply(&raw(s, head.as_bytes()).await).status, 413);
    // Chunks that add up to more than the limit.
    let chunk = vec![b' '; 600 * 1024];
    let mut chunked = b"POST /VolumeDriver.Create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..2 {
        chunked.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend(&chunk);
        chunked.extend(b"\r\n");
    }
    chunked.extend(b"0\r\n\r\n");
    let reply = one_reply(&raw(s, &chunked).await);
    assert_eq!(reply.status, 413);
    assert!(reply.err().contains("body larger than 1048576 bytes"));
    assert_alive(s).await;
}

#[tokio::test]
async fn body_of_exactly_the_limit_is_accepted() {
    let server = start().await;
    let (prefix, suffix) = (r#"{"Name":"big","Opts":{"pad":""#, r#""}}"#);
    let pad = "z".repeat(MAX_BODY_BYTES - prefix.len() - suffix.len());
    let body = format!("{prefix}{pad}{suffix}");
    assert_eq!(body.len(), MAX_BODY_BYTES);
    let reply = post(&server.socket, "/VolumeDriver.Create", &body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(server.api.opts("big").unwrap()["pad"].len(), pad.len());
}

#[tokio::test]
async fn slow_request_times_out_with_408() {
    let limits = Limits { request_timeout: Duration::from_millis(300), ..Limits::default() };
    let server = start_with(limits).await;
    let mut stream = UnixStream::connect(&server.socket).await.unwrap();
    stream.write_all(b"POST /Plugin.Activate HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let reply = one_reply(&read_until_closed(&mut stream).await);
    assert_eq!(reply.status, 408);
    assert!(reply.err().contains("timed out"));
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    assert_alive(&server.socket).await;
}

#[tokio::test]
async fn idle_connection_is_closed_after_the_idle_timeout() {
    let limits = Limits { idle_timeout: Duration::from_millis(300), ..Limits::default() };
    let server = start_with(limits).await;
    let mut stream = UnixStream::connect(&server.socket).await.unwrap();
    stream.write_all(&request("/Plugin.Activate", "")).await.unwrap();
    let started = Instant::now();
    // One response, then the connection closes after the idle time without a second request.
    let reply = one_reply(&read_until_closed(&mut stream).await);
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn every_cut_of_a_request_gets_an_answer_or_none() {
    let server = start().await;
    let full = b"POST /VolumeDriver.Create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        c\r\n{\"Name\":\"cut\r\n2\r\n\"}\r\n0\r\n\r\n";
    for cut in 0..full.len() {
        let bytes = raw(&server.socket, &full[..cut]).await;
        if cut == 0 {
            assert!(bytes.is_empty());
            continue;
        }
        let reply = one_reply(&bytes);
        assert_eq!(reply.status, 400, "cut at {cut}");
        assert!(reply.err().contains("closed in the middle"), "cut at {cut}: {}", reply.err());
    }
    assert_eq!(one_reply(&raw(&server.socket, full).await).status, 200);
    assert_eq!(server.api.calls(), ["create cut "]);
}

#[tokio::test]
async fn random_bytes_never_crash_the_server() {
    let server = start().await;
    let alphabet: &[u8] = b"POST /VolumeDriver.Create HTTP/1.1\r\n:;0123456789abcdef\"{}\x00\xff\t";
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..300 {
        let len = 1 + (next() % 300) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
        if round % 3 == 0 {
            bytes.splice(0..0, b"POST /VolumeDriver.Create HTTP/1.1\r\n".iter().copied());
        }
        if round % 2 == 0 {
            bytes.extend(b"\r\n\r\n");
        }
        for reply in parse_replies(&raw(&server.socket, &bytes).await) {
            assert!((400..=505).contains(&reply.status), "{:?} -> {}", String::from_utf8_lossy(&bytes), reply.status);
            reply.err();
        }
    }
    assert_alive(&server.socket).await;
}

#[tokio::test]
async fn many_connections_at_once() {
    let server = start().await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let socket = server.socket.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"Name": format!("v{i}")}).to_string();
            post(&socket, "/VolumeDriver.Create", &body).await.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let listed = ok(&server.socket, "/VolumeDriver.List", json!({})).await;
    assert_eq!(listed["Volumes"].as_array().unwrap().len(), 64);
}

// ---------------------------------------------------------------------------------------------
// The socket

#[tokio::test]
async fn socket_has_mode_0660_and_a_stale_socket_is_replaced() {
    let dir = TempDir::new("sock");
    let socket = dir.0.join("run").join("tessera.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap()); // left behind by a dead process
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err());

    let api = Arc::new(FakeApi::default());
    let listener = plugin::bind(&socket).unwrap();
    let task = tokio::spawn(plugin::serve_listener(listener, api, Limits::default()));
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o660);
    assert_alive(&socket).await;

    // A live socket is not taken over.
    assert!(matches!(plugin::bind(&socket), Err(PluginError::SocketInUse(_))));
    assert_alive(&socket).await;
    task.abort();
    // No temporary sockets left behind.
    assert_eq!(std::fs::read_dir(socket.parent().unwrap()).unwrap().count(), 1);
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_not_replaced() {
    let dir = TempDir::new("notsock");
    let path = dir.0.join("tessera.sock");
    std::fs::write(&path, "keep me").unwrap();
    let err = plugin::bind(&path).unwrap_err();
    assert!(matches!(err, PluginError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

#[tokio::test]
async fn serve_creates_the_socket_directory() {
    let dir = TempDir::new("serve");
    let socket = dir.0.join("a").join("b").join("tessera.sock");
    let task = tokio::spawn(plugin::serve(socket.clone(), Arc::new(FakeApi::default())));
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while !socket.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_alive(&socket).await;
    task.abort();
}

// The plugin under a real Docker engine, behind the whole volume service, is tested in
// crates/tessera/tests/docker.rs.
