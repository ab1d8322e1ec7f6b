import pytest


@pytest.fixture
def clean_registry(monkeypatch):
    """An empty registry and plugin manager for the test; the real one is restored after."""
    import flash_rt.hardware as hw
    import flash_rt.plugins as plugins

    saved = (dict(hw._PIPELINE_MAP), dict(hw._ROUTES), {k: list(v) for k, v in hw._CONFLICTS.items()},
             hw._loaded, plugins._manager, list(plugins._records))
    hw._reset_for_tests()
    plugins._reset_for_tests()
    yield hw
    hw._PIPELINE_MAP.clear()
    hw._PIPELINE_MAP.update(saved[0])
    hw._ROUTES.clear()
    hw._ROUTES.update(saved[1])
    hw._CONFLICTS.clear()
    hw._CONFLICTS.update(saved[2])
    hw._loaded = saved[3]
    plugins._manager = saved[4]
    plugins._records[:] = saved[5]
