"""Measurements of what the models make (notebooks 03 to 07; training scores validation with them, which is
why this layer sits below :mod:`kpnb.train`). How every number is defined: docs/metrics.md.

:mod:`.pose` (PCK and COCO keypoint AP, the estimator's ceiling, a generator's pose fidelity), :mod:`.quality`
(FID and KID in a feature space, head crops, sample diversity), :mod:`.vq` (reconstruction PSNR, codebook
use), :mod:`.clip` (zero-shot accuracy, the attribute classifier's accuracy).

May import the layers below it: core, poses, synth, models, data, diffusion.
"""
