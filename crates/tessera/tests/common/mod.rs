//! Test harness: real `tessera` daemons on loopback, one cluster per test.
//!
//! Every cluster gets its own directory under `std::env::temp_dir()` and its own port range,
//! so tests run in parallel. [`Cluster`]'s `Drop` always runs `tessera down --dir` and removes
//! the directory (printing the daemons' last log lines first when the test failed).
//! Every external program runs under a timeout: no test may hang.
//! External tools are required, never skipped: a missing one fails the test and says how to
//! install it.

#![allow(dead_code)]

pub mod nbd_client;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use tessera_proto::ClusterSecret;

pub const BIN: &str = env!("CARGO_BIN_EXE_tessera");
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
/// The pool `tessera up` creates uses 1 MiB extents.
pub const EXTENT_BYTES: u64 = MIB;

/// Limit for one CLI call (it retries the MDM for up to 20 s itself).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for `tessera up` (it waits up to 60 s for readiness itself).
pub const UP_TIMEOUT: Duration = Duration::from_secs(90);
/// Limit for one run of an external NBD client over at most a few hundred MiB.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a poll for an eventually-true condition waits.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Ports of one cluster: MDM at base, SDS n at base + 10 + n, the rest spare.
pub const PORTS_PER_CLUSTER: u16 = 20;
/// Ranges are taken below Linux's default ephemeral range (32768..), so outgoing
/// connections never sit on a port a test is about to listen on.
const PORT_FLOOR: u16 = 10_000;
const PORT_SLOTS: u32 = 1_100; // 10_000 + 1_100 × 20 = 32_000
static NEXT_PORT_SLOT: AtomicU32 = AtomicU32::new(0);
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------
// Processes with timeouts

/// Runs `cmd` to completion with stdin closed, capturing its output; panics (after killing
/// it) if it runs longer than `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let status = wait_with_timeout(&mut child, timeout)
        .unwrap_or_else(|| panic!("{desc} did not finish within {timeout:?}; killed it"));
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Output { status, stdout, stderr }
}

/// Waits for `child`; kills and reaps it and returns `None` after `timeout`.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Describes a finished command for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A command for an external tool, which must be installed: its absence fails the test.
pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required test tool `{name}` is not installed (not found in PATH); run scripts/test.sh, \
         which installs the test dependencies (libnbd-bin, qemu-utils, fio, util-linux)"
    );
    Command::new(name)
}

/// Runs an external tool under [`TOOL_TIMEOUT`] and asserts it exits 0.
pub fn tool_ok(name: &str, args: &[&str]) -> Output {
    let out = run(tool(name).args(args), TOOL_TIMEOUT);
    assert!(out.status.success(), "{name} {args:?} failed: {}", describe(&out));
    out
}

/// Polls `ready` every 100 ms until it returns `Some`, or panics after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// True while `pid` is a live (not zombie) process.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|s| s != 'Z' && s != 'X'),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------
// Ports and directories

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A range of [`PORTS_PER_CLUSTER`] free ports, distinct from every other range this
/// process handed out (a process-wide counter), and spread by pid across processes.
pub fn reserve_port_range() -> u16 {
    let start = std::process::id().wrapping_mul(7919) % PORT_SLOTS;
    for _ in 0..PORT_SLOTS {
        let slot = (start + NEXT_PORT_SLOT.fetch_add(1, Ordering::SeqCst)) % PORT_SLOTS;
        let base = PORT_FLOOR + slot as u16 * PORTS_PER_CLUSTER;
        if (base..base + PORTS_PER_CLUSTER).all(port_is_free) {
            return base;
        }
    }
    panic!("no free range of {PORTS_PER_CLUSTER} ports between {PORT_FLOOR} and 32000");
}

/// Unmounts a FUSE mount (nbdfuse); a process that still has a file open in it makes a
/// plain unmount fail, so it is then detached lazily.
pub fn unmount_fuse(mount: &Path) {
    let unmounted = Command::new("fusermount3").arg("-u").arg(mount).status().is_ok_and(|s| s.success());
    if !unmounted {
        let _ = Command::new("umount").arg("-l").arg(mount).status();
    }
}

/// A fresh, empty directory under the system temp dir.
pub fn fresh_dir(label: &str) -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tessera-it-{}-{n}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

// ---------------------------------------------------------------------------------------
// Loop devices

/// A loop device over a fresh sparse file; detached and removed on drop.
pub struct LoopDevice {
    pub device: String,
    dir: PathBuf,
    pub backing: PathBuf,
}

impl LoopDevice {
    /// 512 MiB, writable.
    pub fn new() -> LoopDevice {
        LoopDevice::with(512 * MIB, &[])
    }

    /// `size_bytes`, with extra `losetup` flags (`-r` for read-only, `-P` to scan partitions).
    pub fn with(size_bytes: u64, losetup_flags: &[&str]) -> LoopDevice {
        let dir = fresh_dir("loop");
        let backing = dir.join("backing.img");
        std::fs::File::create(&backing).and_then(|f| f.set_len(size_bytes)).expect("creating the backing file");
        let out = run(tool("losetup").args(["--find", "--show"]).args(losetup_flags).arg(&backing), CLI_TIMEOUT);
        assert!(
            out.status.success(),
            "losetup could not attach a loop device (needs root and /dev/loop*): {}",
            describe(&out)
        );
        let device = text(&out.stdout).trim().to_string();
        assert!(device.starts_with("/dev/loop"), "losetup printed {device:?}");
        LoopDevice { device, dir, backing }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let mut detach = Command::new("losetup");
        detach.arg("-d").arg(&self.device);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut detach, CLI_TIMEOUT)));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// Data

/// `len` pseudo-random bytes from `seed` (printed, so a failure can be replayed).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Writes `len` random bytes to `path`; returns them.
pub fn random_file(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    eprintln!("random data: {} bytes from seed {seed} in {}", len, path.display());
    let data = random_bytes(seed, len);
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    data
}

/// Asserts `actual` equals `expected`, naming the first differing offset.
pub fn assert_same_bytes(what: &str, expected: &[u8], actual: &[u8]) {
    assert_eq!(expected.len(), actual.len(), "{what}: lengths differ");
    if let Some(i) = expected.iter().zip(actual).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (expected {:#04x}, got {:#04x})", expected[i], actual[i]);
    }
}

/// Asserts every byte of `bytes` is zero, naming the first that is not.
pub fn assert_zeros(what: &str, bytes: &[u8]) {
    if let Some(i) = bytes.iter().position(|b| *b != 0) {
        panic!("{what}: byte {i} is {:#04x}, expected zero", bytes[i]);
    }
}

// ---------------------------------------------------------------------------------------
// The cluster

pub struct Cluster {
    pub dir: PathBuf,
    pub base_port: u16,
    pub sds_count: u32,
    pub mdm_count: u32,
    /// Daemons the test started itself (not by `up`); killed and reaped on drop.
    extra_daemons: Mutex<Vec<(String, Child)>>,
}

impl Cluster {
    /// A local cluster of `sds_count` SDSs (2 GiB sparse devices), an MDM and the SDC `sdc-1`.
    pub fn start(sds_count: u32) -> Cluster {
        Cluster::start_with(sds_count, "2GiB")
    }

    pub fn start_with(sds_count: u32, device_size: &str) -> Cluster {
        Cluster::start_full(1, sds_count, device_size)
    }

    /// A local cluster with `mdm_count` MDMs (1, 3 or 5; `up --mdm`): MDM n listens on
    /// 127.0.0.(10+n):base+n-1 when there are several.
    pub fn start_full(mdm_count: u32, sds_count: u32, device_size: &str) -> Cluster {
        Cluster::start_with_plugin(mdm_count, sds_count, device_size, None)
    }

    /// [`Cluster::start_full`] with the volume service's Docker plugin socket at `plugin`
    /// (default: inside the cluster directory, where Docker does not look).
    pub fn start_with_plugin(mdm_count: u32, sds_count: u32, device_size: &str, plugin: Option<&Path>) -> Cluster {
        let base_port = reserve_port_range();
        let cluster = Cluster {
            dir: fresh_dir(&format!("p{base_port}")),
            base_port,
            sds_count,
            mdm_count,
            extra_daemons: Mutex::new(Vec::new()),
        };
        let out = run(
            Command::new(BIN)
                .arg("up")
                .arg("--dir")
                .arg(&cluster.dir)
                .args(["--mdm", &mdm_count.to_string()])
                .arg("--plugin-socket")
                .arg(plugin.map_or_else(|| cluster.dir.join("tessera-plugin.sock"), Path::to_path_buf))
                .args(["--sds", &sds_count.to_string(), "--device-size", device_size])
                .args(["--base-port", &base_port.to_string(), "--detach"]),
            UP_TIMEOUT,
        );
        assert!(out.status.success(), "tessera up failed: {}", describe(&out));
        cluster
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("tessera.toml")
    }

    /// The NBD unix socket of `sdc-1`.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("sdc-1.sock")
    }

    /// The first MDM's address.
    pub fn mdm_addr(&self) -> String {
        self.mdm_addr_of(1)
    }

    /// MDM `n`'s address (1-based), as `up` lays them out.
    pub fn mdm_addr_of(&self, n: u32) -> String {
        let port = self.base_port + n as u16 - 1;
        if self.mdm_count > 1 {
            format!("127.0.0.{}:{port}", 10 + n)
        } else {
            format!("127.0.0.1:{port}")
        }
    }

    /// Every MDM's address.
    pub fn mdm_addrs(&self) -> Vec<String> {
        (1..=self.mdm_count).map(|n| self.mdm_addr_of(n)).collect()
    }

    /// Data address of SDS `n` (1-based), as `up` lays them out.
    pub fn sds_addr(&self, n: u32) -> String {
        format!("127.0.0.1:{}", self.base_port + 10 + n as u16)
    }

    /// A spare port of this cluster's range (0 ≤ i < 5), never used by `up`.
    pub fn spare_port(&self, i: u16) -> u16 {
        assert!(i < 5);
        self.base_port + 15 + i
    }

    pub fn secret(&self) -> ClusterSecret {
        let text = std::fs::read_to_string(self.config()).expect("reading the cluster config");
        let cfg: toml::Value = toml::from_str(&text).expect("the config is TOML");
        let hex = cfg.get("secret").and_then(|s| s.as_str()).expect("the config has a secret");
        ClusterSecret::from_hex(hex).expect("the config's secret is valid hex")
    }

    /// `tessera --config <this cluster> ARGS`, under [`CLI_TIMEOUT`].
    pub fn cli(&self, args: &[&str]) -> Output {
        run(Command::new(BIN).arg("--config").arg(self.config()).args(args).env_remove("TESSERA_CONFIG"), CLI_TIMEOUT)
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "tessera {args:?} failed: {}", describe(&out));
        text(&out.stdout)
    }

    /// Runs a CLI command with `--json` that must succeed; returns its parsed output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let stdout = self.ok(&all);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("tessera {all:?} printed invalid JSON ({e}):\n{stdout}"))
    }

    pub fn status(&self) -> serde_json::Value {
        self.json(&["cluster", "status"])
    }

    /// Creates a thin volume in the default pool.
    pub fn create_volume(&self, name: &str, size: &str) {
        self.ok(&["volume", "create", name, "--size", size]);
    }

    /// Maps a volume to `sdc-1`; returns its NBD URI.
    pub fn map(&self, name: &str) -> String {
        let uri = self.ok(&["volume", "map", name]).trim().to_string();
        assert_eq!(uri, format!("nbd+unix:///{name}?socket={}", self.socket().display()), "unexpected URI");
        uri
    }

    /// Creates and maps a volume; returns its URI.
    pub fn volume(&self, name: &str, size: &str) -> String {
        self.create_volume(name, size);
        self.map(name)
    }

    /// Asserts `tessera volume verify` finds both copies identical; returns its JSON report.
    pub fn verify(&self, name: &str) -> serde_json::Value {
        let report = self.json(&["volume", "verify", name]);
        let mismatches = report["mismatches"].as_array().expect("verify report has mismatches");
        assert!(mismatches.is_empty(), "copies of {name} differ: {report:#}");
        report
    }

    /// Sum of `used_bytes` over all SDSs, as the MDM last heard it.
    pub fn used_bytes(&self) -> u64 {
        self.status()["sdss"]
            .as_array()
            .expect("sdss")
            .iter()
            .map(|s| s["used_bytes"].as_u64().expect("used_bytes"))
            .sum()
    }

    /// The pid `up` recorded for a daemon (`mdm-1`, `sds-2`, `sdc-1`).
    pub fn pid(&self, role_id: &str) -> i32 {
        let path = self.dir.join(format!("{role_id}.pid"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        text.trim().parse().unwrap_or_else(|e| panic!("bad pid in {}: {e}", path.display()))
    }

    /// Every daemon `up` started: `mdm-1`, `sds-1..n`, `sdc-1`.
    pub fn role_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = (1..=self.mdm_count).map(|n| format!("mdm-{n}")).collect();
        ids.extend((1..=self.sds_count).map(|n| format!("sds-{n}")));
        ids.push("sdc-1".to_string());
        ids.push("volumes-1".to_string());
        ids
    }

    /// Asserts a daemon `up` started is still running.
    pub fn assert_alive(&self, role_id: &str) {
        let pid = self.pid(role_id);
        assert!(pid_alive(pid), "{role_id} (pid {pid}) died; last log lines:\n{}", self.log_tail(role_id, 30));
    }

    pub fn assert_all_alive(&self) {
        for id in self.role_ids() {
            self.assert_alive(&id);
        }
    }

    pub fn log_tail(&self, role_id: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{role_id}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `tessera down --dir`: stops every daemon `up` started.
    pub fn down(&self) {
        let out = run(Command::new(BIN).arg("down").arg("--dir").arg(&self.dir), CLI_TIMEOUT);
        assert!(out.status.success(), "tessera down failed: {}", describe(&out));
    }

    /// `tessera up --dir --detach` on the existing directory: restarts the recorded layout.
    pub fn up_again(&self) {
        self.up_again_with_env(&[]);
    }

    /// [`Cluster::up_again`] with extra environment for the daemons.
    pub fn up_again_with_env(&self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(BIN);
        cmd.arg("up").arg("--dir").arg(&self.dir).arg("--detach").envs(env.iter().copied());
        let out = run(&mut cmd, UP_TIMEOUT);
        assert!(out.status.success(), "restarting with tessera up failed: {}", describe(&out));
    }

    /// Starts `tessera --config C daemon ARGS` as a child of the test; its output goes to
    /// `DIR/<role_id>.log`. It is killed when the cluster is dropped (or the test dies).
    pub fn spawn_daemon(&self, role_id: &str, args: &[&str]) -> i32 {
        self.spawn_daemon_env(role_id, args, &[])
    }

    /// [`Cluster::spawn_daemon`] with extra environment for the daemon.
    pub fn spawn_daemon_env(&self, role_id: &str, args: &[&str], env: &[(&str, &str)]) -> i32 {
        let log = std::fs::File::create(self.dir.join(format!("{role_id}.log"))).expect("creating a log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(self.config()).arg("daemon").args(args).envs(env.iter().copied());
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("dup log")).stderr(log);
        // Safety: prctl is async-signal-safe. The daemon dies with the test thread, so a
        // crashed test run leaves no daemon behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting daemon {role_id}: {e}"));
        let pid = child.id() as i32;
        self.extra_daemons.lock().unwrap_or_else(|p| p.into_inner()).push((role_id.to_string(), child));
        pid
    }

    /// Restarts SDS `name` as role `role_id` after a simulated power cut of its node: the
    /// crash disk dropped the cache, and the node comes back in a new boot (a new
    /// `TESSERA_BOOT_ID`), as after a real power cut.
    pub fn restart_sds_after_power_cut(&self, role_id: &str, name: &str, listen: &str) -> i32 {
        static BOOTS: AtomicU32 = AtomicU32::new(0);
        let boot = format!("simulated-boot-{}-{}", std::process::id(), BOOTS.fetch_add(1, Ordering::Relaxed));
        self.spawn_daemon_env(role_id, &["sds", "--name", name, "--listen", listen], &[("TESSERA_BOOT_ID", &boot)])
    }

    /// SIGKILLs a daemon started with [`Cluster::spawn_daemon`] and reaps it: when this
    /// returns the process is gone (a power cut, as far as the process is concerned).
    pub fn kill_daemon(&self, role_id: &str) {
        let mut daemons = self.extra_daemons.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = daemons.iter().position(|(id, _)| id == role_id) else {
            panic!("no daemon {role_id} was started by this test")
        };
        let (_, mut child) = daemons.remove(i);
        let _ = child.kill();
        wait_with_timeout(&mut child, Duration::from_secs(10)).unwrap_or_else(|| panic!("{role_id} did not die"));
    }

    /// Whether a daemon started with [`Cluster::spawn_daemon`] is still running.
    pub fn extra_daemon_running(&self, role_id: &str) -> bool {
        let mut daemons = self.extra_daemons.lock().unwrap_or_else(|p| p.into_inner());
        daemons.iter_mut().find(|(id, _)| id == role_id).is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut ids = self.role_ids();
            ids.extend(self.extra_daemons.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(id, _)| id.clone()));
            for id in ids {
                eprintln!("--- last lines of {id}.log in {} ---\n{}", self.dir.display(), self.log_tail(&id, 15));
            }
        }
        // Our own children first: `down` does not know them, and only we can reap them.
        for (_, mut child) in self.extra_daemons.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut down = Command::new(BIN);
        down.arg("down").arg("--dir").arg(&self.dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        match down.spawn() {
            Ok(mut child) => {
                if wait_with_timeout(&mut child, CLI_TIMEOUT).is_none() {
                    eprintln!("tessera down --dir {} timed out", self.dir.display());
                }
            }
            Err(e) => eprintln!("cannot run tessera down: {e}"),
        }
        // Should `down` have failed, no daemon of this cluster may outlive the test.
        for id in self.role_ids() {
            let Ok(pid_text) = std::fs::read_to_string(self.dir.join(format!("{id}.pid"))) else { continue };
            let Ok(pid) = pid_text.trim().parse::<i32>() else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if pid > 1 && pid_alive(pid) && String::from_utf8_lossy(&cmdline).contains(&*self.dir.to_string_lossy()) {
                eprintln!("{id} (pid {pid}) survived tessera down; killing it");
                // Safety: a pid from this cluster's own pid file whose command line names our dir.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// fio in the background

pub struct Fio {
    child: Option<Child>,
    args: Vec<String>,
    output: PathBuf,
    stderr: PathBuf,
}

pub struct FioResult {
    pub status: ExitStatus,
    /// `jobs[0]` of fio's JSON report.
    pub job: serde_json::Value,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Fio {
    /// Starts fio with the NBD engine on `uri`; never leaves verify state files behind.
    pub fn start(c: &Cluster, label: &str, uri: &str, extra: &[&str]) -> (Fio, Instant) {
        let output = c.dir.join(format!("fio-{label}.json"));
        let stderr = c.dir.join(format!("fio-{label}.stderr"));
        let mut args: Vec<String> = vec![
            format!("--name={label}"),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--output-format=json".into(),
            format!("--output={}", output.display()),
            "--verify_state_save=0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = tool("fio");
        cmd.args(&args).current_dir(&c.dir).stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(&stderr).expect("fio stderr file"));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting fio {args:?}: {e}"));
        (Fio { child: Some(child), args, output, stderr }, Instant::now())
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().expect("not finished").try_wait(), Ok(None))
    }

    pub fn finish(mut self, started: Instant) -> FioResult {
        let mut child = self.child.take().expect("not finished");
        let status = wait_with_timeout(&mut child, TOOL_TIMEOUT)
            .unwrap_or_else(|| panic!("fio {:?} did not finish within {TOOL_TIMEOUT:?}; killed it", self.args));
        let elapsed = started.elapsed();
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let out = std::fs::read_to_string(&self.output).unwrap_or_default();
        let job = out
            .find('{')
            .and_then(|i| serde_json::from_str::<serde_json::Value>(&out[i..]).ok())
            .map(|r| r["jobs"][0].clone())
            .unwrap_or(serde_json::Value::Null);
        FioResult { status, job, stderr, elapsed }
    }
}

impl Drop for Fio {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl FioResult {
    pub fn describe(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stderr ---\n{}\n--- job ---\n{:#}",
            self.status.code(),
            self.elapsed,
            self.stderr,
            self.job
        )
    }

    pub fn bytes(&self, dir: &str) -> u64 {
        self.job[dir]["io_bytes"].as_u64().unwrap_or_else(|| panic!("no {dir} io_bytes: {}", self.describe()))
    }

    /// Exit 0, no job error, no verify complaint, and exactly these byte counts (`written`
    /// is `None` for a verify-only pass, which counts the writes it only pretends to do).
    pub fn assert_clean(&self, written: Option<u64>, read: u64) {
        assert!(self.status.success(), "fio failed: {}", self.describe());
        assert_eq!(self.job["error"].as_i64(), Some(0), "fio job error: {}", self.describe());
        for bad in ["verify", "bad magic", "error", "crc32c", "mismatch"] {
            assert!(!self.stderr.to_lowercase().contains(bad), "fio reported {bad:?}: {}", self.describe());
        }
        if let Some(written) = written {
            assert_eq!(self.bytes("write"), written, "bytes written: {}", self.describe());
        }
        assert_eq!(self.bytes("read"), read, "bytes read (verified): {}", self.describe());
    }
}

/// A verify-only fio pass replaying `job` (the same arguments as the write): reads back and
/// checks every block that job wrote.
pub fn fio_verify_only(c: &Cluster, label: &str, uri: &str, job: &[&str], bytes: u64) {
    let mut args = job.to_vec();
    args.push("--verify_only");
    let (fio, started) = Fio::start(c, label, uri, &args);
    let r = fio.finish(started);
    r.assert_clean(None, bytes);
    eprintln!("fio verify-only pass {label}: {} MiB checked in {:?}", bytes / MIB, r.elapsed);
}
