"""The bottom layer: what every other layer shares, with no model or notebook logic in it.

:mod:`.files` (atomic writes, JSON and metrics files, safetensors; nothing unpickled), :mod:`.settings` (the
presets, ``BASE`` and small deltas, and the overrides people pass, checked at every depth), :mod:`.runtime`
(device, precision, ``torch.compile``, DataLoader workers, threads, ranks under torchrun), :mod:`.progress`
(tqdm bars that also write text lines for a headless run), :mod:`.images` (uint8 arrays <-> [-1, 1] tensors).

Imports no other kpnb module. Every notebook reads its settings and writes its metrics through it.
"""
