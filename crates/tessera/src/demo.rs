//! `tessera demo`: the main job end to end on a throw-away local cluster, with real NBD
//! clients (`nbdcopy`) doing the IO.

use std::path::Path;
use std::process::Command as Process;
use std::time::Instant;

use anyhow::{bail, Context};
use tessera_core::Command;
use tessera_proto::control::ControlClient;

use crate::cli::UpArgs;
use crate::local;

const DEMO_VOLUME: &str = "demo1";
const DEMO_DATA_MIB: usize = 64;

fn step(n: usize, total: usize, text: &str) {
    eprintln!("[{n}/{total}] {text}");
}

fn run(cmd: &mut Process) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status =
        cmd.status().with_context(|| format!("running {shown} (is it installed? scripts/test.sh installs it)"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn free_port_base() -> u16 {
    // Pick a base whose MDM port is free now; SDS ports follow it.
    for _ in 0..50 {
        let base = 20000 + (rand::random::<u16>() % 20000);
        if std::net::TcpListener::bind(("127.0.0.1", base)).is_ok() {
            return base;
        }
    }
    27610
}

pub async fn demo(keep: bool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tessera-demo-{}", std::process::id()));
    let result = demo_in(&dir).await;
    let stopped = local::stop(&dir).await;
    if let Err(e) = stopped {
        eprintln!("warning: stopping the demo cluster: {e:#}");
    }
    if keep {
        eprintln!("cluster directory kept at {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn demo_in(dir: &Path) -> anyhow::Result<()> {
    let total = 9;
    let started = Instant::now();
    step(
        1,
        total,
        &format!("starting a local cluster in {} (3_node MDM cluster, 4 SDSs, SDC on loopback)", dir.display()),
    );
    let args = UpArgs {
        mdm: Some(3),
        dir: dir.to_path_buf(),
        sds: Some(4),
        device_size: "1GiB".into(),
        ip: "127.0.0.1".into(),
        base_port: free_port_base(),
        detach: true,
        plugin_socket: dir.join("tessera-plugin.sock"),
    };
    let cfg = local::up(&args).await?;
    let control = ControlClient::new(cfg.mdm.clone(), cfg.secret()?);

    step(2, total, &format!("creating thin volume {DEMO_VOLUME} (256 MiB) and mapping it to {}", local::LOCAL_SDC));
    control
        .execute(Command::CreateVolume {
            name: DEMO_VOLUME.into(),
            pool: local::LOCAL_POOL.into(),
            size_bytes: 256 << 20,
            thin: true,
            allow_multi_map: false,
        })
        .await?;
    control
        .execute(Command::MapVolume {
            volume: DEMO_VOLUME.into(),
            sdc: local::LOCAL_SDC.into(),
            allow_multi_map: false,
        })
        .await?;
    let uri = format!("nbd+unix:///{DEMO_VOLUME}?socket={}", dir.join(format!("{}.sock", local::LOCAL_SDC)).display());
    eprintln!("      NBD URI: {uri}");

    step(3, total, &format!("writing {DEMO_DATA_MIB} MiB of random data through nbdcopy"));
    let data = dir.join("data.bin");
    let mut bytes = vec![0u8; DEMO_DATA_MIB << 20];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    std::fs::write(&data, &bytes)?;
    run(Process::new("nbdcopy").arg("--progress").arg("--flush").arg(&data).arg(&uri))?;

    step(4, total, "reading it back through nbdcopy and comparing");
    let back = dir.join("back.bin");
    read_back_and_compare(&uri, &back, &bytes)?;
    verify_copies(&control, &cfg).await?;

    let primary = control.status().await?.leader_id.unwrap_or(1);
    step(5, total, &format!("losing a node: SIGKILL to sds-2 and to the MDM primary, mdm-{primary}"));
    for role in ["sds-2".to_string(), format!("mdm-{primary}")] {
        let victim = std::fs::read_to_string(dir.join(format!("{role}.pid")))?.trim().parse::<i32>()?;
        // Safety: plain kill(2) on a pid read from our own pid file.
        unsafe { libc::kill(victim, libc::SIGKILL) };
    }

    step(6, total, "reading while the cluster re-mirrors sds-2's copies from every other SDS");
    read_back_and_compare(&uri, &back, &bytes)?;
    wait_for_rebuild(&control).await?;

    step(7, total, "verifying that both copies of every written extent are identical again");
    verify_copies(&control, &cfg).await?;

    let s = control.status().await?;
    eprintln!(
        "      MDM cluster: {} (mode {}), primary now mdm-{}",
        s.mdm.state,
        s.mdm.mode,
        s.leader_id.map_or("?".into(), |l| l.to_string())
    );
    step(8, total, "stopping every daemon and starting the cluster again (sds-2 returns and rejoins empty)");
    local::stop(dir).await?;
    let restart = UpArgs { sds: None, ..args };
    local::up(&restart).await?;

    step(9, total, "reading the volume after the restart and verifying both copies");
    read_back_and_compare(&uri, &back, &bytes)?;
    verify_copies(&control, &cfg).await?;
    eprintln!(
        "demo finished in {:.1} s: every acknowledged byte survived the loss of a node and a full restart",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn verify_copies(control: &ControlClient, cfg: &crate::config::ClientConfig) -> anyhow::Result<()> {
    let report = tessera_sdc::verify::verify_volume(control, &cfg.secret()?, DEMO_VOLUME).await?;
    if !report.mismatches.is_empty() {
        bail!("{} extent(s) differ between copies", report.mismatches.len());
    }
    eprintln!("      {} extents checked on both copies: identical", report.extents_checked);
    Ok(())
}

/// Waits until the loss is seen and every PG has two complete copies again, printing progress.
async fn wait_for_rebuild(control: &ControlClient) -> anyhow::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    let mut seen_loss = false;
    loop {
        let s = control.status().await?;
        let healthy = s.pgs.healthy_pgs == s.pgs.total_pgs && s.rebuild.pgs_rebuilding == 0;
        let declared = s.sdss.iter().any(|x| x.name == "sds-2" && x.membership == "removed");
        if declared && !seen_loss {
            seen_loss = true;
            eprintln!(
                "      sds-2 declared down: {} PGs degraded, {} re-mirroring",
                s.pgs.degraded_pgs, s.rebuild.pgs_rebuilding
            );
        }
        if seen_loss && healthy {
            eprintln!("      rebuilt: all {} PGs have two complete copies on the 3 surviving SDSs", s.pgs.total_pgs);
            return Ok(());
        }
        if seen_loss {
            eprintln!(
                "      {} PGs re-mirroring, {}/s",
                s.rebuild.pgs_rebuilding,
                tessera_core::units::format_size(s.rebuild.rate_bytes_per_sec)
            );
        }
        if Instant::now() > deadline {
            bail!("the cluster did not return to two copies within two minutes");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn read_back_and_compare(uri: &str, back: &Path, expected: &[u8]) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(back);
    run(Process::new("nbdcopy").arg(uri).arg("--").arg(back).env("LIBNBD_DEBUG", "0"))?;
    let got = std::fs::read(back)?;
    if got.len() < expected.len() || got[..expected.len()] != *expected {
        bail!("data read back differs from data written");
    }
    if got[expected.len()..].iter().any(|&b| b != 0) {
        bail!("unwritten part of the volume does not read as zeros");
    }
    eprintln!("      {} MiB read back, identical; the rest of the volume reads as zeros", expected.len() >> 20);
    Ok(())
}
