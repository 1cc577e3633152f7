"""``python -m engine.cli``: the same as ``engine-ctl``."""
import os

from engine.cli.main import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
main()
