"""The defenses of the engine, by name: ``python distri.py --defense NAME``.

A defense is one file here whose class carries ``@register_defense`` (``helper.defenses.base``): every module of
this folder is imported below, so a new file is all a new defense needs (docs/adding.md). ``DEFENSES`` maps each
name to its class; the parser, ``distri.py --help``, the table's names and reproduce.py read it.
"""
import importlib
import pkgutil

from helper.defenses.base import DEFENSES, Defense, register_defense

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "options"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DEFENSES", "Defense", "register_defense"]
