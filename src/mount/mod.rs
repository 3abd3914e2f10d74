//! `cairn mount` and the commands that talk to a running mount.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::Value;

use cairn::config::Config;
use cairn::control::{self, Request};
use cairn::vfs::{Status, Vfs, VfsOptions};

#[cfg(unix)]
#[path = "fuse_session.rs"]
mod session;
#[cfg(unix)]
pub use session::watch_mount;
#[cfg(windows)]
#[path = "winfsp_session.rs"]
mod session;

pub struct MountArgs {
    pub allow_other: bool,
    pub network: bool,
    pub read_only: bool,
    pub writeback_delay: f64,
    pub cache_size_mib: u64,
    pub repair_interval: f64,
}

pub fn run(home: &Path, dir: &Path, args: MountArgs) -> Result<ExitCode> {
    let MountArgs {
        allow_other,
        network,
        read_only,
        writeback_delay,
        cache_size_mib,
        repair_interval,
    } = args;
    if !(0.0..=86400.0).contains(&writeback_delay) {
        bail!("--writeback-delay must be between 0 and 86400 seconds");
    }
    // The platform's checks come first: a missing WinFsp or a busy mount
    // point fails before anything is created.
    let mountpoint = session::prepare(dir)?;
    let config_path = home.join("config.toml");
    if !config_path.exists() {
        Config::embedded_default(home).write_new(home)?;
        eprintln!(
            "cairn: initialised {} with the embedded default grid (5 local servers, 3-of-5)",
            home.display()
        );
    }
    let config = Config::load(&config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let vfs = Vfs::new(
        VfsOptions {
            home: home.to_owned(),
            writeback_delay: Duration::from_secs_f64(writeback_delay),
            read_only,
            cache_max_bytes: cache_size_mib << 20,
        },
        &config,
        runtime.handle().clone(),
    )?;
    spawn_background(&runtime, &vfs, &config, repair_interval, read_only);
    let socket = control::socket_path(home);
    runtime.spawn({
        let (vfs, socket, mountpoint) = (vfs.clone(), socket.clone(), mountpoint.clone());
        async move {
            if let Err(e) = control::serve(vfs, socket, mountpoint).await {
                tracing::error!(error = %e, "control socket stopped");
            }
        }
    });

    let options = SessionOptions {
        home: home.to_owned(),
        allow_other,
        read_only,
        network,
    };
    session::serve(&runtime, vfs.clone(), &mountpoint, &options)?;

    // Unmounted: everything written is sealed (the adapter did it; again in
    // case the platform never told it), and the queue is in the catalog.
    vfs.seal_all()?;
    let pending = vfs.status()?.queue.len();
    let _ = std::fs::remove_file(&socket);
    if pending > 0 {
        let versions = if pending == 1 { "version" } else { "versions" };
        eprintln!("cairn: unmounted; {pending} {versions} not yet on the grid will upload at the next mount");
    } else {
        eprintln!("cairn: unmounted; everything is on the grid");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

/// What the platform's session needs beyond the core.
pub struct SessionOptions {
    /// Windows: the staging disk's free space and the volume serial number.
    #[cfg_attr(unix, allow(dead_code))]
    pub home: std::path::PathBuf,
    pub allow_other: bool,
    pub read_only: bool,
    /// Windows: a network drive instead of a local disk.
    pub network: bool,
}

/// Uploads, cache eviction, automatic repair and namespace publication.
fn spawn_background(
    runtime: &tokio::runtime::Runtime,
    vfs: &Arc<Vfs>,
    config: &Config,
    repair_interval: f64,
    read_only: bool,
) {
    runtime.spawn(vfs.clone().run_uploads());
    every(
        runtime,
        vfs,
        Duration::from_secs(2),
        "cache eviction",
        |vfs| async move { vfs.blocking(|vfs| vfs.evict().map(drop)).await },
    );
    every(
        runtime,
        vfs,
        cairn::vfs::DISK_SYNC_INTERVAL,
        "syncing the staging disk",
        |vfs| async move { vfs.blocking(|vfs| vfs.sync_staging_disk()).await },
    );
    if read_only {
        tracing::info!("read-only: no automatic repair");
        return;
    }
    let repair = Duration::from_secs_f64(repair_interval.max(0.1));
    every(runtime, vfs, repair, "automatic repair", |vfs| async move {
        vfs.repair_degraded().await.map(drop)
    });
    // Other machines' changes are looked for every second (a doorbell read
    // from each server), and this machine's published as they come.
    every(
        runtime,
        vfs,
        Duration::from_millis(config.sync.poll_ms.max(100)),
        "merging with the drive's other machines; trying again",
        |vfs| async move { vfs.sync_devices().await.map(drop) },
    );
    let publish = Duration::from_secs(config.namespace.interval_secs.max(1));
    every(
        runtime,
        vfs,
        publish,
        "publishing the namespace; trying again later",
        |vfs| async move { vfs.publish_namespace().await.map(drop) },
    );
}

/// How often a background duty failing the same way says so again.
const REPEAT_LOGGED: Duration = Duration::from_secs(300);

/// Runs `job` every `period` for the life of the runtime, logging failures.
fn every<F, Fut>(runtime: &tokio::runtime::Runtime, vfs: &Arc<Vfs>, period: Duration, what: &'static str, job: F)
where
    F: Fn(Arc<Vfs>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = cairn::vfs::VfsResult<()>> + Send,
{
    let vfs = vfs.clone();
    runtime.spawn(async move {
        // The same failure again (a revoked machine, a server down for an
        // hour) is logged once, then once every `REPEAT_LOGGED`.
        let mut last: Option<(String, tokio::time::Instant)> = None;
        loop {
            tokio::time::sleep(period).await;
            match job(vfs.clone()).await {
                Err(e) => {
                    let e = e.to_string();
                    let now = tokio::time::Instant::now();
                    if last
                        .as_ref()
                        .is_none_or(|(was, at)| *was != e || now - *at >= REPEAT_LOGGED)
                    {
                        tracing::warn!(error = %e, "{what}");
                        last = Some((e, now));
                    }
                }
                Ok(()) => last = None,
            }
        }
    });
}

fn print_json(v: &Value) -> Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(ExitCode::SUCCESS)
}

pub fn status(home: &Path, json: bool) -> Result<ExitCode> {
    let reply = control::request(home, &Request::Status)?;
    if json {
        return print_json(&reply);
    }
    let status: Status = serde_json::from_value(reply["status"].clone())?;
    println!("mounted at {}", reply["mountpoint"].as_str().unwrap_or("?"));
    if let Some(why) = reply["sync_stopped"].as_str() {
        println!("NOT SYNCING with the drive's other machines: {why}");
    }
    let io = &status.io_path;
    if !io.page_cache.is_empty() {
        println!("page cache: {}", io.page_cache);
        let why = io
            .read_ahead_note
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        println!("read-ahead: {} KiB{why}", io.read_ahead_kib);
    }
    for path in &status.open_for_write {
        println!("  writing    {path}");
    }
    if status.upload_memory_bytes > 0 || status.spill_bytes > 0 {
        println!(
            "upload buffers: {} of {} MiB in memory, {} MiB spilled to disk for slow servers",
            status.upload_memory_bytes >> 20,
            status.upload_memory_limit >> 20,
            status.spill_bytes >> 20
        );
    }
    if status.queue.is_empty() {
        println!("everything closed is committed on the grid");
        return Ok(ExitCode::SUCCESS);
    }
    let bars = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stdout());
    let style = indicatif::ProgressStyle::with_template("  {msg:<40} [{bar:25}] {bytes}/{total_bytes}")
        .expect("template")
        .progress_chars("=> ");
    for e in &status.queue {
        let bar = bars.add(indicatif::ProgressBar::new(e.size.max(1)).with_style(style.clone()));
        let mut msg = format!("{} v{} {}", e.path, e.version, e.state);
        if let Some(err) = &e.last_error {
            msg.push_str(&format!(" (attempt {}: {err})", e.attempts));
        }
        bar.set_message(msg);
        bar.set_position(e.sent);
        bar.abandon();
    }
    if !console_is_terminal() {
        for e in &status.queue {
            println!(
                "  {:<10} {} v{} {}/{} bytes",
                e.state, e.path, e.version, e.sent, e.size
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn console_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}

/// How long one `sync` request waits before the daemon says what still
/// waits (shown on the spinner while the client asks again).
const SYNC_POLL: Duration = Duration::from_secs(2);

pub fn sync(home: &Path, timeout: Option<f64>, json: bool) -> Result<ExitCode> {
    let limit = timeout
        .map(|t| Duration::try_from_secs_f64(t).map_err(|_| anyhow::anyhow!("--timeout {t}: not a number of seconds")))
        .transpose()?;
    let started = std::time::Instant::now();
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message("waiting for the grid");
    spinner.enable_steady_tick(Duration::from_millis(120));
    let mut told = false;
    loop {
        let left = limit.map(|l| l.saturating_sub(started.elapsed()));
        let wait = left.map_or(SYNC_POLL, |l| l.min(SYNC_POLL));
        let reply = control::request(
            home,
            &Request::Sync {
                wait_secs: Some(wait.as_secs_f64()),
            },
        )?;
        // An older daemon ignores the wait and answers once done.
        if reply["committed"] != false {
            spinner.finish_and_clear();
            if json {
                return print_json(&reply);
            }
            println!("every closed file is committed on the grid");
            return Ok(ExitCode::SUCCESS);
        }
        let waiting = reply["waiting"].as_u64().unwrap_or(0);
        let why = match reply["last_error"].as_str() {
            Some(e) => format!("{waiting} version(s) not committed; the last upload attempt failed: {e}"),
            None => format!("{waiting} version(s) uploading"),
        };
        if left.is_some_and(|l| l <= wait) {
            spinner.finish_and_clear();
            let t = timeout.unwrap_or_default();
            if json {
                let mut reply = reply;
                reply["ok"] = false.into();
                reply["error"] = format!("not committed within {t} s").into();
                print_json(&reply)?;
                return Ok(ExitCode::FAILURE);
            }
            bail!("not everything closed is committed within {t} s: {why} (they stay queued and upload once the grid takes them)");
        }
        spinner.set_message(format!("waiting for the grid: {why}"));
        // Without a terminal the spinner is hidden: say once why it waits.
        if !told && reply["last_error"].is_string() && !console_is_terminal() {
            eprintln!("cairn sync: still waiting: {why}");
            told = true;
        }
    }
}

/// A path as the user meant it: relative to the user's working directory
/// (the daemon's is not theirs), so the daemon only ever gets absolute ones.
fn client_path(path: &str) -> Result<String> {
    let absolute = std::path::absolute(path)?;
    absolute
        .to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{path}: not valid UTF-8"))
}

pub fn versions(home: &Path, path: &str, json: bool) -> Result<ExitCode> {
    let path = &client_path(path)?;
    let reply = control::request(home, &Request::Versions { path: path.into() })?;
    if json {
        return print_json(&reply);
    }
    println!(
        "{:>4}  {:>12}  {:<10}  {:<20}  sha256",
        "ver", "size", "state", "time (UTC)"
    );
    for v in reply["versions"].as_array().into_iter().flatten() {
        let ns = v["created_ns"].as_i64().unwrap_or(0);
        let sha = v["sha256"].as_str().filter(|s| !s.is_empty()).unwrap_or("-");
        println!(
            "{:>4}  {:>12}  {:<10}  {:<20}  {sha}",
            v["num"].as_i64().unwrap_or(0),
            v["size"].as_u64().unwrap_or(0),
            v["state"].as_str().unwrap_or("?"),
            format_time(ns)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn restore(home: &Path, path: &str, version: i64, json: bool) -> Result<ExitCode> {
    let path = &client_path(path)?;
    let reply = control::request(
        home,
        &Request::Restore {
            path: path.into(),
            version,
        },
    )?;
    if json {
        return print_json(&reply);
    }
    println!("{} version {version} restored as version {}", path, reply["version"]);
    Ok(ExitCode::SUCCESS)
}

/// Seconds since the epoch as "YYYY-MM-DD HH:MM:SS" (UTC), without a date crate.
pub fn format_time(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
