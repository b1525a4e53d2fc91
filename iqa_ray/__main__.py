"""``python -m iqa_ray SUBCOMMAND``: the ``iqa-ray`` command (:mod:`iqa_ray.cli`)."""

import sys

from iqa_ray.cli import main

sys.exit(main())
