"""Reporting: plots, the summary tables, aggregation over seeds, attention maps, the figure commands
(``python -m helper.report.figures``) and the precision measurement. Imports run, data and train."""
