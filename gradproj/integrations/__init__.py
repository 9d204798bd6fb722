"""gradproj inside the training stacks people already use.

* :mod:`gradproj.integrations.transformers`: ``create_optimizer(model, args)`` reads transformers'
  ``TrainingArguments`` (``optim="galore_adamw"`` ..., ``optim_target_modules``, ``optim_args``) and returns
  ``(optimizer, scheduler)`` for ``Trainer(..., optimizers=...)``.

accelerate, Lightning and PEFT need no adapter: see docs/integrations.md and the examples it links.
Nothing here is imported by ``import gradproj``; each module imports its library when it is used.
"""
