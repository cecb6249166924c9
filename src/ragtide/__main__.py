"""`python -m ragtide` runs the CLI."""

from ragtide.cli import main

main()
