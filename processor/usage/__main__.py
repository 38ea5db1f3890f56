"""``python -m processor.usage``: the usage server process the worker starts (``_serve.py``)."""

from processor.usage._serve import _main

_main()
