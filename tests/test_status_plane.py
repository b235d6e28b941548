"""The status plane without a broker (issue 20, R6, R9, R11): a worker's status record is cut to its
size bound by recency and says what it left out (`StatusReporter.snapshot`); a reader believes no time from the
future and no interval past the cap (`fleet_view.is_live`); every text a record carries is escaped for the
terminal; and the text view of 10,000 adapter names renders in well under 3 s."""

import contextlib
import time
from types import SimpleNamespace

import msgspec
import pytest

from lorabus.schemas import (AdapterActivate, AdapterPublish, RouteSet, RouteTarget, WorkerStatus, decode_status, encode)
from lorabus.worker.cli import fleet_view
from lorabus.worker.control_log import ControlLog
from lorabus.worker.cli.fleet_view import MAX_CLOCK_SKEW_MS, MAX_INTERVAL_MS, render_status, terminal_text
from lorabus.worker.registry import AdapterHealth, AdapterRegistry, Load
from lorabus.worker.status import StatusReporter
from cli_fakes import NOW, fake_status

LONG = "n" * 120  # adapter names near the schema's 128-character limit, as in the run


def _wide_routes_fleet(routes: int = 100, targets: int = 64) -> tuple[ControlLog, AdapterHealth]:
    """The issue's R6 case: `targets` long-named versions published, then `routes` route.set of all of
    them; every version failed here (a long reason)."""
    log, health, offset = ControlLog(), AdapterHealth(), 0
    names = [f"{LONG}{i:03d}" for i in range(targets)]
    for name in names:
        log.apply(offset, AdapterPublish(name, "v1", f"/adapters/{name}"))
        health.set(f"{name}@v1", Load.FAILED, f"{name}@v1: no such directory /adapters/{name}")
        offset += 1
    for r in range(routes):
        log.apply(offset, RouteSet(task=f"task{r:03d}", event_id=f"e-{r}",
                                   targets=[RouteTarget(adapter=f"{n}@v1", weight=1) for n in names]))
        offset += 1
    return log, health


@contextlib.asynccontextmanager
async def _reporter(log: ControlLog, health: AdapterHealth, max_bytes: int, registry=None):
    """A status reporter of a worker holding `log` and `health` (never started: no broker needed)."""
    engine = SimpleNamespace(resident=lambda: [], host_cached=lambda: 0,
                             plans=lambda limit: [dict(group="qkv", shape="t32.s16.l8.p32.r16", plan="token")])
    worker = SimpleNamespace(control_log=log, registry=registry or AdapterRegistry(log, health), adapter_health=health,
                             engine=engine, worker_id="w1", control_offset=log.end_offset, inflight={},
                             config=SimpleNamespace(status_max_bytes=max_bytes))
    reporter = StatusReporter(worker, "localhost:9", "status", 2000)
    try:
        yield reporter
    finally:
        await reporter.producer.stop()


async def test_a_small_status_is_sent_whole():
    log, health = _wide_routes_fleet(routes=2, targets=4)
    async with _reporter(log, health, 64 * 1024) as reporter:
        status = reporter.snapshot()
    assert not status.truncated and len(status.routes) == 2 and len(status.serving) == 4
    assert [v.state for v in status.versions] == ["failed"] * 4
    assert decode_status(encode(status)).plans == {"qkv t32.s16.l8.p32.r16": "token"}  # the engine's LoRA plans


@pytest.mark.parametrize("max_bytes", [16 * 1024, 64 * 1024, 256 * 1024])
async def test_a_large_status_keeps_the_newest_entries_under_the_bound_and_counts_the_rest(max_bytes):
    log, health = _wide_routes_fleet()
    async with _reporter(log, health, 10**9) as whole:
        assert len(encode(whole.snapshot())) > 1_000_000  # the record: 1.5 MB, refused by the broker
    async with _reporter(log, health, max_bytes) as reporter:
        body = encode(reporter.snapshot())
    assert len(body) <= max_bytes
    again = decode_status(body)  # what a reader gets: valid, marked, with the counts
    assert again.truncated and again.routes_omitted > 0
    assert len(again.routes) + again.routes_omitted == 100
    assert len(again.versions) + again.versions_omitted == 64
    assert len(again.serving) + again.names_omitted == 64
    # By recency: the routes kept are the newest set (the highest task numbers), in their order.
    tasks = [r.task for r in again.routes]
    assert tasks == [f"task{i:03d}" for i in range(100 - len(tasks), 100)]
    if max_bytes >= 64 * 1024:  # the failed versions the newest route names count as recent as it: kept
        assert again.versions_omitted == 0 and all(v.state == "failed" for v in again.versions)
    print(f"{max_bytes} bytes: {len(body)} sent, {len(again.routes)} routes kept, {again.routes_omitted} left out")


async def test_versions_and_names_are_cut_by_their_newest_control_record():
    log, health = ControlLog(), AdapterHealth()
    names = [f"{LONG[:100]}{i:04d}" for i in range(2000)]
    for i, name in enumerate(names):
        log.apply(i, AdapterPublish(name, "v1", "/a"))
        health.set(f"{name}@v1", Load.READY)
    log.apply(2000, AdapterActivate(names[0], "v1"))  # the oldest name, activated last: newest
    async with _reporter(log, health, 32 * 1024) as reporter:
        cut = reporter.snapshot()
    assert len(encode(cut)) <= 32 * 1024 and cut.truncated
    assert names[0] in cut.serving and cut.activated == {names[0]: "v1"}
    assert f"{names[0]}@v1" in {v.adapter for v in cut.versions}
    assert names[-1] in cut.serving and names[1] not in cut.serving  # the newest publishes stay, not the oldest
    assert cut.names_omitted == 2000 - len(cut.serving) and cut.versions_omitted == 2000 - len(cut.versions)


async def test_names_that_encode_larger_than_their_length_are_still_cut_under_the_bound():
    """Entries are sized by their texts' lengths, exact for plain ASCII; non-ASCII text and JSON escapes
    (2 to 6 bytes a character) make the record larger than that, and the cut is then searched by encoding."""
    log, health = ControlLog(), AdapterHealth()
    names = [f"{'é' * 40}\u0001\"{i:04d}" for i in range(2000)]  # 2 bytes each, a 6-byte escape, a 2-byte one
    for i, name in enumerate(names):
        log.apply(i, AdapterPublish(name, "v1", "/a"))
        health.set(f"{name}@v1", Load.FAILED, "é\u0002" * 20)
    async with _reporter(log, health, 32 * 1024) as reporter:
        cut = reporter.snapshot()
    assert len(encode(cut)) <= 32 * 1024 and cut.truncated and cut.serving
    assert names[-1] in cut.serving and names[0] not in cut.serving
    assert cut.names_omitted == 2000 - len(cut.serving) and cut.versions_omitted == 2000 - len(cut.versions)


class _CountingRegistry(AdapterRegistry):
    """The worker's registry, counting the names it is asked to resolve for a status record."""

    served = 0

    def serving(self, name):
        self.served += 1
        return super().serving(name)


async def test_a_snapshot_builds_only_the_entries_that_fit_newest_first():
    """R1 at 50,000 names: a snapshot ran after every finished warm-up and built, sized and sorted every
    name's entries (0.5-1 s of event loop each), so /readyz never said ready. It now builds entries newest
    first only while they fit: a cut record resolves about as many names as it holds, not all of them."""
    log, health = ControlLog(), AdapterHealth()
    registry = _CountingRegistry(log, health)
    names = [f"{LONG[:100]}{i:05d}" for i in range(20_000)]
    log.apply(0, AdapterPublish(names[0], "v1", "/a"))  # read before the reporter starts: counted too
    async with _reporter(log, health, 32 * 1024, registry) as reporter:
        for i, name in enumerate(names[1:], start=1):
            log.apply(i, AdapterPublish(name, "v1", "/a"))
            health.set(f"{name}@v1", Load.READY)
        log.apply(len(names), AdapterActivate(names[0], "v1"))  # the oldest name, activated last: newest
        cut = reporter.snapshot()
    assert len(encode(cut)) <= 32 * 1024 and cut.truncated
    assert cut.activated == {names[0]: "v1"} and names[-1] in cut.serving and names[1] not in cut.serving
    assert cut.names_omitted == len(names) - len(cut.serving)
    assert cut.versions_omitted == len(names) - 1 - len(cut.versions)  # names[0]@v1 never loaded here
    assert registry.served <= len(cut.serving) + 1, registry.served  # the one that did not fit: asked, left out


# ---- liveness: the record's time, clamped; the interval, capped ----------------------------------------

def test_a_status_from_the_future_is_not_live_and_a_little_skew_is_clamped():
    assert fleet_view.is_live(fake_status("w", 0, ts_ms=NOW + MAX_CLOCK_SKEW_MS), NOW)  # skew: counts as now
    assert fleet_view.status_age_ms(fake_status("w", 0, ts_ms=NOW + 5000), NOW) == 0
    assert not fleet_view.is_live(fake_status("w", 0, ts_ms=NOW + MAX_CLOCK_SKEW_MS + 1), NOW)
    assert not fleet_view.is_live(fake_status("w", 0, ts_ms=2**53), NOW)  # the forged record
    assert not fleet_view.is_live(fake_status("w", 0, ts_ms=2**53), 2**53 + 3 * MAX_INTERVAL_MS + 1)


def test_an_interval_counts_for_at_most_the_cap():
    forged = fake_status("w", 0, ts_ms=NOW - 3 * MAX_INTERVAL_MS - 1, interval_ms=2**62)
    assert not fleet_view.is_live(forged, NOW)
    assert fleet_view.is_live(fake_status("w", 0, ts_ms=NOW - 3 * MAX_INTERVAL_MS, interval_ms=2**62), NOW)


def test_the_view_says_why_a_worker_is_not_live_and_what_was_cut():
    log = ControlLog()
    log.apply(0, AdapterPublish("fin", "v1", "/a"))
    statuses = {"w1": fake_status("w1", 1, ts_ms=NOW + 3_600_000, serving={"fin": "v1"}),
                "w2": fake_status("w2", 1, truncated=True, routes_omitted=40, versions_omitted=1, names_omitted=2)}
    lines = render_status(log, statuses, NOW).splitlines()
    assert "workers: 2 reporting, 1 live" in lines
    assert any(line.split()[:2] == ["w1", "not"] and "status time 3600 s in the future" in line for line in lines)
    assert any(line.startswith("  w2 ") and "live (truncated: 40 routes, 1 version, 2 names left out)" in line
               for line in lines), lines
    assert any(line.split()[:3] == ["w2", "serves", "(not"] and "reported)" in line for line in lines), lines
    assert not any(line.startswith("plans") for line in lines)  # workers without plans (older ones)
    statuses["w1"] = fake_status("w1", 1, plans={"qkv t32.s16.l8.p32.r16": "token", "o t2.s2.l1.p8.r16": "segment",
                                                 "attention b64.c64.l2.h4x2x16": "torch"})
    lines = render_status(log, statuses, NOW).splitlines()
    start = lines.index("plans (measured: LoRA per projection group and step shape class, attention per start-up "
                        "decode probe):")
    assert [line.split() for line in lines[start + 1:start + 5]] == [
        ["WORKER", "GROUP", "SHAPE", "PLAN"], ["w1", "attention", "b64.c64.l2.h4x2x16", "torch"],
        ["w1", "o", "t2.s2.l1.p8.r16", "segment"], ["w1", "qkv", "t32.s16.l8.p32.r16", "token"]]


# ---- escaping ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, shown", [
    ("w1", "w1"), ("w\u00e9-\u4e16", "w\u00e9-\u4e16"),  # printable text is left alone
    ("w1\nw9  live", "w1\\x0aw9  live"), ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
    ("a\x9bb", "a\\x9bb"), ("evil\u202etxt", "evil\\u202etxt"), ("a\u2028b\rc\x00", "a\\u2028b\\x0dc\\x00"),
])
def test_terminal_text_escapes_what_is_not_printable(raw, shown):
    assert terminal_text(raw) == shown


def test_forged_names_and_reasons_cannot_add_rows_or_escape_codes():
    forged = "w0\n  w9            live     99  0 (up to date)\x1b[2J"
    statuses = {forged: fake_status(forged, 0, serving={"fin": "v1\x1b]0;title\x07"},
                                    versions=[("fin@v1", "failed", "bad\nFAILED fin@v2 on w1: \x1b[31mforged")]),
                "w1": fake_status("w1", 0)}
    log = ControlLog()
    log.apply(0, AdapterPublish("fin", "v1", "/a"))
    text = render_status(log, statuses, NOW)
    assert all(ch == "\n" or ch.isprintable() for ch in text), repr(text)
    lines = text.splitlines()
    assert not any(line.lstrip().startswith(("w9", "FAILED fin@v2")) for line in lines), text
    assert sum(1 for line in lines if line.lstrip().startswith("FAILED")) == 1
    assert "w0\\x0a  w9" in text and "\\x1b[31mforged" in text


# ---- speed -------------------------------------------------------------------------------------------

def _big_fleet(names: int, workers: int) -> tuple[ControlLog, dict[str, WorkerStatus]]:
    log = ControlLog()
    refs = [f"adapter-{i:05d}" for i in range(names)]
    for i, name in enumerate(refs):
        log.apply(i, AdapterPublish(name, "v1", f"/a/{name}"))
    statuses = {}
    for w in range(workers):
        statuses[f"w{w}"] = fake_status(
            f"w{w}", names, serving={n: "v1" for n in refs}, activated={},
            versions=[(f"{n}@v1", "failed" if i % 100 == 0 else "ready", "no weights" if i % 100 == 0 else None)
                      for i, n in enumerate(refs)], resident=[f"{n}@v1" for n in refs[:8]])
    return log, statuses


def test_the_text_view_of_ten_thousand_names_is_fast():
    log, statuses = _big_fleet(10_000, 2)
    started = time.perf_counter()
    text = render_status(log, statuses, NOW)
    took = time.perf_counter() - started
    assert text.count("serves v1") == 20_000 and text.count("FAILED") == 100
    json_started = time.perf_counter()
    msgspec.json.encode(fleet_view.fleet_json(log, statuses, NOW))
    json_took = time.perf_counter() - json_started
    print(f"10,000 names, 2 workers: text {took:.2f} s, json {json_took:.2f} s")
    assert took < 3.0, f"render_status took {took:.1f} s"  # the quadratic view took ~28 s


# ---- settings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--status-interval-ms", "600000"], "--status-interval-ms 600000: use 1..60000"),
    (["--status-max-bytes", "2000000"], "--status-max-bytes 2000000: use 65536..1000000"),
    (["--status-max-bytes", "1000"], "--status-max-bytes 1000: use 65536..1000000"),
])
def test_a_worker_refuses_status_settings_readers_could_not_follow(flags, message):
    from lorabus.worker import cli
    from lorabus.worker.cli.flags import UsageError, _config_from
    from lorabus.worker.cli.serve import _check_status_config

    config = _config_from(cli.build_parser().parse_args(["worker", *flags]))
    with pytest.raises(UsageError) as refused:
        _check_status_config(config)
    assert str(refused.value).startswith(message)
    assert cli.build_parser().parse_args(["status", "--status-max-bytes", "70000"]).status_max_bytes == 70000
