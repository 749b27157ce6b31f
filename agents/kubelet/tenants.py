"""Who a pod bills to: its namespace (mapped through `namespace_tenants`), or a label or annotation read
through the Kubernetes API, and which job it belongs to (a configured label, else `namespace/pod`).

`PodMetadata` is the one place that talks to the API server: the official `kubernetes` client (extra
`gpufleet[kubernetes]`), in-cluster configuration by default, imported and configured on first use so an
agent that needs no label never loads it. Answers are cached for `ttl_s`; a pod the API cannot be asked
about keeps its cached labels (the same pod keeps its labels), and a pod never seen yet gets no tenant:
`TenantResolver.resolve` returns None and the device is reported with its allocation unknown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpufleet.agents.allocation import Allocation
from gpufleet.agents.kubelet.devices import PodRef

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PodMeta:
    """A pod's labels and annotations."""

    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


class MetadataUnavailable(Exception):
    """The API server could not say (unreachable, forbidden, the pod not found there yet)."""


class PodMetadata:
    """Reads pods' labels and annotations from the API server (`CoreV1Api.read_namespaced_pod`)."""

    def __init__(self, api_client: Any | None = None, timeout_s: float = 2.0) -> None:
        """`api_client`: a `kubernetes.client.ApiClient` (tests); None: in-cluster config on first use."""
        self._api_client = api_client
        self._api: Any = None
        self._timeout_s = timeout_s

    def _core(self) -> Any:
        if self._api is None:
            try:
                from kubernetes import client, config
            except ImportError as exc:
                raise MetadataUnavailable(f"the kubernetes client is not installed ({exc}): install "
                                          "gpufleet[kubernetes]") from None
            if self._api_client is None:
                try:
                    config.load_incluster_config()
                except config.ConfigException as exc:
                    raise MetadataUnavailable(f"no in-cluster Kubernetes configuration ({exc})") from None
            self._api = client.CoreV1Api(self._api_client)
        return self._api

    def read(self, pod: PodRef) -> PodMeta:
        """The pod's metadata; `MetadataUnavailable` naming why not."""
        api = self._core()
        try:
            obj = api.read_namespaced_pod(pod.name, pod.namespace, _request_timeout=self._timeout_s)
        except Exception as exc:  # ApiException (403, 404), urllib3 errors: all mean "cannot say"
            status = getattr(exc, "status", None)
            raise MetadataUnavailable(f"reading pod {pod.namespace}/{pod.name} failed"
                                      f"{f' (HTTP {status})' if status else ''}: {type(exc).__name__}") from None
        meta = obj.metadata
        return PodMeta(dict(meta.labels or {}), dict(meta.annotations or {}))


@dataclass
class TenantRules:
    """`agent.allocation`'s Kubernetes keys."""

    namespace_tenants: Mapping[str, str] = field(default_factory=dict)
    tenant_label: str | None = None
    tenant_annotation: str | None = None
    job_label: str | None = None
    ttl_s: float = 300.0

    @property
    def needs_api(self) -> bool:
        return bool(self.tenant_label or self.tenant_annotation or self.job_label)


class TenantResolver:
    """Pod -> `Allocation(tenant, job)`, or None when the tenant cannot be known now."""

    def __init__(self, rules: TenantRules, metadata: PodMetadata | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rules = rules
        self._metadata = metadata if metadata is not None or not rules.needs_api else PodMetadata()
        self._clock = clock
        self._cache: dict[PodRef, tuple[float, PodMeta]] = {}
        self._warned: set[str] = set()

    def resolve(self, pod: PodRef) -> Allocation | None:
        meta = self._meta(pod) if self.rules.needs_api else PodMeta()
        if meta is None:
            return None
        r = self.rules
        tenant = ((r.tenant_label and meta.labels.get(r.tenant_label))
                  or (r.tenant_annotation and meta.annotations.get(r.tenant_annotation))
                  or r.namespace_tenants.get(pod.namespace) or pod.namespace)
        job = (r.job_label and meta.labels.get(r.job_label)) or f"{pod.namespace}/{pod.name}"
        return Allocation(tenant, job)

    def forget_except(self, live: set[PodRef]) -> None:
        """Drop cached metadata of pods the kubelet no longer lists."""
        for pod in [p for p in self._cache if p not in live]:
            del self._cache[pod]

    def _meta(self, pod: PodRef) -> PodMeta | None:
        cached = self._cache.get(pod)
        now = self._clock()
        if cached is not None and now - cached[0] < self.rules.ttl_s:
            return cached[1]
        assert self._metadata is not None
        try:
            meta = self._metadata.read(pod)
        except MetadataUnavailable as exc:
            self._warn_once(str(exc))
            return None if cached is None else cached[1]
        self._cache[pod] = (now, meta)
        return meta

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s; its GPUs are reported with their allocation unknown until the API answers", message)
