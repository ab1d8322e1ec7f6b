"""Shared pieces of the serving tests: the openpi-client venv (built once, cached), running the
client driver in it, and loading ``.npz`` results back."""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "serving_openpi_driver.py"
OPENPI_CLIENT = "openpi-client==0.1.2"


def _cache_root() -> Path:
    if os.environ.get("FLASHRT_TEST_CACHE"):
        return Path(os.environ["FLASHRT_TEST_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("flashrt")) / "tests"


def openpi_client_python() -> str:
    """Python of a venv holding the unmodified openpi-client from PyPI (plus typing_extensions,
    which it imports without declaring). Built once per interpreter version, under a lock."""
    tag = f"openpi-client-0.1.2-py{sys.version_info.major}{sys.version_info.minor}"
    root = _cache_root() / tag
    python = root / "bin" / "python"
    stamp = root / ".installed"
    if stamp.exists():
        return str(python)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            venv.EnvBuilder(clear=True, with_pip=True).create(root)
            out = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", OPENPI_CLIENT,
                 "typing_extensions"],
                capture_output=True, text=True, timeout=600,
            )
            if out.returncode != 0:
                if os.environ.get("FLASHRT_SKIP_OPENPI_CLIENT") == "1":
                    pytest.skip(f"could not install {OPENPI_CLIENT}: {out.stderr[-400:]}")
                raise RuntimeError(f"pip install {OPENPI_CLIENT} failed (PyPI needed):\n{out.stderr[-2000:]}")
            stamp.write_text("ok\n")
    return str(python)


def client_command(spec: dict) -> list[str]:
    return [openpi_client_python(), str(DRIVER), json.dumps(spec)]


def run_client(spec: dict, timeout: float = 120) -> dict:
    out = subprocess.run(client_command(spec), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"client {spec.get('mode')} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_clients(specs: list[dict], timeout: float = 300) -> list[dict]:
    """Run the clients at the same time; their reports in the order of ``specs``."""
    procs = [subprocess.Popen(client_command(s), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in specs]
    reports = []
    try:
        for spec, proc in zip(specs, procs):
            stdout, stderr = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise AssertionError(f"client {spec} failed (rc {proc.returncode}):\n{stderr[-3000:]}")
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return reports


def load_requests(path) -> list[dict]:
    """The driver's .npz back as [{"obs": nested dict, "actions": array}, ...]."""
    with np.load(path, allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    requests = {}
    for key, value in flat.items():
        parts = key.split("|")
        node = requests.setdefault(int(parts[0][3:]), {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    out = []
    for i in sorted(requests):
        req = requests[i]
        out.append({"obs": _lists(req["obs"]), "actions": req["actions"]})
    return out


def _lists(node):
    if not isinstance(node, dict):
        return node.item() if node.dtype.kind == "U" else node
    if node and all(k.startswith("#") for k in node):
        return [_lists(node[f"#{i}"]) for i in range(len(node))]
    return {k: _lists(v) for k, v in node.items()}


class ServeProcess:
    """``flashrt serve ... --port 0`` in a subprocess; the bound port is read from its log."""

    def __init__(self, tmp_path, args, env=None, servetest=True):
        self.log_path = tmp_path / "serve.log"
        self._log = open(self.log_path, "w")
        # servetest: our launcher registers the test model first; otherwise the real `flashrt` command
        launcher = [str(HERE / "serving_cli_launcher.py"), "--servetest"] if servetest else ["-m", "flash_rt.cli"]
        command = [sys.executable, *launcher, "serve", *args]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on ws://[^:]+:(\d+)", self.log_path.read_text())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"flashrt serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"flashrt serve did not start within {timeout} s:\n{self.log()}")

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
