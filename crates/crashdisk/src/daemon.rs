//! The daemon: arguments, the mount, the control socket, shutdown on a signal.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use fuser::MountOption;

use crate::control::{self, MAX_LINE_BYTES};
use crate::fs::{lock, CrashFs, SharedState};
use crate::state::State;

/// Control connections served at once; more are told so and closed.
pub const MAX_CONTROL_CONNECTIONS: usize = 16;
/// A control connection idle this long is closed, so a stuck client cannot
/// hold a slot forever.
const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(name = "tessera-crashdisk", about = "Files that behave like disks with a volatile write cache")]
struct Args {
    /// Directory whose regular files are served (the "platters").
    #[arg(long)]
    backing: PathBuf,
    /// Empty directory to mount the crash disk on.
    #[arg(long)]
    mount: PathBuf,
    /// Unix socket for control commands; answered once the mount is live.
    #[arg(long)]
    control: PathBuf,
    /// Run-wide seed, mixed into every `cut ... torn SEED`: a harness that
    /// varies it per run tears differently each run, and replays a run by
    /// passing the same value again.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The binary's `main`: runs until SIGTERM or SIGINT, then unmounts.
pub fn main_entry() {
    let args = Args::parse();
    if let Err(message) = run(&args) {
        eprintln!("tessera-crashdisk: {message}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    if !args.backing.is_dir() {
        return Err(format!("--backing {}: not a directory", args.backing.display()));
    }
    if !args.mount.is_dir() {
        return Err(format!("--mount {}: not a directory", args.mount.display()));
    }
    // Block the signals before any thread starts, so every thread inherits the
    // mask and only `sigwait` below ever sees them.
    let signals = block_shutdown_signals()?;
    let state: SharedState = Arc::new(Mutex::new(
        State::new(&args.backing, args.seed).map_err(|e| format!("{}: {e}", args.backing.display()))?,
    ));

    let mut options =
        vec![MountOption::FSName("tessera-crashdisk".to_string()), MountOption::Subtype("crashdisk".to_string())];
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // fusermount3 unmounts for us if this process dies without doing it
        // (SIGKILL); it needs allow_other, which only root may set freely.
        options.extend([MountOption::AutoUnmount, MountOption::AllowOther]);
    }
    let session = fuser::spawn_mount2(CrashFs::new(state.clone()), &args.mount, &options).map_err(|e| {
        format!("mounting on {}: {e} (is fuse3 installed? run scripts/install-deps.sh)", args.mount.display())
    })?;
    // The first request waits for the kernel's INIT to be answered: once this
    // returns, the mount serves requests, and only then is the socket opened.
    std::fs::read_dir(&args.mount).map_err(|e| format!("mount {} is not live: {e}", args.mount.display()))?;

    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control).map_err(|e| format!("binding {}: {e}", args.control.display()))?;
    let control_state = state.clone();
    std::thread::spawn(move || serve_control(listener, control_state));

    let signal = wait_for_signal(&signals);
    eprintln!("tessera-crashdisk: signal {signal}, unmounting {}", args.mount.display());
    // Answer every parked op (EIO) so no process stays blocked across the unmount.
    lock(&state).drop_parked();
    drop(session);
    let _ = std::fs::remove_file(&args.control);
    Ok(())
}

fn block_shutdown_signals() -> Result<libc::sigset_t, String> {
    // SAFETY: sigset operations on a local set; pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(format!("pthread_sigmask: errno {rc}"));
        }
        Ok(set)
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut signal = 0;
        // SAFETY: sigwait reads the set and writes one int.
        if unsafe { libc::sigwait(set, &mut signal) } == 0 {
            return signal;
        }
    }
}

fn serve_control(listener: UnixListener, state: SharedState) {
    let connections = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONTROL_CONNECTIONS {
            connections.fetch_sub(1, Ordering::SeqCst);
            let _ = writeln!(stream, "error too many control connections (at most {MAX_CONTROL_CONNECTIONS})");
            continue;
        }
        let state = state.clone();
        let connections = connections.clone();
        std::thread::spawn(move || {
            serve_connection(stream, &state);
            connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn serve_connection(stream: UnixStream, state: &SharedState) {
    let _ = stream.set_read_timeout(Some(CONTROL_IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CONTROL_IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match reader.by_ref().take(MAX_LINE_BYTES as u64).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() >= MAX_LINE_BYTES {
            let _ = writeln!(writer, "error line longer than {MAX_LINE_BYTES} bytes");
            discard_rest(&mut reader, &writer);
            return;
        }
        let reply = match std::str::from_utf8(&line) {
            Ok(text) => answer(text.trim_end_matches(['\n', '\r']), state),
            Err(_) => "error command is not UTF-8".to_string(),
        };
        // A last line without its newline (the peer closed) is still answered.
        if writeln!(writer, "{reply}").is_err() || !complete {
            return;
        }
    }
}

/// Reads and drops what the peer still sends, a bounded amount, so that
/// closing with unread input does not reset the connection before the peer
/// has read the error reply.
fn discard_rest(reader: &mut BufReader<UnixStream>, writer: &UnixStream) {
    const MAX_DISCARD_BYTES: u64 = 1 << 20;
    let _ = writer.shutdown(std::net::Shutdown::Write);
    let _ = writer.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = io::copy(&mut reader.by_ref().take(MAX_DISCARD_BYTES), &mut io::sink());
}

fn answer(line: &str, state: &SharedState) -> String {
    let result = control::parse(line).and_then(|command| lock(state).execute(command));
    match result {
        Ok(text) if text.is_empty() => "ok".to_string(),
        Ok(text) => format!("ok {text}"),
        Err(reason) => format!("error {reason}"),
    }
}
