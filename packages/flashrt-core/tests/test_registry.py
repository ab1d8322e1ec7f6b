"""Registry, plugins and load_model dispatch."""

from __future__ import annotations

import pytest

import flash_rt
from flash_rt.errors import ConfigError, HardwareError
from flash_rt.plugins import hookimpl, register_plugin

FAKE = "fake_frontends:EchoFrontend"


def test_arch_names_for_capabilities():
    from flash_rt.hardware import arch_for_capability

    assert arch_for_capability(9, 0) == "hopper"
    assert arch_for_capability(12, 0) == "rtx_sm120"
    assert arch_for_capability(12, 1) == "rtx_sm120"
    assert arch_for_capability(8, 9) == "rtx_sm89"
    assert arch_for_capability(8, 7) == "rtx_sm87"
    assert arch_for_capability(11, 0) == "thor"
    with pytest.raises(HardwareError, match=r"sm_75.*hardware="):
        arch_for_capability(7, 5)


def test_detect_arch_without_gpu_is_cpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert flash_rt.hardware.detect_arch() == "cpu"


def test_resolve_is_lazy_and_returns_class(clean_registry, monkeypatch):
    import sys

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    sys.modules.pop("fake_frontends", None)
    clean_registry.register("echo", "torch", "cpu", FAKE, distribution="dist-a")
    assert "fake_frontends" not in sys.modules  # registering imports nothing
    cls = clean_registry.resolve_pipeline_class("echo", "torch", "cpu")
    assert cls.__name__ == "EchoFrontend"


def test_unknown_key_lists_installed(clean_registry):
    clean_registry.register("echo", "torch", "cpu", FAKE, distribution="dist-a")
    with pytest.raises(ConfigError, match=r"no frontend for \(pi05, torch, rtx_sm89\).*\(echo, torch, cpu\) from dist-a"):
        clean_registry.resolve_pipeline_class("pi05", "torch", "rtx_sm89")


def test_two_plugins_one_key_names_both(clean_registry):
    class PluginA:
        @hookimpl
        def flashrt_register_frontends(self, register):
            register("echo", "torch", "cpu", FAKE)

    class PluginB:
        @hookimpl
        def flashrt_register_frontends(self, register):
            register("echo", "torch", "cpu", "other.module:Other")

    register_plugin(PluginA(), "flashrt-echo-a")
    register_plugin(PluginB(), "flashrt-echo-b")
    with pytest.raises(ConfigError, match="flashrt-echo-a and flashrt-echo-b"):
        clean_registry.resolve_pipeline_class("echo", "torch", "cpu")


def test_import_failure_names_distribution(clean_registry):
    class Plugin:
        @hookimpl
        def flashrt_register_frontends(self, register):
            register("ghost", "torch", "cpu", "flashrt_no_such_module.frontend:Ghost")

    register_plugin(Plugin(), "flashrt-ghost")
    with pytest.raises(ConfigError, match=r"flashrt-ghost.*failed to import.*ModuleNotFoundError"):
        clean_registry.resolve_pipeline_class("ghost", "torch", "cpu")


def test_plugin_that_fails_to_import_is_reported_on_resolve(clean_registry, monkeypatch):
    import flash_rt.plugins as plugins

    class BadEntryPoint:
        name = "broken"
        value = "flashrt_broken_plugin"
        dist = type("D", (), {"metadata": {"Name": "flashrt-broken"}})()

        def load(self):
            raise ImportError("flashrt_broken_plugin needs libfoo")

    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [BadEntryPoint()])
    with pytest.raises(ConfigError, match=r"flashrt-broken.*libfoo"):
        clean_registry.resolve_pipeline_class("pi05", "torch", "cpu")


def test_allow_list_env_filters_entry_points(clean_registry, monkeypatch):
    import flash_rt.plugins as plugins

    loaded = []

    class EP:
        def __init__(self, name, dist):
            self.name, self.value = name, f"{name}_module"
            self.dist = type("D", (), {"metadata": {"Name": dist}})()

        def load(self):
            loaded.append(self.name)
            return object()

    monkeypatch.setattr(plugins.metadata, "entry_points",
                        lambda group: [EP("pi05", "flashrt-pi05"), EP("toy", "flashrt-plugin-toy")])
    monkeypatch.setenv("FLASHRT_PLUGINS", "flashrt-plugin-toy")
    plugins.plugin_manager()
    assert loaded == ["toy"]


def test_pipeline_map_mutation_is_honoured(clean_registry, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    clean_registry._PIPELINE_MAP[("direct", "torch", "cpu")] = ("fake_frontends", "EchoFrontend")
    assert clean_registry.resolve_pipeline_class("direct", "torch", "cpu").__name__ == "EchoFrontend"
    routes = clean_registry.registered_routes()
    assert routes[("direct", "torch", "cpu")].distribution == "<_PIPELINE_MAP>"


def test_register_rejects_bad_target(clean_registry):
    with pytest.raises(ConfigError, match="module:Class"):
        clean_registry.register("x", "torch", "cpu", "no_colon")
    with pytest.raises(ConfigError, match="unknown arch"):
        clean_registry.register("x", "torch", "sm_75", "a:B")
