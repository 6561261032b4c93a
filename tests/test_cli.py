"""The command line: argument errors, size parsing, one-line errors, mkfs/fsck/mount refusals."""

from __future__ import annotations

import os

import pytest

from mirrorfs import cli, cli_args
from tests.util import is_mounted, mkfs, needs_fuse, run_cli


def assert_one_line_error(proc, *, code: int | None = None, contains: str = "") -> str:
    """The command failed with exactly one ``mirrorfs: error:`` line and no traceback."""
    assert proc.returncode != 0, proc
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mirrorfs: error: ")]
    assert len(errors) == 1, proc.stderr
    assert contains.lower() in errors[0].lower(), errors[0]
    return errors[0]


# -- size parsing (pure)


@pytest.mark.parametrize(
    "text, value",
    [
        ("4096", 4096),
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("64K", 64 << 10),
        ("1.5G", 3 << 29),
        ("2GiB", 2 << 30),
        ("10MB", 10 << 20),
        (" 8M ", 8 << 20),
    ],
)
def test_parse_size(text, value):
    assert cli_args.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12Q", "-5M", "0", "0G", "1e9", "M", "1.2.3G"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        cli_args.parse_size(text)


# -- addresses (pure): one parser, two readings


def test_parse_address_forms():
    from mirrorfs.repl.address import format_address, parse_address, parse_listen

    assert parse_address("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert parse_address("[::1]:7000") == ("::1", 7000)
    assert parse_address("::1:7000") == ("::1", 7000)  # a peer's brackets are optional
    for host, port in (("127.0.0.1", 1), ("::1", 65535), ("node-b", 7000)):
        assert parse_address(format_address(host, port)) == (host, port)
        assert parse_listen(format_address(host, port)) == (host, port)
    for bad in ("nonsense", "host:", ":7000", "[]:7000", "h:0", "h:65536", "h:x"):
        with pytest.raises(ValueError, match="bad address .*: expected HOST:PORT"):
            parse_address(bad)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["mount", "a", "b", "--mirror", "nonsense"],
            "argument --mirror: bad address 'nonsense': expected HOST:PORT",
        ),
        (
            ["replica", "d", "--listen", "::1:7000"],
            "argument --listen: invalid listen address '::1:7000' (write IPv6 as [ADDR]:PORT)",
        ),
        (
            ["replica", "d", "--listen", "h:70000"],
            "argument --listen: invalid listen address 'h:70000' (expected HOST:PORT)",
        ),
    ],
)
def test_bad_addresses_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mirrorfs: error: {message} (see "), err
    assert err.count("\n") == 1, err


# -- argument errors (in process: fast)


@pytest.mark.parametrize(
    "argv, contains",
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["mkfs", "/tmp/x"], "--size"),
        (["mkfs", "/tmp/x", "--size", "12Q"], "invalid size"),
        (["mkfs", "/tmp/x", "--size", "1G", "--inodes", "0"], "positive"),
        (["mkfs", "/tmp/x", "--size", "1G", "--inodes", "5", "--inode-ratio", "4K"], "not allowed"),
        (["mount", "/tmp/x"], "required"),
        (["mount", "a", "b", "--commit-interval", "-1"], "positive"),
        (["umount"], "required"),
        (["fsck"], "required"),
        (["fsck", "a", "--bogus"], "unrecognized"),
    ],
)
def test_argument_errors_are_one_line(argv, contains, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mirrorfs: error: "), err
    assert contains in lines[0]


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mirrorfs {cli.mirrorfs.__version__}"


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("mkfs", "mount", "umount", "fsck"):
        assert command in out


# -- through the real entry point (python -m mirrorfs)


def test_module_entry_point_bad_arguments():
    proc = run_cli("mkfs")
    assert_one_line_error(proc, code=2)
    assert len(proc.stderr.strip().splitlines()) == 1


def test_mkfs_and_fsck_fresh_volume(tmp_path):
    vol = tmp_path / "vol"
    proc = run_cli("mkfs", vol, "--size", "16M")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (vol / "blocks").stat().st_size == 16 << 20
    proc = run_cli("fsck", vol)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mkfs_refuses_existing_volume(tmp_path):
    vol = tmp_path / "vol"
    mkfs(vol, "8M")
    proc = run_cli("mkfs", vol, "--size", "8M")
    assert_one_line_error(proc, code=1, contains="--force")
    proc = run_cli("mkfs", vol, "--size", "16M", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (vol / "blocks").stat().st_size == 16 << 20


def test_mkfs_inode_options(tmp_path):
    proc = run_cli("mkfs", tmp_path / "a", "--size", "8M", "--inodes", "1000")
    assert proc.returncode == 0, proc.stderr
    assert "1000 inodes" in proc.stdout
    proc = run_cli("mkfs", tmp_path / "b", "--size", "8M", "--inode-ratio", "64K")
    assert proc.returncode == 0, proc.stderr
    assert "128 inodes" in proc.stdout


@pytest.mark.parametrize(
    "args, contains",
    [
        (["--size", "1K"], "size"),  # smaller than the minimum volume
        (["--size", "8M", "--block-size", "1000"], "block size"),
    ],
)
def test_mkfs_bad_geometry(tmp_path, args, contains):
    proc = run_cli("mkfs", tmp_path / "vol", *args)
    assert_one_line_error(proc, code=1, contains=contains)


def test_mkfs_missing_parent(tmp_path):
    proc = run_cli("mkfs", tmp_path / "no" / "such" / "vol", "--size", "8M")
    assert_one_line_error(proc, code=1, contains="no such directory")


def test_fsck_errors(tmp_path):
    assert_one_line_error(run_cli("fsck", tmp_path / "missing"), code=1)
    assert_one_line_error(run_cli("fsck", tmp_path), code=1, contains="not a mirrorfs volume")


def test_umount_not_a_mirrorfs_mount(tmp_path):
    assert_one_line_error(run_cli("umount", tmp_path), code=1, contains="not a mirrorfs mount")


# -- mount refusals (each one fails before anything is mounted)


@needs_fuse
def test_mount_errors(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vol = tmp_path / "vol"
    mkfs(vol, "8M")
    notvol = tmp_path / "notvol"
    notvol.mkdir()

    assert_one_line_error(run_cli("mount", notvol, mnt), code=1, contains="not a mirrorfs volume")
    assert_one_line_error(run_cli("mount", tmp_path / "missing", mnt), code=1)
    assert_one_line_error(run_cli("mount", vol, tmp_path / "nomnt"), code=1, contains="not exist")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run_cli("mount", vol, tmp_path / "file"), code=1, contains="directory")
    # Foreground mode reports the same way.
    assert_one_line_error(
        run_cli("mount", notvol, mnt, "--foreground"), code=1, contains="not a mirrorfs volume"
    )
    assert not is_mounted(mnt)


@needs_fuse
def test_mount_damaged_volume(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vol = tmp_path / "vol"
    mkfs(vol, "8M")
    with open(vol / "blocks", "r+b") as f:
        f.write(os.urandom(512))  # garbage over the volume superblock
    assert_one_line_error(run_cli("mount", vol, mnt), code=1)
    assert not is_mounted(mnt)
    proc = run_cli("fsck", vol)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr


@needs_fuse
def test_mount_damaged_fs_superblock(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vol = tmp_path / "vol"
    mkfs(vol, "8M")
    with open(vol / "blocks", "r+b") as f:
        f.seek(4096)  # block 1: the filesystem's superblock
        f.write(os.urandom(4096))
    assert_one_line_error(run_cli("mount", vol, mnt), code=1)
    assert not is_mounted(mnt)


def test_cli_constants_match_the_mount_module():
    from mirrorfs.fuse import mount
    from mirrorfs.node import volume_commands as cli  # where umount reads /proc/mounts

    assert cli.FSNAME_PREFIX == mount.FSNAME_PREFIX
    assert f"fuse.{mount.SUBTYPE}" == cli.FUSE_TYPE


def test_fsck_repair_on_fresh_volume(tmp_path):
    vol = tmp_path / "vol"
    mkfs(vol, "8M")
    proc = run_cli("fsck", vol, "--repair")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clean" in proc.stdout


def test_fsck_damaged_filesystem(tmp_path):
    vol = tmp_path / "vol"
    mkfs(vol, "8M")
    with open(vol / "blocks", "r+b") as f:
        f.seek(4096)  # the filesystem's superblock
        f.write(os.urandom(4096))
    proc = run_cli("fsck", vol)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_failure_inside_a_nursery_is_reported_by_its_cause(tmp_path, monkeypatch, capsys):
    """A daemon task that fails inside a trio nursery (its siblings cancelled) is one line
    naming the cause, not "Exceptions from Trio nursery (1 sub-exception)"."""
    import errno

    import trio

    from mirrorfs.node import volume_commands

    async def fail_in_a_task() -> None:
        async def bind() -> None:
            raise OSError(errno.ENOSYS, "cannot bind control socket DIR/control.sock")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(bind)

    monkeypatch.setattr(volume_commands, "cmd_mkfs", lambda args: trio.run(fail_in_a_task))
    assert cli.main(["mkfs", str(tmp_path / "v"), "--size", "64M"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "mirrorfs: error: cannot bind control socket DIR/control.sock"


# -- the loopback rule on the source's side (no test here may connect anywhere: every
# refusal is checked before the step that would start a connection, so that a broken
# check fails the test instead of sending a packet)


def test_peer_policy():
    from mirrorfs.repl.auth import PeerPolicyError, check_peer_policy

    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "::ffff:127.0.0.1"):
        check_peer_policy(host, 7400, None, False)
    check_peer_policy("192.0.2.10", 7400, b"secret", False)
    check_peer_policy("192.0.2.10", 7400, None, True)  # --insecure: allowed, with a warning
    for host in ("192.0.2.10", "2001:db8::1", "target.example", "0.0.0.0"):
        with pytest.raises(PeerPolicyError, match="refusing to mirror to .* without a shared"):
            check_peer_policy(host, 7400, None, False)


def test_mount_refuses_an_unauthenticated_remote_target(tmp_path, capsys):
    vol = str(tmp_path / "vol")
    mkfs(vol)
    # The mountpoint does not exist: were the rule not checked first, the mount would fail
    # on that, before any child (or connection) is started.
    code = cli.main(["mount", vol, str(tmp_path / "nomnt"), "--mirror", "192.0.2.10:7400"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "mirrorfs: error: refusing to mirror to 192.0.2.10:7400 without a shared secret: "
        "give --secret-file, use a loopback address, or pass --insecure"
    )
    assert cli.main(["mount", vol, "m", "--secret-file", "k", "--insecure"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    code = cli.main(
        ["mount", vol, str(tmp_path / "nomnt"), "--read-only", "--mirror", "127.0.0.1:7"]
    )
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "mirrorfs: error: a read-only mount ships nothing: --mirror needs a read-write mount"
    )


def test_promote_refuses_an_unauthenticated_remote_target_before_promoting(tmp_path, capsys):
    empty = tmp_path / "replica"
    empty.mkdir()
    code = cli.main(["promote", str(empty), "--mirror", "[2001:db8::1]:7400"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "refusing to mirror to [2001:db8::1]:7400 without a shared secret" in err
    assert err.endswith("nothing was promoted")
    assert list(empty.iterdir()) == []


async def test_mirror_add_refuses_an_unauthenticated_remote_target(tmp_path):
    """``mirror --add`` reaches SourceNode.add through the control socket: refused there,
    before a shipper exists (and before the nursery it would run in is even looked at)."""
    from mirrorfs.node.control import ControlError
    from mirrorfs.node.source import SourceConfig, SourceNode
    from mirrorfs.store.volume import Volume

    vol_path = str(tmp_path / "vol")
    mkfs(vol_path)
    volume = Volume.open(vol_path)
    try:
        node = SourceNode(volume, SourceConfig())
        with pytest.raises(ControlError, match="refusing to mirror to 192.0.2.10:7400"):
            await node.add(("192.0.2.10", 7400))
        assert node.shippers == {}
    finally:
        volume.close()
