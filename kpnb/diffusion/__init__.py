"""Keypoint-conditioned latent diffusion (notebooks 04 and 05).

:mod:`.schedule` (the noise schedule and one DDIM step, tied to the equations; eps or v prediction converted in
one place), :mod:`.ldm` (the keypoint LDM: the UNet with the pose conditioner and the schedule; latents and
their cache), :mod:`.sampling` (the DDIM loop, with guidance, its interval of timesteps, and inpainting).

May import :mod:`kpnb.core`, :mod:`kpnb.poses`, :mod:`kpnb.synth`, :mod:`kpnb.models` and :mod:`kpnb.data`.
"""
