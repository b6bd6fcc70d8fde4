"""The ``fairbus`` command line (typer). Each sub-command lives in its own module."""
