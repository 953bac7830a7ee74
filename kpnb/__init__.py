"""kpnb: a workbook for keypoint-conditioned anime illustration generation (see README.md)."""
import os
import sys

# OpenMP threads that sleep when they wait instead of spinning: with another busy process on the cores, torch
# then slows by that process's share instead of 10x or more (README, "Timing"). libgomp reads this when torch
# loads, so it only takes effect when kpnb is imported first (the notebooks do; `kpnb run` sets it for the kernel).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
