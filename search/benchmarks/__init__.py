"""Benchmarks: the scripts behind the measured figures of reports/results.md, kept apart from the sweep itself.

``bench`` (the figures of the ``bench`` job), ``step_profile`` (where a student step's time goes),
``share_bench`` (trials sharing one device), ``trainer_recipe`` and ``side_by_side`` (the sweep
against the Hugging Face Trainer recipe), ``serve_latency`` (served models timed in turns) and
``cpu_parity`` (an exported model's answers on emulated CPUs). Each runs as
``python -m search.benchmarks.<name>``; ``ort_logits`` is the script ``cpu_parity`` runs under emulation.
"""
