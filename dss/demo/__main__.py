"""``python -m dss.demo ROOT``: write the synthetic demo data set (``dss.demo.sample``; ``--help`` for its flags)."""

import sys

from dss.demo.sample import main

sys.exit(main())
