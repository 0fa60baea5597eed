"""Command groups of the ``comfyfleet`` CLI, one module each (wired in ``cli.py``)."""
