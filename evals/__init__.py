"""The eval suite: datasets, decoding methods, a resumable sharded runner, metrics and reports.

``specdec eval`` (`evals.cli`) is the command line; the pieces are usable from Python (the
notebooks do): `evals.datasets.load`, `evals.methods.parse_methods` / `evals.methods.Method`,
`evals.runner.run_eval`, `evals.report.summarize` / `evals.report.write_reports`.
"""
