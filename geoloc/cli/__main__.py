"""``python -m geoloc.cli`` (used by ``torchrun -m geoloc.cli train ...``)."""

from geoloc.cli import main

main()
