"""Reporting: plots, the summary tables, aggregation over seeds, attention maps, the figure commands
(``python -m helper.report.figures``), the diagnostics table (``python -m helper.report.diagnostics``) and the
precision measurement. Imports run, data and train."""
