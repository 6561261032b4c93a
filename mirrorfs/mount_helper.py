"""mount(8)'s and umount(8)'s helpers: ``mount.mirrorfs`` and ``umount.mirrorfs``.

``mount -t mirrorfs VOLDIR MNT -o OPTS`` (or an fstab line of type ``mirrorfs``) makes
mount(8) run ``/sbin/mount.mirrorfs VOLDIR MNT [-sfnv] [-o OPTS]``; type ``fuse.mirrorfs``
looks for ``/sbin/mount.fuse.mirrorfs`` first (then mount.fuse, which would run a program
``mirrorfs`` with arguments it does not take). Both names are links to this helper, which
turns mount(8)'s options into ``mirrorfs mount`` arguments and runs it::

    mirror=HOST:PORT (repeatable)   --mirror HOST:PORT
    secret_file=FILE                --secret-file FILE
    tls_cert= tls_key= tls_ca=      --tls-cert/--tls-key/--tls-ca FILE
    max_log=SIZE                    --max-log SIZE
    commit_interval=SECONDS         --commit-interval SECONDS
    log=FILE|syslog|stderr|none     --log ...          log_level=LEVEL  --log-level LEVEL
    insecure, debug                 --insecure, --debug
    ro                              --read-only        (rw: the default)
    defaults auto noauto user users nouser owner group nofail _netdev x-* comment=*
                                    mount(8)'s and fstab's own: ignored
    anything else                   a FUSE option (-o): allow_other, nosuid, nodev,
                                    noexec, noatime, nonempty, writeback_cache, ...

The mount of a volume is of type ``fuse.mirrorfs``, so ``umount MNT`` looks for
``/sbin/umount.fuse.mirrorfs``: a link to ``umount.mirrorfs``, which runs ``mirrorfs umount
MNT`` and so returns only after the final commit. Without that link umount(8) unmounts by
itself and returns at once; the mount process still finishes its final commit before it
exits (``mirrorfs umount`` is what waits for it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from mirrorfs.daemon import PROG

MOUNT_HELPER = "mount.mirrorfs"
UMOUNT_HELPER = "umount.mirrorfs"

#: ``-o NAME=VALUE`` options that are arguments of ``mirrorfs mount``; mirror repeats.
VALUE_OPTIONS = {
    "mirror": "--mirror",
    "secret_file": "--secret-file",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_ca": "--tls-ca",
    "max_log": "--max-log",
    "commit_interval": "--commit-interval",
    "log": "--log",
    "log_level": "--log-level",
}
FLAG_OPTIONS = {"insecure": "--insecure", "debug": "--debug"}
#: What mount(8) and fstab pass for themselves (ro and rw: the last one says --read-only).
IGNORED_OPTIONS = {
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "nofail",
    "_netdev",
}


class HelperError(Exception):
    """A helper's command line cannot be understood (one line)."""


def mount_argv(argv: Sequence[str]) -> tuple[list[str], bool, bool]:
    """``mirrorfs`` arguments for ``mount.mirrorfs ARGV`` (mount(8)'s calling convention:
    ``VOLDIR MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE] [-N NS]``); with (fake, verbose)."""
    positional: list[str] = []
    options: list[str] = []
    fake = verbose = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-o", "-t", "-N"):
            if not args:
                raise HelperError(f"option {arg} needs a value")
            value = args.pop(0)
            if arg == "-o":
                options += [o for o in value.split(",") if o]
            elif arg == "-N":
                raise HelperError("mount namespaces (-N) are not supported")
        elif arg.startswith("-o") and len(arg) > 2:
            options += [o for o in arg[2:].split(",") if o]
        elif arg.startswith("-") and len(arg) > 1:
            for flag in arg[1:]:
                if flag not in "sfnvrw":
                    raise HelperError(f"unknown option -{flag}")
                fake |= flag == "f"
                verbose |= flag == "v"
                if flag in "rw":
                    options.append("ro" if flag == "r" else "rw")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise HelperError(f"usage: {MOUNT_HELPER} VOLDIR MOUNTPOINT [-sfnv] [-o OPTIONS]")
    volume_dir, mountpoint = positional
    out = ["mount", volume_dir, mountpoint]
    fuse: list[str] = []
    read_only = False
    for opt in options:
        name, eq, value = opt.partition("=")
        if opt in ("ro", "rw"):
            read_only = opt == "ro"  # the last one wins, as in mount(8)
        elif name in VALUE_OPTIONS:
            if not eq or not value:
                raise HelperError(f"option {name} needs a value ({name}=...)")
            out += [VALUE_OPTIONS[name], value]
        elif name in FLAG_OPTIONS and not eq:
            if FLAG_OPTIONS[name] not in out:
                out.append(FLAG_OPTIONS[name])
        elif name in IGNORED_OPTIONS or name.startswith(("x-", "comment")):
            continue
        else:
            fuse.append(opt)
    if read_only:
        out.append("--read-only")
    if fuse:
        out += ["-o", ",".join(fuse)]
    return out, fake, verbose


def umount_argv(argv: Sequence[str]) -> list[str]:
    """``mirrorfs`` arguments for ``umount.mirrorfs ARGV`` (umount(8)'s convention:
    ``MOUNTPOINT [-flnrv] [-t TYPE] [-N NS]``; ``-l`` is ``--lazy``, the others change
    nothing here)."""
    positional: list[str] = []
    lazy = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-t", "-N"):
            if not args:
                raise HelperError(f"option {arg} needs a value")
            if arg == "-N":
                raise HelperError("mount namespaces (-N) are not supported")
            args.pop(0)
        elif arg.startswith("-") and len(arg) > 1:
            for flag in arg[1:]:
                if flag not in "flnrvd":
                    raise HelperError(f"unknown option -{flag}")
                lazy |= flag == "l"
        else:
            positional.append(arg)
    if len(positional) != 1:
        raise HelperError(f"usage: {UMOUNT_HELPER} MOUNTPOINT [-flnrv]")
    return ["umount", positional[0], *(["--lazy"] if lazy else [])]


def _run(convert: Callable[[Sequence[str]], list[str]], argv: Sequence[str]) -> int:
    from mirrorfs.cli import main

    try:
        args = convert(argv)
    except HelperError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return main(args)


def main_mount(argv: Sequence[str] | None = None) -> int:
    """``mount.mirrorfs``: mount(8)'s helper."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, fake, verbose = mount_argv(argv)
    except HelperError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if verbose or fake:
        print(f"{MOUNT_HELPER}: {PROG} {' '.join(args)}", file=sys.stderr)
    if fake:
        return 0
    from mirrorfs.cli import main

    return main(args)


def main_umount(argv: Sequence[str] | None = None) -> int:
    """``umount.mirrorfs``: umount(8)'s helper (waits for the final commit)."""
    return _run(umount_argv, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    # python -m mirrorfs.mount_helper {mount|umount} ARGS... (what a test installs)
    which = sys.argv[1:2]
    if which == ["mount"]:
        raise SystemExit(main_mount(sys.argv[2:]))
    if which == ["umount"]:
        raise SystemExit(main_umount(sys.argv[2:]))
    print("usage: python -m mirrorfs.mount_helper {mount|umount} ARGS...", file=sys.stderr)
    raise SystemExit(2)
