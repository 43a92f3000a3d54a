"""What the entry scripts run: a defense run (``distill``), the re-tuning test, the scan, the table runner
(``reproduce``, ``grid``), the demo, the benchmark (``bench``, ``profile``, ``reference``). The top of the package."""
