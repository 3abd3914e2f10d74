//! The control socket: `cairn status`, `sync`, `versions` and `restore`
//! talk to the running daemon through `$CAIRN_HOME/control.sock` (a Unix
//! socket; on Windows a named pipe named after that path), one JSON request
//! and one JSON reply per connection.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::vfs::{Synced, Vfs};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    /// Waits until everything closed is committed, then publishes; with
    /// `wait_secs`, answers by then with what still waits (the client asks
    /// again, showing why).
    Sync {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_secs: Option<f64>,
    },
    Versions {
        path: String,
    },
    Restore {
        path: String,
        version: i64,
    },
    /// `cairn devices revoke`: a machine's name or the start of its id.
    Revoke {
        device: String,
    },
}

/// Longest request line the daemon reads.
const MAX_REQUEST: u64 = 64 << 10;

pub fn socket_path(home: &Path) -> PathBuf {
    home.join("control.sock")
}

/// Turns a path the user typed (inside the mount, or a path of the drive
/// such as "/notes.txt") into a path of the drive. The client made it
/// absolute against its own working directory; the daemon's means nothing.
fn drive_path(mountpoint: &Path, path: &str) -> String {
    match Path::new(path).strip_prefix(mountpoint) {
        Ok(rest) => format!("/{}", rest.display()),
        Err(_) => path.to_string(),
    }
}

async fn answer(vfs: &Arc<Vfs>, mountpoint: &Path, req: Request) -> Value {
    let result = match req {
        Request::Status => vfs
            .blocking(|vfs| Ok((vfs.status()?, vfs.sync_stopped()?)))
            .await
            .map(|(s, stopped)| json!({ "mountpoint": mountpoint, "status": s, "sync_stopped": stopped })),
        Request::Sync { wait_secs } => {
            // A bad or huge wait from a client means "no answer before done".
            let deadline = wait_secs
                .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
                .and_then(|d| std::time::Instant::now().checked_add(d));
            match vfs.sync(deadline).await {
                Ok(Synced::Done(n)) => match vfs.sync_devices().await {
                    Ok(devices) => vfs.publish_namespace().await.map(
                        |seq| json!({ "committed": true, "synced": n, "devices": devices, "namespace_published": seq }),
                    ),
                    Err(e) => Err(e),
                },
                Ok(Synced::Waiting { versions, last_error }) => {
                    Ok(json!({ "committed": false, "waiting": versions, "last_error": last_error }))
                }
                Err(e) => Err(e),
            }
        }
        Request::Revoke { device } => vfs.revoke_device(device).await.map(|r| json!({ "revoked": r })),
        Request::Versions { path } => {
            let path = drive_path(mountpoint, &path);
            let asked = path.clone();
            vfs.blocking(move |vfs| vfs.versions(&asked))
                .await
                .map(|v| json!({ "path": path, "versions": v }))
        }
        Request::Restore { path, version } => {
            let path = drive_path(mountpoint, &path);
            let asked = path.clone();
            vfs.blocking(move |vfs| vfs.restore(&asked, version))
                .await
                .map(|n| json!({ "path": path, "restored": version, "version": n }))
        }
    };
    match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            v
        }
        Err(e) => json!({ "ok": false, "error": e.to_string() }),
    }
}

/// One connection: a request line in, a reply line out.
async fn converse(stream: impl AsyncRead + AsyncWrite + Unpin, vfs: Arc<Vfs>, mountpoint: PathBuf) {
    let (read, mut write) = tokio::io::split(stream);
    let mut line = String::new();
    // A request is a path and a number: a client sending more is not ours.
    let bounded = tokio::io::AsyncReadExt::take(read, MAX_REQUEST);
    if tokio::io::BufReader::new(bounded).read_line(&mut line).await.is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => answer(&vfs, &mountpoint, req).await,
        Err(e) => json!({ "ok": false, "error": format!("bad request: {e}") }),
    };
    let _ = write.write_all(format!("{reply}\n").as_bytes()).await;
}

/// Serves the socket until the process ends.
#[cfg(unix)]
pub async fn serve(vfs: Arc<Vfs>, socket: PathBuf, mountpoint: PathBuf) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)?;
    let me = crate::sys::current_owner().0;
    loop {
        let (stream, _) = listener.accept().await?;
        // The socket is in the owner-only home; this holds even if that
        // home is ever opened up: only its owner and root are answered.
        match stream.peer_cred().map(|c| c.uid()) {
            Ok(uid) if uid == me || uid == 0 => {}
            other => {
                tracing::warn!(peer = ?other, "refused a control connection from another user");
                continue;
            }
        }
        tokio::spawn(converse(stream, vfs.clone(), mountpoint.clone()));
    }
}

/// Serves the named pipe until the process ends: one pipe instance waits
/// for the next client while the last one is answered. The pipe is its
/// owner's only (DACL); it must be the first of its name (a pipe another
/// user made first is refused, not joined), and a client not running as
/// the owner is turned away.
#[cfg(windows)]
pub async fn serve(vfs: Arc<Vfs>, socket: PathBuf, mountpoint: PathBuf) -> std::io::Result<()> {
    use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};
    let name = pipe_name(&socket);
    let mut security = crate::winsec::PipeSecurity::new()?;
    let mut create = |first: bool| -> std::io::Result<NamedPipeServer> {
        // SAFETY: the attributes and their descriptor live in `security`,
        // beyond this call.
        unsafe {
            ServerOptions::new()
                .first_pipe_instance(first)
                .reject_remote_clients(true)
                .create_with_security_attributes_raw(&name, security.attributes())
        }
    };
    let mut server = create(true).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("creating the control pipe {name} (does another process, maybe another user's, hold it?): {e}"),
        )
    })?;
    loop {
        server.connect().await?;
        let connected = std::mem::replace(&mut server, create(false)?);
        match crate::winsec::peer_is_me(&connected, false) {
            Ok(true) => {
                tokio::spawn(converse(connected, vfs.clone(), mountpoint.clone()));
            }
            other => tracing::warn!(peer = ?other, "refused a control connection from another user"),
        }
    }
}

/// The pipe for a CAIRN_HOME: pipe names are global, so it is derived from
/// the socket path, one per home.
#[cfg(windows)]
fn pipe_name(socket: &Path) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(socket.to_string_lossy().as_bytes());
    format!(r"\\.\pipe\cairn-{}", data_encoding::HEXLOWER.encode(&digest[..8]))
}

#[cfg(unix)]
fn connect(socket: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(socket)
}

/// Opens the daemon's pipe, refusing one served by another user (who could
/// have made a pipe of that name while no daemon ran, to read requests and
/// forge replies).
#[cfg(windows)]
fn connect(socket: &Path) -> std::io::Result<std::fs::File> {
    let pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pipe_name(socket))?;
    if !crate::winsec::peer_is_me(&pipe, true)? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the control pipe is served by another user's process",
        ));
    }
    Ok(pipe)
}

/// Sends one request to the daemon of `home` and returns its reply.
pub fn request(home: &Path, req: &Request) -> anyhow::Result<Value> {
    let socket = socket_path(home);
    let mut stream = connect(&socket).map_err(|e| {
        anyhow::anyhow!(
            "no cairn daemon answers at {} ({e}); is `cairn mount` running with this CAIRN_HOME?",
            socket.display()
        )
    })?;
    stream.write_all(format!("{}\n", serde_json::to_string(req)?).as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let reply: Value = serde_json::from_str(&line)?;
    if reply["ok"] != json!(true) {
        anyhow::bail!(
            "{}",
            reply["error"].as_str().unwrap_or("the daemon refused the request")
        );
    }
    Ok(reply)
}
