"""The offline API's top-level names, as vLLM spells them, without torch at import time."""

import subprocess
import sys


def test_llm_and_sampling_params_import_from_the_package_root():
    import llmctl
    from llmctl import LLM, SamplingParams
    from llmctl.llm import LLM as LLM_
    from llmctl.sampling_params import SamplingParams as SamplingParams_

    assert LLM is LLM_ and SamplingParams is SamplingParams_
    assert set(llmctl.__all__) == {"LLM", "SamplingParams", "__version__"}


def test_importing_the_package_does_not_import_torch():
    code = "import sys, llmctl; assert llmctl.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
