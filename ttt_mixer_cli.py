"""The ``ttt-mixer`` command's entry point. It lives outside the ``ttt_mixer`` package because
importing anything inside it runs ``ttt_mixer/__init__.py``, whose imports (fla, torch,
transformers) take seconds: with ``library_deferred`` set here first, the package (and
``ttt_mixer.adapters``, whose mixer registry swap's help reads) skips them, the command line is read,
and ``ttt_mixer.cli`` imports the library only for a command that needs it."""

from __future__ import annotations

# read by ttt_mixer/__init__.py; set only by main(), so a process that merely imports this module
# (a worker that multiprocessing's spawn starts from the ttt-mixer script) imports the library as usual
library_deferred = False


def main(argv: list[str] | None = None) -> None:
    global library_deferred
    library_deferred = True
    from ttt_mixer.cli import main as cli_main

    cli_main(argv)
