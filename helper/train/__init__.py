"""Training: the engine (the epoch loop), the losses, the lr schedules, the hooked features, evaluation (Acc, ASR),
the perturbation searches, the per-epoch diagnostics. Imports ``helper.run`` and ``helper.data``."""
