"""Smoke test of scripts/bench: the harness runs end to end in --quick mode, reports every
figure with numbers, and leaves no mount, daemon or temporary directory behind (also when
interrupted). No timing is asserted: speed is what the full run reports, not a test."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench"

FIGURES = {
    "read_first", "read_warm", "ingest_mount", "small_writes", "ls_many", "find_many",
    "stat_hit", "stat_miss", "ctr_get", "ctr_ingest", "cli_ingest", "cli_get",
    "rss_mount", "rss_serve", "serve_rss_abandoned",
}


def _env() -> dict[str, str]:
    return {**os.environ, "CONTENTFS_VENV": str(Path(sys.executable).parent.parent)}


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as fh:
        return [ln.split()[1] for ln in fh if ln.split()[1].startswith(str(path))]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def _assert_clean(tmp: Path) -> None:
    assert _mounts_under(tmp) == []
    assert _processes_mentioning(str(tmp)) == []
    assert [p.name for p in tmp.iterdir() if p.name.startswith("contentfs-bench-")] == []


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [str(BENCH), "--quick", "--json", str(out), "--tmpdir", str(work)],
        capture_output=True, text=True, env=_env(), timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(out.read_text())
    figures = {f["name"]: f for f in doc["figures"]}
    assert set(figures) == FIGURES
    for name, f in figures.items():
        assert f["error"] is None, (name, f["error"])
        for key in ("ours", "baseline", "ratio", "target"):
            value = f[key]
            assert isinstance(value, int | float) and math.isfinite(value), (name, key, value)
            assert value > 0, (name, key, value)
        assert isinstance(f["met"], bool), name
        assert f["unit"] in ("MB/s", "s", "MB"), name
    # the table names every figure too
    for name in FIGURES:
        assert name in p.stdout
    _assert_clean(work)


def test_interrupt_stops_everything(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(
        [str(BENCH), "--quick", "--json", str(tmp_path / "x.json"), "--tmpdir", str(work),
         "--only", "read_first,ctr_get"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(),
    )
    assert proc.stderr is not None
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "starting contentfs serve" in line:
                break  # containerd and the mount are up, serve is starting
        else:
            raise AssertionError("bench ended before starting its daemons: " + "".join(seen))
        assert _mounts_under(work), "the mount should be up by now"
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) != 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_clean(work)
