"""``captioner encoders``: what the registries hold."""

from __future__ import annotations

import argparse


def cmd_encoders(a: argparse.Namespace) -> int:
    from captioner.models import ATTENTIONS, ENCODERS

    print("encoders:   " + ", ".join(ENCODERS.names()))
    for prefix, usage in ENCODERS.families().items():
        print(f"  {prefix + '/':<11} {usage}")
    print("attention:  " + ", ".join(ATTENTIONS.names()))
    return 0


def register(subparsers) -> None:
    e = subparsers.add_parser("encoders", help="list registered encoders, encoder families and attention types")
    e.set_defaults(func=cmd_encoders)
