//! [`CrashDisk`]: starts the daemon for a test, sends it control commands,
//! and stops and unmounts it on drop. Every wait has a timeout: no test may
//! hang on a crash disk.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::control::FileStats;
use crate::faults::FaultOp;

/// How long the daemon may take to mount and answer `ping`.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one control command may take (connect, send, reply).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an unmount helper may run.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(5);

const INSTALL_HINT: &str = "install fuse3 (scripts/install-deps.sh) and make sure /dev/fuse exists";

/// A running crash disk daemon.
pub struct CrashDisk {
    child: Option<Child>,
    mount: PathBuf,
    control: PathBuf,
}

fn error(message: String) -> io::Error {
    io::Error::other(message)
}

impl CrashDisk {
    /// Starts `binary` (`tessera-crashdisk`, or this crate's `crashdisk`)
    /// serving the files of `backing` at `mount`, and waits until its control
    /// socket answers `ping`, which it does only once the mount is live.
    /// Fails, never skips, when FUSE is not there.
    pub fn start(binary: &Path, backing: &Path, mount: &Path, control: &Path) -> io::Result<CrashDisk> {
        if !Path::new("/dev/fuse").exists() {
            return Err(error(format!("/dev/fuse is missing: {INSTALL_HINT}")));
        }
        if !fusermount3_present() {
            return Err(error(format!("fusermount3 is not on PATH: {INSTALL_HINT}")));
        }
        let child = Command::new(binary)
            .arg("--backing")
            .arg(backing)
            .arg("--mount")
            .arg(mount)
            .arg("--control")
            .arg(control)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| error(format!("starting {}: {e}", binary.display())))?;
        let mut disk = CrashDisk { child: Some(child), mount: mount.to_path_buf(), control: control.to_path_buf() };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = disk.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    disk.child = None;
                    return Err(error(format!("{} exited at start-up ({status}): {INSTALL_HINT}?", binary.display())));
                }
            }
            if disk.ping().is_ok() {
                return Ok(disk);
            }
            if Instant::now() > deadline {
                return Err(error(format!(
                    "crash disk at {} did not answer ping within {START_TIMEOUT:?}",
                    mount.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn mount_path(&self) -> &Path {
        &self.mount
    }

    /// `mount/file`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.mount.join(file)
    }

    /// Sends one command line; returns the text after `ok` or the daemon's error.
    pub fn command(&self, line: &str) -> io::Result<String> {
        if line.contains('\n') {
            return Err(error("a command is one line".to_string()));
        }
        let stream = UnixStream::connect(&self.control)?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        (&stream).write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        let reply = reply.trim_end();
        if reply == "ok" {
            return Ok(String::new());
        }
        if let Some(text) = reply.strip_prefix("ok ") {
            return Ok(text.to_string());
        }
        Err(error(format!("crash disk: {line:?}: {}", reply.strip_prefix("error ").unwrap_or(reply))))
    }

    pub fn ping(&self) -> io::Result<()> {
        self.command("ping").map(drop)
    }

    /// Power cut on every file: all unsynced data is lost.
    pub fn cut_all(&self) -> io::Result<()> {
        self.command("cut * drop").map(drop)
    }

    /// Power cut on one file: its unsynced data is lost.
    pub fn cut(&self, file: &str) -> io::Result<()> {
        self.command(&format!("cut {file} drop")).map(drop)
    }

    /// Torn power cut (`file_or_all` is a file name or `*`): each unsynced
    /// 512-byte sector survives with probability 1/2, decided by `seed`.
    pub fn cut_torn(&self, file_or_all: &str, seed: u64) -> io::Result<()> {
        self.command(&format!("cut {file_or_all} torn {seed}")).map(drop)
    }

    /// Makes `op` on `file` fail with EIO, once or until [`CrashDisk::heal`].
    pub fn fail(&self, file: &str, op: FaultOp, once: bool) -> io::Result<()> {
        let repeat = if once { "once" } else { "always" };
        self.command(&format!("fail {file} {op} {repeat}")).map(drop)
    }

    pub fn heal(&self, file: &str) -> io::Result<()> {
        self.command(&format!("heal {file}")).map(drop)
    }

    /// Parks every later data op on `file` until [`CrashDisk::release`].
    pub fn hang(&self, file: &str) -> io::Result<()> {
        self.command(&format!("hang {file}")).map(drop)
    }

    /// Runs the parked ops of `file` (or `*`) in order; returns how many.
    pub fn release(&self, file: &str) -> io::Result<u64> {
        let text = self.command(&format!("release {file}"))?;
        text.strip_prefix("released=")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| error(format!("bad release reply {text:?}")))
    }

    pub fn stats(&self, file: &str) -> io::Result<FileStats> {
        let text = self.command(&format!("stats {file}"))?;
        FileStats::parse(&text).map_err(error)
    }

    /// Stops the daemon (SIGTERM, then SIGKILL) and makes sure nothing stays mounted.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on the pid of a child this struct owns and has not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            if !wait_with_timeout(&mut child, STOP_TIMEOUT) {
                let _ = child.kill();
                let _ = wait_with_timeout(&mut child, STOP_TIMEOUT);
            }
        }
        if is_mounted(&self.mount) {
            let fusermount = run_with_timeout(Command::new("fusermount3").arg("-u").arg("-z").arg(&self.mount));
            if !fusermount && is_mounted(&self.mount) {
                run_with_timeout(Command::new("umount").arg("-l").arg(&self.mount));
            }
        }
    }
}

impl Drop for CrashDisk {
    fn drop(&mut self) {
        self.stop();
    }
}

fn fusermount3_present() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join("fusermount3").is_file())
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() > deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Runs a helper quietly; true if it exited with success in time.
fn run_with_timeout(command: &mut Command) -> bool {
    let Ok(mut child) = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return false;
    };
    let deadline = Instant::now() + UNMOUNT_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Err(_) => return false,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Whether `mount` is a mount point now, by /proc/self/mounts (no stat:
/// a stat of a dead FUSE mount fails or, worse, waits).
pub fn is_mounted(mount: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    // The mount table shows the absolute path with spaces escaped.
    let absolute = if mount.is_absolute() {
        mount.to_path_buf()
    } else {
        std::env::current_dir().map(|dir| dir.join(mount)).unwrap_or_else(|_| mount.to_path_buf())
    };
    let wanted = absolute.to_string_lossy().replace(' ', "\\040");
    mounts.lines().any(|line| line.split(' ').nth(1) == Some(wanted.as_str()))
}
