#!/usr/bin/env python
"""Run any study on Ray Tune: ``python launch/tune.py --study search_spaces/my_study.toml``."""

import sys

from iqa_ray.search.launcher import main

if __name__ == "__main__":
    sys.exit(main())
