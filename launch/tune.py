#!/usr/bin/env python
"""Run any study on Ray Tune: ``python launch/tune.py --study search_spaces/my_study.toml``."""

import sys

from iqa_ray.cli.tune import main

if __name__ == "__main__":
    sys.exit(main(prog="launch/tune.py", require_study=True))
