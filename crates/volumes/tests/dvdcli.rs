//! The dvdcli-compatible command against the real plugin server on real sockets (Unix and
//! TCP), found through real spec files, as mesos-module-dvdi and scripts call it. The volume
//! service behind the plugin is an in-memory fake (`FakeApi`): the service is not under test
//! here, the command and the protocol are.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TempDir;
use serde_json::json;
use tessera_volumes::api::{ApiError, Opts, VolumeApi, VolumeInfo};
use tessera_volumes::dvdcli::{self, parse_args, Config, Discovery, Output, Verb};
use tessera_volumes::http::{self, Limits, Request, Response};
use tessera_volumes::plugin::{self, PluginHandler};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// The fake volume service

#[derive(Default)]
struct FakeApi {
    state: Mutex<FakeState>,
    /// Makes `Get` leave out the mountpoint, as some plugins do, so `path` must ask `Path`.
    get_hides_mountpoint: AtomicBool,
}

#[derive(Default)]
struct FakeState {
    /// Volume name → (creation options, mount count).
    volumes: BTreeMap<String, (Opts, u32)>,
    calls: Vec<String>,
}

impl FakeApi {
    fn with_volumes(names: &[&str]) -> FakeApi {
        let api = FakeApi::default();
        for name in names {
            api.state.lock().unwrap().volumes.insert(name.to_string(), (Opts::new(), 0));
        }
        api
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    fn opts(&self, name: &str) -> Option<Opts> {
        self.state.lock().unwrap().volumes.get(name).map(|v| v.0.clone())
    }

    fn record(&self, call: String) -> std::sync::MutexGuard<'_, FakeState> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(call);
        state
    }
}

fn mountpoint(name: &str) -> String {
    format!("/fake/mnt/{name}")
}

impl VolumeApi for FakeApi {
    async fn create(&self, name: &str, opts: &Opts) -> Result<(), ApiError> {
        let opts_text: Vec<String> = opts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut state = self.record(format!("create {name} {}", opts_text.join(",")));
        if name.contains('/') {
            return Err(ApiError::Invalid(format!("bad volume name {name:?}\nnames may not hold '/'")));
        }
        state.volumes.entry(name.to_string()).or_insert_with(|| (opts.clone(), 0));
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), ApiError> {
        let mut state = self.record(format!("remove {name}"));
        state.volumes.remove(name).map(drop).ok_or_else(|| ApiError::NotFound(name.to_string()))
    }

    async fn mount(&self, name: &str, caller_id: &str) -> Result<String, ApiError> {
        let mut state = self.record(format!("mount {name} {caller_id:?}"));
        let volume = state.volumes.get_mut(name).ok_or_else(|| ApiError::NotFound(name.to_string()))?;
        volume.1 += 1;
        Ok(mountpoint(name))
    }

    async fn unmount(&self, name: &str, caller_id: &str) -> Result<(), ApiError> {
        let mut state = self.record(format!("unmount {name} {caller_id:?}"));
        let volume = state.volumes.get_mut(name).ok_or_else(|| ApiError::NotFound(name.to_string()))?;
        volume.1 = volume.1.checked_sub(1).ok_or_else(|| ApiError::Invalid(format!("{name:?} is not mounted")))?;
        Ok(())
    }

    async fn path(&self, name: &str) -> Result<Option<String>, ApiError> {
        let state = self.record(format!("path {name}"));
        let volume = state.volumes.get(name).ok_or_else(|| ApiError::NotFound(name.to_string()))?;
        Ok((volume.1 > 0).then(|| mountpoint(name)))
    }

    async fn get(&self, name: &str) -> Result<VolumeInfo, ApiError> {
        let state = self.record(format!("get {name}"));
        let volume = state.volumes.get(name).ok_or_else(|| ApiError::NotFound(name.to_string()))?;
        let shown = volume.1 > 0 && !self.get_hides_mountpoint.load(Ordering::Relaxed);
        Ok(VolumeInfo { name: name.to_string(), mountpoint: shown.then(|| mountpoint(name)), status: BTreeMap::new() })
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, ApiError> {
        let state = self.record("list".to_string());
        let info = |(name, v): (&String, &(Opts, u32))| VolumeInfo {
            name: name.clone(),
            mountpoint: (v.1 > 0).then(|| mountpoint(name)),
            status: BTreeMap::new(),
        };
        Ok(state.volumes.iter().map(info).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

/// A sandbox standing in for Docker's plugin directories: `run/` (sockets), then `etc/` and
/// `usr/` (spec files), in that search order.
struct Sandbox {
    dir: TempDir,
    config: Config,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = TempDir::new("dvdcli");
        let config = Config {
            discovery: Discovery {
                socket_dirs: vec![dir.0.join("run")],
                spec_dirs: vec![dir.0.join("etc"), dir.0.join("usr")],
            },
            retry_for: Duration::from_secs(2),
            first_backoff: Duration::from_millis(50),
            long_call_timeout: Duration::from_secs(10),
            short_call_timeout: Duration::from_secs(10),
        };
        Sandbox { dir, config, tasks: Vec::new() }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.0.join(relative)
    }

    /// Serves the plugin on a Unix socket at `relative`.
    fn serve_unix(&mut self, relative: &str, api: &Arc<FakeApi>) -> PathBuf {
        let socket = self.path(relative);
        let listener = plugin::bind(&socket).unwrap();
        self.tasks.push(tokio::spawn(plugin::serve_listener(listener, api.clone(), Limits::default())));
        socket
    }

    /// Serves the plugin on loopback TCP; returns `host:port`.
    async fn serve_tcp(&mut self, api: &Arc<FakeApi>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let handler = Arc::new(PluginHandler::new(api.clone()));
        self.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let handler = handler.clone();
                tokio::spawn(async move { http::serve_connection(stream, handler.as_ref(), &Limits::default()).await });
            }
        }));
        address
    }

    fn write(&self, relative: &str, contents: &str) {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    async fn dvdcli(&self, args: &[&str]) -> Output {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        dvdcli::run_with(&args, &self.config).await
    }
}

/// A sandbox with the plugin `tessera` at `run/tessera.sock`.
fn with_plugin(api: FakeApi) -> (Sandbox, Arc<FakeApi>) {
    let mut sandbox = Sandbox::new();
    let api = Arc::new(api);
    sandbox.serve_unix("run/tessera.sock", &api);
    (sandbox, api)
}

fn assert_ok(output: &Output, stdout: &str) {
    assert_eq!(output, &Output { exit_code: 0, stdout: stdout.to_string(), stderr: String::new() });
}

/// Exit 1, nothing on stdout, one line on stderr holding every needle.
fn assert_fails(output: &Output, needles: &[&str]) {
    assert_eq!(output.exit_code, 1, "{output:?}");
    assert_eq!(output.stdout, "", "{output:?}");
    assert!(output.stderr.ends_with('\n') && output.stderr.lines().count() == 1, "{output:?}");
    for needle in needles {
        assert!(output.stderr.contains(needle), "{needle:?} not in {:?}", output.stderr);
    }
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn opts(pairs: &[(&str, &str)]) -> Opts {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

// ---------------------------------------------------------------------------------------------
// Arguments

#[test]
fn volumeopts_split_at_the_first_equals_only() {
    let parsed = parse_args(&args(&["mount", "--volumedriver=t", "--volumename=v", "--volumeopts=a=b=c"])).unwrap();
    assert_eq!(parsed.opts, opts(&[("a", "b=c")]));
    let parsed = parse_args(&args(&["create", "--volumedriver=t", "--volumename=v", "--volumeopts=k="])).unwrap();
    assert_eq!(parsed.opts, opts(&[("k", "")]));
}

#[test]
fn volumeopts_split_at_commas_and_repeat() {
    let parsed = parse_args(&args(&[
        "--volumeopts=size=8,fs=xfs",
        "mount",
        "--volumeopts",
        "pool=p1",
        "--volumedriver=t",
        "--volumename=v",
        "--volumeopts=size=16",
    ]))
    .unwrap();
    assert_eq!(parsed.opts, opts(&[("fs", "xfs"), ("pool", "p1"), ("size", "16")]));
    // A CSV-quoted field keeps its comma, as pflag's StringSlice reads it.
    let parsed =
        parse_args(&args(&["mount", "--volumedriver=t", "--volumename=v", r#"--volumeopts="mountopts=a,b",x=1"#]))
            .unwrap();
    assert_eq!(parsed.opts, opts(&[("mountopts", "a,b"), ("x", "1")]));
    let parsed =
        parse_args(&args(&["mount", "--volumedriver=t", "--volumename=v", r#"--volumeopts="q=say ""hi""""#])).unwrap();
    assert_eq!(parsed.opts, opts(&[("q", "say \"hi\"")]));
    let parsed = parse_args(&args(&["mount", "--volumedriver=t", "--volumename=v", "--volumeopts="])).unwrap();
    assert_eq!(parsed.opts, Opts::new());
}

#[test]
fn bad_volumeopts_are_clear_errors() {
    for (opt, needle) in [
        ("--volumeopts=size", "\"size\" is not KEY=VALUE"),
        ("--volumeopts=a=1,b", "\"b\" is not KEY=VALUE"),
        ("--volumeopts=a=1,", "\"\" is not KEY=VALUE"),
        ("--volumeopts==v", "empty key"),
        ("--volumeopts=\"a=1", "unterminated"),
        ("--volumeopts=a=\"1\"", "quote inside an unquoted field"),
        ("--volumeopts=\"a=1\"x", "after a closing quote"),
        ("--volumeopts=a=1\nb=2", "line break"),
    ] {
        let err = parse_args(&args(&["mount", "--volumedriver=t", "--volumename=v", opt])).unwrap_err();
        assert!(err.to_string().contains(needle), "{opt:?}: {err}");
    }
}

#[test]
fn explicitcreate_both_spellings_and_values() {
    let base = ["mount", "--volumedriver=t", "--volumename=v"];
    let explicit = |flag: &str| {
        let mut words = base.to_vec();
        words.push(flag);
        parse_args(&args(&words)).map(|p| p.explicit_create)
    };
    assert!(!parse_args(&args(&base)).unwrap().explicit_create);
    assert!(explicit("--explicitcreate").unwrap());
    assert!(explicit("--explicitCreate").unwrap());
    assert!(explicit("--explicitcreate=true").unwrap());
    assert!(explicit("--explicitCreate=True").unwrap());
    assert!(explicit("--explicitcreate=1").unwrap());
    assert!(!explicit("--explicitcreate=false").unwrap());
    assert!(!explicit("--explicitCreate=0").unwrap());
    assert!(explicit("--explicitcreate=maybe").unwrap_err().to_string().contains("true or false"));
    assert!(explicit("--EXPLICITCREATE").unwrap_err().to_string().contains("unknown flag"));
    // A boolean takes no separate value, as in pflag: "true" is a stray argument.
    let err = parse_args(&args(&["mount", "--explicitcreate", "true", "--volumedriver=t", "--volumename=v"]));
    assert!(err.unwrap_err().to_string().contains("unexpected argument \"true\""));
}

#[test]
fn flags_go_before_or_after_the_verb_in_either_form() {
    let expected = parse_args(&args(&["mount", "--volumedriver=t", "--volumename=v"])).unwrap();
    for words in [
        &["--volumedriver=t", "--volumename=v", "mount"][..],
        &["--volumedriver", "t", "mount", "--volumename", "v"],
        &["--volumename=other", "mount", "--volumedriver=t", "--volumename=v"], // the last one wins
        &["--volumedriver=t", "--volumename=v", "--", "mount"],
    ] {
        assert_eq!(parse_args(&args(words)).unwrap(), expected, "{words:?}");
    }
    assert_eq!(expected.verb, Verb::Mount);
    assert_eq!((expected.driver.as_deref(), expected.volume.as_deref()), (Some("t"), Some("v")));
    // A value may start with a dash in the separate form.
    let parsed = parse_args(&args(&["get", "--volumedriver=t", "--volumename", "-odd"])).unwrap();
    assert_eq!(parsed.volume.as_deref(), Some("-odd"));
}

#[test]
fn usage_errors() {
    for (words, needle) in [
        (&[][..], "missing command"),
        (&["--volumedriver=t"], "missing command"),
        (&["frobnicate"], "unknown command \"frobnicate\""),
        (&["mount", "get"], "unexpected argument \"get\""),
        (&["mount", "--volumename=v"], "missing --volumedriver"),
        (&["mount", "--volumedriver=t"], "missing --volumename"),
        (&["mount", "--volumedriver=t", "--volumename="], "missing --volumename"),
        (&["mount", "--volumedriver=t", "--volumename"], "--volumename needs a value"),
        (&["mount", "--volumedriver=t", "--volumename=v", "--size=8"], "unknown flag --size"),
        (&["mount", "--volumedriver=t", "--volumename=v", "-v"], "unknown flag \"-v\""),
        (&["unmount", "--volumedriver=t", "--volumename=v", "--volumeopts=a=b"], "only valid with mount and create"),
        (&["create", "--volumedriver=t", "--volumename=v", "--explicitcreate"], "only valid with mount"),
    ] {
        let err = parse_args(&args(words)).unwrap_err();
        assert!(err.to_string().contains(needle), "{words:?}: {err}");
    }
    assert_eq!(parse_args(&args(&["list", "--volumedriver=t"])).unwrap().verb, Verb::List);
    assert_eq!(parse_args(&args(&["version"])).unwrap().verb, Verb::Version);
    assert_eq!(parse_args(&args(&["mount", "--help"])).unwrap().verb, Verb::Help);
}

#[tokio::test]
async fn usage_errors_exit_1_with_one_line() {
    let sandbox = Sandbox::new();
    assert_fails(
        &sandbox.dvdcli(&["mount", "--volumedriver=t", "--volumename=v", "--volumeopts=size"]).await,
        &["dvdcli: ", "is not KEY=VALUE"],
    );
    assert_fails(&sandbox.dvdcli(&[]).await, &["missing command"]);
    let help = sandbox.dvdcli(&["help"]).await;
    assert_eq!(help.exit_code, 0);
    assert!(help.stdout.contains("--explicitcreate"));
}

#[tokio::test]
async fn dvdcli_version_needs_no_plugin() {
    let output = Sandbox::new().dvdcli(&["version"]).await;
    assert_eq!(output.exit_code, 0);
    assert!(output.stdout.contains(env!("CARGO_PKG_VERSION")), "{output:?}");
}

// ---------------------------------------------------------------------------------------------
// Verbs

#[tokio::test]
async fn dvdcli_mount_creates_missing_volume() {
    let (sandbox, api) = with_plugin(FakeApi::default());
    let output = sandbox
        .dvdcli(&[
            "mount",
            "--volumedriver=tessera",
            "--volumename=data",
            "--volumeopts=size=8,fs=xfs",
            "--volumeopts=x=a=b",
        ])
        .await;
    assert_ok(&output, "/fake/mnt/data\n");
    // No ID is sent, as dvdcli never sent one: the mount counts under the empty caller.
    assert_eq!(api.calls(), ["get data", "create data fs=xfs,size=8,x=a=b", "mount data \"\""]);
    assert_eq!(api.opts("data").unwrap(), opts(&[("fs", "xfs"), ("size", "8"), ("x", "a=b")]));
}

#[tokio::test]
async fn dvdcli_mount_existing_volume_does_not_create() {
    let (sandbox, api) = with_plugin(FakeApi::with_volumes(&["data"]));
    let output = sandbox.dvdcli(&["--volumedriver=tessera", "mount", "--volumename=data", "--volumeopts=size=8"]).await;
    assert_ok(&output, "/fake/mnt/data\n");
    assert_eq!(api.calls(), ["get data", "mount data \"\""]);
}

#[tokio::test]
async fn dvdcli_mount_with_explicitcreate_refuses_missing_volume() {
    let (sandbox, api) = with_plugin(FakeApi::with_volumes(&["there"]));
    for flag in ["--explicitcreate", "--explicitCreate", "--explicitcreate=true", "--explicitCreate=true"] {
        let output = sandbox.dvdcli(&["mount", "--volumedriver=tessera", "--volumename=missing", flag]).await;
        assert_fails(&output, &["\"missing\" was not created", "--explicitcreate", "volume \"missing\" not found"]);
    }
    assert!(api.calls().iter().all(|c| c == "get missing"), "{:?}", api.calls());
    let output = sandbox.dvdcli(&["mount", "--volumedriver=tessera", "--volumename=there", "--explicitCreate"]).await;
    assert_ok(&output, "/fake/mnt/there\n");
    // explicitcreate=false creates as usual.
    let output =
        sandbox.dvdcli(&["mount", "--volumedriver=tessera", "--volumename=new", "--explicitcreate=false"]).await;
    assert_ok(&output, "/fake/mnt/new\n");
    assert!(api.opts("new").is_some());
}

#[tokio::test]
async fn dvdcli_unmount_checks_the_volume_then_unmounts() {
    let (sandbox, api) = with_plugin(FakeApi::with_volumes(&["data"]));
    assert_ok(&sandbox.dvdcli(&["mount", "--volumedriver=tessera", "--volumename=data"]).await, "/fake/mnt/data\n");
    assert_ok(&sandbox.dvdcli(&["unmount", "--volumedriver=tessera", "--volumename=data"]).await, "");
    assert_eq!(api.calls(), ["get data", "mount data \"\"", "get data", "unmount data \"\""]);

    let output = sandbox.dvdcli(&["unmount", "--volumedriver", "tessera", "--volumename", "ghost"]).await;
    assert_fails(&output, &["VolumeDriver.Get: volume \"ghost\" not found"]);
    assert!(!api.calls().iter().any(|c| c.starts_with("unmount ghost")));
    // An unmount the service refuses is reported with the endpoint.
    let output = sandbox.dvdcli(&["unmount", "--volumedriver=tessera", "--volumename=data"]).await;
    assert_fails(&output, &["VolumeDriver.Unmount: \"data\" is not mounted"]);
}

#[tokio::test]
async fn dvdcli_create_and_remove() {
    let (sandbox, api) = with_plugin(FakeApi::default());
    let output = sandbox.dvdcli(&["create", "--volumedriver=tessera", "--volumename=v", "--volumeopts=size=1"]).await;
    assert_ok(&output, "");
    assert_eq!(api.opts("v").unwrap(), opts(&[("size", "1")]));
    assert_ok(&sandbox.dvdcli(&["remove", "--volumedriver=tessera", "--volumename=v"]).await, "");
    assert_eq!(api.calls(), ["create v size=1", "get v", "remove v"]);
    // Removing a missing volume fails at Get: Remove is not called.
    assert_fails(&sandbox.dvdcli(&["remove", "--volumedriver=tessera", "--volumename=v"]).await, &["not found"]);
    assert_eq!(api.calls().last().unwrap(), "get v");
}

#[tokio::test]
async fn dvdcli_path_prints_the_mountpoint_only_when_mounted() {
    let (sandbox, api) = with_plugin(FakeApi::with_volumes(&["data"]));
    let path = ["path", "--volumedriver=tessera", "--volumename=data"];
    assert_ok(&sandbox.dvdcli(&path).await, "");
    assert_eq!(api.calls(), ["get data", "path data"]);
    sandbox.dvdcli(&["mount", "--volumedriver=tessera", "--volumename=data"]).await;
    let before = api.calls().len();
    assert_ok(&sandbox.dvdcli(&path).await, "/fake/mnt/data\n");
    assert_eq!(api.calls()[before..], ["get data"]); // Get's mountpoint suffices
                                                     // A plugin whose Get leaves the mountpoint out is asked for the Path.
    api.get_hides_mountpoint.store(true, Ordering::Relaxed);
    assert_ok(&sandbox.dvdcli(&path).await, "/fake/mnt/data\n");
    assert_eq!(api.calls()[before + 1..], ["get data", "path data"]);
    assert_fails(&sandbox.dvdcli(&["path", "--volumedriver=tessera", "--volumename=nope"]).await, &["not found"]);
}

#[tokio::test]
async fn dvdcli_get_and_list() {
    let (sandbox, api) = with_plugin(FakeApi::with_volumes(&["b", "a", "c"]));
    assert_ok(&sandbox.dvdcli(&["get", "--volumedriver=tessera", "--volumename=b"]).await, "b\n");
    assert_fails(&sandbox.dvdcli(&["get", "--volumedriver=tessera", "--volumename=z"]).await, &["not found"]);
    assert_ok(&sandbox.dvdcli(&["list", "--volumedriver=tessera"]).await, "a\nb\nc\n");
    assert_eq!(api.calls(), ["get b", "get z", "list"]);

    let (empty, _) = with_plugin(FakeApi::default());
    assert_ok(&empty.dvdcli(&["list", "--volumedriver=tessera"]).await, "");
}

#[tokio::test]
async fn plugin_errors_are_one_line_with_the_endpoint() {
    let (sandbox, _) = with_plugin(FakeApi::default());
    let output = sandbox.dvdcli(&["mount", "--volumedriver=tessera", "--volumename=a/b"]).await;
    // The service's two-line message comes out on one line.
    assert_fails(&output, &["dvdcli: VolumeDriver.Create: bad volume name \"a/b\" names may not hold '/'"]);
}

// ---------------------------------------------------------------------------------------------
// Discovery

#[test]
fn discovery_candidates_are_dockers_order() {
    let discovery = Discovery { socket_dirs: vec!["/r".into()], spec_dirs: vec!["/e".into(), "/u".into()] };
    let expected: Vec<PathBuf> = [
        "/r/p.sock",
        "/r/p/p.sock",
        "/e/p.spec",
        "/e/p/p.spec",
        "/e/p.json",
        "/e/p/p.json",
        "/u/p.spec",
        "/u/p/p.spec",
        "/u/p.json",
        "/u/p/p.json",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(discovery.candidates("p"), expected);
    let docker = Discovery::docker();
    assert_eq!(docker.candidates("rexray")[0], Path::new("/run/docker/plugins/rexray.sock"));
    assert_eq!(docker.candidates("rexray")[9], Path::new("/usr/lib/docker/plugins/rexray/rexray.json"));
    for bad in ["", ".", "..", "../x", "a/b"] {
        assert!(discovery.locate(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn plugin_found_in_a_nested_socket_dir() {
    let mut sandbox = Sandbox::new();
    let api = Arc::new(FakeApi::default());
    sandbox.serve_unix("run/tessera/tessera.sock", &api);
    assert_ok(&sandbox.dvdcli(&["mount", "--volumedriver=tessera", "--volumename=v"]).await, "/fake/mnt/v\n");
}

#[tokio::test]
async fn plugin_found_through_spec_files() {
    let mut sandbox = Sandbox::new();
    let api = Arc::new(FakeApi::with_volumes(&["v"]));
    let socket = sandbox.serve_unix("sockets/elsewhere.sock", &api);
    let url = format!("unix://{}", socket.display());
    let tcp = sandbox.serve_tcp(&api).await;
    sandbox.write("etc/flat.spec", &format!("{url}\n"));
    sandbox.write("usr/nested/nested.spec", &url);
    sandbox.write("etc/tcp.spec", &format!("  tcp://{tcp}  \n"));
    sandbox.write("etc/js.json", &json!({"Name": "ignored", "Addr": url}).to_string());
    sandbox.write("usr/jsnest/jsnest.json", &json!({"Name": "jsnest", "Addr": format!("tcp://{tcp}")}).to_string());
    for driver in ["flat", "nested", "tcp", "js", "jsnest"] {
        let output = sandbox.dvdcli(&["get", &format!("--volumedriver={driver}"), "--volumename=v"]).await;
        assert_ok(&output, "v\n");
    }
    assert_eq!(api.calls().len(), 5);
}

#[tokio::test]
async fn sockets_are_searched_before_spec_files() {
    let mut sandbox = Sandbox::new();
    let api = Arc::new(FakeApi::with_volumes(&["v"]));
    sandbox.serve_unix("run/p/p.sock", &api);
    // These would fail if used.
    sandbox.write("etc/p.spec", "unix:///nonexistent/p.sock");
    sandbox.write("run/p.sock", "a regular file is not a socket");
    assert_ok(&sandbox.dvdcli(&["get", "--volumedriver=p", "--volumename=v"]).await, "v\n");
    // And .spec before .json, the first spec dir before the second.
    let mut sandbox = Sandbox::new();
    sandbox.serve_unix("sockets/q.sock", &api);
    sandbox.write("etc/q/q.spec", &format!("unix://{}", sandbox.path("sockets/q.sock").display()));
    sandbox.write("etc/q.json", "{\"Addr\": \"unix:///nonexistent/q.sock\"}");
    sandbox.write("usr/q.spec", "unix:///nonexistent/q.sock");
    assert_ok(&sandbox.dvdcli(&["get", "--volumedriver=q", "--volumename=v"]).await, "v\n");
}

#[tokio::test]
async fn bad_spec_files_fail_at_once_with_the_reason() {
    let sandbox = Sandbox::new();
    for (file, contents, needle) in [
        ("etc/a.spec", "", "expected unix://PATH"),
        ("etc/b.spec", "/run/b.sock", "expected unix://PATH"),
        ("etc/c.spec", "https://host:443", "TLS plugin addresses are not supported"),
        ("etc/d.spec", "ftp://host", "unknown scheme"),
        ("etc/e.json", "{\"Name\": \"e\"}", "no \"Addr\""),
        ("etc/f.json", "{not json", "invalid JSON"),
        ("etc/g.spec", "tcp://host-without-port", "HOST:PORT"),
    ] {
        sandbox.write(file, contents);
        let name = Path::new(file).file_stem().unwrap().to_str().unwrap();
        let started = Instant::now();
        let output = sandbox.dvdcli(&["list", &format!("--volumedriver={name}")]).await;
        assert_fails(&output, &["bad plugin spec", file, needle]);
        assert!(started.elapsed() < Duration::from_millis(500), "no retrying a bad spec");
    }
    assert_fails(&sandbox.dvdcli(&["list", "--volumedriver=../etc/a"]).await, &["bad volume driver name"]);
}

#[tokio::test]
async fn missing_plugin_is_retried_then_reported() {
    let mut sandbox = Sandbox::new();
    sandbox.config.retry_for = Duration::from_millis(600);
    let started = Instant::now();
    let output = sandbox.dvdcli(&["list", "--volumedriver=absent"]).await;
    assert_fails(&output, &["volume driver plugin \"absent\" not found in", "run, ", "etc, ", "usr"]);
    // 50 + 100 + 200 ms of backoff; the next wait (400 ms) would pass the 600 ms budget.
    assert!(started.elapsed() >= Duration::from_millis(350), "{:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn plugin_that_appears_late_is_found() {
    let mut sandbox = Sandbox::new();
    sandbox.config.retry_for = Duration::from_secs(10);
    let api = Arc::new(FakeApi::default());
    let socket = sandbox.path("run/late.sock");
    let late_api = api.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = plugin::bind(&socket).unwrap();
        plugin::serve_listener(listener, late_api, Limits::default()).await;
    });
    sandbox.tasks.push(late);
    assert_ok(&sandbox.dvdcli(&["mount", "--volumedriver=late", "--volumename=v"]).await, "/fake/mnt/v\n");
}

#[tokio::test]
async fn dead_socket_is_retried_then_reported() {
    let mut sandbox = Sandbox::new();
    sandbox.config.retry_for = Duration::from_millis(400);
    let socket = sandbox.path("run/dead.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let output = sandbox.dvdcli(&["list", "--volumedriver=dead"]).await;
    assert_fails(&output, &["Plugin.Activate: cannot connect to unix://", "dead.sock"]);
}

/// A plugin of another kind (a mock server: no network plugin exists here to test against).
struct NetworkPlugin;

impl http::Handler for NetworkPlugin {
    async fn handle(&self, _request: Request) -> Response {
        Response::new(200, plugin::CONTENT_TYPE, br#"{"Implements":["NetworkDriver"]}"#.to_vec())
    }
}

#[tokio::test]
async fn plugin_that_is_not_a_volume_driver_is_refused() {
    let mut sandbox = Sandbox::new();
    let socket = sandbox.path("run/net.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    sandbox.tasks.push(tokio::spawn(http::serve_unix(listener, Arc::new(NetworkPlugin), Limits::default())));
    let output = sandbox.dvdcli(&["mount", "--volumedriver=net", "--volumename=v"]).await;
    assert_fails(&output, &["plugin \"net\" does not implement VolumeDriver"]);
}

/// A plugin answering errors the way REX-Ray does (`{"Error":…}`) or with a bare text: the
/// raw body becomes the message, as Docker shows it.
struct RawErrorPlugin;

impl http::Handler for RawErrorPlugin {
    async fn handle(&self, request: Request) -> Response {
        match request.target.as_str() {
            "/Plugin.Activate" => {
                Response::new(200, "application/json", br#"{"Implements":["VolumeDriver"]}"#.to_vec())
            }
            "/VolumeDriver.Get" => {
                Response::new(500, "application/json", br#"{"Error":"no device name returned"}"#.to_vec())
            }
            "/VolumeDriver.List" => Response::new(200, "application/json", br#"{"Err":"listing is broken"}"#.to_vec()),
            _ => Response::text(500, ""),
        }
    }
}

#[tokio::test]
async fn foreign_error_shapes_are_reported() {
    let mut sandbox = Sandbox::new();
    let socket = sandbox.path("run/raw.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    sandbox.tasks.push(tokio::spawn(http::serve_unix(listener, Arc::new(RawErrorPlugin), Limits::default())));
    let output = sandbox.dvdcli(&["get", "--volumedriver=raw", "--volumename=v"]).await;
    assert_fails(&output, &["VolumeDriver.Get: HTTP status 500: {\"Error\":\"no device name returned\"}"]);
    // A 200 with a non-empty Err is an error too.
    assert_fails(&sandbox.dvdcli(&["list", "--volumedriver=raw"]).await, &["VolumeDriver.List: listing is broken"]);
    // Mount: Get fails with a plugin answer, so Create is tried, whose empty 500 is reported.
    let output = sandbox.dvdcli(&["mount", "--volumedriver=raw", "--volumename=v"]).await;
    assert_fails(&output, &["VolumeDriver.Create: HTTP status 500"]);
}
