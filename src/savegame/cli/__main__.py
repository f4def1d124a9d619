"""``python -m savegame.cli``: the same as the ``savegame`` command."""

from savegame.cli import main

main(prog_name="savegame")
