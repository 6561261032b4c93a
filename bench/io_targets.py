"""The two targets that bench_io.py adds to those of targets.py: libfuse's C low-level
passthrough example (built here from the libfuse3-dev package's source) and a mirrorfs
volume mirrored to one replica daemon on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

from common import BenchError, MirrorfsCli, ReplicaDaemon, first_line, read_hwm_kib
from nodes import listen_port, wait_caught_up, wait_streaming
from targets import MirrorfsTarget, PassthroughTarget

log = logging.getLogger(__name__)

PASSTHROUGH_LL_SRC = "/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c"
CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mirrorfs-bench"
)
CATCHUP_TIMEOUT = 900.0


# ---- libfuse's passthrough_ll ---------------------------------------------------------------


def fuse3_flags() -> list[str]:
    """``pkg-config fuse3 --cflags --libs``; BenchError when fuse3's headers are missing."""
    if shutil.which("pkg-config") is None:
        raise BenchError("pkg-config not found (apt-get install pkg-config libfuse3-dev)")
    proc = subprocess.run(
        ["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise BenchError("pkg-config knows no fuse3 (apt-get install libfuse3-dev)")
    return proc.stdout.split()


def build_passthrough_ll(source: str = PASSTHROUGH_LL_SRC) -> str:
    """Compile libfuse's passthrough_ll.c with gcc -O2; return the binary's path.

    The binary is cached under ~/.cache/mirrorfs-bench, named by a hash of the source, the
    flags and the compiler's version, so a new libfuse or gcc builds a new one.
    """
    if not os.path.exists(source):
        raise BenchError(f"{source} not found (apt-get install libfuse3-dev)")
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc not found (apt-get install gcc)")
    flags = fuse3_flags()
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        digest.update(f.read())
    digest.update(" ".join(flags).encode() + version.encode())
    binary = os.path.join(CACHE_DIR, f"passthrough_ll-{digest.hexdigest()[:16]}")
    if os.access(binary, os.X_OK):
        return binary
    os.makedirs(CACHE_DIR, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".passthrough_ll-", dir=CACHE_DIR)
    os.close(fd)
    try:
        # The example includes "passthrough_helpers.h" from its own directory.
        argv = [gcc, "-O2", "-Wall", "-o", tmp, source, *flags]
        log.info("building %s", " ".join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"gcc {os.path.basename(source)} failed: {first_line(proc.stderr)}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)  # a concurrent run sees the old binary or the new, whole
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return binary


class CPassthroughTarget(PassthroughTarget):
    """(b) libfuse's passthrough_ll over a local directory, with its defaults (cache=auto:
    1 s entry/attr timeouts, no writeback cache, multi-threaded), our child process."""

    name = "passthrough_ll"
    prefix = "ll"

    def __init__(self, workdir: str, binary: str) -> None:
        super().__init__(workdir)
        self.binary = binary

    def argv(self) -> list[str]:
        # -f: in the foreground, so that it stays our child and we can wait for it.
        return [self.binary, "-f", "-o", f"source={self.source}", self.mountpoint]


# ---- mirrorfs with one target ---------------------------------------------------------------


class MirroredTarget(MirrorfsTarget):
    """(e) A mirrorfs volume mirrored over direct TCP to a ``mirrorfs replica`` daemon on
    127.0.0.1 with its read-only mount (same machine, same disk, same CPUs)."""

    name = "mirrorfs+1"

    def __init__(self, workdir: str, volume_size: int, mkfs_args: list[str]) -> None:
        super().__init__(workdir, volume_size, mkfs_args)
        self.replica = ReplicaDaemon(
            MirrorfsCli(os.path.join(workdir, "replica.log")),
            os.path.join(workdir, "rep-vol"),
            os.path.join(workdir, "rep-mnt"),
        )
        self.replica_rss_kib: int | None = None
        self.tls_args: list[str] = []  # the source's --tls-* options

    def setup(self) -> None:
        self.replica.start()
        address = f"127.0.0.1:{listen_port(self.replica.volume)}"
        self.mount_args = ["--mirror", address, *self.tls_args]
        super().setup()
        wait_streaming(self.mfs.volume, self.replica.mountpoint)

    def _mount(self) -> None:
        super()._mount()
        if self.replica.pid is not None and self.mount_args:
            wait_streaming(self.mfs.volume)  # after a remount: streaming again

    def quiesce(self) -> None:
        super().quiesce()
        if self.pid is not None:
            wait_caught_up(self.mfs.volume, CATCHUP_TIMEOUT, "quiesce")

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            pid = self.replica.pid
            hwm = read_hwm_kib(pid) if pid else None
            if hwm is not None:
                self.replica_rss_kib = max(self.replica_rss_kib or 0, hwm)
            self.replica.stop()


class TlsMirroredTarget(MirroredTarget):
    """(f) The same as mirrorfs+1, with TLS on the link (``--tls-cert/--tls-key/--tls-ca``
    on both, certificates made with openssl as README.md shows): what TLS costs."""

    name = "mirrorfs+1tls"

    def setup(self) -> None:
        pki = os.path.join(self.workdir, "pki")
        self.replica.extra_args = make_certificates(pki, "replica")
        self.tls_args = make_certificates(pki, "source")
        super().setup()


def make_certificates(directory: str, node: str) -> list[str]:
    """A CA in *directory* (made once) and a certificate for *node* signed by it, with the
    ``openssl`` commands of README.md; the node's ``--tls-*`` options."""
    os.makedirs(directory, exist_ok=True)
    ca_key, ca = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.pem")
    key, csr = os.path.join(directory, f"{node}.key"), os.path.join(directory, f"{node}.csr")
    cert, ext = os.path.join(directory, f"{node}.pem"), os.path.join(directory, f"{node}.ext")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    steps = []
    if not os.path.exists(ca):
        steps.append(
            ["req", "-x509", "-new", *ec, "-keyout", ca_key, "-out", ca, "-days", "30"]
            + ["-subj", "/CN=mirrorfs bench CA"]
            + ["-addext", "basicConstraints=critical,CA:TRUE"]
            + ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
        )
    with open(ext, "w") as f:
        f.write(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n"
        )
    steps.append(["req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={node}"])
    steps.append(
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"]
        + ["-out", cert, "-days", "30", "-extfile", ext]
    )
    if shutil.which("openssl") is None:
        raise BenchError("openssl not found (apt-get install openssl): needed for --tls")
    for argv in steps:
        proc = subprocess.run(["openssl", *argv], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"openssl {argv[0]} failed: {first_line(proc.stderr)}")
    os.chmod(key, 0o600)
    return ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]
