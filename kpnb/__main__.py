"""``python -m kpnb``: the ``kpnb`` command (also ``torchrun -m kpnb train ...``)."""
import sys

from kpnb.cli import main

sys.exit(main())
