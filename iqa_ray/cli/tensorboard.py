"""``iqa-ray tensorboard EXPERIMENT [--start]``: the TensorBoard command for a search (or the
server itself), bound to 127.0.0.1 unless ``--host`` says otherwise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iqa_ray.search.tensorboard import DEFAULT_HOST, start_tensorboard, stop_tensorboard, tensorboard_command


def main(argv: list[str] | None = None, prog: str = "iqa-ray tensorboard") -> int:
    p = argparse.ArgumentParser(prog=prog, description=(
        "Print (or run, with --start) the TensorBoard command for a search experiment folder: per-epoch "
        "scalars of every trial and the HParams dashboard. Binds 127.0.0.1 unless --host is given."))
    p.add_argument("experiment_dir", help="the experiment folder (STORAGE/NAME), or a folder of experiments")
    p.add_argument("--start", action="store_true", help="start TensorBoard and serve until Ctrl+C")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 6006 when printing, a free one with --start)")
    args = p.parse_args(argv)
    directory = Path(args.experiment_dir).expanduser()
    if not directory.is_dir():
        print(f"error: {directory} is not a folder", file=sys.stderr)
        return 2
    if not args.start:
        print(tensorboard_command(directory.resolve(), host=args.host, port=args.port))
        return 0
    proc, url = start_tensorboard(directory.resolve(), port=args.port or 0, host=args.host)
    print(f"TensorBoard for {directory.resolve()} at {url}/ (Ctrl+C to stop)", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_tensorboard(proc)
    return 0
