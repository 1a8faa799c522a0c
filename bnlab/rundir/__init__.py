"""A run's directory: its files written safely, its checkpoints verified, its records kept.

`workdir.WorkDir` is the one object the engine talks to; its docstring holds
the layout of a run's directory and what bnlab guarantees about it. The
modules, one concern each:
  workdir      WorkDir: opens, locks and closes the directory; delegates the rest
  identity     config.json and data.json: whether a rerun may resume the run
  records      metrics.jsonl, summary.json, TensorBoard events
  checkpoints  orbax's checkpoints, sealed with checksums and verified
  files        safe writes: atomic, never through a link, moved aside
  errors       WorkDirError, and the words of a failed read or write
  strict_json  NaN and infinity in strict JSON
  per_image    which test images an evaluation got right, as record text
  locks        one process at a time on a directory
  signals      Ctrl-C held off while a checkpoint is written; SIGTERM, SIGUSR1, SIGHUP stop a run
               at a step boundary with a checkpoint
  logs         other libraries' log chatter filtered out
"""
