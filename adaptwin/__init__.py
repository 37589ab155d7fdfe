"""adaptwin: workload replay, digital twin and online configuration learning for multi-LoRA vLLM serving.

This package holds the CLI, the record schemas, configuration, Kafka helpers and logging; the parts
(ingest, twin, replay, learner, dashboard, profiler) install as its subpackages.
"""

__version__ = "0.1.0"
