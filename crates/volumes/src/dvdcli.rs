//! A dvdcli-compatible command (`dvdcli mount --volumedriver=tessera --volumename=v`), as a
//! library the binary calls when run as `tessera dvdcli …` or as `dvdcli`, and the Docker
//! volume-plugin client it is built on ([`VolumeDriverClient`]).
//!
//! It behaves as dvdcli 0.2 did, since mesos-module-dvdi and scripts call it:
//! - `mount`: `Get`; if that fails and `--explicitcreate` is not set, `Create` with the
//!   options; then `Mount` with no `ID` (dvdcli never sent one: its Docker 1.11 structs had
//!   no such field), so the plugin counts the mount under the empty caller id. Prints the
//!   mountpoint alone on stdout.
//! - `unmount`, `remove`: `Get` first (so a missing volume is an error), then the call.
//! - `path`: `Get`, printing its mountpoint if non-empty, else the result of `Path` if
//!   non-empty. `get`: `Get`, printing the name. `list`: one name per line.
//! - `create`: `Create` with the options. `version`: prints the version, needs no plugin.
//! - Plugins are found as Docker finds them ([`Discovery`]), activated (they must implement
//!   `VolumeDriver`), and calls retry connecting with exponential backoff for up to 30 s.
//!
//! Where dvdcli misbehaved, this one does not: an option value may contain `=` (split on the
//! first one), an option without `=` is an error rather than a crash, `--explicitCreate` is
//! accepted beside `--explicitcreate`, every error is one line on stderr with exit status 1
//! (dvdcli exited 0 on flag errors), and `mount` only creates when the plugin answered `Get`
//! with an error — a plugin that cannot be reached is not asked to create anything.
//!
//! Flags follow pflag's grammar: `--flag=value` or `--flag value`, before or after the verb;
//! `--volumeopts` may repeat and each value is a comma-separated list read as a CSV record, so
//! a double-quoted field may hold a comma (`--volumeopts='"mountopts=a,b",size=8'`); a
//! repeated `--volumedriver` or `--volumename` keeps the last value; booleans take only
//! `--flag` or `--flag=value` (`true`, `false`, `1`, `0`, `t`, `f`, ...).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::api::Opts;
use crate::http::{self, Address, HttpError};

/// Where Docker looks for plugin sockets.
pub const DOCKER_SOCKET_DIR: &str = "/run/docker/plugins";
/// Where Docker looks for `.spec` and `.json` plugin files, in order.
pub const DOCKER_SPEC_DIRS: [&str; 2] = ["/etc/docker/plugins", "/usr/lib/docker/plugins"];
/// Overrides the socket directories (colon-separated).
pub const SOCKET_DIRS_ENV: &str = "TESSERA_PLUGIN_SOCKET_DIRS";
/// Overrides the spec directories (colon-separated).
pub const SPEC_DIRS_ENV: &str = "TESSERA_PLUGIN_SPEC_DIRS";
/// How long Docker keeps looking for a plugin and retrying to connect to it.
pub const RETRY_FOR: Duration = Duration::from_secs(30);
/// Docker's first wait between attempts; it doubles after each.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Docker's timeout for calls that change things (Create, Remove, Mount, Unmount).
pub const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Docker's timeout for the others (Activate, Get, Path, List).
pub const SHORT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// What Docker 1.11 (and so dvdcli) sends as `Accept`.
const ACCEPT: &str = "application/vnd.docker.plugins.v1.2+json";
/// A `.spec` or `.json` file larger than this is not a plugin spec.
const MAX_SPEC_FILE_BYTES: u64 = 64 * 1024;
/// How much of a raw error body ends up in a message.
const MAX_QUOTED_BODY_CHARS: usize = 500;

#[derive(Debug, Error)]
pub enum DvdcliError {
    #[error("{0}")]
    Usage(String),
    #[error("bad volume driver name {0:?}")]
    BadDriverName(String),
    #[error("volume driver plugin {name:?} not found in {searched}")]
    PluginNotFound { name: String, searched: String },
    #[error("bad plugin spec {path}: {reason}")]
    BadSpec { path: PathBuf, reason: String },
    #[error("plugin {0:?} does not implement VolumeDriver")]
    NotVolumeDriver(String),
    #[error("{endpoint}: {source}")]
    Transport { endpoint: &'static str, source: HttpError },
    /// The plugin answered with an error.
    #[error("{endpoint}: {message}")]
    Plugin { endpoint: &'static str, message: String },
    #[error("{endpoint}: bad response from plugin: {detail}")]
    BadResponse { endpoint: &'static str, detail: String },
    #[error("volume {volume:?} was not created (--explicitcreate is set): {cause}")]
    NotCreated { volume: String, cause: Box<DvdcliError> },
}

fn usage(message: impl Into<String>) -> DvdcliError {
    DvdcliError::Usage(message.into())
}

// ---------------------------------------------------------------------------------------------
// Arguments

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Mount,
    Unmount,
    Create,
    Remove,
    Path,
    Get,
    List,
    Version,
    Help,
}

impl Verb {
    fn parse(word: &str) -> Result<Verb, DvdcliError> {
        Ok(match word {
            "mount" => Verb::Mount,
            "unmount" => Verb::Unmount,
            "create" => Verb::Create,
            "remove" => Verb::Remove,
            "path" => Verb::Path,
            "get" => Verb::Get,
            "list" => Verb::List,
            "version" => Verb::Version,
            "help" => Verb::Help,
            _ => return Err(usage(format!("unknown command {word:?} (try 'dvdcli help')"))),
        })
    }

    fn needs_driver(self) -> bool {
        !matches!(self, Verb::Version | Verb::Help)
    }

    fn needs_volume(self) -> bool {
        !matches!(self, Verb::List | Verb::Version | Verb::Help)
    }
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub verb: Verb,
    pub driver: Option<String>,
    pub volume: Option<String>,
    pub opts: Opts,
    pub explicit_create: bool,
}

pub const USAGE: &str = "\
usage: dvdcli COMMAND [FLAGS]

commands:
  mount    --volumedriver=NAME --volumename=VOL [--volumeopts=K=V[,K=V]...] [--explicitcreate]
  unmount  --volumedriver=NAME --volumename=VOL
  create   --volumedriver=NAME --volumename=VOL [--volumeopts=K=V[,K=V]...]
  remove   --volumedriver=NAME --volumename=VOL
  path     --volumedriver=NAME --volumename=VOL
  get      --volumedriver=NAME --volumename=VOL
  list     --volumedriver=NAME
  version

mount creates a missing volume unless --explicitcreate (or --explicitCreate) is given, and
prints the mountpoint. --volumeopts may be repeated.
";

/// Parses dvdcli's arguments (without the program name).
pub fn parse_args(args: &[String]) -> Result<Invocation, DvdcliError> {
    let mut verb = None;
    let mut driver = None;
    let mut volume = None;
    let mut opts = Opts::new();
    let mut opts_given = false;
    let mut explicit_create = None;
    let mut help = false;
    let mut positionals = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            positionals.extend(rest.by_ref());
            break;
        }
        let Some(flag) = arg.strip_prefix("--") else {
            match arg.as_str() {
                "-h" => help = true,
                _ if arg.starts_with('-') && arg.len() > 1 => return Err(usage(format!("unknown flag {arg:?}"))),
                _ => positionals.push(arg),
            }
            continue;
        };
        let (name, inline_value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (flag, None),
        };
        match name {
            "volumedriver" | "volumename" | "volumeopts" => {
                let value = match inline_value {
                    Some(value) => value,
                    None => rest.next().ok_or_else(|| usage(format!("flag --{name} needs a value")))?.as_str(),
                };
                match name {
                    "volumedriver" => driver = Some(value.to_string()),
                    "volumename" => volume = Some(value.to_string()),
                    _ => {
                        opts_given = true;
                        for opt in split_csv(value)? {
                            let (key, value) = parse_opt(&opt)?;
                            opts.insert(key, value);
                        }
                    }
                }
            }
            "explicitcreate" | "explicitCreate" => {
                explicit_create = Some(match inline_value {
                    None => true,
                    Some(value) => parse_bool(value)
                        .ok_or_else(|| usage(format!("--{name} takes true or false, not {value:?}")))?,
                });
            }
            "help" => help = true,
            _ => return Err(usage(format!("unknown flag --{name}"))),
        }
    }
    for word in positionals {
        if verb.is_some() {
            return Err(usage(format!("unexpected argument {word:?}")));
        }
        verb = Some(Verb::parse(word)?);
    }
    let verb = match (verb, help) {
        (_, true) => Verb::Help,
        (Some(verb), false) => verb,
        (None, false) => return Err(usage("missing command (try 'dvdcli help')")),
    };
    if opts_given && !matches!(verb, Verb::Mount | Verb::Create | Verb::Help) {
        return Err(usage("--volumeopts is only valid with mount and create"));
    }
    if explicit_create.is_some() && !matches!(verb, Verb::Mount | Verb::Help) {
        return Err(usage("--explicitcreate is only valid with mount"));
    }
    let driver = driver.filter(|d| !d.is_empty());
    let volume = volume.filter(|v| !v.is_empty());
    if verb.needs_driver() && driver.is_none() {
        return Err(usage("missing --volumedriver"));
    }
    if verb.needs_volume() && volume.is_none() {
        return Err(usage("missing --volumename"));
    }
    Ok(Invocation { verb, driver, volume, opts, explicit_create: explicit_create.unwrap_or(false) })
}

/// Go's `strconv.ParseBool`, which pflag uses.
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `KEY=VALUE`, split at the first `=`.
fn parse_opt(opt: &str) -> Result<(String, String), DvdcliError> {
    match opt.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        Some(_) => Err(usage(format!("volume option {opt:?} has an empty key"))),
        None => Err(usage(format!("volume option {opt:?} is not KEY=VALUE"))),
    }
}

/// A flag value read as one CSV record, as pflag's StringSlice does: fields split at commas,
/// a field starting with `"` is quoted (`""` inside is a quote). An empty value is no fields.
fn split_csv(value: &str) -> Result<Vec<String>, DvdcliError> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    if value.contains(['\n', '\r']) {
        return Err(usage(format!("line break in --volumeopts {value:?}")));
    }
    let bad = |why: &str| usage(format!("--volumeopts {value:?}: {why}"));
    let mut fields = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(bad("unterminated quoted field")),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            if !matches!(chars.peek(), None | Some(',')) {
                return Err(bad("text after a closing quote"));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '"' {
                    return Err(bad("a quote inside an unquoted field"));
                }
                field.push(c);
                chars.next();
            }
        }
        fields.push(field);
        if chars.next().is_none() {
            return Ok(fields);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Discovery

/// Where plugins are looked for. Docker's order: `<socket dir>/<name>.sock`,
/// `<socket dir>/<name>/<name>.sock`, then for each spec dir `<dir>/<name>.spec`,
/// `<dir>/<name>/<name>.spec`, `<dir>/<name>.json`, `<dir>/<name>/<name>.json`. A `.spec`
/// file holds one URL (`unix:///path`, `tcp://host:port`); a `.json` file `{"Name","Addr"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub socket_dirs: Vec<PathBuf>,
    pub spec_dirs: Vec<PathBuf>,
}

impl Discovery {
    pub fn docker() -> Discovery {
        Discovery {
            socket_dirs: vec![PathBuf::from(DOCKER_SOCKET_DIR)],
            spec_dirs: DOCKER_SPEC_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// Docker's directories, or those in [`SOCKET_DIRS_ENV`] and [`SPEC_DIRS_ENV`].
    pub fn from_env() -> Discovery {
        let dirs = |var: &str| {
            std::env::var_os(var).map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
        };
        let docker = Discovery::docker();
        Discovery {
            socket_dirs: dirs(SOCKET_DIRS_ENV).unwrap_or(docker.socket_dirs),
            spec_dirs: dirs(SPEC_DIRS_ENV).unwrap_or(docker.spec_dirs),
        }
    }

    /// Every path looked at for `name`, in order.
    pub fn candidates(&self, name: &str) -> Vec<PathBuf> {
        let pair =
            |dir: &Path, ext: &str| [dir.join(format!("{name}{ext}")), dir.join(name).join(format!("{name}{ext}"))];
        let sockets = self.socket_dirs.iter().flat_map(|dir| pair(dir, ".sock"));
        let specs = self.spec_dirs.iter().flat_map(|dir| pair(dir, ".spec").into_iter().chain(pair(dir, ".json")));
        sockets.chain(specs).collect()
    }

    /// The plugin's address, or `None` when no candidate exists. A spec file that exists
    /// but cannot be read is an error, not a reason to look further (nor, unlike Docker, to
    /// retry for 30 s: a broken file will not mend itself).
    pub fn locate(&self, name: &str) -> Result<Option<Address>, DvdcliError> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(DvdcliError::BadDriverName(name.to_string()));
        }
        for path in self.candidates(name) {
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
            match extension {
                "sock" => {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        return Ok(Some(Address::Unix(path)));
                    }
                }
                _ => return read_spec(&path, extension == "json").map(Some),
            }
        }
        Ok(None)
    }

    fn searched(&self) -> String {
        let dirs: Vec<String> =
            self.socket_dirs.iter().chain(&self.spec_dirs).map(|d| d.display().to_string()).collect();
        dirs.join(", ")
    }
}

/// The address in a `.spec` or `.json` file. The name in a `.json` file is ignored (Docker
/// names a plugin by its file), and so is its `TLSConfig`: Docker applies TLS only to
/// `https://` addresses, which are refused here.
fn read_spec(path: &Path, is_json: bool) -> Result<Address, DvdcliError> {
    let bad = |reason: String| DvdcliError::BadSpec { path: path.to_path_buf(), reason };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() || meta.len() > MAX_SPEC_FILE_BYTES {
        return Err(bad(format!("not a regular file of at most {MAX_SPEC_FILE_BYTES} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let url = if is_json {
        let spec: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        match spec.get("Addr") {
            Some(Value::String(addr)) => addr.trim().to_string(),
            _ => return Err(bad("no \"Addr\" string".to_string())),
        }
    } else {
        text.trim().to_string()
    };
    Address::parse(&url).map_err(|e| bad(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// The plugin client

/// How the client finds plugins and how long it waits.
#[derive(Debug, Clone)]
pub struct Config {
    pub discovery: Discovery,
    /// How long to keep looking for the plugin, and to retry connecting on each call.
    pub retry_for: Duration,
    /// The first wait between attempts; doubles after each.
    pub first_backoff: Duration,
    pub long_call_timeout: Duration,
    pub short_call_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            discovery: Discovery::docker(),
            retry_for: RETRY_FOR,
            first_backoff: FIRST_BACKOFF,
            long_call_timeout: LONG_CALL_TIMEOUT,
            short_call_timeout: SHORT_CALL_TIMEOUT,
        }
    }
}

impl Config {
    pub fn from_env() -> Config {
        Config { discovery: Discovery::from_env(), ..Config::default() }
    }
}

/// Retries `attempt` while it fails with an error `retryable` accepts, waiting
/// `first_backoff`, then twice that, and so on, giving up when the next wait would end past
/// `retry_for` (Docker's `callWithRetry`).
async fn with_retry<T, F, Fut>(
    config: &Config,
    what: &str,
    retryable: impl Fn(&DvdcliError) -> bool,
    mut attempt: F,
) -> Result<T, DvdcliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DvdcliError>>,
{
    let start = Instant::now();
    let mut backoff = config.first_backoff;
    loop {
        match attempt().await {
            Err(e) if retryable(&e) && start.elapsed() + backoff < config.retry_for => {
                tracing::warn!(error = %e, "{what}, retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
            result => return result,
        }
    }
}

/// A volume as `Get` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverVolume {
    pub name: String,
    /// Empty when not mounted (or when the plugin does not say).
    pub mountpoint: String,
}

/// A client of one Docker volume plugin, found and activated.
pub struct VolumeDriverClient {
    name: String,
    http: http::Client,
    config: Config,
}

impl VolumeDriverClient {
    /// Finds the plugin named `name` (retrying while it is not there), activates it and checks
    /// that it implements `VolumeDriver`.
    pub async fn connect(name: &str, config: &Config) -> Result<VolumeDriverClient, DvdcliError> {
        let not_found = |e: &DvdcliError| matches!(e, DvdcliError::PluginNotFound { .. });
        let address = with_retry(config, "volume driver plugin not found", not_found, || async {
            config.discovery.locate(name)?.ok_or_else(|| DvdcliError::PluginNotFound {
                name: name.to_string(),
                searched: config.discovery.searched(),
            })
        })
        .await?;
        let client =
            VolumeDriverClient { name: name.to_string(), http: http::Client::new(address), config: config.clone() };
        let reply = client.call("Plugin.Activate", None, client.config.short_call_timeout).await?;
        let implements = match reply.get("Implements") {
            Some(Value::Array(items)) => items.iter().any(|i| i.as_str() == Some("VolumeDriver")),
            _ => false,
        };
        if !implements {
            return Err(DvdcliError::NotVolumeDriver(name.to_string()));
        }
        Ok(client)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn address(&self) -> &Address {
        self.http.address()
    }

    pub async fn create(&self, volume: &str, opts: &Opts) -> Result<(), DvdcliError> {
        let body = json!({"Name": volume, "Opts": opts});
        self.call("VolumeDriver.Create", Some(body), self.config.long_call_timeout).await.map(drop)
    }

    pub async fn remove(&self, volume: &str) -> Result<(), DvdcliError> {
        self.call("VolumeDriver.Remove", Some(json!({"Name": volume})), self.config.long_call_timeout).await.map(drop)
    }

    /// Mounts and returns the mountpoint. `caller_id: None` sends no `ID`, as dvdcli did.
    pub async fn mount(&self, volume: &str, caller_id: Option<&str>) -> Result<String, DvdcliError> {
        let reply =
            self.call("VolumeDriver.Mount", Some(name_and_id(volume, caller_id)), self.config.long_call_timeout);
        string_field(&reply.await?, "VolumeDriver.Mount", "Mountpoint")
    }

    pub async fn unmount(&self, volume: &str, caller_id: Option<&str>) -> Result<(), DvdcliError> {
        let body = name_and_id(volume, caller_id);
        self.call("VolumeDriver.Unmount", Some(body), self.config.long_call_timeout).await.map(drop)
    }

    /// The mountpoint, empty when not mounted.
    pub async fn path(&self, volume: &str) -> Result<String, DvdcliError> {
        let reply = self.call("VolumeDriver.Path", Some(json!({"Name": volume})), self.config.short_call_timeout);
        string_field(&reply.await?, "VolumeDriver.Path", "Mountpoint")
    }

    pub async fn get(&self, volume: &str) -> Result<DriverVolume, DvdcliError> {
        const ENDPOINT: &str = "VolumeDriver.Get";
        let reply = self.call(ENDPOINT, Some(json!({"Name": volume})), self.config.short_call_timeout).await?;
        match reply.get("Volume") {
            Some(Value::Object(v)) => driver_volume(v, ENDPOINT),
            _ => Err(DvdcliError::BadResponse { endpoint: ENDPOINT, detail: "no Volume in the reply".to_string() }),
        }
    }

    pub async fn list(&self) -> Result<Vec<DriverVolume>, DvdcliError> {
        const ENDPOINT: &str = "VolumeDriver.List";
        let reply = self.call(ENDPOINT, Some(json!({})), self.config.short_call_timeout).await?;
        let bad = |detail: &str| DvdcliError::BadResponse { endpoint: ENDPOINT, detail: detail.to_string() };
        match reply.get("Volumes") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_object().ok_or_else(|| bad("a volume is not an object")))
                .map(|item| driver_volume(item?, ENDPOINT))
                .collect(),
            Some(_) => Err(bad("Volumes is not an array")),
        }
    }

    /// POSTs to `/<endpoint>` and returns the reply object; a non-200 status or a non-empty
    /// `Err` is [`DvdcliError::Plugin`]. Connecting is retried (nothing was sent yet); a
    /// call that reached the plugin is not.
    async fn call(
        &self,
        endpoint: &'static str,
        body: Option<Value>,
        call_timeout: Duration,
    ) -> Result<Map<String, Value>, DvdcliError> {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let target = format!("/{endpoint}");
        let headers = [("Accept", ACCEPT), ("Content-Type", "application/json")];
        let unreachable =
            |e: &DvdcliError| matches!(e, DvdcliError::Transport { source: HttpError::Connect { .. }, .. });
        let response = with_retry(&self.config, "cannot connect to the volume driver plugin", unreachable, || async {
            self.http
                .post(&target, &headers, &body, call_timeout)
                .await
                .map_err(|source| DvdcliError::Transport { endpoint, source })
        })
        .await?;
        let parsed = serde_json::from_slice::<Value>(&response.body);
        let plugin_error = |message: String| DvdcliError::Plugin { endpoint, message };
        if response.status != 200 {
            return Err(plugin_error(match &parsed {
                Ok(Value::Object(map)) if matches!(map.get("Err"), Some(Value::String(e)) if !e.is_empty()) => {
                    map["Err"].as_str().unwrap_or_default().to_string()
                }
                _ => quote_body(response.status, &response.body),
            }));
        }
        match parsed {
            Ok(Value::Object(map)) => match map.get("Err") {
                Some(Value::String(e)) if !e.is_empty() => Err(plugin_error(e.clone())),
                _ => Ok(map),
            },
            Ok(_) => Err(DvdcliError::BadResponse { endpoint, detail: "the reply is not a JSON object".to_string() }),
            Err(e) => Err(DvdcliError::BadResponse { endpoint, detail: format!("invalid JSON: {e}") }),
        }
    }
}

fn name_and_id(volume: &str, caller_id: Option<&str>) -> Value {
    match caller_id {
        Some(id) => json!({"Name": volume, "ID": id}),
        None => json!({"Name": volume}),
    }
}

fn string_field(reply: &Map<String, Value>, endpoint: &'static str, key: &str) -> Result<String, DvdcliError> {
    match reply.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(DvdcliError::BadResponse { endpoint, detail: format!("{key} is not a string") }),
    }
}

fn driver_volume(volume: &Map<String, Value>, endpoint: &'static str) -> Result<DriverVolume, DvdcliError> {
    Ok(DriverVolume {
        name: string_field(volume, endpoint, "Name")?,
        mountpoint: string_field(volume, endpoint, "Mountpoint")?,
    })
}

/// A non-JSON error body, as Docker shows it: the raw text, cut short.
fn quote_body(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return format!("HTTP status {status}");
    }
    let cut: String = text.chars().take(MAX_QUOTED_BODY_CHARS).collect();
    if cut.len() < text.len() {
        format!("HTTP status {status}: {cut}…")
    } else {
        format!("HTTP status {status}: {cut}")
    }
}

// ---------------------------------------------------------------------------------------------
// The command

/// What the process should print and exit with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs dvdcli with `args` (without the program name: `["mount", "--volumename=v", …]`),
/// finding plugins as configured by the environment ([`Config::from_env`]).
pub async fn run(args: &[String]) -> Output {
    run_with(args, &Config::from_env()).await
}

/// Runs dvdcli with an explicit configuration. Errors are one line on stderr, exit code 1.
pub async fn run_with(args: &[String], config: &Config) -> Output {
    match execute(args, config).await {
        Ok(stdout) => Output { exit_code: 0, stdout, stderr: String::new() },
        Err(error) => {
            let line: String =
                format!("dvdcli: {error}").chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
            Output { exit_code: 1, stdout: String::new(), stderr: line + "\n" }
        }
    }
}

async fn execute(args: &[String], config: &Config) -> Result<String, DvdcliError> {
    let invocation = parse_args(args)?;
    let volume = invocation.volume.as_deref().unwrap_or_default();
    let connect = || VolumeDriverClient::connect(invocation.driver.as_deref().unwrap_or_default(), config);
    let line = |text: &str| if text.is_empty() { String::new() } else { format!("{text}\n") };
    match invocation.verb {
        Verb::Help => Ok(USAGE.to_string()),
        Verb::Version => Ok(format!("dvdcli (Tessera {}), compatible with dvdcli 0.2\n", env!("CARGO_PKG_VERSION"))),
        Verb::Mount => {
            let client = connect().await?;
            match client.get(volume).await {
                Ok(_) => {}
                Err(cause @ DvdcliError::Plugin { .. }) if invocation.explicit_create => {
                    return Err(DvdcliError::NotCreated { volume: volume.to_string(), cause: Box::new(cause) });
                }
                Err(DvdcliError::Plugin { .. }) => client.create(volume, &invocation.opts).await?,
                Err(other) => return Err(other),
            }
            let mountpoint = client.mount(volume, None).await?;
            if mountpoint.is_empty() {
                return Err(DvdcliError::BadResponse {
                    endpoint: "VolumeDriver.Mount",
                    detail: "empty Mountpoint".to_string(),
                });
            }
            Ok(line(&mountpoint))
        }
        Verb::Unmount => {
            let client = connect().await?;
            client.get(volume).await?;
            client.unmount(volume, None).await?;
            Ok(String::new())
        }
        Verb::Create => {
            connect().await?.create(volume, &invocation.opts).await?;
            Ok(String::new())
        }
        Verb::Remove => {
            let client = connect().await?;
            client.get(volume).await?;
            client.remove(volume).await?;
            Ok(String::new())
        }
        Verb::Path => {
            let client = connect().await?;
            let found = client.get(volume).await?;
            if !found.mountpoint.is_empty() {
                return Ok(line(&found.mountpoint));
            }
            Ok(line(&client.path(volume).await?))
        }
        Verb::Get => {
            let found = connect().await?.get(volume).await?;
            Ok(line(if found.name.is_empty() { volume } else { &found.name }))
        }
        Verb::List => {
            let volumes = connect().await?.list().await?;
            Ok(volumes.iter().map(|v| line(&v.name)).collect())
        }
    }
}
