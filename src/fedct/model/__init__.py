"""The segmentation model: Bayesian U-Net (``unet``), MC-dropout sampling (``mc``), and
save/load with its model card (``io``)."""
