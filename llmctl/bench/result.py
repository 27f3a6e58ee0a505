"""One backend's throughput result, shared by the llmctl and the transformers backends."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class BenchResult:
    backend: str
    num_requests: int
    elapsed_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.num_prompt_tokens + self.num_output_tokens) / self.elapsed_s

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(requests_per_second=self.requests_per_s, output_throughput=self.output_tokens_per_s,
                   total_token_throughput=self.total_tokens_per_s)
        return out
