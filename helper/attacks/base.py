"""What an attack is to adba.py: a name, one line of help, its own flags, the defaults it puts over the parser's,
its own rules and ``run(args)``.

An attack is one file of this folder whose ``run`` carries ``@register_attack(NAME, help=..., options=...,
defaults=...)``
(once per name it serves: poison.py's ``run`` makes badnets, blended and none); ``helper.attacks`` imports every
file here, so ``adba.py --attack NAME`` and reproduce.py know it (docs/adding.md).
"""
from dataclasses import dataclass, field
from typing import Callable

ATTACKS = {}  # name -> Attack, filled by @register_attack as helper/attacks/__init__.py imports each file


@dataclass(frozen=True)
class Attack:
    name: str
    help: str                  # one line: what the teacher it makes carries (adba.py --help lists them)
    run: Callable              # run(args, out=print) -> the teacher's metrics; writes the teacher folder
    defaults: dict = field(default_factory=dict)  # values of adba.py's flags for this attack; a given flag wins
    check: Callable = None     # check(args): the attack's own rules on adba.py's flags (a UserError), before any folder
    options: tuple = ()        # its own flags (helper.run.cli.Option): adba.py's group "Attack NAME", their ranges checked


def register_attack(name, help, defaults=None, check=None, options=()):
    """Decorator of an attack's ``run``: ``adba.py --attack name``; a name is registered once."""
    def register(run):
        if name in ATTACKS and ATTACKS[name].run is not run:
            raise ValueError(f"--attack {name} is registered twice")
        ATTACKS[name] = Attack(name, help, run, dict(defaults or {}), check, tuple(options))
        return run
    return register
