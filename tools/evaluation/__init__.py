"""``inspectd eval``: the evaluation protocol, its scoring, breakdowns, report and plots."""
