//! Volume IO through real NBD clients (nbdcopy, qemu-img, qemu-io, nbdinfo, fio) against a
//! real three-SDS cluster on loopback.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use common::*;

#[test]
fn nbdcopy_round_trip_is_byte_exact() {
    let c = Cluster::start(3);
    let uri = c.volume("rt", "256MiB");
    let input = c.dir.join("in.raw");
    let data = random_file(&input, 0x5eed_0001, (128 * MIB) as usize);
    tool_ok("nbdcopy", &["--flush", input.to_str().unwrap(), &uri]);

    let output = c.dir.join("out.raw");
    tool_ok("nbdcopy", &[&uri, output.to_str().unwrap()]);
    let back = std::fs::read(&output).expect("reading what nbdcopy read back");
    assert_eq!(back.len() as u64, 256 * MIB, "nbdcopy read the whole volume");
    assert_same_bytes("first 128 MiB of the volume", &data, &back[..data.len()]);
    assert_zeros("never-written second half of the volume", &back[data.len()..]);

    let out = c.cli(&["volume", "verify", "rt"]);
    assert!(out.status.success(), "volume verify failed: {}", describe(&out));
    let report = c.verify("rt");
    assert_eq!(report["extents_checked"].as_u64(), Some(128), "128 one-MiB extents written: {report}");
}

#[test]
fn qemu_img_convert_and_compare() {
    let c = Cluster::start(3);
    let uri = c.volume("qi", "128MiB");
    let image = c.dir.join("image.raw");
    let mut data = random_file(&image, 0x5eed_0002, (64 * MIB) as usize);
    tool_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", image.to_str().unwrap(), &uri]);
    // The volume is larger: compare (not strict) also checks the extra 64 MiB reads as zeros.
    let out =
        run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", image.to_str().unwrap(), &uri]), TOOL_TIMEOUT);
    assert!(out.status.success(), "qemu-img compare found a difference: {}", describe(&out));
    assert!(text(&out.stdout).contains("Images are identical"), "{}", describe(&out));

    // Control: one flipped byte must be noticed, or the comparison above proved nothing.
    let flip_at = 40 * MIB as usize + 12345;
    data[flip_at] ^= 0xff;
    std::fs::write(&image, &data).expect("rewriting the image");
    let out =
        run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", image.to_str().unwrap(), &uri]), TOOL_TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "qemu-img compare missed a changed byte: {}", describe(&out));
    // qemu-img reports the 512-byte sector holding the difference.
    assert!(text(&out.stdout).contains(&format!("offset {}", flip_at / 512 * 512)), "{}", describe(&out));
    c.verify("qi");
}

#[test]
fn nbdinfo_lists_mapped_exports() {
    let c = Cluster::start(3);
    let uri_a = c.volume("alpha", "64MiB");
    let uri_b = c.volume("beta", "128MiB");
    c.create_volume("gamma", "32MiB"); // never mapped

    let socket_uri = format!("nbd+unix://?socket={}", c.socket().display());
    let out = tool_ok("nbdinfo", &["--list", "--json", &socket_uri]);
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json output parses");
    let mut names: Vec<&str> = listing["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| e["export-name"].as_str().expect("name"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["alpha", "beta"], "only mapped volumes are exported: {listing:#}");
    for e in listing["exports"].as_array().unwrap() {
        let want = if e["export-name"] == "alpha" { 64 * MIB } else { 128 * MIB };
        assert_eq!(e["export-size"].as_u64(), Some(want), "size of {e}");
    }

    let size = tool_ok("nbdinfo", &["--size", &uri_b]);
    assert_eq!(text(&size.stdout).trim(), (128 * MIB).to_string());
    let size = tool_ok("nbdinfo", &["--size", &uri_a]);
    assert_eq!(text(&size.stdout).trim(), (64 * MIB).to_string());

    // An existing but unmapped volume is not reachable through this SDC.
    let gamma = format!("nbd+unix:///gamma?socket={}", c.socket().display());
    let out = run(tool("nbdinfo").args(["--size", &gamma]), TOOL_TIMEOUT);
    assert!(!out.status.success(), "unmapped volume gamma was served: {}", describe(&out));
}

/// Runs fio with the NBD engine and JSON output; asserts success, no errors and that the
/// verify pass read back everything written. Returns the job's JSON.
fn fio_verified(uri: &str, extra: &[&str], bytes: u64) -> serde_json::Value {
    let uri_arg = format!("--uri={uri}");
    let mut args =
        vec!["--name=verify", "--ioengine=nbd", &uri_arg, "--output-format=json", "--verify=crc32c", "--do_verify=1"];
    args.extend_from_slice(extra);
    let out = run(tool("fio").args(&args), TOOL_TIMEOUT);
    assert!(out.status.success(), "fio {args:?} failed: {}", describe(&out));
    let stdout = text(&out.stdout);
    let json_start = stdout.find('{').unwrap_or_else(|| panic!("no JSON in fio output: {}", describe(&out)));
    let report: serde_json::Value = serde_json::from_str(&stdout[json_start..]).expect("fio JSON parses");
    let job = &report["jobs"][0];
    assert_eq!(job["error"].as_i64(), Some(0), "fio job error: {job:#}");
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(bytes), "bytes written");
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(bytes), "the verify pass read back every byte written");
    let stderr = text(&out.stderr);
    for bad in ["verify", "bad magic", "error", "crc32c"] {
        assert!(!stderr.to_lowercase().contains(bad), "fio reported {bad:?}: {}", describe(&out));
    }
    report
}

#[test]
fn fio_randwrite_verify_crc32c() {
    let c = Cluster::start(3);
    let uri = c.volume("fr", "128MiB");
    fio_verified(&uri, &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=64M"], 64 * MIB);
    c.verify("fr");
}

#[test]
fn fio_seqwrite_1m_verify_crc32c() {
    let c = Cluster::start(3);
    let uri = c.volume("fs", "128MiB");
    fio_verified(&uri, &["--rw=write", "--bs=1M", "--iodepth=8", "--size=96M"], 96 * MIB);
    c.verify("fs");
}

#[test]
fn replicas_identical_after_random_writes() {
    let c = Cluster::start(3);
    let uri = c.volume("mix", "128MiB");
    let uri_arg = format!("--uri={uri}");
    // Two jobs, each on its own NBD connection, over the same 64 MiB: mixed sizes at
    // 512-byte alignment, no random map, so writes overlap within and across connections.
    let args = [
        "--name=mix",
        "--ioengine=nbd",
        uri_arg.as_str(),
        "--rw=randwrite",
        "--bsrange=512-128k",
        "--blockalign=512",
        "--norandommap",
        "--randrepeat=0",
        "--iodepth=32",
        "--numjobs=2",
        "--size=64M",
        "--io_size=96M",
        "--group_reporting",
        "--output-format=json",
    ];
    let out = run(tool("fio").args(args), TOOL_TIMEOUT);
    assert!(out.status.success(), "fio failed: {}", describe(&out));
    let stdout = text(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find('{').expect("fio JSON")..]).expect("fio JSON parses");
    assert_eq!(report["jobs"][0]["error"].as_i64(), Some(0), "fio job error: {report:#}");
    // With variable block sizes each job's last IO may overshoot its 96 MiB a little.
    let written = report["jobs"][0]["write"]["io_bytes"].as_u64().expect("io_bytes");
    assert!(
        (2 * 96 * MIB..=2 * 96 * MIB + 2 * 128 * KIB).contains(&written),
        "both jobs wrote their 96 MiB: {written}"
    );

    let out = c.cli(&["volume", "verify", "mix"]);
    assert!(out.status.success(), "volume verify found differing copies: {}", describe(&out));
    let report = c.verify("mix");
    assert_eq!(report["extents_checked"].as_u64(), Some(64), "every written extent checked: {report}");
}

/// Bytes the file system allocated to every SDS's device file.
fn device_allocated_bytes(c: &Cluster) -> u64 {
    (1..=c.sds_count)
        .map(|n| {
            let meta = std::fs::metadata(c.dir.join(format!("sds-{n}/disk0.img"))).expect("device file");
            assert_eq!(meta.len(), 2 * GIB, "the device file keeps its apparent size");
            meta.blocks() * 512
        })
        .sum()
}

#[test]
fn thin_volume_uses_space_only_where_written() {
    let c = Cluster::start(3);
    let uri = c.volume("thin", "1GiB");
    let used_before = poll("usage reports", POLL_TIMEOUT, || {
        let s = c.status();
        s["sdss"].as_array().unwrap().iter().all(|x| x["state"] == "up").then(|| c.used_bytes())
    });
    assert_eq!(used_before, 0, "a new thin volume uses no extents");
    let allocated_before = device_allocated_bytes(&c);

    // 8 MiB at 512 MiB: eight 1 MiB extents, two copies each.
    tool_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 512M 8M", "-c", "flush", &uri]);
    let expected = 2 * 8 * MIB;
    let mut last = 0;
    poll("SDS usage to reach two copies of 8 MiB", POLL_TIMEOUT, || {
        last = c.used_bytes();
        (last >= expected).then_some(())
    });
    // Heartbeats may lag; give them one more round to settle, then require no overshoot.
    std::thread::sleep(Duration::from_millis(1500));
    let used = c.used_bytes();
    assert!(used >= expected && used <= expected + 4 * EXTENT_BYTES, "used_bytes {used}, expected about {expected}");

    let grown = device_allocated_bytes(&c) - allocated_before;
    assert!(
        grown >= expected && grown <= expected + 8 * MIB,
        "device files grew by {grown} bytes for 8 MiB written twice (expected about {expected})"
    );
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5a 512M 8M", "-c", "read -P 0 0 512M", "-c", "read -P 0 520M 504M", &uri],
    );
}

#[test]
fn trim_and_write_zeroes_read_back_as_zeros() {
    let c = Cluster::start(3);
    let uri = c.volume("z", "64MiB");
    // qemu-io sends NBD_CMD_TRIM for `discard` and NBD_CMD_WRITE_ZEROES for `write -z`.
    tool_ok("qemu-io", &["-f", "raw", "-d", "unmap", "-c", "write -P 0xab 0 16M", "-c", "flush", &uri]);
    poll("usage of 16 written extents", POLL_TIMEOUT, || (c.used_bytes() == 2 * 16 * MIB).then_some(()));
    let ops = [
        "discard 0 4M",          // TRIM of whole extents 0..4
        "discard 4100k 8k",      // TRIM inside extent 4
        "write -z 6M 1M",        // WRITE_ZEROES of the whole extent 6
        "write -z 7340544 1000", // unaligned WRITE_ZEROES inside extent 7 (7M + 512)
        "write -z -u 8M 2M",     // WRITE_ZEROES, may unmap: extents 8 and 9
        "flush",
    ];
    let mut args = vec!["-f", "raw", "-d", "unmap"];
    for op in ops {
        args.extend(["-c", op]);
    }
    args.push(&uri);
    tool_ok("qemu-io", &args);

    // Read through a fresh connection: zeros where trimmed or zeroed, the pattern elsewhere.
    let checks = [
        "read -P 0 0 4M",
        "read -P 0xab 4M 4k",
        "read -P 0 4100k 8k",
        "read -P 0xab 4108k 2036k",
        "read -P 0 6M 1M",
        "read -P 0xab 7M 512",
        "read -P 0 7340544 1000",
        "read -P 0xab 7341544 1047064",
        "read -P 0 8M 2M",
        "read -P 0xab 10M 6M",
        "read -P 0 16M 48M",
    ];
    let mut args = vec!["-f", "raw", "-r"];
    for op in checks {
        args.extend(["-c", op]);
    }
    args.push(&uri);
    let out = tool_ok("qemu-io", &args);
    assert!(!text(&out.stdout).contains("Pattern verification failed"), "{}", describe(&out));

    // Whole extents trimmed or zeroed (0-3, 6, 8, 9) give their slots back on both copies:
    // 16 - 7 = 9 extents remain.
    let mut last = 0;
    let settled = std::time::Instant::now() + POLL_TIMEOUT;
    while std::time::Instant::now() < settled {
        last = c.used_bytes();
        if last == 2 * 9 * MIB {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last, 2 * 9 * MIB, "space of trimmed and zeroed extents is returned");
    c.verify("z");

    // nbdcopy of a sparse file: its holes become zero requests and must read back as zeros
    // over data that was there before.
    let uri2 = c.volume("z2", "16MiB");
    let full = c.dir.join("full.raw");
    std::fs::write(&full, vec![0xcdu8; (16 * MIB) as usize]).expect("writing a full file");
    tool_ok("nbdcopy", &["--flush", full.to_str().unwrap(), &uri2]);
    let sparse_path = c.dir.join("sparse.raw");
    let sparse = std::fs::File::create(&sparse_path).expect("sparse file");
    sparse.set_len(16 * MIB).expect("sizing the sparse file");
    let block = random_bytes(0x5eed_0003, MIB as usize);
    sparse.write_all_at(&block, 0).expect("data at 0");
    sparse.write_all_at(&block, 9 * MIB).expect("data at 9 MiB");
    drop(sparse);
    tool_ok("nbdcopy", &["--flush", sparse_path.to_str().unwrap(), &uri2]);
    let back_path = c.dir.join("back.raw");
    tool_ok("nbdcopy", &[&uri2, back_path.to_str().unwrap()]);
    let back = std::fs::read(&back_path).expect("read back");
    assert_same_bytes("data at 0", &block, &back[..MIB as usize]);
    assert_zeros("hole 1..9 MiB", &back[MIB as usize..9 * MIB as usize]);
    assert_same_bytes("data at 9 MiB", &block, &back[9 * MIB as usize..10 * MIB as usize]);
    assert_zeros("hole 10..16 MiB", &back[10 * MIB as usize..]);
    c.verify("z2");
}
