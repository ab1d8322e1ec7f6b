"""``flashrt serve`` for the tests: our own argparse with ``add_serve_parser``, plus (with
--servetest) the TinyServePolicy route registered first. Runs the server until SIGTERM."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flash_rt.errors import FlashRTError  # noqa: E402
from flash_rt.serving.cli import add_serve_parser  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] == "--servetest":
        from serving_testmodel import CONFIG, TARGET

        from flash_rt.hardware import register

        register(CONFIG, "torch", "cpu", TARGET, distribution="tests")
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="flashrt")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except FlashRTError as exc:
        print(f"flashrt serve: error: {exc}", file=sys.stderr)
        sys.exit(2)
