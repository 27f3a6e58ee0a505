"""llmctl: GPTQ-quantize, evaluate, serve and benchmark open LLMs on one engine.

This module imports nothing, so `llmctl --help` starts without torch. The offline API:
`from llmctl.llm import LLM` and `from llmctl.sampling_params import SamplingParams`.
"""

__version__ = "0.1.0"
