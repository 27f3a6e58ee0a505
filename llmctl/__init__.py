"""llmctl: GPTQ-quantize, evaluate, serve and benchmark open LLMs on one engine."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import llmctl` (and `llmctl --help`) does not import torch.
    if name == "LLM":
        from llmctl.llm import LLM

        return LLM
    if name == "SamplingParams":
        from llmctl.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'llmctl' has no attribute {name!r}")
