#!/usr/bin/env python
"""Run the `efficiency` study (search_spaces/efficiency.toml): accuracy against latency on Ray Tune. `--help` lists the flags."""

import sys

from iqa_ray.cli.tune import main

if __name__ == "__main__":
    sys.exit(main(study="efficiency"))
