//! The DVDI launcher (`tessera run`) against the real plugin server on real Unix sockets, with
//! real child commands (`sh -c ...`), real signals and, as root, a real private mount
//! namespace with real bind mounts. The volume service behind the plugin is an in-memory fake
//! (`FakeApi`) whose mount paths are real directories: the service is not under test here;
//! the launcher, the protocol and the processes are.
//!
//! Tests that send signals run the launcher in a process of its own: this test binary run
//! again with only `launcher_process` selected, which calls `launcher::run` the way the
//! `tessera` binary does (environment from the process, plugins found through
//! `TESSERA_PLUGIN_SOCKET_DIRS`) and exits with its code.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TempDir;
use tessera_volumes::api::{ApiError, Opts, VolumeApi, VolumeInfo};
use tessera_volumes::dvdcli::{Config, Discovery, DvdcliError, SOCKET_DIRS_ENV, SPEC_DIRS_ENV};
use tessera_volumes::http::Limits;
use tessera_volumes::launcher::{
    self, caller_id, launch, parse_env, LaunchError, TaskEnd, VolumeRequest, CALLER_ID_PREFIX, PROHIBITED_CHARS,
};
use tessera_volumes::plugin;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// The fake volume service

struct FakeApi {
    state: Mutex<FakeState>,
    /// Volumes "mount" at `<mount_root>/<name>`, a real directory created on first mount.
    mount_root: PathBuf,
    /// Mounts of a volume named here wait for a permit (to catch the launcher mid-mount).
    gate: Option<(String, Arc<Semaphore>)>,
}

#[derive(Default)]
struct FakeState {
    /// Volume name → creation options.
    volumes: BTreeMap<String, Opts>,
    /// (volume, caller id) → mount count.
    refs: BTreeMap<(String, String), u32>,
    calls: Vec<String>,
    caller_ids: BTreeSet<String>,
    fail_mount: BTreeSet<String>,
    fail_unmount: BTreeSet<String>,
    /// Mount paths of these volumes are returned without being created.
    no_dir: BTreeSet<String>,
}

impl FakeApi {
    fn new(mount_root: PathBuf, volumes: &[&str]) -> FakeApi {
        let mut state = FakeState::default();
        for name in volumes {
            state.volumes.insert(name.to_string(), Opts::new());
        }
        FakeApi { state: Mutex::new(state), mount_root, gate: None }
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    fn caller_ids(&self) -> BTreeSet<String> {
        self.state.lock().unwrap().caller_ids.clone()
    }

    /// References still held, by anyone.
    fn held(&self) -> u32 {
        self.state.lock().unwrap().refs.values().sum()
    }

    fn opts(&self, name: &str) -> Option<Opts> {
        self.state.lock().unwrap().volumes.get(name).cloned()
    }

    fn mount_dir(&self, name: &str) -> PathBuf {
        self.mount_root.join(name)
    }

    fn configure(&self, change: impl FnOnce(&mut FakeState)) {
        change(&mut self.state.lock().unwrap());
    }
}

impl VolumeApi for FakeApi {
    async fn create(&self, name: &str, opts: &Opts) -> Result<(), ApiError> {
        let mut state = self.state.lock().unwrap();
        let text: Vec<String> = opts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        state.calls.push(format!("create {name} {}", text.join(",")));
        state.volumes.entry(name.to_string()).or_insert_with(|| opts.clone());
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), ApiError> {
        Err(ApiError::Failed(format!("the launcher never removes ({name})")))
    }

    async fn mount(&self, name: &str, caller_id: &str) -> Result<String, ApiError> {
        self.state.lock().unwrap().calls.push(format!("mount {name}"));
        if let Some((gated, permits)) = &self.gate {
            if gated == name {
                permits.acquire().await.unwrap().forget();
            }
        }
        let mut state = self.state.lock().unwrap();
        state.caller_ids.insert(caller_id.to_string());
        if !state.volumes.contains_key(name) {
            return Err(ApiError::NotFound(name.to_string()));
        }
        if state.fail_mount.contains(name) {
            return Err(ApiError::Failed(format!("injected mount failure of {name}")));
        }
        let dir = self.mount_dir(name);
        if !state.no_dir.contains(name) {
            std::fs::create_dir_all(&dir).map_err(|e| ApiError::Failed(e.to_string()))?;
        }
        *state.refs.entry((name.to_string(), caller_id.to_string())).or_default() += 1;
        Ok(dir.to_str().unwrap().to_string())
    }

    async fn unmount(&self, name: &str, caller_id: &str) -> Result<(), ApiError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(format!("unmount {name}"));
        if state.fail_unmount.contains(name) {
            return Err(ApiError::Failed(format!("injected unmount failure of {name}")));
        }
        let key = (name.to_string(), caller_id.to_string());
        match state.refs.get_mut(&key) {
            Some(count) if *count > 0 => {
                *count -= 1;
                Ok(())
            }
            _ => Err(ApiError::Invalid(format!("{name:?} is not mounted for {caller_id:?}"))),
        }
    }

    async fn path(&self, name: &str) -> Result<Option<String>, ApiError> {
        Err(ApiError::Failed(format!("the launcher never asks Path ({name})")))
    }

    async fn get(&self, name: &str) -> Result<VolumeInfo, ApiError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(format!("get {name}"));
        if !state.volumes.contains_key(name) {
            return Err(ApiError::NotFound(name.to_string()));
        }
        Ok(VolumeInfo { name: name.to_string(), mountpoint: None, status: BTreeMap::new() })
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, ApiError> {
        Err(ApiError::Failed("the launcher never lists".to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

/// A directory for plugin sockets (`run/`) and mount paths (`mnt/<driver>/`), with a plugin
/// per driver.
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
        let dir = TempDir::new("launcher");
        let config = Config {
            discovery: Discovery { socket_dirs: vec![dir.0.join("run")], spec_dirs: vec![dir.0.join("specs")] },
            retry_for: Duration::from_secs(2),
            first_backoff: Duration::from_millis(50),
            long_call_timeout: Duration::from_secs(20),
            short_call_timeout: Duration::from_secs(20),
        };
        Sandbox { dir, config, tasks: Vec::new() }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.0.join(relative)
    }

    /// Serves `driver`'s plugin at `run/<driver>.sock`, with `volumes` existing.
    fn plugin(&mut self, driver: &str, volumes: &[&str]) -> Arc<FakeApi> {
        self.plugin_with(FakeApi::new(self.path(&format!("mnt/{driver}")), volumes), driver)
    }

    fn plugin_with(&mut self, api: FakeApi, driver: &str) -> Arc<FakeApi> {
        let api = Arc::new(api);
        let listener = plugin::bind(&self.path(&format!("run/{driver}.sock"))).unwrap();
        self.tasks.push(tokio::spawn(plugin::serve_listener(listener, api.clone(), Limits::default())));
        api
    }

    /// Waits (up to 20 s) for `relative` to exist.
    async fn wait_for(&self, relative: &str) {
        let path = self.path(relative);
        let started = Instant::now();
        while !path.exists() {
            assert!(started.elapsed() < Duration::from_secs(20), "{} never appeared", path.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `pairs` as an environment, with this process's `PATH` so `sh` is found.
fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    env.push(("PATH".to_string(), std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".to_string())));
    env
}

/// `{UNTIL_BOUNDED} CONDITION; do sleep 0.02; done` waits for CONDITION, but at most about
/// 30 s, so a command is never left behind when a test fails while it waits.
const UNTIL_BOUNDED: &str = "n=0; until [ $((n += 1)) -gt 1500 ] ||";

fn sh(script: &str) -> Vec<String> {
    vec!["sh".to_string(), "-c".to_string(), script.to_string()]
}

fn opts(pairs: &[(&str, &str)]) -> Opts {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn parse_err(pairs: &[(&str, &str)]) -> (String, String) {
    match parse_env(&env(pairs)) {
        Err(LaunchError::BadEnv { var, reason }) => (var, reason),
        other => panic!("{pairs:?}: expected a BadEnv error, got {other:?}"),
    }
}

/// Mount points in this process's mount namespace (field 5 of `/proc/self/mountinfo`).
fn mount_points() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().filter_map(|line| line.split(' ').nth(4)).map(str::to_string).collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------------------
// The environment

fn request(slots: &[u8], driver: &str, name: &str) -> VolumeRequest {
    VolumeRequest {
        slots: slots.to_vec(),
        driver: driver.to_string(),
        name: name.to_string(),
        opts: Opts::new(),
        container_path: None,
        explicit_create: false,
    }
}

#[test]
fn parse_reads_every_slot_and_defaults_the_driver_to_tessera() {
    let parsed = parse_env(&env(&[
        ("HOME", "/root"),
        ("DVDI_VOLUME_NAME", "first"),
        ("DVDI_VOLUME_NAME3", "third"),
        ("DVDI_VOLUME_DRIVER3", "rexray"),
        ("DVDI_VOLUME_OPTS3", "size=8,newfstype=xfs,mountopts=a=b"),
        ("DVDI_VOLUME_EXPLICITCREATE3", "TRUE"),
        ("DVDI_VOLUME_CONTAINERPATH3", "/tmp//data dir/./x/"),
        ("DVDI_VOLUME_NAME9", "ninth"),
        ("DVDI_VOLUME_EXPLICITCREATE9", "False"),
        // Empty is unset; the module's dvdcli path and this launcher's output are ignored.
        ("DVDI_VOLUME_OPTS", ""),
        ("DVDI_VOLUME_DVDCLI", "/usr/bin/dvdcli"),
        ("DVDI_VOLUME_PATH", "/stale"),
        ("DVDI_VOLUME_PATH4", "/stale"),
    ]))
    .unwrap();
    let mut third = request(&[3], "rexray", "third");
    third.opts = opts(&[("size", "8"), ("newfstype", "xfs"), ("mountopts", "a=b")]);
    third.explicit_create = true;
    third.container_path = Some(PathBuf::from("/tmp/data dir/x"));
    assert_eq!(parsed, [request(&[0], "tessera", "first"), third, request(&[9], "tessera", "ninth")]);
    assert_eq!(parse_env(&env(&[])).unwrap(), []);
}

#[test]
fn parse_refuses_prohibited_characters_naming_the_variable() {
    assert_eq!(PROHIBITED_CHARS.len(), 26);
    for c in PROHIBITED_CHARS.iter().chain(&['\u{1}', '\u{7f}']) {
        for (var, value) in [
            ("DVDI_VOLUME_NAME2", format!("a{c}b")),
            ("DVDI_VOLUME_DRIVER2", format!("{c}x")),
            ("DVDI_VOLUME_OPTS2", format!("k=v{c}")),
            ("DVDI_VOLUME_EXPLICITCREATE2", format!("true{c}")),
        ] {
            let name = if var == "DVDI_VOLUME_NAME2" { ("HOME", "/root") } else { ("DVDI_VOLUME_NAME2", "v") };
            let (bad_var, reason) = parse_err(&[name, (var, &value)]);
            assert_eq!(bad_var, var, "{c:?}");
            assert!(reason.contains("prohibited character"), "{c:?}: {reason}");
        }
    }
    // A container path may hold '/', spaces and the like: it never reaches a shell.
    let parsed = parse_env(&env(&[("DVDI_VOLUME_NAME", "v"), ("DVDI_VOLUME_CONTAINERPATH", "/srv/a b:c$d")])).unwrap();
    assert_eq!(parsed[0].container_path.as_deref(), Some(Path::new("/srv/a b:c$d")));
    let (var, reason) = parse_err(&[("DVDI_VOLUME_NAME", "v"), ("DVDI_VOLUME_CONTAINERPATH", "/srv/a\nb")]);
    assert_eq!((var.as_str(), reason.contains("control character")), ("DVDI_VOLUME_CONTAINERPATH", true));
}

#[test]
fn parse_refuses_name0_as_ambiguous() {
    let (var, reason) = parse_err(&[("DVDI_VOLUME_NAME", "a"), ("DVDI_VOLUME_NAME0", "b")]);
    assert_eq!(var, "DVDI_VOLUME_NAME0");
    assert!(reason.contains("ambiguous") && reason.contains("DVDI_VOLUME_NAME without a digit"), "{reason}");
    assert_eq!(parse_err(&[("DVDI_VOLUME_NAME", "a"), ("DVDI_VOLUME_OPTS0", "size=1")]).0, "DVDI_VOLUME_OPTS0");
}

#[test]
fn parse_refuses_a_slot_without_a_name() {
    for var in ["DVDI_VOLUME_OPTS4", "DVDI_VOLUME_DRIVER4", "DVDI_VOLUME_CONTAINERPATH4", "DVDI_VOLUME_EXPLICITCREATE4"]
    {
        let value = if var.ends_with("PATH4") { "/tmp/x" } else { "size=1" };
        let (bad_var, reason) = parse_err(&[("DVDI_VOLUME_NAME", "a"), (var, value)]);
        assert_eq!(bad_var, var);
        assert!(reason.contains("DVDI_VOLUME_NAME4 is not"), "{reason}");
    }
    // An empty name is no name.
    assert_eq!(parse_err(&[("DVDI_VOLUME_NAME", ""), ("DVDI_VOLUME_OPTS", "a=1")]).0, "DVDI_VOLUME_OPTS");
}

#[test]
fn parse_refuses_bad_container_paths() {
    for (path, needle) in [
        ("data", "not an absolute path"),
        ("./data", "not an absolute path"),
        ("/tmp/../etc", "'..'"),
        ("/", "over /"),
        ("//.", "over /"),
    ] {
        let (var, reason) = parse_err(&[("DVDI_VOLUME_NAME1", "v"), ("DVDI_VOLUME_CONTAINERPATH1", path)]);
        assert_eq!(var, "DVDI_VOLUME_CONTAINERPATH1");
        assert!(reason.contains(needle), "{path:?}: {reason}");
    }
    let (var, reason) = parse_err(&[
        ("DVDI_VOLUME_NAME1", "a"),
        ("DVDI_VOLUME_CONTAINERPATH1", "/srv/data"),
        ("DVDI_VOLUME_NAME2", "b"),
        ("DVDI_VOLUME_CONTAINERPATH2", "/srv/data/"),
    ]);
    assert_eq!(var, "DVDI_VOLUME_CONTAINERPATH2");
    assert!(reason.contains("same container path as DVDI_VOLUME_CONTAINERPATH1"), "{reason}");
}

#[test]
fn parse_mounts_a_repeated_volume_once_unless_it_has_a_container_path() {
    let parsed = parse_env(&env(&[
        ("DVDI_VOLUME_NAME", "data"),
        ("DVDI_VOLUME_NAME2", "data"),
        ("DVDI_VOLUME_DRIVER2", "tessera"),
        ("DVDI_VOLUME_NAME5", "Data"), // names are case-sensitive: another volume
        ("DVDI_VOLUME_NAME6", "data"),
        ("DVDI_VOLUME_DRIVER6", "other"), // another driver: another volume
    ]))
    .unwrap();
    assert_eq!(
        parsed,
        [request(&[0, 2], "tessera", "data"), request(&[5], "tessera", "Data"), request(&[6], "other", "data")]
    );

    for repeat in ["DVDI_VOLUME_CONTAINERPATH", "DVDI_VOLUME_CONTAINERPATH1"] {
        let (var, reason) =
            parse_err(&[("DVDI_VOLUME_NAME", "data"), ("DVDI_VOLUME_NAME1", "data"), (repeat, "/tmp/d")]);
        assert_eq!(var, "DVDI_VOLUME_NAME1");
        assert!(reason.contains("same volume as DVDI_VOLUME_NAME") && reason.contains("container path"), "{reason}");
    }
    let (var, reason) =
        parse_err(&[("DVDI_VOLUME_NAME1", "data"), ("DVDI_VOLUME_NAME2", "data"), ("DVDI_VOLUME_OPTS2", "size=9")]);
    assert_eq!(var, "DVDI_VOLUME_NAME2");
    assert!(reason.contains("other options"), "{reason}");
}

#[test]
fn parse_refuses_unknown_variables_and_bad_values() {
    for (var, value, needle) in [
        ("DVDI_VOLUME_CONTAINER_PATH", "/tmp/x", "unknown variable"),
        ("DVDI_VOLUME_SIZE", "8", "unknown variable"),
        ("DVDI_VOLUME_NAME10", "v", "one digit 1-9"),
        ("DVDI_VOLUME_NAMEx", "v", "one digit 1-9"),
        ("DVDI_VOLUME_EXPLICITCREATE", "yes", "neither true nor false"),
        ("DVDI_VOLUME_OPTS", "size", "not KEY=VALUE"),
        ("DVDI_VOLUME_OPTS", "a=1,", "\"\" is not KEY=VALUE"),
        ("DVDI_VOLUME_OPTS", "=1", "empty key"),
        ("DVDI_VOLUME_OPTS", "a=1,a=2", "given twice"),
    ] {
        let (bad_var, reason) = parse_err(&[("DVDI_VOLUME_NAME", "v"), (var, value)]);
        assert_eq!(bad_var, var);
        assert!(reason.contains(needle), "{var}={value}: {reason}");
    }
    let (var, reason) = parse_err(&[("DVDI_VOLUME_NAME", "v"), ("DVDI_VOLUME_NAME", "w")]);
    assert_eq!((var.as_str(), reason.as_str()), ("DVDI_VOLUME_NAME", "set more than once"));
}

// ---------------------------------------------------------------------------------------------
// Mounting, running, unmounting

#[tokio::test]
async fn launcher_third_volume_failing_unmounts_the_first_two_and_never_runs_the_command() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["a", "b", "c"]);
    api.configure(|s| {
        s.fail_mount.insert("c".to_string());
    });
    let env = env(&[("DVDI_VOLUME_NAME", "a"), ("DVDI_VOLUME_NAME1", "b"), ("DVDI_VOLUME_NAME2", "c")]);
    let marker = sandbox.path("ran");
    let command = sh(&format!("touch {}", marker.display()));
    let error = launcher::run(&env, &command, &sandbox.config).await.unwrap_err();
    assert!(error.to_string().contains("injected mount failure of c"), "{error}");
    assert_eq!(error.exit_code(), 125);
    assert!(!marker.exists(), "the command ran");
    // Both earlier volumes are released, last first — not only one, as the module did.
    assert_eq!(api.calls(), ["get a", "mount a", "get b", "mount b", "get c", "mount c", "unmount b", "unmount a"]);
    assert_eq!(api.held(), 0);
}

#[tokio::test]
async fn launcher_runs_the_command_with_mount_paths_and_propagates_its_exit_code() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["seeded"]);
    let other = sandbox.plugin("other", &[]);
    std::fs::create_dir_all(api.mount_dir("seeded")).unwrap();
    std::fs::write(api.mount_dir("seeded").join("seed"), "from before").unwrap();
    let env = env(&[
        ("DVDI_VOLUME_NAME", "seeded"),
        ("DVDI_VOLUME_NAME1", "fresh"),
        ("DVDI_VOLUME_DRIVER1", "other"),
        ("DVDI_VOLUME_OPTS1", "size=8,label=a=b"),
        ("DVDI_VOLUME_PATH7", "/stale/from/the/parent"),
    ]);
    let script = r#"
        [ "$(cat "$DVDI_VOLUME_PATH/seed")" = "from before" ] || exit 90
        [ -z "$DVDI_VOLUME_PATH7" ] || exit 91
        env | grep '^DVDI_VOLUME_PATH' | sort > "$DVDI_VOLUME_PATH1/env"
        exit 7
    "#;
    assert_eq!(launcher::run(&env, &sh(script), &sandbox.config).await.unwrap(), 7);
    let seen = std::fs::read_to_string(other.mount_dir("fresh").join("env")).unwrap();
    let expected = format!(
        "DVDI_VOLUME_PATH1={}\nDVDI_VOLUME_PATH={}\n",
        other.mount_dir("fresh").display(),
        api.mount_dir("seeded").display()
    );
    assert_eq!(seen, expected);
    // The missing volume was created with its options, through its own driver.
    assert_eq!(api.calls(), ["get seeded", "mount seeded", "unmount seeded"]);
    assert_eq!(other.calls(), ["get fresh", "create fresh label=a=b,size=8", "mount fresh", "unmount fresh"]);
    assert_eq!(other.opts("fresh").unwrap(), opts(&[("size", "8"), ("label", "a=b")]));
    assert_eq!(api.held() + other.held(), 0);
    // One caller id per launch, the same at both plugins.
    let ids = api.caller_ids();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids, other.caller_ids());
    let prefix = format!("{CALLER_ID_PREFIX}{}-", std::process::id());
    assert!(ids.iter().all(|id| id.starts_with(&prefix)), "{ids:?}");
}

#[tokio::test]
async fn launcher_mounts_a_repeated_volume_once_and_gives_each_launch_its_own_reference() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["shared"]);
    let env = env(&[("DVDI_VOLUME_NAME", "shared"), ("DVDI_VOLUME_NAME3", "shared")]);
    let volumes = parse_env(&env).unwrap();
    // A first task holds the volume until told to stop...
    let release = sandbox.path("release");
    let hold = sh(&format!("{UNTIL_BOUNDED} [ -e {} ]; do sleep 0.02; done", release.display()));
    let first = tokio::spawn({
        let (config, volumes, env) = (sandbox.config.clone(), volumes.clone(), env.clone());
        async move { launch(&volumes, &hold, &env, &config, &caller_id()).await.exit_code() }
    });
    while api.held() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...while a second one, seeing the volume in both its slots, runs and ends.
    let script = r#"[ -n "$DVDI_VOLUME_PATH" ] && [ "$DVDI_VOLUME_PATH" = "$DVDI_VOLUME_PATH3" ]"#;
    let second = launch(&volumes, &sh(script), &env, &sandbox.config, "second-task").await;
    assert_eq!(second.exit_code(), 0, "{second:?}");
    assert_eq!(api.held(), 1, "the second task's unmount released the first task's reference");
    std::fs::write(&release, "").unwrap();
    assert_eq!(first.await.unwrap(), 0);
    assert_eq!(api.held(), 0);
    assert_eq!(api.calls().iter().filter(|c| *c == "mount shared").count(), 2, "{:?}", api.calls());
    assert_eq!(api.caller_ids().len(), 2, "{:?}", api.caller_ids());
}

#[tokio::test]
async fn launcher_explicit_create_refuses_a_missing_volume() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["there"]);
    let env = env(&[
        ("DVDI_VOLUME_NAME", "there"),
        ("DVDI_VOLUME_NAME1", "missing"),
        ("DVDI_VOLUME_EXPLICITCREATE1", "true"),
    ]);
    let marker = sandbox.path("ran");
    let error = launcher::run(&env, &sh(&format!("touch {}", marker.display())), &sandbox.config).await.unwrap_err();
    assert!(
        matches!(&error, LaunchError::Plugin { volume, source: DvdcliError::NotCreated { .. }, .. } if volume == "missing"),
        "{error:?}"
    );
    assert!(!marker.exists());
    assert_eq!(api.calls(), ["get there", "mount there", "get missing", "unmount there"]);
    assert_eq!(api.held(), 0);
}

#[tokio::test]
async fn launcher_unmounts_after_the_command_is_killed_by_a_signal() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["v"]);
    let env = env(&[("DVDI_VOLUME_NAME", "v")]);
    assert_eq!(launcher::run(&env, &sh("kill -KILL $$"), &sandbox.config).await.unwrap(), 128 + libc::SIGKILL);
    assert_eq!(api.calls(), ["get v", "mount v", "unmount v"]);
    assert_eq!(api.held(), 0);
}

#[tokio::test]
async fn launcher_unmount_failure_fails_a_successful_command_only() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["a", "b"]);
    api.configure(|s| {
        s.fail_unmount.insert("b".to_string());
    });
    let env = env(&[("DVDI_VOLUME_NAME", "a"), ("DVDI_VOLUME_NAME1", "b")]);
    let volumes = parse_env(&env).unwrap();
    let outcome = launch(&volumes, &sh("exit 0"), &env, &sandbox.config, &caller_id()).await;
    assert!(matches!(outcome.task, TaskEnd::Exited(0)), "{outcome:?}");
    assert_eq!(outcome.unmount_failures.len(), 1);
    assert_eq!(outcome.unmount_failures[0].volume, "b");
    assert!(outcome.unmount_failures[0].to_string().contains("injected unmount failure of b"));
    assert_eq!(outcome.exit_code(), launcher::LAUNCHER_FAILED_EXIT_CODE);
    // `a` was still unmounted after `b` failed.
    assert_eq!(api.calls()[4..], ["unmount b", "unmount a"]);
    // A failing command keeps its own code.
    assert_eq!(launcher::run(&env, &sh("exit 3"), &sandbox.config).await.unwrap(), 3);
}

#[tokio::test]
async fn launcher_command_not_found_is_127_and_unmounts() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["v"]);
    let env = env(&[("DVDI_VOLUME_NAME", "v")]);
    let command = vec!["/nonexistent/tessera-test-command".to_string()];
    let error = launcher::run(&env, &command, &sandbox.config).await.unwrap_err();
    assert!(matches!(error, LaunchError::Spawn { .. }), "{error:?}");
    assert_eq!(error.exit_code(), 127);
    assert_eq!(api.calls(), ["get v", "mount v", "unmount v"]);
    let error = launcher::run(&env, &[], &sandbox.config).await.unwrap_err();
    assert!(matches!(error, LaunchError::NoCommand), "{error:?}");
    assert_eq!(api.held(), 0);
}

#[tokio::test]
async fn launcher_without_a_plugin_fails_without_running_the_command() {
    let sandbox = Sandbox::new();
    let env = env(&[("DVDI_VOLUME_NAME", "v"), ("DVDI_VOLUME_DRIVER", "absent")]);
    let marker = sandbox.path("ran");
    let error = launcher::run(&env, &sh(&format!("touch {}", marker.display())), &sandbox.config).await.unwrap_err();
    assert!(error.to_string().contains("volume driver plugin \"absent\" not found"), "{error}");
    assert!(!marker.exists());
}

// ---------------------------------------------------------------------------------------------
// Container paths

#[tokio::test]
async fn launcher_binds_container_paths_in_a_private_mount_namespace() {
    // A missing prerequisite fails the test, never skips it.
    assert!(is_root(), "bind mounts in a new mount namespace need root: run the tests as root");
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["logs", "data", "plain"]);
    std::fs::create_dir_all(api.mount_dir("data")).unwrap();
    std::fs::write(api.mount_dir("data").join("seed"), "seed").unwrap();
    // One container path under /tmp, created by the launcher; one elsewhere, existing.
    let created = sandbox.path("container/logs");
    let existing = TempDir::under(Path::new(env!("CARGO_TARGET_TMPDIR")), "ctr");
    std::fs::write(existing.0.join("hidden"), "the image's file").unwrap();
    let existing_str = existing.0.to_str().unwrap().to_string();
    let env = env(&[
        ("DVDI_VOLUME_NAME", "logs"),
        ("DVDI_VOLUME_CONTAINERPATH", created.to_str().unwrap()),
        ("DVDI_VOLUME_NAME1", "data"),
        ("DVDI_VOLUME_CONTAINERPATH1", &existing_str),
        ("DVDI_VOLUME_NAME2", "plain"),
    ]);
    let (ready, go) = (sandbox.path("ready"), sandbox.path("go"));
    let script = format!(
        r#"set -e
        echo written-inside > {created}/from-child
        [ "$(cat {existing}/seed)" = seed ]
        [ ! -e {existing}/hidden ]
        grep -q " {created} " /proc/self/mountinfo
        [ -d "$DVDI_VOLUME_PATH2" ]
        touch {ready}
        {UNTIL_BOUNDED} [ -e {go} ]; do sleep 0.02; done"#,
        created = created.display(),
        existing = existing_str,
        ready = ready.display(),
        go = go.display(),
    );
    let config = sandbox.config.clone();
    let task = tokio::spawn(async move { launcher::run(&env, &sh(&script), &config).await.unwrap() });
    sandbox.wait_for("ready").await;
    // While the command runs, its binds are not in the launcher's namespace.
    let host = mount_points();
    for path in [created.to_str().unwrap(), existing_str.as_str()] {
        assert!(!host.iter().any(|m| m == path), "{path} is mounted on the host: {host:?}");
    }
    std::fs::write(&go, "").unwrap();
    assert_eq!(task.await.unwrap(), 0);
    // What the command wrote through the container path is in the volume.
    assert_eq!(std::fs::read_to_string(api.mount_dir("logs").join("from-child")).unwrap(), "written-inside\n");
    assert!(!created.join("from-child").exists(), "written to the directory under the bind");
    assert!(existing.0.join("hidden").exists());
    let host = mount_points();
    assert!(!host.iter().any(|m| m.starts_with(sandbox.dir.0.to_str().unwrap())), "{host:?}");
    assert_eq!(api.held(), 0);
}

#[tokio::test]
async fn launcher_refuses_a_missing_container_path_outside_tmp_before_mounting() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["v"]);
    // Outside /tmp whatever the target directory is (CI may build under /tmp).
    let missing = Path::new("/run").join(format!("tsl-missing-{}", std::process::id()));
    let env = env(&[("DVDI_VOLUME_NAME", "v"), ("DVDI_VOLUME_CONTAINERPATH", missing.to_str().unwrap())]);
    let error = launcher::run(&env, &sh("true"), &sandbox.config).await.unwrap_err();
    assert!(matches!(&error, LaunchError::ContainerPath { path, .. } if path == &missing), "{error:?}");
    assert!(error.to_string().contains("does not exist (only paths under /tmp are created)"), "{error}");
    assert!(!missing.exists());
    assert_eq!(api.calls(), Vec::<String>::new());
}

#[tokio::test]
async fn launcher_names_the_bind_mount_that_failed_and_unmounts() {
    // A missing prerequisite fails the test, never skips it.
    assert!(is_root(), "bind mounts in a new mount namespace need root: run the tests as root");
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["good", "ghost"]);
    api.configure(|s| {
        s.no_dir.insert("ghost".to_string());
    });
    let (good_target, ghost_target) = (sandbox.path("ctr/good"), sandbox.path("ctr/ghost"));
    let env = env(&[
        ("DVDI_VOLUME_NAME", "good"),
        ("DVDI_VOLUME_CONTAINERPATH", good_target.to_str().unwrap()),
        ("DVDI_VOLUME_NAME1", "ghost"),
        ("DVDI_VOLUME_CONTAINERPATH1", ghost_target.to_str().unwrap()),
    ]);
    let marker = sandbox.path("ran");
    let error = launcher::run(&env, &sh(&format!("touch {}", marker.display())), &sandbox.config).await.unwrap_err();
    let expected_step = format!("bind-mounting {} onto {}", api.mount_dir("ghost").display(), ghost_target.display());
    match &error {
        LaunchError::Namespace { step, source } => {
            assert_eq!(step, &expected_step);
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected a namespace error, got {other:?}"),
    }
    assert!(!marker.exists());
    assert_eq!(api.calls()[4..], ["unmount ghost", "unmount good"]);
    assert_eq!(api.held(), 0);
    assert!(!mount_points().iter().any(|m| m.starts_with(sandbox.dir.0.to_str().unwrap())));
}

// ---------------------------------------------------------------------------------------------
// Signals, with the launcher in a process of its own

const LAUNCHER_COMMAND_ENV: &str = "TESSERA_LAUNCHER_TEST_COMMAND";

/// Not a test: the launcher process of the signal tests (does nothing unless
/// [`LAUNCHER_COMMAND_ENV`] is set). Its command is that variable, a JSON array.
#[test]
fn launcher_process() {
    let Ok(command) = std::env::var(LAUNCHER_COMMAND_ENV) else { return };
    let command: Vec<String> = serde_json::from_str(&command).unwrap();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let code = match runtime.block_on(launcher::run(&env, &command, &Config::from_env())) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tessera run: {error}");
            error.exit_code()
        }
    };
    std::process::exit(code);
}

/// Starts this test binary as a launcher of `command` with the `DVDI_VOLUME_*` `vars`.
fn spawn_launcher(sandbox: &Sandbox, vars: &[(&str, &str)], command: &[String]) -> tokio::process::Child {
    let mut launcher = tokio::process::Command::new(std::env::current_exe().unwrap());
    launcher
        .args(["launcher_process", "--exact", "--nocapture", "--test-threads=1"])
        .env_clear()
        .envs(env(vars))
        .env(SOCKET_DIRS_ENV, sandbox.path("run"))
        .env(SPEC_DIRS_ENV, sandbox.path("specs"))
        .env(LAUNCHER_COMMAND_ENV, serde_json::to_string(command).unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(sandbox.path("launcher.stderr")).unwrap())
        .kill_on_drop(true);
    launcher.spawn().unwrap()
}

async fn exit_code(sandbox: &Sandbox, launcher: &mut tokio::process::Child) -> i32 {
    let status = tokio::time::timeout(Duration::from_secs(30), launcher.wait()).await.unwrap().unwrap();
    let stderr = std::fs::read_to_string(sandbox.path("launcher.stderr")).unwrap_or_default();
    status.code().unwrap_or_else(|| panic!("the launcher died: {status}; stderr: {stderr}"))
}

fn send(process: &tokio::process::Child, signal: i32) {
    let pid = process.id().unwrap() as i32;
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

#[tokio::test]
async fn launcher_forwards_sigterm_to_the_command_then_unmounts() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["v"]);
    let script = format!(
        r#"trap 'echo TERM > "$DVDI_VOLUME_PATH/got"; exit 3' TERM
        touch {started}
        {UNTIL_BOUNDED} false; do sleep 0.02; done"#,
        started = sandbox.path("started").display(),
    );
    let mut launcher = spawn_launcher(&sandbox, &[("DVDI_VOLUME_NAME", "v")], &sh(&script));
    sandbox.wait_for("started").await;
    send(&launcher, libc::SIGTERM);
    // The command caught the forwarded signal and chose its exit code.
    assert_eq!(exit_code(&sandbox, &mut launcher).await, 3);
    assert_eq!(std::fs::read_to_string(api.mount_dir("v").join("got")).unwrap(), "TERM\n");
    assert_eq!(api.calls(), ["get v", "mount v", "unmount v"]);
    assert_eq!(api.held(), 0);
}

#[tokio::test]
async fn launcher_exits_128_plus_the_signal_that_killed_the_command() {
    let mut sandbox = Sandbox::new();
    let api = sandbox.plugin("tessera", &["a", "b"]);
    let script = format!("touch {}; exec sleep 60", sandbox.path("started").display());
    let mut launcher = spawn_launcher(&sandbox, &[("DVDI_VOLUME_NAME", "a"), ("DVDI_VOLUME_NAME1", "b")], &sh(&script));
    sandbox.wait_for("started").await;
    send(&launcher, libc::SIGHUP);
    assert_eq!(exit_code(&sandbox, &mut launcher).await, 128 + libc::SIGHUP);
    assert_eq!(api.calls()[4..], ["unmount b", "unmount a"]);
    assert_eq!(api.held(), 0);
}

#[tokio::test]
async fn launcher_interrupted_while_mounting_unmounts_and_never_runs_the_command() {
    let mut sandbox = Sandbox::new();
    let permits = Arc::new(Semaphore::new(0));
    let mut api = FakeApi::new(sandbox.path("mnt/tessera"), &["a", "slow", "c"]);
    api.gate = Some(("slow".to_string(), permits.clone()));
    let api = sandbox.plugin_with(api, "tessera");
    let marker = sandbox.path("ran");
    let vars = [("DVDI_VOLUME_NAME", "a"), ("DVDI_VOLUME_NAME1", "slow"), ("DVDI_VOLUME_NAME2", "c")];
    let mut launcher = spawn_launcher(&sandbox, &vars, &sh(&format!("touch {}", marker.display())));
    let started = Instant::now();
    while !api.calls().contains(&"mount slow".to_string()) {
        assert!(started.elapsed() < Duration::from_secs(20), "{:?}", api.calls());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    send(&launcher, libc::SIGINT);
    // Give the signal time to arrive while the mount is still held up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    permits.add_permits(1);
    assert_eq!(exit_code(&sandbox, &mut launcher).await, 128 + libc::SIGINT);
    assert!(!marker.exists(), "the command ran");
    assert_eq!(api.calls(), ["get a", "mount a", "get slow", "mount slow", "unmount slow", "unmount a"]);
    assert_eq!(api.held(), 0);
    let stderr = std::fs::read_to_string(sandbox.path("launcher.stderr")).unwrap();
    assert!(stderr.contains("interrupted by signal 2 while mounting volumes"), "{stderr}");
}
