"""kpnb: a workbook for keypoint-conditioned anime illustration generation (README.md says how to run it).

The notebooks in ``notebooks/`` are thin; the logic is here, one subpackage per stage of the study, in layers.
Lowest first, with the notebooks each layer serves::

    core       files, settings (the presets), runtime, progress, images        every notebook
    poses      the Pose type, pose files, analysis, conditioning encoders       02; 04, 05 (pose files, completion)
    synth      the procedural dataset, exact renders of poses                  01; 04 to 06 (renders, vocabulary)
    models     the networks: vq, unet, clip, attributes, transformer, pose_net 03 to 07
    data       dataset folders, the filter, Danbooru2021, shards, the subset   01; every later one reads the subset
    diffusion  the noise schedule, the keypoint LDM, DDIM sampling             04, 05
    evaluate   PCK and keypoint AP, FID/KID, VQ and CLIP scores                03 to 07
    train      the one training loop, checkpoints, each model's training       03, 04, 06, 07
    tuning     CLIP-guided tuning of VQ latents                                06
    original   the released checkpoints, read without running their pickles   05b and ``kpnb sample``
    run        run folders, stages, figures, report, status, widgets, sample,  every notebook (08: the report)
               bench
    cli        ``kpnb/cli.py``: the ``kpnb`` command, handing over to ``run``

The rule: a module imports only from its own layer and the layers before it, never from a higher one (imports
inside functions included), so there is no import cycle; ``tests/test_layout.py`` checks both. Imports are
absolute (``from kpnb.core.files import write_json``). Two placements follow from what imports what: ``synth``
sits below ``models`` because the attribute classifier and the pose estimator's renders need the dataset's
vocabulary, and ``evaluate`` sits below ``train`` because training scores validation with it.

This file imports nothing, so importing one subpackage loads only the layers it needs.
"""
__version__ = "0.1.0"
