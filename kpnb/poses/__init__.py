"""Poses: the one pose type and everything about a pose that needs no image model (notebook 02; notebook 05's
pose files and completion; the conditioning of notebook 04's models).

:mod:`.pose` (:class:`~kpnb.poses.pose.Pose`: 17 COCO joints, visibility codes, flip, the original grid
tokeniser, drawing), :mod:`.formats` (release JSON, COCO keypoint annotations, OpenPose JSON in and out),
:mod:`.analysis` (plausibility features, nearest training poses, completion of unlabelled joints, the view),
:mod:`.conditioning` (the ``grid``, ``tokens`` and ``skeleton`` encoders that feed a pose to the UNet).

May import :mod:`kpnb.core`.
"""
