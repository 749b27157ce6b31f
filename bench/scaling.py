"""Item 6 (the check): 1, 2 and 4 ingester processes in one consumer group against the model's prediction.

Each ingester is a process of its own (`python -m bench.scaling --child`) with its own chDB store:
chDB allows one process per store path, and in production each ingester writes to the ClickHouse
cluster, not to a store of its own, so what this measures is the ingest side scaling out through
Kafka's consumer group (partitions split between members) on this machine's cores. The topic has
8 partitions; every run is a new consumer group reading the same messages from the start.

The prediction (docs/scaling.md): P processes deliver min(P x r1, C / c) messages/s, where r1 is
one process's rate, c the CPU seconds one message costs (all of an ingester process's threads,
chDB's included, plus the broker's share), and C the cores there are (`os.cpu_count()`, shared
here with the broker). Each run reports the measured aggregate rate beside that prediction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any


def _child(bootstrap: str, topic: str, group: str, store: str, status_path: str, data_ms: str) -> None:
    import resource

    from bench.ingest import FirstPoll, bench_config, clock_from
    from gpufleet.pipeline.ingest.consumer import build_consumer, build_ingester
    from gpufleet.pipeline.store import Store
    from gpufleet.pipeline.store.client import Target, connect
    from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

    cfg = bench_config(bootstrap, topic, f"chdb://{store}", "scale", 8)
    import msgspec

    cfg = msgspec.structs.replace(cfg, ingest=msgspec.structs.replace(cfg.ingest, group_id=group))
    client = connect(Target(cfg.clickhouse.dsn, "scale"), create=True)
    migrate(client, SchemaOptions(database="scale"))
    consumer = FirstPoll(build_consumer(cfg))
    ing = build_ingester(cfg, Store(client, "scale"), consumer=consumer, clock=clock_from(int(data_ms)))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    th = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    th.start()

    cpu_at_first: list[float] = []

    def write() -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        cpu = r.ru_utime + r.ru_stime
        if consumer.first is not None and not cpu_at_first:
            cpu_at_first.append(cpu)  # start-up (imports, migration, group join) is not ingest work
        tmp = status_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"messages": ing.stats.messages, "duplicates": ing.stats.duplicates,
                       "first_poll_wall": (time.time() - (time.perf_counter() - consumer.first))
                       if consumer.first else None,
                       "cpu_s": cpu - (cpu_at_first[0] if cpu_at_first else cpu)}, f)
        os.replace(tmp, status_path)

    while not stop.is_set():
        write()
        stop.wait(0.02)
    th.join(60)
    write()
    consumer.close()


def run_group(bootstrap: str, topic: str, processes: int, count: int, workdir: Path, data_ms: int,
              timeout_s: float = 300) -> dict[str, Any]:
    """Start `processes` ingesters in a new group; wait until they stored `count` messages together."""
    group = f"scale-{processes}-{uuid.uuid4().hex[:6]}"
    run_dir = Path(tempfile.mkdtemp(prefix=f"p{processes}-", dir=workdir))
    procs, status = [], []
    for i in range(processes):
        store = (run_dir / f"store{i}").resolve()
        path = run_dir / f"status{i}.json"
        status.append(path)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bench.scaling", "--child", bootstrap, topic, group, str(store), str(path),
             str(data_ms)],
            stdout=subprocess.DEVNULL, stderr=open(run_dir / f"child{i}.log", "wb"), start_new_session=True))  # noqa: SIM115

    def read() -> list[dict[str, Any]]:
        out = []
        for p in status:
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                out.append({})
        return out

    deadline = time.time() + timeout_s
    done_at = None
    at_done: list[dict[str, Any]] = []
    try:
        while time.time() < deadline:
            states = read()
            if sum(s.get("messages", 0) + s.get("duplicates", 0) for s in states) >= count:
                done_at = time.time()
                at_done = states
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"an ingester process exited early; see {run_dir}/child*.log")
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    states = read()
    if done_at is None:
        raise RuntimeError(f"{processes} ingesters stored {sum(s.get('messages', 0) for s in states)} of {count}")
    first = min(s["first_poll_wall"] for s in states if s.get("first_poll_wall"))
    seconds = done_at - first
    return {"processes": processes, "messages_per_s": count / seconds, "seconds": seconds,
            "messages_per_process": [s.get("messages", 0) for s in states],
            "cpu_s_per_process": [round(s.get("cpu_s", 0.0), 2) for s in at_done or states],
            "cpu_s_per_message": sum(s.get("cpu_s", 0.0) for s in at_done or states) / count}


def run(workdir: Path, messages: int = 40_000, process_counts: tuple[int, ...] = (1, 2, 4)) -> dict[str, Any]:
    import psutil

    from bench.common import fleet_messages
    from bench.ingest import bench_config, newest_ms, produce
    from gpufleet import kafka
    from gpufleet.embedded.broker import EmbeddedBroker

    workdir.mkdir(parents=True, exist_ok=True)
    msgs = fleet_messages(messages)
    per_msg = sum(m.gpus for m in msgs) / len(msgs)
    runs = []
    with EmbeddedBroker() as broker:
        topic = f"bench-scale-{uuid.uuid4().hex[:8]}"
        cfg = bench_config(broker.bootstrap, topic, "chdb://memory", "x", 8)
        kafka.ensure_topics(cfg.kafka)
        produce(cfg, msgs)
        broker_proc = psutil.Process(broker._proc.pid)  # type: ignore[union-attr]
        for n in process_counts:
            b0 = sum(broker_proc.cpu_times()[:2])
            r = run_group(broker.bootstrap, topic, n, len(msgs), workdir, newest_ms(msgs))
            r["broker_cpu_s_per_message"] = (sum(broker_proc.cpu_times()[:2]) - b0) / len(msgs)
            runs.append(r)
    cores = os.cpu_count() or 1
    one = runs[0]
    cost = one["cpu_s_per_message"] + one["broker_cpu_s_per_message"]
    for r in runs:
        r["predicted_messages_per_s"] = min(r["processes"] * one["messages_per_s"], cores / cost)
        r["measured_to_predicted"] = r["messages_per_s"] / r["predicted_messages_per_s"]
        r["gpu_samples_per_s"] = r["messages_per_s"] * per_msg
    return {"cores": cores, "messages": len(msgs), "partitions": 8,
            "cpu_s_per_message_one_process": one["cpu_s_per_message"],
            "broker_cpu_s_per_message": one["broker_cpu_s_per_message"], "runs": runs}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:8])
    else:
        print(json.dumps(run(Path("var/bench/scaling")), indent=2))
