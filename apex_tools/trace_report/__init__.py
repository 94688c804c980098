"""`apex-serve trace-report`: an overlap timeline, a Chrome trace and a summary table from the scheduler's
iteration spans (DESIGN §8). The entry point is `apex_tools.trace_report.cli.main`; this package's
`__init__` stays import-light so the OTLP receiver can use `spans` and `otlp` without matplotlib."""
