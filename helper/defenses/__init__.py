"""The defenses of the engine, by name: ``python distri.py --defense NAME``. A new one is a file here and a line below."""
from helper.defenses.abd import ABD
from helper.defenses.asd import ASD, KD
from helper.defenses.bcu import BCU
from helper.defenses.clp import CLP
from helper.defenses.fineprune import FinePrune
from helper.defenses.finetune import FineTune
from helper.defenses.ibau import IBAU
from helper.defenses.nad import NAD
from helper.defenses.nc import NC
from helper.defenses.renofeation import Renofeation
from helper.defenses.sau import SAU

DEFENSES = {cls.name: cls for cls in (ASD, KD, BCU, NAD, FineTune, ABD, CLP, FinePrune, IBAU, SAU, NC,
                                     Renofeation)}
