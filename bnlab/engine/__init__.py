"""The training engine: one run or a vmapped group of runs, from a config to a work directory.

`train.train_and_evaluate(config, workdir)` is the entry point; the other
modules are its parts: `state`, `optim`, `steps`, `members` (grouped steps),
`loop` (the step loop), `schedule` (when things happen), `calls` (the compiled
calls), `resume` (where a resumed run picks up), `collapse`, `progress`,
`evaluation`, `timesplit`, and the process set-up (`backend`, `distributed`,
`provenance`).
"""
