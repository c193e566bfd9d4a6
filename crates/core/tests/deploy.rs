//! The deployment planner on reported nodes: the seed's imperative examples, the single
//! global pool, fault sets, declarative specs, MDM placement, and convergence (applying
//! the diff leaves nothing to do).

use tessera_core::deploy::attributes::Persona;
use tessera_core::deploy::plan::{diff, plan_layout, Change, Method};
use tessera_core::deploy::spec::DeploySpec;
use tessera_core::deploy::{sds_name, Disk, DiskUsage, Media, Node, PoolRef};
use tessera_core::{ClusterState, Command};

const GIB: u64 = 1 << 30;

fn disk(path: &str, usage: DiskUsage) -> Disk {
    Disk { path: path.into(), size_bytes: 10 * GIB, media: Media::Ssd, usage }
}

fn node(name: &str, n: u32, attributes: &[(&str, &str)], disks: Vec<Disk>) -> Node {
    Node {
        name: name.into(),
        hostname: format!("{name}.example"),
        address: format!("127.0.0.{}", 10 + n),
        attributes: attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        disks,
        global_pool: Some(PoolRef { domain: "default".into(), pool: "default".into() }),
        removing: false,
        errors: Vec::new(),
        mdm_id: None,
        mdm_port: None,
    }
}

fn report(state: &mut ClusterState, node: Node) {
    state.apply(&Command::ReportNode { node }).expect("report accepted");
}

/// Carries out changes the way agents do, with the drain already finished.
fn converge(state: &mut ClusterState) -> Vec<Change> {
    let mut all = Vec::new();
    for _round in 0..5 {
        let changes = diff(state, &plan_layout(state));
        if changes.is_empty() {
            return all;
        }
        for c in &changes {
            let cmds = match c.clone() {
                Change::CreateDomain { domain } => vec![Command::CreateProtectionDomain { name: domain }],
                Change::CreateFaultSet { domain, fault_set } => {
                    vec![Command::CreateFaultSet { pd: domain, name: fault_set }]
                }
                Change::CreatePool { domain, pool, spare_percent } => vec![Command::CreatePool {
                    pd: domain,
                    name: pool,
                    extent_size_bytes: 1 << 20,
                    pg_count: 64,
                    spare_percent,
                }],
                Change::AddSds { node, sds, domain, fault_set } => {
                    let address = format!("{}:{}", state.nodes[&node].address, 7000 + state.sdss.len());
                    vec![Command::AddSds { name: sds, pd: domain, fault_set, data_address: address }]
                }
                Change::AddDevice { sds, path, pool, .. } => vec![Command::AddDevice { sds, pool, path }],
                Change::MoveDevice { from_sds, sds, path, to_pool, .. } => {
                    vec![
                        Command::RemoveDevice { sds: from_sds, path: path.clone() },
                        Command::AddDevice { sds, pool: to_pool, path },
                    ]
                }
                Change::RemoveDevice { sds, path, .. } => vec![Command::RemoveDevice { sds, path }],
                Change::RemoveSds { sds, .. } => vec![Command::RemoveSds { name: sds }],
                Change::ForgetNode { node } => vec![Command::ForgetNode { name: node }],
            };
            for cmd in cmds {
                let id = state.apply(&cmd).unwrap_or_else(|e| panic!("{c}: {cmd:?} refused: {e}")).id;
                if matches!(cmd, Command::AddDevice { .. }) {
                    state.apply(&Command::DeviceReady { device_id: id, capacity_bytes: 10 * GIB }).unwrap();
                }
            }
        }
        all.extend(changes);
    }
    panic!("no convergence after 5 rounds: {:?}", diff(state, &plan_layout(state)));
}

/// (node, domain, pool, path) of every device, sorted.
fn devices(state: &ClusterState) -> Vec<(String, String, String, String)> {
    let mut out: Vec<_> = state
        .devices
        .values()
        .map(|d| {
            let sds = &state.sdss[&d.sds_id];
            let pool = &state.pools[&d.pool_id];
            let pd = &state.protection_domains[&pool.pd_id];
            let node = sds.name.split_once('.').unwrap().0.to_string();
            (node, pd.name.clone(), pool.name.clone(), d.path.clone())
        })
        .collect();
    out.sort();
    out
}

fn seed_attrs(domain: &str, pool: &str) -> Vec<(String, String)> {
    vec![
        ("scaleio-sds-domains".into(), format!("{domain}\n")),
        (format!("scaleio-sds-{domain}"), pool.into()),
        (format!("scaleio-sds-{pool}"), "/dev/xvdf".into()),
    ]
}

#[test]
fn seed_example_sixteen_nodes_mydomain_mypool() {
    let mut s = ClusterState::default();
    for n in 1..=16 {
        let attrs = [
            ("scaleio-sds-domains", "mydomain"),
            ("scaleio-sds-mydomain", "mypool"),
            ("scaleio-sds-mypool", "/dev/xvdf"),
            ("scaleio-sdc-domains", "mydomain"),
            ("scaleio-sdc-mydomain", "mypool"),
        ];
        let disks = vec![disk("/dev/xvdf", DiskUsage::Unused), disk("/dev/xvdg", DiskUsage::Unused)];
        report(&mut s, node(&format!("agent{n}"), n, &attrs, disks));
    }
    let layout = plan_layout(&s);
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);
    assert!(layout.nodes.values().all(|p| p.method == Method::Imperative));
    assert_eq!(layout.nodes["agent3"].consumes, vec![PoolRef { domain: "mydomain".into(), pool: "mypool".into() }]);
    converge(&mut s);
    let want: Vec<_> = (1..=16)
        .map(|n| (format!("agent{n}"), "mydomain".to_string(), "mypool".to_string(), "/dev/xvdf".to_string()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(devices(&s), want, "only /dev/xvdf, never the unlisted /dev/xvdg");
    assert_eq!(s.protection_domains.len(), 1);
    assert_eq!(s.pools.len(), 1);
    assert_eq!(s.pool_by_name("mypool").unwrap().pgs.len(), 64, "placed across the 16 SDSs");
}

#[test]
fn seed_example_engineering_qe_and_development() {
    let mut s = ClusterState::default();
    for n in 1..=16u32 {
        let pool = if n <= 8 { "qe" } else { "development" };
        let attrs = seed_attrs("engineering", pool);
        let attrs: Vec<(&str, &str)> = attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        report(&mut s, node(&format!("agent{n}"), n, &attrs, vec![disk("/dev/xvdf", DiskUsage::Unused)]));
    }
    converge(&mut s);
    let d = devices(&s);
    assert_eq!(d.len(), 16);
    for (node, pd, pool, path) in &d {
        let n: u32 = node.trim_start_matches("agent").parse().unwrap();
        assert_eq!(
            (pd.as_str(), pool.as_str(), path.as_str()),
            ("engineering", if n <= 8 { "qe" } else { "development" }, "/dev/xvdf")
        );
    }
    assert_eq!(s.protection_domains.len(), 1);
    assert_eq!(s.sdss.len(), 16, "one SDS per node in its one domain");
}

#[test]
fn bad_attributes_name_node_attribute_and_value_and_change_nothing() {
    // (attributes, the attribute the error must name, what it must say)
    type Case = (Vec<(&'static str, &'static str)>, &'static str, &'static str);
    let cases: Vec<Case> = vec![
        (
            vec![("scaleio-sds-domains", "pd1"), ("scaleio-sds-pd1", "p1"), ("scaleio-sds-p1", "/dev/xvdz")],
            "scaleio-sds-p1",
            "was not found",
        ),
        (
            vec![("scaleio-sds-domains", "pd1"), ("scaleio-sds-pd1", "p1"), ("scaleio-sds-p1", "/dev/ext4disk")],
            "scaleio-sds-p1",
            "in use: holds an ext4 filesystem",
        ),
        (
            vec![
                ("scaleio-sds-domains", "pd1"),
                ("scaleio-sds-pd1", "p1,p2"),
                ("scaleio-sds-p1", "/dev/xvdf"),
                ("scaleio-sds-p2", " /dev/xvdf"),
            ],
            "scaleio-sds-p2",
            "also listed",
        ),
        (
            vec![("scaleio-sds-domains", "pd1"), ("scaleio-sds-pd1", "p1"), ("scaleio-sds-p1", "/dev/xvdf,/dev/xvdf")],
            "scaleio-sds-p1",
            "listed twice",
        ),
        (
            vec![("scaleio-sds-domains", "pd1"), ("scaleio-sds-pd1", "p1"), ("scaleio-sds-p1", "/dev/xvdf,")],
            "scaleio-sds-p1",
            "empty item",
        ),
        (
            vec![("scaleio-sds-domains", "pd1"), ("scaleio-sds-pd1", "p1")],
            "scaleio-sds-pd1",
            "pool p1 has no device list",
        ),
        (
            vec![
                ("scaleio-sds-domains", "pd1"),
                ("scaleio-sds-pd1", "p1"),
                ("scaleio-sds-p1", "/dev/xvdf"),
                ("scaleio-sds-pd11", "x"),
            ],
            "scaleio-sds-pd11",
            "no domain or pool list refers",
        ),
        (vec![("scaleio-sds-domains", "bad name")], "scaleio-sds-domains", "invalid name"),
        (vec![("scaleio-sds-domains", "pd1"), ("tessera-sds-domains", "pd2")], "tessera-sds-domains", "disagrees"),
        (vec![("scaleio-persona", "boss")], "scaleio-persona", "primary, secondary or tiebreaker"),
        (vec![("tessera-faultset", "rack 1")], "tessera-faultset", "invalid name"),
    ];
    for (attrs, attribute, message) in cases {
        let mut s = ClusterState::default();
        let disks = vec![
            disk("/dev/xvdf", DiskUsage::Unused),
            disk("/dev/ext4disk", DiskUsage::InUse { reason: "holds an ext4 filesystem".into() }),
        ];
        report(&mut s, node("n1", 1, &attrs, disks));
        let layout = plan_layout(&s);
        let p = layout
            .problems
            .iter()
            .find(|p| p.attribute.as_deref() == Some(attribute))
            .unwrap_or_else(|| panic!("{attrs:?}: {:?}", layout.problems));
        let text = p.to_string();
        assert!(text.starts_with(&format!("node n1: attribute {attribute} = ")), "{text}");
        assert!(text.contains(message), "{attrs:?}: {text}");
        assert!(layout.blocked_nodes.contains("n1"));
        assert!(diff(&s, &layout).is_empty(), "a node with bad attributes changes nothing");
    }
}

#[test]
fn both_prefixes_accepted_and_sdc_only_node_contributes_nothing() {
    let mut s = ClusterState::default();
    let t = [
        ("tessera-sds-domains", " pd1 , pd2"),
        ("tessera-sds-pd1", "a"),
        ("tessera-sds-pd2", "b"),
        ("tessera-sds-a", "/dev/xvdf"),
        ("scaleio-sds-b", "/dev/xvdg"),
    ];
    report(&mut s, node("n1", 1, &t, vec![disk("/dev/xvdf", DiskUsage::Unused), disk("/dev/xvdg", DiskUsage::Unused)]));
    report(
        &mut s,
        node(
            "n2",
            2,
            &[("scaleio-sdc-domains", "pd1"), ("scaleio-sdc-pd1", "a")],
            vec![disk("/dev/xvdf", DiskUsage::Unused)],
        ),
    );
    converge(&mut s);
    assert_eq!(
        devices(&s),
        vec![
            ("n1".into(), "pd1".into(), "a".into(), "/dev/xvdf".into()),
            ("n1".into(), "pd2".into(), "b".into(), "/dev/xvdg".into())
        ]
    );
    assert!(s.sds_by_name(&sds_name("n1", "pd1")).is_some() && s.sds_by_name("n1.pd2").is_some(), "an SDS per domain");
    assert!(s.sdss.values().all(|x| !x.name.starts_with("n2")), "an SDC-only node gets no SDS");
}

#[test]
fn global_pool_takes_only_unused_disks_and_adopts_later_nodes() {
    let mut s = ClusterState::default();
    let disks = || {
        vec![
            disk("/dev/loop1", DiskUsage::Unused),
            disk("/dev/loop2", DiskUsage::InUse { reason: "has a partition table (gpt)".into() }),
            disk("/dev/loop3", DiskUsage::InUse { reason: "mounted at /mnt".into() }),
            disk("/dev/loop4", DiskUsage::Missing { reason: "does not exist".into() }),
            disk("/dev/loop5", DiskUsage::Unused),
        ]
    };
    report(&mut s, node("n1", 1, &[], disks()));
    report(&mut s, node("n2", 2, &[], disks()));
    // A node with imperative keys (here SDC only) never auto-contributes its unused disks.
    report(&mut s, node("n3", 3, &[("scaleio-sdc-domains", "default")], disks()));
    converge(&mut s);
    let paths: Vec<_> = devices(&s).into_iter().map(|(n, pd, pool, p)| format!("{n} {pd}/{pool} {p}")).collect();
    assert_eq!(
        paths,
        [
            "n1 default/default /dev/loop1",
            "n1 default/default /dev/loop5",
            "n2 default/default /dev/loop1",
            "n2 default/default /dev/loop5"
        ]
    );
    // A node added later joins by the same rule.
    report(&mut s, node("n4", 4, &[], disks()));
    let changes = converge(&mut s);
    assert!(changes.iter().all(|c| c.node() == Some("n4")), "{changes:?}");
    assert_eq!(devices(&s).len(), 6);
    // A disk that turns up later is adopted too; one that becomes used is not touched.
    let mut d = disks();
    d.push(disk("/dev/loop6", DiskUsage::Unused));
    report(&mut s, node("n4", 4, &[], d));
    converge(&mut s);
    assert_eq!(devices(&s).len(), 7);
}

#[test]
fn fault_sets_need_three_per_domain() {
    let mut s = ClusterState::default();
    for (n, fs) in [(1, "r1"), (2, "r2")] {
        report(
            &mut s,
            node(&format!("n{n}"), n, &[("tessera-faultset", fs)], vec![disk("/dev/loop1", DiskUsage::Unused)]),
        );
    }
    let layout = plan_layout(&s);
    assert!(layout.blocked_domains.contains("default"));
    let text: Vec<String> = layout.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter().any(|t| t.contains("domain default uses fault sets but has only 2 (r1, r2); at least 3")),
        "{text:?}"
    );
    assert!(diff(&s, &layout).is_empty());
    // A node without a fault set in a domain that uses them is named.
    report(&mut s, node("n9", 9, &[], vec![disk("/dev/loop1", DiskUsage::Unused)]));
    let text: Vec<String> = plan_layout(&s).problems.iter().map(|p| p.to_string()).collect();
    assert!(text.iter().any(|t| t.contains("but n9.default has none")), "{text:?}");
    s.apply(&Command::RemoveNode { name: "n9".into() }).unwrap();
    s.apply(&Command::ForgetNode { name: "n9".into() }).unwrap();
    // The third fault set unblocks the domain; the scaleio- spelling works too.
    report(&mut s, node("n3", 3, &[("scaleio-faultset", "r3")], vec![disk("/dev/loop1", DiskUsage::Unused)]));
    report(&mut s, node("n4", 4, &[("tessera-faultset", "r3")], vec![disk("/dev/loop1", DiskUsage::Unused)]));
    converge(&mut s);
    assert_eq!(s.fault_sets.len(), 3);
    let pool = s.pool_by_name("default").unwrap();
    for pg in &pool.pgs {
        let fs: Vec<_> = pg.replicas.iter().map(|r| s.sdss[&r.sds_id].fault_set_id).collect();
        assert_ne!(fs[0], fs[1], "copies on different fault sets");
    }
}

fn spec(text: &str) -> DeploySpec {
    let s: DeploySpec = toml_like(text);
    s.validate().unwrap();
    s
}

/// The tests build specs as JSON (core has no TOML parser; the CLI parses TOML into the same
/// serde types).
fn toml_like(json: &str) -> DeploySpec {
    serde_json::from_str(json).unwrap()
}

#[test]
fn declarative_spec_selects_by_labels_and_plan_apply_converges() {
    let mut s = ClusterState::default();
    for n in 1..=6u32 {
        let rack = format!("r{}", (n - 1) % 3 + 1);
        let row = if n <= 3 { "a" } else { "b" };
        let mut ssd = disk("/dev/loop1", DiskUsage::Unused);
        ssd.media = Media::Ssd;
        let mut hdd = disk("/dev/loop2", DiskUsage::Unused);
        hdd.media = Media::Hdd;
        hdd.size_bytes = 100 * GIB;
        let used = disk("/dev/loop3", DiskUsage::InUse { reason: "holds an xfs filesystem".into() });
        report(&mut s, node(&format!("n{n}"), n, &[("rack", &rack), ("row", row)], vec![ssd, hdd, used]));
    }
    let sp = spec(
        r#"{"fault_set_key": "rack", "mdm_mode": "3_node", "pool": [
            {"domain": "prod", "name": "fast", "devices": {"media": "ssd"}},
            {"domain": "prod", "name": "bulk", "nodes": {"row": "b"}, "devices": {"media": "hdd", "min_size": "50GiB"}}
        ]}"#,
    );
    s.apply(&Command::SetDeploySpec { spec: Some(sp) }).unwrap();
    let layout = plan_layout(&s);
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);
    let mdm = layout.mdm.clone().unwrap();
    assert_eq!(mdm.managers.len() + mdm.tiebreakers.len(), 3);
    let racks: std::collections::BTreeSet<_> =
        mdm.managers.iter().chain(&mdm.tiebreakers).map(|n| s.nodes[n].attributes["rack"].clone()).collect();
    assert_eq!(racks.len(), 3, "MDMs on distinct fault sets: {mdm:?}");
    converge(&mut s);
    let d = devices(&s);
    assert_eq!(d.iter().filter(|x| x.2 == "fast").count(), 6);
    assert_eq!(d.iter().filter(|x| x.2 == "bulk").count(), 3);
    assert!(d.iter().filter(|x| x.2 == "bulk").all(|x| ["n4", "n5", "n6"].contains(&x.0.as_str())));
    assert!(d.iter().all(|x| x.3 != "/dev/loop3"));
    assert_eq!(s.fault_sets.len(), 3);
    assert!(diff(&s, &plan_layout(&s)).is_empty(), "a second plan shows no difference");

    // A new spec moves row a's HDDs into bulk too, and takes n1 out of fast.
    let sp2 = spec(
        r#"{"fault_set_key": "rack", "pool": [
            {"domain": "prod", "name": "fast", "nodes": {"node": ["n2","n3","n4","n5","n6"]}, "devices": {"media": "ssd"}},
            {"domain": "prod", "name": "bulk", "devices": {"media": "hdd"}}
        ]}"#,
    );
    s.apply(&Command::SetDeploySpec { spec: Some(sp2) }).unwrap();
    let changes = diff(&s, &plan_layout(&s));
    let text: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert!(text.contains(&"- device n1:/dev/loop1 from pool fast (drain first)".to_string()), "{text:?}");
    assert!(text.contains(&"+ device n1:/dev/loop2 -> pool bulk".to_string()), "{text:?}");
    converge(&mut s);
    assert_eq!(devices(&s).iter().filter(|x| x.2 == "bulk").count(), 6);
}

#[test]
fn declarative_overlap_is_an_error_and_spec_validation() {
    let mut s = ClusterState::default();
    report(&mut s, node("n1", 1, &[], vec![disk("/dev/loop1", DiskUsage::Unused)]));
    let sp = spec(r#"{"pool": [{"domain": "d", "name": "a"}, {"domain": "d", "name": "b"}]}"#);
    s.apply(&Command::SetDeploySpec { spec: Some(sp) }).unwrap();
    let layout = plan_layout(&s);
    assert!(
        layout.problems.iter().any(|p| p.to_string().contains("/dev/loop1 is selected by pools a and b")),
        "{:?}",
        layout.problems
    );
    for bad in [
        r#"{"pool": []}"#,
        r#"{"mdm_mode": "2_node", "pool": [{"domain": "d", "name": "a"}]}"#,
        r#"{"pool": [{"domain": "d", "name": "a"}, {"domain": "e", "name": "a"}]}"#,
        r#"{"pool": [{"domain": "d", "name": "a", "devices": {"min_size": "lots"}}]}"#,
        r#"{"pool": [{"domain": "d", "name": "a", "spare_percent": 100}]}"#,
        &format!(r#"{{"pool": [{{"domain": "d", "name": "a", "devices": {{"paths": ["/{}"]}}}}]}}"#, "x".repeat(5000)),
    ] {
        let sp = toml_like(bad);
        assert!(s.apply(&Command::SetDeploySpec { spec: Some(sp) }).is_err(), "{bad:.200} accepted");
    }
}

#[test]
fn personas_pin_mdm_roles() {
    let mut s = ClusterState::default();
    for (n, persona) in [(1, "tiebreaker"), (2, "primary"), (3, "secondary"), (4, "")] {
        let attrs: Vec<(&str, &str)> = if persona.is_empty() { vec![] } else { vec![("scaleio-persona", persona)] };
        report(&mut s, node(&format!("n{n}"), n, &attrs, vec![]));
    }
    let layout = plan_layout(&s);
    let mdm = layout.mdm.unwrap();
    assert_eq!(mdm.mode, "3_node");
    assert_eq!(mdm.managers, ["n2", "n3"], "primary first");
    assert_eq!(mdm.tiebreakers, ["n1"]);
    assert_eq!(layout.nodes["n2"].persona, Some(Persona::Primary));
    assert!(mdm.complete);
    // A node in error holds the placement back rather than moving votes over a typo.
    report(&mut s, node("n5", 5, &[("scaleio-persona", "primery")], vec![]));
    let layout = plan_layout(&s);
    assert!(!layout.mdm.unwrap().complete);
    assert!(layout.problems.iter().any(|p| p.to_string().contains("MDM placement waits until the attributes of n5")));
}

#[test]
fn attribute_changes_and_node_removal_drain_then_forget() {
    let mut s = ClusterState::default();
    let two = vec![disk("/dev/xvdf", DiskUsage::Unused), disk("/dev/xvdg", DiskUsage::Unused)];
    let attrs =
        |devs: &'static str| vec![("scaleio-sds-domains", "pd"), ("scaleio-sds-pd", "p"), ("scaleio-sds-p", devs)];
    for n in 1..=3 {
        report(&mut s, node(&format!("n{n}"), n, &attrs("/dev/xvdf,/dev/xvdg"), two.clone()));
    }
    converge(&mut s);
    assert_eq!(devices(&s).len(), 6);
    report(&mut s, node("n1", 1, &attrs("/dev/xvdf"), two.clone()));
    let changes = converge(&mut s);
    assert_eq!(
        changes.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        ["- device n1:/dev/xvdg from pool p (drain first)"]
    );
    // A device being drained that the attributes want again leaves, then comes back.
    s.apply(&Command::DrainDevice { sds: "n2.pd".into(), path: "/dev/xvdg".into() }).unwrap();
    let text: Vec<String> = diff(&s, &plan_layout(&s)).iter().map(|c| c.to_string()).collect();
    assert_eq!(text, ["~ device n2:/dev/xvdg pool p -> p (drain, remove, re-add)"]);
    converge(&mut s);
    assert_eq!(devices(&s).len(), 5);
    s.apply(&Command::RemoveNode { name: "n3".into() }).unwrap();
    // The agent's next report keeps the node marked for removal.
    report(&mut s, node("n3", 3, &attrs("/dev/xvdf,/dev/xvdg"), two.clone()));
    let changes = converge(&mut s);
    let text: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(text, ["- SDS n3.pd on node n3 (drain first)", "- node n3 (removed; nothing left on it)"]);
    assert!(!s.nodes.contains_key("n3"));
    assert_eq!(devices(&s).len(), 3);
}

#[test]
fn a_spec_moves_global_pool_disks_into_another_domain() {
    let mut s = ClusterState::default();
    for n in 1..=3 {
        report(&mut s, node(&format!("n{n}"), n, &[], vec![disk("/dev/loop1", DiskUsage::Unused)]));
    }
    converge(&mut s);
    assert!(devices(&s).iter().all(|d| d.1 == "default"));
    s.apply(&Command::SetDeploySpec { spec: Some(spec(r#"{"pool": [{"domain": "prod", "name": "fast"}]}"#)) }).unwrap();
    // The agents now see their disks as Tessera's (device ids still in the cluster).
    for n in 1..=3u32 {
        let id = s.devices.values().find(|d| s.sdss[&d.sds_id].name == format!("n{n}.default")).unwrap().id;
        report(&mut s, node(&format!("n{n}"), n, &[], vec![disk("/dev/loop1", DiskUsage::Tessera { device_id: id })]));
    }
    let changes = diff(&s, &plan_layout(&s));
    let text: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert!(
        text.contains(&"~ device n1:/dev/loop1 pool default -> fast (drain, remove, re-add)".to_string()),
        "{text:?}"
    );
    assert!(
        changes.iter().any(
            |c| matches!(c, Change::MoveDevice { from_sds, sds, .. } if from_sds == "n1.default" && sds == "n1.prod")
        ),
        "{changes:?}"
    );
    // Once removed, a disk whose device the cluster forgot is still the plan's.
    s.apply(&Command::RemoveSds { name: "n1.default".into() }).unwrap();
    let layout = plan_layout(&s);
    assert_eq!(layout.nodes["n1"].sds["prod"].devices["/dev/loop1"], "fast");
    converge(&mut s);
    assert!(devices(&s).iter().all(|d| d.1 == "prod" && d.2 == "fast"), "{:?}", devices(&s));
}

/// A tiny deterministic generator (no dependency): xorshift64*.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// Random attribute sets, disks and specs: the planner never panics, and carrying out its
/// changes — problems or not — converges (a second plan is empty) without a refused command.
#[test]
fn random_nodes_never_panic_and_clean_plans_converge() {
    let keys = [
        "scaleio-sds-domains",
        "tessera-sds-domains",
        "scaleio-sds-pd1",
        "scaleio-sds-pd2",
        "tessera-sds-p1",
        "scaleio-sds-p1",
        "scaleio-sds-p2",
        "scaleio-sdc-domains",
        "scaleio-sdc-pd1",
        "tessera-faultset",
        "scaleio-persona",
        "rack",
        "scaleio-sds-",
        "tessera-",
    ];
    let values = [
        "pd1",
        "pd2",
        "pd1,pd2",
        "p1",
        "p2",
        "p1,p2",
        "/dev/a",
        "/dev/b",
        "/dev/a,/dev/b",
        "/dev/a, /dev/a",
        "",
        ",",
        " p1 ",
        "r1",
        "r2",
        "r3",
        "primary",
        "tiebreaker",
        "bad name",
        "p1,pd1",
        "\u{0}",
        "ü",
    ];
    let usages = [
        DiskUsage::Unused,
        DiskUsage::InUse { reason: "holds an ext4 filesystem".into() },
        DiskUsage::Missing { reason: "does not exist".into() },
        DiskUsage::Tessera { device_id: 999_999 },
    ];
    let specs = [
        None,
        Some(r#"{"pool": [{"domain": "pd1", "name": "p1"}]}"#),
        Some(
            r#"{"fault_set_key": "rack", "pool": [{"domain": "pd2", "name": "p2", "nodes": {"rack": ["r1", "r2"]}}]}"#,
        ),
        Some(
            r#"{"mdm_mode": "5_node", "pool": [{"domain": "pd1", "name": "p1", "devices": {"paths": ["/dev/a"]}}, {"domain": "pd1", "name": "p3", "devices": {"paths": ["/dev/b"]}}]}"#,
        ),
    ];
    let mut clean = 0;
    for seed in 1..=500u64 {
        let mut g = Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut s = ClusterState::default();
        if let Some(json) = specs[(g.next() % specs.len() as u64) as usize] {
            s.apply(&Command::SetDeploySpec { spec: Some(toml_like(json)) }).unwrap();
        }
        let nodes = 1 + g.next() % 6;
        for n in 1..=nodes {
            let mut attrs = Vec::new();
            for _ in 0..g.next() % 6 {
                attrs.push((g.pick(&keys), g.pick(&values)));
            }
            let disks = ["/dev/a", "/dev/b"]
                .iter()
                .map(|p| disk(p, usages[(g.next() % usages.len() as u64) as usize].clone()))
                .collect();
            let mut nd = node(&format!("n{n}"), n as u32, &attrs, disks);
            if g.next().is_multiple_of(4) {
                nd.global_pool = None;
            }
            // Reports that the state machine refuses (bad bounds) are refused, not panics.
            let _ = s.apply(&Command::ReportNode { node: nd });
        }
        // Problems block their own node or domain; the rest of the plan must still go
        // through without a refused command and leave nothing to do.
        let layout = plan_layout(&s);
        if layout.problems.is_empty() {
            clean += 1;
        }
        converge(&mut s);
    }
    assert!(clean > 10, "too few clean random layouts to mean anything: {clean}");
}

#[test]
fn oversized_or_malformed_reports_are_refused() {
    let mut s = ClusterState::default();
    let big: Vec<(String, String)> = (0..100).map(|i| (format!("k{i}"), "v".repeat(1000))).collect();
    let attrs: Vec<(&str, &str)> = big.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let err = s.apply(&Command::ReportNode { node: node("n1", 1, &attrs, vec![]) }).unwrap_err();
    assert!(err.to_string().contains("at most 65536"), "{err}");
    let mut bad_address = node("n1", 1, &[], vec![]);
    bad_address.address = "not-an-ip".into();
    assert!(s.apply(&Command::ReportNode { node: bad_address }).is_err());
    assert!(s.apply(&Command::ReportNode { node: node("n.1", 1, &[], vec![]) }).is_err(), "dots are for SDS names");
    let mut twin = node("n2", 2, &[], vec![]);
    s.apply(&Command::ReportNode { node: twin.clone() }).unwrap();
    twin.name = "n3".into();
    assert!(s.apply(&Command::ReportNode { node: twin }).is_err(), "two nodes on one address");
    assert_eq!(s.nodes.len(), 1);
    // An MDM id at the top of the range (taken by hand, then retired) leaves none above it.
    s.apply(&Command::RetireMdmId { id: u64::MAX }).unwrap();
    assert!(s.apply(&Command::AssignMdmId { node: "n2".into() }).is_err());
    assert_eq!(s.nodes["n2"].mdm_id, None);
}
