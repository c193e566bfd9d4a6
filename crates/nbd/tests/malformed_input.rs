//! Raw-socket tests: hostile or broken clients. Each checks the server's
//! answer (an error reply or a closed connection) and then that the server
//! still accepts and serves a fresh, well-behaved connection.

mod common;

use std::time::Duration;

use common::{MemBackend, MemRegistry, TestServer, PANIC_OFFSET};
use tessera_nbd::wire::{self, RequestHeader};
use tessera_nbd::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const STEP_TIMEOUT: Duration = Duration::from_secs(5);
const DISK_BYTES: usize = 1 << 20;
const MAX_REQUEST_BYTES: u32 = 64 * 1024;

fn start(label: &str) -> TestServer {
    let registry = MemRegistry::new()
        .with("disk", MemBackend::new(DISK_BYTES))
        .with("ro", MemBackend::new(DISK_BYTES).read_only())
        .with("slow", MemBackend::new(DISK_BYTES).with_write_delay(Duration::from_millis(300)))
        .with_default("disk");
    let cfg = ServerConfig { max_request_bytes: MAX_REQUEST_BYTES, ..ServerConfig::default() };
    TestServer::start(label, registry, cfg)
}

async fn step<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Connects and consumes the server greeting.
async fn connect(server: &TestServer) -> UnixStream {
    let mut s = step("connect", UnixStream::connect(&server.socket)).await.expect("connect");
    let mut greeting = [0u8; 18];
    step("greeting", s.read_exact(&mut greeting)).await.expect("greeting");
    assert_eq!(greeting, wire::encode_greeting());
    s
}

/// Connects and completes the client-flags step with fixed newstyle + no zeroes.
async fn connect_negotiating(server: &TestServer) -> UnixStream {
    let mut s = connect(server).await;
    let flags = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;
    s.write_all(&flags.to_be_bytes()).await.expect("client flags");
    s
}

async fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).await.expect("send option");
}

#[derive(Debug)]
struct OptionReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

async fn read_option_reply(s: &mut UnixStream) -> OptionReply {
    let mut h = [0u8; 20];
    step("option reply", s.read_exact(&mut h)).await.expect("option reply header");
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), wire::OPTION_REPLY_MAGIC);
    let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let reply_type = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    step("option reply data", s.read_exact(&mut data)).await.expect("option reply data");
    OptionReply { option, reply_type, data }
}

fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// Sends NBD_OPT_GO and reads replies up to the final one. Returns the
/// export size and transmission flags, or the error reply.
async fn go(s: &mut UnixStream, name: &str) -> Result<(u64, u16), OptionReply> {
    send_option(s, wire::OPT_GO, &info_payload(name, &[wire::INFO_NAME])).await;
    let mut export = None;
    loop {
        let r = read_option_reply(s).await;
        assert_eq!(r.option, wire::OPT_GO);
        match r.reply_type {
            wire::REP_INFO if r.data.get(0..2) == Some(&[0, 0]) => {
                let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                let flags = u16::from_be_bytes(r.data[10..12].try_into().unwrap());
                export = Some((size, flags));
            }
            wire::REP_INFO => {}
            wire::REP_ACK => return Ok(export.expect("NBD_INFO_EXPORT before ACK")),
            _ => return Err(r),
        }
    }
}

async fn connect_to_export(server: &TestServer, name: &str) -> UnixStream {
    let mut s = connect_negotiating(server).await;
    go(&mut s, name).await.unwrap_or_else(|r| panic!("GO failed: {:#x}", r.reply_type));
    s
}

async fn send_request(s: &mut UnixStream, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
    let h = RequestHeader { flags, command, cookie, offset, length };
    s.write_all(&wire::encode_request_header(&h)).await.expect("send request");
}

/// Reads a simple reply; `data_len` bytes follow if the errno is 0.
async fn read_reply(s: &mut UnixStream, data_len: usize) -> (u32, u64, Vec<u8>) {
    let mut h = [0u8; 16];
    step("simple reply", s.read_exact(&mut h)).await.expect("reply header");
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), wire::SIMPLE_REPLY_MAGIC);
    let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let mut data = vec![0u8; if errno == 0 { data_len } else { 0 }];
    step("reply data", s.read_exact(&mut data)).await.expect("reply data");
    (errno, cookie, data)
}

/// The server hung up: EOF (or reset) rather than more bytes.
async fn assert_closed(s: &mut UnixStream) {
    let mut buf = [0u8; 1];
    match step("connection close", s.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(_) => panic!("server sent data instead of closing (byte {:#x})", buf[0]),
    }
}

/// A complete, well-behaved session: write, flush, read back, disconnect.
async fn assert_server_still_serves(server: &TestServer) {
    let mut s = connect_to_export(server, "disk").await;
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    send_request(&mut s, wire::CMD_WRITE, 0, 11, 8192, 4096).await;
    s.write_all(&pattern).await.expect("payload");
    assert_eq!(read_reply(&mut s, 0).await, (0, 11, vec![]));
    send_request(&mut s, wire::CMD_FLUSH, 0, 12, 0, 0).await;
    assert_eq!(read_reply(&mut s, 0).await, (0, 12, vec![]));
    send_request(&mut s, wire::CMD_READ, 0, 13, 8192, 4096).await;
    assert_eq!(read_reply(&mut s, 4096).await, (0, 13, pattern));
    send_request(&mut s, wire::CMD_DISC, 0, 14, 0, 0).await;
    assert_closed(&mut s).await;
}

// ---- Handshake ----------------------------------------------------------------

#[tokio::test]
async fn unknown_client_flags_close_the_connection() {
    let server = start("bad-client-flags");
    let mut s = connect(&server).await;
    s.write_all(&(wire::FLAG_C_FIXED_NEWSTYLE | 1 << 7).to_be_bytes()).await.unwrap();
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn client_without_fixed_newstyle_is_closed() {
    let server = start("not-fixed");
    let mut s = connect(&server).await;
    s.write_all(&0u32.to_be_bytes()).await.unwrap();
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn bad_option_magic_closes_the_connection() {
    let server = start("bad-opt-magic");
    let mut s = connect_negotiating(&server).await;
    let mut msg = b"NOTOPT!!".to_vec();
    msg.extend_from_slice(&wire::OPT_LIST.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&msg).await.unwrap();
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn truncated_option_then_hangup_leaves_server_healthy() {
    let server = start("truncated-opt");
    let mut s = connect_negotiating(&server).await;
    let mut msg = wire::IHAVEOPT.to_be_bytes().to_vec();
    msg.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    msg.extend_from_slice(&100u32.to_be_bytes());
    msg.extend_from_slice(&[1, 2, 3]);
    s.write_all(&msg).await.unwrap();
    drop(s);
    // Half an option header, too.
    let mut s = connect_negotiating(&server).await;
    s.write_all(&wire::IHAVEOPT.to_be_bytes()[..5]).await.unwrap();
    drop(s);
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn giant_option_length_closes_the_connection() {
    let server = start("giant-opt");
    let mut s = connect_negotiating(&server).await;
    let mut msg = wire::IHAVEOPT.to_be_bytes().to_vec();
    msg.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    msg.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&msg).await.unwrap();
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn oversized_option_is_drained_and_answered_too_big() {
    let server = start("too-big-opt");
    let mut s = connect_negotiating(&server).await;
    send_option(&mut s, wire::OPT_INFO, &vec![0u8; 100 * 1024]).await;
    let r = read_option_reply(&mut s).await;
    assert_eq!((r.option, r.reply_type), (wire::OPT_INFO, wire::REP_ERR_TOO_BIG));
    // The stream is still in sync: negotiation continues.
    assert_eq!(go(&mut s, "disk").await.ok(), Some((DISK_BYTES as u64, go_flags(&server).await)));
    assert_server_still_serves(&server).await;
}

/// Transmission flags the server advertises for "disk" (via NBD_OPT_INFO).
async fn go_flags(server: &TestServer) -> u16 {
    let mut s = connect_negotiating(server).await;
    send_option(&mut s, wire::OPT_INFO, &info_payload("disk", &[])).await;
    let r = read_option_reply(&mut s).await;
    assert_eq!(r.reply_type, wire::REP_INFO);
    u16::from_be_bytes(r.data[10..12].try_into().unwrap())
}

#[tokio::test]
async fn unknown_and_unsupported_options_get_err_unsup_and_negotiation_continues() {
    let server = start("unsup-opt");
    let mut s = connect_negotiating(&server).await;
    // 8 STRUCTURED_REPLY, 9 LIST_META_CONTEXT, 10 SET_META_CONTEXT,
    // 11 EXTENDED_HEADERS, 4 PEEK_EXPORT, and something invented.
    for option in [8u32, 9, 10, 11, 4, 0xdead_beef] {
        send_option(&mut s, option, b"junk").await;
        let r = read_option_reply(&mut s).await;
        assert_eq!((r.option, r.reply_type), (option, wire::REP_ERR_UNSUP), "option {option}");
    }
    send_option(&mut s, wire::OPT_STARTTLS, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.reply_type, wire::REP_ERR_POLICY);
    assert!(go(&mut s, "disk").await.is_ok());
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn go_with_unknown_export_gets_err_unknown_with_message() {
    let server = start("go-unknown");
    let mut s = connect_negotiating(&server).await;
    let r = go(&mut s, "missing").await.expect_err("GO must fail");
    assert_eq!(r.reply_type, wire::REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r.data).contains("missing"));
    // The client may try another export on the same connection.
    assert!(go(&mut s, "disk").await.is_ok());
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn malformed_info_and_list_payloads_get_err_invalid() {
    let server = start("invalid-opt");
    let mut s = connect_negotiating(&server).await;
    let mut bad = info_payload("disk", &[wire::INFO_NAME]);
    bad.push(0); // trailing byte
    send_option(&mut s, wire::OPT_INFO, &bad).await;
    assert_eq!(read_option_reply(&mut s).await.reply_type, wire::REP_ERR_INVALID);
    send_option(&mut s, wire::OPT_GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]).await;
    assert_eq!(read_option_reply(&mut s).await.reply_type, wire::REP_ERR_INVALID);
    send_option(&mut s, wire::OPT_LIST, b"x").await;
    assert_eq!(read_option_reply(&mut s).await.reply_type, wire::REP_ERR_INVALID);
    assert!(go(&mut s, "disk").await.is_ok());
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn list_names_every_export_then_acks() {
    let server = start("list");
    let mut s = connect_negotiating(&server).await;
    send_option(&mut s, wire::OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let r = read_option_reply(&mut s).await;
        match r.reply_type {
            wire::REP_SERVER => {
                let len = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(r.data[4..4 + len].to_vec()).unwrap());
            }
            wire::REP_ACK => break,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
    assert_eq!(names, ["disk", "ro", "slow"]);
}

#[tokio::test]
async fn abort_is_acknowledged_then_closed() {
    let server = start("abort");
    let mut s = connect_negotiating(&server).await;
    send_option(&mut s, wire::OPT_ABORT, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.reply_type, wire::REP_ACK);
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn export_name_honours_no_zeroes_and_default_export() {
    let server = start("export-name");
    for (flags, tail) in
        [(wire::FLAG_C_FIXED_NEWSTYLE, 124usize), (wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES, 0)]
    {
        let mut s = connect(&server).await;
        s.write_all(&flags.to_be_bytes()).await.unwrap();
        send_option(&mut s, wire::OPT_EXPORT_NAME, b"").await; // default export
        let mut reply = vec![0u8; 10 + tail];
        step("export name reply", s.read_exact(&mut reply)).await.unwrap();
        assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), DISK_BYTES as u64);
        assert!(reply[10..].iter().all(|&b| b == 0));
        // Then transmission works, and nothing extra was sent.
        send_request(&mut s, wire::CMD_READ, 0, 5, 0, 16).await;
        assert_eq!(read_reply(&mut s, 16).await, (0, 5, vec![0; 16]));
    }
}

#[tokio::test]
async fn export_name_for_unknown_export_closes() {
    let server = start("export-name-unknown");
    let mut s = connect_negotiating(&server).await;
    send_option(&mut s, wire::OPT_EXPORT_NAME, b"missing").await;
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn idle_handshake_times_out() {
    let registry = MemRegistry::new().with("disk", MemBackend::new(DISK_BYTES));
    let cfg = ServerConfig { handshake_timeout: Duration::from_millis(200), ..ServerConfig::default() };
    let server = TestServer::start("hs-timeout", registry, cfg);
    let mut s = connect_negotiating(&server).await;
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn option_flood_is_cut_off() {
    let registry = MemRegistry::new().with("disk", MemBackend::new(DISK_BYTES));
    let cfg = ServerConfig { max_options_per_connection: 8, ..ServerConfig::default() };
    let server = TestServer::start("opt-flood", registry, cfg);
    let mut s = connect_negotiating(&server).await;
    for _ in 0..8 {
        send_option(&mut s, 0x1234, &[]).await;
        assert_eq!(read_option_reply(&mut s).await.reply_type, wire::REP_ERR_UNSUP);
    }
    // The server may already have hung up, so this write may fail.
    let mut ninth = wire::IHAVEOPT.to_be_bytes().to_vec();
    ninth.extend_from_slice(&[0, 0, 0x12, 0x34, 0, 0, 0, 0]);
    let _ = s.write_all(&ninth).await;
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

// ---- Transmission ---------------------------------------------------------------

#[tokio::test]
async fn bad_request_magic_closes_the_connection() {
    let server = start("bad-req-magic");
    let mut s = connect_to_export(&server, "disk").await;
    let mut h = wire::encode_request_header(&RequestHeader {
        flags: 0,
        command: wire::CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    });
    h[0] ^= 0xff;
    s.write_all(&h).await.unwrap();
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn read_past_end_is_einval_and_connection_continues() {
    let server = start("read-past-end");
    let mut s = connect_to_export(&server, "disk").await;
    send_request(&mut s, wire::CMD_READ, 0, 1, DISK_BYTES as u64 - 100, 512).await;
    assert_eq!(read_reply(&mut s, 512).await, (wire::EINVAL, 1, vec![]));
    send_request(&mut s, wire::CMD_READ, 0, 2, u64::MAX - 10, 512).await; // offset + len overflows
    assert_eq!(read_reply(&mut s, 512).await, (wire::EINVAL, 2, vec![]));
    send_request(&mut s, wire::CMD_READ, 0, 3, 0, 512).await;
    assert_eq!(read_reply(&mut s, 512).await, (0, 3, vec![0; 512]));
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn write_past_end_discards_payload_replies_enospc_and_continues() {
    let server = start("write-past-end");
    let mut s = connect_to_export(&server, "disk").await;
    send_request(&mut s, wire::CMD_WRITE, 0, 1, DISK_BYTES as u64 - 100, 4096).await;
    // Payload of request-magic-looking bytes: if the server failed to
    // skip it, it would be parsed as requests and the next reply breaks.
    let mut payload = Vec::new();
    while payload.len() < 4096 {
        payload.extend_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
    }
    s.write_all(&payload).await.unwrap();
    // The spec: ENOSPC for writes beyond the end of the export.
    assert_eq!(read_reply(&mut s, 0).await, (wire::ENOSPC, 1, vec![]));
    send_request(&mut s, wire::CMD_READ, 0, 2, 0, 8).await;
    assert_eq!(read_reply(&mut s, 8).await, (0, 2, vec![0; 8]));
    assert!(server.registry.get("disk").snapshot().iter().all(|&b| b == 0));
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn oversized_write_closes_the_connection() {
    let server = start("oversized-write");
    let mut s = connect_to_export(&server, "disk").await;
    send_request(&mut s, wire::CMD_WRITE, 0, 1, 0, MAX_REQUEST_BYTES + 1).await;
    assert_closed(&mut s).await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn oversized_read_is_einval() {
    let server = start("oversized-read");
    let mut s = connect_to_export(&server, "disk").await;
    send_request(&mut s, wire::CMD_READ, 0, 1, 0, MAX_REQUEST_BYTES + 1).await;
    assert_eq!(read_reply(&mut s, 0).await, (wire::EINVAL, 1, vec![]));
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn unknown_command_block_status_and_bad_flags_are_einval() {
    let server = start("unknown-cmd");
    let mut s = connect_to_export(&server, "disk").await;
    send_request(&mut s, 0x77, 0, 1, 0, 512).await;
    assert_eq!(read_reply(&mut s, 0).await, (wire::EINVAL, 1, vec![]));
    send_request(&mut s, 7, 0, 2, 0, 512).await; // BLOCK_STATUS
    assert_eq!(read_reply(&mut s, 0).await, (wire::EINVAL, 2, vec![]));
    send_request(&mut s, wire::CMD_READ, 1 << 2, 3, 0, 512).await; // DF, not negotiated
    assert_eq!(read_reply(&mut s, 0).await, (wire::EINVAL, 3, vec![]));
    send_request(&mut s, wire::CMD_FLUSH, 1 << 9, 4, 0, 0).await; // undefined flag
    assert_eq!(read_reply(&mut s, 0).await, (wire::EINVAL, 4, vec![]));
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn zero_length_requests_succeed() {
    let server = start("zero-len");
    let mut s = connect_to_export(&server, "disk").await;
    for (i, cmd) in [wire::CMD_READ, wire::CMD_WRITE, wire::CMD_TRIM, wire::CMD_WRITE_ZEROES, wire::CMD_CACHE]
        .into_iter()
        .enumerate()
    {
        send_request(&mut s, cmd, 0, i as u64, 4096, 0).await;
        assert_eq!(read_reply(&mut s, 0).await, (0, i as u64, vec![]), "command {cmd}");
    }
}

#[tokio::test]
async fn trim_zeroes_and_cache_work_in_bounds() {
    let server = start("trim-zero");
    let mut s = connect_to_export(&server, "disk").await;
    send_request(&mut s, wire::CMD_WRITE, 0, 1, 0, 8192).await;
    s.write_all(&[0x5a; 8192]).await.unwrap();
    assert_eq!(read_reply(&mut s, 0).await.0, 0);
    send_request(&mut s, wire::CMD_WRITE_ZEROES, wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FUA, 2, 0, 4096).await;
    assert_eq!(read_reply(&mut s, 0).await, (0, 2, vec![]));
    send_request(&mut s, wire::CMD_TRIM, wire::CMD_FLAG_FUA, 3, 4096, 4096).await;
    assert_eq!(read_reply(&mut s, 0).await, (0, 3, vec![]));
    send_request(&mut s, wire::CMD_CACHE, 0, 4, 0, DISK_BYTES as u32).await;
    assert_eq!(read_reply(&mut s, 0).await, (0, 4, vec![]));
    send_request(&mut s, wire::CMD_WRITE_ZEROES, 0, 5, DISK_BYTES as u64, 1).await;
    assert_eq!(read_reply(&mut s, 0).await, (wire::ENOSPC, 5, vec![]));
    let disk = server.registry.get("disk").snapshot();
    assert!(disk[..8192].iter().all(|&b| b == 0));
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let server = start("read-only");
    let mut s = connect_negotiating(&server).await;
    let (_, flags) = go(&mut s, "ro").await.expect("GO ro");
    assert_ne!(flags & wire::TFLAG_READ_ONLY, 0);
    send_request(&mut s, wire::CMD_WRITE, 0, 1, 0, 512).await;
    s.write_all(&[1; 512]).await.unwrap();
    assert_eq!(read_reply(&mut s, 0).await, (wire::EPERM, 1, vec![]));
    send_request(&mut s, wire::CMD_TRIM, 0, 2, 0, 512).await;
    assert_eq!(read_reply(&mut s, 0).await, (wire::EPERM, 2, vec![]));
    send_request(&mut s, wire::CMD_READ, 0, 3, 0, 512).await;
    assert_eq!(read_reply(&mut s, 512).await, (0, 3, vec![0; 512]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_requests_all_get_exactly_one_reply() {
    let server = start("pipelined");
    let mut s = connect_to_export(&server, "disk").await;
    const N: u64 = 512;
    // Send everything before reading anything: writes, then reads of the
    // same blocks (replies may come back in any order).
    let mut burst = Vec::new();
    for i in 0..N {
        let h = RequestHeader { flags: 0, command: wire::CMD_WRITE, cookie: i, offset: i * 1024, length: 1024 };
        burst.extend_from_slice(&wire::encode_request_header(&h));
        burst.extend_from_slice(&[(i % 255) as u8 + 1; 1024]);
    }
    let (mut rd, mut wr) = s.split();
    let send = async { wr.write_all(&burst).await.expect("send burst") };
    let recv = async {
        let mut seen = vec![false; N as usize];
        for _ in 0..N {
            let mut h = [0u8; 16];
            step("pipelined reply", rd.read_exact(&mut h)).await.expect("reply");
            let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            assert_eq!(errno, 0);
            assert!(!std::mem::replace(&mut seen[cookie as usize], true), "duplicate reply {cookie}");
        }
    };
    tokio::join!(send, recv);
    for i in 0..N {
        send_request(&mut s, wire::CMD_READ, 0, 10_000 + i, i * 1024, 1024).await;
    }
    let mut got = std::collections::HashMap::new();
    for _ in 0..N {
        let (errno, cookie, data) = read_reply(&mut s, 1024).await;
        assert_eq!(errno, 0);
        got.insert(cookie, data);
    }
    for i in 0..N {
        assert_eq!(got[&(10_000 + i)], vec![(i % 255) as u8 + 1; 1024], "block {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_completes_outstanding_writes_before_closing() {
    let server = start("disc-drain");
    let mut s = connect_to_export(&server, "slow").await;
    // Writes take 300 ms in this backend; DISC arrives right behind them.
    for cookie in 1..=3u64 {
        send_request(&mut s, wire::CMD_WRITE, 0, cookie, cookie * 4096, 4096).await;
        s.write_all(&[cookie as u8; 4096]).await.unwrap();
    }
    let started = std::time::Instant::now();
    send_request(&mut s, wire::CMD_DISC, 0, 99, 0, 0).await;
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let (errno, cookie, _) = read_reply(&mut s, 0).await;
        assert_eq!(errno, 0);
        cookies.push(cookie);
    }
    // Three 300 ms writes finishing well under 900 ms ran concurrently.
    assert!(started.elapsed() < Duration::from_millis(800), "{:?}", started.elapsed());
    cookies.sort_unstable();
    assert_eq!(cookies, [1, 2, 3]);
    assert_closed(&mut s).await; // and no reply to DISC itself
    let disk = server.registry.get("slow").snapshot();
    for cookie in 1..=3usize {
        assert!(disk[cookie * 4096..(cookie + 1) * 4096].iter().all(|&b| b == cookie as u8));
    }
}

#[tokio::test]
async fn client_hangup_mid_payload_leaves_server_healthy() {
    let server = start("hangup-mid-write");
    let mut s = connect_to_export(&server, "disk").await;
    send_request(&mut s, wire::CMD_WRITE, 0, 1, 0, 4096).await;
    s.write_all(&[1; 100]).await.unwrap();
    drop(s);
    let mut s = connect_to_export(&server, "disk").await;
    s.write_all(
        &wire::encode_request_header(&RequestHeader { flags: 0, command: 0, cookie: 0, offset: 0, length: 1 })[..9],
    )
    .await
    .unwrap();
    drop(s);
    assert_server_still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_panic_costs_one_request_not_the_connection() {
    let server = start("backend-panic");
    let mut s = connect_to_export(&server, "disk").await;
    send_request(&mut s, wire::CMD_READ, 0, 1, PANIC_OFFSET, 16).await;
    assert_eq!(read_reply(&mut s, 16).await, (wire::EIO, 1, vec![]));
    send_request(&mut s, wire::CMD_READ, 0, 2, 0, 16).await;
    assert_eq!(read_reply(&mut s, 16).await, (0, 2, vec![0; 16]));
    assert_server_still_serves(&server).await;
}
