"""Training: arguments, collators, the teacher and distillation Trainers, callbacks."""
