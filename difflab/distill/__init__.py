"""Few-step students by distillation: the math (targets.py), the losses (losses.py), the run kind and the command's
work (student.py)."""
