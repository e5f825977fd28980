"""Optuna sweeps over the student's distillation settings (imports kdlib, never the reverse)."""
