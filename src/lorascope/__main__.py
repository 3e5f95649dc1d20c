"""`python -m lorascope ...` (also what `accelerate launch -m lorascope train ...` runs)."""

from .cli import app

app()
