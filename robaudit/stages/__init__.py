"""Glue between the scan pipeline and the measurement libraries.

`robaudit.certify` and `robaudit.measures` compute; each stage here decides whether a
scan can afford that work, checks the results against what the scan already knows,
and turns them into report data.
"""
