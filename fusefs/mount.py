"""Mount and unmount: option parsing, daemonizing, signals, clean shutdown.

``mount_main`` returns (in the caller) only once the mount answers; unless
``foreground``, the daemon is a forked child that keeps serving. SIGINT/SIGTERM end the
loop, open ingests are closed (resumable) and the mount is removed. A bug in a handler
ends the daemon with status 1; ``auto_unmount`` (on by default) removes the mount even
if the daemon is killed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

import pyfuse3
import trio

from store import LocalStore, StoreError, prepare_root
from store.api import ChangeFeed, Store
from store.identifiers import DEFAULT_NAMESPACE, validate_identifier

from .exits import exit_code
from .ops import ContentOps

__all__ = ["MountOptions", "is_address", "mount_main", "parse_options", "umount_main"]

log = logging.getLogger("fusefs")

#: Options that mount(8) and fstab pass but mean nothing to us.
GENERIC_OPTIONS = frozenset({
    "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "nofail", "_netdev", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime",
    "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "diratime",
    "nodiratime", "lazytime", "nolazytime", "async", "sync", "dirsync", "iversion",
    "noiversion", "loud", "silent", "drop_privileges",
})
GENERIC_PREFIXES = ("x-", "comment=", "setuid=", "fsname=", "subtype=")
#: FUSE options passed to the kernel/libfuse as given.
#: Exit status for a store root that is missing (read-only mount) or no directory: the
#: CLI's code for NotFound.
EXIT_NO_STORE = 4
FUSE_OPTIONS = frozenset({"allow_other", "allow_root", "default_permissions", "ro"})


class MountOptions:
    """The parsed ``-o`` options."""

    def __init__(self) -> None:
        self.readonly = False
        self.auto_unmount = True
        #: ``namespace=NS``: the namespace the mount shows (DESIGN §6)
        self.namespace = DEFAULT_NAMESPACE
        self.fuse: set[str] = set()
        #: ``timeout=SECONDS``: each call's deadline, for a remote store
        self.timeout: float | None = None


def is_address(source: str) -> bool:
    """Whether a mount source names a gRPC store (``unix://``, ``tcp://``), not a root."""
    return source.startswith(("unix://", "tcp://"))


def parse_options(options: Iterable[str]) -> MountOptions:
    """Parse ``-o a,b,c`` values. ValueError names an option we do not know."""
    out = MountOptions()
    for group in options:
        for opt in group.split(","):
            opt = opt.strip()
            if not opt or opt in GENERIC_OPTIONS or opt.startswith(GENERIC_PREFIXES):
                continue
            if opt == "auto_unmount":
                out.auto_unmount = True
            elif opt == "noauto_unmount":
                out.auto_unmount = False
            elif opt.startswith("namespace="):
                try:
                    out.namespace = validate_identifier("namespace", opt[len("namespace="):])
                except StoreError as exc:
                    raise ValueError(f"mount option {opt!r}: {exc}") from None
            elif opt.startswith("timeout="):
                try:
                    out.timeout = float(opt.partition("=")[2])
                except ValueError:
                    out.timeout = -1.0
                if not out.timeout > 0:
                    raise ValueError(f"mount option {opt!r}: expected seconds > 0")
            elif opt in FUSE_OPTIONS:
                out.fuse.add(opt)
                out.readonly = out.readonly or opt == "ro"
            else:
                raise ValueError(f"mount option {opt!r}: not supported")
    return out


def pidfile_path(mountpoint: str) -> str:
    """Where the daemon serving ``mountpoint`` keeps its pid (locked while it runs)."""
    if os.geteuid() == 0:
        base = "/run/contentfs"
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/contentfs-{os.geteuid()}"
        base = os.path.join(base, "contentfs")
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:24]
    return os.path.join(base, f"mount-{key}.pid")


def _mount_entry(mountpoint: str) -> list[str] | None:
    """The /proc/self/mountinfo fields of the mount at ``mountpoint``, if any."""
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        found = None
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = fields
    return found


def _unescape(path: str) -> str:
    return (path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def _clear_dead_mount(mountpoint: str) -> None:
    """Remove a mount whose daemon died ("Transport endpoint is not connected")."""
    if _mount_entry(mountpoint) is None:
        return
    try:
        os.statvfs(mountpoint)  # never answered from the kernel's attribute cache
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        _tell(f"{mountpoint}: clearing a dead mount left by a previous daemon")
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _mount_entry(mountpoint) is not None:
            subprocess.run(["umount", "-l", mountpoint], check=False)
        return
    raise RuntimeError(f"{mountpoint} is already a mount point"
                       f" (unmount it first: contentfs umount {mountpoint})")


def _tell(message: str) -> None:
    """A user-facing line on stderr, plain as the CLI's (no log format): before the
    mount answers, the daemon's stderr is still the caller's terminal."""
    print(f"contentfs: {message}", file=sys.stderr, flush=True)


def _raise_readahead(mountpoint: str) -> None:
    """As root, raise the mount's readahead to 1 MiB (1 MiB read requests)."""
    if os.geteuid() != 0:
        return
    entry = _mount_entry(mountpoint)
    if entry is None:
        return
    path = f"/sys/class/bdi/{entry[2]}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write("1024")
    except OSError as exc:
        log.info("readahead of %s not raised: %s", mountpoint, exc)


def _setup_logging(debug: bool, *, quiet: bool) -> None:
    """Log to stderr. ``quiet`` (a daemon still attached to the caller's terminal):
    only warnings until the daemon has moved its output to its log file."""
    handler = logging.StreamHandler(sys.stderr)
    if quiet:
        handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s contentfs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def mount_main(
    root: str,
    mountpoint: str,
    options: tuple[str, ...],
    *,
    foreground: bool,
    debug: bool,
    log_file: str | None = None,
    remote: bool = False,
) -> int:
    """Mount store ``root`` at ``mountpoint`` (``remote``: ``root`` is the address of a
    gRPC store); see the module docstring. Returns the exit status: 0 after a clean
    unmount (or, in the parent, once the daemon answers), 1 on a failure, 2 on bad
    options, 4 for no store at ``root`` (read-only) or a root that is no directory. A
    read-write mount makes a missing root, parents too."""
    _setup_logging(debug, quiet=not foreground)
    try:
        opts = parse_options(options)
    except ValueError as exc:
        print(f"contentfs: {exc}", file=sys.stderr)
        return 2
    if not remote and opts.timeout is not None:
        print("contentfs: mount option timeout= needs a store address", file=sys.stderr)
        return 2
    if not remote:
        root = os.path.abspath(root)
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.isdir(mountpoint) and not _mount_entry(mountpoint):
        # checked first: a mistyped mount point must not leave a new root behind
        why = "not a directory" if os.path.lexists(mountpoint) else "no such directory"
        print(f"contentfs: mount point {mountpoint}: {why}", file=sys.stderr)
        return 1
    if not remote and not _mount_entry(root):
        try:  # a read-write mount makes a missing root, as the CLI's writing commands
            prepare_root(root, create=not opts.readonly)
        except StoreError as exc:
            print(f"contentfs: {exc}", file=sys.stderr)
            return EXIT_NO_STORE
    ready_r, ready_w = os.pipe()
    if not foreground:
        pid = os.fork()
        if pid:
            os.close(ready_w)
            return _wait_ready(ready_r, pid)
        os.close(ready_r)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.close(devnull)
    else:
        os.close(ready_r)
    try:
        return _run(root, mountpoint, opts, debug=debug, ready_fd=ready_w,
                    daemon=not foreground, log_file=log_file, remote=remote)
    finally:
        with contextlib.suppress(OSError):
            os.close(ready_w)


def _wait_ready(ready_r: int, pid: int) -> int:
    """In the parent: 0 once the daemon says the mount answers, else its failure."""
    with os.fdopen(ready_r, "rb") as f:
        if f.read(2) == b"ok":
            return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code > 0 else 1


def _open_store(root: str, opts: MountOptions, *, remote: bool) -> Store:
    """The store to mount: a root, or (``remote``) the gRPC store at ``root``, whose
    writes are held by the lease ``contentfs`` so containerd's GC keeps them."""
    if not remote:
        return LocalStore(root, readonly=opts.readonly).namespace(opts.namespace)
    from store.grpc.client import DEFAULT_TIMEOUT, KEEP_LEASE, RemoteStore

    store = RemoteStore(root, namespace=opts.namespace,
                        timeout=opts.timeout or DEFAULT_TIMEOUT, lease=KEEP_LEASE)
    try:
        store.list_statuses()  # reachable, and the namespace is valid: say so now
    except BaseException:
        store.close()
        raise
    return store


def _run(root: str, mountpoint: str, opts: MountOptions, *, debug: bool, ready_fd: int,
         daemon: bool, log_file: str | None, remote: bool = False) -> int:
    try:
        _clear_dead_mount(mountpoint)
        store = _open_store(root, opts, remote=remote)
    except RuntimeError as exc:
        _tell(f"cannot mount {root}: {exc}")
        return 1
    except OSError as exc:
        _tell(f"cannot mount {root} at {mountpoint}: {exc}")
        return 1
    except StoreError as exc:  # the CLI's exit status for its class (unreachable: 7)
        _tell(f"cannot mount {root} at {mountpoint}: {exc}")
        return exit_code(exc)
    lock_fd = _take_pidfile(mountpoint)
    ops = ContentOps(store, readonly=opts.readonly)
    fuse_options = set(pyfuse3.default_options) | opts.fuse
    fuse_options |= {f"fsname={root}", "subtype=contentfs"}
    if opts.auto_unmount:
        fuse_options.add("auto_unmount")
    if debug:
        fuse_options.add("debug")
    try:
        pyfuse3.init(ops, mountpoint, fuse_options)
    except RuntimeError as exc:
        _tell(f"cannot mount {root} at {mountpoint}: {exc}")
        store.close()
        return 1
    log.info("mounted %s at %s (%s)", root, mountpoint, ",".join(sorted(fuse_options)))
    device_last = _device_above_all_fds()
    code = 0
    try:
        trio.run(_serve, ops, mountpoint, ready_fd, daemon, log_file)
        log.info("unmounting %s", mountpoint)
    except BaseException:
        log.critical("contentfs daemon failed; unmounting %s", mountpoint, exc_info=True)
        code = 1
    finally:
        ops.close_all()
        if device_last is not None:
            os.close(device_last)  # (libfuse's close of its own ends the connection)
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        store.close()
        if lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(pidfile_path(mountpoint))
            os.close(lock_fd)  # (after the unlink: umount waits for this lock)
    return code


def _device_above_all_fds() -> int | None:
    """A copy of the mount's /dev/fuse descriptor numbered above every open one, so a
    SIGKILLed daemon ends its connection before fusermount3 learns of the death.

    With ``auto_unmount``, fusermount3 waits for its socket to the daemon to close, then
    unmounts only if opening the mount point fails with ENOTCONN. A dying process's
    files are released last descriptor first (the kernel runs the releases queued by
    its exit in reverse), and libfuse's socket is numbered above /dev/fuse: under load
    the dying daemon was preempted between the two releases, fusermount3's open got
    ECONNABORTED instead and it left the dead mount behind (seen in 2 of 4 loaded suite
    runs). The device's last reference is now the highest descriptor: released first.
    """
    fd_dir = "/proc/self/fd"
    try:
        fds = [int(name) for name in os.listdir(fd_dir)]
        device = next(fd for fd in fds if _link(f"{fd_dir}/{fd}") == "/dev/fuse")
    except (OSError, StopIteration):
        log.warning("no /dev/fuse descriptor found: a SIGKILL may leave a dead mount")
        return None
    return fcntl.fcntl(device, fcntl.F_DUPFD_CLOEXEC, max(fds) + 1)


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # (the listing's own descriptor, closed by now)
        return ""


async def _serve(ops: ContentOps, mountpoint: str, ready_fd: int, daemon: bool,
                 log_file: str | None) -> None:
    from .watch import watch_store

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals)
        nursery.start_soon(_announce, mountpoint, ready_fd, daemon, log_file)
        if isinstance(ops.store, ChangeFeed):
            # (a store that tells no changes gets short caches instead)
            nursery.start_soon(watch_store, ops.store, ops.blobs)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _announce(mountpoint: str, ready_fd: int, daemon: bool, log_file: str | None) -> None:
    """Tell the waiting parent (or the log) once the mount answers a stat."""
    await trio.to_thread.run_sync(os.stat, mountpoint)
    # after FUSE INIT (which the stat waited for): INIT would lower it again
    await trio.to_thread.run_sync(_raise_readahead, mountpoint)
    with contextlib.suppress(OSError):
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    if daemon:
        path = log_file or pidfile_path(mountpoint)[: -len(".pid")] + ".log"
        try:
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                             0o600)
        except OSError:
            target = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(target, 1)
        os.dup2(target, 2)
        os.close(target)
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.NOTSET)
    log.info("%s answers", mountpoint)


def _take_pidfile(mountpoint: str) -> int | None:
    """Write our pid to the mount's pidfile and hold a lock on it while we run."""
    path = pidfile_path(mountpoint)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        log.info("pidfile %s not taken: %s", path, exc)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def umount_main(mountpoint: str, *, lazy: bool) -> int:
    """Unmount ``mountpoint`` and wait (up to a minute) for its daemon to finish."""
    mountpoint = os.path.abspath(mountpoint)
    entry = _mount_entry(mountpoint)
    if entry is None:
        print(f"contentfs: {mountpoint}: not mounted", file=sys.stderr)
        return 1
    fstype = entry[entry.index("-") + 1] if "-" in entry else ""
    if fstype != "fuse.contentfs":
        print(f"contentfs: {mountpoint}: not a contentfs mount ({fstype})", file=sys.stderr)
        return 1
    lock_fd = None
    with contextlib.suppress(OSError):
        lock_fd = os.open(pidfile_path(mountpoint), os.O_RDONLY | os.O_CLOEXEC)
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        msg = proc.stderr.strip().removeprefix("fusermount3: ")
        print(f"contentfs: {msg or 'unmount failed'}", file=sys.stderr)
        if lock_fd is not None:
            os.close(lock_fd)
        return 1
    if lock_fd is None:
        return 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return 0
            except OSError:
                time.sleep(0.05)
        print(f"contentfs: {mountpoint}: daemon still running after unmount", file=sys.stderr)
        return 1
    finally:
        os.close(lock_fd)
