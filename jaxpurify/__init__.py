"""jaxpurify: backdoor attacks on pre-trained image encoders and defenses, in JAX/Flax.

`jaxpurify.losses` is importable on its own (no CLI, no data code) by other JAX projects.
"""

__version__ = "0.1.0"
