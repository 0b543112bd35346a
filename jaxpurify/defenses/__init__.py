"""Defenses against backdoored encoders: the distillation defense (its step in `distill`, its stages in `stages`)."""
