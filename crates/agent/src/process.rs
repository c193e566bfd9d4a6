//! Daemons a node runs, as detached processes with a pid file and a log file in a state
//! directory. Shared by `tessera up` (the local cluster) and `tessera agent`: a daemon
//! outlives whatever started it, so a restarted agent finds its SDSs still serving.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long `stop_all` waits for a daemon to exit after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// True while the process runs. A zombie (exited, not yet reaped by its parent) counts as
/// gone; our own exited children are reaped here.
pub fn pid_alive(pid: i32) -> bool {
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    // /proc/PID/stat: "pid (comm) STATE ..."; comm may hold spaces, so read after the ')'.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// The pid in a pid file, if that process is alive and is a tessera daemon or agent (a
/// recycled pid belonging to something else is never signalled).
pub fn live_daemon_pid(pid_file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    if pid <= 1 || !pid_alive(pid) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmdline.split(|b| *b == 0).any(|arg| arg == b"daemon" || arg == b"agent").then_some(pid)
}

/// Starts `exe --config CONFIG ARGS...` in its own session, logging to `DIR/ROLE.log`, and
/// records its pid in `DIR/ROLE.pid`.
pub fn spawn_daemon(exe: &Path, dir: &Path, role_id: &str, config: &Path, args: &[String]) -> anyhow::Result<i32> {
    let log_path = dir.join(format!("{role_id}.log"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--config").arg(config).args(args);
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // Its own session: the daemon outlives the terminal and whatever started it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {role_id}"))?;
    let pid = child.id() as i32;
    std::fs::write(dir.join(format!("{role_id}.pid")), format!("{pid}\n"))?;
    Ok(pid)
}

/// Last lines of a daemon's log, for error messages.
pub fn log_tail(dir: &Path, role_id: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{role_id}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
pub fn stop_pid(pid: i32) {
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if pid_alive(pid) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let kill_deadline = Instant::now() + STOP_TIMEOUT;
        while pid_alive(pid) && Instant::now() < kill_deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stops every daemon with a pid file in `dir`, in dependency order: the agent first (it
/// would restart the others), then SDCs and the volume service, then SDSs, then MDMs.
/// Returns how many were running.
pub fn stop_all(dir: &Path) -> anyhow::Result<usize> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let pid_files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pid"))
        .collect();
    let rank = |p: &PathBuf| {
        let n = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if n.starts_with("agent") {
            0
        } else if n.starts_with("sdc") || n.starts_with("volumes") {
            1
        } else if n.starts_with("sds") {
            2
        } else {
            3
        }
    };
    let mut stopped = 0;
    for group in 0..4 {
        let members: Vec<&PathBuf> = pid_files.iter().filter(|p| rank(p) == group).collect();
        let pids: Vec<i32> = members.iter().filter_map(|p| live_daemon_pid(p)).collect();
        for &pid in &pids {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        for &pid in &pids {
            stop_pid(pid);
            stopped += 1;
        }
        for p in members {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(stopped)
}
