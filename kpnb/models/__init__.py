"""The networks: ``nn.Module`` classes, their configs and how to build and load them; no training loop here.

:mod:`.vq` (the f4/f8/f16 VQ autoencoders: encoder, quantiser, decoder; notebook 03), :mod:`.unet` (the
conditional UNet of the diffusion model; 04), :mod:`.pose_net` (the heatmap keypoint estimator, the PCK judge;
04, 05), :mod:`.clip` (open_clip: a local pretrained file or the small domain CLIP; 06), :mod:`.attributes`
(the attribute classifier that judges CLIP tuning; 06), :mod:`.transformer` (the GPT over f16 codes; 07).

May import :mod:`kpnb.core`, :mod:`kpnb.poses` and :mod:`kpnb.synth` (the attribute classifier's labels are
the synthetic dataset's vocabulary).
"""
