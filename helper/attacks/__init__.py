"""The attacks that make a teacher: ADBA (``adba``), BadNets / Blended / clean (``poison``), and adba.py's parser
(``options``). Imports run, data, train and report."""
