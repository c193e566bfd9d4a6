//! The DVDI launcher: `tessera run -- CMD ARGS...` mounts the volumes named by the
//! mesos-module-dvdi `DVDI_VOLUME_*` environment variables through their Docker volume
//! plugins, runs the command, and unmounts them when it ends. It replaces the isolator module
//! for any scheduler that can prefix a task's command.
//!
//! # The environment ([`parse_env`])
//!
//! Up to ten volumes, slot 0 with no suffix and slots 1–9 with a one-digit suffix:
//! `DVDI_VOLUME_NAME[n]` (required for the slot), `_DRIVER[n]`, `_OPTS[n]` (comma-separated
//! `key=value`, split at the first `=` so values may hold `=`), `_CONTAINERPATH[n]` and
//! `_EXPLICITCREATE[n]` (`true`/`false`, any case). An empty value is the same as unset.
//! Where this differs from the module, on purpose:
//! - the driver defaults to [`DEFAULT_DRIVER`] (`tessera`), not `rexray`: this launcher is the
//!   front of Tessera's own plugin; `DVDI_VOLUME_DRIVER=rexray` still reaches any other plugin;
//! - `NAME0` (and `OPTS0`, ...) is refused: the module put it in slot 0, where it silently
//!   collided with the unsuffixed variable;
//! - a slot with a driver, options, a container path or an explicit-create flag but no name is
//!   an error naming the variable, not a volume quietly left out;
//! - any other `DVDI_VOLUME_*` variable (a typo such as `DVDI_VOLUME_CONTAINER_PATH`, or a
//!   two-digit suffix) is refused rather than ignored, since ignoring it would expose the
//!   volume host-wide or drop it; `DVDI_VOLUME_DVDCLI[n]` is accepted and ignored (no dvdcli
//!   binary is run: the plugin is called directly) and `DVDI_VOLUME_PATH[n]` is this
//!   launcher's output;
//! - values of NAME, DRIVER, OPTS and EXPLICITCREATE are refused if they hold one of the
//!   module's 26 [`PROHIBITED_CHARS`] (shell metacharacters; nothing here goes through a
//!   shell, but task definitions stay portable both ways) or any other control character;
//! - EXPLICITCREATE must be `true` or `false` (the module read anything else as false); an
//!   option without `=`, with an empty key, an empty item (`a=1,`) or a repeated key is an
//!   error;
//! - CONTAINERPATH must be absolute, not `/`, without `..` (so `/tmp/../etc` cannot pass the
//!   `/tmp` rule below) and without control characters; two volumes may not share one;
//! - the same (driver, name) in two slots is mounted once, unless either has a container path
//!   (refused, as the module did) or their options or explicit-create flags differ (refused:
//!   one of them would be silently dropped). Names compare exactly: the module lowercased
//!   them, but Tessera's volume names are case-sensitive, so `Data` and `data` are two volumes.
//!
//! # Mounting ([`launch`])
//!
//! For each volume, in slot order, through its driver's plugin (found as Docker finds it,
//! [`crate::dvdcli::Discovery`]): `Get`; if the plugin answers with an error, `Create` with
//! the options, unless explicit-create is set (then the launch fails); then `Mount` with a
//! caller ID unique to this launch ([`caller_id`]), so the plugin counts this task's
//! reference separately from every other task's. Every plugin call has the timeouts of the
//! [`Config`]. All or nothing: when a volume fails, every volume already mounted is unmounted
//! again, in reverse order — all of them; the module's revert loop stopped after the first.
//! A `Mount` whose outcome is unknown (a timeout, a dropped connection, an unreadable reply)
//! is unmounted too, in case the plugin did mount it.
//!
//! # Running the command
//!
//! The command runs with the given environment (minus any inherited `DVDI_VOLUME_PATH*`)
//! plus `DVDI_VOLUME_PATH[n]` = the mount path of slot n's volume — an addition: the module
//! gave the task no way to learn the path of a volume without a container path.
//! Without container paths the command runs directly, and the mount paths are visible
//! host-wide. When any volume has a container path, the child, between fork and exec,
//! unshares its mount namespace, makes `/` a recursive slave (mounts made or removed on the
//! host still reach it, so it never pins another task's volume after the host unmounted it;
//! nothing it mounts reaches the host) and bind-mounts (`MS_BIND|MS_REC`) each mount path onto
//! its container path. A container path must be an existing directory, except that a path
//! under `/tmp` is created, as the module did. (The module also chmod/chowned the mount path
//! to match the container path; this launcher leaves the volume's ownership alone.)
//!
//! # Signals and the end
//!
//! SIGINT, SIGTERM, SIGHUP and SIGQUIT are caught from before the first plugin call. While
//! volumes are being mounted, one aborts the launch after the current call: what was mounted
//! is unmounted and the command never runs. While the command runs, they are forwarded to it
//! (it stays in the launcher's process group, so a terminal's ^C reaches it directly too; the
//! forwarded copy coalesces with it). While volumes are unmounted afterwards they are
//! swallowed, so a second ^C cannot leave volumes mounted; SIGKILL still works. When the
//! command ends — also when a signal killed it — every volume is unmounted, each attempted
//! even if another failed. The future must be driven to completion: dropping it leaves the
//! command running and the volumes mounted.
//!
//! Exit code ([`Outcome::exit_code`]): the command's, or 128 + the signal that killed it. An
//! unmount failure is reported on stderr ([`run`]) and turns a successful command's 0 into
//! [`LAUNCHER_FAILED_EXIT_CODE`] (the scheduler should learn that this node still holds the
//! volume); a failed command's code is kept, since it says more. A launch that never ran the
//! command exits with 125, 126 (command not executable) or 127 (command not found), as
//! `docker run` does, or 128 + the signal that interrupted the mounting.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, Waker};

use thiserror::Error;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::api::Opts;
use crate::dvdcli::{Config, DvdcliError, VolumeDriverClient};
use crate::http::HttpError;

/// Every variable this launcher reads starts with this.
pub const ENV_PREFIX: &str = "DVDI_VOLUME_";
/// The driver of a slot without `DVDI_VOLUME_DRIVER[n]` (mesos-module-dvdi's was `rexray`).
pub const DEFAULT_DRIVER: &str = "tessera";
/// Slots: the unsuffixed one and 1–9.
pub const MAX_VOLUMES: usize = 10;
/// Exported to the command: `DVDI_VOLUME_PATH[n]` is slot n's mount path.
pub const PATH_VAR: &str = "DVDI_VOLUME_PATH";
/// A missing container path under this directory is created; elsewhere it must exist.
pub const AUTO_CREATE_ROOT: &str = "/tmp";
/// mesos-module-dvdi's prohibited characters, in its order.
pub const PROHIBITED_CHARS: [char; 26] = [
    '%', '/', ':', ';', '\0', '<', '>', '|', '`', '$', '\'', '?', '^', '&', ' ', '{', '"', '}', '[', ']', '\n', '\t',
    '\u{b}', '\u{8}', '\r', '\\',
];
/// The signals forwarded to the command.
pub const FORWARDED_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
/// The launcher failed (bad environment, a volume that would not mount, an unmount failure
/// after a successful command), as `docker run`'s 125.
pub const LAUNCHER_FAILED_EXIT_CODE: i32 = 125;
/// The command exists but could not be executed.
pub const CANNOT_EXECUTE_EXIT_CODE: i32 = 126;
/// The command was not found.
pub const COMMAND_NOT_FOUND_EXIT_CODE: i32 = 127;
/// How a launch is named to the plugins: `tessera-run-<pid>-<start time>`.
pub const CALLER_ID_PREFIX: &str = "tessera-run-";

#[derive(Debug, Error)]
pub enum LaunchError {
    /// A `DVDI_VOLUME_*` variable is wrong; `var` names it.
    #[error("{var}: {reason}")]
    BadEnv { var: String, reason: String },
    #[error("no command to run")]
    NoCommand,
    #[error("container path {}: {reason}", path.display())]
    ContainerPath { path: PathBuf, reason: String },
    #[error("cannot catch signals: {0}")]
    Signals(#[source] io::Error),
    #[error("volume {volume:?} (driver {driver:?}): {source}")]
    Plugin {
        driver: String,
        volume: String,
        #[source]
        source: DvdcliError,
    },
    #[error("volume {volume:?} (driver {driver:?}): the plugin mounted it at {mountpoint:?}, not an absolute path")]
    BadMountpoint { driver: String, volume: String, mountpoint: String },
    #[error("interrupted by signal {signal} while mounting volumes; the command was not run")]
    Interrupted { signal: i32 },
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// Setting up the command's private mount namespace failed; `step` says which part.
    #[error("cannot set up the command's mount namespace: {step}: {source}")]
    Namespace {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for the command: {0}")]
    Wait(#[source] io::Error),
}

impl LaunchError {
    /// What the launcher should exit with when this kept the command from running.
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::Interrupted { signal } => 128 + signal,
            LaunchError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                COMMAND_NOT_FOUND_EXIT_CODE
            }
            LaunchError::Spawn { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                CANNOT_EXECUTE_EXIT_CODE
            }
            _ => LAUNCHER_FAILED_EXIT_CODE,
        }
    }
}

fn bad_env(var: &str, reason: impl Into<String>) -> LaunchError {
    LaunchError::BadEnv { var: var.to_string(), reason: reason.into() }
}

/// One volume to mount, from the slots that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    /// The slots (0–9) naming this volume, the first defining it; more than one only when a
    /// (driver, name) pair was repeated without a container path.
    pub slots: Vec<u8>,
    pub driver: String,
    pub name: String,
    /// Creation options, used only when the volume is created.
    pub opts: Opts,
    /// Where the command sees the volume, in its own mount namespace.
    pub container_path: Option<PathBuf>,
    /// Fail instead of creating a missing volume.
    pub explicit_create: bool,
}

// ---------------------------------------------------------------------------------------------
// The environment

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    Name,
    Driver,
    Opts,
    ContainerPath,
    ExplicitCreate,
    /// The module's path to dvdcli: accepted, ignored.
    Dvdcli,
    /// This launcher's output.
    Path,
}

/// No field's word is a prefix of another's, so the first match is the only one.
const FIELDS: [(&str, Field); 7] = [
    ("NAME", Field::Name),
    ("DRIVER", Field::Driver),
    ("OPTS", Field::Opts),
    ("CONTAINERPATH", Field::ContainerPath),
    ("EXPLICITCREATE", Field::ExplicitCreate),
    ("DVDCLI", Field::Dvdcli),
    ("PATH", Field::Path),
];

fn suffix(slot: u8) -> String {
    if slot == 0 {
        String::new()
    } else {
        slot.to_string()
    }
}

fn var_name(field_word: &str, slot: u8) -> String {
    format!("{ENV_PREFIX}{field_word}{}", suffix(slot))
}

/// The set variables of one slot: field → (variable, value).
type Slot<'a> = BTreeMap<Field, (&'a str, &'a str)>;

/// Reads the volumes to mount from `env` (the whole environment; other variables are
/// ignored). Pure: container paths are checked for shape here and on disk by [`launch`].
pub fn parse_env(env: &[(String, String)]) -> Result<Vec<VolumeRequest>, LaunchError> {
    let mut slots: Vec<Slot> = vec![Slot::new(); MAX_VOLUMES];
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
        let Some((field, digits)) =
            FIELDS.iter().find_map(|(word, field)| rest.strip_prefix(word).map(|d| (*field, d)))
        else {
            return Err(bad_env(
                var,
                "unknown variable (expected DVDI_VOLUME_NAME, _DRIVER, _OPTS, _CONTAINERPATH or _EXPLICITCREATE, \
                 each optionally followed by one digit 1-9)",
            ));
        };
        if field == Field::Path {
            continue;
        }
        let slot = match digits.as_bytes() {
            [] => 0,
            [b'0'] => {
                let unsuffixed = &var[..var.len() - 1];
                let reason = format!("ambiguous: slot 0 is {unsuffixed} without a digit; use it, or a suffix 1-9");
                return Err(bad_env(var, reason));
            }
            [digit @ b'1'..=b'9'] => digit - b'0',
            _ => return Err(bad_env(var, "the suffix must be one digit 1-9")),
        };
        if field == Field::Dvdcli || value.is_empty() {
            continue;
        }
        if slots[usize::from(slot)].insert(field, (var, value)).is_some() {
            return Err(bad_env(var, "set more than once"));
        }
    }
    let mut volumes: Vec<VolumeRequest> = Vec::new();
    for (slot, vars) in slots.iter().enumerate() {
        let slot = u8::try_from(slot).expect("MAX_VOLUMES fits in u8");
        let Some(request) = parse_slot(slot, vars)? else { continue };
        merge(&mut volumes, request, vars)?;
    }
    Ok(volumes)
}

/// One slot's volume, or `None` when the slot is empty.
fn parse_slot(slot: u8, vars: &Slot) -> Result<Option<VolumeRequest>, LaunchError> {
    let Some(&(_, name)) = vars.get(&Field::Name) else {
        return match vars.values().next() {
            None => Ok(None),
            Some((var, _)) => {
                Err(bad_env(var, format!("set, but {} is not: a volume needs a name", var_name("NAME", slot))))
            }
        };
    };
    for field in [Field::Name, Field::Driver, Field::Opts, Field::ExplicitCreate] {
        if let Some((var, value)) = vars.get(&field) {
            check_chars(var, value)?;
        }
    }
    let driver = vars.get(&Field::Driver).map_or(DEFAULT_DRIVER, |(_, driver)| driver);
    let opts = match vars.get(&Field::Opts) {
        Some((var, text)) => parse_opts(var, text)?,
        None => Opts::new(),
    };
    let explicit_create = match vars.get(&Field::ExplicitCreate) {
        Some((_, v)) if v.eq_ignore_ascii_case("true") => true,
        Some((_, v)) if v.eq_ignore_ascii_case("false") => false,
        Some((var, v)) => return Err(bad_env(var, format!("{v:?} is neither true nor false"))),
        None => false,
    };
    let container_path = match vars.get(&Field::ContainerPath) {
        Some((var, path)) => Some(parse_container_path(var, path)?),
        None => None,
    };
    Ok(Some(VolumeRequest {
        slots: vec![slot],
        driver: driver.to_string(),
        name: name.to_string(),
        opts,
        container_path,
        explicit_create,
    }))
}

fn check_chars(var: &str, value: &str) -> Result<(), LaunchError> {
    match value.chars().find(|c| PROHIBITED_CHARS.contains(c) || c.is_control()) {
        Some(c) => Err(bad_env(var, format!("prohibited character {c:?} in {value:?}"))),
        None => Ok(()),
    }
}

/// `k=v,k=v`, each split at its first `=`.
fn parse_opts(var: &str, text: &str) -> Result<Opts, LaunchError> {
    let mut opts = Opts::new();
    for item in text.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(bad_env(var, format!("option {item:?} is not KEY=VALUE")));
        };
        if key.is_empty() {
            return Err(bad_env(var, format!("option {item:?} has an empty key")));
        }
        if opts.insert(key.to_string(), value.to_string()).is_some() {
            return Err(bad_env(var, format!("option {key:?} is given twice")));
        }
    }
    Ok(opts)
}

fn parse_container_path(var: &str, text: &str) -> Result<PathBuf, LaunchError> {
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(bad_env(var, format!("control character {c:?} in {text:?}")));
    }
    let path = Path::new(text);
    if !path.is_absolute() {
        return Err(bad_env(var, format!("{text:?} is not an absolute path")));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(bad_env(var, format!("{text:?} holds '..'")));
    }
    // Drops `.` components and repeated or trailing slashes.
    let path: PathBuf = path.components().collect();
    if path == Path::new("/") {
        return Err(bad_env(var, "cannot bind a volume over /"));
    }
    Ok(path)
}

/// Adds `request` to `volumes`, folding a repeated (driver, name) into the first.
fn merge(volumes: &mut Vec<VolumeRequest>, request: VolumeRequest, vars: &Slot) -> Result<(), LaunchError> {
    let slot = request.slots[0];
    let name_var = var_name("NAME", slot);
    if let Some(path) = &request.container_path {
        if let Some(other) = volumes.iter().find(|v| v.container_path.as_ref() == Some(path)) {
            let var = vars.get(&Field::ContainerPath).map_or(String::new(), |(var, _)| var.to_string());
            let other_var = var_name("CONTAINERPATH", other.slots[0]);
            return Err(bad_env(&var, format!("the same container path as {other_var}")));
        }
    }
    let Some(first) = volumes.iter_mut().find(|v| v.driver == request.driver && v.name == request.name) else {
        volumes.push(request);
        return Ok(());
    };
    let first_var = var_name("NAME", first.slots[0]);
    let duplicate = format!("the same volume as {first_var} (driver {:?}, name {:?})", request.driver, request.name);
    if first.container_path.is_some() || request.container_path.is_some() {
        return Err(bad_env(&name_var, format!("{duplicate}, and a volume with a container path cannot be repeated")));
    }
    if first.opts != request.opts || first.explicit_create != request.explicit_create {
        return Err(bad_env(&name_var, format!("{duplicate}, with other options or explicit-create")));
    }
    first.slots.push(slot);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Launching

/// A name for this launch that no other task's mount shares: the plugin counts references by
/// it, so the task's unmount releases exactly its own reference. The start time keeps it
/// unique when the pid is reused.
pub fn caller_id() -> String {
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{CALLER_ID_PREFIX}{}-{}", std::process::id(), started.as_nanos())
}

/// A volume mounted (or possibly mounted) by this launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedVolume {
    pub driver: String,
    pub volume: String,
    /// `None` when the `Mount` call's outcome is unknown.
    pub mountpoint: Option<String>,
}

/// An unmount that failed; the volume may still be mounted for this launch.
#[derive(Debug, Error)]
#[error("cannot unmount volume {volume:?} (driver {driver:?}): {source}")]
pub struct UnmountFailure {
    pub driver: String,
    pub volume: String,
    #[source]
    pub source: DvdcliError,
}

/// How the command ended.
#[derive(Debug)]
pub enum TaskEnd {
    Exited(i32),
    /// Killed by this signal.
    Killed(i32),
    /// The command never ran.
    NotRun(LaunchError),
}

/// What a launch did.
#[derive(Debug)]
pub struct Outcome {
    pub task: TaskEnd,
    /// The volumes this launch mounted, in order, with their mount paths (all unmounted again
    /// unless listed in `unmount_failures`).
    pub mounted: Vec<MountedVolume>,
    pub unmount_failures: Vec<UnmountFailure>,
}

impl Outcome {
    /// The launcher's exit code (see the module documentation).
    pub fn exit_code(&self) -> i32 {
        let code = match &self.task {
            TaskEnd::Exited(code) => *code,
            TaskEnd::Killed(signal) => 128 + signal,
            TaskEnd::NotRun(error) => error.exit_code(),
        };
        if code == 0 && !self.unmount_failures.is_empty() {
            LAUNCHER_FAILED_EXIT_CODE
        } else {
            code
        }
    }
}

/// `tessera run`: reads the volumes from `env`, mounts them, runs `command` (program and
/// arguments) with `env` plus `DVDI_VOLUME_PATH[n]`, unmounts, and returns the exit code for
/// the launcher. Unmount failures are reported on stderr. `Err` means the command did not
/// run (its [`LaunchError::exit_code`] is what to exit with); every volume mounted before the
/// failure has been unmounted again. Needs a Tokio runtime with its I/O, time, signal and
/// process drivers (`enable_all`).
pub async fn run(env: &[(String, String)], command: &[String], config: &Config) -> Result<i32, LaunchError> {
    let volumes = parse_env(env)?;
    let outcome = launch(&volumes, command, env, config, &caller_id()).await;
    for failure in &outcome.unmount_failures {
        eprintln!("tessera run: {failure}; it may still be mounted on this node");
    }
    let exit_code = outcome.exit_code();
    match outcome.task {
        TaskEnd::NotRun(error) => Err(error),
        TaskEnd::Exited(0) if exit_code != 0 => {
            eprintln!("tessera run: the command succeeded, but exiting with {exit_code} as volumes were left mounted");
            Ok(exit_code)
        }
        _ => Ok(exit_code),
    }
}

/// Mounts `volumes` under `caller_id`, runs `command` with `env` (minus inherited
/// `DVDI_VOLUME_PATH*`, plus this launch's), waits for it while forwarding signals, and
/// unmounts. Never returns before every volume it mounted was unmounted (or failed to be).
pub async fn launch(
    volumes: &[VolumeRequest],
    command: &[String],
    env: &[(String, String)],
    config: &Config,
    caller_id: &str,
) -> Outcome {
    let mut mounts = Mounts { config, caller_id, clients: BTreeMap::new(), mounted: Vec::new() };
    let task = match run_task(volumes, command, env, &mut mounts).await {
        Ok(task) => task,
        Err(error) => TaskEnd::NotRun(error),
    };
    // The plugin may have restarted while the command ran: look it up afresh.
    mounts.clients.clear();
    let mounted = mounts.mounted.clone();
    let unmount_failures = mounts.unmount_all().await;
    Outcome { task, mounted, unmount_failures }
}

async fn run_task(
    volumes: &[VolumeRequest],
    command: &[String],
    env: &[(String, String)],
    mounts: &mut Mounts<'_>,
) -> Result<TaskEnd, LaunchError> {
    let program = command.first().ok_or(LaunchError::NoCommand)?;
    for path in volumes.iter().filter_map(|v| v.container_path.as_deref()) {
        prepare_container_path(path)?;
    }
    // Caught before the first plugin call: from here on a signal must not kill the launcher
    // with volumes mounted.
    let mut signals = Signals::install().map_err(LaunchError::Signals)?;
    let mut paths = Vec::with_capacity(volumes.len());
    for volume in volumes {
        paths.push(mounts.mount(volume).await?);
        if let Some(signal) = signals.pending() {
            return Err(LaunchError::Interrupted { signal });
        }
    }
    let child_env = child_env(env, volumes, &paths);
    let mut binds: Vec<(&str, &Path)> = volumes
        .iter()
        .zip(&paths)
        .filter_map(|(v, mountpoint)| v.container_path.as_deref().map(|path| (mountpoint.as_str(), path)))
        .collect();
    // A container path inside another is bound after it, so it lands inside the volume.
    binds.sort_by_key(|(_, path)| path.components().count());
    let mut child = spawn(program, &command[1..], &child_env, &binds)?;
    let pid = child.id().and_then(|pid| i32::try_from(pid).ok());
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(LaunchError::Wait)?,
            signal = signals.recv() => {
                if let Some(pid) = pid {
                    // SAFETY: kill has no memory-safety preconditions. The child is not yet
                    // reaped (only this loop reaps it), so the pid is still its own, at worst
                    // a zombie's, never another process's.
                    unsafe { libc::kill(pid, signal) };
                }
            }
        }
    };
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => TaskEnd::Exited(code),
        (None, Some(signal)) => TaskEnd::Killed(signal),
        (None, None) => unreachable!("a waited-for child either exited or was killed"),
    })
}

fn child_env(env: &[(String, String)], volumes: &[VolumeRequest], paths: &[String]) -> Vec<(String, String)> {
    let mut child_env: Vec<(String, String)> = env.iter().filter(|(k, _)| !k.starts_with(PATH_VAR)).cloned().collect();
    for (volume, path) in volumes.iter().zip(paths) {
        for &slot in &volume.slots {
            child_env.push((format!("{PATH_VAR}{}", suffix(slot)), path.clone()));
        }
    }
    child_env
}

/// A container path must be a directory to bind a volume onto; under `/tmp` it is created.
fn prepare_container_path(path: &Path) -> Result<(), LaunchError> {
    let fail = |reason: String| LaunchError::ContainerPath { path: path.to_path_buf(), reason };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(fail("not a directory".to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound && path.starts_with(AUTO_CREATE_ROOT) => {
            std::fs::create_dir_all(path).map_err(|e| fail(format!("cannot create it: {e}")))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(fail(format!("does not exist (only paths under {AUTO_CREATE_ROOT} are created)")))
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// The plugin clients and what this launch mounted.
struct Mounts<'a> {
    config: &'a Config,
    caller_id: &'a str,
    /// One client per driver.
    clients: BTreeMap<String, VolumeDriverClient>,
    mounted: Vec<MountedVolume>,
}

impl Mounts<'_> {
    async fn client<'c>(
        clients: &'c mut BTreeMap<String, VolumeDriverClient>,
        config: &Config,
        driver: &str,
    ) -> Result<&'c VolumeDriverClient, DvdcliError> {
        if !clients.contains_key(driver) {
            let client = VolumeDriverClient::connect(driver, config).await?;
            clients.insert(driver.to_string(), client);
        }
        Ok(&clients[driver])
    }

    /// dvdcli's mount sequence with this launch's caller ID; returns the mount path.
    async fn mount(&mut self, volume: &VolumeRequest) -> Result<String, LaunchError> {
        let plugin_error =
            |source| LaunchError::Plugin { driver: volume.driver.clone(), volume: volume.name.clone(), source };
        let client = Self::client(&mut self.clients, self.config, &volume.driver).await.map_err(plugin_error)?;
        match client.get(&volume.name).await {
            Ok(_) => {}
            Err(cause @ DvdcliError::Plugin { .. }) if volume.explicit_create => {
                let cause = Box::new(cause);
                return Err(plugin_error(DvdcliError::NotCreated { volume: volume.name.clone(), cause }));
            }
            Err(DvdcliError::Plugin { .. }) => client.create(&volume.name, &volume.opts).await.map_err(plugin_error)?,
            Err(other) => return Err(plugin_error(other)),
        }
        let mounted =
            |mountpoint| MountedVolume { driver: volume.driver.clone(), volume: volume.name.clone(), mountpoint };
        match client.mount(&volume.name, Some(self.caller_id)).await {
            Ok(mountpoint) => {
                self.mounted.push(mounted(Some(mountpoint.clone())));
                if !mountpoint.starts_with('/') {
                    return Err(LaunchError::BadMountpoint {
                        driver: volume.driver.clone(),
                        volume: volume.name.clone(),
                        mountpoint,
                    });
                }
                Ok(mountpoint)
            }
            // The plugin refused, or was never reached: nothing was mounted.
            Err(
                error @ (DvdcliError::Plugin { .. } | DvdcliError::Transport { source: HttpError::Connect { .. }, .. }),
            ) => Err(plugin_error(error)),
            // A timeout, a dropped connection, an unreadable reply: it may have been mounted.
            Err(error) => {
                self.mounted.push(mounted(None));
                Err(plugin_error(error))
            }
        }
    }

    /// Unmounts everything mounted, last first, trying each whatever happened to the others.
    async fn unmount_all(&mut self) -> Vec<UnmountFailure> {
        let mut failures = Vec::new();
        while let Some(mounted) = self.mounted.pop() {
            let result = match Self::client(&mut self.clients, self.config, &mounted.driver).await {
                Ok(client) => client.unmount(&mounted.volume, Some(self.caller_id)).await,
                Err(error) => Err(error),
            };
            if let Err(source) = result {
                failures.push(UnmountFailure { driver: mounted.driver, volume: mounted.volume, source });
            }
        }
        failures
    }
}

// ---------------------------------------------------------------------------------------------
// Signals

/// The forwarded signals, caught.
struct Signals(Vec<(i32, Signal)>);

impl Signals {
    fn install() -> io::Result<Signals> {
        let caught = FORWARDED_SIGNALS.iter().map(|&number| Ok((number, signal(SignalKind::from_raw(number))?)));
        caught.collect::<io::Result<_>>().map(Signals)
    }

    fn poll_any(&mut self, cx: &mut Context<'_>) -> Poll<i32> {
        for (number, signal) in &mut self.0 {
            if let Poll::Ready(Some(())) = signal.poll_recv(cx) {
                return Poll::Ready(*number);
            }
        }
        Poll::Pending
    }

    async fn recv(&mut self) -> i32 {
        std::future::poll_fn(|cx| self.poll_any(cx)).await
    }

    /// A signal received and not yet taken, if any.
    fn pending(&mut self) -> Option<i32> {
        match self.poll_any(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(number) => Some(number),
            Poll::Pending => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The child

/// Steps of the child's namespace setup, as recorded in [`SharedStep`].
const STEP_NONE: u32 = 0;
const STEP_UNSHARE: u32 = 1;
const STEP_RSLAVE: u32 = 2;
/// `STEP_FIRST_BIND + i` is the i-th bind mount.
const STEP_FIRST_BIND: u32 = 3;
const STEP_DONE: u32 = u32::MAX;

/// Spawns the command; with `binds` (mount path, container path), in a private mount
/// namespace where each mount path is bound onto its container path.
fn spawn(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    binds: &[(&str, &Path)],
) -> Result<tokio::process::Child, LaunchError> {
    let mut command = tokio::process::Command::new(program);
    command.args(args).env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    if binds.is_empty() {
        return command.spawn().map_err(|source| LaunchError::Spawn { program: program.to_string(), source });
    }
    let c_path = |path: &Path| CString::new(path.as_os_str().as_bytes());
    let c_binds = binds
        .iter()
        .map(|(source, target)| Ok((c_path(Path::new(source))?, c_path(target)?)))
        .collect::<Result<Vec<(CString, CString)>, std::ffi::NulError>>()
        .map_err(|e| LaunchError::Namespace { step: "a path holds NUL".to_string(), source: io::Error::other(e) })?;
    let step = SharedStep::new()
        .map_err(|source| LaunchError::Namespace { step: "cannot map shared memory".to_string(), source })?;
    let step_address = step.address();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: it makes system calls and atomic stores on memory mapped before the
    // fork, and allocates nothing (the C strings were built above, errors are raw errnos).
    unsafe {
        command.pre_exec(move || {
            let record = |value: u32| (*(step_address as *const AtomicU32)).store(value, Ordering::SeqCst);
            let check = |result: libc::c_int| if result == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
            record(STEP_UNSHARE);
            check(libc::unshare(libc::CLONE_NEWNS))?;
            record(STEP_RSLAVE);
            let flags = libc::MS_REC | libc::MS_SLAVE;
            check(libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), flags, std::ptr::null()))?;
            for (i, (source, target)) in c_binds.iter().enumerate() {
                record(STEP_FIRST_BIND + i as u32);
                let flags = libc::MS_BIND | libc::MS_REC;
                check(libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), flags, std::ptr::null()))?;
            }
            record(STEP_DONE);
            Ok(())
        });
    }
    command.spawn().map_err(|source| {
        // Spawning has returned, so the child has exec'd or exited: the step is final.
        let step = match step.load() {
            STEP_NONE | STEP_DONE => return LaunchError::Spawn { program: program.to_string(), source },
            STEP_UNSHARE => "unshare(CLONE_NEWNS)".to_string(),
            STEP_RSLAVE => "making / a recursive slave mount".to_string(),
            n => match binds.get((n - STEP_FIRST_BIND) as usize) {
                Some((from, to)) => format!("bind-mounting {from} onto {}", to.display()),
                None => format!("step {n}"),
            },
        };
        LaunchError::Namespace { step, source }
    })
}

/// One word of memory shared with the forked child (a `MAP_SHARED` anonymous mapping), where
/// it records which setup step it is in, so a failure can be named: the error that crosses
/// back from a failed `pre_exec` is only an errno.
struct SharedStep {
    pointer: *mut libc::c_void,
}

impl SharedStep {
    const BYTES: usize = std::mem::size_of::<AtomicU32>();

    fn new() -> io::Result<SharedStep> {
        let protection = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_SHARED | libc::MAP_ANONYMOUS;
        // SAFETY: a fresh anonymous mapping, zero-filled (= STEP_NONE), page-aligned.
        let pointer = unsafe { libc::mmap(std::ptr::null_mut(), Self::BYTES, protection, flags, -1, 0) };
        if pointer == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedStep { pointer })
    }

    fn address(&self) -> usize {
        self.pointer as usize
    }

    fn load(&self) -> u32 {
        // SAFETY: the mapping is live until drop and aligned for an AtomicU32.
        unsafe { (*(self.pointer as *const AtomicU32)).load(Ordering::SeqCst) }
    }
}

impl Drop for SharedStep {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; the child's copy is its own.
        unsafe { libc::munmap(self.pointer, Self::BYTES) };
    }
}
