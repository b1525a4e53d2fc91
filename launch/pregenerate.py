#!/usr/bin/env python
"""Pre-generate a distorted IQA dataset once (``iqa-ray pregenerate``): `--help` lists the flags."""

import sys

from iqa_ray.cli.pregenerate import main

if __name__ == "__main__":
    sys.exit(main(prog="launch/pregenerate.py"))
