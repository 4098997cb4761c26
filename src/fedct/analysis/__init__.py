"""The science of the study as pure functions: metrics, failure detection, shift."""
