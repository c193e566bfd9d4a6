//! A minimal synchronous NBD client for tests that must know exactly which request was
//! acknowledged when (oracles for power cuts, concurrent flushes). `nbdcopy` and `fio`
//! cannot say which writes a FLUSH covered; this can. Fixed newstyle, `NBD_OPT_GO`, simple
//! replies, one request at a time per connection (open several for concurrency).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

/// Longest a test waits for one reply: the SDC retries an IO for up to 60 s itself.
pub const NBD_REPLY_TIMEOUT: Duration = Duration::from_secs(90);

/// The export name and socket path of an `nbd+unix:///NAME?socket=PATH` URI.
pub fn parse_unix_uri(uri: &str) -> (String, PathBuf) {
    let rest = uri.strip_prefix("nbd+unix:///").unwrap_or_else(|| panic!("not an nbd+unix URI: {uri}"));
    let (name, socket) = rest.split_once("?socket=").unwrap_or_else(|| panic!("no socket in {uri}"));
    (name.to_string(), PathBuf::from(socket))
}

/// An NBD error reply, with the server's errno.
#[derive(Debug)]
pub enum NbdError {
    Io(io::Error),
    Server(u32),
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Io(e) => write!(f, "connection: {e}"),
            NbdError::Server(errno) => write!(f, "server error {errno}"),
        }
    }
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> Self {
        NbdError::Io(e)
    }
}

pub struct NbdClient {
    stream: UnixStream,
    pub size_bytes: u64,
    pub transmission_flags: u16,
    next_handle: u64,
}

impl NbdClient {
    pub fn connect_uri(uri: &str) -> io::Result<NbdClient> {
        let (name, socket) = parse_unix_uri(uri);
        NbdClient::connect(&socket, &name)
    }

    pub fn connect(socket: &Path, export: &str) -> io::Result<NbdClient> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(NBD_REPLY_TIMEOUT))?;
        s.set_write_timeout(Some(NBD_REPLY_TIMEOUT))?;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(bad("not an NBD newstyle server"));
        }
        let _handshake_flags = read_u16(&mut s)?;
        // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        let data_len = 4 + export.len() + 2;
        opt.extend_from_slice(&(data_len as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let (mut size_bytes, mut transmission_flags) = (None, 0u16);
        loop {
            if read_u64(&mut s)? != OPTION_REPLY_MAGIC {
                return Err(bad("bad option reply magic"));
            }
            let _option = read_u32(&mut s)?;
            let reply = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            if len > 1 << 16 {
                return Err(bad("option reply too long"));
            }
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match reply {
                REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size_bytes = Some(u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")));
                    transmission_flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                REP_ACK => break,
                other => return Err(bad(&format!("option refused: reply {other:#x}"))),
            }
        }
        let size_bytes = size_bytes.ok_or_else(|| bad("no export size"))?;
        Ok(NbdClient { stream: s, size_bytes, transmission_flags, next_handle: 1 })
    }

    fn request(&mut self, command: u16, flags: u16, offset: u64, length: u32, data: &[u8]) -> Result<u64, NbdError> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&command.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&length.to_be_bytes());
        h.extend_from_slice(data);
        self.stream.write_all(&h)?;
        Ok(handle)
    }

    fn reply(&mut self, handle: u64, read_into: Option<&mut [u8]>) -> Result<(), NbdError> {
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::Io(io::Error::new(io::ErrorKind::InvalidData, "bad reply magic")));
        }
        let error = read_u32(&mut self.stream)?;
        let got = read_u64(&mut self.stream)?;
        if got != handle {
            return Err(NbdError::Io(io::Error::new(io::ErrorKind::InvalidData, "reply for another request")));
        }
        if error != 0 {
            return Err(NbdError::Server(error));
        }
        if let Some(buf) = read_into {
            self.stream.read_exact(buf)?;
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let handle = self.request(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        self.reply(handle, None)
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let handle = self.request(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        self.reply(handle, Some(buf))
    }

    pub fn flush(&mut self) -> Result<(), NbdError> {
        let handle = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(handle, None)
    }

    /// Reads the whole export in 128 KiB requests.
    pub fn read_all(&mut self) -> Result<Vec<u8>, NbdError> {
        let mut out = vec![0u8; self.size_bytes as usize];
        for (i, chunk) in out.chunks_mut(128 * 1024).enumerate() {
            self.read(i as u64 * 128 * 1024, chunk)?;
        }
        Ok(out)
    }
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
