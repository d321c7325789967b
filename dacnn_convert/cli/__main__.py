"""``python -m dacnn_convert.cli`` (what torchrun launches)."""

from . import main

main()
