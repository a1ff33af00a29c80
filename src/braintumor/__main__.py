"""``python -m braintumor`` (and ``torchrun -m braintumor``) runs the command line."""

from .cli import main

main()
