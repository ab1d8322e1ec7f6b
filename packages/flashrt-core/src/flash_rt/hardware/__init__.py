"""Hardware detection and the (config, framework, arch) -> frontend registry."""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from flash_rt.errors import ConfigError, HardwareError

# Compute capability -> arch name. One name per compute path file.
_ARCH_BY_CAPABILITY = {
    (9, 0): "hopper",
    (12, 0): "rtx_sm120",
    (12, 1): "rtx_sm120",
    (8, 9): "rtx_sm89",
    (8, 7): "rtx_sm87",
    (11, 0): "thor",
}
ARCHS = ("hopper", "rtx_sm120", "rtx_sm89", "rtx_sm87", "thor", "cpu")
HARDWARE_CHOICES = ("auto",) + ARCHS

# Seed contract: (config, framework, arch) -> (module_path, class_name). Third parties may
# mutate this plain dict at import time; plugins fill it through the registration hook.
_PIPELINE_MAP: dict[tuple[str, str, str], tuple[str, str]] = {}


@dataclass
class RouteInfo:
    distribution: str
    measured: bool


_ROUTES: dict[tuple[str, str, str], RouteInfo] = {}
_CONFLICTS: dict[tuple[str, str, str], list[str]] = {}
_loaded = False
_lock = threading.RLock()


def arch_for_capability(major: int, minor: int) -> str:
    try:
        return _ARCH_BY_CAPABILITY[(major, minor)]
    except KeyError:
        raise HardwareError(
            f"unsupported GPU compute capability sm_{major}{minor}; FlashRT has compute paths for "
            f"{', '.join(f'sm_{a}{b}' for a, b in _ARCH_BY_CAPABILITY)}. Pass "
            f"hardware= one of {', '.join(HARDWARE_CHOICES[1:])} to force a path."
        ) from None


def _cuda_capability() -> tuple[int, int] | None:
    """Capability of device 0, or None without a usable CUDA device. Tries torch (if it is
    already importable) and then cuda-python; neither is a hard dependency."""
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            return torch.cuda.get_device_capability(0)
        return None
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime  # noqa: PLC0415
    except ImportError:
        return None
    err, count = runtime.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return None
    err, major = runtime.cudaDeviceGetAttribute(
        runtime.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 0
    )
    _, minor = runtime.cudaDeviceGetAttribute(
        runtime.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, 0
    )
    return (int(major), int(minor))


def detect_arch() -> str:
    """``hopper`` | ``rtx_sm120`` | ``rtx_sm89`` | ``rtx_sm87`` | ``thor`` | ``cpu``."""
    capability = _cuda_capability()
    if capability is None:
        return "cpu"
    return arch_for_capability(*capability)


def register(
    config: str,
    framework: str,
    arch: str,
    target: str,
    *,
    measured: bool = False,
    distribution: str = "<direct call>",
) -> None:
    """Route (config, framework, arch) to ``"module:Class"``. A second distribution claiming a
    taken key is recorded as a conflict, reported when that key is resolved."""
    if arch not in ARCHS:
        raise ConfigError(f"register(): unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    module_path, sep, class_name = target.partition(":")
    if not sep or not module_path or not class_name:
        raise ConfigError(f"register(): target must be 'module:Class', got {target!r}")
    key = (config, framework, arch)
    with _lock:
        previous = _ROUTES.get(key)
        if previous is not None and previous.distribution != distribution:
            _CONFLICTS.setdefault(key, [previous.distribution]).append(distribution)
            return
        _PIPELINE_MAP[key] = (module_path, class_name)
        _ROUTES[key] = RouteInfo(distribution=distribution, measured=measured)


def load_plugins() -> None:
    """Run every plugin's registration hook once (idempotent)."""
    global _loaded
    with _lock:
        if _loaded:
            return
        from flash_rt.plugins import plugin_manager  # noqa: PLC0415

        manager = plugin_manager()
        for impl in manager.hook.flashrt_register_frontends.get_hookimpls():
            dist = impl.plugin_name

            def bound(config, framework, arch, target, *, measured=False, _dist=dist):
                register(config, framework, arch, target, measured=measured, distribution=_dist)

            impl.function(register=bound)
        _loaded = True


def registered_routes() -> dict[tuple[str, str, str], RouteInfo]:
    """Every route with its distribution; routes set directly in _PIPELINE_MAP included."""
    load_plugins()
    routes = {}
    for key in _PIPELINE_MAP:
        routes[key] = _ROUTES.get(key, RouteInfo(distribution="<_PIPELINE_MAP>", measured=False))
    return routes


def registered_configs() -> set[str]:
    return {config for config, _, _ in registered_routes()}


def _describe_installed() -> str:
    routes = registered_routes()
    if not routes:
        return "no frontends are installed (pip install flashrt-pi05, or another model package)"
    return "installed: " + ", ".join(
        f"({c}, {f}, {a}) from {info.distribution}" for (c, f, a), info in sorted(routes.items())
    )


def _failed_plugins_note() -> str:
    from flash_rt.plugins import plugin_records  # noqa: PLC0415

    failed = [r for r in plugin_records() if r.error is not None]
    if not failed:
        return ""
    return " Plugins that failed to import: " + "; ".join(
        f"{r.distribution} ({r.value}): {type(r.error).__name__}: {r.error}" for r in failed
    )


def resolve_pipeline_class(config: str, framework: str, arch: str):
    """Import (lazily) and return the frontend class for (config, framework, arch)."""
    load_plugins()
    key = (config, framework, arch)
    if key in _CONFLICTS:
        raise ConfigError(
            f"({config}, {framework}, {arch}) is claimed by more than one plugin: "
            f"{' and '.join(_CONFLICTS[key])}. Uninstall one, or pick one with "
            "FLASHRT_PLUGINS=<entry point or distribution name>."
        )
    if key not in _PIPELINE_MAP:
        raise ConfigError(
            f"no frontend for ({config}, {framework}, {arch}); {_describe_installed()}."
            f"{_failed_plugins_note()}"
        )
    module_path, class_name = _PIPELINE_MAP[key]
    distribution = _ROUTES.get(key, RouteInfo("<_PIPELINE_MAP>", False)).distribution
    try:
        module = importlib.import_module(module_path)
        return getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"the frontend for ({config}, {framework}, {arch}), {module_path}:{class_name} from "
            f"{distribution}, failed to import: {type(exc).__name__}: {exc}. Reinstall "
            f"{distribution} (and its dependencies)."
        ) from exc


def _reset_for_tests() -> None:
    global _loaded
    with _lock:
        _PIPELINE_MAP.clear()
        _ROUTES.clear()
        _CONFLICTS.clear()
        _loaded = False


__all__ = ["detect_arch", "resolve_pipeline_class", "_PIPELINE_MAP", "register", "load_plugins"]
