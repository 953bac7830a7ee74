"""The original project's released checkpoints (notebook 05b, ``kpnb sample``).

:mod:`.lightning` (a Lightning ``.ckpt`` read without running its pickle), :mod:`.vq` (the taming VQGAN into
kpnb's VQ model and back), :mod:`.ldm` (the keypoint LDM into kpnb's and back), :mod:`.common` (where the files
go, the import report).

May import the layers below it: core, poses, synth, models, data, diffusion, evaluate, train, tuning.
"""
