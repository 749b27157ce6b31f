"""What a GPU is and what it may do, read on slow cadences: inventory, temperature thresholds, power-limit
fallbacks and the NVSwitch fabric.

`read_inventory` (at attach, then every `inventory_every_s`): serial, VBIOS, driver, persistence and
ECC mode, and the shutdown, slowdown and memory-maximum temperatures (`nvmlDeviceGetTemperatureThreshold`,
in degrees, not the T.Limit fields). `power_limit_fallbacks` and `read_fabric` (with the slow counters):
the older power-limit calls where the fields are unsupported, and `nvmlDeviceGetGpuFabricInfoV`. Every
call goes through the funnel. Design notes: docs/design-notes.md#agents-collectors-nvml-inventory-py.
"""

from __future__ import annotations

import ctypes
import uuid
from typing import Any, Final

from gpufleet.agents.collectors.nvml_funnel import CallCache, Funnel
from gpufleet.wire import GpuSample

LIMIT_FIELDS: Final = ("temp_shutdown_c", "temp_slowdown_c", "temp_mem_max_c")
"""Read with the inventory and repeated in every sample (health compares each sample with them)."""
INVENTORY_FIELDS: Final = ("serial", "vbios_version", "driver_version", "persistence_mode", "ecc_mode")
"""Sent only in the sample of the interval that read them."""
FABRIC_KEY: Final = ("nvmlDeviceGetGpuFabricInfoV",)
TEXT_MAX: Final = 1024
"""The wire's bound on a text field."""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.strip()[:TEXT_MAX] or None


def _threshold(value: Any) -> float | None:
    """Degrees; 0 (what some boards answer for a threshold they do not enforce) is no threshold."""
    return float(value) if value else None


def read_inventory(funnel: Funnel, cache: CallCache, errors: list[str], handle: Any) -> dict[str, Any]:
    """The GPU's inventory and temperature thresholds, as wire fields (None where NVML cannot say)."""
    nvml = funnel.nvml

    def call(func: str, *args: Any) -> Any:
        return funnel.call(cache, errors, func, *args)

    persistence = call("nvmlDeviceGetPersistenceMode", handle)
    ecc = call("nvmlDeviceGetEccMode", handle)
    return {
        "serial": _text(call("nvmlDeviceGetSerial", handle)),
        "vbios_version": _text(call("nvmlDeviceGetVbiosVersion", handle)),
        "driver_version": _text(call("nvmlSystemGetDriverVersion")),
        "persistence_mode": None if persistence is None else persistence == nvml.NVML_FEATURE_ENABLED,
        "ecc_mode": None if ecc is None else ecc[0] == nvml.NVML_FEATURE_ENABLED,
        "temp_shutdown_c": _threshold(call("nvmlDeviceGetTemperatureThreshold", handle,
                                           nvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)),
        "temp_slowdown_c": _threshold(call("nvmlDeviceGetTemperatureThreshold", handle,
                                           nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)),
        "temp_mem_max_c": _threshold(call("nvmlDeviceGetTemperatureThreshold", handle,
                                          nvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX)),
    }


def power_limit_fallbacks(funnel: Funnel, cache: CallCache, errors: list[str], handle: Any,
                          from_fields: dict[str, float | None], fields_unsupported: dict[str, bool]) -> dict[str, Any]:
    """`from_fields` (W, from the slow batch), with the older calls asked for a limit whose field is unsupported."""
    calls = {"power_limit_w": "nvmlDeviceGetEnforcedPowerLimit",
             "power_limit_default_w": "nvmlDeviceGetPowerManagementDefaultLimit"}
    out = dict(from_fields)
    for name, func in calls.items():
        if out.get(name) is None and fields_unsupported[name]:
            milliwatts = funnel.call(cache, errors, func, handle)
            out[name] = None if milliwatts is None else milliwatts / 1000
    return out


def read_fabric(funnel: Funnel, cache: CallCache, errors: list[str], handle: Any) -> dict[str, Any]:
    """The GPU's NVSwitch fabric registration and health as wire fields; {} where it is on no fabric."""
    nvml = funnel.nvml
    info = nvml.c_nvmlGpuFabricInfoV_t()
    answered = funnel.call(cache, errors, "nvmlDeviceGetGpuFabricInfoV", handle, ctypes.byref(info), key=FABRIC_KEY,
                           absent=(nvml.NVMLError_ArgumentVersionMismatch,))
    if answered is None:
        return {}
    if info.state == nvml.NVML_GPU_FABRIC_STATE_NOT_SUPPORTED:
        cache.unsupported.add(FABRIC_KEY)  # a GPU on no NVSwitch fabric: nothing to watch
        return {}
    cluster = bytes(info.clusterUuid)
    return {
        "fabric_state": int(info.state),
        "fabric_status": int(info.status),
        "fabric_clique_id": int(info.cliqueId),
        "fabric_cluster_uuid": str(uuid.UUID(bytes=cluster)) if any(cluster) else None,
        "fabric_health_mask": int(info.healthMask),
    }


def _check_fields() -> None:
    known = set(GpuSample.__struct_fields__)
    missing = [f for f in (*LIMIT_FIELDS, *INVENTORY_FIELDS) if f not in known]
    if missing:
        raise RuntimeError(f"nvml_inventory names fields GpuSample lacks: {missing}")


_check_fields()
