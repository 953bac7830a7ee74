"""Training: the one loop every model uses, its checkpoints, and each model's training (notebooks 03, 04, 06, 07).

:mod:`.loop` (batches from (seed, step), DDP slices, progress, metrics CSV, exact resume, NaN guard),
:mod:`.checkpoints` (safetensors plus a JSON of step, config and optimiser state, written atomically; loading a
trained model), and one module per model: :mod:`.vq`, :mod:`.ldm`, :mod:`.estimator`, :mod:`.clip`,
:mod:`.attributes`, :mod:`.transformer`.

May import the layers below it: core, poses, synth, models, data, diffusion, evaluate.
"""
