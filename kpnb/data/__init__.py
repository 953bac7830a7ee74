"""Data: candidate pools, the filter, and the kept subset (notebook 01; every later notebook reads the subset).

:mod:`.folder` (dataset folders in the release layout, splits, bad files reported and skipped), :mod:`.filtering`
(the tags, image, pose and CLIP stages and their report), :mod:`.subset` (the kept subset as ``.npz`` or
memory-mapped ``.npy``), :mod:`.real_poses` (the COCO real-pose set), :mod:`.danbooru` (Danbooru2021 read in
place), :mod:`.shards` (``kpnb data pack``: WebDataset shards), :mod:`.stream_filter` (the filter shard by
shard, resumable, ranks under torchrun).

May import :mod:`kpnb.core`, :mod:`kpnb.poses`, :mod:`kpnb.synth` and :mod:`kpnb.models`.
"""
