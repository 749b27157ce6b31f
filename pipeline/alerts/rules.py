"""The declarative alert rules: one YAML file, validated on load into typed rule structs.

A rules file is a mapping with one key, `rules`, a list of rules. Each rule names its `kind` (which
query the evaluator builds, see `pipeline/alerts/queries.py`), its alert `name`, `severity`, extra
`labels`, `annotations` (templates with `{placeholders}`) and the kind's own parameters: thresholds
and durations (`for: 15m`, Prometheus-style `30s`, `5m`, `1h30m`, or `0`). Unknown keys, wrong
types, bad durations, unknown placeholders and duplicate names are errors that name the rule and the
key. `default_rules.yaml` beside this module is the shipped set; docs/alerts.md documents it.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Final, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from gpufleet.config import StallConfig, StragglerConfig
from gpufleet.errors import ConfigError

DEFAULT_RULES: Final = "default_rules.yaml"
DEMO_RULES: Final = "demo_rules.yaml"
"""Short durations so `gpufleet demo`'s one-minute faults fire and resolve while one watches."""

LabelName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Duration = str | int
"""`"30s"`, `"15m"`, `"1h30m"`, `"2d"`, or a number of seconds."""
Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Increase = Annotated[int, msgspec.Meta(ge=1)]

RESERVED_LABELS: Final = frozenset({"alertname", "severity", "cluster", "node", "gpu", "gpu_index", "tenant", "job",
                                    "action", "device", "port", "field", "model"})
"""Labels the evaluator sets itself; a rule's `labels` may not override them."""

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_UNIT_MS: Final = (86_400_000, 3_600_000, 60_000, 1000, 1)


class RulesError(ConfigError):
    """The rules file is wrong; the message names the file, the rule and the key, and how to fix it."""


def runbook_link(url: str, base: str | None) -> str:
    """A relative runbook link (`docs/alerts.md#nodesilent`) under `alerts.runbook_base_url` (where the
    repository's docs are served); an absolute one, or any link when no base is set, unchanged. The
    evaluator's alerts and the generated Grafana rules both link through this."""
    if not base or urlsplit(url).scheme:
        return url
    return f"{base.rstrip('/')}/{url.lstrip('/')}"


@functools.lru_cache(maxsize=256, typed=True)  # rules read theirs per candidate row: parse each value once
def duration_ms(value: Duration) -> int:
    """Milliseconds of a duration (`"1h30m"`, `"45s"`, `0`); raises ValueError naming the format."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value * 1000
    m = _DURATION.match(value.strip())
    if not value.strip() or m is None:
        if value.strip() == "0":
            return 0
        raise ValueError(f"{value!r} is not a duration: write e.g. 30s, 5m, 1h30m, 2d, or 0")
    return sum(int(g) * unit for g, unit in zip(m.groups(), _UNIT_MS, strict=True) if g)


@functools.lru_cache(maxsize=1024)
def format_duration(ms: int) -> str:
    """`5400000` -> `"1h30m"`: the short form used in annotations."""
    if ms <= 0:
        return "0s"
    parts = []
    rest = ms // 1000
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or f"{ms}ms"


class Rule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="kind"):
    """Keys every rule has. `name` is the alert's `alertname`."""

    name: LabelName
    severity: Literal["critical", "warning", "info"]
    labels: dict[LabelName, str] = {}
    annotations: dict[LabelName, str]
    """Templates; `summary` is required, `runbook_url` and `description` are usual."""
    generator_url: str | None = None
    """Template of the link Alertmanager shows as the alert's source (e.g. a Grafana panel)."""

    PLACEHOLDERS: ClassVar[tuple[str, ...]] = ()

    @property
    def durations(self) -> dict[str, Duration]:
        """The rule's duration keys (as written in YAML) and their values, for validation."""
        return {}


class FreshData:
    """Mixin of the rules whose newest data must be at most `max_sample_age` old (no fields of its own)."""

    __slots__ = ()
    if TYPE_CHECKING:
        max_sample_age: Duration

    @property
    def max_age_ms(self) -> int:
        return duration_ms(self.max_sample_age)


class Sustained(FreshData):
    """Mixin of the rules whose condition must hold over `coverage` of `for` on fresh data (no fields of its
    own: each rule declares `for`, `coverage` and `max_sample_age` with its defaults). Listed first among a
    rule's bases, so its `durations` is the rule's."""

    __slots__ = ()
    if TYPE_CHECKING:
        for_: Duration
        coverage: float

    @property
    def for_ms(self) -> int:
        return duration_ms(self.for_)

    @property
    def durations(self) -> dict[str, Duration]:
        return {"for": self.for_, "max_sample_age": self.max_sample_age}


class GpuRule(Sustained, Rule, kw_only=True):
    """A per-GPU condition that must hold for `for` before the alert fires."""

    for_: Duration = msgspec.field(name="for", default="5m")
    coverage: Ratio = 0.9
    """Share of `for` the GPU's samples must cover (a lost sample or two is tolerated)."""
    max_sample_age: Duration = "60s"
    """The GPU's newest sample must be at most this old; older data never fires or keeps firing."""


_GPU_PLACEHOLDERS: Final = (
    "cluster", "node", "gpu", "gpu_index", "tenant", "job", "model", "for", "active_for", "value",
)


class GpuFailing(GpuRule, tag="gpu_failing", kw_only=True):
    """The GPU's newest sample has health `failing` (critical XID, DBE, remap failure, off the bus, NVLink down)."""

    for_: Duration = msgspec.field(name="for", default=0)
    keep_firing_for: Duration = "5m"
    """With `for: 0`, a failing sample keeps the alert firing this long after it, so a one-sample
    event (an XID reported once) fires even when newer, healthy samples arrived before the evaluation."""
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (*_GPU_PLACEHOLDERS, "reasons")

    @property
    def keep_ms(self) -> int:
        return duration_ms(self.keep_firing_for)

    @property
    def durations(self) -> dict[str, Duration]:
        return {**super().durations, "keep_firing_for": self.keep_firing_for}


class GpuDegraded(GpuRule, tag="gpu_degraded", kw_only=True):
    """Throttling, heat or a pending remap sustained for `for`, or error counters rising within `for`."""

    throttle_mask: Count = 0x08 | 0x20 | 0x40 | 0x80
    """NVML clocks-event bits that count as throttling: HW slowdown, SW/HW thermal, HW power brake
    (SW power capping, 0x4, is normal under load)."""
    temp_c: float = 87.0
    """GPU temperature at or above this counts as near the limit where the sample carries no slowdown temperature."""
    temp_slowdown_margin_c: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    """Otherwise: within this many degrees of the GPU's own slowdown temperature (`temp_slowdown_c`)."""
    remap_pending: bool = True
    """A row remap or page retirement waiting for a GPU reset counts as degraded."""
    ecc_corrected_increase: Increase = 10
    pcie_replay_increase: Increase = 10
    nvlink_error_increase: Increase = 10
    """Replay + recovery errors."""
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (*_GPU_PLACEHOLDERS, "reasons", "temp_c")


class GpuIdleAllocated(GpuRule, tag="gpu_idle_allocated", kw_only=True):
    """Allocated to one tenant, a process present (or unknown), utilization below `util_below` for `for`."""

    for_: Duration = msgspec.field(name="for", default="15m")
    util_below: Ratio = 0.05
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (*_GPU_PLACEHOLDERS, "util_pct", "threshold_pct", "gpu_hours_wasted")


class GpuHeldNoProcess(GpuRule, tag="gpu_held_no_process", kw_only=True):
    """Allocated to one tenant with zero compute processes for `for` (a crashed or never-started job)."""

    for_: Duration = msgspec.field(name="for", default="10m")
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (*_GPU_PLACEHOLDERS, "gpu_hours_wasted")


class GpuBusyUnallocated(GpuRule, tag="gpu_busy_unallocated", kw_only=True):
    """Allocated to no one, yet running a process or holding more than `mem_used_above_bytes` for `for`."""

    mem_used_above_bytes: Count = 1 << 30
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (*_GPU_PLACEHOLDERS, "processes", "mem_used_gib")


class JobRule(GpuRule, kw_only=True):
    """A condition over the GPUs of one job (tenant and job set, GPU readable): each GPU's samples are
    judged as a per-GPU rule's (`for`, `coverage`, `max_sample_age`); GPUs whose newest sample is older
    than `max_sample_age` (a silent node, a GPU given to another job) are left out."""

    for_: Duration = msgspec.field(name="for", default="10m")


_STALL: Final = StallConfig()
_STRAGGLER: Final = StragglerConfig()
_JOB_PLACEHOLDERS: Final = ("cluster", "tenant", "job", "for", "since", "active_for", "value")


class JobStalled(JobRule, tag="job_stalled", kw_only=True):
    """Every GPU of a job looks hung for `for`: utilization at or above `util_above`, tensor activity at or
    below `tensor_below` (SM activity at or below `sm_below` without a tensor counter), power at or below
    `power_below_ratio` of the GPU's power limit, and measured FLOPs (where reported) at or below
    `flops_below_ratio` of peak x interval (`formulas.stall_like`)."""

    util_above: Ratio = _STALL.util_above
    tensor_below: Ratio = _STALL.tensor_below
    sm_below: Ratio = _STALL.sm_below
    power_below_ratio: Ratio = _STALL.power_below_ratio
    flops_below_ratio: Ratio = _STALL.flops_below_ratio
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (
        *_JOB_PLACEHOLDERS, "gpus", "nodes", "gpu_list", "util_pct", "power_pct", "gpu_hours_wasted",
    )


class JobStraggler(JobRule, tag="job_straggler", kw_only=True):
    """A GPU of a busy job on 2+ GPUs is slower than the job for `for`: its SM clock, tensor activity or
    measured FLOP/s below `below_ratio` of the job's median, or throttling (`throttle_mask`) while fewer
    than `peers_throttling_below` of its peers do."""

    below_ratio: Ratio = _STRAGGLER.below_ratio
    throttle_mask: Count = _STRAGGLER.throttle_mask
    peers_throttling_below: Ratio = _STRAGGLER.peers_throttling_below
    min_job_util: Ratio = _STRAGGLER.min_job_util
    """Only while the job's GPUs' median utilization is at least this (an idle job has no straggler)."""
    min_job_tensor: Ratio = _STRAGGLER.min_job_tensor
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (
        *_JOB_PLACEHOLDERS, "node", "gpu", "gpu_index", "cause", "scope", "clock_mhz", "job_clock_mhz",
        "tensor_pct", "job_tensor_pct", "job_gpus",
    )


class NodeSilent(Rule, tag="node_silent", kw_only=True):
    """A node that reported within `forget_after` sent nothing for `silent_after`."""

    silent_after: Duration = "60s"
    forget_after: Duration = "24h"
    """A node silent for longer than this is forgotten (decommissioned); its alert resolves."""
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = ("cluster", "node", "last_seen", "silent_for", "active_for", "value")

    @property
    def durations(self) -> dict[str, Duration]:
        return {"silent_after": self.silent_after, "forget_after": self.forget_after}


class MfuBelowTarget(Rule, tag="mfu_below_target", kw_only=True):
    """MFU (model FLOPs / peak FLOPs) of the fleet, or of each group in `by`, under `target` over `window`."""

    target: Ratio = 0.5
    window: Duration = "1h"
    by: list[Literal["cluster", "tenant"]] = []
    """Group keys: `[]` is the whole fleet, `[tenant]` one alert per tenant."""
    allocated_only: bool = True
    """Count only GPUs allocated to a tenant (idle spare capacity is not a job's inefficiency)."""
    max_sample_age: Duration = "60s"
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (
        "cluster", "tenant", "scope", "mfu_pct", "target_pct", "window", "gpus", "active_for", "value",
    )

    @property
    def durations(self) -> dict[str, Duration]:
        return {"window": self.window, "max_sample_age": self.max_sample_age}


class AgentCounterRising(Rule, kw_only=True):
    """A counter the node's agent reports in every message (`agent_reports`) rose within `window`.

    The increase is summed report to report in `seq` order, per `(cluster, node, boot_id)`, then per
    node: a new `boot_id` starts a new counter (its first report is its baseline, never a rise), and a
    value that falls within one `boot_id` (the agent process restarted; the counters live in memory)
    counts its new value, as Prometheus' `increase()` does. One alert per node, firing at the first
    rise, resolving once `window` has passed with no rise.
    """

    window: Duration = "15m"
    COLUMN: ClassVar[str] = ""
    """The `agent_reports` column (set by each kind, never by the rules file)."""
    COUNT: ClassVar[str] = ""
    """The placeholder holding the increase."""

    @property
    def min_increase(self) -> int:
        raise NotImplementedError

    @property
    def durations(self) -> dict[str, Duration]:
        return {"window": self.window}


class AgentSpoolDropping(AgentCounterRising, tag="agent_spool_dropping", kw_only=True):
    """The agent dropped at least `min_dropped` unsent messages (its spool was full) within `window`:
    the samples they held are lost for good."""

    min_dropped: Increase = 1
    COLUMN: ClassVar[str] = "spool_dropped_total"
    COUNT: ClassVar[str] = "dropped"
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = ("cluster", "node", "dropped", "window", "active_for", "value")

    @property
    def min_increase(self) -> int:
        return self.min_dropped


class AgentSendErrors(AgentCounterRising, tag="agent_send_errors", kw_only=True):
    """The agent's sends to Kafka failed at least `min_errors` times within `window` (the messages stay
    spooled and are resent; see `agent_spool_dropping` for data actually lost)."""

    min_errors: Increase = 10
    COLUMN: ClassVar[str] = "send_errors_total"
    COUNT: ClassVar[str] = "errors"
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = ("cluster", "node", "errors", "window", "active_for", "value")

    @property
    def min_increase(self) -> int:
        return self.min_errors


class GpuClaimConflict(Rule, tag="gpu_claim_conflict", kw_only=True):
    """One GPU reported by more than one stream (cluster, node, boot id) for overlapping time within
    `window`: the agent installed twice, a node renamed while its old agent still runs, two nodes
    configured with one name's GPUs. Each GPU-second is billed once (docs/aggregations.md, "Claims");
    the other streams' overlapping time is not billed. One alert per GPU, firing at the first overlap,
    resolving once `window` has passed without one."""

    window: Duration = "15m"
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = ("gpu", "streams", "claimers", "window", "active_for", "value")

    @property
    def durations(self) -> dict[str, Duration]:
        return {"window": self.window}


class AgentAllocationUnknown(AgentCounterRising, tag="agent_allocation_unknown", kw_only=True):
    """The agent sent at least `min_intervals` GPU-intervals whose allocation its source could not say (the
    kubelet did not answer, a Slurm job that could not be read) within `window`: that time is billed to nobody."""

    min_intervals: Increase = 1
    COLUMN: ClassVar[str] = "allocation_unknown_total"
    COUNT: ClassVar[str] = "intervals"
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = ("cluster", "node", "intervals", "window", "active_for", "value")

    @property
    def min_increase(self) -> int:
        return self.min_intervals


RecoveryName = Literal["gpu_reset", "node_reboot", "drain_p2p", "drain_and_reset", "recover_imex_domain",
                       "bus_reset", "system_reboot"]
"""NVML's recovery actions by name (`gpufleet.node_facts.RECOVERY_ACTIONS`, `none` excluded)."""


class GpuRecoveryAction(GpuRule, tag="gpu_recovery_action", kw_only=True):
    """NVML asks for a remedy on the GPU: its newest sample's recovery action is one of `actions`. The action
    stays set until the remedy, so the alert holds until the GPU is reset (one alert per GPU and action)."""

    for_: Duration = msgspec.field(name="for", default=0)
    actions: list[RecoveryName] = msgspec.field(default_factory=lambda: ["gpu_reset", "drain_and_reset", "bus_reset"])
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (*_GPU_PLACEHOLDERS, "action", "remedy")


class NodeRecoveryAction(GpuRecoveryAction, tag="node_recovery_action", kw_only=True):
    """A GPU of the node asks for a remedy in `actions` that acts on the node (a reboot): one alert per node and
    action, naming its GPUs."""

    actions: list[RecoveryName] = msgspec.field(default_factory=lambda: ["node_reboot", "system_reboot"])
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (
        "cluster", "node", "action", "remedy", "gpus", "gpu_indexes", "for", "active_for", "value")


class FabricDegraded(GpuRule, tag="fabric_degraded", kw_only=True):
    """The GPU's NVSwitch fabric is unhealthy: a `fabric_*` health reason (not registered, registration failed,
    degraded bandwidth, route recovery or unhealthy, access-timeout recovery, wrong configuration) for `for`."""

    for_: Duration = msgspec.field(name="for", default="1m")
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (*_GPU_PLACEHOLDERS, "reasons", "clique")


class PortRule(FreshData, Rule, kw_only=True):
    """A condition on a node's InfiniBand/RoCE port (`network_ports`); `ignore_ports` lists `device/port`
    names never to alert on (ports that are not cabled)."""

    max_sample_age: Duration = "60s"
    ignore_ports: list[str] = []


_PORT_PLACEHOLDERS: Final = ("cluster", "node", "device", "port", "port_name", "link_layer", "active_for", "value")


class NetworkPortDown(Sustained, PortRule, tag="network_port_down", kw_only=True):
    """The port is not up (logical state not ACTIVE, or physical state not LinkUp) in every report for `for`;
    an administratively disabled port (physical state Disabled) is left alone."""

    for_: Duration = msgspec.field(name="for", default="1m")
    coverage: Ratio = 0.9
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (*_PORT_PLACEHOLDERS, "state", "phys_state", "for")


class NetworkPortDegraded(PortRule, tag="network_port_degraded", kw_only=True):
    """An error counter of the port rose by at least its threshold within `window` (a fall is a reset and counts
    the new value). Fires at the first such rise, resolves once `window` has passed without one."""

    window: Duration = "15m"
    link_downed_increase: Increase = 1
    link_error_recovery_increase: Increase = 1
    symbol_error_increase: Increase = 100
    port_rcv_errors_increase: Increase = 10
    port_xmit_discards_increase: Increase = 1000
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (*_PORT_PLACEHOLDERS, "reasons", "window")

    @property
    def thresholds(self) -> dict[str, int]:
        """Counter column -> the rise that counts."""
        return {"link_downed": self.link_downed_increase, "link_error_recovery": self.link_error_recovery_increase,
                "symbol_error": self.symbol_error_increase, "port_rcv_errors": self.port_rcv_errors_increase,
                "port_xmit_discards": self.port_xmit_discards_increase}

    @property
    def durations(self) -> dict[str, Duration]:
        return {"window": self.window, "max_sample_age": self.max_sample_age}


class GpuMissing(Sustained, Rule, tag="gpu_missing", kw_only=True):
    """The node's newest report lists fewer GPUs than it should have (`gpus_expected`) in every report for `for`:
    one alert per GPU it names as missing (by UUID), or one for the node when it cannot name them."""

    for_: Duration = msgspec.field(name="for", default="1m")
    coverage: Ratio = 0.9
    max_sample_age: Duration = "60s"
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (
        "cluster", "node", "gpu", "expected", "enumerated", "missing", "for", "active_for", "value")


DriftField = Literal["driver_version", "vbios_version", "ecc_mode", "persistence_mode"]


class NodeConfigDrift(Rule, tag="node_config_drift", kw_only=True):
    """A node's GPUs differ in `fields` from the majority of GPUs of their model (over more than half of them),
    by each GPU's newest inventory within `window` (longer than `agent.nvml_inventory_every_s`): one alert per
    node and field."""

    window: Duration = "15m"
    fields: list[DriftField] = msgspec.field(default_factory=lambda: ["driver_version", "vbios_version"])
    min_gpus: Annotated[int, msgspec.Meta(ge=2)] = 3
    """A model needs at least this many GPUs reporting the field for a majority to mean something."""
    PLACEHOLDERS: ClassVar[tuple[str, ...]] = (
        "cluster", "node", "field", "found", "majority", "model", "gpus", "window", "active_for", "value")

    @property
    def durations(self) -> dict[str, Duration]:
        return {"window": self.window}


AnyRule = (
    GpuFailing | GpuDegraded | GpuIdleAllocated | GpuHeldNoProcess | GpuBusyUnallocated | NodeSilent | MfuBelowTarget
    | AgentSpoolDropping | AgentSendErrors | GpuClaimConflict | JobStalled | JobStraggler | AgentAllocationUnknown
    | GpuRecoveryAction | NodeRecoveryAction | FabricDegraded | NetworkPortDown | NetworkPortDegraded | GpuMissing
    | NodeConfigDrift
)
KINDS: Final = {cls.__struct_config__.tag: cls for cls in AnyRule.__args__}  # type: ignore[attr-defined]


class RuleSet(msgspec.Struct, frozen=True):
    """The validated rules, in file order, and where they came from."""

    rules: tuple[AnyRule, ...]
    source: str

    def by_name(self) -> dict[str, AnyRule]:
        return {r.name: r for r in self.rules}


def _sample_context(rule: Rule) -> dict[str, object]:
    """Typed stand-ins for every placeholder, to check format specs (`{util_pct:.1f}`) at load time."""
    numeric = {"value", "util_pct", "threshold_pct", "gpu_hours_wasted", "mem_used_gib", "mfu_pct", "target_pct",
               "temp_c", "power_pct", "clock_mhz", "job_clock_mhz", "tensor_pct", "job_tensor_pct"}
    ints = {"processes", "gpus", "dropped", "errors", "streams", "job_gpus", "intervals", "expected", "enumerated",
            "clique"}
    return {p: 1.0 if p in numeric else 1 if p in ints else "x" for p in rule.PLACEHOLDERS}


def _template_problem(rule: Rule, key: str, text: str) -> str | None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        return f"`{key}`: {exc} (write literal braces as {{{{ and }}}})"
    for f in fields:
        if f not in rule.PLACEHOLDERS:
            allowed = ", ".join("{" + p + "}" for p in rule.PLACEHOLDERS)
            return f"`{key}` uses {{{f}}}, which kind {_kind(rule)!r} does not provide; use one of {allowed}"
    try:
        text.format_map(_sample_context(rule))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        return f"`{key}`: {exc}"
    return None


def _kind(rule: Rule) -> str:
    return str(type(rule).__struct_config__.tag)


def rule_problem(rule: AnyRule) -> str | None:
    """What is wrong with a rule beyond its types (durations, templates, labels), or None."""
    return next(_problems(rule), None)


def _problems(rule: AnyRule) -> Iterator[str]:
    for key, value in rule.durations.items():
        try:
            duration_ms(value)
        except ValueError as exc:
            yield f"`{key}`: {exc}"
            return
    if "summary" not in rule.annotations:
        yield "`annotations` needs a `summary` (one line saying what is wrong)"
    templates = {f"annotations.{k}": v for k, v in rule.annotations.items()}
    if rule.generator_url:
        templates["generator_url"] = rule.generator_url
    for key, text in templates.items():
        if problem := _template_problem(rule, key, text):
            yield problem
    if clash := sorted(RESERVED_LABELS & set(rule.labels)):
        yield f"`labels` may not set {', '.join(clash)}: the evaluator sets those"
    if isinstance(rule, MfuBelowTarget) and len(set(rule.by)) != len(rule.by):
        yield "`by` lists a key twice"
    if isinstance(rule, MfuBelowTarget | AgentCounterRising | GpuClaimConflict | NetworkPortDegraded
                  | NodeConfigDrift) and duration_ms(rule.window) == 0:
        yield "`window` must be longer than 0"
    if isinstance(rule, GpuRecoveryAction) and not rule.actions:
        yield "`actions` lists no recovery action"
    if isinstance(rule, NodeConfigDrift) and (not rule.fields or len(set(rule.fields)) != len(rule.fields)):
        yield "`fields` must list each field once, and at least one"
    if isinstance(rule, NodeSilent) and duration_ms(rule.forget_after) <= duration_ms(rule.silent_after):
        yield "`forget_after` must be longer than `silent_after`"


def parse_rules(raw: object, source: str = "rules") -> RuleSet:
    """Validate a decoded rules document; the error names the rule (by name and position) and the key."""
    if not isinstance(raw, dict) or set(raw) != {"rules"} or not isinstance(raw["rules"], list):
        raise RulesError(f"{source}: a rules file is a mapping with one key, `rules`, holding a list of rules")
    out: list[AnyRule] = []
    seen: set[str] = set()
    for i, item in enumerate(raw["rules"]):
        label = f"rules[{i}]"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label = f"rule {item['name']!r} (rules[{i}])"
        if isinstance(item, dict) and "kind" in item and item["kind"] not in KINDS:
            raise RulesError(f"{source}: {label}: unknown kind {item['kind']!r}; use one of {', '.join(KINDS)}")
        try:
            rule = msgspec.convert(item, AnyRule)
        except msgspec.ValidationError as exc:
            text = str(exc).replace("`$.", "`").replace("`$`", "the rule")
            if "unknown field" in text:
                text += " (remove it or fix its spelling; docs/alerts.md lists each kind's keys)"
            raise RulesError(f"{source}: {label}: {text}") from None
        if problem := rule_problem(rule):
            raise RulesError(f"{source}: {label}: {problem}")
        if rule.name in seen:
            raise RulesError(f"{source}: {label}: the name {rule.name!r} is used twice; alert names must be unique")
        seen.add(rule.name)
        out.append(rule)
    return RuleSet(tuple(out), source)


def load_rules(path: str | Path | None = None) -> RuleSet:
    """Load and validate a rules file; the shipped defaults when `path` is None."""
    if path is None:
        return packaged_rules(DEFAULT_RULES)
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RulesError(f"rules file {p} does not exist: fix alerts.rules_file or --rules") from None
    return _parse_text(text, str(p))


def packaged_rules(name: str) -> RuleSet:
    """A rules file shipped in this package (`default_rules.yaml`, `demo_rules.yaml`)."""
    text = resources.files("gpufleet.pipeline.alerts").joinpath(name).read_text()
    return _parse_text(text, f"pipeline/alerts/{name}")


def packaged_path(name: str = DEFAULT_RULES) -> Path:
    """Filesystem path of a shipped rules file (to pass as `alerts.rules_file`)."""
    return Path(str(resources.files("gpufleet.pipeline.alerts").joinpath(name)))


def _parse_text(text: str, source: str) -> RuleSet:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source} is not valid YAML: {exc}") from None
    return parse_rules(raw, source)
