"""The chaos soak (issue 9): the whole system under a seeded storm of crashes, pauses and
outages, driven through the public API, with a verdict of what was lost (nothing).

``make chaos`` runs it full size; ``test_small_soak.py`` runs a small one inside ``make test``.
Modules: ``stack`` (the services, via the ``make run`` supervisor), ``workload`` (the plans and
how they are submitted), ``faults`` (the seeded fault schedule), ``verdict`` (the figures),
``driver`` (one run end to end).
"""
