//! The Docker volume plugin under a real Docker engine (`docker.io` from Debian, started
//! here when none runs): `docker volume create -d`, containers writing and reading a volume,
//! two containers sharing one volume (it stays mounted until the last stops), inspect,
//! remove, and option errors surfacing in Docker's own messages.
//!
//! The engine runs on its own socket and data root with no networking (`--bridge none`,
//! containers `--network none`) and the `vfs` storage driver, so it needs nothing from the
//! host but root. The image is made here from Debian's static busybox.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

const DOCKER_HOST: &str = "unix:///run/tessera-test-docker.sock";
const IMAGE: &str = "tessera-test-busybox:1";
/// Starting containers on the vfs driver is slow on a loaded 2-core machine.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(180);

fn docker(args: &[&str]) -> Output {
    run(Command::new("docker").args(["-H", DOCKER_HOST]).args(args), DOCKER_TIMEOUT)
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {args:?} failed: {}", describe(&out));
    text(&out.stdout).trim().to_string()
}

/// Starts (once per test run) a Docker engine for these tests and imports the image.
fn engine() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if !docker(&["info"]).status.success() {
            let log = std::fs::File::create("/tmp/tessera-test-dockerd.log").expect("dockerd log");
            let mut cmd = tool("dockerd");
            cmd.args(["--host", DOCKER_HOST, "--data-root", "/var/lib/tessera-test-docker"])
                .args(["--exec-root", "/run/tessera-test-docker", "--pidfile", "/run/tessera-test-dockerd.pid"])
                .args(["--bridge", "none", "--iptables=false", "--ip6tables=false", "--storage-driver", "vfs"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log);
            // The engine stays up for the rest of this test binary's run and is left for the
            // next (a second start finds it answering).
            let mut child = cmd.spawn().expect("starting dockerd (scripts/install-deps.sh installs docker.io)");
            // Reaped if it ever exits while the tests run.
            std::thread::spawn(move || child.wait());
            poll("dockerd to answer (log: /tmp/tessera-test-dockerd.log)", Duration::from_secs(90), || {
                docker(&["info"]).status.success().then_some(())
            });
        }
        if !docker(&["image", "inspect", IMAGE]).status.success() {
            let work = fresh_dir("docker-image");
            let root = work.join("root");
            std::fs::create_dir_all(root.join("bin")).expect("image dir");
            std::fs::copy("/bin/busybox", root.join("bin/busybox"))
                .expect("a static /bin/busybox (scripts/install-deps.sh installs busybox-static)");
            for applet in ["sh", "cat", "echo", "sleep", "ls"] {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
            }
            let tar = work.join("image.tar");
            let out = run(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg("."), CLI_TIMEOUT);
            assert!(out.status.success(), "{}", describe(&out));
            docker_ok(&["import", tar.to_str().unwrap(), IMAGE]);
            let _ = std::fs::remove_dir_all(&work);
        }
    });
}

fn mounted(path: &Path) -> bool {
    run(Command::new("findmnt").arg(path), CLI_TIMEOUT).status.success()
}

/// Removes the containers named on drop, so a failed test leaves none running.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = docker(&["rm", "-f", name]);
        }
    }
}

#[test]
fn docker_volumes_through_the_plugin() {
    engine();
    let plugin_dir = PathBuf::from("/run/docker/plugins");
    std::fs::create_dir_all(&plugin_dir).expect("/run/docker/plugins");
    // A driver name of its own, so parallel test runs never share a socket.
    let base_hint = std::process::id();
    let socket = plugin_dir.join(format!("tessera-{base_hint}.sock"));
    let c = Cluster::start_with_plugin(1, 3, "2GiB", Some(&socket));
    let driver = format!("tessera-{base_hint}");
    let volume = format!("dvol-{base_hint}");
    let names = Containers(vec![format!("c1-{base_hint}"), format!("c2-{base_hint}")]);

    docker_ok(&["volume", "create", "-d", &driver, "-o", "size=1", "-o", "newfstype=ext4", &volume]);
    let ls = c.ok(&["volume", "ls"]);
    assert!(ls.lines().any(|l| l.starts_with(&volume) && l.contains("1.0 GiB")), "{ls}");
    let inspect = docker_ok(&["volume", "inspect", "--format", "{{.Driver}} {{.Scope}}", &volume]);
    assert_eq!(inspect, format!("{driver} global"));

    // One container writes, a second reads it back.
    let mount = format!("{volume}:/data");
    docker_ok(&["run", "--rm", "--network", "none", "-v", &mount, IMAGE, "sh", "-c", "echo one > /data/f"]);
    let mountpoint = c.dir.join("volumes").join(&volume);
    assert!(!mounted(&mountpoint), "still mounted after the container exited");
    let read = docker_ok(&["run", "--rm", "--network", "none", "-v", &mount, IMAGE, "cat", "/data/f"]);
    assert_eq!(read, "one");

    // Two containers share the volume; it stays mounted until the last one stops.
    for name in &names.0 {
        docker_ok(&["run", "-d", "--name", name, "--network", "none", "-v", &mount, IMAGE, "sleep", "300"]);
    }
    assert!(mounted(&mountpoint));
    let refs = c.json(&["volume", "refs"]);
    assert_eq!(refs[&volume].as_array().map(|a| a.len()), Some(2), "one reference per container: {refs:#}");
    docker_ok(&["rm", "-f", &names.0[0]]);
    assert!(mounted(&mountpoint), "unmounted while a container still uses it");
    let seen = docker_ok(&["exec", &names.0[1], "cat", "/data/f"]);
    assert_eq!(seen, "one");
    docker_ok(&["exec", &names.0[1], "sh", "-c", "echo two >> /data/f"]);
    docker_ok(&["rm", "-f", &names.0[1]]);
    assert!(!mounted(&mountpoint), "still mounted after the last container stopped");
    let refs = c.json(&["volume", "refs"]);
    assert!(refs.get(&volume).is_none(), "references left: {refs:#}");

    // The data survives, through the CLI too.
    let path = c.ok(&["volume", "mount", &volume]);
    assert_eq!(std::fs::read_to_string(Path::new(path.trim()).join("f")).expect("file"), "one\ntwo\n");
    c.ok(&["volume", "unmount", &volume]);

    // Errors reach the user through Docker.
    let out = docker(&["volume", "create", "-d", &driver, "-o", "sise=1", &format!("bad-{base_hint}")]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown volume option"), "{}", describe(&out));

    docker_ok(&["volume", "rm", &volume]);
    assert!(!c.ok(&["volume", "ls"]).contains(&volume));
}
