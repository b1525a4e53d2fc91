#!/usr/bin/env python
"""Run the `ranking` study (search_spaces/ranking.toml) on Ray Tune. `--help` lists the flags."""

import sys

from iqa_ray.cli.tune import main

if __name__ == "__main__":
    sys.exit(main(study="ranking"))
