"""`LLMEngine`: the synchronous step loop. Requests in (`add_request`), one scheduled
batch per `step()`, cumulative `RequestOutput`s out. The HTTP server drives the same
object from one thread through `AsyncEngine`; the offline `LLM` drives it to the end.

    add_request ─► Scheduler.waiting        step():  schedule ─► ModelRunner.execute
                                                     ─► Scheduler.update_from_output
                                                     ─► detokenize, stop strings ─► outputs
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from llmctl.config import EngineConfig
from llmctl.engine.admission import AdmissionLimits, check_request
from llmctl.engine.block_manager import BlockManager
from llmctl.engine.engine_request import EngineRequest, step_state
from llmctl.engine.faults import engine_dead, execute_isolated, is_request_fault, request_error
from llmctl.engine.kv_budget import KVPlan, plan_kv
from llmctl.engine.model_runner import ModelRunner, ModelRunnerOutput
from llmctl.engine.outputs import RequestOutput
from llmctl.engine.scheduler import Scheduler, SchedulerOutput
from llmctl.engine.scoring import PromptScorer
from llmctl.engine.sequence import SequenceStatus
from llmctl.engine.stats import EngineStats, StepCounters
from llmctl.engine.step_batch import StepBatch, build_step_batch
from llmctl.engine.stop import model_eos_token_ids, read_generation_config, sampling_defaults
from llmctl.errors import ConfigError, InvalidRequestError
from llmctl.models.arch import resolve_dtype
from llmctl.sampling_params import RequestOutputKind, SamplingParams

# (event, info): "load" / "kv_plan" / "ready", info["message"] a line of text; "kv_plan"
# also carries info["plan"] (a KVPlan) so a CLI can draw the table. The engine never draws.
ProgressCallback = Callable[[str, dict], None]


class LLMEngine:
    def __init__(self, config: EngineConfig, load_format: str = "auto", progress: ProgressCallback | None = None) -> None:
        from llmctl.engine.loading import check_load_format
        from llmctl.models.loader import resolve_device

        self.config = config
        self.load_format = check_load_format(load_format)
        self.progress = progress or (lambda event, info: None)
        self.device = resolve_device(config.model.device)
        self.device_kind = "gpu" if self.device.type == "cuda" else "cpu"
        torch.manual_seed(config.model.seed)
        self.tp_runtime = None  # rank 0's handle on the other ranks (tensor_parallel_size > 1)
        try:
            self._start(config, self.load_format)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, config: EngineConfig, load_format: str) -> None:
        from llmctl.engine.loading import load_model_and_tokenizer

        tp = channel = None
        if config.parallel.tensor_parallel_size > 1:
            from llmctl.engine.distributed import device_for_rank, share_cpu_threads
            from llmctl.engine.worker_group import TensorParallelRuntime

            self.tp_runtime = TensorParallelRuntime(config, load_format)  # spawns ranks 1..N-1
            tp, self.device = self.tp_runtime.tp, device_for_rank(self.device, 0)
            if self.device.type == "cpu":
                share_cpu_threads(tp.size)
        where = f"{self.device}" + (f" (rank 0 of {tp.size})" if tp else "")
        self.progress("load", {"message": f"loading {config.model.model} ({load_format}) on {where}"})
        self.model, self.arch, self.tokenizer, self.model_name, self.model_dir = load_model_and_tokenizer(
            config.model, load_format, self.device, self.device_kind, lambda msg: self.progress("load", {"message": msg}),
            tp=tp)
        if self.tp_runtime is not None:
            channel = self.tp_runtime.join(self.device)
        self.dtype = getattr(torch, resolve_dtype(config.model.dtype, self.arch, self.device_kind))
        self.max_model_len = config.model.max_model_len or self.arch.max_position_embeddings
        if self.max_model_len > self.arch.max_position_embeddings:
            raise ConfigError(f"max_model_len: {self.max_model_len} exceeds the model's context length "
                              f"({self.arch.max_position_embeddings}, max_position_embeddings in config.json)")
        generation_config = read_generation_config(self.model_dir)
        # Every id that ends a sequence, and the model's recommended sampling (requests' defaults).
        self.eos_token_ids = model_eos_token_ids(self.tokenizer, self.arch.eos_token_id, generation_config)
        self.generation_defaults = sampling_defaults(generation_config)
        if self.generation_defaults:
            self.progress("load", {"message": "default sampling from generation_config.json: " + ", ".join(
                f"{k}={v}" for k, v in self.generation_defaults.items())})
        self.runner = ModelRunner(self.model, self.arch, self.device, self.dtype, config.cache.block_size,
                                  self.eos_token_ids, channel)
        self.runner.allocate_workspaces(config.scheduler.max_num_batched_tokens)  # counted in the KV plan below
        self.kv_plan = self._plan_kv_cache()
        self.runner.allocate_kv_cache(self.kv_plan.num_blocks)
        if self.device.type == "cuda" and not config.model.enforce_eager:
            self.runner.capture_graphs(self.max_model_len, config.scheduler.max_num_batched_tokens,
                                       config.scheduler.max_num_seqs, config.model.max_prefill_graph_tokens)
            decode, prefill = self.runner.decode_graphs, self.runner.prefill_graphs
            self.progress("load", {"message": f"CUDA graphs for decode batches {decode.sizes[0]}..{decode.sizes[-1]} "
                                              f"({len(decode.sizes)} sizes) captured in {decode.capture_seconds:.1f} s, "
                                              f"{decode.pool_bytes / 2**20:.0f} MiB"})
            if prefill is not None:
                self.progress("load", {"message": f"CUDA graphs for prefill steps of up to {prefill.max_tokens} tokens "
                                                  f"from up to {prefill.max_seqs} sequences ({len(prefill.graphs)} "
                                                  f"buckets) captured in {prefill.capture_seconds:.1f} s, "
                                                  f"{prefill.pool_bytes / 2**20:.0f} MiB"})
        if self.device.type == "cuda":
            self.runner.warm_up_sampler()
        self.block_manager = BlockManager(self.kv_plan.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.admission_limits = AdmissionLimits(self.arch.vocab_size, self.max_model_len,
                                                config.scheduler.max_num_seqs)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len, self.eos_token_ids)
        self._requests: dict[str, EngineRequest] = {}
        self._seq_to_request: dict[int, EngineRequest] = {}
        # Live requests with generators, prompt logprobs or a scorer: while none, a step looks none up.
        self._num_with_step_state = 0
        self.counters = StepCounters()
        self.progress("ready", {"message": f"engine ready: {self.kv_plan.num_blocks} KV blocks"})

    def on_fatal(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(error)` when the engine becomes unusable outside a step (a tensor-parallel
        rank died); called from a monitor thread."""
        if self.tp_runtime is not None:
            self.tp_runtime.on_death(callback)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (a no-op at tensor_parallel_size 1). Idempotent."""
        runtime, self.tp_runtime = self.tp_runtime, None
        if runtime is not None:
            runtime.shutdown()

    @classmethod
    def from_engine_args(cls, model: str = "default", load_format: str = "auto",
                         progress: ProgressCallback | None = None, **engine_args) -> "LLMEngine":
        """vLLM-style: `model` and keyword engine arguments (dtype=, max_model_len=,
        block_size=, kv_cache_memory="2GiB", max_num_seqs=, ...), resolved by `llmctl.settings`
        (which also reads a recipe given as `model`)."""
        from llmctl.settings import engine_flags, resolve

        return cls(resolve(model, engine_flags(engine_args)).engine, load_format=load_format, progress=progress)

    # ---- start-up --------------------------------------------------------------
    def _plan_kv_cache(self) -> KVPlan:
        """The KV budget of kv_budget.plan_kv with this device's measured numbers."""
        cfg = self.config
        gpu_memory = measured_used = activation = None
        if self.device_kind == "gpu":
            activation = self.runner.profile_activation_bytes(cfg.scheduler.max_num_batched_tokens,
                                                              cfg.scheduler.max_num_seqs)
            free, gpu_memory = torch.cuda.mem_get_info(self.device)
            measured_used = gpu_memory - free  # weights, CUDA context and anyone else's memory
            if self.runner.channel is not None:  # plan for the fullest rank
                activation, measured_used = self.runner.channel.all_reduce_max([activation, measured_used])
        plan = plan_kv(self.arch, self.model_name, cfg.model, cfg.cache, cfg.scheduler, cfg.parallel,
                       device=self.device_kind, gpu_memory=gpu_memory, measured_weight_bytes=measured_used,
                       measured_activation_bytes=activation)
        self.progress("kv_plan", {"plan": plan, "message": plan.format_text()})
        plan.check_fits()
        return plan

    # ---- requests --------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, scorer: PromptScorer | None = None,
                    score_from: int = 1) -> None:
        """Queue a request; its n samples share the prompt's KV blocks once it has prefilled.
        With a `scorer`, every prompt token from position `score_from` on is scored on the
        full-vocabulary log-probs of its prediction (llmctl.engine.scoring)."""
        params = params if params is not None else self.default_sampling_params()
        if request_id in self._requests:
            raise InvalidRequestError(f"request_id: {request_id!r} is already being served")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt: this model has no tokenizer; pass token ids")
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = None, list(prompt)
        check_request(prompt_ids, params, self.admission_limits)
        prompt_ids = [int(t) for t in prompt_ids]
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop: stop strings need a tokenizer; this model has none")
        if scorer is not None and not 1 <= score_from <= len(prompt_ids):
            raise InvalidRequestError(f"score_from: must be in [1, {len(prompt_ids)}] (the prompt's length), "
                                      f"got {score_from}")
        arrival = time.time() if arrival_time is None else arrival_time
        seqs = self.scheduler.add_request(request_id, prompt_ids, params, arrival)
        request = EngineRequest(request_id, prompt_text, seqs, self.tokenizer, self.device, arrival,
                                scorer, score_from)
        self._requests[request_id] = request
        self._num_with_step_state += request.has_step_state
        for seq in seqs:
            self._seq_to_request[seq.seq_id] = request

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults (as vLLM's LLM)."""
        return SamplingParams(**self.generation_defaults)

    def abort_request(self, request_id: str | list[str]) -> list[str]:
        """Stop the request(s) now and free their KV blocks; no further output is produced.
        Returns the ids that were still unfinished (what a metric counts as aborted)."""
        aborted = []
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            if rid in self._requests:
                aborted.append(rid)
            self.scheduler.abort(rid)
            self._drop(rid)
        return aborted

    def release(self) -> None:
        """Abort every request, let go of the KV cache and the model (their memory goes back
        to the device) and stop the other ranks: the engine serves nothing after this."""
        self.abort_request(list(self._requests))
        self.runner.kv_cache = None
        for layer in self.runner.attn_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)
        self.model = self.runner.model = None
        self.shutdown()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def _drop(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            self._num_with_step_state -= request.has_step_state
            for seq in request.seqs:
                self._seq_to_request.pop(seq.seq_id, None)

    # ---- one step --------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the outputs of the requests that got a token (cumulative),
        and the final output (with `error`) of any request the step failed."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        now = time.time()
        self.counters.record_schedule(out, self.scheduler.running, self.block_manager, self._seq_to_request, now)
        generators, prompt_lp_from, scorers = (step_state(out, self._seq_to_request, self.model, self.device)
                                               if self._num_with_step_state else ({}, {}, {}))
        result, failures = self._execute(out, generators, prompt_lp_from, scorers)
        touched: dict[str, EngineRequest] = {}
        for request_id, err in failures.items():
            touched[request_id] = self._fail(request_id, err)
        for seq_id, chunk in result.prompt_logprobs.items():
            self._seq_to_request[seq_id].add_prompt_logprobs(chunk)
        for seq_id, (chunks, next_pos) in result.prompt_scores.items():
            self._seq_to_request[seq_id].add_prompt_scores(chunks, next_pos)
        sampled_rows = {e.seq.seq_id: i for i, e in enumerate(out.scheduled) if e.do_sample}
        updated = self.scheduler.update_from_output(out, result.sampled_token_ids)
        now = time.time()
        for seq in updated:
            request = self._seq_to_request[seq.seq_id]
            if request.error is not None:  # a sibling sample failed it this step
                continue
            try:
                stop_str = request.on_token(seq, result.logprobs[sampled_rows[seq.seq_id]], now)
            except Exception as err:  # detokenizing one request's token must not stop the others
                if not is_request_fault(err):
                    raise engine_dead(err) from err
                touched[request.request_id] = self._fail(request.request_id, err)
                continue
            if stop_str is not None:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED, stop_str)
                request.mark_stopped_by_string(seq, stop_str)
            touched[request.request_id] = request
        self.counters.num_generation_tokens += len(updated)
        outputs = [r.make_output(now) for r in touched.values()
                   if r.params.output_kind is RequestOutputKind.CUMULATIVE or r.finished]
        for output in outputs:
            if output.finished:
                self._drop(output.request_id)
        return outputs

    def _execute(self, out: SchedulerOutput, generators: dict, prompt_lp_from: dict, scorers: dict
                 ) -> tuple[ModelRunnerOutput, dict[str, BaseException]]:
        """The runner's result for the step and the requests it failed (`faults.execute_isolated`)."""
        return execute_isolated(lambda o, g, p, s: self._run_batch(build_step_batch(o, g, p, s)),
                                out, generators, prompt_lp_from, scorers)

    def _fail(self, request_id: str, err: BaseException) -> EngineRequest:
        """End every sequence of the request, free its blocks, and record why."""
        request = self._requests[request_id]
        self.scheduler.abort(request_id)
        request.error = request_error(err)
        return request

    def _run_batch(self, batch: StepBatch) -> ModelRunnerOutput:
        """The runner's step; under tensor parallelism a rank that died (before or during the
        step) is an EngineDeadError naming it, whatever error the collective raised."""
        if self.tp_runtime is None:
            return self.runner.execute(batch)
        self.tp_runtime.check_ranks()
        try:
            return self.runner.execute(batch)
        except Exception as err:
            self.tp_runtime.check_ranks(err)
            raise

    def get_stats(self) -> EngineStats:
        return self.counters.stats(self.scheduler.get_stats(), self.block_manager)
