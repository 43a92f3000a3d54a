"""Data: the datasets and the batch augmentation, the trigger ``x * (1 - m) + p * m`` and what it does to images
(PSNR, SSIM: ``metrics``), and the teacher folder (checkpoint.pkl, pattern.pt, mask.pt). Imports ``helper.run`` only."""
