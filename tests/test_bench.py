"""The benchmark harness in its seconds-long smoke mode, so that it cannot rot.

Only the shape of the report is checked here: speed is the harness's business, measured
side by side in one run, never asserted in a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.containers import LOCAL_BASE, OPERATOR_IMAGE, SIDECAR_IMAGE, images


def test_smoke_run_writes_every_table_and_target(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = output.read_text()
    headings = ("(a) Agent turn", "(b) Long history", "(c) Burst", "(d, e) The sidecar")
    later = (
        "(f) Advanced session",
        "(g) Redis: what waiting for a replica",
        "(h) The sidecar's",
        "(i) PostgreSQL: what a synchronous standby costs",
        "(j) Redis Cluster beside one Redis",
        "(k) Compaction on a 24-turn conversation",
    )
    for heading in (*headings, *later):
        assert heading in report
    for backend in ("sqlite", "redis", "postgres", "mariadb"):
        assert f"| {backend} (" in report
        assert f"{backend}: cold start ≤ 1.5 s" in report
        assert f"{backend}: sidecar ≤ " in report
    assert "| tasks | one Redis turns/s | cluster turns/s |" in report
    assert "| tasks | cluster, answered at once turns/s | cluster, after WAIT turns/s |" in report
    assert "| hop floor (bench/floor.py) |" in report
    for backend in ("sqlite", "redis", "postgres", "mariadb"):
        assert f"| {backend} | 73, " in report  # 24 turns: 4 items on even ones, 2 on odd
    assert "(hop floor " in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "ms" in line]
    assert rows
    assert f"| {backend} | branch from the middle turn |" in report
    assert report == run.stdout.strip() + "\n"


def test_compare_runs_a_revision_and_this_checkout_side_by_side() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.compare", "HEAD", "--smoke", "--backends", "sqlite"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| sqlite |")]
    figures = {row[1]: row[2:] for row in rows}
    assert set(figures) >= {"turns/s at 8 task(s)", "sidecar vCPU per 1,000 req/s"}
    for before, after, _ in (f for f in figures.values() if len(f) == 3):
        assert float(before) > 0
        assert float(after.rstrip(" |")) > 0


def assert_ratio(shown: str, top: str, bottom: str) -> None:
    """A ratio cell is `top / bottom` as measured, to two decimals: within what the two
    figures, themselves shown to two decimals, allow."""
    low = (float(top) - 0.005) / (float(bottom) + 0.005) - 0.005
    high = (float(top) + 0.005) / max(float(bottom) - 0.005, 1e-9) + 0.005
    assert low <= float(shown.removesuffix("×")) <= high, (shown, top, bottom)


def table_rows(module: str, *options: str, out: Path) -> list[list[str]]:
    """Runs a benchmark module with `--out`; the cells of every table row it wrote."""
    run = subprocess.run(
        [sys.executable, "-m", module, *options, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [line.split("|")[1:-1] for line in out.read_text().splitlines()]


def test_the_fleet_benchmark_runs_pods_on_every_route_and_loses_no_turn(tmp_path: Path) -> None:
    """Two pods per route for a few seconds: every turn answered, every figure there,
    and the sidecars' connections gone once the stores have been idle (behind PgBouncer
    only the pooler's own remain)."""
    rows = table_rows("bench.fleet", "--pods", "2", "--busy", "4", out=tmp_path / "fleet.md")
    figures = {row[0].strip(): [cell.strip() for cell in row] for row in rows if len(row) == 11}
    assert set(figures) >= {"redis", "postgres", "postgres-pgbouncer"}
    for route in ("redis", "postgres", "postgres-pgbouncer"):
        _, pods, turns, errors, *_, busy, idle = figures[route]
        assert (pods, errors) == ("2", "0"), figures[route]
        assert int(turns) >= 2, figures[route]
        assert int(busy) >= 1, figures[route]
        pooled = route == "postgres-pgbouncer"  # PgBouncer keeps its server connections
        assert int(idle) <= (int(busy) if pooled else 0), figures[route]


def test_the_container_benchmark_measures_the_injected_sidecar_and_the_images(
    tmp_path: Path,
) -> None:
    """One start each, two agents for a second: the images' sizes and the container's
    and the process's figures are all there, and the agents' turns were answered."""
    images()
    options = ["--starts", "1", "--agents", "2", "--busy", "1"]
    rows = table_rows("bench.containers", *options, out=tmp_path / "containers.md")
    sizes = {row[0].strip(" `"): row[1].strip() for row in rows if len(row) == 3}
    assert set(sizes) >= {LOCAL_BASE, SIDECAR_IMAGE, OPERATOR_IMAGE}
    sidecars = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows if len(row) == 6}
    assert set(sidecars) >= {"container, as injected", "process (venv)"}
    for name in ("container, as injected", "process (venv)"):
        start, idle, loaded, after, turns = sidecars[name]
        assert float(start.removesuffix(" s")) > 0
        assert 0 < float(idle.removesuffix(" MiB")) <= float(loaded.removesuffix(" MiB"))
        assert float(after.removesuffix(" MiB")) > 0
        assert int(turns) >= 2


def test_the_cost_benchmark_sets_each_backend_beside_the_floor(tmp_path: Path) -> None:
    """One short round: the floor and a sidecar per backend each took the paced load, and
    every ratio is computed from figures that are there."""
    options = ["--rounds", "1", "--seconds", "1", "--rate", "200"]
    rows = table_rows("bench.cost", *options, out=tmp_path / "cost.md")
    figures = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows if len(row) == 7}
    assert set(figures) >= {"hop floor (bench/floor.py)", "sqlite", "redis", "postgres"}
    floor_cpu = float(figures["hop floor (bench/floor.py)"][0])
    floor_rss = float(figures["hop floor (bench/floor.py)"][3])
    assert floor_cpu > 0
    assert floor_rss > 0
    for backend in ("sqlite", "redis", "postgres"):
        cpu, times, cpu_met, rss, extra, rss_met = figures[backend]
        ratio = float(times.removesuffix("×"))
        assert ratio == pytest.approx(float(cpu) / floor_cpu, abs=0.02)
        assert float(extra) == pytest.approx(float(rss) - floor_rss, abs=0.11)
        assert cpu_met == ("yes" if ratio <= 2 else "**no**")
        assert rss_met == ("yes" if float(extra) <= 5 else "**no**")


def test_the_listing_benchmark_fills_each_store_and_pages_through_it(tmp_path: Path) -> None:
    """Small stores, every backend: each listing answered a full page (a user's ten
    sessions), and each ratio is computed from the two figures beside it."""
    options = ["--sessions", "3000", "--small", "1000", "--repeat", "2"]
    rows = table_rows("bench.listing", *options, out=tmp_path / "listing.md")
    cells = [[cell.strip() for cell in row] for row in rows if len(row) == 6][2:]
    assert {row[0] for row in cells} == {"sqlite", "postgres", "redis", "mariadb"}
    assert len(cells) == 20
    for backend, listing, small, large, times, held in cells:
        assert float(small) > 0
        assert float(large) > 0
        assert_ratio(times, large, small)
        assert int(held) == (10 if listing.startswith("a user") else 100), (backend, listing)


def test_the_shredding_benchmark_times_each_store_beside_the_one_in_clear(tmp_path: Path) -> None:
    """Every backend in three modes, each ratio computed from the figures beside it."""
    rows = table_rows("bench.shredding", "--repeat", "5", "--sessions", "2", out=tmp_path / "s.md")
    cells = [[cell.strip() for cell in row] for row in rows if len(row) == 7][2:]
    assert [(row[0], row[1]) for row in cells] == [
        (backend, mode)
        for backend in ("sqlite", "postgres", "redis")
        for mode in ("clear", "store key", "subject keys")
    ]
    clear: dict[str, tuple[str, str]] = {}
    for backend, mode, append, append_ratio, read, read_ratio, sealed in cells:
        if mode == "clear":
            clear[backend] = (append, read)
        assert_ratio(append_ratio, append, clear[backend][0])
        assert_ratio(read_ratio, read, clear[backend][1])
        assert float(sealed.rstrip("×")) > 0


def test_the_tracing_benchmark_exports_every_span_it_measures(tmp_path: Path) -> None:
    """Tracing off sends nothing; on, every turn's four spans (two requests, each with
    its backend call) reach the collector; each ratio from the figures beside it."""
    rows = table_rows("bench.tracing", "--turns", "5", out=tmp_path / "tracing.md")
    cells = [[cell.strip() for cell in row] for row in rows if len(row) == 7][2:]
    assert [(row[0], row[1]) for row in cells] == [
        (backend, mode) for backend in ("sqlite", "postgres", "redis") for mode in ("off", "on")
    ]
    off: dict[str, tuple[str, str]] = {}
    for backend, mode, turn, turn_ratio, cpu, cpu_ratio, spans in cells:
        if mode == "off":
            off[backend] = (turn, cpu)
            assert int(spans) == 0
        else:
            assert int(spans) >= 4 * 5
        assert_ratio(turn_ratio, turn, off[backend][0])
        if cpu_ratio != "n/a":  # the sidecar took under a clock tick with tracing off
            assert_ratio(cpu_ratio, cpu, off[backend][1])
