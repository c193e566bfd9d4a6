//! Hostile and malformed input on every port a daemon opens: unauthenticated TCP to the MDM
//! and SDSs, malformed data and control frames from authenticated peers, and broken NBD
//! handshakes on the SDC's socket. Each test ends by checking that the daemons are alive and
//! still serve real clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use tessera_core::layout::pg_of_extent;
use tessera_core::ClusterState;
use tessera_proto::auth::{authenticate_client, AUTH_MAGIC, AUTH_OK, NONCE_BYTES, PROOF_BYTES};
use tessera_proto::control::ControlClient;
use tessera_proto::data::{flags, kind, status, IoHeader, IO_HEADER_BYTES};
use tessera_proto::frame::{FrameHeader, FRAME_MAGIC, HEADER_BYTES, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, RESPONSE_BIT};
use tessera_proto::ClusterSecret;

/// How long a peer may take to answer, or to close a connection it refuses. The servers'
/// own handshake timeout is 5 s.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(REPLY_TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(REPLY_TIMEOUT)).expect("write timeout");
    s
}

/// Reads until the peer closes; returns what it sent. Panics if it neither closes nor
/// goes quiet-and-closed within [`REPLY_TIMEOUT`] (a refused peer must be dropped).
fn read_until_closed(s: &mut impl Read, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => {
                return got
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("{what}: the connection was still open after {REPLY_TIMEOUT:?} (got {} bytes)", got.len())
            }
            Err(e) => panic!("{what}: unexpected error {e}"),
        }
        assert!(Instant::now() < deadline, "{what}: peer kept sending");
    }
}

/// Writes, tolerating a peer that already closed (that is an acceptable refusal).
fn send(s: &mut impl Write, bytes: &[u8]) {
    let _ = s.write_all(bytes).and_then(|_| s.flush());
}

/// A TCP connection that passed the challenge-response with `secret`, as a blocking stream.
fn authenticated(addr: &str, secret: &ClusterSecret) -> TcpStream {
    let rt = runtime();
    let stream = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        authenticate_client(&mut s, secret).await.expect("authentication with the right secret");
        s.into_std().expect("into std")
    });
    stream.set_nonblocking(false).expect("blocking");
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).expect("read timeout");
    stream
}

fn frame(kind: u16, request_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = FrameHeader { kind, request_id, payload_len: payload.len() as u32, status: 0 }.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Sends one request frame and reads its reply: (status, payload). Panics if the connection
/// closes instead.
fn call(s: &mut TcpStream, kind: u16, request_id: u64, payload: &[u8], what: &str) -> (u32, Vec<u8>) {
    s.write_all(&frame(kind, request_id, payload)).unwrap_or_else(|e| panic!("{what}: sending: {e}"));
    let mut h = [0u8; HEADER_BYTES];
    s.read_exact(&mut h).unwrap_or_else(|e| panic!("{what}: no reply ({e})"));
    let h = FrameHeader::decode(&h).unwrap_or_else(|e| panic!("{what}: bad reply header: {e}"));
    assert_eq!(h.request_id, request_id, "{what}: reply to another request");
    assert_eq!(h.kind, kind | RESPONSE_BIT, "{what}: reply kind");
    let mut payload = vec![0u8; h.payload_len as usize];
    s.read_exact(&mut payload).unwrap_or_else(|e| panic!("{what}: truncated reply ({e})"));
    (h.status, payload)
}

/// Like [`call`], but retries while the SDS answers MAP_BEHIND (its map is catching up with
/// the one the request was built from), as a real client does.
fn call_settled(s: &mut TcpStream, kind: u16, request_id: u64, payload: &[u8], what: &str) -> (u32, Vec<u8>) {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let (st, body) = call(s, kind, request_id, payload, what);
        if st != status::MAP_BEHIND || Instant::now() > deadline {
            return (st, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends bytes on a fresh authenticated connection and requires the peer to close it
/// without replying.
fn expect_closed_without_reply(addr: &str, secret: &ClusterSecret, bytes: &[u8], what: &str) {
    let mut s = authenticated(addr, secret);
    send(&mut s, bytes);
    let got = read_until_closed(&mut s, what);
    assert!(got.is_empty(), "{what}: the server replied {} bytes instead of closing", got.len());
}

fn cluster_state(c: &Cluster) -> ClusterState {
    runtime()
        .block_on(async { ControlClient::new(vec![c.mdm_addr()], c.secret()).state().await.expect("GetState").state })
}

/// Writes random data through the SDC and reads it back; verifies both copies.
fn round_trip_still_works(c: &Cluster, volume: &str, seed: u64) {
    let uri = format!("nbd+unix:///{volume}?socket={}", c.socket().display());
    let input = c.dir.join(format!("rt-{seed}.raw"));
    let data = random_file(&input, seed, (16 * MIB) as usize);
    tool_ok("nbdcopy", &["--flush", input.to_str().unwrap(), &uri]);
    let output = c.dir.join(format!("rt-{seed}.out"));
    tool_ok("nbdcopy", &[&uri, output.to_str().unwrap()]);
    let back = std::fs::read(&output).expect("read back");
    assert_same_bytes("round trip after hostile input", &data, &back[..data.len()]);
    c.verify(volume);
}

#[test]
fn unauthenticated_connections_are_refused() {
    let c = Cluster::start(3);
    c.volume("v", "64MiB");
    let targets = [("MDM", c.mdm_addr()), ("SDS 1", c.sds_addr(1)), ("SDS 3", c.sds_addr(3))];
    // The right magic, then silence: must be dropped by the handshake timeout with nothing
    // sent. Opened first and checked last, so the timeouts run while the rest is tested.
    let stalled: Vec<(&str, TcpStream)> = targets
        .iter()
        .map(|(who, addr)| {
            let mut s = connect(addr);
            send(&mut s, &AUTH_MAGIC);
            (*who, s)
        })
        .collect();
    for (who, addr) in &targets {
        // Garbage: not even the handshake magic.
        let mut s = connect(addr);
        send(&mut s, &random_bytes(7, 64));
        let got = read_until_closed(&mut s, &format!("{who}: garbage"));
        assert!(got.is_empty(), "{who} answered garbage with {} bytes", got.len());

        // A well-formed frame, as if authentication were optional: a READ and a CONTROL.
        for (k, payload) in [(kind::READ, vec![0u8; IO_HEADER_BYTES]), (kind::CONTROL, br#""Status""#.to_vec())] {
            let mut s = connect(addr);
            send(&mut s, &frame(k, 1, &payload));
            let got = read_until_closed(&mut s, &format!("{who}: frame without auth"));
            assert!(got.is_empty(), "{who} answered an unauthenticated frame of kind {k} with {} bytes", got.len());
        }

        // A wrong secret, both ways round.
        let rt = runtime();
        let refused = rt.block_on(async {
            let mut s = tokio::net::TcpStream::connect(addr.as_str()).await.expect("connect");
            authenticate_client(&mut s, &ClusterSecret::generate()).await
        });
        assert!(refused.is_err(), "{who} accepted a client with the wrong secret");

        // A client that cannot prove itself: the server must close without AUTH_OK even if
        // the client ignores the server's (to it unverifiable) proof.
        let mut s = connect(addr);
        let mut hello = AUTH_MAGIC.to_vec();
        hello.extend_from_slice(&random_bytes(8, NONCE_BYTES));
        send(&mut s, &hello);
        let mut challenge = vec![0u8; NONCE_BYTES + PROOF_BYTES];
        s.read_exact(&mut challenge).unwrap_or_else(|e| panic!("{who}: no challenge: {e}"));
        send(&mut s, &random_bytes(9, PROOF_BYTES));
        let after = read_until_closed(&mut s, &format!("{who}: forged proof"));
        assert!(!after.contains(&AUTH_OK), "{who} sent AUTH_OK to a forged proof");
        assert!(after.is_empty(), "{who} sent {} bytes after a forged proof", after.len());
        // And no frame sent after a forged proof is ever served.
        let mut s = connect(addr);
        send(&mut s, &hello);
        s.read_exact(&mut challenge).expect("challenge");
        let mut forged = random_bytes(10, PROOF_BYTES);
        forged.extend_from_slice(&frame(kind::CONTROL, 1, br#""Status""#));
        send(&mut s, &forged);
        assert!(read_until_closed(&mut s, &format!("{who}: frame after forged proof")).is_empty());
    }

    for (who, mut s) in stalled {
        let got = read_until_closed(&mut s, &format!("{who}: stalled handshake"));
        assert!(got.is_empty(), "{who} answered a partial hello");
    }

    c.assert_all_alive();
    let status = c.status();
    assert_eq!(status["pgs"]["healthy_pgs"].as_u64(), Some(256), "{status:#}");
    round_trip_still_works(&c, "v", 0x5eed_0101);
}

#[test]
fn malformed_data_frames_never_crash_an_sds() {
    let c = Cluster::start(3);
    c.volume("victim", "64MiB");
    let secret = c.secret();
    let state = cluster_state(&c);
    let volume = state.volume_by_name("victim").expect("volume").clone();
    let pool = state.pools.get(&volume.pool_id).expect("pool").clone();
    let extent = 3u64;
    let pg_id = pg_of_extent(volume.id, extent, pool.pg_count);
    let pg = pool.pgs[pg_id as usize].clone();
    let primary = state.sdss.get(&pg.replicas[0].sds_id).expect("primary").data_address.clone();
    let secondary = state.sdss.get(&pg.replicas[1].sds_id).expect("secondary").data_address.clone();
    let good = IoHeader {
        pool_id: pool.id,
        volume_id: volume.id,
        extent_index: extent,
        pg_id,
        flags: 0,
        pg_epoch: pg.epoch,
        offset_in_extent: 0,
        length: 4096,
        mapping_epoch: volume.mapping_epoch,
    };
    assert!(pg.epoch > 0, "placement gives epochs from 1");

    // Frame-level garbage: the connection is closed, nothing is answered.
    let valid =
        FrameHeader { kind: kind::READ, request_id: 1, payload_len: IO_HEADER_BYTES as u32, status: 0 }.encode();
    let mut bad_magic = valid;
    bad_magic[0..4].copy_from_slice(&(FRAME_MAGIC ^ 0xffff).to_le_bytes());
    let mut bad_version = valid;
    bad_version[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    let mut oversized = valid;
    oversized[16..20].copy_from_slice(&(MAX_PAYLOAD_BYTES + 1).to_le_bytes());
    let mut max_len = valid;
    max_len[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    for (what, header) in [
        ("bad magic", bad_magic),
        ("bad version", bad_version),
        ("oversized payload_len", oversized),
        ("payload_len u32::MAX", max_len),
    ] {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&good.encode());
        expect_closed_without_reply(&primary, &secret, &bytes, what);
    }
    // A frame that promises more payload than it sends, then hangs up.
    let mut short = FrameHeader { kind: kind::WRITE, request_id: 1, payload_len: 1 << 20, status: 0 }.encode().to_vec();
    short.extend_from_slice(&good.encode());
    {
        let mut s = authenticated(&primary, &secret);
        send(&mut s, &short);
        let _ = s.shutdown(std::net::Shutdown::Write);
        assert!(read_until_closed(&mut s, "truncated payload").is_empty());
    }

    // Request-level garbage on one connection: each gets an error status and the connection
    // keeps serving. First a valid READ, once the SDS's map has caught up with ours.
    let mut s = authenticated(&primary, &secret);
    let (st, _) = call_settled(&mut s, kind::READ, 100, &good.encode(), "valid READ");
    assert_eq!(st, status::OK, "a valid READ to the primary: {}", status::name(st));
    let mut id = 100u64;
    let mut expect = |s: &mut TcpStream, k: u16, payload: &[u8], want: &[u32], what: &str| {
        id += 1;
        let (st, _) = call(s, k, id, payload, what);
        assert!(want.contains(&st), "{what}: status {} ({st}), expected one of {want:?}", status::name(st));
    };
    let with = |f: &dyn Fn(&mut IoHeader)| {
        let mut h = good;
        f(&mut h);
        h.encode().to_vec()
    };
    let write_payload = |h: IoHeader, data_len: usize| {
        let mut p = h.encode().to_vec();
        p.extend(std::iter::repeat_n(0xeeu8, data_len));
        p
    };
    expect(&mut s, 999, &good.encode(), &[status::UNKNOWN_KIND], "unknown kind");
    expect(&mut s, kind::READ | RESPONSE_BIT, &good.encode(), &[status::UNKNOWN_KIND], "a response kind as a request");
    expect(&mut s, kind::CONTROL, b"\"Status\"", &[status::UNKNOWN_KIND], "control request to an SDS");
    expect(&mut s, kind::READ, &good.encode()[..20], &[status::INVALID], "truncated IoHeader");
    expect(&mut s, kind::READ, &[], &[status::INVALID], "empty READ");
    expect(&mut s, kind::WRITE, &good.encode()[..47], &[status::INVALID], "WRITE with a 47-byte header");
    expect(
        &mut s,
        kind::READ,
        &with(&|h| h.offset_in_extent = pool.extent_size_bytes - 100),
        &[status::INVALID],
        "READ past the extent end",
    );
    expect(
        &mut s,
        kind::READ,
        &with(&|h| h.length = pool.extent_size_bytes + 1),
        &[status::INVALID],
        "READ longer than an extent",
    );
    expect(
        &mut s,
        kind::READ,
        &with(&|h| {
            h.offset_in_extent = u32::MAX;
            h.length = u32::MAX;
        }),
        &[status::INVALID],
        "READ at u32::MAX offset and length",
    );
    expect(&mut s, kind::WRITE, &write_payload(good, 100), &[status::INVALID], "WRITE with 100 of 4096 data bytes");
    expect(&mut s, kind::WRITE, &write_payload(good, 8192), &[status::INVALID], "WRITE with 8192 of 4096 data bytes");
    expect(&mut s, kind::WRITE_ZEROES, &write_payload(good, 4096), &[status::INVALID], "WRITE_ZEROES carrying data");
    expect(&mut s, kind::TRIM, &write_payload(good, 1), &[status::INVALID], "TRIM carrying data");
    let wrong_pg = (pg_id + 1) % pool.pg_count;
    expect(&mut s, kind::READ, &with(&|h| h.pg_id = wrong_pg), &[status::INVALID], "wrong pg_id");
    expect(
        &mut s,
        kind::WRITE,
        &write_payload(IoHeader { pg_id: wrong_pg, ..good }, 4096),
        &[status::INVALID],
        "WRITE to the wrong pg_id",
    );
    expect(&mut s, kind::READ, &with(&|h| h.pg_id = u32::MAX), &[status::INVALID], "pg_id u32::MAX");
    expect(&mut s, kind::READ, &with(&|h| h.pg_epoch = 0), &[status::STALE_EPOCH], "stale epoch 0");
    expect(
        &mut s,
        kind::WRITE,
        &write_payload(IoHeader { pg_epoch: 0, ..good }, 4096),
        &[status::STALE_EPOCH],
        "WRITE with stale epoch 0",
    );
    expect(&mut s, kind::READ, &with(&|h| h.pg_epoch = u64::MAX), &[status::MAP_BEHIND], "epoch from the future");
    expect(
        &mut s,
        kind::READ,
        &with(&|h| h.pool_id = u64::MAX),
        &[status::MAP_BEHIND, status::INVALID],
        "unknown pool",
    );
    expect(
        &mut s,
        kind::WRITE,
        &write_payload(IoHeader { flags: flags::REPLICA, ..good }, 4096),
        &[status::WRONG_ROLE],
        "replica write to the primary",
    );
    expect(&mut s, kind::LIST_EXTENTS, &[1, 2, 3], &[status::INVALID], "LIST_EXTENTS with 3 bytes");
    expect(&mut s, kind::EXTENT_CHECKSUM, &[0u8; 10], &[status::INVALID], "EXTENT_CHECKSUM with 10 bytes");
    // Huge offsets: extents far past the end of the 64 MiB volume (with the PG the hash
    // gives them, so only a bounds check against the volume can refuse them), and a volume
    // id nobody issued. Collected and asserted last, so the liveness and round-trip checks
    // below run either way.
    let mut accepted = Vec::new();
    for far in [64u64, 1 << 40, u64::MAX] {
        let pg_far = pg_of_extent(volume.id, far, pool.pg_count);
        let h = IoHeader { extent_index: far, pg_id: pg_far, pg_epoch: pool.pgs[pg_far as usize].epoch, ..good };
        let owner = state.sdss.get(&pool.pgs[pg_far as usize].replicas[0].sds_id).expect("owner").data_address.clone();
        let mut o = authenticated(&owner, &secret);
        // Refused as INVALID or MAP_BEHIND (the SDS cannot tell garbage from a volume grown
        // after its map); either way not OK. No settling: MAP_BEHIND is the final answer here.
        let (st, _) = call(&mut o, kind::WRITE, 1, &write_payload(h, 4096), "WRITE past the volume end");
        eprintln!("WRITE to extent {far} (pg {pg_far}) of a 64-extent volume: {}", status::name(st));
        if st == status::OK {
            accepted.push(format!("WRITE to extent {far} of the 64-extent volume {}", volume.id));
        }
        let (st, _) = call(&mut o, kind::READ, 2, &h.encode(), "READ past the volume end");
        eprintln!("READ of extent {far} of a 64-extent volume: {}", status::name(st));
        if st == status::OK {
            accepted.push(format!("READ of extent {far} of the 64-extent volume {}", volume.id));
        }
    }
    let ghost = state.next_id + 1000;
    let pg_ghost = pg_of_extent(ghost, 0, pool.pg_count);
    let h = IoHeader {
        volume_id: ghost,
        extent_index: 0,
        pg_id: pg_ghost,
        pg_epoch: pool.pgs[pg_ghost as usize].epoch,
        ..good
    };
    let owner = state.sdss.get(&pool.pgs[pg_ghost as usize].replicas[0].sds_id).expect("owner").data_address.clone();
    let (st, _) = call(
        &mut authenticated(&owner, &secret),
        kind::WRITE,
        1,
        &write_payload(h, 4096),
        "WRITE to an unknown volume",
    );
    if st == status::OK {
        accepted.push(format!("WRITE to volume id {ghost}, which was never issued"));
    }

    // The secondary refuses to act as primary.
    let mut sec = authenticated(&secondary, &secret);
    let (st, _) = call(&mut sec, kind::WRITE, 1, &write_payload(good, 4096), "client WRITE to the secondary");
    assert_eq!(st, status::WRONG_ROLE, "the secondary took a client write");

    // The first connection still serves a valid request.
    let (st, data) = call_settled(&mut s, kind::READ, 9999, &good.encode(), "valid READ after garbage");
    assert_eq!(st, status::OK);
    assert_eq!(data.len(), 4096);
    // Every garbage WRITE above aimed at this never-written range; none may have landed.
    assert_zeros("extent 3 after refused writes", &data);

    for n in 1..=3 {
        c.assert_alive(&format!("sds-{n}"));
    }
    round_trip_still_works(&c, "victim", 0x5eed_0102);
    assert!(accepted.is_empty(), "SDSs answered OK to IO outside any volume: {accepted:#?}");
    let report = c.verify("victim");
    assert_eq!(
        report["extents_checked"].as_u64(),
        Some(16),
        "only the 16 extents nbdcopy wrote are allocated: {report}"
    );
}

#[test]
fn malformed_control_requests_get_errors() {
    let c = Cluster::start(2);
    let secret = c.secret();
    let mdm = c.mdm_addr();
    let mut s = authenticated(&mdm, &secret);
    let mut id = 0u64;
    let mut expect_error = |s: &mut TcpStream, payload: &[u8], what: &str| {
        id += 1;
        let (st, body) = call(s, kind::CONTROL, id, payload, what);
        assert_eq!(st, status::OK, "{what}: control errors travel as JSON, status {}", status::name(st));
        let reply: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{what}: reply is not JSON ({e}): {}", text(&body)));
        assert!(reply.get("Error").is_some(), "{what}: expected an Error reply, got {reply}");
        reply
    };
    let reply = expect_error(&mut s, b"this is not json", "not JSON");
    assert!(reply["Error"].get("BadRequest").is_some(), "{reply}");
    expect_error(&mut s, b"", "empty payload");
    expect_error(&mut s, b"{\"NoSuchRequest\":{}}", "unknown request");
    expect_error(&mut s, b"{\"Execute\":{\"CreateVolume\":{\"name\":1}}}", "wrong field types");
    expect_error(&mut s, b"{\"SdsHeartbeat\":{\"sds_id\":\"x\"}}", "heartbeat with a string id");
    expect_error(&mut s, &[0xff, 0xfe, 0x00, 0x80], "invalid UTF-8");
    expect_error(&mut s, "[".repeat(100_000).as_bytes(), "100 000 nested arrays");
    expect_error(&mut s, &vec![b' '; 2 << 20], "2 MiB of whitespace");
    let reply = expect_error(
        &mut s,
        br#"{"Execute":{"CreateVolume":{"name":"bad name","pool":"default","size_bytes":1048576,"thin":true,"allow_multi_map":false}}}"#,
        "command refused by the model",
    );
    assert!(reply["Error"].get("Refused").is_some(), "{reply}");
    let reply =
        expect_error(&mut s, br#"{"SdsHeartbeat":{"sds_id":987654,"devices":[]}}"#, "heartbeat of an unknown SDS");
    assert!(reply.to_string().contains("987654"), "{reply}");

    // A data kind sent to the MDM gets a status, not a crash.
    let (st, _) = call(&mut s, kind::READ, 5000, &[0u8; IO_HEADER_BYTES], "READ to the MDM");
    assert_eq!(st, status::UNKNOWN_KIND);
    // The same connection still serves a well-formed request.
    let (st, body) = call(&mut s, kind::CONTROL, 5001, b"\"Status\"", "valid Status");
    assert_eq!(st, status::OK);
    let reply: serde_json::Value = serde_json::from_slice(&body).expect("Status reply is JSON");
    assert!(reply.get("Status").is_some(), "{reply}");
    // Frame garbage closes only that connection.
    expect_closed_without_reply(&mdm, &secret, &[0x55u8; 64], "garbage frame to the MDM");

    c.assert_alive("mdm-1");
    let status = c.status();
    assert_eq!(status["mdm_members"].as_array().map(|m| m.len()), Some(1));
    c.create_volume("after", "16MiB");
    c.map("after");
    round_trip_still_works(&c, "after", 0x5eed_0103);
}

// ---- NBD --------------------------------------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const EINVAL: u32 = 22;

fn nbd_connect(c: &Cluster) -> UnixStream {
    let s = UnixStream::connect(c.socket()).expect("connecting to the SDC socket");
    s.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
    s
}

/// Connects and reads the fixed-newstyle greeting.
fn nbd_greeted(c: &Cluster) -> UnixStream {
    let mut s = nbd_connect(c);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), NBDMAGIC);
    assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
    s
}

/// Greeted, and client flags sent (fixed newstyle, no zeroes).
fn nbd_negotiating(c: &Cluster) -> UnixStream {
    let mut s = nbd_greeted(c);
    s.write_all(&3u32.to_be_bytes()).expect("client flags");
    s
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go_data(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v
}

/// Reads one option reply: (option, reply type, data).
fn option_reply(s: &mut UnixStream, what: &str) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap_or_else(|e| panic!("{what}: no option reply ({e})"));
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), OPTION_REPLY_MAGIC, "{what}: reply magic");
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    assert!(len <= 64 * 1024, "{what}: reply of {len} bytes");
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap_or_else(|e| panic!("{what}: truncated reply ({e})"));
    (opt, typ, data)
}

/// Reads replies to `opt` until one that is not NBD_REP_INFO/SERVER; returns its type.
fn final_reply(s: &mut UnixStream, opt: u32, what: &str) -> u32 {
    loop {
        let (o, typ, _) = option_reply(s, what);
        assert_eq!(o, opt, "{what}: reply to another option");
        if typ != REP_SERVER && typ != 3 {
            return typ;
        }
    }
}

#[test]
fn malformed_nbd_handshakes_never_crash_the_sdc() {
    let c = Cluster::start(2);
    let uri = c.volume("shown", "32MiB");
    // A handshake that stalls must be dropped by the server's handshake timeout; opened
    // first and checked last, so the timeout runs while the rest is tested.
    let mut stalled = nbd_greeted(&c);
    stalled.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

    // Connect and hang up at once; and connect and send garbage instead of client flags.
    drop(nbd_connect(&c));
    let mut s = nbd_greeted(&c);
    send(&mut s, &random_bytes(11, 256));
    read_until_closed(&mut s, "garbage client flags");
    // Unknown client flag bits must be refused.
    let mut s = nbd_greeted(&c);
    send(&mut s, &0xffff_fff0u32.to_be_bytes());
    read_until_closed(&mut s, "unknown client flags");
    // Old-style client (no fixed newstyle bit).
    let mut s = nbd_greeted(&c);
    send(&mut s, &0u32.to_be_bytes());
    read_until_closed(&mut s, "not fixed newstyle");

    // Bad option magic.
    let mut s = nbd_negotiating(&c);
    let mut bad = option(OPT_LIST, &[]);
    bad[0] ^= 0xff;
    send(&mut s, &bad);
    assert!(read_until_closed(&mut s, "bad option magic").is_empty());

    // Errors that keep the negotiation going, all on one connection, then a clean abort.
    let mut s = nbd_negotiating(&c);
    s.write_all(&option(OPT_GO, &go_data("no-such-volume"))).unwrap();
    assert_eq!(final_reply(&mut s, OPT_GO, "GO unknown export"), REP_ERR_UNKNOWN);
    s.write_all(&option(OPT_GO, &go_data(""))).unwrap();
    assert_eq!(final_reply(&mut s, OPT_GO, "GO default export"), REP_ERR_UNKNOWN, "there is no default export");
    let mut lying = (1000u32).to_be_bytes().to_vec(); // name length past the option's end
    lying.extend_from_slice(b"shown");
    s.write_all(&option(OPT_GO, &lying)).unwrap();
    assert_eq!(final_reply(&mut s, OPT_GO, "GO with a lying name length"), REP_ERR_INVALID);
    s.write_all(&option(OPT_GO, &[0, 0])).unwrap();
    assert_eq!(final_reply(&mut s, OPT_GO, "GO with 2 bytes"), REP_ERR_INVALID);
    let mut bad_utf8 = 2u32.to_be_bytes().to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe, 0, 0]);
    s.write_all(&option(OPT_GO, &bad_utf8)).unwrap();
    let typ = final_reply(&mut s, OPT_GO, "GO with a non-UTF-8 name");
    assert!(typ & (1 << 31) != 0, "non-UTF-8 export name accepted: reply {typ:#x}");
    s.write_all(&option(OPT_LIST, b"junk")).unwrap();
    assert_eq!(final_reply(&mut s, OPT_LIST, "LIST with data"), REP_ERR_INVALID);
    s.write_all(&option(0x1234_5678, b"whatever")).unwrap();
    assert_eq!(final_reply(&mut s, 0x1234_5678, "unknown option"), REP_ERR_UNSUP);
    s.write_all(&option(OPT_GO, &vec![b'x'; 100 * 1024])).unwrap();
    assert_eq!(final_reply(&mut s, OPT_GO, "100 KiB option"), REP_ERR_TOO_BIG);
    s.write_all(&option(OPT_LIST, &[])).unwrap();
    assert_eq!(final_reply(&mut s, OPT_LIST, "LIST"), REP_ACK);
    s.write_all(&option(OPT_ABORT, &[])).unwrap();
    assert_eq!(final_reply(&mut s, OPT_ABORT, "ABORT"), REP_ACK);
    read_until_closed(&mut s, "after ABORT");

    // An option longer than the server will drain: closed.
    let mut s = nbd_negotiating(&c);
    let mut huge = IHAVEOPT.to_be_bytes().to_vec();
    huge.extend_from_slice(&OPT_GO.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    send(&mut s, &huge);
    read_until_closed(&mut s, "4 GiB option");
    // EXPORT_NAME of an unknown export has no error reply: closed.
    let mut s = nbd_negotiating(&c);
    send(&mut s, &option(OPT_EXPORT_NAME, b"no-such-volume"));
    assert!(read_until_closed(&mut s, "EXPORT_NAME unknown").is_empty());

    // Into transmission, then bad requests.
    let mut s = nbd_negotiating(&c);
    s.write_all(&option(OPT_GO, &go_data("shown"))).unwrap();
    assert_eq!(final_reply(&mut s, OPT_GO, "GO shown"), REP_ACK);
    let request = |cmd: u16, cookie: u64, offset: u64, len: u32| {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    let simple_reply = |s: &mut UnixStream, cookie: u64, what: &str| -> u32 {
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap_or_else(|e| panic!("{what}: no reply ({e})"));
        assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC, "{what}");
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), cookie, "{what}: cookie");
        u32::from_be_bytes(r[4..8].try_into().unwrap())
    };
    let size = 32 * MIB;
    s.write_all(&request(0, 1, size - 512, 4096)).unwrap();
    assert_eq!(simple_reply(&mut s, 1, "READ past the end"), EINVAL);
    s.write_all(&request(0, 2, u64::MAX - 10, 4096)).unwrap();
    assert_eq!(simple_reply(&mut s, 2, "READ at u64::MAX"), EINVAL);
    s.write_all(&request(4, 3, size, 1)).unwrap();
    assert_ne!(simple_reply(&mut s, 3, "TRIM past the end"), 0);
    s.write_all(&request(0x77, 4, 0, 512)).unwrap();
    assert_ne!(simple_reply(&mut s, 4, "unknown command"), 0);
    s.write_all(&request(0, 5, 0, 512)).unwrap();
    assert_eq!(simple_reply(&mut s, 5, "valid READ"), 0);
    let mut data = [0u8; 512];
    s.read_exact(&mut data).expect("READ data");
    // Out of sync: bad request magic closes the connection.
    send(&mut s, &[0xde, 0xad, 0xbe, 0xef].repeat(7));
    read_until_closed(&mut s, "bad request magic");

    let mut buf = [0u8; 1];
    match stalled.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a stalled NBD handshake was not dropped: {other:?}"),
    }

    c.assert_alive("sdc-1");
    let out = tool_ok("nbdinfo", &["--size", &uri]);
    assert_eq!(text(&out.stdout).trim(), (32 * MIB).to_string());
    round_trip_still_works(&c, "shown", 0x5eed_0104);
}
