"""Trace replay: the openb trace model, the FGD-method arrival replay and its recorder."""
