"""``fedct predict``: segment new CT with a trained (registered) model.

Steps, one module each: ``inputs`` (a DICOM series folder or a NIfTI volume -> HU image,
with the checks a consumer needs), ``segment`` (the model card's preprocessing, MC dropout,
uncertainty, back to the input's grid, per-structure summary and failure flag: pure
functions), ``outputs`` (NIfTI, JSON, DICOM SEG writers) and ``predict`` (the command).
"""
