"""The segmentation model: Bayesian U-Net (``unet``), MC-dropout sampling (``mc``),
save/load as safetensors with its model card (``io``), and MLflow's loader (``pyfunc``)."""
