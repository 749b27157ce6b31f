"""The soak run (`make soak`): the whole pipeline for minutes at fleet scale; is memory flat, is lag bounded?

    python -m bench.soak [--minutes 10] [--agent-nodes 32] [--producer-nodes 288] [--gpus 8]

Processes, each its own OS process as in production, all on this machine:

- the broker (tansu, `pipeline.embedded_broker`);
- `gpufleet agent --backend simulated`: the real node agent (OpenTelemetry meter, spool with
  fsync, sender) for `--agent-nodes` nodes in one process, at the real 1 s interval. Sharing these
  2 cores with everything else, one agent process keeps its 1 s cadence for about 32 8-GPU nodes
  (at 64 it skipped 100 of 240 intervals: the "skipped" count in the results says how it went), so
  the rest of the fleet comes from
- a fleet producer (this module, `--role producer`): `--producer-nodes` more simulated nodes whose
  reports (`agents.simulation.simulate_reports`, default faults on) are produced as agents produce
  them (keyed by node, acks=all), on the same 1 s wall-clock cadence;
- `gpufleet ingest` into its own chDB store, with the default batching (1 s / 50,000 rows).

Every `--every-s` seconds the RSS and CPU of every process and the consumer group's lag (messages
produced but not committed) are sampled. At the end the agent and the producer stop, the ingester
catches up and stops, and the store is read back: every sample once (count and unique identities
against what the agent and the producer report having sent), the ingest latency of every message
(`agent_reports.ingest_time - time`: interval end to stored, p50/p99/max overall and per sampling
window), dead letters and spool drops. Figures go to `bench/soak-results.json` and to a delimited
"## Soak" section of BENCHMARKS.md (replaced on each run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "soak-results.json"
BENCHMARKS = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- soak:begin (bench/soak.py writes this section) -->", "<!-- soak:end -->"
TOPIC = "gpufleet.soak"
GROUP = "gpufleet-soak"
DATABASE = "soak"
PARTITIONS = 8
MB = 1024 * 1024


# --- the fleet producer (a child process) ---------------------------------------------------------
def run_producer(bootstrap: str, topic: str, nodes: int, gpus: int, cluster: str) -> None:
    """Produce `nodes` simulated nodes' reports every second until SIGTERM; prints {"sent": n}."""
    from kafka import KafkaProducer

    from gpufleet import wire
    from gpufleet.agents.collectors.simulated import SimulatedFleet, default_faults, simulate_reports

    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    start = (time.time_ns() // 1_000_000 // 1000) * 1000
    fleet = SimulatedFleet(nodes=nodes, gpus_per_node=gpus, start_ms=start, cluster=cluster, seed=7,
                           faults=default_faults(start, nodes=nodes, gpus_per_node=gpus))
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, compression_type="lz4")
    sent = 0
    for report in simulate_reports(fleet, start, start + 365 * 86_400_000, 1000):
        wait_s = report.time_ms / 1000 - time.time()
        if wait_s > 0:
            time.sleep(wait_s)
        if stop[0]:
            break
        producer.send(topic, key=report.node.encode(), value=wire.encode(report))
        sent += 1
    producer.flush(60)
    producer.close()
    print(json.dumps({"sent": sent}), flush=True)


# --- the run --------------------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    """(seconds since start, RSS MB, CPU % of one core since the previous sample)."""
    _cpu: float = 0.0

    def sample(self, t: float, every_s: float) -> None:
        import psutil

        try:
            p = psutil.Process(self.popen.pid)
            procs = [p, *p.children(recursive=True)]
            rss = sum(q.memory_info().rss for q in procs) / MB
            cpu = sum(sum(q.cpu_times()[:2]) for q in procs)
        except psutil.Error:
            return
        self.samples.append((t, round(rss, 1), round(100 * (cpu - self._cpu) / every_s, 1)))
        self._cpu = cpu

    def summary(self, warmup_s: float) -> dict[str, Any]:
        rss = [s[1] for s in self.samples]
        steady = [(t, r) for t, r, _ in self.samples if t >= warmup_s] or [(t, r) for t, r, _ in self.samples]
        half = steady[len(steady) // 2:]
        return {
            "rss_mb_first": rss[0] if rss else None,
            "rss_mb_after_warmup": steady[0][1] if steady else None,
            "rss_mb_end": rss[-1] if rss else None,
            "rss_mb_max": max(rss) if rss else None,
            "rss_mb_per_min_second_half": round(_slope(half) * 60, 2) if len(half) >= 3 else None,
            "cpu_pct_mean": round(statistics.fmean(s[2] for s in self.samples[1:]), 1) if len(self.samples) > 1
            else None,
        }


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    ts = [t for t, _ in points]
    ys = [y for _, y in points]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else 0.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _spawn(name: str, argv: list[str], workdir: Path) -> Proc:
    log = workdir / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                                 start_new_session=True)
    return Proc(name, popen, log)


def _committed_and_ends(bootstrap: str) -> tuple[int, int]:
    """(committed offsets of the ingest group, end offsets) summed over the topic's partitions.

    tansu 0.6 answers ListOffsets(latest) one short per partition after batched produces, so the
    lag read from it can be up to PARTITIONS below the truth; the end-of-run counts use the store.
    """
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

    tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets({GROUP: tps})[GROUP]
        ends = consumer.end_offsets(tps)
    finally:
        admin.close()
        consumer.close()
    return sum(max(0, o.offset) for o in offsets.values()), sum(ends.values())


def _stop(proc: Proc, timeout_s: float = 120) -> int:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(30)
    return int(proc.popen.returncode)


def _query_store(dsn: str, start_ms: int, every_s: float, warmup_s: float) -> dict[str, Any]:
    """Read the stopped ingester's store back (this process owns no other chDB store)."""
    from gpufleet.pipeline.store.client import Target, connect

    c = connect(Target(dsn, DATABASE))
    db = DATABASE
    one = lambda sql: c.query(sql).result_rows[0]  # noqa: E731
    rows, unique = one(f"SELECT count(), uniqExact(cluster, node, boot_id, seq, gpu_index) FROM {db}.gpu_samples")
    messages, = one(f"SELECT count() FROM {db}.agent_reports FINAL")
    lat = "toUnixTimestamp64Milli(ingest_time) - toUnixTimestamp64Milli(time)"
    quantiles = f"quantileExact(0.5)({lat}), quantileExact(0.99)({lat}), max({lat})"
    p50, p99, mx = one(f"SELECT {quantiles} FROM {db}.agent_reports FINAL")
    w50, w99, wmx = one(f"SELECT {quantiles} FROM {db}.agent_reports FINAL "
                        f"WHERE toUnixTimestamp64Milli(time) >= {int(start_ms + warmup_s * 1000)}")
    series = c.query(
        f"SELECT intDiv(toUnixTimestamp64Milli(time) - {{s:Int64}}, {{w:Int64}}) AS k, quantileExact(0.5)({lat}), "
        f"quantileExact(0.99)({lat}), max({lat}), count() FROM {db}.agent_reports FINAL GROUP BY k ORDER BY k",
        parameters={"s": start_ms, "w": int(every_s * 1000)}).result_rows
    dead, = one(f"SELECT count() FROM {db}.dead_letters FINAL")
    dropped, = one(f"SELECT max(spool_dropped_total) FROM {db}.agent_reports FINAL")
    by_cluster = dict(c.query(f"SELECT cluster, count() FROM {db}.agent_reports FINAL GROUP BY cluster").result_rows)
    return {
        "gpu_rows": int(rows), "gpu_rows_unique": int(unique), "messages": int(messages),
        "messages_by_cluster": {k: int(v) for k, v in by_cluster.items()},
        "ingest_latency_ms": {"p50": float(p50), "p99": float(p99), "max": int(mx)},
        "ingest_latency_ms_after_warmup": {"p50": float(w50), "p99": float(w99), "max": int(wmx)},
        "ingest_latency_ms_by_window": [
            {"t_s": int(k * every_s), "p50": float(a), "p99": float(b), "max": int(m), "messages": int(n)}
            for k, a, b, m, n in series],
        "dead_letters": int(dead), "spool_dropped_total": int(dropped or 0),
    }


def _agent_delivered(log: Path) -> int:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if "gpufleet agent:" in line and "messages delivered" in line:
            return int(line.split("; ")[1].split(" messages")[0])
    raise RuntimeError(f"the agent did not report what it delivered; see {log}")


def _agent_skipped(log: Path) -> int:
    """Sample times the agent skipped because an interval took longer than the interval (its log says so)."""
    return sum(int(line.split("skipped ")[1].split(" sample")[0])
               for line in log.read_text(errors="replace").splitlines() if "interval took too long" in line)


def _producer_sent(log: Path) -> int:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith('{"sent"'):
            return int(json.loads(line)["sent"])
    raise RuntimeError(f"the producer did not report what it sent; see {log}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from gpufleet.config import KafkaConfig
    from gpufleet.embedded.broker import EmbeddedBroker
    from gpufleet.kafka import ensure_topics

    warmup = min(60.0, args.minutes * 60 / 4)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpufleet-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    dsn = f"chdb://{workdir / 'store'}"
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    procs: list[Proc] = []
    try:
        ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap), [TOPIC, f"{TOPIC}.dlq"],
                      partitions=PARTITIONS, environ={})
        cfg = workdir / "gpufleet.yaml"
        cfg.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": broker.bootstrap, "topic": TOPIC, "dlq_topic": f"{TOPIC}.dlq",
                      "partitions": PARTITIONS},
            "clickhouse": {"dsn": dsn, "database": DATABASE},
            "agent": {"cluster": "agent", "spool_dir": str(workdir / "spool")},
            "ingest": {"group_id": GROUP},
        }))
        py = [sys.executable, "-m"]
        procs.append(Proc("broker", broker._proc, workdir / "broker.log"))  # type: ignore[arg-type]
        ingester = _spawn("ingester", [*py, "gpufleet", "ingest", "--config", str(cfg)], workdir)
        procs.append(ingester)
        start_ms = (time.time_ns() // 1_000_000 // 1000 + 1) * 1000
        agent = _spawn("agent", [*py, "gpufleet", "agent", "--config", str(cfg), "--backend", "simulated",
                                 "--nodes", str(args.agent_nodes), "--gpus", str(args.gpus)], workdir)
        procs.append(agent)
        producer = None
        if args.producer_nodes:
            producer = _spawn("producer", [*py, "bench.soak", "--role", "producer", "--bootstrap", broker.bootstrap,
                                           "--producer-nodes", str(args.producer_nodes), "--gpus", str(args.gpus)],
                              workdir)
            procs.append(producer)
        lag: list[tuple[float, int]] = []
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(max(0.0, min(args.every_s, end - time.monotonic())))
            t = round(time.monotonic() - t0, 1)
            for p in procs:
                p.sample(t, args.every_s)
            try:
                done, ends = _committed_and_ends(broker.bootstrap)
                lag.append((t, max(0, ends - done)))
            except Exception as exc:  # a slow answer is a data point, not the end of the run
                print(f"soak: lag not read at {t} s: {exc}", file=sys.stderr)
            for p in procs:
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited early ({p.popen.returncode}); see {p.log}")
            print(f"soak {t:6.0f} s: " + ", ".join(f"{p.name} {p.samples[-1][1]:.0f} MB" for p in procs if p.samples)
                  + (f", lag {lag[-1][1]} messages" if lag else ""), file=sys.stderr, flush=True)
        stopped = {"agent": _stop(agent)}
        if producer is not None:
            stopped["producer"] = _stop(producer)
        delivered = _agent_delivered(agent.log)
        sent = _producer_sent(producer.log) if producer is not None else 0
        stopped_at = time.monotonic()
        while time.monotonic() < stopped_at + 600:
            done, _ = _committed_and_ends(broker.bootstrap)
            if done >= delivered + sent:
                break
            time.sleep(1)
        catch_up_s = round(time.monotonic() - stopped_at, 1)
        stopped["ingester"] = _stop(ingester)
        store = _query_store(dsn, start_ms, args.every_s, warmup)
    finally:
        for p in procs:
            if p.name != "broker" and p.popen.poll() is None:
                p.popen.kill()
        broker.stop()
    lag_values = [v for t, v in lag if t >= warmup]
    return {
        "run": {"minutes": args.minutes, "agent_nodes": args.agent_nodes, "producer_nodes": args.producer_nodes,
                "gpus_per_node": args.gpus, "gpus": (args.agent_nodes + args.producer_nodes) * args.gpus,
                "interval_s": 1.0, "every_s": args.every_s, "warmup_s": warmup, "workdir": str(workdir),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                "exit_codes": stopped, "catch_up_after_stop_s": catch_up_s},
        "processes": {p.name: p.summary(warmup) for p in procs},
        "rss_mb_series": {p.name: [[t, r] for t, r, _ in p.samples] for p in procs},
        "kafka_lag_messages": {"p50": _pct(lag_values, 50), "p99": _pct(lag_values, 99),
                               "max": max(lag_values) if lag_values else None, "series": [list(x) for x in lag]},
        "sent": {"agent_messages": delivered, "agent_intervals_skipped": _agent_skipped(agent.log),
                 "producer_messages": sent,
                 "gpu_samples": (delivered + sent) * args.gpus},
        "store": store,
        "exact": store["gpu_rows"] == store["gpu_rows_unique"] == (delivered + sent) * args.gpus,
    }


def _pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def markdown(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section for one soak result."""
    run, store, sent = r["run"], r["store"], r["sent"]
    lines = [
        BEGIN, "## Soak", "",
        f"`make soak` (bench/soak.py): {run['minutes']:g} min, {run['gpus']} GPUs at 1 s "
        f"({run['agent_nodes']} nodes x {run['gpus_per_node']} in one `gpufleet agent` process, "
        f"{run['producer_nodes']} x {run['gpus_per_node']} from the fleet producer), broker -> `gpufleet ingest` "
        f"-> chDB, on {run['machine']}. Sampled every {run['every_s']:g} s; warm-up {run['warmup_s']:g} s.", "",
        "| process | RSS first | after warm-up | end | max | MB/min (2nd half) | CPU % of a core |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in r["processes"].items():
        lines.append(f"| {name} | {s['rss_mb_first']} | {s['rss_mb_after_warmup']} | {s['rss_mb_end']} | "
                     f"{s['rss_mb_max']} | {s['rss_mb_per_min_second_half']} | {s['cpu_pct_mean']} |")
    lat, warm, lag = store["ingest_latency_ms"], store["ingest_latency_ms_after_warmup"], r["kafka_lag_messages"]
    lines += [
        "",
        f"- Ingest latency (interval end -> row stored, every message after warm-up): p50 {warm['p50']:.0f} ms, "
        f"p99 {warm['p99']:.0f} ms, max {warm['max']} ms (whole run, with start-up: p50 {lat['p50']:.0f}, "
        f"p99 {lat['p99']:.0f}, max {lat['max']} ms).",
        f"- Consumer lag sampled every {run['every_s']:g} s after warm-up: p50 {lag['p50']}, p99 {lag['p99']}, "
        f"max {lag['max']} messages (about {run['gpus'] // run['gpus_per_node']} messages arrive per second).",
        f"- The agent process skipped {sent['agent_intervals_skipped']} of its sample times (an interval that "
        "took longer than 1 s); the ingester caught up "
        f"{run['catch_up_after_stop_s']} s after the senders stopped.",
        f"- Samples: {sent['gpu_samples']} sent, {store['gpu_rows']} stored, {store['gpu_rows_unique']} unique "
        f"({'exact' if r['exact'] else 'MISMATCH'}); {store['dead_letters']} dead letters, "
        f"{store['spool_dropped_total']} spool drops.",
        "- The broker is tansu with its in-memory storage engine: it keeps every message in RAM, so its RSS "
        "grows with the data by design (production Kafka keeps them on disk).",
        "", "Figures: bench/soak-results.json (with the RSS and lag series).", END,
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = BENCHMARKS) -> None:
    """Replace the soak section of BENCHMARKS.md (between its markers), or append it."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + text
    path.write_text(new)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--agent-nodes", type=int, default=32)
    ap.add_argument("--producer-nodes", type=int, default=288)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--every-s", type=float, default=10.0)
    ap.add_argument("--workdir", help="keep the run's store and logs here (default: a new temp dir)")
    ap.add_argument("--no-benchmarks", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--role", choices=["run", "producer"], default="run", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "producer":
        run_producer(args.bootstrap, TOPIC, args.producer_nodes, args.gpus, cluster="fleet")
        return
    result = run(args)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_benchmarks:
        write_section(markdown(result))
    print(markdown(result))
    if not result["exact"]:
        raise SystemExit("soak: stored samples do not match what was sent; see bench/soak-results.json")


if __name__ == "__main__":
    main()
