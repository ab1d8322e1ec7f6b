"""Hook implementations. flash_rt imports this module lazily (entry point group
``flash_rt.plugins``); keep it light: name the frontend by "module:Class", don't import it."""

from flash_rt.hardware import ARCHS
from flash_rt.plugins import hookimpl


@hookimpl
def flashrt_register_frontends(register):
    # numpy runs anywhere, but only the CPU route has been measured.
    for arch in ARCHS:
        register("toy", "torch", arch, "flashrt_toy.frontend:ToyFrontend", measured=arch == "cpu")


@hookimpl
def flashrt_cli_commands(subparsers):
    parser = subparsers.add_parser("toy-make-checkpoint", help="write a random toy checkpoint")
    parser.add_argument("out", help="directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_make_checkpoint)


def _make_checkpoint(args) -> int:
    from flashrt_toy.model import write_checkpoint

    path = write_checkpoint(args.out, seed=args.seed)
    print(f"wrote {path}")
    return 0
