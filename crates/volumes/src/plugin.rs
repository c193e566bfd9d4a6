//! The Docker volume plugin (legacy v1 protocol) over a Unix socket, in front of any
//! [`VolumeApi`].
//!
//! Docker (and dvdcli, and Mesos's `docker/volume` isolator) POST JSON to
//! `/Plugin.Activate` and `/VolumeDriver.*`. Errors go back the way Docker reads them: a
//! non-200 status with `{"Err":"message"}` — never REX-Ray's `{"Error":…}`, which Docker shows
//! as raw JSON. API failures are 500, unreadable requests 4xx, unknown endpoints 404.
//!
//! Request bodies are read the way Go's `encoding/json` reads them into Docker's structs,
//! since that is what every client was tested against: field names match case-insensitively,
//! unknown fields are ignored, a `null` or empty body is an empty object, `Opts` may be
//! missing or `null`, an option value must be a string (`null` reads as `""`). `Name` is
//! required; whether it is a valid volume name is the API's call. `ID` may be missing (dvdcli
//! and Docker before 1.12 send none): the API then sees an empty caller id.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use thiserror::Error;
use tokio::net::UnixListener;

use crate::api::{ApiError, Opts, VolumeApi, VolumeInfo};
use crate::http::{self, HttpError, Limits, Request, Response};

/// The media type of every response (the protocol documentation's; Docker does not check it).
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
/// Who may talk to the plugin: root and the socket's group (Docker runs as root).
pub const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, Error)]
pub enum PluginError {
    #[error("another process is serving the plugin socket {0}")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    #[error("{context} {path}: {source}")]
    Io { context: &'static str, path: PathBuf, source: std::io::Error },
}

fn io_error(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PluginError {
    let path = path.to_path_buf();
    move |source| PluginError::Io { context, path, source }
}

/// Binds the plugin socket at `socket_path` with mode [`SOCKET_MODE`], creating its directory
/// if needed. A stale socket left by a dead process is replaced; a live one (something
/// accepts connections on it) or a file that is not a socket is an error.
///
/// The socket is bound under a temporary name, given its mode and renamed into place, so no
/// client ever sees it with the umask's mode, and the stale one is replaced atomically.
/// Must be called inside a Tokio runtime.
pub fn bind(socket_path: &Path) -> Result<UnixListener, PluginError> {
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = socket_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
    match std::fs::symlink_metadata(socket_path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(PluginError::NotASocket(socket_path.to_path_buf())),
        Ok(_) if std::os::unix::net::UnixStream::connect(socket_path).is_ok() => {
            return Err(PluginError::SocketInUse(socket_path.to_path_buf()));
        }
        Ok(_) => tracing::info!(path = %socket_path.display(), "replacing stale plugin socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("cannot inspect", socket_path)(e)),
    }
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!(".tessera-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp).map_err(io_error("cannot bind", &temp))?;
    let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io_error("cannot set the mode of", &temp))
        .and_then(|()| std::fs::rename(&temp, socket_path).map_err(io_error("cannot move the socket to", socket_path)));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    Ok(listener)
}

/// Serves the plugin on `socket_path` until the task is dropped (see [`bind`]).
pub async fn serve<A: VolumeApi>(socket_path: impl AsRef<Path>, api: Arc<A>) -> Result<(), PluginError> {
    let listener = bind(socket_path.as_ref())?;
    tracing::info!(path = %socket_path.as_ref().display(), "Docker volume plugin listening");
    serve_listener(listener, api, Limits::default()).await;
    Ok(())
}

/// Serves the plugin on an already bound listener, with the given HTTP limits.
pub async fn serve_listener<A: VolumeApi>(listener: UnixListener, api: Arc<A>, limits: Limits) {
    http::serve_unix(listener, Arc::new(PluginHandler::new(api)), limits).await
}

/// The plugin's request handler, usable with any transport through
/// [`http::serve_connection`].
pub struct PluginHandler<A> {
    api: Arc<A>,
}

impl<A: VolumeApi> PluginHandler<A> {
    pub fn new(api: Arc<A>) -> PluginHandler<A> {
        PluginHandler { api }
    }

    async fn dispatch(&self, request: &Request) -> Result<Value, Failure> {
        if request.method != "POST" {
            return Err(Failure::MethodNotAllowed(request.method.clone()));
        }
        let endpoint = request.target.as_str();
        match endpoint {
            "/Plugin.Activate" => return Ok(json!({"Implements": ["VolumeDriver"]})),
            "/VolumeDriver.Capabilities" => return Ok(json!({"Capabilities": {"Scope": "global"}})),
            "/VolumeDriver.Create"
            | "/VolumeDriver.Remove"
            | "/VolumeDriver.Mount"
            | "/VolumeDriver.Path"
            | "/VolumeDriver.Unmount"
            | "/VolumeDriver.Get"
            | "/VolumeDriver.List" => {}
            _ => return Err(Failure::UnknownEndpoint(endpoint.to_string())),
        }
        let body = parse_body(&request.body)?;
        let api = &self.api;
        let reply = match endpoint {
            "/VolumeDriver.Create" => {
                api.create(&name(&body)?, &opts(&body)?).await?;
                json!({"Err": ""})
            }
            "/VolumeDriver.Remove" => {
                api.remove(&name(&body)?).await?;
                json!({"Err": ""})
            }
            "/VolumeDriver.Mount" => {
                let mountpoint = api.mount(&name(&body)?, &caller_id(&body)?).await?;
                json!({"Mountpoint": mountpoint, "Err": ""})
            }
            "/VolumeDriver.Unmount" => {
                api.unmount(&name(&body)?, &caller_id(&body)?).await?;
                json!({"Err": ""})
            }
            "/VolumeDriver.Path" => {
                let mountpoint = api.path(&name(&body)?).await?.unwrap_or_default();
                json!({"Mountpoint": mountpoint, "Err": ""})
            }
            "/VolumeDriver.Get" => {
                let volume = api.get(&name(&body)?).await?;
                json!({"Volume": volume_json(&volume, true), "Err": ""})
            }
            _ => {
                let volumes = api.list().await?;
                let volumes: Vec<Value> = volumes.iter().map(|v| volume_json(v, false)).collect();
                json!({"Volumes": volumes, "Err": ""})
            }
        };
        Ok(reply)
    }
}

impl<A: VolumeApi> http::Handler for PluginHandler<A> {
    async fn handle(&self, request: Request) -> Response {
        match self.dispatch(&request).await {
            Ok(reply) => json_response(200, &reply),
            Err(failure) => {
                tracing::info!(endpoint = %request.target, error = %failure.message(), "volume plugin request failed");
                error_response(failure.status(), &failure.message())
            }
        }
    }

    fn reject(&self, error: &HttpError) -> Response {
        error_response(error.status().unwrap_or(400), &format!("bad request: {error}"))
    }
}

/// Why a request got no answer from the API.
#[derive(Debug)]
enum Failure {
    MethodNotAllowed(String),
    UnknownEndpoint(String),
    BadRequest(String),
    Api(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        Failure::Api(e)
    }
}

impl Failure {
    fn status(&self) -> u16 {
        match self {
            Failure::MethodNotAllowed(_) => 405,
            Failure::UnknownEndpoint(_) => 404,
            Failure::BadRequest(_) => 400,
            Failure::Api(_) => 500,
        }
    }

    fn message(&self) -> String {
        match self {
            Failure::MethodNotAllowed(method) => {
                format!("method {method} not allowed: the plugin protocol uses POST")
            }
            Failure::UnknownEndpoint(endpoint) => {
                format!("unknown endpoint {endpoint}: this plugin implements Plugin.Activate and VolumeDriver")
            }
            Failure::BadRequest(detail) => format!("bad request: {detail}"),
            Failure::Api(e) => e.to_string(),
        }
    }
}

fn bad_request(detail: impl Into<String>) -> Failure {
    Failure::BadRequest(detail.into())
}

fn json_response(status: u16, value: &Value) -> Response {
    let mut body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    Response::new(status, CONTENT_TYPE, body)
}

fn error_response(status: u16, message: &str) -> Response {
    json_response(status, &json!({ "Err": message }))
}

fn volume_json(volume: &VolumeInfo, with_status: bool) -> Value {
    let mut out = Map::new();
    out.insert("Name".into(), Value::String(volume.name.clone()));
    out.insert("Mountpoint".into(), Value::String(volume.mountpoint.clone().unwrap_or_default()));
    if with_status {
        out.insert("Status".into(), Value::Object(volume.status.clone().into_iter().collect()));
    }
    Value::Object(out)
}

/// The request body as a JSON object; empty and `null` bodies are `{}`.
fn parse_body(body: &[u8]) -> Result<Map<String, Value>, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(Value::Null) => Ok(Map::new()),
        Ok(other) => Err(bad_request(format!("the body must be a JSON object, not {}", json_kind(&other)))),
        Err(e) => Err(bad_request(format!("invalid JSON: {e}"))),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field by name, matched exactly first and then case-insensitively, as Go does.
fn field<'a>(body: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    body.get(key).or_else(|| body.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v))
}

fn optional_string(body: &Map<String, Value>, key: &str) -> Result<Option<String>, Failure> {
    match field(body, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad_request(format!("{key} must be a string, not {}", json_kind(other)))),
    }
}

fn name(body: &Map<String, Value>) -> Result<String, Failure> {
    optional_string(body, "Name")?.ok_or_else(|| bad_request("missing Name"))
}

fn caller_id(body: &Map<String, Value>) -> Result<String, Failure> {
    Ok(optional_string(body, "ID")?.unwrap_or_default())
}

fn opts(body: &Map<String, Value>) -> Result<Opts, Failure> {
    let map = match field(body, "Opts") {
        None | Some(Value::Null) => return Ok(Opts::new()),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(bad_request(format!("Opts must be an object, not {}", json_kind(other)))),
    };
    map.iter()
        .map(|(key, value)| match value {
            Value::String(s) => Ok((key.clone(), s.clone())),
            Value::Null => Ok((key.clone(), String::new())),
            other => Err(bad_request(format!("option {key:?} must be a string, not {}", json_kind(other)))),
        })
        .collect()
}
