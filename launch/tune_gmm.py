#!/usr/bin/env python
"""Run the `gmm` study (search_spaces/gmm.toml) on Ray Tune. `--help` lists the flags."""

import sys

from iqa_ray.cli.tune import main

if __name__ == "__main__":
    sys.exit(main(study="gmm"))
