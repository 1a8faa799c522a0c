"""A run's directory: its files written safely, its checkpoints verified, its records kept.

`workdir.WorkDir` is the one object the engine talks to.
"""
