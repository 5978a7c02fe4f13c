"""The learning scenario suite: scenario files, their checks and the runner (see run.py)."""
