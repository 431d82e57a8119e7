//! A small blocking client, for the asd manager (which has no async runtime) and for tools.
//!
//! ```no_run
//! use asd_protocol::client::Client;
//! use asd_protocol::{Method, Mode};
//! let mut c = Client::connect_default()?;
//! let backup = c.bind_backup("/home/alice/.cache".as_ref(), Mode::Copy)?;
//! let raw = c.call(Method::ListMounts)?; // the reply's parameters, as JSON
//! # Ok::<(), asd_protocol::client::ClientError>(())
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::error::ServiceError;
use crate::frame::{encode, FrameDecoder, FrameError};
use crate::message::{Call, Reply};
use crate::method::{
    AreaReply, BackupReply, CoverReply, DetachReply, EntryKind, FreezeReply, Info,
    InterfaceDescription, Method, Mode, MountList, OverlayReply,
};

/// Largest reply the client accepts (replies are small; a list of mounts is the biggest).
pub const MAX_REPLY: usize = 4 * 1024 * 1024;

/// Default time the client waits for a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to the asd helper at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the asd helper: {0}")]
    Io(#[from] io::Error),
    #[error("the asd helper sent a malformed reply: {0}")]
    Protocol(String),
    #[error("the asd helper refused: {0}")]
    Service(#[from] ServiceError),
    #[error("path is not valid UTF-8, so it cannot be sent: {0:?}")]
    NonUtf8Path(PathBuf),
}

impl ClientError {
    /// The helper's error, if the helper answered with one.
    pub fn service(&self) -> Option<&ServiceError> {
        match self {
            ClientError::Service(e) => Some(e),
            _ => None,
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> ClientError {
        ClientError::Protocol(e.to_string())
    }
}

/// How long a caller turned away at capacity ([`ServiceError::is_capacity`]) waits between
/// tries: exponentially longer from `first` to `max`, each wait drawn at random between half and
/// all of it (so that the many clients of a login storm, turned away at the same moment, do not
/// all come back at the same moment), for at most `budget` in all.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    budget: Duration,
    started: Instant,
    tries: u32,
    seed: u64,
}

impl Backoff {
    /// What the asd manager uses: 100 ms doubling up to 5 s, for at most 5 minutes (within the
    /// 10 minutes systemd gives asd.service to start and stop; a thousand users stopping at
    /// once kept one helper, on 2 CPUs, busy with their unmounts for about 4).
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);
    pub const BUDGET: Duration = Duration::from_secs(300);

    pub fn new(first: Duration, max: Duration, budget: Duration) -> Backoff {
        // Jitter needs no good randomness, only different numbers in different processes.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seed = (u64::from(std::process::id()) << 32 | u64::from(nanos)) | 1;
        Backoff {
            next: first,
            max,
            budget,
            started: Instant::now(),
            tries: 0,
            seed,
        }
    }

    /// The next wait, or `None` once the budget is spent (the caller gives up).
    pub fn next_delay(&mut self) -> Option<Duration> {
        let left = self.budget.checked_sub(self.started.elapsed())?;
        if left.is_zero() {
            return None;
        }
        // xorshift64: a different wait for every client and every try.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let full = self.next.min(self.max);
        let half = full / 2;
        let spread = u64::try_from((full - half).as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let wait = (half + Duration::from_micros(self.seed % spread)).min(left);
        self.next = full.saturating_mul(2);
        self.tries += 1;
        Some(wait)
    }

    /// Waits handed out so far.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// Time since the first try.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(Backoff::FIRST, Backoff::MAX, Backoff::BUDGET)
    }
}

/// One connection to the helper. Calls are answered in order; the connection can be reused.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
}

fn path_str(p: &Path) -> Result<String, ClientError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| ClientError::NonUtf8Path(p.to_path_buf()))
}

fn decode<T: DeserializeOwned>(params: Map<String, Value>) -> Result<T, ClientError> {
    serde_json::from_value(Value::Object(params)).map_err(|e| ClientError::Protocol(e.to_string()))
}

impl Client {
    /// Connects to the helper's socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Client::from_stream(stream)
    }

    /// Connects to `$ASD_HELPER_SOCKET`, or to the default socket.
    pub fn connect_default() -> Result<Client, ClientError> {
        Client::connect(crate::socket_path())
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<Client, ClientError> {
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Client {
            stream,
            decoder: FrameDecoder::new(MAX_REPLY),
        })
    }

    /// How long to wait for a reply (and for a write); `None` waits forever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)?;
        Ok(())
    }

    fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Reply::parse(&frame).map_err(|e| ClientError::Protocol(e.to_string()));
            }
            let n = match self.stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                self.decoder.finish()?;
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the helper closed the connection without a reply",
                )));
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    /// Sends any call and returns the raw reply (error replies included, not turned into `Err`).
    pub fn call_raw(&mut self, call: &Call) -> Result<Reply, ClientError> {
        if let Err(e) = self.stream.write_all(&encode(&call.to_json())) {
            // The helper may have answered (e.g. TooManyConnections) and closed before reading
            // the call: its error is the better report.
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                if let Ok(reply) = self.read_reply() {
                    return Ok(reply);
                }
            }
            return Err(e.into());
        }
        if call.oneway {
            return Ok(Reply::default());
        }
        self.read_reply()
    }

    /// Calls `method`; returns the reply's parameters, or the helper's error as
    /// [`ClientError::Service`].
    pub fn call(&mut self, method: Method) -> Result<Map<String, Value>, ClientError> {
        let reply = self.call_raw(&method.to_call())?;
        match reply.error {
            Some(name) => Err(ServiceError::from_wire(&name, reply.parameters).into()),
            None => Ok(reply.parameters),
        }
    }

    /// Sends `method` as a `oneway` call: the helper does it and sends no reply.
    pub fn call_oneway(&mut self, method: Method) -> Result<(), ClientError> {
        let mut call = method.to_call();
        call.oneway = true;
        self.call_raw(&call).map(|_| ())
    }

    pub fn get_info(&mut self) -> Result<Info, ClientError> {
        decode(self.call(Method::GetInfo)?)
    }

    pub fn get_interface_description(&mut self, interface: &str) -> Result<String, ClientError> {
        let d: InterfaceDescription = decode(self.call(Method::GetInterfaceDescription {
            interface: interface.to_string(),
        })?)?;
        Ok(d.description)
    }

    /// Prepares `$VOLATILE/asd-<user>`; returns its path.
    pub fn prepare_area(&mut self, volatile: &Path) -> Result<PathBuf, ClientError> {
        let r: AreaReply = decode(self.call(Method::PrepareArea {
            volatile: path_str(volatile)?,
        })?)?;
        Ok(r.area.into())
    }

    /// Binds `target` onto its backup path; returns the backup path.
    pub fn bind_backup(&mut self, target: &Path, mode: Mode) -> Result<PathBuf, ClientError> {
        let r: BackupReply = decode(self.call(Method::BindBackup {
            target: path_str(target)?,
            mode,
        })?)?;
        Ok(r.backup.into())
    }

    /// Mounts the overlay for `target` (overlay mode).
    pub fn mount_overlay(&mut self, target: &Path) -> Result<OverlayReply, ClientError> {
        decode(self.call(Method::MountOverlay {
            target: path_str(target)?,
        })?)
    }

    /// Binds the volatile dir over `target`; returns the volatile dir.
    pub fn cover(&mut self, target: &Path, mode: Mode) -> Result<PathBuf, ClientError> {
        let r: CoverReply = decode(self.call(Method::Cover {
            target: path_str(target)?,
            mode,
        })?)?;
        Ok(r.volatile.into())
    }

    /// Unmounts everything recorded for `target` for this user.
    pub fn detach(&mut self, target: &Path) -> Result<DetachReply, ClientError> {
        decode(self.call(Method::Detach {
            target: path_str(target)?,
        })?)
    }

    /// Makes the cover of `target` read-only (`frozen`) or writable again; returns whether it is
    /// read-only now (making it so fails softly while files are open for writing on it).
    pub fn freeze(&mut self, target: &Path, frozen: bool) -> Result<bool, ClientError> {
        let r: FreezeReply = decode(self.call(Method::Freeze {
            target: path_str(target)?,
            frozen,
        })?)?;
        Ok(r.frozen)
    }

    /// Creates asd's entry `name` beside `target` (a directory or file) for the caller.
    pub fn make_beside(
        &mut self,
        target: &Path,
        name: &str,
        kind: EntryKind,
    ) -> Result<(), ClientError> {
        self.call(Method::MakeBeside {
            target: path_str(target)?,
            name: name.to_string(),
            kind,
        })
        .map(|_| ())
    }

    /// Renames asd's entry `from` beside `target` to `to`.
    pub fn rename_beside(
        &mut self,
        target: &Path,
        from: &str,
        to: &str,
    ) -> Result<(), ClientError> {
        self.call(Method::RenameBeside {
            target: path_str(target)?,
            from: from.to_string(),
            to: to.to_string(),
        })
        .map(|_| ())
    }

    /// Removes asd's entry `name` beside `target` (a file or an empty directory).
    pub fn remove_beside(&mut self, target: &Path, name: &str) -> Result<(), ClientError> {
        self.call(Method::RemoveBeside {
            target: path_str(target)?,
            name: name.to_string(),
        })
        .map(|_| ())
    }

    /// The caller's area and mounts.
    pub fn list_mounts(&mut self) -> Result<MountList, ClientError> {
        decode(self.call(Method::ListMounts)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jitters_and_ends() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_millis(800),
            Duration::from_secs(3600),
        );
        let waits: Vec<Duration> = (0..8).filter_map(|_| b.next_delay()).collect();
        assert_eq!(waits.len(), 8);
        let caps = [100, 200, 400, 800, 800, 800, 800, 800];
        for (w, cap) in waits.iter().zip(caps) {
            let cap = Duration::from_millis(cap);
            assert!(
                *w >= cap / 2 && *w <= cap,
                "{w:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        assert_eq!(b.tries(), 8);
        // Two clients started at the same moment do not wait alike.
        let mut c = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::MAX,
        );
        let mut d = c.clone();
        d.seed ^= 0x9e37_79b9_7f4a_7c15;
        let same = (0..16).filter(|_| c.next_delay() == d.next_delay()).count();
        assert!(same < 4, "{same} of 16 waits alike");
        // The budget bounds the whole.
        let mut e = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::ZERO,
        );
        assert_eq!(e.next_delay(), None);
    }
}
