"""Flower's usage telemetry, off unless a config turns it on (``federated.telemetry: true``).

Flower posts usage events (OS, CPU count, a persistent id kept in ``~/.flwr/source``) to its own
servers when a simulation, server or client starts and stops. A hospital machine must not phone
home, so insitu turns this off before Flower is first imported: Flower reads
``FLWR_TELEMETRY_ENABLED`` once, when its telemetry module is imported, and even with it at "0"
it still creates ``~/.flwr/source`` for each event. So insitu also sets the module's flag and
replaces its event builder with one that writes and sends nothing (and puts them back when a
config asks for telemetry). Ray, which runs Flower's simulation, has its own usage statistics;
``RAY_USAGE_STATS_ENABLED`` follows the same switch.

Every import of Flower in insitu goes through :func:`import_flower`.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

ENV = "FLWR_TELEMETRY_ENABLED"
RAY_ENV = "RAY_USAGE_STATS_ENABLED"
_MODULE = "flwr.supercore.telemetry"
_state: dict[str, Any] = {"enabled": False, "create_event": None}


def set_telemetry(enabled: bool) -> None:
    """Turn Flower's (and Ray's) usage telemetry on or off for this process and the workers it starts."""
    _state["enabled"] = bool(enabled)
    os.environ[ENV] = "1" if enabled else "0"
    os.environ[RAY_ENV] = "1" if enabled else "0"
    module = sys.modules.get(_MODULE)
    if module is not None:
        _patch(module)


def import_flower(name: str = "flwr") -> ModuleType:
    """``importlib.import_module(name)`` with the telemetry switch applied before and after the import."""
    os.environ[ENV] = "1" if _state["enabled"] else "0"
    os.environ[RAY_ENV] = os.environ[ENV]
    module = importlib.import_module(name)
    telemetry = sys.modules.get(_MODULE) or importlib.import_module(_MODULE)
    _patch(telemetry)
    return module


def _patch(telemetry: ModuleType) -> None:
    if _state["create_event"] is None:
        _state["create_event"] = telemetry.create_event
    telemetry.FLWR_TELEMETRY_ENABLED = "1" if _state["enabled"] else "0"
    telemetry.create_event = _state["create_event"] if _state["enabled"] else _no_event


def _no_event(event_type: Any, event_details: dict[str, Any] | None) -> str:
    """Flower's event builder when telemetry is off: no id file, no request."""
    return "disabled"
