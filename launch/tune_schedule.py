#!/usr/bin/env python
"""Run the `lr_schedule` study (search_spaces/lr_schedule.toml) on Ray Tune. `--help` lists the flags."""

import sys

from iqa_ray.cli.tune import main

if __name__ == "__main__":
    sys.exit(main(study="lr_schedule"))
