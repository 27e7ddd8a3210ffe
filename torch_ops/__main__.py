"""``python -m torch_ops convert|inspect ...`` (see torch_ops/cli.py)."""
from .cli import main

raise SystemExit(main())
