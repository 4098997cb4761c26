"""Training the Bayesian U-Net on one site's (or several sites') prepared cases."""
