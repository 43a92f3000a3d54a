"""A run's life (``lifecycle``: open or resume, last.pt, the stop): errors, device and precision set-up, the run folder
and its logs, checkpoints, resume, interrupt, the flag groups every entry script shares and the ``Option`` a method
declares its own flags with. Imports nothing else of the package."""
