"""llmctl: GPTQ-quantize, evaluate, serve and benchmark open LLMs on one engine.

The offline API, as vLLM spells it: `from llmctl import LLM, SamplingParams`. The names load on
first use, so `import llmctl` (and `llmctl --help`) starts without torch. No module of the
package imports this one: it sits above all of them (docs/architecture.md).
"""

from llmctl.version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from llmctl.llm import LLM

        return LLM
    if name == "SamplingParams":
        from llmctl.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'llmctl' has no attribute {name!r}")
