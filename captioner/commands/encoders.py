"""``captioner encoders``: what the registries hold."""

from __future__ import annotations

import argparse


def cmd_encoders(a: argparse.Namespace) -> int:
    from captioner.models import ATTENTIONS, ENCODERS

    print("encoders:   " + ", ".join(ENCODERS.names()))
    print("attention:  " + ", ".join(ATTENTIONS.names()))
    return 0


def register(subparsers) -> None:
    e = subparsers.add_parser("encoders", help="list registered encoders and attention types")
    e.set_defaults(func=cmd_encoders)
