"""The attacks that make a teacher: ADBA (``adba``), BadNets / Blended / clean (``poison``), each registered in
``ATTACKS`` (``helper.attacks.base``; every module here is imported below), and adba.py's parser (``options``).
Imports run, data, train and report."""
import importlib
import pkgutil

from helper.attacks.base import ATTACKS, register_attack

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "options", "common"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ATTACKS", "register_attack"]
