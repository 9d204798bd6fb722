"""The ``gradproj`` command: train, compare and memory (see ``docs/cli.md``).

Library entry points: :func:`gradproj.train.loop.train` with a :class:`gradproj.train.loop.TrainConfig`,
:func:`gradproj.train.compare.compare`, and :func:`gradproj.memory_estimate.estimate_memory`. Modules are
imported on first use, so ``import gradproj.train.models`` stays light.
"""
