"""Data: the datasets and the batch augmentation, the trigger ``x * (1 - m) + p * m`` and the teacher folder
(checkpoint.pkl, pattern.pt, mask.pt). Imports ``helper.run`` only."""
