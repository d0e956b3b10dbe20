"""The ``vlscope`` command (installed by ``pip install .``): the app, and the ``python -m vlcore`` commands.

    vlscope app [streamlit options]      the Streamlit app on the bundled demo, from the installed package
    vlscope extract | trace | evaluate | faithfulness ...    the same as ``python -m vlcore ...``

``vlscope app`` runs ``python -m streamlit run <app folder>/streamlit_app.py`` in the current folder, with
the settings of the app's ``.streamlit/config.toml`` given as options (Streamlit reads that file only from
the current folder); options after ``app`` (``--server.port 8600``) come last and win.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

APP_HELP = "start the Streamlit app (the bundled demo model; streamlit options such as --server.port pass through)"


def _commands() -> dict[str, str]:
    """``python -m vlcore``'s subcommands and their one-line help, in its order."""
    import argparse

    from vlcore.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action.help or "" for action in sub._choices_actions}


def usage() -> str:
    """The top-level help of ``vlscope``."""
    rows = {"app": APP_HELP, **_commands()}
    width = max(map(len, rows))
    lines = [f"  {name:<{width}}  {text}" for name, text in rows.items()]
    return ("usage: vlscope {" + ",".join(rows) + "} ...\n\nVLScope: interpret vision-language transformers.\n\n"
            "commands:\n" + "\n".join(lines) + "\n\nRun vlscope <command> --help for a command's options.\n")


def config_options(config: Path) -> list[str]:
    """A Streamlit ``config.toml`` as command-line options (``--section.key=value``), [] when there is none.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "config.toml"
    >>> _ = path.write_text('[server]\\nmaxUploadSize = 50\\nrunOnSave = false\\n[client]\\ntoolbarMode = "viewer"\\n')
    >>> config_options(path)
    ['--server.maxUploadSize=50', '--server.runOnSave=false', '--client.toolbarMode=viewer']
    """
    if not config.is_file():
        return []
    options = []
    for section, values in tomllib.loads(config.read_text()).items():
        for key, value in values.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            options.append(f"--{section}.{key}={text}")
    return options


def app_command(extra: list[str]) -> list[str]:
    """The command that runs the app: the installed (or checked-out) main script and its settings."""
    from vlcore.app_files import APP_ROOT, MAIN_SCRIPT

    main = APP_ROOT / MAIN_SCRIPT
    return [sys.executable, "-m", "streamlit", "run", str(main),
            *config_options(APP_ROOT / ".streamlit" / "config.toml"), *extra]


def run_app(extra: list[str]) -> int:
    """Run the app until Streamlit exits (Ctrl-C stops it); returns its exit status.

    On POSIX this process becomes Streamlit (``os.execv``), so a signal sent to ``vlscope app`` stops the
    server itself rather than leaving it running as an orphan.
    """
    if extra[:1] in (["-h"], ["--help"]):
        sys.stdout.write(f"usage: vlscope app [streamlit run options]\n\n{APP_HELP}.\n"
                         f"Runs: {' '.join(app_command([]))}\n")
        return 0
    command = app_command(extra)
    if not Path(command[4]).is_file():
        sys.stderr.write(f"vlscope: error: the app's main script is missing ({command[4]}); reinstall VLScope "
                         "with pip install vlscope, or run streamlit run streamlit_app.py in a checkout\n")
        return 2
    if os.name == "posix":
        sys.stdout.flush()
        os.execv(command[0], command)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlscope`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from vlcore import __version__

        sys.stdout.write(f"vlscope {__version__}\n")
        return 0
    if argv[0] == "app":
        return run_app(argv[1:])
    if argv[0] not in _commands():
        sys.stderr.write(f"vlscope: error: unknown command {argv[0]!r}; choose one of "
                         f"{', '.join(['app', *_commands()])} (see vlscope --help)\n")
        return 2
    from vlcore.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
