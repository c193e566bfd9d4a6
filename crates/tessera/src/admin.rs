//! Admin commands: each turns into one MDM command or query and prints a table or JSON.

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use tessera_core::units::{format_size, parse_size_bytes};
use tessera_core::{ClusterState, Command};
use tessera_proto::control::{ControlClient, ControlRequest, ControlResponse, MdmClusterStatus};

use crate::cli::*;
use crate::config::ClientConfig;
use crate::table;

pub struct Admin {
    pub control: ControlClient,
    pub config: ClientConfig,
    pub json: bool,
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

impl Admin {
    pub fn new(config: ClientConfig, json: bool) -> anyhow::Result<Admin> {
        let control = ControlClient::new(config.mdm.clone(), config.secret()?);
        Ok(Admin { control, config, json })
    }

    async fn state(&self) -> anyhow::Result<ClusterState> {
        Ok(self.control.state().await?.state)
    }

    async fn exec(&self, cmd: Command, what: &str) -> anyhow::Result<()> {
        let applied = self.control.execute(cmd).await?;
        if self.json {
            print_json(&json!({ "id": applied.id, "result": what }))
        } else {
            println!("{what} (id {})", applied.id);
            Ok(())
        }
    }

    pub async fn cluster(&self, cmd: ClusterCmd) -> anyhow::Result<()> {
        match cmd {
            ClusterCmd::Status { watch } => loop {
                let s = self.control.status().await?;
                if self.json {
                    return print_json(&s);
                }
                if watch {
                    // Clear the screen and redraw from the top.
                    print!("\x1b[2J\x1b[H");
                }
                print_mdm_cluster(&s.mdm);
                println!();
                print_sds_table(&s.sdss);
                println!();
                println!(
                    "PGs: {} total, {} healthy, {} degraded, {} unavailable, {} unplaced; {} volume(s), {} SDC(s)",
                    s.pgs.total_pgs,
                    s.pgs.healthy_pgs,
                    s.pgs.degraded_pgs,
                    s.pgs.unavailable_pgs,
                    s.pgs.unplaced_pgs,
                    s.volumes,
                    s.sdcs
                );
                print_rebuild(&s.rebuild);
                if !watch || s.rebuild.pgs_rebuilding == 0 {
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            },
            ClusterCmd::JoinToken => {
                println!("{}", self.config.join_token());
                Ok(())
            }
            ClusterCmd::SwitchMode { mode, managers, tiebreakers } => {
                let req = ControlRequest::SwitchClusterMode { mode: mode.clone(), managers, tiebreakers };
                self.membership_change(req, &format!("switched the MDM cluster to {mode}")).await
            }
        }
    }

    async fn membership_change(&self, req: ControlRequest, what: &str) -> anyhow::Result<()> {
        match self.control.request(&req).await? {
            ControlResponse::Members(m) => {
                if self.json {
                    return print_json(&m);
                }
                println!("{what}");
                print_mdm_cluster(&m);
                Ok(())
            }
            other => bail!("unexpected answer from the MDM: {other:?}"),
        }
    }

    pub async fn mdm(&self, cmd: MdmCmd) -> anyhow::Result<()> {
        match cmd {
            MdmCmd::List => {
                let s = self.control.status().await?;
                if self.json {
                    return print_json(&s.mdm);
                }
                print_mdm_cluster(&s.mdm);
                Ok(())
            }
            MdmCmd::Add { address, id } => {
                let req = ControlRequest::AddMdm { address: address.clone(), expect_id: id };
                self.membership_change(req, &format!("added the MDM at {address} as a standby")).await
            }
            MdmCmd::Remove { id } => {
                self.membership_change(ControlRequest::RemoveMdm { id }, &format!("removed MDM {id}")).await
            }
        }
    }

    pub async fn pd(&self, cmd: PdCmd) -> anyhow::Result<()> {
        match cmd {
            PdCmd::Create { name } => {
                self.exec(
                    Command::CreateProtectionDomain { name: name.clone() },
                    &format!("created protection domain {name}"),
                )
                .await
            }
            PdCmd::Remove { name } => {
                self.exec(
                    Command::RemoveProtectionDomain { name: name.clone() },
                    &format!("removed protection domain {name}"),
                )
                .await
            }
            PdCmd::List => {
                let s = self.state().await?;
                if self.json {
                    return print_json(&s.protection_domains.values().collect::<Vec<_>>());
                }
                table::print(
                    &["name", "id", "pools", "sdss", "fault_sets"],
                    s.protection_domains
                        .values()
                        .map(|pd| {
                            vec![
                                pd.name.clone(),
                                pd.id.to_string(),
                                s.pools.values().filter(|p| p.pd_id == pd.id).count().to_string(),
                                s.sdss.values().filter(|x| x.pd_id == pd.id).count().to_string(),
                                s.fault_sets.values().filter(|f| f.pd_id == pd.id).count().to_string(),
                            ]
                        })
                        .collect(),
                );
                Ok(())
            }
            PdCmd::Show { name } => {
                let s = self.state().await?;
                let pd = s.pd_by_name(&name).ok_or_else(|| anyhow!("protection domain {name:?} not found"))?;
                let pools: Vec<_> = s.pools.values().filter(|p| p.pd_id == pd.id).map(|p| p.name.clone()).collect();
                let sdss: Vec<_> = s.sdss.values().filter(|x| x.pd_id == pd.id).map(|x| x.name.clone()).collect();
                let fss: Vec<_> = s.fault_sets.values().filter(|f| f.pd_id == pd.id).map(|f| f.name.clone()).collect();
                let v = json!({"name": pd.name, "id": pd.id, "pools": pools, "sdss": sdss, "fault_sets": fss});
                print_json(&v)
            }
        }
    }

    pub async fn fault_set(&self, cmd: FaultSetCmd) -> anyhow::Result<()> {
        match cmd {
            FaultSetCmd::Create { pd, name } => {
                self.exec(Command::CreateFaultSet { pd, name: name.clone() }, &format!("created fault set {name}"))
                    .await
            }
            FaultSetCmd::Remove { pd, name } => {
                self.exec(Command::RemoveFaultSet { pd, name: name.clone() }, &format!("removed fault set {name}"))
                    .await
            }
            FaultSetCmd::List => {
                let s = self.state().await?;
                if self.json {
                    return print_json(&s.fault_sets.values().collect::<Vec<_>>());
                }
                table::print(
                    &["name", "id", "pd", "sdss"],
                    s.fault_sets
                        .values()
                        .map(|f| {
                            vec![
                                f.name.clone(),
                                f.id.to_string(),
                                s.protection_domains.get(&f.pd_id).map_or("?".into(), |p| p.name.clone()),
                                s.sdss.values().filter(|x| x.fault_set_id == Some(f.id)).count().to_string(),
                            ]
                        })
                        .collect(),
                );
                Ok(())
            }
        }
    }

    pub async fn pool(&self, cmd: PoolCmd) -> anyhow::Result<()> {
        match cmd {
            PoolCmd::Create { name, pd, extent_size, pg_count, spare_percent } => {
                let extent = parse_size_bytes(&extent_size).map_err(|e| anyhow!(e))?;
                let extent_size_bytes =
                    u32::try_from(extent).map_err(|_| anyhow!("extent size {extent_size} too large"))?;
                self.exec(
                    Command::CreatePool { pd, name: name.clone(), extent_size_bytes, pg_count, spare_percent },
                    &format!("created pool {name}"),
                )
                .await
            }
            PoolCmd::Remove { name } => {
                self.exec(Command::RemovePool { name: name.clone() }, &format!("removed pool {name}")).await
            }
            PoolCmd::SetSpare { name, spare_percent } => {
                self.exec(
                    Command::SetSparePercent { pool: name.clone(), spare_percent },
                    &format!("pool {name} spare set to {spare_percent}%"),
                )
                .await
            }
            PoolCmd::List => {
                let s = self.state().await?;
                if self.json {
                    let v: Vec<_> = s.pools.values().map(|p| pool_json(&s, p)).collect();
                    return print_json(&v);
                }
                table::print(
                    &["name", "id", "pd", "extent", "pgs", "spare", "devices", "raw", "volumes"],
                    s.pools
                        .values()
                        .map(|p| {
                            vec![
                                p.name.clone(),
                                p.id.to_string(),
                                s.protection_domains.get(&p.pd_id).map_or("?".into(), |x| x.name.clone()),
                                format_size(u64::from(p.extent_size_bytes)),
                                if p.pgs.is_empty() {
                                    format!("{} (unplaced)", p.pg_count)
                                } else {
                                    p.pg_count.to_string()
                                },
                                format!("{}%", p.spare_percent),
                                s.devices_of_pool(p.id).count().to_string(),
                                format_size(s.pool_raw_capacity_bytes(p.id)),
                                s.volumes_of_pool(p.id).count().to_string(),
                            ]
                        })
                        .collect(),
                );
                Ok(())
            }
            PoolCmd::Status { name } => {
                let s = self.control.status().await?;
                let p = s
                    .pools
                    .iter()
                    .find(|p| p.name == name)
                    .ok_or_else(|| anyhow!("storage pool {name:?} not found"))?;
                if self.json {
                    return print_json(p);
                }
                println!(
                    "pool {}: {} volume(s); raw {}, used {}, usable for thick volumes {} ({}% spare, at least the largest SDS or fault set), thick reserved {}",
                    p.name,
                    p.volumes,
                    format_size(p.raw_capacity_bytes),
                    format_size(p.used_bytes),
                    format_size(p.usable_capacity_bytes),
                    p.spare_percent,
                    format_size(p.thick_reserved_bytes)
                );
                println!(
                    "PGs: {} total, {} healthy, {} degraded, {} unavailable, {} unplaced, {} re-mirroring",
                    p.pgs.total_pgs,
                    p.pgs.healthy_pgs,
                    p.pgs.degraded_pgs,
                    p.pgs.unavailable_pgs,
                    p.pgs.unplaced_pgs,
                    p.pgs_rebuilding
                );
                if p.pgs_rebuilding > 0 {
                    print_rebuild(&s.rebuild);
                }
                Ok(())
            }
            PoolCmd::Show { name } => {
                let s = self.state().await?;
                let p = s.pool_by_name(&name).ok_or_else(|| anyhow!("storage pool {name:?} not found"))?;
                print_json(&pool_json(&s, p))
            }
        }
    }

    pub async fn sds(&self, cmd: SdsCmd) -> anyhow::Result<()> {
        match cmd {
            SdsCmd::Add { name, pd, address, fault_set } => {
                self.exec(
                    Command::AddSds { name: name.clone(), pd, fault_set, data_address: address },
                    &format!("added SDS {name}"),
                )
                .await
            }
            SdsCmd::Remove { name } => {
                self.exec(Command::RemoveSds { name: name.clone() }, &format!("removed SDS {name}")).await
            }
            SdsCmd::Drain { name } => {
                let what = format!("draining SDS {name}; `tessera cluster status` shows progress");
                self.exec(Command::DrainSds { name }, &what).await
            }
            SdsCmd::List => {
                let st = self.control.status().await?;
                if self.json {
                    return print_json(&st.sdss);
                }
                print_sds_table(&st.sdss);
                Ok(())
            }
            SdsCmd::Show { name } => {
                let s = self.state().await?;
                let x = s.sds_by_name(&name).ok_or_else(|| anyhow!("SDS {name:?} not found"))?;
                let devices: Vec<_> = s.devices_of_sds(x.id).collect();
                print_json(&json!({"sds": x, "devices": devices}))
            }
        }
    }

    pub async fn device(&self, cmd: DeviceCmd) -> anyhow::Result<()> {
        match cmd {
            DeviceCmd::Add { sds, pool, path } => {
                self.exec(
                    Command::AddDevice { sds: sds.clone(), pool, path: path.clone() },
                    &format!("added device {path} to SDS {sds}"),
                )
                .await
            }
            DeviceCmd::Drain { sds, path } => {
                self.exec(
                    Command::DrainDevice { sds: sds.clone(), path: path.clone() },
                    &format!("draining device {path} of SDS {sds}"),
                )
                .await
            }
            DeviceCmd::Remove { sds, path } => {
                self.exec(
                    Command::RemoveDevice { sds: sds.clone(), path: path.clone() },
                    &format!("removed device {path} from SDS {sds}"),
                )
                .await
            }
            DeviceCmd::List => {
                let s = self.state().await?;
                // Each device with its node, SDS, protection domain, pool and fault set by name.
                let rows: Vec<serde_json::Value> = s
                    .devices
                    .values()
                    .map(|d| {
                        let sds = s.sdss.get(&d.sds_id);
                        let pool = s.pools.get(&d.pool_id);
                        json!({
                            "id": d.id,
                            "node": sds.and_then(|x| tessera_core::deploy::split_sds_name(&x.name)).map(|(n, _)| n),
                            "sds": sds.map(|x| &x.name),
                            "sds_id": d.sds_id,
                            "path": d.path,
                            "stable_path": d.stable_path,
                            "protection_domain": pool.and_then(|p| s.protection_domains.get(&p.pd_id)).map(|p| &p.name),
                            "pool": pool.map(|p| &p.name),
                            "pool_id": d.pool_id,
                            "fault_set": sds.and_then(|x| x.fault_set_id).and_then(|f| s.fault_sets.get(&f)).map(|f| &f.name),
                            "state": d.state,
                            "capacity_bytes": d.capacity_bytes,
                        })
                    })
                    .collect();
                if self.json {
                    return print_json(&rows);
                }
                table::print(
                    &["id", "node", "sds", "domain", "pool", "path", "state", "capacity"],
                    rows.iter()
                        .zip(s.devices.values())
                        .map(|(r, d)| {
                            let text = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                            vec![
                                d.id.to_string(),
                                text("node"),
                                text("sds"),
                                text("protection_domain"),
                                text("pool"),
                                // The stable name follows the disk across boots; the
                                // path is where the SDS last found it.
                                match &d.stable_path {
                                    Some(stable) => format!("{} ({stable})", d.path),
                                    None => d.path.clone(),
                                },
                                format!("{:?}", d.state).to_lowercase(),
                                format_size(d.capacity_bytes),
                            ]
                        })
                        .collect(),
                );
                Ok(())
            }
        }
    }

    fn default_sdc(&self, s: &ClusterState, named: Option<String>) -> anyhow::Result<String> {
        if let Some(n) = named.or_else(|| self.config.sdc.clone()) {
            return Ok(n);
        }
        match s.sdcs.values().collect::<Vec<_>>().as_slice() {
            [one] => Ok(one.name.clone()),
            [] => bail!("no SDC is registered"),
            _ => bail!("several SDCs are registered; name one with --sdc"),
        }
    }

    pub async fn volume(&self, cmd: VolumeCmd) -> anyhow::Result<()> {
        match cmd {
            VolumeCmd::Create { name, size, pool, thick, allow_multi_map } => {
                let size_bytes = parse_size_bytes(&size).map_err(|e| anyhow!(e))?;
                let pool = match pool {
                    Some(p) => p,
                    None => {
                        let s = self.state().await?;
                        match s.pools.values().collect::<Vec<_>>().as_slice() {
                            [one] => one.name.clone(),
                            [] => bail!("no storage pool exists; create one first"),
                            _ => bail!("several pools exist; name one with --pool"),
                        }
                    }
                };
                self.exec(
                    Command::CreateVolume { name: name.clone(), pool, size_bytes, thin: !thick, allow_multi_map },
                    &format!("created volume {name} ({})", format_size(size_bytes)),
                )
                .await
            }
            VolumeCmd::Remove { name } => {
                self.exec(Command::RemoveVolume { name: name.clone() }, &format!("removed volume {name}")).await
            }
            VolumeCmd::Grow { name, size } => {
                let size_bytes = parse_size_bytes(&size).map_err(|e| anyhow!(e))?;
                self.exec(
                    Command::ResizeVolume { name: name.clone(), size_bytes },
                    &format!("volume {name} is now {}", format_size(size_bytes)),
                )
                .await
            }
            VolumeCmd::Map { name, sdc, allow_multi_map, preempt } => {
                let s = self.state().await?;
                let sdc = self.default_sdc(&s, sdc)?;
                let cmd = if preempt {
                    Command::TakeOverVolume { volume: name.clone(), sdc: sdc.clone() }
                } else {
                    Command::MapVolume { volume: name.clone(), sdc: sdc.clone(), allow_multi_map }
                };
                self.control.execute(cmd).await?;
                let s = self.state().await?;
                let x = s.sdc_by_name(&sdc).ok_or_else(|| anyhow!("SDC {sdc:?} vanished"))?;
                let uri = format!("nbd+unix:///{name}?socket={}", x.nbd_socket);
                if self.json {
                    return print_json(&json!({"volume": name, "sdc": sdc, "uri": uri}));
                }
                println!("{uri}");
                Ok(())
            }
            VolumeCmd::Unmap { name, sdc } => {
                let s = self.state().await?;
                let sdc = self.default_sdc(&s, sdc)?;
                self.exec(
                    Command::UnmapVolume { volume: name.clone(), sdc: sdc.clone() },
                    &format!("unmapped volume {name} from SDC {sdc}"),
                )
                .await
            }
            VolumeCmd::List => {
                let s = self.state().await?;
                if self.json {
                    return print_json(&s.volumes.values().collect::<Vec<_>>());
                }
                table::print(
                    &["name", "id", "pool", "size", "type", "mapped_to"],
                    s.volumes
                        .values()
                        .map(|v| {
                            let sdcs: Vec<String> =
                                v.mapped_sdcs.iter().filter_map(|id| s.sdcs.get(id).map(|c| c.name.clone())).collect();
                            vec![
                                v.name.clone(),
                                v.id.to_string(),
                                s.pools.get(&v.pool_id).map_or("?".into(), |p| p.name.clone()),
                                format_size(v.size_bytes),
                                if v.thin { "thin" } else { "thick" }.into(),
                                sdcs.join(","),
                            ]
                        })
                        .collect(),
                );
                Ok(())
            }
            VolumeCmd::Show { name } => {
                let s = self.state().await?;
                let v = s.volume_by_name(&name).ok_or_else(|| anyhow!("volume {name:?} not found"))?;
                print_json(v)
            }
            VolumeCmd::SetQos { name, iops, bandwidth, unlimited } => {
                if !unlimited && iops.is_none() && bandwidth.is_none() {
                    bail!("give --iops, --bandwidth or --unlimited");
                }
                // Parsed before asking the MDM, so a typo never changes anything.
                let iops = iops.as_deref().map(parse_iops_limit).transpose()?;
                let bandwidth = bandwidth.as_deref().map(parse_bandwidth_limit).transpose()?;
                let s = self.state().await?;
                let current = s.volume_by_name(&name).ok_or_else(|| anyhow!("volume {name:?} not found"))?.qos.clone();
                let (iops_limit, bandwidth_limit_bytes_per_sec) = if unlimited {
                    (None, None)
                } else {
                    (iops.unwrap_or(current.iops_limit), bandwidth.unwrap_or(current.bandwidth_limit_bytes_per_sec))
                };
                let qos = tessera_core::VolumeQos { iops_limit, bandwidth_limit_bytes_per_sec };
                self.exec(
                    Command::SetVolumeQos { name: name.clone(), iops_limit, bandwidth_limit_bytes_per_sec },
                    &format!("volume {name} limits: {}", describe_qos(&qos)),
                )
                .await
            }
            VolumeCmd::Verify { name } => {
                let report = tessera_sdc::verify::verify_volume(&self.control, &self.config.secret()?, &name)
                    .await
                    .with_context(|| format!("verifying {name}"))?;
                if self.json {
                    print_json(&report)?;
                } else if report.mismatches.is_empty() {
                    println!(
                        "volume {name}: {} allocated extent(s) checked, both copies identical",
                        report.extents_checked
                    );
                    if report.extents_with_one_copy > 0 {
                        println!(
                            "volume {name}: {} of them have a single complete copy right now (degraded or rebuilding)",
                            report.extents_with_one_copy
                        );
                    }
                } else {
                    for m in &report.mismatches {
                        let copies: Vec<String> = m
                            .copies
                            .iter()
                            .map(|c| {
                                format!(
                                    "sds {}: {}",
                                    c.sds_id,
                                    c.crc32c.map_or("unreadable".into(), |x| format!("{x:08x}"))
                                )
                            })
                            .collect();
                        println!("extent {} (pg {}): copies differ: {}", m.extent_index, m.pg_id, copies.join(", "));
                    }
                }
                if !report.mismatches.is_empty() {
                    bail!(
                        "volume {name}: {} of {} extent(s) differ between copies",
                        report.mismatches.len(),
                        report.extents_checked
                    );
                }
                Ok(())
            }
            VolumeCmd::Mount { .. }
            | VolumeCmd::Unmount { .. }
            | VolumeCmd::Path { .. }
            | VolumeCmd::Attach { .. }
            | VolumeCmd::Detach { .. }
            | VolumeCmd::Refs => bail!("this verb acts on this node and is served by the volume service"),
        }
    }

    pub async fn sdc(&self, cmd: SdcCmd) -> anyhow::Result<()> {
        match cmd {
            SdcCmd::Remove { name } => {
                self.exec(Command::RemoveSdc { name: name.clone() }, &format!("removed SDC {name}")).await
            }
            SdcCmd::List => {
                let s = self.state().await?;
                if self.json {
                    return print_json(&s.sdcs.values().collect::<Vec<_>>());
                }
                table::print(
                    &["name", "id", "nbd_socket", "mapped_volumes"],
                    s.sdcs
                        .values()
                        .map(|c| {
                            vec![
                                c.name.clone(),
                                c.id.to_string(),
                                c.nbd_socket.clone(),
                                s.volumes.values().filter(|v| v.mapped_sdcs.contains(&c.id)).count().to_string(),
                            ]
                        })
                        .collect(),
                );
                Ok(())
            }
        }
    }
}

/// `--iops N`: `Some(n)`, or `None` (no limit) for 0.
fn parse_iops_limit(text: &str) -> anyhow::Result<Option<u64>> {
    let n: u64 = text.trim().parse().map_err(|_| {
        anyhow!("invalid IOPS limit {text:?}: expected a whole number of requests per second (0 for no limit)")
    })?;
    Ok((n > 0).then_some(n))
}

/// `--bandwidth SIZE[/s]`: `Some(bytes per second)`, or `None` (no limit) for 0.
fn parse_bandwidth_limit(text: &str) -> anyhow::Result<Option<u64>> {
    let size = text.trim();
    let size = size.strip_suffix("/s").or_else(|| size.strip_suffix("/S")).unwrap_or(size);
    let bytes = parse_size_bytes(size)
        .map_err(|e| anyhow!("invalid bandwidth limit {text:?} (expected e.g. 10MiB/s, 0 for no limit): {e}"))?;
    Ok((bytes > 0).then_some(bytes))
}

fn describe_qos(qos: &tessera_core::VolumeQos) -> String {
    let iops = qos.iops_limit.map_or("unlimited IOPS".into(), |n| format!("{n} IOPS"));
    let bandwidth =
        qos.bandwidth_limit_bytes_per_sec.map_or("unlimited bandwidth".into(), |b| format!("{}/s", format_size(b)));
    format!("{iops}, {bandwidth}")
}

/// Rebuild progress: a bar when stdout is a terminal, one plain line otherwise.
fn print_rebuild(r: &tessera_proto::control::RebuildStatus) {
    use std::io::IsTerminal;
    if r.pgs_rebuilding == 0 {
        return;
    }
    let total = r.pgs_in_episode.max(r.pgs_rebuilding);
    let done = total - r.pgs_rebuilding;
    let eta = r.eta_seconds.map_or("unknown".into(), |e| format!("{e} s"));
    let rate = format_size(r.rate_bytes_per_sec);
    if std::io::stdout().is_terminal() {
        const WIDTH: u64 = 30;
        let filled = (done * WIDTH / total.max(1)) as usize;
        println!(
            "Rebuild [{}{}] {done}/{total} PGs, {rate}/s, ETA {eta}",
            "#".repeat(filled),
            "-".repeat(WIDTH as usize - filled)
        );
    } else {
        println!("Rebuild: {} PG(s) re-mirroring ({done} of {total} done), {rate}/s, ETA {eta}", r.pgs_rebuilding);
    }
}

fn print_mdm_cluster(m: &MdmClusterStatus) {
    println!(
        "MDM cluster: mode {}, state {}, {}/{} voters reachable, primary {}",
        m.mode,
        m.state,
        m.voters_reachable,
        m.voters,
        m.leader_id.map_or("none".into(), |l| l.to_string())
    );
    table::print(
        &["id", "address", "role", "status", "reachable", "log_index"],
        m.members
            .iter()
            .map(|x| {
                vec![
                    x.id.to_string(),
                    x.address.clone(),
                    x.role.clone(),
                    x.status.clone(),
                    if x.reachable { "yes" } else { "no" }.to_string(),
                    x.matched_index.map_or("-".into(), |i| i.to_string()),
                ]
            })
            .collect(),
    );
}

fn print_sds_table(sdss: &[tessera_proto::control::SdsStatus]) {
    table::print(
        &["sds", "id", "address", "state", "membership", "devices", "capacity", "used"],
        sdss.iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    d.id.to_string(),
                    d.address.clone(),
                    d.state.clone(),
                    d.membership.clone(),
                    d.devices.to_string(),
                    format_size(d.capacity_bytes),
                    format_size(d.used_bytes),
                ]
            })
            .collect(),
    );
}

fn pool_json(s: &ClusterState, p: &tessera_core::StoragePool) -> serde_json::Value {
    json!({
        "name": p.name,
        "id": p.id,
        "pd": s.protection_domains.get(&p.pd_id).map(|x| x.name.clone()),
        "extent_size_bytes": p.extent_size_bytes,
        "pg_count": p.pg_count,
        "placed": !p.pgs.is_empty(),
        "spare_percent": p.spare_percent,
        "raw_capacity_bytes": s.pool_raw_capacity_bytes(p.id),
        "usable_thick_capacity_bytes": s.pool_usable_capacity_bytes(p),
        "thick_reserved_bytes": s.pool_thick_reserved_bytes(p.id),
        "devices": s.devices_of_pool(p.id).count(),
        "volumes": s.volumes_of_pool(p.id).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::units::MIB;

    #[test]
    fn qos_limits_parse_and_zero_clears() {
        assert_eq!(parse_iops_limit("300").unwrap(), Some(300));
        assert_eq!(parse_iops_limit("0").unwrap(), None);
        assert!(parse_iops_limit("fast").unwrap_err().to_string().contains("invalid IOPS limit"));
        assert!(parse_iops_limit("-5").is_err());
        assert_eq!(parse_bandwidth_limit("10MiB").unwrap(), Some(10 * MIB));
        assert_eq!(parse_bandwidth_limit("8MiB/s").unwrap(), Some(8 * MIB));
        assert_eq!(parse_bandwidth_limit("0").unwrap(), None);
        assert!(parse_bandwidth_limit("lots").unwrap_err().to_string().contains("invalid bandwidth limit"));
        assert_eq!(
            describe_qos(&tessera_core::VolumeQos { iops_limit: Some(300), bandwidth_limit_bytes_per_sec: None }),
            "300 IOPS, unlimited bandwidth"
        );
    }
}
