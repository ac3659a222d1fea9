"""The ``contentfs`` command line: store commands mirroring ``ctr content``, plus
``mount``, ``umount`` and ``serve``.

Every store error prints one line, ``contentfs: <message>``, and exits with the code of
its class (fusefs.exits); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar

import click

from store import (
    AlreadyExists,
    FailedPrecondition,
    Info,
    InvalidArgument,
    Lease,
    LocalStore,
    LocalWriter,
    NotImplemented,  # noqa: A004
    Status,
    StoreError,
    Unavailable,
    parse_digest,
    parse_filters,
    prepare_root,
)
from store.digest import split_digest
from store.identifiers import DEFAULT_NAMESPACE, validate_identifier
from store.text import human_size, printable_ref
from store.verify import verify_many

from .exits import EXIT_OTHER, exit_code
from .progress import Progress

if TYPE_CHECKING:
    from store.grpc.client import RemoteStore, RemoteWriter

#: What the store commands work on: a root directory, or a store over gRPC (--address).
AnyStore: TypeAlias = "LocalStore | RemoteStore"


F = TypeVar("F", bound=Callable[..., Any])
_CHUNK = 1 << 20


def default_root() -> str:
    """``$CONTENTFS_ROOT``, else /var/lib/contentfs for root, else a per-user data dir."""
    env = os.environ.get("CONTENTFS_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/contentfs"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "contentfs")


def fail(message: str, code: int = EXIT_OTHER) -> NoReturn:
    click.echo(f"contentfs: {printable(message)}", err=True)
    sys.exit(code)


def printable(text: str) -> str:
    """``text`` safe for a terminal line: bytes that are not UTF-8 (argv and names
    decoded with surrogateescape) as ``\\xNN``, control characters escaped."""
    text = printable_ref(text)
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(_escape_control, text)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_control(m: re.Match[str]) -> str:
    ch = m.group()
    return _ESCAPES.get(ch) or f"\\x{ord(ch):02x}"


#: Table cells longer than this are shortened in the middle with an ellipsis (JSON
#: output always carries the whole value).
CELL_MAX = 64


def cell(text: str, limit: int = CELL_MAX) -> str:
    """A table cell: ``printable`` and at most ``limit`` characters (head…tail)."""
    text = printable(text)
    if len(text) <= limit:
        return text
    tail = (limit - 1) // 3
    return f"{text[:limit - 1 - tail]}\u2026{text[len(text) - tail:]}"


class _Group(click.Group):
    """Turns store errors into one line and a per-class exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StoreError as exc:
            fail(str(exc), exit_code(exc))
        except BrokenPipeError:
            # the reader went away (e.g. `contentfs get ... | head`): not an error of ours
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(EXIT_OTHER)
        except OSError as exc:  # the environment (ENOSPC, EIO, EACCES), not a bug of ours
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")


def _remember_address(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["address"] = value


_ADDRESS_HELP = ("Work on the store at this gRPC address instead of a root: containerd's or"
                 " `contentfs serve`'s socket, unix:///PATH or tcp://HOST:PORT"
                 " (default: $CONTENTFS_ADDRESS).")


def address_option(f: F) -> F:
    """``--address ADDR``, before the command or after it: a remote store."""
    return click.option(
        "--address", metavar="ADDR", default=None, expose_value=False,
        callback=_remember_address, help=_ADDRESS_HELP,
    )(f)


def local_root_option(f: F) -> F:
    """``--root`` after the command name too (``contentfs ls --root R``)."""
    return click.option(
        "--root",
        "cmd_root",
        metavar="ROOT",
        default=None,
        help="Store directory (default: $CONTENTFS_ROOT, else a per-user data directory).",
    )(f)


def root_option(f: F) -> F:
    """Where the store is, after the command name too: ``--root R`` or ``--address A``."""
    return local_root_option(address_option(f))


def namespace_option(f: F) -> F:
    """``-n/--namespace NS``, before the command (``contentfs -n NS ls``) or after it
    (``contentfs ls -n NS``); else ``$CONTENTFS_NAMESPACE``, else ``default``. The one
    definition for every command that works in a namespace, local or remote."""

    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(dict)["namespace"] = value

    return click.option(
        "-n",
        "--namespace",
        metavar="NS",
        default=None,
        expose_value=False,
        callback=remember,
        help="Namespace (default: $CONTENTFS_NAMESPACE, else 'default').",
    )(f)


def chosen_namespace(ctx: click.Context) -> str:
    """The namespace of this invocation (``-n``, else ``$CONTENTFS_NAMESPACE``, else
    ``default``), validated as containerd's identifiers (InvalidArgument, exit 3)."""
    ns = (
        (ctx.find_root().obj or {}).get("namespace")
        or os.environ.get("CONTENTFS_NAMESPACE")
        or DEFAULT_NAMESPACE
    )
    return validate_identifier("namespace", ns)


def chosen_address(ctx: click.Context, cmd_root: str | None) -> str | None:
    """The remote store's address, or None for a root. ``--root`` and ``--address`` are
    mutually exclusive, and so are ``$CONTENTFS_ROOT`` and ``$CONTENTFS_ADDRESS`` when
    neither option is given; an option wins over the other one's variable."""
    obj = ctx.find_root().obj or {}
    address: str | None = obj.get("address")
    root = cmd_root or obj.get("root")
    if address and root:
        raise click.UsageError("--root and --address are mutually exclusive", ctx)
    if address or root:
        return address or None
    env_address = os.environ.get("CONTENTFS_ADDRESS")
    if env_address and os.environ.get("CONTENTFS_ROOT"):
        raise click.UsageError(
            "$CONTENTFS_ROOT and $CONTENTFS_ADDRESS are both set: choose with --root or"
            " --address", ctx)
    return env_address or None


def open_remote(ctx: click.Context, address: str) -> RemoteStore:
    """The store at ``address`` in the chosen namespace. What is written through it is
    held by the lease ``contentfs``, so containerd's garbage collection keeps it."""
    from store.grpc.client import DEFAULT_TIMEOUT, KEEP_LEASE, RemoteStore

    namespace = chosen_namespace(ctx)
    timeout = os.environ.get("CONTENTFS_TIMEOUT")
    try:
        seconds = float(timeout) if timeout else DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise click.UsageError(f"$CONTENTFS_TIMEOUT={timeout}: expected seconds > 0", ctx)
    store = RemoteStore(address, namespace=namespace, timeout=seconds, lease=KEEP_LEASE)
    ctx.call_on_close(store.close)
    return store


def open_store(
    ctx: click.Context, cmd_root: str | None, *, create: bool = False, reading: bool = False,
    raw: bool = False,
) -> AnyStore:
    """Open the chosen store: a root, as the view of the chosen namespace (``raw``: the
    raw store beneath the namespaces), or a remote one (``--address``). For a root,
    ``create`` (commands that write) makes a missing root, parents too; other commands
    say ``no store at ROOT`` (exit 4), except for the default root, which is always
    made. ``reading`` commands fall back to a read-only open when the root cannot be
    written (read-only media, another user's store)."""
    ns = None if raw else chosen_namespace(ctx)
    address = chosen_address(ctx, cmd_root)
    if address is not None:
        return open_remote(ctx, address)
    root = cmd_root or ctx.obj.get("root") or default_root()
    explicit = bool(cmd_root or ctx.obj.get("root") or os.environ.get("CONTENTFS_ROOT"))
    prepare_root(root, create=create or not explicit)
    try:
        store = LocalStore(root)
    except (OSError, Unavailable) as exc:
        if not reading or (isinstance(exc, OSError) and exc.errno not in _NOT_WRITABLE):
            raise
        store = LocalStore(root, readonly=True)
    ctx.call_on_close(store.close)
    return store.namespace(ns)


def open_local(
    ctx: click.Context, cmd_root: str | None, command: str, *, create: bool = False,
    reading: bool = False, raw: bool = False,
) -> LocalStore:
    """``open_store`` for commands that need a root: NotImplemented for ``--address``."""
    store = open_store(ctx, cmd_root, create=create, reading=reading, raw=raw)
    if not isinstance(store, LocalStore):
        raise NotImplemented(  # noqa: F901 - the store's error class, not the constant
            f"{command} with a remote store (--address): not supported yet")
    return store


_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def info_json(info: Info) -> dict[str, Any]:
    return {
        "digest": info.digest,
        "size": info.size,
        "created_at": rfc3339(info.created_at),
        "updated_at": rfc3339(info.updated_at),
        "labels": dict(sorted(info.labels.items())),
    }


def status_json(st: Status) -> dict[str, Any]:
    return {
        "ref": st.ref,
        "offset": st.offset,
        "total": st.total,
        "expected": st.expected or "",
        "started_at": rfc3339(st.started_at),
        "updated_at": rfc3339(st.updated_at),
    }


def age(when: dt.datetime) -> str:
    secs = max(0, int((dt.datetime.now(dt.UTC) - when).total_seconds()))
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if secs >= length:
            n = secs // length
            return f"{n} {unit}" if n == 1 else f"{n} {unit}s"
    return "Less than a second"  # as ctr says


def parse_pairs(pairs: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"label {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@address_option
@click.option(
    "--root",
    metavar="ROOT",
    default=None,
    help="Store directory (default: $CONTENTFS_ROOT, else a per-user data directory).",
)
@click.option(
    "-n",
    "--namespace",
    metavar="NS",
    default=None,
    help="Namespace (default: $CONTENTFS_NAMESPACE, else 'default').",
)
@click.version_option(package_name="contentfs")
@click.pass_context
def cli(ctx: click.Context, root: str | None, namespace: str | None) -> None:
    """A content-addressed blob store with containerd's semantics.

    A store is a directory in containerd's layout (blobs/<alg>/<hex>, ingest/); a
    containerd content directory or an OCI image layout opens as one. Mount it with
    `contentfs mount ROOT MOUNTPOINT` and use ls, cat, cp, mv, rm, getfattr and
    setfattr, or serve it to `ctr` with `contentfs serve`.
    """
    ctx.ensure_object(dict)
    ctx.obj["root"] = root
    ctx.obj["namespace"] = namespace


@cli.command("ls")
@click.argument("filters", nargs=-1)
@click.option("-q", "--quiet", is_flag=True, help="Print only the digests.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of blobs.")
@root_option
@namespace_option
@click.pass_context
def ls_cmd(
    ctx: click.Context, filters: tuple[str, ...], quiet: bool, as_json: bool, cmd_root: str | None
) -> None:
    """List committed blobs, optionally matching containerd FILTERS.

    Several filters match when any does; within one, comma-separated selectors must
    all match: `labels."containerd.io/gc.root"`, `digest~=^sha256:ab`,
    `labels.team==infra,labels.env!=prod`.
    """
    if as_json and quiet:
        raise click.UsageError("--json and -q/--quiet cannot be used together", ctx)
    parse_filters(*filters, strict=True)  # a bad filter fails before anything is listed
    store = open_store(ctx, cmd_root, reading=True)
    infos = store.list(*filters)
    if as_json:
        click.echo(json.dumps([info_json(i) for i in infos], indent=2))
        return
    if quiet:
        for info in infos:
            click.echo(info.digest)
        return
    rows = [("DIGEST", "SIZE", "AGE", "LABELS")]
    for info in infos:
        labels = ",".join(f"{k}={v}" for k, v in sorted(info.labels.items()))
        rows.append((info.digest, human_size(info.size), age(info.created_at),
                     cell(labels, 2 * CELL_MAX)))
    _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1]]
        click.echo("  ".join(cells).rstrip())


@cli.command("info")
@click.argument("digest")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@root_option
@namespace_option
@click.pass_context
def info_cmd(ctx: click.Context, digest: str, as_json: bool, cmd_root: str | None) -> None:
    """Show one blob's size, times and labels."""
    info = open_store(ctx, cmd_root, reading=True).info(digest)
    if as_json:
        click.echo(json.dumps(info_json(info), indent=2))
        return
    click.echo(f"digest:     {info.digest}")
    click.echo(f"size:       {info.size}")
    click.echo(f"created_at: {rfc3339(info.created_at)}")
    click.echo(f"updated_at: {rfc3339(info.updated_at)}")
    for k, v in sorted(info.labels.items()):
        click.echo(f"label:      {printable(k)}={printable(v)}")


@cli.command("get")
@click.argument("digest")
@click.option("-o", "--output", metavar="FILE", default=None,
              help="Write to FILE (created or truncated) instead of standard output.")
@root_option
@namespace_option
@click.pass_context
def get_cmd(ctx: click.Context, digest: str, output: str | None, cmd_root: str | None) -> None:
    """Write a blob's bytes to standard output (or FILE). On a terminal, a progress bar
    is shown on standard error unless the bytes themselves go to the terminal."""
    store = open_store(ctx, cmd_root, reading=True)
    # the blob first: a missing one creates no output file
    reader = store.reader_at(digest) if isinstance(store, LocalStore) else None
    size = reader.size if reader is not None else store.info(digest).size
    if output is not None:
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            fail(f"{output}: {exc.strerror or exc}")
    else:
        sys.stdout.buffer.flush()
        fd = sys.stdout.fileno()
    try:
        with _get_progress(fd, size) as progress:
            if reader is not None:
                _copy_out(reader.fileno(), fd, size, progress)
                return
            assert not isinstance(store, LocalStore)
            for chunk in _prefetched(store.read_chunks(digest)):
                _write_all(fd, chunk)
                progress.advance(len(chunk))
    finally:
        if reader is not None:
            reader.close()
        if output is not None:
            os.close(fd)


def _get_progress(fd: int, size: int) -> Progress:
    progress = Progress("reading", size)
    if os.isatty(fd):  # the bytes themselves go to the terminal
        progress.shown = False
    return progress


def _prefetched(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks``, the next one fetched (in a thread) while the caller uses this one."""
    with ThreadPoolExecutor(1, thread_name_prefix="contentfs-read") as pool:
        ahead: Future[bytes | None] = pool.submit(next, chunks, None)
        while (chunk := ahead.result()) is not None:
            ahead = pool.submit(next, chunks, None)
            yield chunk


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view) :]


def _copy_out(src: int, dst: int, size: int, progress: Progress | None = None) -> None:
    step = 1 << 30 if progress is None or not progress.shown else 8 << 20
    offset = 0
    try:
        while offset < size:
            sent = os.sendfile(dst, src, offset, min(size - offset, step))
            if sent == 0:
                break
            offset += sent
            if progress is not None:
                progress.advance(sent)
        return
    except OSError as exc:
        if exc.errno not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: fall back
            raise
    while offset < size:
        chunk = os.pread(src, min(_CHUNK, size - offset), offset)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
        offset += len(chunk)
        if progress is not None:
            progress.advance(len(chunk))


@cli.command("ingest")
@click.argument("ref")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--expected-digest", metavar="DIGEST", help="Fail unless the bytes have it.")
@click.option("--expected-size", metavar="N", type=click.IntRange(min=0), default=0,
              help="Fail unless there are exactly N bytes.")
@click.option("--label", "labels", metavar="KEY=VALUE", multiple=True,
              help="Label for the committed blob (repeatable).")
@root_option
@namespace_option
@click.pass_context
def ingest_cmd(
    ctx: click.Context,
    ref: str,
    file: str | None,
    expected_digest: str | None,
    expected_size: int,
    labels: tuple[str, ...],
    cmd_root: str | None,
) -> None:
    """Store FILE (or standard input) under ingest REF, commit it, print its digest.

    An interrupted ingest of the same REF resumes where it stopped: the bytes already
    stored are skipped in the input once checked to be the same (a FILE that differs
    starts over; a stream that differs is refused). Content that already exists is
    success.
    """
    store = open_store(ctx, cmd_root, create=True)
    label_map = parse_pairs(labels)
    expected = parse_digest(expected_digest) if expected_digest else None
    source: IO[bytes]
    if file is None or file == "-":
        source = sys.stdin.buffer
    else:
        try:
            source = open(file, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            fail(f"{file}: {exc.strerror}")
    try:
        try:
            writer = store.writer(ref, total=expected_size, expected=expected)
        except AlreadyExists:
            assert expected is not None
            if label_map:
                _merge_labels(store, expected, label_map)
            click.echo(expected)
            return
        try:
            size = _source_size(source)
            _resume_input(store, ref, source, writer)
            with Progress("ingesting", size, writer.offset) as progress:
                for chunk in _chunks(source):
                    try:
                        writer.write(chunk)
                    except OSError as exc:  # e.g. ENOSPC: the bytes stored so far are kept
                        progress.clear()
                        fail(f"ingest {ref}: {exc.strerror or exc} after {writer.offset} bytes"
                             " (run the same command again to resume)")
                    progress.advance(len(chunk))
            try:
                digest = writer.commit(expected_size, expected, labels=label_map)
            except AlreadyExists:
                digest = writer.digest()
                if label_map:
                    _merge_labels(store, digest, label_map)
        except BaseException:
            writer.close()
            raise
        click.echo(digest)
    finally:
        if source is not sys.stdin.buffer:
            source.close()


def _merge_labels(store: AnyStore, digest: str, labels: dict[str, str]) -> None:
    info = store.info(digest)
    store.update(Info(info.digest, info.size, info.created_at, info.updated_at, labels),
                 *(f"labels.{k}" for k in labels))


def _source_size(source: IO[bytes]) -> int | None:
    try:
        st = os.fstat(source.fileno())
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _resume_input(
    store: AnyStore, ref: str, source: IO[bytes], writer: LocalWriter | RemoteWriter
) -> None:
    """Position ``source`` after the bytes a resumed ingest already holds, checking that
    they are the same bytes (a remote store: that they have the same digest), so a
    resume never commits a mix of two inputs. A seekable source that differs restarts
    the ingest at zero; a stream that differs (or ends early) is FailedPrecondition,
    with the ingest left as it was."""
    held = writer.offset
    if held == 0:
        return
    try:
        start = source.tell() if source.seekable() else None
    except OSError:
        start = None
    if isinstance(store, LocalStore):
        want, got = _compare_stored(store, ref, source, held)
    else:
        want, got = _compare_digest(writer.digest(), source, held)
    if want == got:
        return
    if start is not None:
        source.seek(start)
        writer.truncate(0)
        click.echo(f"contentfs: ingest {ref}: input differs from the {held} bytes already"
                   " stored; starting over", err=True)
        return
    if len(got) < len(want):
        raise FailedPrecondition(
            f"ingest {ref}: input is shorter than the {held} bytes already ingested")
    raise FailedPrecondition(
        f"ingest {ref}: input differs from the {held} bytes already stored"
        f" (`contentfs abort {ref}` starts over)")


def _compare_stored(
    store: LocalStore, ref: str, source: IO[bytes], held: int
) -> tuple[bytes, bytes]:
    """Read the input along the stored bytes; the first pair that differs (equal when
    the input starts with all ``held`` bytes)."""
    done = 0
    with open(store.ingest_data_path(ref), "rb") as stored:
        while done < held:
            want = stored.read(min(held - done, _CHUNK))
            if not want:  # the stored data is shorter than its offset: never the same
                return b"\0", b"\1"
            got = source.read(len(want))
            if got != want:
                return want, got
            done += len(want)
    return b"", b""


def _compare_digest(held_digest: str, source: IO[bytes], held: int) -> tuple[bytes, bytes]:
    """Hash the first ``held`` bytes of the input: (digest held, digest of the input),
    the input's marked short when it ends before ``held`` bytes."""
    alg, _ = split_digest(parse_digest(held_digest))
    hasher = hashlib.new(alg)
    done = 0
    while done < held:
        chunk = source.read(min(held - done, _CHUNK))
        if not chunk:
            return b"x", b""  # shorter
        hasher.update(chunk)
        done += len(chunk)
    return held_digest.encode(), f"{alg}:{hasher.hexdigest()}".encode()


def _chunks(source: IO[bytes]) -> Iterator[bytes]:
    read = getattr(source, "read1", source.read)
    while chunk := read(_CHUNK):
        yield chunk


@cli.command("active")
@click.argument("filters", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of ingests.")
@root_option
@namespace_option
@click.pass_context
def active_cmd(
    ctx: click.Context, filters: tuple[str, ...], as_json: bool, cmd_root: str | None
) -> None:
    """List active (unfinished) ingests, optionally matching FILTERS on `ref`
    (e.g. `ref~=^layer-`)."""
    parse_filters(*filters, strict=True)  # a bad filter fails before anything is listed
    statuses = open_store(ctx, cmd_root, reading=True).list_statuses(*filters)
    if as_json:
        click.echo(json.dumps([status_json(s) for s in statuses], indent=2))
        return
    rows = [("REF", "SIZE", "TOTAL", "AGE")]
    for st in statuses:
        rows.append((cell(st.ref), str(st.offset), str(st.total or ""), age(st.started_at)))
    _table(rows)


@cli.command("abort")
@click.argument("refs", nargs=-1, required=True)
@root_option
@namespace_option
@click.pass_context
def abort_cmd(ctx: click.Context, refs: tuple[str, ...], cmd_root: str | None) -> None:
    """Abort active ingests, discarding their data."""
    store = open_store(ctx, cmd_root)
    for ref in refs:
        store.abort(ref)


@cli.command("rm")
@click.argument("digests", nargs=-1, required=True)
@root_option
@namespace_option
@click.pass_context
def rm_cmd(ctx: click.Context, digests: tuple[str, ...], cmd_root: str | None) -> None:
    """Delete blobs; print each digest deleted. A missing blob is an error."""
    store = open_store(ctx, cmd_root)
    first_error = _each(digests, store.delete)
    if first_error is not None:
        sys.exit(exit_code(first_error))


def _each(names: Iterable[str], action: Callable[[str], object]) -> StoreError | None:
    """``action`` on each name in turn, printing the name when it succeeds and a one-line
    error when it fails (the others still run); the first error, or None."""
    first_error: StoreError | None = None
    for name in names:
        try:
            action(name)
        except StoreError as exc:
            click.echo(f"contentfs: {printable(str(exc))}", err=True)
            first_error = first_error or exc
            continue
        click.echo(name)
    return first_error


@cli.command("label")
@click.argument("digest")
@click.argument("pairs", nargs=-1)
@root_option
@namespace_option
@click.pass_context
def label_cmd(
    ctx: click.Context, digest: str, pairs: tuple[str, ...], cmd_root: str | None
) -> None:
    """Set (KEY=VALUE) or remove (KEY=) labels of a blob; print its labels."""
    store = open_store(ctx, cmd_root, create=True)
    if pairs:
        changes = parse_pairs(pairs)
        info = store.info(digest)
        info = store.update(
            Info(info.digest, info.size, info.created_at, info.updated_at, changes),
            *(f"labels.{k}" for k in changes),
        )
    else:
        info = store.info(digest)
    click.echo(",".join(f"{k}={v}" for k, v in sorted(info.labels.items())))


@cli.command("verify")
@click.argument("digests", nargs=-1)
@root_option
@namespace_option
@click.pass_context
def verify_cmd(ctx: click.Context, digests: tuple[str, ...], cmd_root: str | None) -> None:
    """Rehash blobs (all when none given) and report those that no longer match their
    digest. Exits non-zero if any is corrupt or missing."""
    store = open_store(ctx, cmd_root, reading=True)
    # a full run also reports what sits at a blob's path without being one
    strays = list(store.stray_names()) if isinstance(store, LocalStore) else []
    targets = list(digests) or sorted([i.digest for i in store.list()] + strays)
    sizes = {}
    for digest in targets:
        try:
            sizes[digest] = store.info(digest).size
        except StoreError:
            sizes[digest] = 0  # reported below
    bad = 0
    code = 0
    # the bar shares the terminal with the results: it is erased before each line
    shared = sys.stdout.isatty()
    lock = threading.Lock()  # workers advance the bar; the main thread prints
    hashed: dict[str, int] = {}
    with Progress("verifying", sum(sizes.values())) as progress:

        def advance(digest: str, n: int) -> None:
            with lock:
                hashed[digest] = hashed.get(digest, 0) + n
                progress.advance(n)

        # blobs are hashed on every core; results are printed in the order of targets
        for digest, result in verify_many(store, targets, progress=advance):
            with lock:  # a blob that failed part-way counts as done
                progress.advance(max(0, sizes[digest] - hashed.pop(digest, 0)))
            if isinstance(result, StoreError):
                bad += 1
                code = code or exit_code(result)
                line = f"{digest}: FAILED ({printable(str(result))})"
            else:
                line = f"{digest}: OK"
            with lock:
                if shared:
                    progress.clear()
                click.echo(line)
    if bad:
        click.echo(f"contentfs: {bad} of {len(targets)} blobs failed verification", err=True)
        sys.exit(code)


@cli.command(
    "mount",
    context_settings={"ignore_unknown_options": False},
)
@click.argument("root", type=click.Path())
@click.argument("mountpoint", type=click.Path(file_okay=False), required=False)
@click.option("-o", "options", metavar="OPT[,OPT...]", multiple=True,
              help="Mount options: ro, allow_other, default_permissions, ... "
                   "(generic ones such as rw, defaults, nofail, _netdev are ignored);"
                   " namespace=NS (as -n); with --address: timeout=SECONDS.")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground.")
@click.option("--debug", is_flag=True, help="Log every request (implies -f).")
@click.option("--log-file", metavar="FILE", default=None,
              help="Where the background daemon logs (default: mount-*.log beside its pid"
                   " file, in /run/contentfs for root, else $XDG_RUNTIME_DIR/contentfs).")
@address_option
@namespace_option
@click.pass_context
def mount_cmd(
    ctx: click.Context, root: str, mountpoint: str | None, options: tuple[str, ...],
    foreground: bool, debug: bool, log_file: str | None,
) -> None:
    """Mount the store ROOT at MOUNTPOINT, or with --address ADDR (or a ROOT of the form
    unix:///PATH or tcp://HOST:PORT) the store at that gRPC address: a containerd or
    another `contentfs serve`. The mount shows one namespace: -n NS or -o namespace=NS,
    else $CONTENTFS_NAMESPACE, else `default`.

    Returns once the mount answers; the daemon stays in the background unless -f.
    Unmount with `contentfs umount MOUNTPOINT` (or SIGINT/SIGTERM in the foreground).
    """
    from .mount import is_address, mount_main

    address = (ctx.find_root().obj or {}).get("address")
    if mountpoint is None:
        env_address = os.environ.get("CONTENTFS_ADDRESS")
        if not (address or env_address):
            raise click.UsageError("missing argument MOUNTPOINT", ctx)
        root, mountpoint = address or env_address or "", root
    elif address:
        raise click.UsageError("--address and a store ROOT are mutually exclusive", ctx)
    elif is_address(root):
        address = root
    options = _mount_namespace(ctx, options)
    sys.exit(mount_main(root, mountpoint, options, foreground=foreground or debug, debug=debug,
                        log_file=log_file, remote=bool(address) or is_address(root)))


def _mount_namespace(ctx: click.Context, options: tuple[str, ...]) -> tuple[str, ...]:
    """``options`` with ``namespace=NS`` first when ``-n`` or ``$CONTENTFS_NAMESPACE``
    names one (as for every other command); ``-o namespace=`` wins over the variable, and
    differing from ``-n`` is a usage error."""
    given = [opt.strip()[len("namespace="):] for group in options for opt in group.split(",")
             if opt.strip().startswith("namespace=")]
    flag = (ctx.find_root().obj or {}).get("namespace")
    if flag is not None and any(ns != flag for ns in given):
        raise click.UsageError(f"-n {flag} and -o namespace={given[-1]} disagree", ctx)
    chosen = flag or os.environ.get("CONTENTFS_NAMESPACE")
    if chosen and not given:
        return (f"namespace={chosen}", *options)
    return options


@cli.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-l", "--lazy", is_flag=True, help="Detach now, clean up when no longer busy.")
def umount_cmd(mountpoint: str, lazy: bool) -> None:
    """Unmount a contentfs mount and wait for its daemon to finish."""
    from .mount import umount_main

    sys.exit(umount_main(mountpoint, lazy=lazy))


@cli.command("serve")
@click.option("--address", metavar="ADDR", default=None,
              help="Where to listen: unix:///PATH (default: contentfs/contentfs.sock in"
                   " $XDG_RUNTIME_DIR, else /run/contentfs for root) or tcp://127.0.0.1:PORT.")
@click.option("--debug", is_flag=True, help="Log every call.")
@click.option("--write-idle-timeout", metavar="SECONDS", type=click.FloatRange(min=0),
              default=60.0, show_default=True,
              help="Cancel a Write stream whose client sends nothing for this long (its"
                   " ingest stays, resumable); 0 never does.")
@local_root_option
@click.pass_context
def serve_cmd(ctx: click.Context, address: str | None, debug: bool,
              write_idle_timeout: float, cmd_root: str | None) -> None:
    """Serve the store over containerd's gRPC Content API (for `ctr -a SOCKET content ...`)."""
    from store.grpc.server import serve_main

    if (ctx.find_root().obj or {}).get("address"):
        raise click.UsageError(
            "serve serves a root (--root); its --address is where it listens, after the"
            " command", ctx)
    _every_namespace(ctx, "serve serves every namespace (each call names its own)")
    store = open_store(ctx, cmd_root, create=True, raw=True)
    assert isinstance(store, LocalStore)
    sys.exit(serve_main(store, address, debug=debug, write_idle_timeout=write_idle_timeout))

# registries: fetch, push, fetch-object, push-object (thin wrappers over store.registry) ---


def registry_options(f: F) -> F:
    """The connection options ctr's registry commands take."""
    f = click.option("--plain-http", is_flag=True,
                     help="Talk HTTP, not HTTPS (a local or test registry).")(f)
    f = click.option("-k", "--skip-verify", is_flag=True,
                     help="Do not verify the registry's TLS certificate.")(f)
    f = click.option("-u", "--user", metavar="USER[:PASSWORD]", default=None,
                     help="Credentials (the password is asked for, or read from a"
                          " non-terminal stdin, when not given); default: the auths of"
                          " ~/.docker/config.json.")(f)
    return f


def _registry_client(ref_text: str, plain_http: bool, skip_verify: bool, user: str | None,
                     connections: int = 8) -> tuple[Any, Any]:
    from store.registry import (
        Credentials,
        RegistryClient,
        docker_config_credentials,
        parse_reference,
    )

    ref = parse_reference(ref_text)
    creds = None
    if user is not None:
        name, sep, password = user.partition(":")
        if not sep and sys.stdin.isatty():
            password = click.prompt(f"password for {name}@{ref.host}", hide_input=True,
                                    err=True)
        elif not sep:  # as `docker login --password-stdin`
            password = sys.stdin.readline().rstrip("\n")
        creds = Credentials(name, password)
    else:
        creds = docker_config_credentials(ref.host)
    client = RegistryClient(ref.api_host, plain_http=plain_http, skip_verify=skip_verify,
                            credentials=creds, connections=connections)
    return ref, client


def _transfer_progress(as_json: bool) -> Any:
    import contextlib

    from store.registry import TerminalProgress

    if as_json or not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    return TerminalProgress(sys.stderr)


@cli.command("fetch")
@click.argument("ref")
@click.option("--platform", "platforms", metavar="OS/ARCH[/VARIANT]", multiple=True,
              help="Fetch only the manifests of this platform (repeatable); default: all.")
@click.option("--all-platforms", is_flag=True, help="Fetch every platform (the default).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=3, show_default=True,
              help="Blobs downloaded at once.")
@registry_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@root_option
@namespace_option
@click.pass_context
def fetch_cmd(
    ctx: click.Context, ref: str, platforms: tuple[str, ...], all_platforms: bool,
    concurrency: int, plain_http: bool, skip_verify: bool, user: str | None, as_json: bool,
    cmd_root: str | None,
) -> None:
    """Fetch the image REF (index, manifests, configs, layers) into the store, with the
    labels `ctr content fetch` writes plus containerd.io/gc.root on REF's object; print
    its digest. Interrupted downloads resume; blobs already stored are not downloaded."""
    from store.registry import fetch_image

    if all_platforms and platforms:
        raise click.UsageError("--all-platforms and --platform exclude each other")
    store = open_store(ctx, cmd_root, create=True)
    parsed, client = _registry_client(ref, plain_http, skip_verify, user, concurrency + 2)
    with client, _transfer_progress(as_json) as progress, _fetch_lease(store) as held:
        result = fetch_image(held, client, parsed, platforms=platforms,
                             concurrency=concurrency, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(result.digest)


@contextlib.contextmanager
def _fetch_lease(store: AnyStore) -> Iterator[AnyStore]:
    """The view a fetch writes through. On a root: held by a lease of its own (expiring
    in 24 h, as ctr's), deleted once the fetch ends, so a gc meanwhile cannot take the
    blobs committed before the manifests whose labels keep them. A remote store's writes
    are held already (the ``contentfs`` lease)."""
    if not isinstance(store, LocalStore) or store.ns is None:
        yield store
        return
    from store.gc import EXPIRE_LABEL

    until = dt.datetime.now(dt.UTC) + dt.timedelta(hours=24)
    lease = store.create_lease(None, {EXPIRE_LABEL: rfc3339(until)})
    try:
        yield store.namespace(store.ns, lease=lease.id)
    finally:
        store.delete_lease(lease.id)


@cli.command("fetch-object")
@click.argument("ref")
@click.argument("obj", metavar="[OBJECT]", required=False)
@registry_options
def fetch_object_cmd(ref: str, obj: str | None, plain_http: bool, skip_verify: bool,
                     user: str | None) -> None:
    """Write one object of REF's repository to standard output, as `ctr content
    fetch-object`: REF's manifest or index, or OBJECT (a digest). Stores nothing."""
    from store.registry import fetch_object

    parsed, client = _registry_client(ref, plain_http, skip_verify, user)
    with client:
        out = sys.stdout.buffer
        fetch_object(client, parsed, obj, out)
        out.flush()


@cli.command("push")
@click.argument("ref")
@click.argument("digest")
@click.option("--platform", "platforms", metavar="OS/ARCH[/VARIANT]", multiple=True,
              help="Push only these platforms' manifests of an index (repeatable).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=3, show_default=True,
              help="Blobs uploaded at once.")
@registry_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@root_option
@namespace_option
@click.pass_context
def push_cmd(
    ctx: click.Context, ref: str, digest: str, platforms: tuple[str, ...], concurrency: int,
    plain_http: bool, skip_verify: bool, user: str | None, as_json: bool,
    cmd_root: str | None,
) -> None:
    """Push the blob DIGEST and everything it references (an index's manifests, their
    configs and layers) to REF, skipping what the registry has; a manifest or index is
    tagged REF's tag. Prints DIGEST."""
    from store.registry import push_image

    store = open_store(ctx, cmd_root, reading=True)
    dgst = parse_digest(digest)
    parsed, client = _registry_client(ref, plain_http, skip_verify, user, concurrency + 2)
    with client, _transfer_progress(as_json) as progress:
        result = push_image(store, client, parsed, dgst, platforms=platforms,
                            concurrency=concurrency, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(result.digest)


@cli.command("push-object")
@click.argument("ref")
@click.argument("digest")
@click.argument("media_type", metavar="MEDIATYPE")
@registry_options
@root_option
@namespace_option
@click.pass_context
def push_object_cmd(ctx: click.Context, ref: str, digest: str, media_type: str,
                    plain_http: bool, skip_verify: bool, user: str | None,
                    cmd_root: str | None) -> None:
    """Push one blob of the store to REF's repository, as `ctr content push-object`: a
    manifest or index MEDIATYPE is stored as a manifest under REF's tag, anything else
    as a blob."""
    from store.registry import push_object

    store = open_store(ctx, cmd_root, reading=True)
    dgst = parse_digest(digest)
    parsed, client = _registry_client(ref, plain_http, skip_verify, user)
    with client:
        push_object(store, client, parsed, dgst, media_type)
    click.echo(dgst)

@cli.command("namespaces")
@click.option("-q", "--quiet", is_flag=True, help="Print only the names (the default).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of names.")
@root_option
@click.pass_context
def namespaces_cmd(ctx: click.Context, quiet: bool, as_json: bool, cmd_root: str | None) -> None:
    """List the namespaces of the store: those holding blobs, leases or ingests, and
    always `default`. A root only (not --address)."""
    names = open_local(ctx, cmd_root, "namespaces", reading=True, raw=True).namespaces()
    if as_json:
        click.echo(json.dumps(names, indent=2))  # as every other --json
        return
    for name in names:
        click.echo(name)



_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (``24h``, ``1h30m``, ``90s``); InvalidArgument if not one."""
    import re

    parts = re.findall(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)", text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise InvalidArgument(f"duration {text!r}: want e.g. 24h, 1h30m, 90s")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def lease_json(lease: Lease) -> dict[str, Any]:
    return {"id": lease.id, "created_at": rfc3339(lease.created_at),
            "labels": dict(lease.labels)}


@cli.group("lease", cls=_Group)
def lease_grp() -> None:
    """Leases: hold blobs and ingests against `contentfs gc` (containerd's leases). A root
    only (not --address: use `ctr leases` there)."""


@lease_grp.command("create")
@click.option("--id", "lease_id", metavar="ID", default=None,
              help="Lease id (default: generated, as containerd's clients do).")
@click.option("--expire", metavar="DURATION", default=None,
              help="Stop holding after DURATION (e.g. 24h): label containerd.io/gc.expire.")
@click.option("--label", "labels", metavar="KEY=VALUE", multiple=True, help="Lease label.")
@root_option
@namespace_option
@click.pass_context
def lease_create_cmd(
    ctx: click.Context, lease_id: str | None, expire: str | None, labels: tuple[str, ...],
    cmd_root: str | None,
) -> None:
    """Create a lease in the namespace; print its id."""
    from store.gc import EXPIRE_LABEL

    pairs = parse_pairs(labels)
    if expire is not None:
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=parse_duration(expire))
        pairs[EXPIRE_LABEL] = rfc3339(until)
    lease = open_local(ctx, cmd_root, "lease create", create=True).create_lease(lease_id, pairs)
    click.echo(lease.id)


@lease_grp.command("ls")
@click.argument("filters", nargs=-1)
@click.option("-q", "--quiet", is_flag=True, help="Print only the ids.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of leases.")
@root_option
@namespace_option
@click.pass_context
def lease_ls_cmd(
    ctx: click.Context, filters: tuple[str, ...], quiet: bool, as_json: bool,
    cmd_root: str | None,
) -> None:
    """List the namespace's leases, optionally matching FILTERS (id, labels.KEY)."""
    parse_filters(*filters, strict=True)  # a bad filter fails before anything is listed
    leases = open_local(ctx, cmd_root, "lease ls", reading=True).leases(*filters)
    if as_json:
        click.echo(json.dumps([lease_json(lease) for lease in leases], indent=2))
        return
    if quiet:
        for lease in leases:
            click.echo(lease.id)
        return
    rows = [("ID", "CREATED AT", "LABELS")]
    for lease in leases:
        labels = ",".join(f"{k}={v}" for k, v in sorted(lease.labels.items()))
        rows.append((lease.id, rfc3339(lease.created_at), labels or "-"))
    _table(rows)


@lease_grp.command("rm")
@click.argument("ids", nargs=-1, required=True)
@click.option("--sync", is_flag=True, help="Run gc before returning.")
@root_option
@namespace_option
@click.pass_context
def lease_rm_cmd(
    ctx: click.Context, ids: tuple[str, ...], sync: bool, cmd_root: str | None
) -> None:
    """Delete leases; print each id deleted. With --sync, run gc afterwards."""
    store = open_local(ctx, cmd_root, "lease rm")
    first_error = _each(ids, store.delete_lease)
    if sync:
        store.gc()
    if first_error is not None:
        sys.exit(exit_code(first_error))


def _every_namespace(ctx: click.Context, what: str) -> None:
    """A usage error for ``-n`` on a command that works on every namespace (it was
    silently ignored, so ``contentfs -n team-a gc`` looked like a gc of team-a only)."""
    flag = (ctx.find_root().obj or {}).get("namespace")
    if flag is not None:
        raise click.UsageError(f"{what}: -n {flag} does not apply", ctx)


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@root_option
@click.pass_context
def gc_cmd(ctx: click.Context, dry_run: bool, as_json: bool, cmd_root: str | None) -> None:
    """Collect garbage in every namespace (containerd's mark and sweep): remove blobs no
    gc.root label, live lease or gc.ref.content label keeps, expired leases and ingests
    idle for 24 h outside a lease. Unclaimed blobs are never removed. Prints each digest
    removed (or, with --dry-run, that would be) with its size, then the bytes freed. A
    root only (not --address)."""
    _every_namespace(ctx, "gc collects in every namespace at once")
    result = open_local(ctx, cmd_root, "gc", raw=True).gc(dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({
            "dry_run": dry_run,
            "removed": [{"digest": d, "size": n} for d, n in result.removed],
            "bytes_freed": result.bytes_freed,
            "ingests": [{"namespace": ns, "ref": ref} for ns, ref in result.ingests],
            "leases": [{"namespace": ns, "id": i} for ns, i in result.leases],
            "held_seconds": round(result.held_s, 6),
            "remarked": result.remarked,
        }, indent=2))
        return
    for dgst, size in result.removed:
        click.echo(f"{dgst}\t{size}")
    verb = "would free" if dry_run else "freed"
    click.echo(f"contentfs: {verb} {result.bytes_freed} bytes in {len(result.removed)} blobs",
               err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point. Accepts mount(8)'s form ``contentfs ROOT MOUNTPOINT -o OPTS`` too."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] not in cli.commands and not args[0].startswith("-"):
        args.insert(0, "mount")
    cli.main(args=args, prog_name="contentfs")


if __name__ == "__main__":
    main()
