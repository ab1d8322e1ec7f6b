"""The ``flashrt`` command. Model packages add subcommands (demo, bench, serve,
make-checkpoint) through the ``flashrt_cli_commands`` hook."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from importlib import metadata

import flash_rt
from flash_rt.errors import FlashRTError


def _version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cuda_summary() -> str:
    if importlib.util.find_spec("torch") is None:
        return "torch not installed"
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        return f"torch {torch.__version__}, no CUDA device"
    major, minor = torch.cuda.get_device_capability(0)
    return (
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)} "
        f"(sm_{major}{minor})"
    )


def _kernels_summary() -> str:
    if importlib.util.find_spec("flashrt_kernels") is None:
        return "not installed (pip install flashrt-kernels)"
    try:
        import flashrt_kernels  # noqa: PLC0415
    except Exception as exc:  # an installed but broken build is worth reporting, not raising
        return f"installed but failed to import: {type(exc).__name__}: {exc}"
    archs = getattr(flashrt_kernels, "built_archs", lambda: "?")()
    return f"{getattr(flashrt_kernels, '__version__', '?')} (built for {archs})"


def cmd_info(args) -> int:
    from flash_rt.hardware import detect_arch, registered_routes  # noqa: PLC0415

    try:
        arch = detect_arch()
    except FlashRTError as exc:
        arch = f"unsupported ({exc})"
    print(f"flash_rt         {flash_rt.__version__}")
    print(f"python           {platform.python_version()} ({sys.executable})")
    print(f"cuda             {_cuda_summary()}")
    print(f"arch             {arch}")
    print(f"flashrt-kernels  {_kernels_summary()}")
    routes = registered_routes()
    print(f"frontends        {len(routes)} registered")
    for (config, framework, route_arch), info in sorted(routes.items()):
        mark = "measured" if info.measured else "unmeasured"
        here = " <- this machine" if route_arch == arch else ""
        print(f"  {config:<14} {framework:<6} {route_arch:<10} {info.distribution:<22} {mark}{here}")
    return 0


def cmd_plugins(args) -> int:
    from flash_rt.hardware import _CONFLICTS, registered_routes  # noqa: PLC0415
    from flash_rt.plugins import plugin_records  # noqa: PLC0415

    records = plugin_records()
    routes = registered_routes()
    if not records:
        print("no plugins installed (entry-point group 'flash_rt.plugins')")
    for record in records:
        state = "ok" if record.error is None else f"FAILED: {type(record.error).__name__}: {record.error}"
        print(f"{record.name:<12} {record.distribution:<24} {_version_of(record.distribution):<10} {record.value}  {state}")
        for key, info in sorted(routes.items()):
            if info.distribution == record.distribution:
                print(f"    {key[0]}/{key[1]}/{key[2]}")
    for key, dists in sorted(_CONFLICTS.items()):
        print(f"CONFLICT {key}: claimed by {' and '.join(dists)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashrt", description="FlashRT realtime VLA inference")
    parser.add_argument("--version", action="version", version=f"flash_rt {flash_rt.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = subparsers.add_parser("info", help="versions, detected arch, kernels, registered frontends")
    info.set_defaults(func=cmd_info)
    plugins = subparsers.add_parser("plugins", help="installed plugins and what each registers")
    plugins.set_defaults(func=cmd_plugins)

    # Built-in commands whose code lives in core (shared by several model packages).
    from flash_rt.models.pi_make_checkpoint import add_make_checkpoint_parser  # noqa: PLC0415
    from flash_rt.plugins import plugin_manager  # noqa: PLC0415
    from flash_rt.serving.cli import add_serve_parser  # noqa: PLC0415

    add_make_checkpoint_parser(subparsers)
    add_serve_parser(subparsers)
    plugin_manager().hook.flashrt_cli_commands(subparsers=subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except FlashRTError as exc:
        print(f"flashrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
