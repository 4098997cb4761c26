"""The segmentation model: Bayesian U-Net (``unet``), the network of a training
configuration (``factory``), MC-dropout sampling (``mc``), save/load as safetensors with its
model card (``io``), and MLflow's loader (``pyfunc``)."""
