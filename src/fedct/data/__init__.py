"""Prepared cases: preprocessing, the case files, the cohort's selections, the label set."""
