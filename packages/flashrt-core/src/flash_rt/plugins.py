"""Plugin hooks (pluggy) and entry-point discovery.

A model package exposes a module under the entry-point group ``flash_rt.plugins``; that module
holds ``@hookimpl`` functions. Discovery is lazy: nothing is imported until a frontend is
resolved, ``flashrt info`` runs, or ``load_plugins()`` is called.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from importlib import metadata

import pluggy

ENTRY_POINT_GROUP = "flash_rt.plugins"
ALLOW_LIST_ENV = "FLASHRT_PLUGINS"

hookspec = pluggy.HookspecMarker("flash_rt")
hookimpl = pluggy.HookimplMarker("flash_rt")


class FlashRTHookSpec:
    @hookspec
    def flashrt_register_frontends(self, register):
        """Register frontends by calling
        ``register(config, framework, arch, "module:Class", measured=False)`` once per key.

        ``measured=True`` says the frontend was benchmarked on that arch; ``flashrt info`` and
        the docs show unmeasured routes as such.
        """

    @hookspec
    def flashrt_cli_commands(self, subparsers):
        """Add subcommands to the ``flashrt`` CLI. ``subparsers`` is argparse's
        ``_SubParsersAction``; set ``func=callable(args) -> int`` as the parser default."""


@dataclass
class PluginRecord:
    name: str  # entry-point name
    distribution: str  # distribution (pip) name that provides it
    value: str  # "module" or "module:attr"
    error: BaseException | None = None


_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_records: list[PluginRecord] = []


def _allowed() -> set[str] | None:
    raw = os.environ.get(ALLOW_LIST_ENV)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def _distribution_of(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "<unknown distribution>"


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every allowed entry-point plugin loaded."""
    global _manager
    with _lock:
        if _manager is not None:
            return _manager
        manager = pluggy.PluginManager("flash_rt")
        manager.add_hookspecs(FlashRTHookSpec)
        allowed = _allowed()
        seen: set[str] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = _distribution_of(ep)
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            record = PluginRecord(name=ep.name, distribution=dist, value=ep.value)
            try:
                plugin = ep.load()
                manager.register(plugin, name=dist)
            except Exception as exc:  # reported when a key of this plugin is resolved
                record.error = exc
            _records.append(record)
        _manager = manager
        return manager


def plugin_records() -> list[PluginRecord]:
    plugin_manager()
    return list(_records)


def register_plugin(plugin: object, name: str) -> None:
    """Register an in-process plugin object (tests, notebooks) as if it came from ``name``."""
    manager = plugin_manager()
    manager.register(plugin, name=name)
    _records.append(PluginRecord(name=name, distribution=name, value=repr(plugin)))


def _reset_for_tests() -> None:
    global _manager
    with _lock:
        _manager = None
        _records.clear()
