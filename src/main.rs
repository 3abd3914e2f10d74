//! The `cairn` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

use cairn::catalog::{Catalog, Kind, VersionState};
use cairn::codec::{Capability, FileCap};
use cairn::config::{self, Config};
use cairn::grid::Grid;
use cairn::upload::Progress;
use cairn::{bench, download, stage, upload};

mod mount;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "A drive whose files live on a grid of storage servers as encrypted, erasure-coded shares"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create $CAIRN_HOME/config.toml (default: 5 local directory servers, 3-of-5, happy 4).
    Init {
        /// Number of local directory servers to create under $CAIRN_HOME/servers.
        #[arg(long, default_value_t = 5)]
        servers: u16,
        /// Use these directories as servers instead (repeat the flag, one per server).
        #[arg(long = "server-dir", value_name = "DIR")]
        server_dirs: Vec<PathBuf>,
        /// An S3 server, as http(s)://HOST[:PORT]/BUCKET[/PREFIX] (path-style;
        /// repeat the flag, one per server). Credentials: the --s3-* flags,
        /// else $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY, else ~/.aws/credentials.
        #[arg(long = "s3", value_name = "URL")]
        s3_urls: Vec<String>,
        /// Region of the --s3 servers.
        #[arg(long, default_value = "us-east-1")]
        s3_region: String,
        /// Access key written into each --s3 server entry, with its secret
        /// from $CAIRN_S3_SECRET_ACCESS_KEY, else standard input (never a
        /// flag: command lines are visible to every local user).
        #[arg(long)]
        s3_access_key_id: Option<String>,
        /// k: shares needed to rebuild a file.
        #[arg(long, default_value_t = 3)]
        needed: u16,
        /// Servers that must hold a share before an upload succeeds.
        #[arg(long, default_value_t = 4)]
        happy: u16,
        /// n: shares written per file (default: one per server).
        #[arg(long)]
        total: Option<u16>,
        /// Plaintext bytes per segment.
        #[arg(long, default_value_t = config::DEFAULT_SEGMENT_SIZE)]
        segment_size: u32,
    },
    /// Upload a local file to PATH; prints the version's read capability.
    Put {
        source: PathBuf,
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Download PATH's newest committed version (or a capability) to OUTPUT.
    #[command(override_usage = "cairn get PATH OUTPUT\n       cairn get --cap CAPABILITY OUTPUT")]
    Get {
        /// PATH OUTPUT, or just OUTPUT with --cap.
        #[arg(required = true, num_args = 1..=2, value_name = "PATH OUTPUT")]
        args: Vec<String>,
        /// Read this capability instead of a path: needs only the servers.
        #[arg(long)]
        cap: Option<String>,
        /// A version number other than the newest.
        #[arg(long)]
        version: Option<i64>,
    },
    /// Verify every share of a file; exit 0 only if all are present and valid.
    Check {
        path: Option<String>,
        #[arg(long, conflicts_with = "path")]
        cap: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Put back shares that servers lost, corrupted or never received.
    Repair {
        /// A file of the namespace; or --cap, or --all.
        path: Option<String>,
        #[arg(long, conflicts_with = "path")]
        cap: Option<String>,
        /// Every committed version in the catalog.
        #[arg(long, conflicts_with_all = ["path", "cap"])]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// List a directory of the namespace.
    Ls {
        #[arg(default_value = "/")]
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Mount the drive at DIR, or at a drive letter such as X: on Windows
    /// (foreground; initialises the embedded default if needed).
    Mount {
        dir: PathBuf,
        /// Let other users reach the mount (needs user_allow_other in /etc/fuse.conf unless root).
        #[arg(long)]
        allow_other: bool,
        /// Windows: mount as a network drive (\\cairn\vol) instead of a local disk.
        #[arg(long)]
        network: bool,
        #[arg(long)]
        read_only: bool,
        /// Seconds a sealed version waits before upload, so a burst of saves uploads once.
        #[arg(long, default_value_t = 2.0)]
        writeback_delay: f64,
        /// MiB of clean (committed) data the cache keeps; staged data is never evicted.
        #[arg(long, default_value_t = 10240)]
        cache_size: u64,
        /// Seconds between attempts to repair versions uploaded while a server was down.
        #[arg(long, default_value_t = 30.0)]
        repair_interval: f64,
    },
    /// Show what is staged, uploading and committed.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Wait until every closed file is committed on the grid, then publish
    /// the namespace (without a mount: publish it from the catalog). While
    /// uploads fail (servers down, say) it shows why, and keeps waiting.
    Sync {
        /// Give up after this many seconds (exit 1, saying what waits); the
        /// versions stay queued and upload once the grid takes them.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        #[arg(long)]
        json: bool,
    },
    /// Print the root capability: with the server list, it rebuilds the drive.
    RootCap,
    /// List the machines using this drive, as far as this one has merged
    /// their changes, and when each was last seen.
    Devices {
        #[command(subcommand)]
        action: Option<DevicesAction>,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the namespace on a new machine from the root capability.
    /// The root capability comes from --root-cap-file, else $CAIRN_ROOT_CAP,
    /// else standard input (never a flag: command lines are visible to every
    /// local user).
    Recover {
        /// The grid's config.toml (copied into CAIRN_HOME).
        #[arg(long)]
        config: PathBuf,
        /// A file holding the root capability.
        #[arg(long, value_name = "FILE")]
        root_cap_file: Option<PathBuf>,
        /// Take the newest namespace of whatever servers answer, even too
        /// few to be sure it is the newest on the grid.
        #[arg(long)]
        accept_partial: bool,
        /// Refuse a namespace older than this sequence number.
        #[arg(long, value_name = "SEQ")]
        min_seq: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Delete the shares of versions no longer retained ([retention] in config.toml).
    Gc {
        /// Only say what would go.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// List every version of a file in the mount.
    Versions {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Make an old version's content the newest version.
    Restore {
        path: String,
        /// Versions carried over by a save-by-rename are numbered 0 and below.
        #[arg(long, allow_negative_numbers = true)]
        version: i64,
        #[arg(long)]
        json: bool,
    },
    /// Started by `cairn mount`: unmounts its mount if the daemon dies.
    #[cfg(unix)]
    #[command(hide = true)]
    WatchMount {
        #[arg(long)]
        dev: String,
        mountpoint: PathBuf,
    },
    /// Measure codec throughput beside SHA-256, AES and Reed-Solomon alone.
    Bench {
        /// MiB of data per measurement.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Repetitions; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    cairn::home::private_umask();
    bound_allocator_growth();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Home {
    dir: PathBuf,
}

impl Home {
    fn locate() -> Result<Home> {
        Ok(Home {
            dir: config::home_dir()?,
        })
    }
    fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    fn config(&self) -> Result<Config> {
        let path = self.config_path();
        if !path.exists() {
            bail!(
                "{} does not exist: run `cairn init` first (CAIRN_HOME={})",
                path.display(),
                self.dir.display()
            );
        }
        Ok(Config::load(&path)?)
    }
    fn grid(&self) -> Result<Grid> {
        Grid::from_config(&self.config()?, &self.dir)
    }
    fn catalog(&self) -> Result<Catalog> {
        Ok(Catalog::open(&self.dir.join("catalog.db"))?)
    }
}

/// Share blocks and parts (hundreds of KiB to MiBs) are allocated and freed
/// all the time on many threads. glibc's default raises its mmap threshold
/// after such frees and then keeps freed blocks in per-thread arenas, which
/// measured as 20 MiB of RSS beyond the live data on an S3 upload. A fixed
/// threshold gives large buffers back to the kernel when freed.
fn bound_allocator_growth() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// A byte progress bar on a terminal; nothing otherwise.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new(len: u64, what: &str) -> Arc<Bar> {
        let bar = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Arc::new(Bar(bar))
    }
}

impl Progress for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

/// How a command uses the home: whether it may create it, and the name it
/// holds the home's lock under if it changes the home.
fn home_use(command: &Command) -> Option<(bool, Option<&'static str>)> {
    Some(match command {
        Command::Bench { .. } => return None,
        #[cfg(unix)]
        Command::WatchMount { .. } => return None,
        Command::Init { .. } => (true, Some("init")),
        Command::Mount { .. } => (true, Some("mount")),
        Command::Recover { .. } => (true, Some("recover")),
        Command::Put { .. } => (false, Some("put")),
        Command::Gc { .. } => (false, Some("gc")),
        Command::Repair { .. } => (false, Some("repair")),
        _ => (false, None),
    })
}

#[derive(clap::Subcommand)]
enum DevicesAction {
    /// Revoke a machine's write access (a lost or retired one): its changes
    /// after the last one merged here count nowhere, on every machine.
    /// It keeps the root capability, so it can still read the drive.
    Revoke {
        /// Its name, or the start of its id (8 hex digits or more), as
        /// `cairn devices` shows them.
        device: String,
        #[arg(long)]
        json: bool,
    },
}

fn run(command: Command) -> Result<ExitCode> {
    let home = Home::locate()?;
    let mut _lock = None;
    if let Some((create, lock)) = home_use(&command) {
        cairn::home::secure(&home.dir, create)?;
        if let Some(what) = lock.filter(|_| home.dir.is_dir()) {
            let held = cairn::home::HomeLock::acquire(&home.dir, what)?;
            cairn::home::clean_stage(&home.dir, &held);
            _lock = Some(held);
        }
    }
    match command {
        Command::Init {
            servers,
            server_dirs,
            s3_urls,
            s3_region,
            s3_access_key_id,
            needed,
            happy,
            total,
            segment_size,
        } => {
            let keys = match s3_access_key_id {
                Some(id) => Some((
                    id,
                    read_secret("the S3 secret access key", None, "CAIRN_S3_SECRET_ACCESS_KEY")?,
                )),
                None => None,
            };
            let s3 = S3Flags {
                urls: s3_urls,
                region: s3_region,
                keys,
            };
            init(&home, servers, server_dirs, s3, needed, happy, total, segment_size)
        }
        Command::Put { source, path, json } => put(&home, source, &path, json),
        Command::Get { mut args, cap, version } => {
            let output = PathBuf::from(args.pop().expect("at least one argument"));
            match (args.pop(), &cap) {
                (Some(_), Some(_)) => bail!("give either PATH or --cap, not both"),
                (None, None) => bail!("give the PATH to read, or --cap CAPABILITY"),
                (path, _) => get(&home, path, output, cap, version),
            }
        }
        Command::Check { path, cap, json } => check(&home, path, cap, json),
        Command::Ls { path, json } => ls(&home, &path, json),
        Command::Repair { path, cap, all, json } => repair(&home, path, cap, all, json),
        Command::Mount {
            dir,
            allow_other,
            network,
            read_only,
            writeback_delay,
            cache_size,
            repair_interval,
        } => mount::run(
            &home.dir,
            &dir,
            mount::MountArgs {
                allow_other,
                network,
                read_only,
                writeback_delay,
                cache_size_mib: cache_size,
                repair_interval,
            },
        ),
        Command::Status { json } => mount::status(&home.dir, json),
        Command::Sync { timeout, json } => match cairn::control::request(&home.dir, &cairn::control::Request::Status) {
            Ok(_) => mount::sync(&home.dir, timeout, json),
            // No daemon: nothing is waiting to upload; publish the catalog.
            Err(_) => publish_offline(&home, json),
        },
        Command::RootCap => root_cap(&home),
        Command::Devices { action: None, json } => devices(&home, json),
        Command::Devices {
            action: Some(DevicesAction::Revoke { device, json }),
            ..
        } => revoke(&home, device, json),
        Command::Recover {
            config,
            root_cap_file,
            accept_partial,
            min_seq,
            json,
        } => {
            let root = read_secret("the root capability", root_cap_file.as_deref(), "CAIRN_ROOT_CAP")?;
            let rules = cairn::namespace::RecoverRules {
                accept_partial,
                min_seq,
            };
            recover(&home, &root, &config, rules, json)
        }
        Command::Gc { dry_run, json } => gc(&home, dry_run, json),
        Command::Versions { path, json } => mount::versions(&home.dir, &path, json),
        Command::Restore { path, version, json } => mount::restore(&home.dir, &path, version, json),
        #[cfg(unix)]
        Command::WatchMount { dev, mountpoint } => {
            mount::watch_mount(&dev, &mountpoint)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { mib, runs, json } => {
            let report = bench::codec(mib << 20, runs);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

struct S3Flags {
    urls: Vec<String>,
    region: String,
    keys: Option<(String, String)>,
}

impl S3Flags {
    /// A server entry for `url` = http(s)://HOST[:PORT]/BUCKET[/PREFIX].
    fn server(&self, name: String, url: &str) -> Result<config::ServerConfig> {
        let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
        let (endpoint, path) = match url[scheme_end..].find('/') {
            Some(i) => url.split_at(scheme_end + i),
            None => (url, ""),
        };
        let mut parts = path.trim_matches('/').splitn(2, '/');
        let bucket = parts.next().filter(|b| !b.is_empty());
        let Some(bucket) = bucket else {
            bail!("--s3 {url}: give the bucket, as http(s)://HOST[:PORT]/BUCKET[/PREFIX]");
        };
        Ok(config::ServerConfig {
            name,
            backend: "s3".into(),
            endpoint: Some(endpoint.to_string()),
            bucket: Some(bucket.to_string()),
            prefix: parts.next().map(str::to_string),
            region: Some(self.region.clone()),
            access_key_id: self.keys.as_ref().map(|k| k.0.clone()),
            secret_access_key: self.keys.as_ref().map(|k| k.1.clone()),
            ..Default::default()
        })
    }
}

#[allow(clippy::too_many_arguments)] // one per `cairn init` flag
fn init(
    home: &Home,
    servers: u16,
    server_dirs: Vec<PathBuf>,
    s3: S3Flags,
    needed: u16,
    happy: u16,
    total: Option<u16>,
    segment_size: u32,
) -> Result<ExitCode> {
    let mut config = Config::embedded_default(&home.dir);
    let dirs: Vec<PathBuf> = if server_dirs.is_empty() && !s3.urls.is_empty() {
        Vec::new()
    } else if server_dirs.is_empty() {
        (1..=servers)
            .map(|i| home.dir.join("servers").join(format!("s{i}")))
            .collect()
    } else {
        server_dirs
            .into_iter()
            .map(|d| std::path::absolute(&d).with_context(|| format!("{}", d.display())))
            .collect::<Result<_>>()?
    };
    config.servers = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| config::ServerConfig {
            name: format!("s{}", i + 1),
            backend: "dir".into(),
            path: Some(d.clone()),
            ..Default::default()
        })
        .collect();
    for url in &s3.urls {
        let name = format!("s{}", config.servers.len() + 1);
        config.servers.push(s3.server(name, url)?);
    }
    config.grid.needed = needed;
    config.grid.happy = happy;
    config.grid.total = total.unwrap_or(config.servers.len() as u16);
    config.grid.segment_size = segment_size;
    config.validate(std::path::Path::new("flags"))?;
    config.write_new(&home.dir)?;
    println!(
        "initialised {} with {} servers, {}-of-{}, happy {}",
        home.dir.display(),
        config.servers.len(),
        config.grid.needed,
        config.grid.total,
        config.grid.happy
    );
    let catalog = home.catalog()?;
    let root = cairn::namespace::root_cap(&catalog)?;
    print_root_cap(&root);
    Ok(ExitCode::SUCCESS)
}

fn print_root_cap(root: &cairn::namespace::RootCap) {
    println!("root capability: {root}");
    eprintln!(
        "cairn: keep the root capability safe and secret. With it and the server list anyone can read \
         every file; without it, a lost machine's files cannot be recovered (`cairn root-cap` prints it again)."
    );
}

fn root_cap(home: &Home) -> Result<ExitCode> {
    home.config()?;
    let catalog = home.catalog()?;
    let root = cairn::namespace::root_cap(&catalog)?;
    print_root_cap(&root);
    Ok(ExitCode::SUCCESS)
}

fn devices(home: &Home, json: bool) -> Result<ExitCode> {
    home.config()?;
    let catalog = home.catalog()?;
    let root = cairn::namespace::root_cap(&catalog)?;
    let list = cairn::sync::store::list(&catalog, &root)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    for d in &list {
        let when = match d.last_seen_ns {
            None => "this machine".to_string(),
            Some(ns) => format!("last seen {} UTC", mount::format_time(ns)),
        };
        let revoked = match d.revoked_after {
            Some(after) => format!("  REVOKED after record {after}"),
            None => String::new(),
        };
        println!("{:<24} {}  record {:<6} {when}{revoked}", d.name, &d.id[..8], d.seq);
    }
    Ok(ExitCode::SUCCESS)
}

/// `cairn devices revoke`: through the daemon if one runs, else with the
/// home's lock.
fn revoke(home: &Home, device: String, json: bool) -> Result<ExitCode> {
    let config = home.config()?;
    let reply = match cairn::control::request(&home.dir, &cairn::control::Request::Status) {
        Ok(_) => cairn::control::request(&home.dir, &cairn::control::Request::Revoke { device })?,
        Err(_) => {
            let _lock = cairn::home::HomeLock::acquire(&home.dir, "devices")?;
            let rt = runtime()?;
            let revoked = rt.block_on(offline_vfs(home, &config, &rt)?.revoke_device(device))?;
            serde_json::json!({"ok": true, "revoked": revoked})
        }
    };
    if reply["ok"] != true {
        bail!("{}", reply["error"].as_str().unwrap_or("the daemon refused"));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        let r = &reply["revoked"];
        println!(
            "revoked {} ({}): its records after {} count nowhere, on every machine that merges this one's",
            r["name"].as_str().unwrap_or("?"),
            r["id"].as_str().unwrap_or("?"),
            r["after"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn publish_offline(home: &Home, json: bool) -> Result<ExitCode> {
    let config = home.config()?;
    // Locked here, not by `home_use`: `sync` with a daemon must not be.
    let _lock = cairn::home::HomeLock::acquire(&home.dir, "sync")?;
    let catalog = home.catalog()?;
    if !cairn::namespace::snapshots_due(&catalog)? {
        // Device logs carry the namespace: one pass, as a mount makes.
        drop(catalog);
        let rt = runtime()?;
        let report = rt.block_on(offline_vfs(home, &config, &rt)?.sync_devices())?;
        if json {
            let out = serde_json::json!({"ok": true, "synced": 0, "devices": report, "namespace_published": null});
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "{} changes published in {} records; {} records of other machines merged",
                report.logged, report.records, report.merged
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let grid = home.grid()?;
    let published = match cairn::namespace::prepare(&catalog)? {
        None => None,
        Some(pending) => {
            let p = runtime()?.block_on(cairn::namespace::upload(
                &grid,
                config.params(),
                config.grid.happy,
                pending,
            ))?;
            cairn::namespace::record(&catalog, &p)?;
            catalog.commit()?;
            Some(p)
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": true, "synced": 0, "namespace_published": published.as_ref().map(|p| p.namespace.seq)
            }))?
        );
    } else {
        match published {
            Some(p) => println!("namespace {} published ({} bytes)", p.namespace.seq, p.bytes),
            None => println!("the namespace on the grid is up to date"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A secret from a file, else the environment variable `env`, else
/// standard input (one line).
fn read_secret(what: &str, file: Option<&std::path::Path>, env: &str) -> Result<String> {
    let secret = if let Some(file) = file {
        std::fs::read_to_string(file).with_context(|| format!("reading {what} from {}", file.display()))?
    } else if let Some(v) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        v.into_string().map_err(|_| anyhow!("${env} is not valid UTF-8"))?
    } else {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() {
            eprint!("cairn: {what} (or set ${env}): ");
        }
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line
    };
    let secret = secret.trim().to_string();
    if secret.is_empty() {
        bail!("no {what} given: put it in ${env}, or give it on standard input");
    }
    Ok(secret)
}

fn recover(
    home: &Home,
    root: &str,
    config_file: &std::path::Path,
    rules: cairn::namespace::RecoverRules,
    json: bool,
) -> Result<ExitCode> {
    let root: cairn::namespace::RootCap = root.parse()?;
    let config = Config::load(config_file)?;
    let db = home.dir.join("catalog.db");
    if db.exists() && home.catalog()?.count_nodes()? > 1 {
        bail!(
            "{} already holds a namespace; recover into an empty CAIRN_HOME",
            home.dir.display()
        );
    }
    let target = home.config_path();
    if std::fs::canonicalize(config_file).ok() != std::fs::canonicalize(&target).ok() {
        let _ = std::fs::remove_file(&target);
        config.write_config(&home.dir)?;
    }
    let grid = Arc::new(home.grid()?);
    let mut catalog = home.catalog()?;
    let rt = runtime()?;
    if rt.block_on(cairn::sync::remote::any_device(&grid, &root)) {
        cairn::namespace::adopt(&catalog, &root)?;
        catalog.commit()?;
        drop(catalog);
        return join(home, &config, &rt, json);
    }
    let latest = rt.block_on(cairn::namespace::recover(
        grid,
        &root,
        config.grid.happy,
        rules,
        &mut catalog,
    ))?;
    catalog.commit()?;
    let nodes = catalog.count_nodes()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ok": true, "namespace": latest, "nodes": nodes}))?
        );
    } else {
        let when = match latest.time_ns {
            Some(ns) => format!("published {} UTC", mount::format_time(ns)),
            None => "publication time not recorded".into(),
        };
        println!(
            "recovered namespace {} ({when}; {} of {} servers answered; {} names) into {}",
            latest.seq,
            latest.answered,
            latest.servers.len(),
            nodes,
            home.dir.display()
        );
        for (server, said) in &latest.servers {
            println!("  {server}: {said}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The core over `home` for a command run without a mount (the caller
/// holds the home's lock).
fn offline_vfs(home: &Home, config: &Config, rt: &tokio::runtime::Runtime) -> Result<Arc<cairn::vfs::Vfs>> {
    Ok(cairn::vfs::Vfs::new(
        cairn::vfs::VfsOptions {
            home: home.dir.clone(),
            writeback_delay: std::time::Duration::ZERO,
            read_only: false,
            cache_max_bytes: 1 << 30,
        },
        config,
        rt.handle().clone(),
    )?)
}

/// Joins a drive that machines publish device logs to: this home becomes
/// one more device, and its catalog what every device's logs merge to.
fn join(home: &Home, config: &Config, rt: &tokio::runtime::Runtime, json: bool) -> Result<ExitCode> {
    let report = rt.block_on(offline_vfs(home, config, rt)?.sync_devices())?;
    let nodes = home.catalog()?.count_nodes()?;
    if json {
        let out = serde_json::json!({"ok": true, "joined": report, "nodes": nodes});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "joined the drive as a new machine: {} records of other machines merged, {} names, into {}",
            report.merged,
            nodes,
            home.dir.display()
        );
        if report.waiting > 0 {
            println!("  {} changes wait and are merged at the next mount", report.waiting);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn gc(home: &Home, dry_run: bool, json: bool) -> Result<ExitCode> {
    let config = home.config()?;
    let grid = Arc::new(home.grid()?);
    let catalog = home.catalog()?;
    // Its catalog no longer hears its twin's versions, which share the
    // segments it would thin away.
    if let Some(why) = catalog.meta(cairn::vfs::META_CLONED)? {
        bail!("this machine no longer syncs ({why}): run gc on a machine that does");
    }
    // A staged version that took chunks from a committed one the cache
    // no longer holds reads them from the grid until its own upload.
    let cache = home.dir.join("cache");
    let mut pinned = std::collections::HashSet::new();
    for v in catalog.staged()? {
        let dir = cairn::stage::recovery::version_dir(&cache, v.ino, v.num);
        let sealed = cairn::stage::chunks::SealedVersion::open(dir, v.size, config.params().segment_size as u64);
        if let Some(layer) = sealed.layer()? {
            pinned.extend(
                layer
                    .from
                    .iter()
                    .filter_map(|s| cairn::stage::recovery::version_dir_key(&s.dir)),
            );
        }
    }
    let report = runtime()?.block_on(cairn::gc::collect(&grid, &catalog, &config.retention, &pinned, dry_run))?;
    catalog.commit()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let verb = if dry_run { "would delete" } else { "deleted" };
        println!(
            "{verb} {} versions and {} namespace snapshots: {} capabilities, {} bytes of file data{}",
            report.plan.versions.len(),
            report.plan.namespaces.len(),
            report.plan.caps.len(),
            report.plan.bytes,
            if dry_run {
                String::new()
            } else {
                format!(", {} shares", report.shares_deleted)
            }
        );
        for (server, why) in &report.failures {
            println!("  {server}: {why} (its versions stay; run gc again)");
        }
        if !report.plan.blocked.is_empty() {
            println!(
                "  nothing collected: the manifests of {} kept versions could not be read now ({}), so what they share is not known; run gc again when the servers answer",
                report.plan.blocked.len(),
                report.plan.blocked[0]
            );
        }
    }
    Ok(if report.failures.is_empty() && report.plan.blocked.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn put(home: &Home, source: PathBuf, path: &str, json: bool) -> Result<ExitCode> {
    let config = home.config()?;
    let mut catalog = home.catalog()?;
    // Fail on a bad destination before reading anything.
    cairn::catalog::split_path(path)?;
    if let Ok(node) = catalog.resolve(path) {
        if node.kind == Kind::Dir {
            bail!("{path}: is a directory");
        }
    }
    let snap = stage::snapshot(&source, &home.dir.join("stage"))?;
    let grid = Grid::from_config(&config, &home.dir)?;
    let key: cairn::codec::Key = rand::random();
    let bar = Bar::new(snap.size, "uploading");
    let report = runtime()?.block_on(upload::upload(
        &grid,
        config.params(),
        config.grid.happy,
        upload::Source::file(&snap.path).with_context(|| snap.path.display().to_string())?,
        key,
        bar.clone(),
    ))?;
    bar.0.finish_and_clear();
    let ino = catalog.ensure_file(path)?;
    let cap = report.cap.to_string();
    let sha = hex(&report.plaintext_sha256);
    let num = catalog.add_version(ino, snap.size, &sha, VersionState::Committed, Some(&cap), None)?;
    if report.placed.len() < config.grid.total as usize {
        // A mount's repair loop (or `cairn repair`) places the rest later.
        catalog.set_degraded(ino, num, true)?;
    }
    // The version exists only once this returns: a failure (a full disk)
    // fails the command.
    catalog
        .commit()
        .context("recording the uploaded version in the catalog")?;
    for (server, why) in &report.failures {
        eprintln!("cairn: warning: server {server} failed during upload: {why}");
    }
    if json {
        let out = serde_json::json!({
            "path": path, "version": num, "size": snap.size, "sha256": sha, "cap": cap,
            "placed": report.placed.iter().map(|(s, srv)| serde_json::json!({"share": s, "server": srv})).collect::<Vec<_>>(),
            "failures": report.failures.iter().map(|(s, e)| serde_json::json!({"server": s, "error": e})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{cap}");
    }
    Ok(ExitCode::SUCCESS)
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// The capability named by a path (newest committed, or `version`) or given outright.
fn resolve_cap(home: &Home, path: Option<String>, cap: Option<String>, version: Option<i64>) -> Result<FileCap> {
    if let Some(cap) = cap {
        return Ok(cap.parse()?);
    }
    let path = path.ok_or_else(|| anyhow!("give a PATH or --cap CAPABILITY"))?;
    let catalog = home.catalog()?;
    let node = catalog.resolve(&path)?;
    if node.kind == Kind::Dir {
        bail!("{path}: is a directory");
    }
    let versions = catalog.versions(node.ino)?;
    let v = match version {
        Some(n) => versions
            .into_iter()
            .find(|v| v.num == n)
            .ok_or_else(|| anyhow!("{path} has no version {n}"))?,
        None => catalog
            .latest_committed(node.ino)?
            .ok_or_else(|| anyhow!("{path} has no committed version yet"))?,
    };
    let cap = v
        .cap
        .ok_or_else(|| anyhow!("{path} version {} is not on the grid yet", v.num))?;
    Ok(cap.parse()?)
}

fn get(
    home: &Home,
    path: Option<String>,
    output: PathBuf,
    cap: Option<String>,
    version: Option<i64>,
) -> Result<ExitCode> {
    let cap = resolve_cap(home, path, cap, version)?;
    let grid = Arc::new(home.grid()?);
    let bar = Bar::new(cap.size(), "downloading");
    runtime()?.block_on(download::download_to_file(grid, cap, &output, bar.clone()))?;
    bar.0.finish_and_clear();
    Ok(ExitCode::SUCCESS)
}

fn check(home: &Home, path: Option<String>, cap: Option<String>, json: bool) -> Result<ExitCode> {
    let cap = resolve_cap(home, path, cap, None)?;
    let grid = Arc::new(home.grid()?);
    // A packed file is as healthy as the pack that holds it; a mapped one
    // as every object holding its segments.
    let report = runtime()?.block_on(download::check_file(grid, cap));
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let verdict = if report.healthy {
            "healthy"
        } else if report.recoverable {
            "NOT HEALTHY (recoverable)"
        } else {
            "NOT RECOVERABLE"
        };
        println!(
            "{verdict}: {} of {} shares valid, on {} servers (any {} rebuild the file)",
            report.total as usize - report.missing_shares.len(),
            report.total,
            report.servers_with_valid_shares,
            report.needed
        );
        println!("  {}", report.findings.to_string().replace("; ", "\n  "));
        if !report.missing_shares.is_empty() {
            println!("  missing or invalid shares: {:?}", report.missing_shares);
        }
    }
    Ok(if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn repair(home: &Home, path: Option<String>, cap: Option<String>, all: bool, json: bool) -> Result<ExitCode> {
    // With --all: gc leaves no object that is not some committed version's own.
    let caps: Vec<FileCap> = if all {
        let versions = home.catalog()?.committed_versions()?;
        let mut seen = std::collections::HashSet::new();
        let caps: Vec<FileCap> = versions
            .into_iter()
            .filter_map(|v| v.cap)
            .map(|c| c.parse())
            .collect::<Result<_, _>>()?;
        caps.into_iter()
            .filter(|c| seen.insert(c.stored().to_string()))
            .collect()
    } else {
        vec![resolve_cap(home, path, cap, None)?]
    };
    let grid = Arc::new(home.grid()?);
    let rt = runtime()?;
    // A mapped version's segments lie in its own object and in the
    // objects its manifest names (its own is repaired first, so that the
    // manifest can be read).
    let caps: Vec<Capability> = match &caps[..] {
        [one @ FileCap::Mapped { .. }] if !all => {
            rt.block_on(cairn::repair::repair(grid.clone(), one.stored().clone()))?;
            match rt.block_on(download::FileReader::open(grid.clone(), one.clone())) {
                Ok(reader) => reader.objects(),
                Err(_) => vec![one.stored().clone()],
            }
        }
        _ => caps.iter().map(|c| c.stored().clone()).collect(),
    };
    let cleaned = rt.block_on(grid.clean_abandoned());
    if cleaned > 0 && !json {
        println!("removed {cleaned} abandoned partial uploads");
    }
    let mut reports = Vec::new();
    let mut healthy = true;
    for cap in caps {
        let report = rt.block_on(cairn::repair::repair(grid.clone(), cap))?;
        healthy &= report.healthy;
        if !json {
            let what = if report.missing.is_empty() {
                "healthy, nothing to do".to_string()
            } else {
                format!(
                    "missing {:?}; placed {:?}{}",
                    report.missing,
                    report.placed,
                    if report.healthy {
                        "; healthy now"
                    } else {
                        "; STILL NOT HEALTHY"
                    }
                )
            };
            println!("{}: {what}", report.storage_index);
            for (server, why) in &report.failures {
                println!("  {server}: {why}");
            }
        }
        reports.push(report);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn ls(home: &Home, path: &str, json: bool) -> Result<ExitCode> {
    let entries = home.catalog()?.list(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    for mut e in entries {
        e.name = printable(&e.name);
        match e.kind {
            Kind::Dir => println!("{:>14}  {:>4}  {}/", "-", "", e.name),
            Kind::Symlink => println!("{:>14}  {:>4}  {}@", "-", "", e.name),
            Kind::Fifo => println!("{:>14}  {:>4}  {}|", "-", "", e.name),
            Kind::Socket => println!("{:>14}  {:>4}  {}=", "-", "", e.name),
            Kind::CharDevice | Kind::BlockDevice => println!("{:>14}  {:>4}  {} (device)", "-", "", e.name),
            // (A hard link lists as its node.)
            Kind::File | Kind::Link => println!(
                "{:>14}  v{:<3}  {}",
                e.size.map(|s| s.to_string()).unwrap_or_default(),
                e.versions,
                e.name
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A name as it may be printed to a terminal: control characters (which
/// could move the cursor, retitle the window, or hide what follows) are
/// shown escaped, `\u{1b}`, as are backslashes, so the text is unambiguous.
fn printable(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_print_without_terminal_controls() {
        assert_eq!(super::printable("plain name.txt"), "plain name.txt");
        assert_eq!(super::printable("a\u{1b}]0;pwned\u{7}b"), "a\\u{1b}]0;pwned\\u{7}b");
        assert_eq!(super::printable("new\nline\\"), "new\\nline\\\\");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
