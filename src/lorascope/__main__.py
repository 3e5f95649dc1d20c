"""`python -m lorascope ...` (also what `accelerate launch -m lorascope train ...` runs)."""

from lorascope.cli import app

app()
