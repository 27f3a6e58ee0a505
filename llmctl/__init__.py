"""llmctl: GPTQ-quantize, evaluate, serve and benchmark open LLMs on one engine."""

__version__ = "0.1.0"
