"""kpnb: a workbook for keypoint-conditioned anime illustration generation (see README.md)."""
__version__ = "0.1.0"
