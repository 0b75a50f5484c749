//! The control socket: one Unix socket per daemon (`/run/vpcd/HOST.sock`, mode 0600), one
//! JSON object per line each way. `vpcd ctl` is its client.
//!
//! A request is `{"cmd": "status"}`, `{"cmd": "stats", "prometheus": true}` and so on
//! ([`Request`]); the reply is `{"ok": true, "text": "...", "data": {...}}` or
//! `{"ok": false, "error": "..."}` ([`Reply`]). A malformed or oversized request gets an error
//! reply, a client that sends nothing for 5 s is dropped, and neither stops the daemon.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The largest request accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Where a daemon for `host` listens unless told otherwise.
pub fn default_path(host: &str) -> PathBuf {
    PathBuf::from(format!("/run/vpcd/{host}.sock"))
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The generation in force, the topology's hash, uptime, workers, the last reload, the
    /// capture running.
    Status {},
    /// Re-read the topology; the errors come back.
    Reload {},
    /// The counters, as text or in the Prometheus format.
    Stats {
        /// The Prometheus text format.
        #[serde(default)]
        prometheus: bool,
    },
    /// Zero every counter.
    ClearCounters {},
    /// The load balancers' backends: health, who checks them, open sessions.
    Health {},
    /// The connection table, or (`flush`) empty it.
    Flows {
        /// Only this instance's connections.
        #[serde(default)]
        instance: Option<String>,
        /// Remove them instead of listing them.
        #[serde(default)]
        flush: bool,
    },
    /// Trace a packet through this daemon's live tables and the hosts after it.
    Trace(crate::trace::TraceArgs),
    /// Write what a port sends and receives (or every dropped packet) to a pcapng file; the
    /// reply comes when the capture ends (`count` packets written, or `seconds` passed).
    Capture {
        /// An instance of this host by name, `underlay`, `internet` (the gateway's internet
        /// device) or `drops`. These three words name the ports even if an instance is
        /// called so.
        point: String,
        /// The file, an absolute path (the daemon's working directory is not the client's);
        /// written by the daemon, replaced if it exists.
        file: PathBuf,
        /// Stop after this many packets.
        #[serde(default)]
        count: Option<u64>,
        /// Stop after this many seconds ([`CAPTURE_SECONDS`] by default, at most
        /// [`CAPTURE_MAX_SECONDS`]).
        #[serde(default)]
        seconds: Option<u64>,
    },
}

/// How long a capture runs when neither `seconds` nor the count ends it first.
pub const CAPTURE_SECONDS: u64 = 10;
/// The longest capture (its client waits for the reply as long).
pub const CAPTURE_MAX_SECONDS: u64 = 3600;
/// How long the daemon may take to answer a request, beyond what the request itself lasts.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(20);

impl Request {
    /// How long the answer may take: [`ANSWER_WITHIN`], plus a capture's duration.
    pub fn answer_within(&self) -> Duration {
        match self {
            Request::Capture { seconds, .. } => {
                ANSWER_WITHIN + Duration::from_secs(capture_seconds(*seconds))
            }
            _ => ANSWER_WITHIN,
        }
    }
}

/// A capture's duration: `seconds` as asked, by default [`CAPTURE_SECONDS`], bounded by
/// [`CAPTURE_MAX_SECONDS`].
pub fn capture_seconds(seconds: Option<u64>) -> u64 {
    seconds.unwrap_or(CAPTURE_SECONDS).min(CAPTURE_MAX_SECONDS)
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The request was carried out.
    pub ok: bool,
    /// For people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// For programs (`--json`).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
    /// Why not, when not `ok`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl Reply {
    /// A successful reply.
    pub fn ok(text: impl Into<String>, data: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            text: text.into(),
            data,
            error: String::new(),
        }
    }

    /// A refusal.
    pub fn error(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            text: String::new(),
            data: serde_json::Value::Null,
            error: error.into(),
        }
    }
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request of more than {MAX_REQUEST} bytes refused"));
    }
    serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))
}

/// A listening control socket; the socket file goes when it is dropped.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` (mode 0600) and answers each request with `handle`, each client on a
/// thread of its own (at most 16 at once). A socket file left by a daemon that died is replaced; one that a live
/// daemon answers on is an error.
pub fn serve<F>(path: &Path, handle: F) -> std::io::Result<Server>
where
    F: Fn(Request) -> Reply + Send + Sync + 'static,
{
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is another daemon's control socket", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = Arc::new(handle);
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("vpcd-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = stream {
                    accept(s, handle.clone(), open.clone());
                }
            }
        })?;
    Ok(Server {
        path: path.to_path_buf(),
        stop,
    })
}

/// Clients talked to at once, at most; one more is told the daemon is busy.
const MAX_CLIENTS: usize = 16;

/// Each client on a thread of its own, so that an idle one delays nobody.
fn accept<F>(s: UnixStream, handle: Arc<F>, open: Arc<AtomicUsize>)
where
    F: Fn(Request) -> Reply + Send + Sync + 'static,
{
    if open.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
        open.fetch_sub(1, Ordering::SeqCst);
        let _ = (&s).write_all(b"{\"ok\":false,\"error\":\"busy: too many control clients\"}\n");
        return;
    }
    let count = open.clone();
    let spawned = std::thread::Builder::new()
        .name("vpcd-control-client".into())
        .spawn(move || {
            let _ = converse(s, &*handle);
            count.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One connection: requests and replies, a line each, until the client closes.
fn converse(stream: UnixStream, handle: &dyn Fn(Request) -> Reply) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        // A line cut at MAX_REQUEST + 1 bytes is refused by `parse_request`'s own bound; the
        // rest of it is never read, so the conversation ends there.
        let oversized = !line.ends_with(b"\n") && n > MAX_REQUEST;
        let reply = match parse_request(line.strip_suffix(b"\n").unwrap_or(&line)) {
            Ok(req) => handle(req),
            Err(e) => Reply::error(e),
        };
        let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        out.push(b'\n');
        writer.write_all(&out)?;
        if oversized {
            return Ok(());
        }
    }
}

/// Sends one request to the daemon listening on `path` and reads its reply.
pub fn ask(path: &Path, request: &Request) -> std::io::Result<Reply> {
    let stream = UnixStream::connect(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{}: {e} (is vpcd running for this host?)", path.display()),
        )
    })?;
    stream.set_read_timeout(Some(request.answer_within() + Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the daemon's reply is not understood: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vpcd-ctl-{name}-{}.sock", std::process::id()))
    }

    #[test]
    fn requests_parse_and_refuse_what_they_should() {
        assert_eq!(
            parse_request(br#"{"cmd":"status"}"#),
            Ok(Request::Status {})
        );
        assert_eq!(
            parse_request(br#"{"cmd":"stats","prometheus":true}"#),
            Ok(Request::Stats { prometheus: true })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"flows","instance":"web-1"}"#),
            Ok(Request::Flows {
                instance: Some("web-1".into()),
                flush: false
            })
        );
        assert_eq!(
            parse_request(
                br#"{"cmd":"capture","point":"drops","file":"/tmp/x.pcapng","seconds":3}"#
            ),
            Ok(Request::Capture {
                point: "drops".into(),
                file: "/tmp/x.pcapng".into(),
                count: None,
                seconds: Some(3),
            })
        );
        let capture = |seconds| Request::Capture {
            point: "web-1".into(),
            file: "/tmp/x".into(),
            count: Some(5),
            seconds,
        };
        assert_eq!(capture(None).answer_within(), Duration::from_secs(30));
        assert_eq!(
            capture(Some(1 << 40)).answer_within(),
            Duration::from_secs(CAPTURE_MAX_SECONDS) + ANSWER_WITHIN
        );
        assert_eq!(Request::Status {}.answer_within(), ANSWER_WITHIN);
        for bad in [
            &b"{"[..],
            br#"{"cmd":"reboot"}"#,
            br#"{"cmd":"status","x":1}"#,
            b"",
        ] {
            assert!(
                parse_request(bad)
                    .unwrap_err()
                    .starts_with("malformed request")
            );
        }
    }

    #[test]
    fn a_server_answers_survives_garbage_and_leaves_no_file() {
        let path = socket("serve");
        let server = serve(&path, |r| {
            Reply::ok(format!("{r:?}"), serde_json::Value::Null)
        })
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            serve(&path, |_| Reply::error("x")).is_err(),
            "a second server"
        );
        // Garbage, then an oversized line: error replies, and the server goes on.
        let s = UnixStream::connect(&path).unwrap();
        (&s).write_all(b"not json\n").unwrap();
        let mut r = BufReader::new(&s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("malformed request"), "{line}");
        let s = UnixStream::connect(&path).unwrap();
        (&s).write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("bytes refused"), "{line}");
        let reply = ask(&path, &Request::Status {}).unwrap();
        assert_eq!(reply, Reply::ok("Status", serde_json::Value::Null));
        drop(server);
        assert!(!path.exists());
        assert!(ask(&path, &Request::Status {}).is_err());
    }
}
