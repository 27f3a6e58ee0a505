"""The offline API, as in vLLM: `LLM(model="default", **engine_args).generate(prompts, params)`.

    from llmctl.llm import LLM
    from llmctl.sampling_params import SamplingParams
    llm = LLM("default", max_model_len=2048)
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    print(outs[1].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

from llmctl.config import EngineConfig
from llmctl.engine.llm_engine import LLMEngine, ProgressCallback
from llmctl.engine.outputs import RequestOutput
from llmctl.engine.scoring import PromptScorer, concat_scores, target_logprobs
from llmctl.errors import InvalidRequestError
from llmctl.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int]


class LLM:
    """An engine run to completion for a batch of prompts. Engine arguments are the fields
    of ModelConfig / CacheConfig / SchedulerConfig / ParallelConfig (dtype, device,
    max_model_len, block_size, kv_cache_memory, gpu_memory_utilization,
    enable_prefix_caching, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill,
    ...), plus load_format ("auto" | "dummy") and progress (a callback)."""

    def __init__(self, model: str = "default", **engine_args) -> None:
        self.engine = LLMEngine.from_engine_args(model, **engine_args)
        self._ids = itertools.count()

    @classmethod
    def from_engine_config(cls, config: EngineConfig, load_format: str = "auto",
                           progress: ProgressCallback | None = None) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config, load_format=load_format, progress=progress)
        llm._ids = itertools.count()
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.arch.vocab_size

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_finished: Callable[[int], None] | None = None) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. `on_finished(k)` is told of each k newly
        finished requests (for a progress bar)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.engine.default_sampling_params()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        # only finished outputs are kept here: the engine need not build the others
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        outs = self._run(ids, lambda rid, i: self.engine.add_request(rid, prompts[i], params[i]), on_finished)
        return [outs[rid] for rid in ids]

    def score(self, prompts: Sequence[list[int]], score_from: int | Sequence[int] = 1,
              scorer: PromptScorer | None = None,
              on_finished: Callable[[int], None] | None = None) -> list[dict]:
        """Score prompt tokens through the engine (batched, paged KV, the same kernels as serving).

        For each prompt (token ids), tokens `score_from`.. are scored on the full-vocabulary
        log-probs of their prediction; `scorer` (default: `target_logprobs`, each token's
        log-prob and whether it is the argmax) reduces each chunk of rows on the device. Returns
        per prompt a dict of CPU tensors, one row per scored token."""
        prompts = [list(p) for p in prompts]
        starts = [score_from] * len(prompts) if isinstance(score_from, int) else list(score_from)
        if len(starts) != len(prompts):
            raise InvalidRequestError(f"score_from: {len(starts)} given for {len(prompts)} prompts")
        params = SamplingParams(temperature=0.0, max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)
        ids = [f"score-{next(self._ids)}" for _ in prompts]
        outs = self._run(ids, lambda rid, i: self.engine.add_request(
            rid, prompts[i], params, scorer=scorer or target_logprobs, score_from=starts[i]), on_finished)
        return [concat_scores(outs[rid].prompt_scores or []) for rid in ids]

    def _run(self, ids: list[str], add: Callable[[str, int], None],
             on_finished: Callable[[int], None] | None) -> dict[str, RequestOutput]:
        """Add request i as ids[i], step until all finish, and return their final outputs; a
        failed request raises its error, and any error aborts the others."""
        finished: dict[str, RequestOutput] = {}
        try:
            for i, request_id in enumerate(ids):
                add(request_id, i)
            while self.engine.has_unfinished_requests():
                done = [o for o in self.engine.step() if o.finished]
                for out in done:
                    if out.error is not None:
                        raise out.error
                    finished[out.request_id] = out
                if done and on_finished:
                    on_finished(len(done))
        except BaseException:
            self.engine.abort_request(ids)
            raise
        return finished

    def hf_model_spec(self) -> dict:
        """How transformers would load the same model (the bench baselines use it)."""
        arch = self.engine.arch
        spec = {"name": self.engine.model_name, "model_dir": str(self.engine.model_dir) if self.engine.model_dir else None,
                "dtype": str(self.engine.dtype).removeprefix("torch."), "device": str(self.engine.device),
                "arch_config": None, "quantization": "gptq" if arch.is_gptq else None}
        if self.engine.load_format == "dummy":
            spec["arch_config"] = {
                "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
                "num_hidden_layers": arch.num_hidden_layers, "num_attention_heads": arch.num_attention_heads,
                "num_key_value_heads": arch.num_key_value_heads, "head_dim": arch.head_dim,
                "max_position_embeddings": arch.max_position_embeddings, "rms_norm_eps": arch.rms_norm_eps,
                "rope_theta": arch.rope_theta, "tie_word_embeddings": arch.tie_word_embeddings,
            }
        return spec

    def shutdown(self) -> None:
        """Release the KV cache and the model (their memory goes back to the device)."""
        self.engine.release()
