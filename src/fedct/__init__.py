"""fedct: federated learning on multi-hospital CT, from DICOM archive to model registry."""
