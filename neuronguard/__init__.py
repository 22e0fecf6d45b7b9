"""NeuronGuard: an inference-time guard for LLMs built on safety neurons."""

__version__ = "0.1.0"
