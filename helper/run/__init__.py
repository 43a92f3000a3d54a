"""A run's life: errors, device and precision set-up, the run folder and its logs, checkpoints, resume, interrupt,
and the flag groups every entry script shares. Imports nothing else of the package."""
