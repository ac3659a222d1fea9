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
    "rss_mount", "rss_serve", "ls_first", "cli_verify", "fetch_registry",
    "fetch_registry_skopeo", "pull_proxy", "serve_rss_abandoned", "read_remote", "gc_many",
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


def _figure(name: str, unit: str, ours: float, ratio: float) -> dict[str, object]:
    return {"name": name, "title": name, "unit": unit, "ours": ours, "baseline": ours / ratio,
            "ratio": ratio, "target": 1.0, "op": ">=", "met": ratio >= 1, "note": "",
            "error": None}


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "bench.json"
    old = tmp_path / "old.json"  # an earlier run that knew only two of the figures
    old.write_text(json.dumps({"date": "then", "figures": [
        _figure("read_warm", "MB/s", 1.0, 1e-6), _figure("gone_figure", "s", 1.0, 1.0)]}))
    p = subprocess.run(
        [str(BENCH), "--quick", "--json", str(out), "--tmpdir", str(work), "--compare",
         str(old)],
        capture_output=True, text=True, env=_env(), timeout=300,
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
    table, _, compared = p.stdout.partition(f"compared with {old}")
    for name in FIGURES:
        assert name in table
    # --compare: every figure of this run, read_warm against the old run (far better
    # than a ratio of 1e-6), the others new, the figure that is gone named
    rows = {ln.split()[0]: ln.split() for ln in compared.splitlines()[3:] if ln.strip()}
    assert set(rows) >= FIGURES
    assert rows["read_warm"][-1] == "better" and rows["read_warm"][-2].startswith("+")
    assert rows["ls_first"][-1] == "new"
    assert "not in this run: gone_figure" in compared
    _assert_clean(work)


def _show(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BENCH), *args], capture_output=True, text=True, env=_env(),
                          timeout=120)


def test_compare_saved_runs(tmp_path: Path) -> None:
    """--show RUN.json --compare OLD.json measures nothing and prints the change of each
    figure in percent, marked by the figure's direction (time: lower is better)."""
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps({"date": "now", "figures": [
        _figure("read_first", "MB/s", 300.0, 0.3), _figure("ls_many", "s", 2.0, 2.0),
        _figure("ctr_get", "MB/s", 105.0, 1.05)]}))
    old.write_text(json.dumps({"date": "then", "figures": [
        _figure("read_first", "MB/s", 200.0, 0.2), _figure("ls_many", "s", 1.0, 1.0),
        _figure("ctr_get", "MB/s", 100.0, 1.0)]}))
    p = _show("--show", str(new), "--compare", str(old))
    assert p.returncode == 0, p.stderr
    rows = {ln.split()[0]: ln.split() for ln in p.stdout.split("compared with")[1]
            .splitlines()[3:]}
    # ours then, ours now, change, ratio then, ratio now, change, verdict
    assert rows["read_first"][1:] == ["200", "MB/s", "300", "MB/s", "+50%", "0.20", "0.30",
                                      "+50%", "better"]
    assert rows["ls_many"][1:] == ["1.000", "s", "2.000", "s", "+100%", "1.00", "2.00",
                                   "+100%", "WORSE"]
    assert rows["ctr_get"][1:] == ["100", "MB/s", "105", "MB/s", "+5%", "1.00", "1.05", "+5%"]
    # a missing or broken file is a clear error, not a traceback
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    for args in (["--show", str(new), "--compare", str(tmp_path / "nope.json")],
                 ["--show", str(bad)]):
        p = _show(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr and p.stderr.strip(), args


def test_plot_writes_png_or_says_what_to_install(tmp_path: Path) -> None:
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"date": "now", "figures": [
        _figure("read_first", "MB/s", 300.0, 0.3), _figure("ls_many", "s", 2.0, 2.0)]}))
    p = _show("--show", str(run), "--plot")
    has_mpl = subprocess.run([sys.executable, "-c", "import matplotlib"]).returncode == 0
    if has_mpl:
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert p.returncode == 2
        assert "needs matplotlib" in p.stderr and "pip" in p.stderr
        assert not (tmp_path / "run.png").exists()


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
