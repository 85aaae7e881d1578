"""Operational tools, apart from the stages: audit, scheduled retrain, sweeps, presets, the tiny-data generator.

`python -m tools.<tool>`; each reads what the stages wrote (and DVC and git), never a stage module.
"""
