//! Attach: give the host a block device for a volume mapped to this node's SDC.
//!
//! Where the kernel has no NBD client (no `/dev/nbd*`, as on the machines the tests run
//! on), the SDC's NBD export is exposed as a file by `nbdfuse` and that file is bound to a
//! loop device. Both run as their own processes, outliving the command that attached them,
//! and are recorded under the state directory so that any later command (or a restarted
//! service) can find and undo them. Detach undoes everything: loop device, FUSE mount,
//! nbdfuse process, record.
//!
//! The kernel NBD path (`nbd-client` onto `/dev/nbdN`) is not built: no machine this is
//! tested on has the module, and an untested path would be worse than none.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::exec::{run, StepError};

/// How long attaching may take before it is called failed.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
const LOSETUP_TIMEOUT: Duration = Duration::from_secs(30);
const FUSE_UNMOUNT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub volume: String,
    pub uri: String,
    /// FUSE mount point; the export is the file `disk` inside it.
    pub fuse_dir: PathBuf,
    pub nbdfuse_pid: i32,
    pub device: PathBuf,
}

impl Attachment {
    pub fn file(&self) -> PathBuf {
        self.fuse_dir.join("disk")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Step(#[from] StepError),
    #[error("attach: {0}")]
    Other(String),
}

fn io(what: &str, e: std::io::Error) -> AttachError {
    AttachError::Other(format!("{what}: {e}"))
}

/// Records live in `<state>/attachments/<volume>.json`.
pub struct Attacher {
    state_dir: PathBuf,
}

impl Attacher {
    pub fn new(state_dir: &Path) -> Attacher {
        Attacher { state_dir: state_dir.to_path_buf() }
    }

    fn record_path(&self, volume: &str) -> PathBuf {
        self.state_dir.join("attachments").join(format!("{volume}.json"))
    }

    /// The recorded attachment of `volume`, if its loop device still reads from its
    /// nbdfuse file (it survives a restart of the service, not of the machine).
    pub fn current(&self, volume: &str) -> Option<Attachment> {
        let text = std::fs::read(self.record_path(volume)).ok()?;
        let a: Attachment = serde_json::from_slice(&text).ok()?;
        let loop_name = a.device.file_name()?.to_string_lossy().to_string();
        let backing = std::fs::read_to_string(format!("/sys/block/{loop_name}/loop/backing_file")).ok()?;
        (Path::new(backing.trim()) == a.file() && pid_alive(a.nbdfuse_pid)).then_some(a)
    }

    /// Attaches `volume` (exported at `uri`, `size_bytes` long) unless it already is;
    /// returns the block device.
    pub async fn attach(&self, volume: &str, uri: &str, size_bytes: u64) -> Result<Attachment, AttachError> {
        if let Some(a) = self.current(volume) {
            return Ok(a);
        }
        // Whatever a previous, broken attachment left behind goes first.
        self.detach(volume).await?;
        let fuse_dir = self.state_dir.join("fuse").join(volume);
        std::fs::create_dir_all(&fuse_dir).map_err(|e| io("creating the FUSE mount point", e))?;
        let log_path = self.state_dir.join("fuse").join(format!("{volume}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| io("creating the nbdfuse log", e))?;
        let file = fuse_dir.join("disk");
        let mut cmd = std::process::Command::new("nbdfuse");
        cmd.arg(&file).arg(uri).stdin(std::process::Stdio::null());
        cmd.stdout(log.try_clone().map_err(|e| io("nbdfuse log", e))?).stderr(log);
        // Its own session: the FUSE server outlives the command that attached the volume.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            AttachError::Other(format!(
                "cannot run nbdfuse: {e} (is it installed? scripts/install-deps.sh installs it)"
            ))
        })?;
        let nbdfuse_pid = child.id() as i32;
        let started = Instant::now();
        loop {
            if std::fs::metadata(&file).is_ok_and(|m| m.len() == size_bytes) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(AttachError::Other(format!("nbdfuse exited ({status}): {}", log.trim())));
            }
            if started.elapsed() > ATTACH_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let _ = run("attach", "fusermount3", &["-u", &fuse_dir.to_string_lossy()], FUSE_UNMOUNT_TIMEOUT).await;
                return Err(AttachError::Other(format!("the export {uri} did not appear within {ATTACH_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The child is left running (it is its own session); its exit is reaped by init
        // once this process ends, or by `detach`.
        std::mem::forget(child);
        let device = match run("attach", "losetup", &["--find", "--show", &file.to_string_lossy()], LOSETUP_TIMEOUT)
            .await
        {
            Ok(d) => PathBuf::from(d),
            Err(e) => {
                let _ = run("attach", "fusermount3", &["-u", &fuse_dir.to_string_lossy()], FUSE_UNMOUNT_TIMEOUT).await;
                return Err(e.into());
            }
        };
        let a = Attachment { volume: volume.to_string(), uri: uri.to_string(), fuse_dir, nbdfuse_pid, device };
        let record = self.record_path(volume);
        std::fs::create_dir_all(record.parent().expect("has a parent")).map_err(|e| io("state directory", e))?;
        crate::refs::write_atomically(&record, &serde_json::to_vec_pretty(&a).expect("serialisable"))
            .map_err(|e| io("recording the attachment", e))?;
        tracing::info!(volume, device = %a.device.display(), "attached");
        Ok(a)
    }

    /// Undoes an attachment completely; a no-op when there is none.
    pub async fn detach(&self, volume: &str) -> Result<(), AttachError> {
        let record = self.record_path(volume);
        let fuse_dir = self.state_dir.join("fuse").join(volume);
        let file = fuse_dir.join("disk");
        // Every loop device still reading the export (normally one).
        if let Ok(list) =
            run("detach", "losetup", &["--noheadings", "--output", "NAME,BACK-FILE"], LOSETUP_TIMEOUT).await
        {
            for line in list.lines() {
                let mut parts = line.split_whitespace();
                if let (Some(dev), Some(back)) = (parts.next(), parts.next()) {
                    if Path::new(back) == file {
                        run("detach", "losetup", &["--detach", dev], LOSETUP_TIMEOUT).await?;
                    }
                }
            }
        }
        let recorded: Option<Attachment> = std::fs::read(&record).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if crate::fs::mounted_source(&fuse_dir).is_some() {
            run("detach", "fusermount3", &["-u", &fuse_dir.to_string_lossy()], FUSE_UNMOUNT_TIMEOUT).await?;
        }
        if let Some(a) = &recorded {
            if pid_alive(a.nbdfuse_pid) && is_nbdfuse(a.nbdfuse_pid) {
                // Unmounting ends it; make sure.
                unsafe { libc::kill(a.nbdfuse_pid, libc::SIGTERM) };
            }
        }
        let _ = std::fs::remove_dir(&fuse_dir);
        match std::fs::remove_file(&record) {
            Ok(()) => tracing::info!(volume, "detached"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing the attachment record", e)),
        }
        Ok(())
    }
}

fn pid_alive(pid: i32) -> bool {
    pid > 1 && unsafe { libc::kill(pid, 0) } == 0
}

/// Never signal a recycled pid that is not our nbdfuse.
fn is_nbdfuse(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("nbdfuse"))
}
