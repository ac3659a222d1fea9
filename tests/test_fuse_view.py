"""The pure parts of the view (names, inode numbers, cursors), plus large listings through
a real mount."""

from __future__ import annotations

import array
import hashlib
import os

from hypothesis import given
from hypothesis import strategies as st

from fusefs import view
from fusefs.view import BlobListing, index_inos
from tests import fuse_util
from tests.fuse_util import Mount

mounter = fuse_util.mounter
mnt = fuse_util.mnt


@given(st.text(min_size=1))
def test_ref_names_round_trip(ref: str) -> None:
    name = view.encode_ref(ref)
    assert "/" not in name
    assert view.decode_name(name) == ref


def test_only_canonical_names_decode() -> None:
    assert view.decode_name("a%2Fb%25c") == "a/b%c"
    assert view.decode_name("50%") is None
    assert view.decode_name("a%2fb") is None  # one name per ref: uppercase only
    assert view.decode_name("a%41") is None
    assert view.decode_name("") is None


def test_blob_inodes_are_stable_and_tagged() -> None:
    digest = "sha256:" + hashlib.sha256(b"x").hexdigest()
    assert view.blob_ino(digest) == view.blob_ino(digest)
    assert view.blob_ino(digest) >> 62 == 1
    table = view.NodeTable()
    node = table.ingest("r")
    assert node.ino >> 62 == 2
    table.committed("r", digest)
    assert table.ingest("r").ino != node.ino  # a committed ingest's number is not reused


def test_hex_cursor_follows_name_order() -> None:
    names = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000))
    keys = [view.hex_key(n) for n in names]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) and min(keys) > 0


def _listing(names: list[str], indexed: bool = False) -> BlobListing:
    names = sorted(names)
    inos = array.array("Q", map(view.hex_ino, names))
    return BlobListing(None, 64, "".join(names).encode(), inos,
                       array.array("Q", map(view.hex_key, names)), None,
                       index_inos(inos) if indexed else array.array("I"))


def _hex(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_blob_rows_find_every_listed_inode_and_no_other() -> None:
    names = [_hex(i) for i in range(2000)]
    for indexed in (False, True):
        rows = view.BlobRows("sha256", _listing(names, indexed))
        for name in names:
            r = rows.find(view.hex_ino(name))
            assert r >= 0 and rows.digest(r) == f"sha256:{name}"
        assert all(rows.find(view.hex_ino(_hex(i))) == -1 for i in range(2000, 2200))


@given(st.sets(st.integers(0, 300)), st.sets(st.integers(0, 300)))
def test_blob_rows_keep_lookup_counts_across_a_relisting(before: set[int],
                                                         after: set[int]) -> None:
    """Blobs listed again keep their counts and attributes; a blob the kernel holds that
    is no longer listed gets a Node with its count; forget ends each."""
    table = view.NodeTable()
    table.install(view.BlobRows("sha256", _listing([_hex(i) for i in before])))
    for i in before:  # the kernel took i % 3 + 1 references (lookups, readdirplus)
        for _ in range(i % 3 + 1):
            table.remember(table.blob(f"sha256:{_hex(i)}"))
        rows = table.rows["sha256"]
        rows.put(rows.find(view.hex_ino(_hex(i))), view.Attr(view.hex_ino(_hex(i)), 0, size=i))
    assert all(ino >> 62 != 1 for ino in table.table)  # no Node per listed blob
    table.install(view.BlobRows("sha256", _listing([_hex(i) for i in after])))
    rows = table.rows["sha256"]
    for i in before:
        ino = view.hex_ino(_hex(i))
        node = table.get(ino)
        assert node is not None and node.lookups == i % 3 + 1 and node.key == f"sha256:{_hex(i)}"
        if i in after:
            r = rows.find(ino)
            assert rows.have[r] and rows.size[r] == i
        table.forget(ino, i % 3)
        assert ino in table
        table.forget(ino, 1)
        assert ino not in table and table.get(ino) is None
    for i in after - before:
        assert view.hex_ino(_hex(i)) not in table


def test_lookup_counted_when_a_relisting_drops_its_row_meanwhile() -> None:
    """A lookup takes the node of a listed blob (its row's count), awaits its
    attributes (a remote store), and meanwhile a relisting without the blob moves the
    count to a Node: the lookup's reference must still be counted, or the kernel's
    FORGET of it ends the node while the kernel holds the other."""
    x, y = _hex(1), _hex(2)
    table = view.NodeTable()
    table.install(view.BlobRows("sha256", _listing([x, y])))
    table.remember(table.blob(f"sha256:{x}"))  # the kernel holds x once
    node = table.blob(f"sha256:{x}")  # a second lookup starts ...
    table.install(view.BlobRows("sha256", _listing([y])))  # ... x deleted, relisted
    table.remember(node)  # ... and the lookup ends
    ino = view.hex_ino(x)
    table.forget(ino, 1)
    assert ino in table  # still held once
    table.forget(ino, 1)
    assert ino not in table


def test_large_directory_lists_completely(mnt: Mount) -> None:
    blob_dir = os.path.join(mnt.root, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    names = set()
    for i in range(3000):
        data = str(i).encode()
        name = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blob_dir, name), "wb") as f:
            f.write(data)
        names.add(name)
    listed = os.listdir(os.path.join(mnt.path, "blobs", "sha256"))
    assert len(listed) == len(names) and set(listed) == names
    # entries deleted during a listing are neither repeated nor cause others to be skipped
    with os.scandir(os.path.join(mnt.path, "blobs", "sha256")) as it:
        seen = []
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 10:
                for victim in sorted(names)[-5:]:
                    os.unlink(os.path.join(blob_dir, victim))
    assert len(seen) == len(set(seen))
    assert set(sorted(names)[:-5]) <= set(seen)
