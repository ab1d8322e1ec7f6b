"""``flashrt serve`` as a real process (the CLI parser from flash_rt.serving.cli), driven by the
unmodified openpi-client: API key through --api-key-env, SIGTERM shutdown, and a soak of 10,000
requests with the server's resident memory checked for growth."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import serving_support as support  # noqa: E402
from serving_testmodel import write_checkpoint  # noqa: E402

from flash_rt.errors import ConfigError  # noqa: E402
from flash_rt.serving.cli import add_serve_parser, cmd_serve  # noqa: E402

SOAK_REQUESTS = 10_000
SOAK_CLIENTS = 4
MAX_RSS_GROWTH_KB = 20 * 1024


@pytest.fixture
def client_python():
    return support.openpi_client_python()


def test_cli_serves_with_an_api_key_and_stops_on_sigterm(tmp_path, client_python):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    server = support.ServeProcess(tmp_path, ["--config", "servetest", "--checkpoint", str(ckpt), "--hardware", "cpu",
                                     "--port", "0", "--api-key-env", "SERVE_TEST_KEY", "--metadata",
                                     '{"robot": "libero"}'], env={"SERVE_TEST_KEY": "k-123"})
    try:
        assert support.run_client({"mode": "auth", "port": server.port, "api_key": "k-123"})["ok"]
        assert support.run_client({"mode": "auth", "port": server.port})["status"] == 401
        report = support.run_client({"mode": "infer", "port": server.port, "layout": "droid", "n": 2,
                                     "api_key": "k-123"})
        assert report["metadata"] == {"robot": "libero"} and report["actions_shape"] == [10, 8]
    finally:
        returncode = server.stop()
    assert returncode == 0, server.log()
    assert "Traceback" not in server.log()


def test_soak_10k_requests_without_memory_growth(tmp_path, client_python):
    ckpt = write_checkpoint(tmp_path / "ckpt", horizon=10, action_dim=32)
    server = support.ServeProcess(tmp_path, ["--config", "servetest", "--checkpoint", str(ckpt), "--hardware", "cpu",
                                     "--port", "0", "--log-level", "WARNING"])
    try:
        def batch(total, seed):
            per_client = total // SOAK_CLIENTS
            reports = support.run_clients([
                {"mode": "soak", "port": server.port, "n": per_client, "shape": [10, 7], "seed": seed + i,
                 "hw": [64, 64]}
                for i in range(SOAK_CLIENTS)], timeout=600)
            assert all(r["ok"] for r in reports), reports
            return sum(r["n"] for r in reports)

        batch(1000, seed=0)  # warm up: allocator pools, import-time caches, first-request paths
        before = server.rss_kb()
        served = batch(SOAK_REQUESTS, seed=10)
        after = server.rss_kb()
        assert served == SOAK_REQUESTS
        assert after - before < MAX_RSS_GROWTH_KB, f"server RSS grew {after - before} kB over {served} requests"
        assert server.proc.poll() is None
    finally:
        returncode = server.stop()
    assert returncode == 0, server.log()


def _parse(argv):
    parser = argparse.ArgumentParser(prog="flashrt")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_serve_parser_defaults():
    args = _parse(["serve", "--checkpoint", "/ckpt"])
    assert (args.config, args.hardware, args.host, args.port) == ("pi05", "auto", "127.0.0.1", 8000)
    assert (args.num_views, args.max_frame_mb, args.api_key_env, args.metadata) == (2, 64, None, None)
    assert args.func is cmd_serve


@pytest.mark.parametrize("argv, message", [
    (["--metadata", "[1]"], "JSON object"),
    (["--api-key-env", "FLASHRT_SURELY_UNSET_VAR"], "not set"),
    (["--max-frame-mb", "0"], "max-frame-mb"),
])
def test_serve_cli_option_errors(argv, message, monkeypatch):
    monkeypatch.delenv("FLASHRT_SURELY_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError, match=message):
        cmd_serve(_parse(["serve", "--checkpoint", "/nonexistent", *argv]))


def test_serve_cli_module_imports_no_server_dependencies():
    """`flashrt --help` builds every subparser: the serve parser must not need the serve extra."""
    code = ("import sys, flash_rt.serving.cli, flash_rt.serving.layouts; "
            "bad = [m for m in ('websockets', 'msgpack', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
