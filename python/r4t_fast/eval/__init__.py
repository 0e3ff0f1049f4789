"""The evaluation room: metrics assembled from :mod:`r4t_fast.objectives`, bootstrap statistics, the
baselines (dense, MMR, DPP; the LLM fan-out baselines), ``r4t eval``, ``r4t report`` and ``r4t demo``.
"""
