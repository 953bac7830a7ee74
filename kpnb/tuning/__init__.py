"""CLIP-guided tuning of generated images (notebook 06).

:mod:`.clip_tuning` (VQGAN-CLIP-style: move a VQ latent towards a text prompt under a latent mask, one function
per loss term, a second pose estimator holding the pose).

May import the layers below it: core, poses, synth, models, data, diffusion, evaluate, train.
"""
