"""What the `retrieval` and `classify` command lines share: usage errors reported by the
subcommand that owns the bad argument, and a quiet exit when stdout is a closed pipe."""
from __future__ import annotations

import argparse
import os
import signal
import sys

# What a shell reports for a Unix tool killed by SIGPIPE (128 + 13), e.g. for `yes` in
# `yes | head -1`: scripts running under `set -o pipefail` see the same status from us.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that reports arguments it does not know itself.

    argparse gives a subcommand's parser everything after the subcommand's name and
    leaves the arguments nobody recognised to the top-level parser, which reports them
    with the top-level usage; the user then does not see the options of the command
    they typed.
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def add_subcommands(parser: argparse.ArgumentParser, **kwargs) -> argparse.Action:
    """`parser.add_subparsers(**kwargs)` whose subcommands report a bad flag with their own usage."""
    return parser.add_subparsers(parser_class=_SubcommandParser, **kwargs)


def stdout_closed() -> int:
    """Exit status, printing nothing, once stdout turned out to be a closed pipe
    (`retrieval info IDX | head -2`).

    Unix tools die of SIGPIPE there, silently. Python ignores SIGPIPE (so that a client
    closing a socket of `retrieval serve` is an exception, not the server's death), so
    the commands catch BrokenPipeError and exit with the status the shell would report
    for such a tool. stdout is pointed at /dev/null first, or the interpreter's final
    flush would fail again and print a traceback.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE
