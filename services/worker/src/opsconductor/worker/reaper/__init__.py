"""``python -m opsconductor.worker.reaper``: the reaper command (see ``logic.reaper``)."""
