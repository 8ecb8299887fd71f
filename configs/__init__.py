"""Experiment configs: `configs/<method>.py` each define get_config(arg)."""
