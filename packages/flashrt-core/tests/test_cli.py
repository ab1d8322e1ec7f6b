import subprocess
import sys

import pytest

from flash_rt.cli import main


def test_info_lists_registered_frontends(capsys, clean_registry):
    clean_registry.register("echo", "torch", "cpu", "fake_frontends:EchoFrontend",
                            measured=True, distribution="dist-echo")
    clean_registry.register("echo", "torch", "hopper", "fake_frontends:EchoFrontend",
                            distribution="dist-echo")
    clean_registry._loaded = True  # no entry points in this test
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "arch" in out and "flashrt-kernels" in out
    assert "echo" in out and "dist-echo" in out
    lines = [line for line in out.splitlines() if "dist-echo" in line]
    assert any("cpu" in line and "measured" in line and "unmeasured" not in line for line in lines)
    assert any("hopper" in line and "unmeasured" in line for line in lines)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "flash_rt.cli", "plugins"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "flashrt-pi05" in out.stdout


def test_unknown_command_exits_nonzero():
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
