"""`make gpu-smoke`: a few minutes on a GPU node that say whether the NVML agent works there, as one JSON.

    python -m bench.gpu_smoke                      # on a GPU node: 180 s, report in var/gpu-smoke.json
    python -m bench.gpu_smoke --duration 60 --out /tmp/smoke.json
    python -m bench.gpu_smoke --fake --duration 3  # against the pynvml fake (tests/test_gpu_smoke.py)

Self-contained (the agent's own dependencies only, no broker, no ClickHouse) and under five minutes,
so it can run on a borrowed GPU machine in one go. Started as root it runs itself again as an
unprivileged user (`gpufleet`, else `nobody`), as the agent's service runs, and says so; if that
fails it runs as root and says that. The report:

* `inventory`: driver, GPUs (name, UUID, PCI, architecture, MIG mode, GPM support);
* `fields`: per GPU, which field ids the collector asks answer (NotSupported and the like by name);
* `latency_ms`: p50/p99/max of each NVML call the collector makes, per call;
* `run`: the real `NvmlCollector` at the agent's interval: NVML calls per interval and per GPU,
  errors, deadline misses, the agent's CPU and wall time per interval (process CPU, all threads);
* `energy`: per GPU, the energy deltas the agent sent against the integral of its power readings;
* `utilization`: the interval averages the agent sent against NVML's point reading, and the range
  of raw `nvmlDeviceGetSamples` values (percent expected);
* `events`: XID registration per GPU, and whether the handles in delivered events (PState and
  clock events are frequent) match the GPUs by handle or by UUID; `kmsg`: the kernel log's status.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import pwd
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT: Final = ROOT / "var" / "gpu-smoke.json"
DEFAULT_DURATION_S: Final = 180.0
LATENCY_REPEATS: Final = 20
SERVICE_USERS: Final = ("gpufleet", "nobody")
FAKE_GPUS: Final = 8


# -- NVML: the real binding or the fake --------------------------------------------------------


def open_nvml(fake: bool) -> tuple[Any, Any]:
    """(nvml module, the fake or None). The real binding comes from the collector (the one importer)."""
    if not fake:
        from gpufleet.agents.collectors.nvml import NVML

        return NVML, None
    sys.path.insert(0, str(ROOT))
    from tests.fakes.fake_pynvml import FakeNvml, h100

    gpus = [h100(f"GPU-smoke-{i:04d}", pci=(0, 0x18 + 0x10 * i, 0), power_mw=100_000, util_gpu_pct=0,
                 gpm_metrics={2: 10.0, 5: 5.0, 10: 3.0}) for i in range(FAKE_GPUS)]
    fake_nvml = FakeNvml(gpus, real_time=True)
    return fake_nvml, fake_nvml


def _timed(fn: Callable[[], Any]) -> tuple[float, str | None]:
    start = time.perf_counter()
    try:
        fn()
        return (time.perf_counter() - start) * 1000, None
    except Exception as exc:  # an NVML error is a finding, not a failure of the smoke check
        return (time.perf_counter() - start) * 1000, f"{type(exc).__name__}: {exc}"


def _summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 4), "p99": round(p99, 4), "max": round(ordered[-1], 4),
            "n": len(ordered)}


# -- inventory and field support ---------------------------------------------------------------


def inventory(nvml: Any) -> dict[str, Any]:
    version = nvml.nvmlSystemGetDriverVersion()
    gpus = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        pci = nvml.nvmlDeviceGetPciInfo(h)
        entry: dict[str, Any] = {"index": i, "uuid": nvml.nvmlDeviceGetUUID(h), "name": nvml.nvmlDeviceGetName(h),
                                 "pci": [int(pci.domain), int(pci.bus), int(pci.device)]}
        for key, call in (("architecture", lambda h=h: nvml.nvmlDeviceGetArchitecture(h)),
                          ("mig_mode", lambda h=h: list(nvml.nvmlDeviceGetMigMode(h))),
                          ("gpm_supported", lambda h=h: bool(nvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice))):
            try:
                entry[key] = call()
            except nvml.NVMLError as exc:
                entry[key] = f"error: {exc}"
        gpus.append(entry)
    return {"driver_version": version.decode() if isinstance(version, bytes) else version, "gpus": gpus}


def field_catalogue(nvml: Any) -> dict[str, int]:
    """Every field id the collector asks for, plus the renumbered per-cause throttle ids (for the record)."""
    from gpufleet.agents.collectors.nvml_fields import FieldIds

    ids = FieldIds.of(nvml)
    names = {"energy": ids.energy, "power_average": ids.power, "memory_temp": ids.mem_temp,
             "throttle_power": ids.throttle_power, "throttle_thermal": ids.throttle_thermal,
             "nvlink_link_count": ids.link_count, "nvlink_state": ids.link_state,
             "ecc_sbe_vol": ids.ecc[0], "ecc_dbe_vol": ids.ecc[1], "ecc_sbe_agg": ids.ecc[2], "ecc_dbe_agg": ids.ecc[3],
             "remapped_cor": ids.remapped[0], "remapped_unc": ids.remapped[1], "remapped_pending": ids.remapped[2],
             "remapped_failure": ids.remapped[3], "retired_sbe": ids.retired[0], "retired_dbe": ids.retired[1],
             "retired_pending": ids.retired[2], "pcie_replay": ids.pcie_replay, "nvlink_dl_replay": ids.dl[0],
             "nvlink_dl_recovery": ids.dl[1], "nvlink_dl_crc": ids.dl[2], "nvlink5_symbol_errors": ids.nvlink5[0],
             "nvlink5_effective_errors": ids.nvlink5[1], "nvlink5_link_recovery": ids.nvlink5[2]}
    for extra in ("NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN",
                  "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN",
                  "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN"):
        if hasattr(nvml, extra):
            names[extra.removeprefix("NVML_FI_DEV_").lower() + "_unused"] = getattr(nvml, extra)
    return names


def field_support(nvml: Any, handle: Any, links: int) -> dict[str, str]:
    """Each catalogued field asked on its own (per-link fields on link 0): "ok <value>" or the error's name."""
    per_link = {"nvlink_state", "nvlink_dl_replay", "nvlink_dl_recovery", "nvlink_dl_crc", "nvlink5_symbol_errors",
                "nvlink5_effective_errors", "nvlink5_link_recovery"}
    out = {}
    for name, fid in field_catalogue(nvml).items():
        if name in per_link and links == 0:
            out[name] = "no NVLink"
            continue
        try:
            (value,) = nvml.nvmlDeviceGetFieldValues(handle, [(fid, 0)])
        except nvml.NVMLError as exc:
            out[name] = f"call failed: {exc}"
            continue
        if value.nvmlReturn != nvml.NVML_SUCCESS:
            out[name] = str(nvml.NVMLError(value.nvmlReturn))
            continue
        member = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")[value.valueType]
        out[name] = f"ok {getattr(value.value, member)}"
    return out


# -- per-call latency --------------------------------------------------------------------------


def latency(nvml: Any, handles: Sequence[Any]) -> dict[str, Any]:
    """Each call the collector makes, LATENCY_REPEATS times per GPU."""
    from gpufleet.agents.collectors.nvml_fields import FieldIds

    ids = FieldIds.of(nvml)
    calls: dict[str, Callable[[Any], Any]] = {
        "nvmlDeviceGetFieldValues(fast batch)": lambda h: nvml.nvmlDeviceGetFieldValues(h, ids.fast(range(18))),
        "nvmlDeviceGetFieldValues(slow batch)": lambda h: nvml.nvmlDeviceGetFieldValues(h, ids.slow(range(18))),
        "nvmlDeviceGetSamples": lambda h: nvml.nvmlDeviceGetSamples(h, nvml.NVML_GPU_UTILIZATION_SAMPLES, 0),
        "nvmlDeviceGetMemoryInfo": lambda h: nvml.nvmlDeviceGetMemoryInfo(h, nvml.nvmlMemory_v2),
        "nvmlDeviceGetTemperatureV": lambda h: nvml.nvmlDeviceGetTemperatureV(h, nvml.NVML_TEMPERATURE_GPU),
        "nvmlDeviceGetClockInfo": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
        "nvmlDeviceGetCurrentClocksEventReasons": nvml.nvmlDeviceGetCurrentClocksEventReasons,
        "nvmlDeviceGetComputeRunningProcesses": nvml.nvmlDeviceGetComputeRunningProcesses,
        "nvmlDeviceGetMigMode": nvml.nvmlDeviceGetMigMode,
        "nvmlDeviceGetUtilizationRates": nvml.nvmlDeviceGetUtilizationRates,
    }
    out: dict[str, Any] = {}
    for name, call in calls.items():
        times, errors = [], Counter[str]()
        for h in handles:
            for _ in range(LATENCY_REPEATS):
                ms, error = _timed(lambda h=h, call=call: call(h))
                times.append(ms)
                if error:
                    errors[error] += 1
        out[name] = {**_summary(times), "errors": dict(errors)}
    return out


# -- events: registration and handle matching ---------------------------------------------------


class EventProbe:
    """One set per GPU for XID, PState and clock events; a thread waits on them in turn and checks
    that each delivered event's handle names one of the GPUs (by handle value, else by UUID)."""

    def __init__(self, nvml: Any, handles: Sequence[Any], uuids: Sequence[str]) -> None:
        from gpufleet.agents.collectors.xid_events import address

        self._nvml, self._address = nvml, address
        self.by_address = {address(h): i for i, h in enumerate(handles)}
        self.by_uuid = {u: i for i, u in enumerate(uuids)}
        self.registration: dict[int, str] = {}
        self.events: Counter[str] = Counter()
        self._sets: list[Any] = []
        self._stop = threading.Event()
        wanted = nvml.nvmlEventTypeXidCriticalError | nvml.nvmlEventTypePState | nvml.nvmlEventTypeClock
        for i, h in enumerate(handles):
            self._register(i, h, wanted)
        self._thread = threading.Thread(target=self._loop, name="smoke-events", daemon=True)

    def _register(self, i: int, handle: Any, wanted: int) -> None:
        nvml = self._nvml
        try:
            es = nvml.nvmlEventSetCreate()
            mask = wanted & nvml.nvmlDeviceGetSupportedEventTypes(handle)
            nvml.nvmlDeviceRegisterEvents(handle, mask, es)
        except nvml.NVMLError as exc:
            self.registration[i] = f"failed: {exc}"
            return
        xid = "with XID" if mask & nvml.nvmlEventTypeXidCriticalError else "WITHOUT XID events"
        self.registration[i] = f"registered {xid} (mask {mask:#x})"
        self._sets.append(es)

    def _loop(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set() and self._sets:
            for es in self._sets:
                try:
                    data = nvml.nvmlEventSetWait(es, 50)
                except nvml.NVMLError_Timeout:
                    continue
                except nvml.NVMLError as exc:
                    self.events[f"wait error: {exc}"] += 1
                    continue
                self.events[self._match(data.device)] += 1

    def _match(self, device: Any) -> str:
        if self._address(device) in self.by_address:
            return "matched by handle"
        try:
            uuid = self._nvml.nvmlDeviceGetUUID(device)
        except self._nvml.NVMLError:
            return "unmatched"
        return "matched by UUID" if uuid in self.by_uuid else "unmatched"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for es in self._sets:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlEventSetFree(es)


# -- the collector's run ---------------------------------------------------------------------


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RunRecorder:
    """Per-interval figures of the collector run, and the per-GPU energy and utilization comparisons."""

    def __init__(self, gpus: int) -> None:
        self.calls: list[int] = []
        self.errors: list[int] = []
        self.misses: list[int] = []
        self.cpu_ms: list[float] = []
        self.wall_ms: list[float] = []
        self.energy_j = [0.0] * gpus
        self.power_integral_j = [0.0] * gpus
        self.util_avg: list[list[float]] = [[] for _ in range(gpus)]
        self.util_point: list[list[float]] = [[] for _ in range(gpus)]
        self.error_samples: Counter[str] = Counter()
        self.xids_reported = 0
        self.raw_sample_range: list[int] | None = None
        self._last: float | None = None

    def interval(self, samples: Sequence[Any], stats: Any, cpu_ms: float, wall_ms: float, now: float) -> None:
        self.calls.append(stats.nvml_calls)
        self.errors.append(stats.nvml_errors)
        self.misses.append(stats.nvml_deadline_misses)
        self.cpu_ms.append(cpu_ms)
        self.wall_ms.append(wall_ms)
        for i, s in enumerate(samples):
            self.xids_reported += len(s.xids)
            if s.error:
                self.error_samples[s.error[:120]] += 1
            if s.util_gpu_ratio is not None:
                self.util_avg[i].append(s.util_gpu_ratio)
            # power_w is NVML's average over the second before the read: held over the interval it ends
            if self._last is not None and s.energy_interval_j is not None and s.power_w is not None:
                self.energy_j[i] += s.energy_interval_j
                self.power_integral_j[i] += s.power_w * (now - self._last)
        self._last = now


def _point_utilization(nvml: Any, handles: Sequence[Any], rec: RunRecorder) -> None:
    for i, h in enumerate(handles):
        with contextlib.suppress(nvml.NVMLError):
            rec.util_point[i].append(nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100)


def _fake_load(fake: Any, rng: random.Random, n: int) -> None:
    """Against the fake: a new utilization and power for every GPU, held until the next interval, and an
    XID on one GPU (every other one delivered under another handle, so UUID matching is exercised)."""
    for g in fake.gpus:
        g.util_gpu_pct = rng.randrange(0, 101)
        g.power_mw = 70_000 + g.util_gpu_pct * 6_000
    fake.inject_xid(n % len(fake.gpus), 43, alias=n % 2 == 1)


def run_collector(nvml: Any, fake: Any, duration_s: float, interval_s: float, kmsg: str | None) -> dict[str, Any]:
    """The real collector for `duration_s` at `interval_s`, plus the comparisons the report carries."""
    from gpufleet.agents.collectors.nvml import NvmlCollector

    collector = NvmlCollector(nvml, interval_ms=round(interval_s * 1000), kmsg_path=kmsg, release_file=None)
    collector.open()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(len(collector.gpu_uuids))]
    rec, rng = RunRecorder(len(handles)), random.Random(1)  # noqa: S311 - a synthetic load for the fake
    probe = EventProbe(nvml, handles, collector.gpu_uuids)
    probe.start()
    end = time.monotonic() + duration_s
    try:
        while time.monotonic() < end:
            c0, w0 = _cpu_s(), time.monotonic()
            samples = collector.collect(0)
            rec.interval(samples, collector.stats, (_cpu_s() - c0) * 1000, (time.monotonic() - w0) * 1000,
                         time.monotonic())
            _point_utilization(nvml, handles, rec)
            if fake is not None:
                _fake_load(fake, rng, len(rec.calls))
            time.sleep(max(0.0, interval_s - (time.monotonic() - w0)))
        registration = collector.xid_watcher.status()
        kmsg_status = collector.xid_watcher.kmsg_unavailable or ("read" if kmsg else "not configured")
        rec.raw_sample_range = _raw_sample_range(nvml, handles)
    finally:
        probe.stop()
        collector.close()
    return _run_report(rec, len(handles), probe, registration, kmsg_status)


def _raw_sample_range(nvml: Any, handles: Sequence[Any]) -> list[int] | None:
    values: list[int] = []
    for h in handles:
        with contextlib.suppress(nvml.NVMLError):
            _, samples = nvml.nvmlDeviceGetSamples(h, nvml.NVML_GPU_UTILIZATION_SAMPLES, 0)
            values.extend(int(s.sampleValue.uiVal) for s in samples)
    return [min(values), max(values)] if values else None


def _run_report(rec: RunRecorder, gpus: int, probe: EventProbe, registration: dict[int, str],
                kmsg: str) -> dict[str, Any]:
    steady = rec.calls[2:] or rec.calls
    return {
        "run": {
            "intervals": len(rec.calls),
            "nvml_calls_per_interval": _summary([float(c) for c in steady]),
            "nvml_calls_per_gpu_per_interval": round(statistics.mean(steady) / max(1, gpus), 2) if steady else None,
            "nvml_errors_total": sum(rec.errors),
            "deadline_misses_total": sum(rec.misses),
            "agent_cpu_ms_per_interval": _summary(rec.cpu_ms[2:] or rec.cpu_ms),
            "collect_wall_ms": _summary(rec.wall_ms[2:] or rec.wall_ms),
            "error_samples": dict(rec.error_samples),
        },
        "energy": [{"gpu": i, "counter_deltas_j": round(rec.energy_j[i], 3),
                    "power_integral_j": round(rec.power_integral_j[i], 3),
                    "ratio": round(rec.energy_j[i] / rec.power_integral_j[i], 4) if rec.power_integral_j[i] else None}
                   for i in range(gpus)],
        "utilization": {
            "interval_average_mean": [round(statistics.mean(v), 4) if v else None for v in rec.util_avg],
            "point_reading_mean": [round(statistics.mean(v), 4) if v else None for v in rec.util_point],
            "raw_sample_range": rec.raw_sample_range,
        },
        "events": {"xid_registration_by_agent": registration, "probe_registration": probe.registration,
                   "delivered": dict(probe.events), "xids_reported_by_agent": rec.xids_reported},
        "kmsg": kmsg,
    }


# -- the whole check ---------------------------------------------------------------------------


def run(*, fake: bool, duration_s: float, interval_s: float, kmsg: str | None = None) -> dict[str, Any]:
    """Every section of the report (see the module text)."""
    nvml, fake_nvml = open_nvml(fake)
    started = time.monotonic()
    nvml.nvmlInit()
    try:
        inv = inventory(nvml)
        handles = [nvml.nvmlDeviceGetHandleByIndex(g["index"]) for g in inv["gpus"]]
        links = []
        for h in handles:
            try:
                (count,) = nvml.nvmlDeviceGetFieldValues(h, [(nvml.NVML_FI_DEV_NVLINK_LINK_COUNT, 0)])
                links.append(int(count.value.uiVal) if count.nvmlReturn == nvml.NVML_SUCCESS else 0)
            except nvml.NVMLError:
                links.append(0)
        fields = {g["index"]: field_support(nvml, h, n) for g, h, n in zip(inv["gpus"], handles, links, strict=True)}
        lat = latency(nvml, handles)
    finally:
        nvml.nvmlShutdown()
    report = {"inventory": inv, "fields": fields, "latency_ms": lat,
              **run_collector(nvml, fake_nvml, duration_s, interval_s, kmsg)}
    report.update(
        mode="fake" if fake else "nvml", host=platform.node(), python=platform.python_version(),
        uid=os.geteuid(), user=pwd.getpwuid(os.geteuid()).pw_name, interval_s=interval_s, duration_s=duration_s,
        generated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        smoke_seconds=round(time.monotonic() - started, 1),
    )
    return report


def _service_user() -> pwd.struct_passwd | None:
    for name in SERVICE_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


def _as_service_user(argv: list[str], user: pwd.struct_passwd, timeout_s: float) -> dict[str, Any]:
    """This check again, as `user`; its report (or why it could not run)."""
    out = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", *argv, "--as-is", "--out", "-"],
                         cwd=ROOT, user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True,
                         text=True, timeout=timeout_s, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"exit {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake", action="store_true", help="run against the pynvml fake (no GPU needed)")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds of collection")
    parser.add_argument("--interval", type=float, default=1.0, help="the agent's interval, seconds")
    parser.add_argument("--kmsg", default=None, help="kernel log to read XIDs from (default /dev/kmsg on a GPU node)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="report path, or - for stdout")
    parser.add_argument("--as-is", action="store_true", help="do not switch to an unprivileged user")
    args = parser.parse_args(argv)
    kmsg = args.kmsg if args.kmsg is not None else (None if args.fake else "/dev/kmsg")
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--as-is"]
    user = None if args.fake or args.as_is or os.geteuid() != 0 else _service_user()
    report: dict[str, Any] | None = None
    if user is not None:
        try:
            report = _as_service_user(_without_out(passed), user, args.duration + 240)
            report["ran_as"] = f"{user.pw_name} (switched from root)"
        except Exception as exc:
            print(f"[gpu-smoke] as {user.pw_name} it failed ({exc}); running as root", file=sys.stderr)
    if report is None:
        report = run(fake=args.fake, duration_s=args.duration, interval_s=args.interval, kmsg=kmsg)
        report.setdefault("ran_as", f"{report['user']}" + (" (root: no unprivileged user)" if report["uid"] == 0
                                                            and not args.as_is and not args.fake else ""))
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"[gpu-smoke] report written to {args.out}", file=sys.stderr)
    return 0


def _without_out(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
